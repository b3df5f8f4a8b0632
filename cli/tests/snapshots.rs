//! Snapshots through REST, and capability checks that depend on the VM: a
//! provider that snapshots only stopped VMs refuses a snapshot of an ACTIVE
//! VM with FEATURE_NOT_SUPPORTED naming supports_snapshot_running.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";

async fn finish(s: &TestStack, token: &str, job: &str) -> Value {
    wait_until(Duration::from_secs(20), "job to finish", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), token).await?;
        let st = r.str("status");
        Ok((st == "SUCCEEDED" || st == "FAILED").then_some(r.body))
    })
    .await
    .unwrap()
}

async fn active_vm(s: &TestStack, token: &str) -> String {
    let r = s
        .rest
        .post(VMS, token, &json!({"name": "snap", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(finish(s, token, &r.str("job_id")).await["status"], "SUCCEEDED");
    r.str("vm_id")
}

async fn op(s: &TestStack, token: &str, method: &str, path: &str, body: &str) -> Value {
    let r = s.rest.raw(method, path, Some(token), Some(body)).await.unwrap();
    assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
    let job = finish(s, token, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    r.body
}

async fn vm_status(s: &TestStack, token: &str, vm: &str) -> String {
    s.rest.get(&format!("{VMS}/{vm}"), token).await.unwrap().str("status")
}

#[tokio::test]
async fn snapshot_create_revert_delete() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s, &t).await;
    let snaps = format!("{VMS}/{vm}/snapshots");

    let created = op(&s, &t, "POST", &snaps, r#"{"name":"before-upgrade"}"#).await;
    let snap = created["snapshot_id"].as_str().unwrap().to_owned();
    assert_eq!(created["vm_id"], vm.as_str());
    let listed = s.rest.get(&snaps, &t).await.unwrap();
    assert_eq!(listed.body["snapshots"][0]["status"], "AVAILABLE", "{}", listed.body);
    assert_eq!(listed.body["snapshots"][0]["name"], "before-upgrade");
    assert_eq!(vm_status(&s, &t, &vm).await, "ACTIVE", "a snapshot keeps the vm as it was");

    // Stop, then revert to the running snapshot: the VM runs again.
    op(&s, &t, "POST", &format!("{VMS}/{vm}:stop"), "{}").await;
    op(&s, &t, "POST", &format!("{snaps}/{snap}:revert"), "{}").await;
    assert_eq!(vm_status(&s, &t, &vm).await, "ACTIVE");

    op(&s, &t, "DELETE", &format!("{snaps}/{snap}"), "").await;
    assert_eq!(s.rest.get(&snaps, &t).await.unwrap().body["snapshots"], json!([]));
    // Gone is gone: reverting or deleting it again is NOT_FOUND.
    let again = s.rest.raw("DELETE", &format!("{snaps}/{snap}"), Some(&t), None).await.unwrap();
    assert_eq!(again.status, 404, "{}", again.body);
    let bad = s.rest.raw("POST", &format!("{snaps}/not-a-uuid:revert"), Some(&t), Some("{}")).await.unwrap();
    assert_eq!((bad.status, bad.body["details"]["field"].as_str()), (400, Some("snapshot_id")));
    // Another tenant sees neither the VM nor its snapshots.
    let evil = s.tenant_token("evil", &["demo"]);
    assert_eq!(s.rest.get(&snaps, &evil).await.unwrap().status, 404);
}

#[tokio::test]
async fn snapshot_capabilities_depend_on_the_vm() {
    // This provider snapshots only stopped VMs.
    let opts = StackOptions { sim_capabilities: "snapshot".into(), ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s, &t).await;
    let snaps = format!("{VMS}/{vm}/snapshots");
    let r = s.rest.post(&snaps, &t, &json!({"name": "live"})).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "FEATURE_NOT_SUPPORTED"), "{}", r.body);
    assert_eq!(r.body["details"]["capability"], "supports_snapshot_running");
    assert_eq!(s.rest.get(&snaps, &t).await.unwrap().body["snapshots"], json!([]), "no snapshot, no job");
    op(&s, &t, "POST", &format!("{VMS}/{vm}:stop"), "{}").await;
    op(&s, &t, "POST", &snaps, r#"{"name":"cold"}"#).await;

    // A provider without snapshots at all.
    let s = TestStack::start(
        Path::new(HCP),
        StackOptions { sim_capabilities: "console_vnc".into(), ..Default::default() },
    )
    .await
    .unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let vm = active_vm(&s, &t).await;
    let r = s.rest.post(&format!("{VMS}/{vm}/snapshots"), &t, &json!({"name": "x"})).await.unwrap();
    assert_eq!(
        (r.status, r.body["details"]["capability"].as_str()),
        (409, Some("supports_snapshot")),
        "{}",
        r.body
    );
}
