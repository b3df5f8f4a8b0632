//! Day-2 operations over REST on the sim provider: in-place updates,
//! resize (cold, and hot where the provider has it), forced stop, hard
//! reboot, addresses, the action history, the quota read, the network
//! catalog, reads by id alone, and the 409 that names the job in flight.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::rest::{Reply, Rest};
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);

fn vms(project: &str) -> String {
    format!("/api/hcp/tenant/v1/projects/{project}/vms")
}

async fn stack(capabilities: &str) -> TestStack {
    // Provider calls take 200 ms, so a job stays in flight long enough for
    // a second request to meet it.
    let opts = StackOptions {
        sim_capabilities: capabilities.to_owned(),
        sim_args: vec!["--latency-ms".into(), "200".into()],
        ..Default::default()
    };
    TestStack::start(Path::new(HCP), opts).await.expect("stack starts")
}

async fn finished(rest: &Rest, token: &str, job_id: &str) -> Value {
    rest.finished_job(token, job_id, WAIT).await.expect("job finishes")
}

/// Posts an operation, expects 202, waits for the job to succeed; returns it.
async fn run(rest: &Rest, token: &str, path: &str, body: Value) -> Value {
    let r = rest.post(path, token, &body).await.unwrap();
    assert_eq!(r.status, 202, "{path}: {}", r.body);
    let job = finished(rest, token, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{path}: {job}");
    job
}

async fn create(rest: &Rest, token: &str, name: &str, flavor: &str) -> String {
    let body = json!({"name": name, "flavor": flavor, "image": "debian-12",
                      "networks": [{"network": "default"}], "tags": ["web"], "metadata": {"tier": "front"}});
    let r = rest.post(&vms("demo"), token, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = finished(rest, token, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    r.str("vm_id")
}

async fn get_vm(rest: &Rest, token: &str, vm_id: &str) -> Value {
    let r = rest.get(&format!("{}/{vm_id}", vms("demo")), token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn actions(vm: &Value) -> Vec<String> {
    vm["allowed_actions"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

async fn patch(rest: &Rest, token: &str, vm_id: &str, body: Value) -> Reply {
    rest.raw("PATCH", &format!("{}/{vm_id}", vms("demo")), Some(token), Some(&body.to_string()))
        .await
        .unwrap()
}

/// The VM as the provider has it.
async fn on_hypervisor(s: &TestStack, vm_id: &str) -> hcp_proto::provider::VmInfo {
    let mut c = hcp_proto::provider::compute_client::ComputeClient::new(s.sim_channel().await.unwrap());
    c.get_vm(hcp_proto::provider::VmRef { vm_id: vm_id.to_owned() }).await.unwrap().into_inner()
}

#[tokio::test]
async fn a_vm_changes_in_place_and_its_history_says_who_did_what() {
    // A provider that resizes only stopped VMs.
    let s = stack("cloud_init,snapshot,snapshot_running,console_vnc,resize").await;
    let token = s.tenant_token("acme", &["demo"]);
    let vm_id = create(&s.rest, &token, "web-1", "small").await;

    // The read shows the size, the addresses and what may be done now.
    let vm = get_vm(&s.rest, &token, &vm_id).await;
    assert_eq!((vm["vcpus"].as_u64(), vm["memory_mib"].as_u64()), (Some(1), Some(512)));
    let nic = &vm["networks"][0];
    assert_eq!(nic["network"], "default");
    assert_eq!(nic["mac"].as_str().unwrap().len(), 17, "{vm}");
    assert!(!nic["ipv4"].as_array().unwrap().is_empty(), "{vm}");
    let hv = on_hypervisor(&s, &vm_id).await;
    assert_eq!(nic["mac"], hv.interfaces[0].mac.as_str(), "the mac is the provider's");
    assert_eq!(
        actions(&vm),
        ["update", "stop", "force_stop", "reboot", "hard_reboot", "snapshot", "console", "delete"],
        "no resize of a running vm on this provider"
    );

    // Rename, retag and relabel without a job.
    let r = patch(
        &s.rest,
        &token,
        &vm_id,
        json!({"name": "web-2", "tags": ["db", "db"], "metadata": {"tier": "back"}, "update_mask": "name,tags,metadata"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.body["name"].as_str(), r.body["tags"].clone()), (Some("web-2"), json!(["db"])));
    assert_eq!(r.body["metadata"], json!({"tier": "back"}));
    assert_eq!(r.body["job_id"], "", "an update starts no job");
    let listed = s.rest.get(&format!("{}?tag=db", vms("demo")), &token).await.unwrap();
    assert_eq!(listed.body["vms"][0]["name"], "web-2");
    let old_tag = s.rest.get(&format!("{}?tag=web", vms("demo")), &token).await.unwrap();
    assert_eq!(old_tag.body["vms"], json!([]));
    // Only the masked fields change.
    let r =
        patch(&s.rest, &token, &vm_id, json!({"name": "ignored", "tags": [], "update_mask": "tags"})).await;
    assert_eq!((r.status, r.body["name"].as_str()), (200, Some("web-2")));
    assert_eq!(r.body["tags"], json!([]));
    for (body, field) in [
        (json!({"name": "x"}), "update_mask"),
        (json!({"name": "x", "update_mask": "flavor"}), "update_mask"),
        (json!({"name": "-bad-", "update_mask": "name"}), "name"),
    ] {
        let r = patch(&s.rest, &token, &vm_id, body.clone()).await;
        assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some(field)), "{body}: {}", r.body);
    }

    // Hot resize is refused before any job, naming the flag.
    let resize = format!("{}/{vm_id}:resize", vms("demo"));
    let r = s.rest.post(&resize, &token, &json!({"flavor": "medium"})).await.unwrap();
    assert_eq!((r.status, r.str("code")), (409, "FEATURE_NOT_SUPPORTED".to_owned()), "{}", r.body);
    assert_eq!(r.body["details"]["capability"], "supports_hot_resize");

    // Forced stop, then a cold resize.
    run(&s.rest, &token, &format!("{}/{vm_id}:stop", vms("demo")), json!({"force": true})).await;
    let stopped = get_vm(&s.rest, &token, &vm_id).await;
    assert_eq!(stopped["status"], "STOPPED");
    assert_eq!(actions(&stopped), ["update", "start", "resize", "snapshot", "delete"]);
    let job = run(&s.rest, &token, &resize, json!({"flavor": "medium"})).await;
    assert_eq!(job["kind"], "vm.resize");
    let vm = get_vm(&s.rest, &token, &vm_id).await;
    assert_eq!(
        (vm["status"].as_str(), vm["flavor"].as_str(), vm["vcpus"].as_u64(), vm["memory_mib"].as_u64()),
        (Some("STOPPED"), Some("medium"), Some(2), Some(2048))
    );
    let hv = on_hypervisor(&s, &vm_id).await;
    assert_eq!((hv.vcpus, hv.memory_mib, hv.disk_gib), (2, 2048, 20), "the provider resized it");
    // Disks only grow; the same flavor is no change.
    let r = s.rest.post(&resize, &token, &json!({"flavor": "small"})).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("flavor")), "{}", r.body);
    let r = s.rest.post(&resize, &token, &json!({"flavor": "medium"})).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s.rest.post(&resize, &token, &json!({"flavor": "huge"})).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("flavor")), "{}", r.body);

    // A request meeting a job in flight is told which one.
    let start = s
        .rest
        .raw_with(
            "POST",
            &format!("{}/{vm_id}:start", vms("demo")),
            Some(&token),
            Some("{}"),
            &[("x-request-id", "req-start-42")],
        )
        .await
        .unwrap();
    assert_eq!(start.status, 202, "{}", start.body);
    let busy = s.rest.post(&format!("{}/{vm_id}:reboot", vms("demo")), &token, &json!({})).await.unwrap();
    assert_eq!((busy.status, busy.str("code")), (409, "CONFLICT".to_owned()), "{}", busy.body);
    assert_eq!(busy.body["details"]["job_id"], start.str("job_id").as_str());
    finished(&s.rest, &token, &start.str("job_id")).await;

    // Hard reboot resets the VM on the provider.
    let before = s.sim_stats().await.unwrap();
    run(&s.rest, &token, &format!("{}/{vm_id}:reboot", vms("demo")), json!({"type": "HARD"})).await;
    let after = s.sim_stats().await.unwrap();
    assert_eq!(after.hard_reboots, before.hard_reboots + 1, "a HARD reboot is a reset");
    let r =
        s.rest.post(&format!("{}/{vm_id}:reboot", vms("demo")), &token, &json!({"type": "SIDEWAYS"})).await;
    assert_eq!(r.unwrap().status, 400);

    // The history: every job, newest first, with its actor and request id.
    let history = s.rest.get(&format!("{}/{vm_id}/jobs", vms("demo")), &token).await.unwrap();
    assert_eq!(history.status, 200, "{}", history.body);
    let jobs = history.body["jobs"].as_array().unwrap();
    let kinds: Vec<&str> = jobs.iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["vm.reboot", "vm.start", "vm.resize", "vm.stop", "vm.create"]);
    assert!(jobs.iter().all(|j| j["actor"] == "test-user" && j["vm_id"] == vm_id.as_str()), "{jobs:#?}");
    assert!(jobs.iter().all(|j| !j["request_id"].as_str().unwrap().is_empty()), "{jobs:#?}");
    assert_eq!(jobs[1]["request_id"], "req-start-42");
    // Filters and pages over the whole project.
    let project_jobs = "/api/hcp/tenant/v1/projects/demo/jobs";
    let r = s.rest.get(&format!("{project_jobs}?kind=vm.resize"), &token).await.unwrap();
    assert_eq!(r.body["jobs"].as_array().unwrap().len(), 1, "{}", r.body);
    let r = s.rest.get(&format!("{project_jobs}?status=FAILED"), &token).await.unwrap();
    assert_eq!(r.body["jobs"], json!([]));
    let mut seen = Vec::new();
    let mut token_q = String::new();
    loop {
        let r =
            s.rest.get(&format!("{project_jobs}?page_size=2&page_token={token_q}"), &token).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        seen.extend(
            r.body["jobs"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap().to_owned()),
        );
        token_q = r.str("next_page_token");
        if token_q.is_empty() {
            break;
        }
    }
    let all: Vec<String> = jobs.iter().map(|j| j["job_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen, all);
    for (query, field) in [("kind=vm.explode", "kind"), ("vm_id=nope", "vm_id")] {
        let r = s.rest.get(&format!("{project_jobs}?{query}"), &token).await.unwrap();
        assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some(field)), "{}", r.body);
    }

    // A read by id alone follows the token's grants.
    let by_id = s.rest.get(&format!("/api/hcp/tenant/v1/vms/{vm_id}"), &token).await.unwrap();
    assert_eq!((by_id.status, by_id.str("name")), (200, "web-2".to_owned()), "{}", by_id.body);
    for other in [s.tenant_token("acme", &["elsewhere"]), s.tenant_token("globex", &["demo"])] {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/vms/{vm_id}"), &other).await.unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
    }
}

#[tokio::test]
async fn quotas_networks_and_hot_resize() {
    let s = stack("cloud_init,console_vnc,resize,hot_resize").await;
    let token = s.tenant_token("acme", &["demo"]);
    let ops = s.ops_token();

    // The network catalog, per zone; an unknown network gets no job.
    let nets = s.rest.get("/api/hcp/common/v1/networks?zone=zone-1", &token).await.unwrap();
    assert_eq!(nets.status, 200, "{}", nets.body);
    assert_eq!(nets.body["networks"][0]["name"], "default");
    assert!(nets.body["networks"][0].get("backings").is_none(), "tenants see no mapping");
    let none = s.rest.get("/api/hcp/common/v1/networks?zone=nowhere", &token).await.unwrap();
    assert_eq!(none.body["networks"], json!([]));
    let bad = json!({"name": "x", "flavor": "small", "image": "debian-12", "networks": [{"network": "no-such-net"}]});
    let r = s.rest.post(&vms("demo"), &token, &bad).await.unwrap();
    assert_eq!(
        (r.status, r.body["details"]["field"].as_str()),
        (400, Some("networks[0].network")),
        "{}",
        r.body
    );
    let set_mac = json!({"name": "x", "flavor": "small", "image": "debian-12",
                         "networks": [{"network": "default", "mac": "52:54:00:00:00:01"}]});
    let r = s.rest.post(&vms("demo"), &token, &set_mac).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("networks[0].mac")), "{}", r.body);
    let history = s.rest.get("/api/hcp/tenant/v1/projects/demo/jobs", &token).await.unwrap();
    assert_eq!(history.body["jobs"], json!([]), "refused creates made no job");

    // An operator adds a network mapped onto this provider's own name.
    let provider = s.rest.get("/api/hcp/ops/v1/providers", &ops).await.unwrap().body["providers"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let def = json!({"name": "prod", "zone": "zone-1", "backings": {provider.clone(): "br-prod"}});
    let r = s.rest.post("/api/hcp/ops/v1/networks", &ops, &def).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.rest.post("/api/hcp/ops/v1/networks", &token, &def).await.unwrap();
    assert_eq!(r.status, 403, "tenants do not manage networks");
    let body =
        json!({"name": "app-1", "flavor": "small", "image": "debian-12", "networks": [{"network": "prod"}]});
    let r = s.rest.post(&vms("demo"), &token, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let app = r.str("vm_id");
    finished(&s.rest, &token, &r.str("job_id")).await;
    let hv = on_hypervisor(&s, &app).await;
    assert_eq!(hv.interfaces[0].network, "br-prod", "the provider was handed the mapping");
    let vm = get_vm(&s.rest, &token, &app).await;
    assert_eq!(vm["networks"][0]["network"], "prod", "the tenant sees the catalog name");
    // A network in use stays.
    let r = s.rest.delete("/api/hcp/ops/v1/zones/zone-1/networks/prod", &ops).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);

    // Hot resize of a running VM.
    let resize = format!("{}/{app}:resize", vms("demo"));
    run(&s.rest, &token, &resize, json!({"flavor": "medium"})).await;
    let vm = get_vm(&s.rest, &token, &app).await;
    assert_eq!((vm["status"].as_str(), vm["vcpus"].as_u64()), (Some("ACTIVE"), Some(2)));
    assert!(actions(&vm).contains(&"resize".to_owned()));

    // The quota read says exactly where creates stop.
    let put = json!({"max_instances": 2, "max_vcpus": 3}).to_string();
    let r =
        s.rest.raw("PUT", "/api/hcp/ops/v1/tenants/acme/projects/demo/quota", Some(&ops), Some(&put)).await;
    assert_eq!(r.unwrap().status, 200);
    let quota = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &token).await.unwrap();
    assert_eq!(quota.status, 200, "{}", quota.body);
    assert_eq!(
        (
            quota.body["max_instances"].as_u64(),
            quota.body["instances"].as_u64(),
            quota.body["vcpus"].as_u64()
        ),
        (Some(2), Some(1), Some(2))
    );
    assert!(quota.body["max_memory_mib"].is_null(), "an unset limit is absent: {}", quota.body);
    // One vCPU left: a small VM fits, then the instance limit is reached.
    create(&s.rest, &token, "fits", "small").await;
    let quota = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &token).await.unwrap();
    assert_eq!(quota.body["instances"], quota.body["max_instances"]);
    let r = s
        .rest
        .post(&vms("demo"), &token, &json!({"name": "over", "flavor": "small", "image": "debian-12"}))
        .await;
    let r = r.unwrap();
    assert_eq!((r.status, r.str("code")), (429, "QUOTA_EXCEEDED".to_owned()), "{}", r.body);
    // A resize past the vCPU limit is refused too.
    let r = s.rest.post(&resize, &token, &json!({"flavor": "large"})).await.unwrap();
    assert_eq!((r.status, r.str("code")), (429, "QUOTA_EXCEEDED".to_owned()), "{}", r.body);
    let other = s.tenant_token("acme", &["other"]);
    let r = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &other).await.unwrap();
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn a_graceful_stop_may_take_longer_than_the_usual_provider_call() {
    // Provider calls time out after 2 s; this guest takes 3 s to shut down.
    let opts = StackOptions { providers_toml: "call_timeout_seconds = 2\n".into(), ..Default::default() };
    let s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let token = s.tenant_token("acme", &["demo"]);
    let vm_id = create(&s.rest, &token, "slow", "small").await;
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await.unwrap());
    sim.set_latency(hcp_proto::sim::SetLatencyRequest { operation: "StopVm".into(), latency_ms: 3000 })
        .await
        .unwrap();
    // The tenant allows 10 s: the call may last that long, and succeeds at once.
    let job =
        run(&s.rest, &token, &format!("{}/{vm_id}:stop", vms("demo")), json!({"timeout_seconds": 10})).await;
    assert_eq!(job["attempts"], 1, "{job}");
    // A forced stop is held to the usual 2 s, so the same slowness times out.
    run(&s.rest, &token, &format!("{}/{vm_id}:start", vms("demo")), json!({})).await;
    let r =
        s.rest.post(&format!("{}/{vm_id}:stop", vms("demo")), &token, &json!({"force": true})).await.unwrap();
    let job = wait_until(WAIT, "the forced stop to be retried", || async {
        let j = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{}", r.str("job_id")), &token).await?.body;
        Ok((j["attempts"].as_u64() >= Some(2) || j["status"] == "FAILED").then_some(j))
    })
    .await
    .unwrap();
    // The call timed out on the client side: a retryable outage.
    assert!(job["attempts"].as_u64() >= Some(2), "{job}");
    assert_eq!(job["error"]["code"], "PROVIDER_UNAVAILABLE", "{job}");
}
