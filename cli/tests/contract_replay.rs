//! The API contract of issue 27 through the REST gateway: every mutating
//! operation of the tenant and ops APIs replays by Idempotency-Key (same
//! status and body), refuses the key for another request (422) and an
//! empty key (400); a 409 caused by a job in flight names the job, whatever
//! else is wrong with the request; creating a network never replaces one,
//! replacing says what it applies to and keeps backings VMs use; a quota
//! PATCH changes only the limits its mask names.

use std::path::Path;
use std::time::Duration;

use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const WAIT: Duration = Duration::from_secs(30);
const T: &str = "/api/hcp/tenant/v1/projects/demo";
const O: &str = "/api/hcp/ops/v1";
/// Every capability the sim has.
const ALL: &str = "cloud_init,snapshot,snapshot_running,console_vnc,resize,hot_resize,live_migration,cold_migration,image_import,capture";
/// An id no resource has.
const NOBODY: &str = "01890000-0000-7000-8000-000000000000";

/// One request: method, path and JSON body.
struct Call {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

fn call(method: &'static str, path: impl Into<String>, body: Option<Value>) -> Call {
    Call { method, path: path.into(), body }
}

async fn send(s: &TestStack, token: &str, c: &Call, key: &str) -> Reply {
    let body = c.body.as_ref().map(|b| b.to_string());
    s.rest
        .raw_with(c.method, &c.path, Some(token), body.as_deref(), &[("idempotency-key", key)])
        .await
        .unwrap()
}

/// Checks the contract on one operation and returns its first answer: an
/// empty key is 400 naming Idempotency-Key (and does nothing), the first
/// request with `key` answers `ok`, the same request again the same status
/// and body, and `other` (another request) with the key 422.
async fn contract(s: &TestStack, token: &str, key: &str, c: Call, other: Call, ok: u16) -> Reply {
    let what = format!("{} {}", c.method, c.path);
    let empty = send(s, token, &c, "").await;
    assert_eq!(
        (empty.status, empty.body["details"]["field"].as_str()),
        (400, Some("Idempotency-Key")),
        "{what} with an empty key: {}",
        empty.body
    );
    let first = send(s, token, &c, key).await;
    assert_eq!(first.status, ok, "{what}: {}", first.body);
    let again = send(s, token, &c, key).await;
    assert_eq!((again.status, &again.body), (first.status, &first.body), "{what} replayed");
    let reused = send(s, token, &other, key).await;
    assert_eq!(
        (reused.status, reused.str("code").as_str()),
        (422, "IDEMPOTENCY_KEY_REUSED"),
        "{what}: the key with {} {}: {}",
        other.method,
        other.path,
        reused.body
    );
    first
}

async fn job_done(s: &TestStack, token: &str, r: &Reply) {
    let job = s.rest.finished_job(token, &r.str("job_id"), WAIT).await.expect("job finishes");
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
}

#[tokio::test]
async fn every_mutating_operation_replays_by_its_key() {
    let mut s = TestStack::start(
        Path::new(HCP),
        StackOptions {
            sim_capabilities: ALL.into(),
            // A long backoff keeps a failed attempt's job QUEUED for its retry.
            jobs_toml: "backoff_base_ms = 60000\nbackoff_max_ms = 60000\n".into(),
            // Webhooks at a loopback port the test holds (never answered).
            core_toml: "[egress]\nallow_networks = [\"127.0.0.0/8\"]\n".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ops = s.ops_token();
    let t = s.tenant_token("acme", &["demo"]);

    // Ops: the catalog, a second provider, its networks, hosts, quotas.
    let zone = |n: &str| json!({"name": n});
    contract(
        &s,
        &ops,
        "o1",
        call("POST", format!("{O}/zones"), Some(zone("z-r"))),
        call("POST", format!("{O}/zones"), Some(zone("z-x"))),
        201,
    )
    .await;
    let placement = |p: &str| Some(json!({"policy": p}));
    contract(
        &s,
        &ops,
        "o2",
        call("PUT", format!("{O}/zones/z-r/placement"), placement("pack")),
        call("PUT", format!("{O}/zones/z-r/placement"), placement("spread")),
        200,
    )
    .await;
    let flavor = |n: &str| Some(json!({"name": n, "vcpus": 1, "memory_mib": 512, "disk_gib": 10}));
    contract(
        &s,
        &ops,
        "o3",
        call("POST", format!("{O}/flavors"), flavor("f-r")),
        call("POST", format!("{O}/flavors"), flavor("f-x")),
        201,
    )
    .await;
    let image = |n: &str| Some(json!({"name": n, "source": "base"}));
    contract(
        &s,
        &ops,
        "o4",
        call("POST", format!("{O}/images"), image("i-r")),
        call("POST", format!("{O}/images"), image("i-x")),
        201,
    )
    .await;
    let sim2 = s.start_sim("sim-2", "cloud_init").await.unwrap();
    let provider = |n: &str| Some(json!({"name": n, "zone": "z-r", "endpoint": format!("http://{sim2}")}));
    let registered = contract(
        &s,
        &ops,
        "o5",
        call("POST", format!("{O}/providers"), provider("p-r")),
        call("POST", format!("{O}/providers"), provider("p-x")),
        201,
    )
    .await;
    let pid = registered.str("provider_id");
    let network = |b: &str| Some(json!({"name": "n-r", "zone": "z-r", "backings": {"p-r": b}}));
    contract(
        &s,
        &ops,
        "o6",
        call("POST", format!("{O}/networks"), network("br0")),
        call("POST", format!("{O}/networks"), network("br9")),
        201,
    )
    .await;
    let backings = |b: &str| Some(json!({"backings": {"p-r": b}}));
    contract(
        &s,
        &ops,
        "o7",
        call("PUT", format!("{O}/zones/z-r/networks/n-r"), backings("br1")),
        call("PUT", format!("{O}/zones/z-r/networks/n-r"), backings("br2")),
        200,
    )
    .await;
    let hosts = s.rest.get(&format!("{O}/providers/{pid}/hosts"), &ops).await.unwrap();
    let host = hosts.body["hosts"][0]["name"].as_str().expect("the sim has hosts").to_owned();
    let host_call =
        |h: &str, what: &str| call("POST", format!("{O}/providers/{pid}/hosts/{h}:{what}"), Some(json!({})));
    contract(&s, &ops, "o8", host_call(&host, "drain"), host_call("other-host", "drain"), 200).await;
    contract(&s, &ops, "o9", host_call(&host, "undrain"), host_call("other-host", "undrain"), 200).await;
    let quota = format!("{O}/tenants/acme/projects/demo/quota");
    contract(
        &s,
        &ops,
        "o10",
        call("PUT", &quota, Some(json!({"max_instances": 50}))),
        call("PUT", &quota, Some(json!({"max_instances": 51}))),
        200,
    )
    .await;
    let patch = |n: u32| Some(json!({"max_vcpus": n, "update_mask": "maxVcpus"}));
    contract(&s, &ops, "o11", call("PATCH", &quota, patch(100)), call("PATCH", &quota, patch(101)), 200)
        .await;

    // Tenant: a placement group and a VM through its whole life.
    let group = |n: &str| Some(json!({"name": n, "policy": "ANTI_AFFINITY"}));
    let g = contract(
        &s,
        &t,
        "t1",
        call("POST", format!("{T}/placement-groups"), group("g-r")),
        call("POST", format!("{T}/placement-groups"), group("g-x")),
        201,
    )
    .await;
    let gid = g.str("placement_group_id");
    // A key pair the VM is created with.
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINQ+QbnlBRQFSLv+VbZcnFZaRSVB4Au8lHsQOTLSOAr5 alice@example";
    let key_pair = |n: &str| Some(json!({"name": n, "public_key": key}));
    let k = contract(
        &s,
        &t,
        "t15",
        call("POST", format!("{T}/key-pairs"), key_pair("kp-r")),
        call("POST", format!("{T}/key-pairs"), key_pair("kp-x")),
        201,
    )
    .await;
    assert_eq!(k.str("fingerprint"), "SHA256:P360S6ynMxE/PhIHTdyP86IQKz7Pmp+xoIkXYmrY110");
    // A webhook endpoint: the create's replay answers its secret again
    // (opened from the sealed copy; the record keeps none).
    let hold = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hold.local_addr().unwrap().port();
    let hook = |p: &str| {
        Some(json!({"url": format!("https://127.0.0.1:{port}/{p}"), "event_types": ["job.finished"]}))
    };
    let w = contract(
        &s,
        &t,
        "t17",
        call("POST", format!("{T}/webhooks"), hook("a")),
        call("POST", format!("{T}/webhooks"), hook("b")),
        201,
    )
    .await;
    assert!(w.str("secret").starts_with("whsec_"), "{}", w.body);
    let wid = w.body["webhook"]["id"].as_str().unwrap().to_owned();
    contract(
        &s,
        &t,
        "t18",
        call("POST", format!("{T}/webhooks/{wid}:enable"), Some(json!({}))),
        call("POST", format!("{T}/webhooks/{NOBODY}:enable"), Some(json!({}))),
        200,
    )
    .await;
    let vm = |n: &str| {
        Some(
            json!({"name": n, "flavor": "small", "image": "debian-12", "zone": "zone-1", "key_names": ["kp-r"]}),
        )
    };
    let created = contract(
        &s,
        &t,
        "t2",
        call("POST", format!("{T}/vms"), vm("web-1")),
        call("POST", format!("{T}/vms"), vm("web-x")),
        202,
    )
    .await;
    job_done(&s, &t, &created).await;
    let id = created.str("vm_id");
    let v = format!("{T}/vms/{id}");
    let rename = |n: &str| Some(json!({"name": n, "update_mask": "name"}));
    contract(&s, &t, "t3", call("PATCH", &v, rename("web-2")), call("PATCH", &v, rename("web-3")), 200).await;
    let act = |what: &str, body: Value| call("POST", format!("{v}:{what}"), Some(body));
    let elsewhere = |what: &str| call("POST", format!("{T}/vms/{NOBODY}:{what}"), Some(json!({})));
    let r = contract(&s, &t, "t4", act("stop", json!({})), act("stop", json!({"force": true})), 202).await;
    job_done(&s, &t, &r).await;
    let r = contract(&s, &t, "t5", act("start", json!({})), elsewhere("start"), 202).await;
    job_done(&s, &t, &r).await;
    let r =
        contract(&s, &t, "t6", act("reboot", json!({})), act("reboot", json!({"type": "HARD"})), 202).await;
    job_done(&s, &t, &r).await;
    let r = contract(
        &s,
        &t,
        "t7",
        act("resize", json!({"flavor": "medium"})),
        act("resize", json!({"flavor": "large"})),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;
    // Issue 27's first report: the resize replayed after it took effect is
    // still its first answer, not "already has flavor medium".
    let again = send(&s, &t, &act("resize", json!({"flavor": "medium"})), "t7").await;
    assert_eq!((again.status, &again.body), (202, &r.body));
    let migrate = |body: Value| call("POST", format!("{O}/vms/{id}:migrate"), Some(body));
    let r =
        contract(&s, &ops, "o12", migrate(json!({})), migrate(json!({"target_host": "nowhere"})), 202).await;
    job_done(&s, &t, &r).await;
    // An operator's operations on the tenant's VM.
    let op = |what: &str, body: Value| call("POST", format!("{O}/vms/{id}:{what}"), Some(body));
    let r = contract(&s, &ops, "o18", op("stop", json!({})), op("stop", json!({"force": true})), 202).await;
    job_done(&s, &t, &r).await;
    let nobody_start = call("POST", format!("{O}/vms/{NOBODY}:start"), Some(json!({})));
    let r = contract(&s, &ops, "o19", op("start", json!({})), nobody_start, 202).await;
    job_done(&s, &t, &r).await;
    let r =
        contract(&s, &ops, "o20", op("reboot", json!({})), op("reboot", json!({"hard": true})), 202).await;
    job_done(&s, &t, &r).await;
    let reset = |reason: &str| op("reset-state", json!({"status": "ACTIVE", "reason": reason}));
    contract(&s, &ops, "o21", reset("checked"), reset("checked again"), 200).await;
    let console = contract(
        &s,
        &t,
        "t8",
        act("console", json!({"type": "vnc"})),
        act("console", json!({"type": "spice"})),
        200,
    )
    .await;
    assert!(!console.str("token").is_empty());
    // A job that waits for its retry can be cancelled; the cancel replays.
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let fault = hcp_proto::sim::Fault {
        operation: "StopVm".into(),
        code: "UNAVAILABLE".into(),
        ..Default::default()
    };
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) }).await.unwrap();
    let stop = s.rest.post(&format!("{v}:stop"), &t, &json!({})).await.unwrap();
    let job = stop.str("job_id");
    wait_until(WAIT, "the stop to wait for its retry", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &t).await?;
        Ok((r.str("status") == "QUEUED" && r.body["attempts"] == 1).then_some(()))
    })
    .await
    .unwrap();
    let cancel = |j: &str| call("POST", format!("/api/hcp/tenant/v1/jobs/{j}:cancel"), Some(json!({})));
    let r = contract(&s, &t, "t11", cancel(&job), cancel(NOBODY), 200).await;
    assert_eq!(r.str("status"), "CANCELLED");
    // An operator's cancel replays too.
    let fault = hcp_proto::sim::Fault {
        operation: "StopVm".into(),
        code: "UNAVAILABLE".into(),
        ..Default::default()
    };
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) }).await.unwrap();
    let stop = s.rest.post(&format!("{v}:stop"), &t, &json!({})).await.unwrap();
    let job = stop.str("job_id");
    wait_until(WAIT, "the second stop to wait for its retry", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &t).await?;
        Ok((r.str("status") == "QUEUED" && r.body["attempts"] == 1).then_some(()))
    })
    .await
    .unwrap();
    let ops_cancel = |j: &str| call("POST", format!("{O}/jobs/{j}:cancel"), Some(json!({})));
    let r = contract(&s, &ops, "o-cancel", ops_cancel(&job), ops_cancel(NOBODY), 200).await;
    assert_eq!(r.str("status"), "CANCELLED");

    let snap = |n: &str| Some(json!({"name": n}));
    let r = contract(
        &s,
        &t,
        "t9",
        call("POST", format!("{v}/snapshots"), snap("s1")),
        call("POST", format!("{v}/snapshots"), snap("s2")),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;
    let sid = r.str("snapshot_id");
    let r = contract(
        &s,
        &t,
        "t10",
        call("POST", format!("{v}/snapshots/{sid}:revert"), Some(json!({}))),
        call("POST", format!("{v}/snapshots/{NOBODY}:revert"), Some(json!({}))),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;

    let gone = |path: String| call("DELETE", path, None);
    let r = contract(
        &s,
        &t,
        "t12",
        gone(format!("{v}/snapshots/{sid}")),
        gone(format!("{v}/snapshots/{NOBODY}")),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;
    let r = contract(&s, &t, "t13", gone(v.clone()), gone(format!("{T}/vms/{NOBODY}")), 202).await;
    job_done(&s, &t, &r).await;
    contract(
        &s,
        &t,
        "t14",
        gone(format!("{T}/placement-groups/{gid}")),
        gone(format!("{T}/placement-groups/{NOBODY}")),
        200,
    )
    .await;
    contract(&s, &t, "t16", gone(format!("{T}/key-pairs/kp-r")), gone(format!("{T}/key-pairs/kp-x")), 200)
        .await;
    contract(&s, &t, "t19", gone(format!("{T}/webhooks/{wid}")), gone(format!("{T}/webhooks/{NOBODY}")), 200)
        .await;
    drop(hold);

    // An operator deletes a tenant's VM, and force-deletes another.
    let mut doomed = Vec::new();
    for name in ["ops-del", "ops-fd"] {
        // In zone-1: the provider of z-r is removed below, which a VM's
        // history would forbid.
        let body = json!({"name": name, "flavor": "small", "image": "debian-12", "zone": "zone-1"});
        let r = s.rest.post(&format!("{T}/vms"), &t, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        job_done(&s, &t, &r).await;
        doomed.push(r.str("vm_id"));
    }
    let r = contract(
        &s,
        &ops,
        "o22",
        gone(format!("{O}/vms/{}", doomed[0])),
        gone(format!("{O}/vms/{NOBODY}")),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;
    let fd = |reason: &str| {
        call("POST", format!("{O}/vms/{}:force-delete", doomed[1]), Some(json!({"reason": reason})))
    };
    contract(&s, &ops, "o23", fd("host gone"), fd("rack gone"), 200).await;

    // Images: an operator's import and a tenant's capture replay too.
    let import = |name: &str| {
        let body = json!({"name": name, "url": "https://images.example/r.qcow2", "sha256": "a".repeat(64),
                          "format": "qcow2", "providers": ["sim-1"]});
        call("POST", format!("{O}/images:import"), Some(body))
    };
    let r = contract(&s, &ops, "o24", import("imp-r"), import("imp-x"), 202).await;
    assert!(!r.str("image_id").is_empty(), "{}", r.body);
    let body = json!({"name": "cap-src", "flavor": "small", "image": "debian-12", "zone": "zone-1"});
    let r = s.rest.post(&format!("{T}/vms"), &t, &body).await.unwrap();
    job_done(&s, &t, &r).await;
    let src = r.str("vm_id");
    // The stop fault injected above is lifted.
    sim.clear(hcp_proto::sim::ClearRequest {}).await.unwrap();
    let r = s.rest.post(&format!("{T}/vms/{src}:stop"), &t, &json!({"force": true})).await.unwrap();
    job_done(&s, &t, &r).await;
    let capture =
        |name: &str| call("POST", format!("{T}/vms/{src}:capture"), Some(json!({"image_name": name})));
    let r = contract(&s, &t, "t20", capture("cap-r"), capture("cap-x"), 202).await;
    job_done(&s, &t, &r).await;

    // Ops deletes, last: what the rest used.
    contract(
        &s,
        &ops,
        "o13",
        gone(format!("{O}/zones/z-r/networks/n-r")),
        gone(format!("{O}/zones/z-r/networks/n-x")),
        200,
    )
    .await;
    contract(
        &s,
        &ops,
        "o14",
        gone(format!("{O}/providers/{pid}")),
        gone(format!("{O}/providers/{NOBODY}")),
        200,
    )
    .await;
    contract(&s, &ops, "o15", gone(format!("{O}/flavors/f-r")), gone(format!("{O}/flavors/f-x")), 200).await;
    contract(&s, &ops, "o16", gone(format!("{O}/images/i-r")), gone(format!("{O}/images/i-x")), 200).await;
    contract(&s, &ops, "o17", gone(format!("{O}/zones/z-r")), gone(format!("{O}/zones/z-x")), 200).await;

    // Keys are per tenant and per operator: another tenant's same key is a
    // new request.
    let evil = s.tenant_token("evil", &["demo"]);
    let r = send(&s, &evil, &call("POST", format!("{T}/placement-groups"), group("g-r")), "t1").await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_ne!(r.str("placement_group_id"), gid);
}

#[tokio::test]
async fn a_409_for_a_job_in_flight_names_the_job() {
    // Provider calls take 1 s, so each job stays in flight for the checks.
    let opts = StackOptions {
        sim_capabilities: ALL.into(),
        sim_args: vec!["--latency-ms".into(), "1000".into()],
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let r = s
        .rest
        .post(&format!("{T}/vms"), &t, &json!({"name": "a", "flavor": "medium", "image": "debian-12"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    job_done(&s, &t, &r).await;
    let v = format!("{T}/vms/{}", r.str("vm_id"));
    let post = |what: &str, body: Value| {
        let (s, t, path) = (&s, t.clone(), format!("{v}:{what}"));
        async move { s.rest.post(&path, &t, &body).await.unwrap() }
    };
    let busy = |r: &Reply, job: &str, what: &str| {
        assert_eq!(
            (r.status, r.str("code").as_str(), r.body["details"]["job_id"].as_str()),
            (409, "CONFLICT", Some(job)),
            "{what}: {}",
            r.body
        );
    };
    let resize = post("resize", json!({"flavor": "large"})).await;
    assert_eq!(resize.status, 202, "{}", resize.body);
    let job = resize.str("job_id");
    // The same resize again, one to the flavor the VM has, one whose disk
    // would shrink, one to no flavor at all: each meets the job first.
    busy(&post("resize", json!({"flavor": "large"})).await, &job, "the same resize");
    busy(&post("resize", json!({"flavor": "medium"})).await, &job, "a resize to the current flavor");
    busy(&post("resize", json!({"flavor": "small"})).await, &job, "a resize that would shrink the disk");
    busy(&post("resize", json!({"flavor": "no-such"})).await, &job, "a resize to an unknown flavor");
    busy(&post("console", json!({"type": "vnc"})).await, &job, "a console");
    busy(&post("console", json!({"type": "bogus"})).await, &job, "a console of an unknown type");
    busy(&post("stop", json!({"timeout_seconds": 999999})).await, &job, "a stop with a bad timeout");
    let snapshots = s.rest.post(&format!("{v}/snapshots"), &t, &json!({"name": ""})).await.unwrap();
    busy(&snapshots, &job, "a snapshot without a name");
    let revert = s.rest.post(&format!("{v}/snapshots/not-an-id:revert"), &t, &json!({})).await.unwrap();
    busy(&revert, &job, "a revert of a malformed snapshot id");
    let ops = s.ops_token();
    let id = v.rsplit('/').next().unwrap();
    let migrate = s
        .rest
        .post(&format!("{O}/vms/{id}:migrate"), &ops, &json!({"target_host": "x".repeat(5000)}))
        .await
        .unwrap();
    busy(&migrate, &job, "a migration with a bad target");
    let stop =
        s.rest.post(&format!("{O}/vms/{id}:stop"), &ops, &json!({"timeout_seconds": 999999})).await.unwrap();
    busy(&stop, &job, "an operator's stop with a bad timeout");
    let reset = s
        .rest
        .post(&format!("{O}/vms/{id}:reset-state"), &ops, &json!({"status": "ERROR", "reason": "r"}))
        .await
        .unwrap();
    busy(&reset, &job, "a state reset");
    let fd = s.rest.post(&format!("{O}/vms/{id}:force-delete"), &ops, &json!({"reason": "r"})).await.unwrap();
    busy(&fd, &job, "a force-delete without force");
    job_done(&s, &t, &resize).await;
    // Once it is done, the state-dependent answers come back.
    let same = post("resize", json!({"flavor": "large"})).await;
    assert_eq!((same.status, same.body["details"]["job_id"].is_null()), (409, true), "{}", same.body);
    // Then the body's fields are checked.
    let long = s.rest.post(&format!("{v}/snapshots"), &t, &json!({"name": "x".repeat(5000)})).await.unwrap();
    assert_eq!((long.status, long.body["details"]["field"].as_str()), (400, Some("name")), "{}", long.body);
    // A VM that does not exist is 404 whatever the body says.
    let r = s.rest.post(&format!("{T}/vms/{NOBODY}:resize"), &t, &json!({"flavor": ""})).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn networks_are_created_once_and_replaced_explicitly_and_quotas_patched() {
    let s =
        TestStack::start(Path::new(HCP), StackOptions { sim_capabilities: ALL.into(), ..Default::default() })
            .await
            .unwrap();
    let ops = s.ops_token();
    let t = s.tenant_token("acme", &["demo"]);
    let provider = s.rest.get(&format!("{O}/providers"), &ops).await.unwrap().body["providers"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let def = json!({"name": "prod", "zone": "zone-1", "backings": {provider.clone(): "br-prod"}});
    let r = s.rest.post(&format!("{O}/networks"), &ops, &def).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    // Creating it again is a conflict and changes nothing.
    let other = json!({"name": "prod", "zone": "zone-1", "backings": {}});
    let r = s.rest.post(&format!("{O}/networks"), &ops, &other).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "ALREADY_EXISTS"), "{}", r.body);
    assert_eq!(r.body["details"]["field"], "network.name");
    let listed = s.rest.get(&format!("{O}/networks?zone=zone-1"), &ops).await.unwrap();
    let prod =
        listed.body["networks"].as_array().unwrap().iter().find(|n| n["name"] == "prod").unwrap().clone();
    assert_eq!(prod["backings"][&provider], "br-prod");

    // A VM attached to it.
    let body =
        json!({"name": "app", "flavor": "small", "image": "debian-12", "networks": [{"network": "prod"}]});
    let r = s.rest.post(&format!("{T}/vms"), &t, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    job_done(&s, &t, &r).await;

    let put = |body: Value| {
        let (s, ops) = (&s, ops.clone());
        async move {
            s.rest
                .raw("PUT", &format!("{O}/zones/zone-1/networks/prod"), Some(&ops), Some(&body.to_string()))
                .await
                .unwrap()
        }
    };
    // Removing the backing its provider's VM was created with: refused,
    // naming the provider and the count.
    let r = put(json!({"description": "x", "backings": {}})).await;
    assert_eq!((r.status, r.str("code").as_str()), (409, "CONFLICT"), "{}", r.body);
    assert_eq!(
        (r.body["details"]["provider"].as_str(), r.body["details"]["vms"].as_str()),
        (Some(provider.as_str()), Some("1"))
    );
    // Changing it applies to new VMs; the reply says so.
    let r = put(json!({"description": "moved", "backings": {provider.clone(): "br-new"}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["network"]["backings"][&provider].as_str(), r.body["attached_vms"].as_u64()),
        (Some("br-new"), Some(1))
    );
    assert!(r.str("applies_to").contains("created from now on"), "{}", r.body);
    // The body may not name the network (the path does); an unknown one is 404.
    let r = put(json!({"name": "other", "backings": {}})).await;
    assert_eq!((r.status, r.body["details"]["field"].as_str()), (400, Some("name")), "{}", r.body);
    let r =
        s.rest.raw("PUT", &format!("{O}/zones/zone-1/networks/nope"), Some(&ops), Some("{}")).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);

    // Quotas: PUT replaces the whole quota (null is unlimited), PATCH only
    // what its mask names.
    let quota = format!("{O}/tenants/acme/projects/demo/quota");
    let send = |method: &'static str, body: Value| {
        let (s, ops, quota) = (&s, ops.clone(), quota.clone());
        async move { s.rest.raw(method, &quota, Some(&ops), Some(&body.to_string())).await.unwrap() }
    };
    let r = send("PUT", json!({"max_instances": 5, "max_vcpus": 10, "max_memory_mib": null})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["max_memory_mib"].is_null(), "{}", r.body);
    let r = send("PATCH", json!({"max_vcpus": 20, "update_mask": "maxVcpus"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["max_instances"].as_u64(), r.body["max_vcpus"].as_u64()),
        (Some(5), Some(20)),
        "{}",
        r.body
    );
    // A named limit left unset becomes unlimited.
    let r = send("PATCH", json!({"update_mask": "maxInstances"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["max_instances"].as_u64(), r.body["max_vcpus"].as_u64()),
        (None, Some(20)),
        "{}",
        r.body
    );
    // A limit set but not named, an unknown path and no mask are refused.
    for body in [
        json!({"max_vcpus": 1, "update_mask": "maxInstances"}),
        json!({"update_mask": "maxGpus"}),
        json!({"max_vcpus": 1}),
    ] {
        let r = send("PATCH", body.clone()).await;
        assert_eq!(
            (r.status, r.body["details"]["field"].as_str()),
            (400, Some("update_mask")),
            "{body}: {}",
            r.body
        );
    }
    let r = send("PUT", json!({"max_vcpus": 3})).await;
    assert_eq!(
        (r.body["max_instances"].as_u64(), r.body["max_vcpus"].as_u64()),
        (None, Some(3)),
        "PUT replaces the whole quota"
    );
}

/// Issue 28's routes keep issue 27's contract: every volume operation
/// replays by its key, and a 409 for a job in flight on the volume or its
/// VM names the job, whatever else is wrong with the request.
#[tokio::test]
async fn volume_operations_replay_and_name_the_job_in_flight() {
    let opts = StackOptions {
        sim_capabilities: format!("{ALL},volumes,hot_attach,volume_extend_in_use"),
        ..Default::default()
    };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let ops = s.ops_token();
    let t = s.tenant_token("acme", &["demo"]);
    let vtype = |n: &str| Some(json!({"name": n, "max_size_gib": 100}));
    contract(
        &s,
        &ops,
        "v1",
        call("POST", format!("{O}/volume-types"), vtype("standard")),
        call("POST", format!("{O}/volume-types"), vtype("fast")),
        201,
    )
    .await;
    let r = s
        .rest
        .post(&format!("{T}/vms"), &t, &json!({"name": "a", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    job_done(&s, &t, &r).await;
    let vm = format!("{T}/vms/{}", r.str("vm_id"));
    let volume = |n: &str| Some(json!({"name": n, "size_gib": 1, "volume_type": "standard"}));
    let r = contract(
        &s,
        &t,
        "v2",
        call("POST", format!("{T}/volumes"), volume("data")),
        call("POST", format!("{T}/volumes"), volume("other")),
        202,
    )
    .await;
    job_done(&s, &t, &r).await;
    let id = r.str("volume_id");
    let v = format!("{T}/volumes/{id}");
    let on =
        |what: &str, volume: &str| call("POST", format!("{vm}:{what}"), Some(json!({"volume_id": volume})));
    let r = contract(&s, &t, "v3", on("attach", &id), on("attach", NOBODY), 202).await;
    job_done(&s, &t, &r).await;
    let grow = |gib: u32| call("POST", format!("{v}:extend"), Some(json!({"size_gib": gib})));
    let r = contract(&s, &t, "v4", grow(2), grow(3), 202).await;
    job_done(&s, &t, &r).await;
    let rename = |n: &str| call("PATCH", v.clone(), Some(json!({"name": n, "update_mask": "name"})));
    contract(&s, &t, "v5", rename("data-1"), rename("data-2"), 200).await;
    let r = contract(&s, &t, "v6", on("detach", &id), on("detach", NOBODY), 202).await;
    job_done(&s, &t, &r).await;

    // A job in flight on the volume (its attach, whose provider call the
    // sim holds for two seconds) is named by every operation on the volume or
    // the VM, however wrong the rest of the request.
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    let held = hcp_proto::sim::SetLatencyRequest { operation: "AttachVolume".into(), latency_ms: 2000 };
    sim.set_latency(held).await.unwrap();
    let attach = s.rest.post(&format!("{vm}:attach"), &t, &json!({"volume_id": id})).await.unwrap();
    assert_eq!(attach.status, 202, "{}", attach.body);
    let job = attach.str("job_id");
    let busy = |r: &Reply, what: &str| {
        assert_eq!(
            (r.status, r.str("code").as_str(), r.body["details"]["job_id"].as_str()),
            (409, "CONFLICT", Some(job.as_str())),
            "{what}: {}",
            r.body
        );
    };
    busy(
        &s.rest.post(&format!("{v}:extend"), &t, &json!({"size_gib": 1})).await.unwrap(),
        "a shrinking extend",
    );
    busy(&s.rest.raw("DELETE", &v, Some(&t), None).await.unwrap(), "a delete");
    busy(&s.rest.post(&format!("{vm}:detach"), &t, &json!({"volume_id": id})).await.unwrap(), "a detach");
    busy(
        &s.rest.post(&format!("{vm}:stop"), &t, &json!({"timeout_seconds": 999999})).await.unwrap(),
        "a bad stop",
    );
    let other = s.rest.post(&format!("{vm}:attach"), &t, &json!({"volume_id": "not-an-id"})).await.unwrap();
    busy(&other, "an attach of a malformed volume id");
    job_done(&s, &t, &attach).await;
    let free = hcp_proto::sim::SetLatencyRequest { operation: "AttachVolume".into(), latency_ms: 0 };
    sim.set_latency(free).await.unwrap();
    let r = contract(&s, &t, "v7", on("detach", &id), on("detach", NOBODY), 202).await;
    job_done(&s, &t, &r).await;
    let gone = |path: String| call("DELETE", path, None);
    let r = contract(&s, &t, "v8", gone(v.clone()), gone(format!("{T}/volumes/{NOBODY}")), 202).await;
    job_done(&s, &t, &r).await;
    contract(
        &s,
        &ops,
        "v9",
        gone(format!("{O}/volume-types/standard")),
        gone(format!("{O}/volume-types/fast")),
        200,
    )
    .await;
}
