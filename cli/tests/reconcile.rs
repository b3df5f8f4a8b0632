//! Drift between the store and a hypervisor, injected through the
//! simulator's control service, detected and handled by the reconciler per
//! policy within a reconcile period, with an audit event for each decision.

use std::path::Path;
use std::time::Duration;

use hcp_proto::provider::PowerState;
use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_proto::sim::{AddVmRequest, RemoveVmRequest, SetPowerStateRequest};
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
/// Two periods of one second plus start-up slack.
const PERIOD_BOUND: Duration = Duration::from_secs(8);

async fn stack(policies: &str) -> TestStack {
    let opts = StackOptions {
        core_toml: format!("[reconciler]\ninterval_seconds = 1\n{policies}\n"),
        ..Default::default()
    };
    TestStack::start(Path::new(HCP), opts).await.unwrap()
}

/// Creates three ACTIVE VMs; returns their ids.
async fn three_vms(s: &TestStack, token: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let r = s
            .rest
            .post(
                "/api/hcp/tenant/v1/projects/demo/vms",
                token,
                &json!({"name": name, "flavor": "small", "image": "debian-12"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        ids.push(r.str("vm_id"));
    }
    for id in &ids {
        wait_until(Duration::from_secs(20), "vm ACTIVE", || async {
            Ok((status(s, token, id).await == "ACTIVE").then_some(()))
        })
        .await
        .unwrap();
    }
    ids
}

async fn status(s: &TestStack, token: &str, id: &str) -> String {
    s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{id}"), token).await.unwrap().str("status")
}

async fn audit_outcome(s: &TestStack, action: &str, id: &str) -> Option<String> {
    let r = s
        .rest
        .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={id}&action={action}"), &s.ops_token())
        .await
        .ok()?;
    r.body["events"].as_array()?.first().map(|e: &Value| e["outcome"].as_str().unwrap_or_default().to_owned())
}

async fn power(s: &TestStack, id: &str) -> Option<PowerState> {
    let mut c = ComputeClient::new(s.sim_channel().await.ok()?);
    let vm = c.get_vm(hcp_proto::provider::VmRef { vm_id: id.to_owned() }).await.ok()?.into_inner();
    PowerState::try_from(vm.power_state).ok()
}

/// Removes `a` behind HCP's back, powers `b` off, and adds an unknown VM.
async fn inject(s: &TestStack, a: &str, b: &str, orphan: &str) {
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.remove_vm(RemoveVmRequest { vm_id: a.to_owned() }).await.unwrap();
    sim.set_power_state(SetPowerStateRequest {
        vm_id: b.to_owned(),
        power_state: PowerState::Shutoff as i32,
    })
    .await
    .unwrap();
    sim.add_vm(AddVmRequest { vm_id: orphan.to_owned(), power_state: PowerState::Running as i32 })
        .await
        .unwrap();
}

#[tokio::test]
async fn drift_is_repaired_and_orphans_reaped() {
    let s = stack("missing = \"repair\"\npower = \"repair\"\norphan = \"reap\"").await;
    let token = s.tenant_token("acme", &["demo"]);
    let ids = three_vms(&s, &token).await;
    let orphan = uuid::Uuid::now_v7().to_string();
    inject(&s, &ids[0], &ids[1], &orphan).await;

    wait_until(PERIOD_BOUND, "drift handled", || async {
        let missing_done = status(&s, &token, &ids[0]).await == "ERROR";
        let power_done = power(&s, &ids[1]).await == Some(PowerState::Running);
        let orphan_done = power(&s, &orphan).await.is_none();
        Ok((missing_done && power_done && orphan_done).then_some(()))
    })
    .await
    .unwrap();
    let vm =
        s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{}", ids[0]), &token).await.unwrap().body;
    assert_eq!(vm["error"]["code"], "NOT_FOUND");
    assert_eq!(status(&s, &token, &ids[1]).await, "ACTIVE");
    assert_eq!(status(&s, &token, &ids[2]).await, "ACTIVE", "an undisturbed vm is left alone");
    assert_eq!(audit_outcome(&s, "reconcile.missing", &ids[0]).await.as_deref(), Some("repaired"));
    assert_eq!(audit_outcome(&s, "reconcile.power", &ids[1]).await.as_deref(), Some("repaired"));
    assert_eq!(audit_outcome(&s, "reconcile.orphan", &orphan).await.as_deref(), Some("reaped"));
    assert_eq!(audit_outcome(&s, "reconcile.power", &ids[2]).await, None);
}

#[tokio::test]
async fn drift_is_reaped_adopted_or_reported() {
    let s = stack("missing = \"reap\"\npower = \"adopt\"\norphan = \"report\"").await;
    let token = s.tenant_token("acme", &["demo"]);
    let ids = three_vms(&s, &token).await;
    let orphan = uuid::Uuid::now_v7().to_string();
    inject(&s, &ids[0], &ids[1], &orphan).await;

    wait_until(PERIOD_BOUND, "drift handled", || async {
        let a = status(&s, &token, &ids[0]).await == "DELETED";
        let b = status(&s, &token, &ids[1]).await == "STOPPED";
        let c = audit_outcome(&s, "reconcile.orphan", &orphan).await.as_deref() == Some("reported");
        Ok((a && b && c).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(power(&s, &orphan).await, Some(PowerState::Running), "report leaves the orphan alone");
    assert_eq!(audit_outcome(&s, "reconcile.missing", &ids[0]).await.as_deref(), Some("reaped"));
    assert_eq!(audit_outcome(&s, "reconcile.power", &ids[1]).await.as_deref(), Some("adopted"));
    // Metering follows the adopted and reaped states.
    let store = s.db.store().await.unwrap();
    let usage = store.list_usage_events(&hcp_core::model::Scope::new("acme", "demo")).await.unwrap();
    let of = |id: &str| {
        usage.iter().filter(|e| e.vm_id.to_string() == id).map(|e| e.event.clone()).collect::<Vec<_>>()
    };
    assert_eq!(of(&ids[0]), vec!["started", "deleted"]);
    assert_eq!(of(&ids[1]), vec!["started", "stopped"]);
    // The tenant can start the adopted VM again.
    let r = s
        .rest
        .post(&format!("/api/hcp/tenant/v1/projects/demo/vms/{}:start", ids[1]), &token, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
}

#[tokio::test]
async fn addresses_the_hypervisor_reports_are_recorded_between_jobs() {
    let s = stack("").await;
    let token = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/vms",
            &token,
            &json!({"name": "net", "flavor": "small", "image": "debian-12", "networks": [{"network": "default"}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.str("vm_id");
    let read = || async {
        s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{id}"), &token).await.unwrap().body
    };
    let vm = wait_until(Duration::from_secs(20), "vm ACTIVE with an address", || async {
        let vm = read().await;
        Ok((vm["status"] == "ACTIVE" && vm["networks"][0]["ipv4"][0].is_string()).then_some(vm))
    })
    .await
    .unwrap();
    // The address changes behind HCP's back (here: HCP forgets it, as if the
    // guest renewed a lease with a new one): the reconciler records what
    // the hypervisor reports, with no job.
    let store = s.db.store().await.unwrap();
    let vm_id: hcp_proto::ids::VmId = id.parse().unwrap();
    let bare = vec![hcp_core::model::NetworkAttachment { network: "default".into(), ..Default::default() }];
    assert!(store.set_vm_networks(vm_id, &bare).await.unwrap());
    assert!(read().await["networks"][0]["ipv4"].as_array().unwrap().is_empty());
    let back = wait_until(PERIOD_BOUND, "the reconciler to record the address", || async {
        let now = read().await;
        Ok(now["networks"][0]["ipv4"][0].is_string().then_some(now))
    })
    .await
    .unwrap();
    assert_eq!(back["networks"], vm["networks"]);
    assert_eq!(back["job_id"], "");
}
