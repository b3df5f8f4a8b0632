//! The operators' fleet (SRS-FLT), end to end: a provider disappears, its
//! VMs (in two tenants) are found with the fleet filters and force-deleted,
//! the quota they held is released, and when the provider comes back the
//! reconciler cleans what they left on it. Operator actions on a tenant's
//! VM, state resets (also with the provider process gone) and bad input on
//! the way.

use std::path::Path;
use std::time::Duration;

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const O: &str = "/api/hcp/ops/v1";

/// Sends SIGCONT to a stopped process when dropped, so a failing test
/// never leaves a frozen provider behind.
struct Thaw(Option<u32>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
        }
    }
}

async fn create(s: &TestStack, token: &str, project: &str, name: &str) -> Value {
    let path = format!("/api/hcp/tenant/v1/projects/{project}/vms");
    let r = s
        .rest
        .post(&path, token, &json!({"name": name, "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    json!({"status": r.status, "body": r.body})
}

async fn create_active(s: &TestStack, token: &str, project: &str, name: &str) -> String {
    let r = create(s, token, project, name).await;
    assert_eq!(r["status"], 202, "{r}");
    let job = r["body"]["job_id"].as_str().unwrap().to_owned();
    let path = format!("/api/hcp/tenant/v1/jobs/{job}");
    wait_until(Duration::from_secs(30), "create to succeed", || async {
        Ok((s.rest.get(&path, token).await?.str("status") == "SUCCEEDED").then_some(()))
    })
    .await
    .unwrap();
    r["body"]["vm_id"].as_str().unwrap().to_owned()
}

async fn fleet(s: &TestStack, query: &str) -> Value {
    let r = s.rest.get(&format!("{O}/vms?{query}"), &s.ops_token()).await.unwrap();
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    r.body
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        v["vms"].as_array().unwrap().iter().map(|vm| vm["vm_id"].as_str().unwrap().to_owned()).collect();
    out.sort();
    out
}

async fn provider_health(s: &TestStack, id: &str) -> String {
    s.rest.get(&format!("{O}/providers/{id}"), &s.ops_token()).await.unwrap().str("health")
}

#[tokio::test]
async fn an_operator_force_deletes_the_vms_of_a_vanished_provider_and_the_reconciler_cleans_up() {
    let opts = StackOptions {
        core_toml: "[reconciler]\ninterval_seconds = 1\n".into(),
        // A call to the frozen provider gives up soon (the reconciler waits on it).
        providers_toml: "call_timeout_seconds = 5\n".into(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    // An operator other than the tenants' user, so the actor tells them apart.
    let ops = s.subject_token("ops-alice", None, &[], &["ops.admin"], 3600);
    let acme = s.tenant_token("acme", &["demo"]);
    let globex = s.tenant_token("globex", &["prod"]);
    let r = s
        .rest
        .raw(
            "PUT",
            &format!("{O}/tenants/acme/projects/demo/quota"),
            Some(&ops),
            Some(&json!({"max_instances": 2}).to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // Three VMs on the first provider, in two tenants.
    let a1 = create_active(&s, &acme, "demo", "web-1").await;
    let a2 = create_active(&s, &acme, "demo", "web-2").await;
    let g1 = create_active(&s, &globex, "prod", "db-1").await;
    let sim1 = fleet(&s, "").await["vms"][0]["provider_id"].as_str().unwrap().to_owned();
    // A second provider for what comes next.
    let second = s.start_sim("sim-2", "cloud_init,console_vnc").await.unwrap();
    let r = s
        .rest
        .post(
            &format!("{O}/providers"),
            &ops,
            &json!({"name": "sim-2", "zone": "zone-1", "endpoint": format!("http://{second}")}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);

    // The operator acts on a tenant's VM: a job in the tenant's history.
    let r = s.rest.post(&format!("{O}/vms/{a2}:stop"), &ops, &json!({"force": true})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = s.rest.finished_job(&acme, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(job["actor"], "ops-alice", "the tenant's history names the operator: {job}");
    let r = s.rest.post(&format!("{O}/vms/{a2}:start"), &ops, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job_id = r.str("job_id");
    // A second operation while it runs: 409 naming the job.
    let busy = s.rest.post(&format!("{O}/vms/{a2}:reboot"), &ops, &json!({"hard": true})).await.unwrap();
    if busy.status == 409 {
        assert_eq!(busy.body["details"]["job_id"], job_id.as_str(), "{}", busy.body);
    }
    s.rest.finished_job(&acme, &job_id, Duration::from_secs(30)).await.unwrap();
    wait_until(Duration::from_secs(20), "vm idle", || async {
        let vm = s.rest.get(&format!("{O}/vms/{a2}"), &ops).await?;
        Ok((vm.str("status") == "ACTIVE" && vm.str("job_id").is_empty()).then_some(()))
    })
    .await
    .unwrap();

    // Bad input: unknown filter values, a page past the end, a reset to an
    // invalid state.
    let r = s.rest.get(&format!("{O}/vms?status=SLEEPING"), &ops).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("status")), "{}", r.body);
    let r = s.rest.get(&format!("{O}/vms?created_after=yesterday"), &ops).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("created_after")), "{}", r.body);
    let r = s.rest.get(&format!("{O}/vms?provider_id=not-a-uuid"), &ops).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("provider_id")), "{}", r.body);
    let first = fleet(&s, "page_size=2").await;
    assert_eq!(first["counts"]["total"], 3, "{first}");
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    let last = fleet(&s, &format!("page_size=2&page_token={token}")).await;
    assert_eq!(last["vms"].as_array().map(Vec::len), Some(1), "{last}");
    assert!(last["next_page_token"].as_str().unwrap_or_default().is_empty(), "{last}");
    assert!(last["counts"]["total"].is_null(), "counts on the first page only: {last}");
    let r = s
        .rest
        .post(&format!("{O}/vms/{a1}:reset-state"), &ops, &json!({"status": "DELETED", "reason": "x"}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("status")), "{}", r.body);
    // A reset the provider contradicts is refused unless forced; one it
    // confirms is done.
    let r = s
        .rest
        .post(&format!("{O}/vms/{a1}:reset-state"), &ops, &json!({"status": "STOPPED", "reason": "check"}))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["details"]["provider_state"].as_str()),
        (409, Some("RUNNING")),
        "{}",
        r.body
    );
    let r = s
        .rest
        .post(&format!("{O}/vms/{a1}:reset-state"), &ops, &json!({"status": "ERROR", "reason": "ticket 7"}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["vm"]["status"].as_str()), (200, Some("ERROR")), "{}", r.body);
    let errored = fleet(&s, "error_for_minutes=1").await;
    assert!(ids(&errored).is_empty(), "not in ERROR for a minute yet: {errored}");
    assert_eq!(ids(&fleet(&s, "status=ERROR").await), vec![a1.clone()]);
    let r = s.rest.get(&format!("{O}/vms?status=ACTIVE&error_for_minutes=5"), &ops).await.unwrap();
    assert_eq!(
        (r.status, r.body["details"]["field"].as_str()),
        (400, Some("error_for_minutes")),
        "{}",
        r.body
    );
    let audit =
        s.rest.get(&format!("{O}/audit-events?resource_id={a1}&action=vm.reset_state"), &ops).await.unwrap();
    let detail = audit.body["events"][0]["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail.contains("ticket 7") && detail.contains("ACTIVE -> ERROR"), "{}", audit.body);
    // Forced, a contradicted state is set all the same, and says so.
    let r = s
        .rest
        .post(
            &format!("{O}/vms/{a1}:reset-state"),
            &ops,
            &json!({"status": "STOPPED", "reason": "drill", "force": true}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["vm"]["status"].as_str(), r.body["forced"].as_bool()),
        (200, Some("STOPPED"), Some(true)),
        "{}",
        r.body
    );
    let r = s
        .rest
        .post(&format!("{O}/vms/{a1}:reset-state"), &ops, &json!({"status": "ACTIVE", "reason": "fixed"}))
        .await
        .unwrap();
    assert_eq!((r.status, r.body["vm"]["status"].as_str()), (200, Some("ACTIVE")), "{}", r.body);

    // The first provider disappears (its VMs stay in its memory).
    let _thaw = Thaw(s.pid("sim"));
    s.signal("sim", "STOP").unwrap();
    wait_until(Duration::from_secs(20), "sim-1 unhealthy", || async {
        Ok((provider_health(&s, &sim1).await == "UNHEALTHY").then_some(()))
    })
    .await
    .unwrap();

    // Its VMs, found across tenants with the filters.
    let on_sim1 = fleet(&s, &format!("provider_id={sim1}")).await;
    let mut want = vec![a1.clone(), a2.clone(), g1.clone()];
    want.sort();
    assert_eq!(ids(&on_sim1), want);
    assert_eq!(on_sim1["counts"]["by_provider"][&sim1], 3, "{on_sim1}");
    assert_eq!(ids(&fleet(&s, &format!("provider_id={sim1}&tenant_id=globex")).await), vec![g1.clone()]);
    assert_eq!(ids(&fleet(&s, &format!("provider_id={sim1}&name_prefix=web-&status=ACTIVE")).await).len(), 2);
    // acme is at its quota.
    let r = create(&s, &acme, "demo", "web-3").await;
    assert_eq!(
        (r["status"].as_u64(), r["body"]["code"].as_str()),
        (Some(429), Some("QUOTA_EXCEEDED")),
        "{r}"
    );

    // A page token taken now points past the end once they are gone.
    let acme_first = fleet(&s, &format!("provider_id={sim1}&tenant_id=acme&page_size=1")).await;
    let past = acme_first["next_page_token"].as_str().unwrap().to_owned();

    // Force-deleted, each with a reason.
    for id in [&a1, &a2, &g1] {
        let r = s
            .rest
            .post(&format!("{O}/vms/{id}:force-delete"), &ops, &json!({"reason": "sim-1 lost its rack"}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            (r.body["vm"]["status"].as_str(), r.body["leftover_recorded"].as_bool()),
            (Some("DELETED"), Some(true))
        );
    }
    assert!(ids(&fleet(&s, &format!("provider_id={sim1}")).await).is_empty());
    let after = fleet(&s, &format!("provider_id={sim1}&tenant_id=acme&page_size=1&page_token={past}")).await;
    assert!(ids(&after).is_empty(), "a page past the end is empty: {after}");
    let open = s.rest.get(&format!("{O}/vm-leftovers?open_only=true"), &ops).await.unwrap();
    assert_eq!(open.body["leftovers"].as_array().map(Vec::len), Some(3), "{}", open.body);
    let audit =
        s.rest.get(&format!("{O}/audit-events?resource_id={g1}&action=vm.force_delete"), &ops).await.unwrap();
    assert_eq!(audit.body["events"][0]["tenant_id"], "globex", "{}", audit.body);
    assert_eq!(audit.body["events"][0]["actor"], "ops-alice", "{}", audit.body);

    // The quota is released: acme creates again (on the second provider).
    let a3 = create_active(&s, &acme, "demo", "web-3").await;
    assert_ne!(s.rest.get(&format!("{O}/vms/{a3}"), &ops).await.unwrap().str("provider_id"), sim1);

    // The provider returns; the reconciler deletes the leftovers on it.
    s.signal("sim", "CONT").unwrap();
    wait_until(Duration::from_secs(30), "leftovers cleaned", || async {
        let all = s.rest.get(&format!("{O}/vm-leftovers"), &ops).await?;
        let rows = all.body["leftovers"].as_array().cloned().unwrap_or_default();
        Ok((rows.len() == 3 && rows.iter().all(|l| l["cleaned_how"] == "removed")).then_some(()))
    })
    .await
    .unwrap();
    let mut sim = ComputeClient::new(s.sim_channel().await.unwrap());
    for id in [&a1, &a2, &g1] {
        let got = sim.get_vm(hcp_proto::provider::VmRef { vm_id: id.clone() }).await;
        assert_eq!(
            got.map(|_| ()).unwrap_err().code(),
            tonic::Code::NotFound,
            "{id} is gone from the provider"
        );
    }
    let open = s.rest.get(&format!("{O}/vm-leftovers?open_only=true"), &ops).await.unwrap();
    assert_eq!(open.body["leftovers"].as_array().map(Vec::len), Some(0), "{}", open.body);
}

/// `:reset-state` of `vm` to `status` with a reason.
async fn reset(s: &TestStack, ops: &str, vm: &str, status: &str, force: bool) -> hcp_testkit::rest::Reply {
    let body = json!({"status": status, "reason": "provider down", "force": force});
    s.rest.post(&format!("{O}/vms/{vm}:reset-state"), ops, &body).await.unwrap()
}

/// A reset needs the provider's word: with the provider process gone,
/// setting a VM ACTIVE or STOPPED is refused with 503 PROVIDER_UNAVAILABLE
/// (the provider cannot be asked) unless forced; forced, it is done and
/// the audit event says the provider was unreachable. ERROR needs no word.
#[tokio::test]
async fn a_reset_while_the_provider_cannot_be_reached_needs_force() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let ops = s.subject_token("ops-bob", None, &[], &["ops.admin"], 3600);
    let acme = s.tenant_token("acme", &["demo"]);
    let vm = create_active(&s, &acme, "demo", "web-1").await;
    // The provider is reachable: a reset it confirms is done without force.
    let r = reset(&s, &ops, &vm, "ACTIVE", false).await;
    assert_eq!((r.status, r.body["provider_state"].as_str()), (200, Some("RUNNING")), "{}", r.body);

    // The provider process is gone.
    s.kill("sim").await;
    for status in ["ACTIVE", "STOPPED"] {
        let r = reset(&s, &ops, &vm, status, false).await;
        assert_eq!(
            (r.status, r.body["code"].as_str(), r.body["details"]["provider_state"].as_str()),
            (503, Some("PROVIDER_UNAVAILABLE"), Some("UNREACHABLE")),
            "{status}: {}",
            r.body
        );
    }
    let vm_now = s.rest.get(&format!("{O}/vms/{vm}"), &ops).await.unwrap();
    assert_eq!(vm_now.str("status"), "ACTIVE", "a refused reset changes nothing: {}", vm_now.body);
    let r = reset(&s, &ops, &vm, "STOPPED", true).await;
    assert_eq!(
        (
            r.status,
            r.body["vm"]["status"].as_str(),
            r.body["provider_state"].as_str(),
            r.body["forced"].as_bool()
        ),
        (200, Some("STOPPED"), Some("UNREACHABLE"), Some(true)),
        "{}",
        r.body
    );
    let r = reset(&s, &ops, &vm, "ERROR", false).await;
    assert_eq!((r.status, r.body["vm"]["status"].as_str()), (200, Some("ERROR")), "{}", r.body);
    let audit =
        s.rest.get(&format!("{O}/audit-events?resource_id={vm}&action=vm.reset_state"), &ops).await.unwrap();
    let details: Vec<&str> =
        audit.body["events"].as_array().unwrap().iter().filter_map(|e| e["detail"].as_str()).collect();
    assert!(
        details.iter().any(|d| d.contains("ACTIVE -> STOPPED; provider UNREACHABLE; forced")),
        "the forced reset is audited: {}",
        audit.body
    );
    assert!(
        audit.body["events"].as_array().unwrap().iter().all(|e| e["actor"] == "ops-bob"),
        "{}",
        audit.body
    );
}

/// `hcp` run as an operator against a stack.
struct Ops {
    env: Vec<(String, String)>,
}

impl Ops {
    async fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(HCP);
        cmd.args(args).env_remove("HCP_PROFILE").env_remove("HCP_OUTPUT");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("hcp finishes")
            .expect("hcp runs")
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.run(&all).await;
        assert!(
            out.status.success(),
            "hcp {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[tokio::test]
async fn operators_drive_the_fleet_with_the_hcp_command() {
    let s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let acme = s.tenant_token("acme", &["demo"]);
    let ops = Ops {
        env: vec![
            ("HCP_ENDPOINT".into(), format!("http://{}", s.gateway)),
            ("HCP_TOKEN".into(), s.ops_token()),
            ("HCP_CONFIG".into(), s.dir().join("no-config.toml").display().to_string()),
        ],
    };
    let vm = create_active(&s, &acme, "demo", "web-1").await;
    let other = create_active(&s, &acme, "demo", "web-2").await;
    let listed = ops.json(&["ops", "vm", "list", "--tenant", "acme", "--name-prefix", "web-"]).await;
    assert_eq!(listed["counts"]["total"], 2, "{listed}");
    let done = |job: String| {
        let acme = acme.clone();
        let s = &s;
        async move {
            let job = s.rest.finished_job(&acme, &job, Duration::from_secs(30)).await.unwrap();
            assert_eq!(job["status"], "SUCCEEDED", "{job}");
        }
    };
    let r = ops.json(&["ops", "vm", "stop", &vm, "--force"]).await;
    done(r["job_id"].as_str().unwrap().to_owned()).await;
    let r = ops.json(&["ops", "vm", "start", &vm]).await;
    done(r["job_id"].as_str().unwrap().to_owned()).await;
    let r = ops.json(&["ops", "vm", "reboot", &vm, "--hard"]).await;
    done(r["job_id"].as_str().unwrap().to_owned()).await;
    // The tenant's job history shows the operator's jobs.
    let jobs = s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{vm}/jobs"), &acme).await.unwrap();
    let kinds: Vec<&str> =
        jobs.body["jobs"].as_array().unwrap().iter().filter_map(|j| j["kind"].as_str()).collect();
    assert!(kinds.contains(&"vm.reboot") && kinds.contains(&"vm.stop"), "{}", jobs.body);

    let r = ops.json(&["ops", "vm", "reset-state", &vm, "error", "--reason", "ticket 9"]).await;
    assert_eq!(r["vm"]["status"], "ERROR", "{r}");
    assert_eq!(ops.json(&["ops", "vm", "list", "--status", "ERROR"]).await["vms"][0]["vm_id"], vm.as_str());
    let bad = ops.run(&["ops", "vm", "list", "--status", "SLEEPING"]).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("status"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let r = ops.json(&["ops", "vm", "force-delete", &vm, "--reason", "host gone"]).await;
    assert_eq!(
        (r["vm"]["status"].as_str(), r["leftover_recorded"].as_bool()),
        (Some("DELETED"), Some(true)),
        "{r}"
    );
    let left = ops.json(&["ops", "vm", "leftovers"]).await;
    assert_eq!(left["leftovers"][0]["vm_id"], vm.as_str(), "{left}");
    let r = ops.json(&["ops", "vm", "delete", &other]).await;
    done(r["job_id"].as_str().unwrap().to_owned()).await;
    let gone = s.rest.get(&format!("/api/hcp/tenant/v1/projects/demo/vms/{other}"), &acme).await.unwrap();
    assert_eq!(gone.str("status"), "DELETED", "{}", gone.body);
}
