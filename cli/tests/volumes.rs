//! Volumes through REST on the sim: a volume's whole life (create, attach
//! to a running VM, extend in use, detach, attach elsewhere, outliving the
//! VM it was attached to, delete), what is refused before any job exists
//! (bad sizes, unknown types, another tenant's ids, capabilities the
//! hypervisor lacks, a VM's bus full), and the volume quota holding under
//! concurrent creates on PostgreSQL.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::db::Backend;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const VOLUMES: &str = "/api/hcp/tenant/v1/projects/demo/volumes";
const SIM_CAPS: &str =
    "cloud_init,snapshot,snapshot_running,console_vnc,volumes,hot_attach,volume_extend_in_use";

fn options(caps: &str) -> StackOptions {
    StackOptions { sim_capabilities: caps.into(), ..Default::default() }
}

async fn finish(s: &TestStack, token: &str, job: &str) -> Value {
    wait_until(Duration::from_secs(20), "job to finish", || async {
        let r = s.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), token).await?;
        let st = r.str("status");
        Ok((st == "SUCCEEDED" || st == "FAILED").then_some(r.body))
    })
    .await
    .unwrap()
}

/// Sends an accepted operation (`body` null: none) and waits for its job
/// to succeed.
async fn op(s: &TestStack, token: &str, method: &str, path: &str, body: &Value) -> Value {
    let body = (!body.is_null()).then(|| body.to_string());
    let r = s.rest.raw(method, path, Some(token), body.as_deref()).await.unwrap();
    assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
    let job = finish(s, token, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{method} {path}: {job}");
    r.body
}

async fn volume_type(s: &TestStack, name: &str, max: u32) {
    let r = s
        .rest
        .post(
            "/api/hcp/ops/v1/volume-types",
            &s.ops_token(),
            &json!({"name": name, "max_size_gib": max, "description": "disks", "storage": {"sim-1": "default"}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
}

async fn vm(s: &TestStack, token: &str, name: &str) -> String {
    let body =
        op(s, token, "POST", VMS, &json!({"name": name, "flavor": "small", "image": "debian-12"})).await;
    body["vm_id"].as_str().unwrap().to_owned()
}

async fn volume(s: &TestStack, token: &str, name: &str, gib: u32) -> String {
    let body =
        op(s, token, "POST", VOLUMES, &json!({"name": name, "size_gib": gib, "volume_type": "standard"}))
            .await;
    body["volume_id"].as_str().unwrap().to_owned()
}

async fn get(s: &TestStack, token: &str, id: &str) -> Value {
    let r = s.rest.get(&format!("{VOLUMES}/{id}"), token).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// `GET /metrics` over plain HTTP/1.0: the text exposition format.
async fn metrics_page(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: core\r\n\r\n").await.unwrap();
    let mut page = String::new();
    sock.read_to_string(&mut page).await.unwrap();
    page
}

fn refused(r: &hcp_testkit::rest::Reply, status: u16, code: &str) {
    assert_eq!((r.status, r.str("code").as_str()), (status, code), "{}", r.body);
}

#[tokio::test]
async fn a_volume_outlives_the_vms_it_was_attached_to() {
    outlives(Backend::Sqlite).await;
}

/// The same on PostgreSQL, whose finish path differs from SQLite's (one
/// statement where it can be).
#[tokio::test]
async fn a_volume_outlives_the_vms_it_was_attached_to_on_postgres() {
    outlives(Backend::Postgres).await;
}

async fn outlives(backend: Backend) {
    let s = TestStack::start(Path::new(HCP), StackOptions { backend, ..options(SIM_CAPS) }).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 100).await;
    // Tenants see the type, never where it lives.
    let types = s.rest.get("/api/hcp/common/v1/volume-types", &t).await.unwrap();
    assert_eq!(types.body["volume_types"][0]["name"], "standard", "{}", types.body);
    assert!(types.body["volume_types"][0].get("storage").is_none_or(|v| v == &json!({})), "{}", types.body);

    let first = vm(&s, &t, "first").await;
    let data = volume(&s, &t, "data", 5).await;
    let v = get(&s, &t, &data).await;
    assert_eq!((v["status"].as_str(), v["size_gib"].as_u64()), (Some("AVAILABLE"), Some(5)), "{v}");
    assert_eq!(v["allowed_actions"], json!(["update", "extend", "attach", "delete"]), "{v}");

    // Attach to the running VM: the VM stays ACTIVE, the volume is IN_USE
    // at the first place after the root disk.
    let attached = op(&s, &t, "POST", &format!("{VMS}/{first}:attach"), &json!({"volume_id": data})).await;
    assert_eq!((attached["vm_id"].as_str(), attached["volume_id"].as_str()), (Some(&*first), Some(&*data)));
    let v = get(&s, &t, &data).await;
    assert_eq!(v["status"], "IN_USE", "{v}");
    assert_eq!(v["attachments"], json!([{"vm_id": first, "device_index": 1}]), "{v}");
    let vm_now = s.rest.get(&format!("{VMS}/{first}"), &t).await.unwrap();
    assert_eq!(vm_now.str("status"), "ACTIVE");
    let listed = s.rest.get(&format!("{VOLUMES}?vm_id={first}"), &t).await.unwrap();
    assert_eq!(listed.body["volumes"].as_array().map(Vec::len), Some(1), "{}", listed.body);

    // Refused before any job: delete while attached, attach twice, shrink.
    let r = s.rest.raw("DELETE", &format!("{VOLUMES}/{data}"), Some(&t), None).await.unwrap();
    refused(&r, 409, "CONFLICT");
    assert!(r.str("message").contains(&first), "{}", r.body);
    let second = vm(&s, &t, "second").await;
    let r = s.rest.post(&format!("{VMS}/{second}:attach"), &t, &json!({"volume_id": data})).await.unwrap();
    refused(&r, 409, "CONFLICT");
    let r = s.rest.post(&format!("{VOLUMES}/{data}:extend"), &t, &json!({"size_gib": 5})).await.unwrap();
    refused(&r, 400, "INVALID_ARGUMENT");
    assert_eq!(r.body["details"]["field"], "size_gib");

    // Grow it while the VM runs; the quota's view follows.
    op(&s, &t, "POST", &format!("{VOLUMES}/{data}:extend"), &json!({"size_gib": 8})).await;
    assert_eq!(get(&s, &t, &data).await["size_gib"], 8);
    let quota = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &t).await.unwrap();
    assert_eq!((quota.body["volumes"].as_u64(), quota.body["volume_gib"].as_str()), (Some(1), Some("8")));

    // Detach, attach to the second VM, then delete that VM: the volume
    // survives it, detached.
    op(&s, &t, "POST", &format!("{VMS}/{first}:detach"), &json!({"volume_id": data})).await;
    assert_eq!(get(&s, &t, &data).await["status"], "AVAILABLE");
    let r = s.rest.post(&format!("{VMS}/{first}:detach"), &t, &json!({"volume_id": data})).await.unwrap();
    refused(&r, 409, "CONFLICT");
    op(&s, &t, "POST", &format!("{VMS}/{second}:attach"), &json!({"volume_id": data})).await;
    op(&s, &t, "DELETE", &format!("{VMS}/{second}"), &Value::Null).await;
    let v = get(&s, &t, &data).await;
    assert_eq!((v["status"].as_str(), &v["attachments"]), (Some("AVAILABLE"), &json!([])), "{v}");

    // The volume's history, newest first.
    let jobs = s.rest.get(&format!("{VOLUMES}/{data}/jobs"), &t).await.unwrap();
    let kinds: Vec<&str> =
        jobs.body["jobs"].as_array().unwrap().iter().filter_map(|j| j["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["volume.attach", "volume.detach", "volume.extend", "volume.attach", "volume.create"],
        "{}",
        jobs.body
    );

    op(&s, &t, "DELETE", &format!("{VOLUMES}/{data}"), &Value::Null).await;
    assert_eq!(get(&s, &t, &data).await["status"], "DELETED");
    // Core's gauges count volumes by status, from the database.
    let core = s.metrics.iter().find(|(job, _)| *job == "core").map(|(_, a)| *a).unwrap();
    let page = metrics_page(core).await;
    for (series, want) in
        [("hcp_volumes{status=\"DELETED\"}", "1"), ("hcp_volume_gib{status=\"DELETED\"}", "8")]
    {
        let line = page.lines().find(|l| l.starts_with(series)).unwrap_or_default();
        assert_eq!(line.rsplit(' ').next(), Some(want), "{series} in:\n{page}");
    }
    let listed = s.rest.get(VOLUMES, &t).await.unwrap();
    assert_eq!(listed.body["volumes"], json!([]), "deleted volumes are listed only when asked for");
    let r = s.rest.raw("DELETE", &format!("{VOLUMES}/{data}"), Some(&t), None).await.unwrap();
    refused(&r, 404, "NOT_FOUND");
}

#[tokio::test]
async fn bad_volume_requests_are_refused_before_any_job() {
    let s =
        TestStack::start(Path::new(HCP), options(&format!("{SIM_CAPS},max_volumes_per_vm=1"))).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 10).await;
    let field = |r: &hcp_testkit::rest::Reply| {
        (r.status, r.body["details"]["field"].as_str().unwrap_or_default().to_owned())
    };
    for (body, name) in [
        (json!({"name": "a", "size_gib": 0, "volume_type": "standard"}), "size_gib"),
        (json!({"name": "a", "size_gib": -1, "volume_type": "standard"}), "size_gib"),
        (json!({"name": "a", "size_gib": 11, "volume_type": "standard"}), "size_gib"),
        (json!({"name": "a", "size_gib": 1, "volume_type": "gold"}), "volume_type"),
        (json!({"name": "a", "size_gib": 1}), "volume_type"),
        (json!({"name": "-a", "size_gib": 1, "volume_type": "standard"}), "name"),
        (json!({"name": "a", "size_gib": 1, "volume_type": "standard", "zone": "nowhere"}), "zone"),
    ] {
        let r = s.rest.post(VOLUMES, &t, &body).await.unwrap();
        assert_eq!(field(&r), (400, name.to_owned()), "{body}: {}", r.body);
    }
    assert_eq!(s.rest.get(VOLUMES, &t).await.unwrap().body["volumes"], json!([]), "nothing was made");

    // Another tenant's volume is exactly as unknown as a random id.
    let mine = volume(&s, &t, "mine", 1).await;
    let evil = s.tenant_token("evil", &["demo"]);
    let theirs = s.rest.get(&format!("{VOLUMES}/{mine}"), &evil).await.unwrap();
    let random = s.rest.get(&format!("{VOLUMES}/{}", uuid::Uuid::now_v7()), &evil).await.unwrap();
    assert_eq!((theirs.status, random.status), (404, 404));
    assert_eq!(theirs.str("code"), random.str("code"));
    let evil_vm = {
        let body =
            op(&s, &evil, "POST", VMS, &json!({"name": "e", "flavor": "small", "image": "debian-12"})).await;
        body["vm_id"].as_str().unwrap().to_owned()
    };
    let r =
        s.rest.post(&format!("{VMS}/{evil_vm}:attach"), &evil, &json!({"volume_id": mine})).await.unwrap();
    refused(&r, 404, "NOT_FOUND");
    assert!(!r.str("message").contains("mine"), "{}", r.body);

    // The VM's bus holds one volume here: the second is refused, naming it.
    let vm = vm(&s, &t, "full").await;
    op(&s, &t, "POST", &format!("{VMS}/{vm}:attach"), &json!({"volume_id": mine})).await;
    let other = volume(&s, &t, "other", 1).await;
    let r = s.rest.post(&format!("{VMS}/{vm}:attach"), &t, &json!({"volume_id": other})).await.unwrap();
    assert_eq!(field(&r), (400, "volume_id".to_owned()), "{}", r.body);
    let r =
        s.rest.post(&format!("{VMS}/{vm}:attach"), &t, &json!({"volume_id": "not-a-uuid"})).await.unwrap();
    assert_eq!(field(&r), (400, "volume_id".to_owned()), "{}", r.body);
}

#[tokio::test]
async fn capabilities_the_hypervisor_lacks_are_named() {
    // Volumes, but no hot attach and no growth in use.
    let s = TestStack::start(Path::new(HCP), options("cloud_init,console_vnc,volumes")).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 10).await;
    let vm = vm(&s, &t, "web").await;
    let data = volume(&s, &t, "data", 1).await;
    let r = s.rest.post(&format!("{VMS}/{vm}:attach"), &t, &json!({"volume_id": data})).await.unwrap();
    refused(&r, 409, "FEATURE_NOT_SUPPORTED");
    assert_eq!(r.body["details"]["capability"], "supports_hot_attach");
    op(&s, &t, "POST", &format!("{VMS}/{vm}:stop"), &json!({})).await;
    op(&s, &t, "POST", &format!("{VMS}/{vm}:attach"), &json!({"volume_id": data})).await;
    op(&s, &t, "POST", &format!("{VMS}/{vm}:start"), &json!({})).await;
    let r = s.rest.post(&format!("{VOLUMES}/{data}:extend"), &t, &json!({"size_gib": 2})).await.unwrap();
    refused(&r, 409, "FEATURE_NOT_SUPPORTED");
    assert_eq!(r.body["details"]["capability"], "supports_volume_extend_in_use");
    assert_eq!(get(&s, &t, &data).await["allowed_actions"], json!(["update"]));

    // A zone whose hypervisor has no volumes at all.
    let s = TestStack::start(Path::new(HCP), options("cloud_init,console_vnc")).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 10).await;
    let r = s
        .rest
        .post(VOLUMES, &t, &json!({"name": "a", "size_gib": 1, "volume_type": "standard"}))
        .await
        .unwrap();
    refused(&r, 409, "FEATURE_NOT_SUPPORTED");
    assert_eq!(r.body["details"]["capability"], "supports_volumes");
}

#[tokio::test]
async fn the_volume_quota_holds_under_concurrent_creates() {
    let opts = StackOptions { backend: Backend::Postgres, ..options(SIM_CAPS) };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 10).await;
    let r = s
        .rest
        .raw(
            "PUT",
            "/api/hcp/ops/v1/tenants/acme/projects/demo/quota",
            Some(&s.ops_token()),
            Some(r#"{"max_volumes": 5, "max_volume_gib": 12}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // 20 creates of 2 GiB at once: 5 volumes (10 GiB) fit both limits.
    let creates = (0..20).map(|i| {
        let s = &s;
        let t = &t;
        async move {
            s.rest
                .post(VOLUMES, t, &json!({"name": format!("v{i}"), "size_gib": 2, "volume_type": "standard"}))
                .await
                .unwrap()
        }
    });
    let answers = futures::future::join_all(creates).await;
    let accepted = answers.iter().filter(|r| r.status == 202).count();
    let over = answers.iter().filter(|r| r.status == 429 && r.str("code") == "QUOTA_EXCEEDED").count();
    assert_eq!((accepted, over), (5, 15), "max_volumes (5) binds before max_volume_gib (6 of 2 GiB)");
    let quota = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &t).await.unwrap();
    assert_eq!((quota.body["volumes"].as_u64(), quota.body["volume_gib"].as_str()), (Some(5), Some("10")));
}

/// The reconciler on volumes: HCP's record follows the hypervisor (a volume
/// gone is ERROR, an attachment made or removed behind HCP's back is
/// recorded), and an HCP volume HCP does not know is reported, never
/// deleted; every decision is an audit event.
#[tokio::test]
async fn the_reconciler_records_what_happened_to_volumes_behind_hcps_back() {
    use hcp_proto::sim::sim_control_client::SimControlClient;
    use hcp_proto::sim::{AddVolumeRequest, RemoveVolumeRequest, SetVolumeAttachmentRequest};
    let opts = StackOptions { core_toml: "[reconciler]\ninterval_seconds = 1\n".into(), ..options(SIM_CAPS) };
    let s = TestStack::start(Path::new(HCP), opts).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 10).await;
    let vm = vm(&s, &t, "web").await;
    let gone = volume(&s, &t, "gone", 1).await;
    let moved = volume(&s, &t, "moved", 1).await;
    let mut sim = SimControlClient::new(s.sim_channel().await.unwrap());
    sim.remove_volume(RemoveVolumeRequest { volume_id: gone.clone() }).await.unwrap();
    sim.set_volume_attachment(SetVolumeAttachmentRequest {
        volume_id: moved.clone(),
        vm_id: vm.clone(),
        slot: 3,
    })
    .await
    .unwrap();
    let stranger = uuid::Uuid::now_v7().to_string();
    sim.add_volume(AddVolumeRequest { volume_id: stranger.clone(), size_gib: 2, host: String::new() })
        .await
        .unwrap();

    wait_until(Duration::from_secs(20), "the reconciler to record both", || async {
        let g = get(&s, &t, &gone).await;
        let m = get(&s, &t, &moved).await;
        Ok((g["status"] == "ERROR" && m["status"] == "IN_USE").then_some(()))
    })
    .await
    .unwrap();
    let g = get(&s, &t, &gone).await;
    assert_eq!(
        (g["error"]["code"].as_str(), &g["allowed_actions"]),
        (Some("NOT_FOUND"), &json!(["update", "delete"])),
        "{g}"
    );
    let m = get(&s, &t, &moved).await;
    assert_eq!(m["attachments"], json!([{"vm_id": vm, "device_index": 3}]), "{m}");

    // Detached behind HCP's back: AVAILABLE again.
    sim.set_volume_attachment(SetVolumeAttachmentRequest {
        volume_id: moved.clone(),
        vm_id: String::new(),
        slot: 0,
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "the detachment recorded", || async {
        Ok((get(&s, &t, &moved).await["status"] == "AVAILABLE").then_some(()))
    })
    .await
    .unwrap();

    // Every decision is in the audit trail; the stranger is reported and
    // still on the hypervisor.
    let ops = s.ops_token();
    let trail = |resource: String| {
        let s = &s;
        let ops = &ops;
        async move {
            let r = s
                .rest
                .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={resource}"), ops)
                .await
                .unwrap();
            r.body["events"].as_array().cloned().unwrap_or_default()
        }
    };
    let actions = |events: Vec<Value>| {
        events.iter().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect::<Vec<_>>()
    };
    assert!(actions(trail(gone.clone()).await).contains(&"reconcile.missing".to_owned()));
    assert!(actions(trail(moved.clone()).await).iter().filter(|a| *a == "reconcile.attachment").count() >= 2);
    assert!(actions(trail(stranger.clone()).await).contains(&"reconcile.orphan".to_owned()));
    let mut compute = hcp_proto::provider::compute_client::ComputeClient::new(s.sim_channel().await.unwrap());
    let listed =
        compute.list_volumes(hcp_proto::provider::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.volumes.iter().any(|v| v.volume_id == stranger), "never deleted automatically");
}

/// A VM's root disk as a volume: a new boot volume goes with its VM by
/// default; one kept (`delete_on_vm_delete: false`) boots the next VM;
/// data volumes named at create are attached in order; what a create
/// cannot do with its volumes is refused before any job.
#[tokio::test]
async fn boot_volumes_and_volumes_at_create() {
    let s = TestStack::start(Path::new(HCP), options(SIM_CAPS)).await.unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    volume_type(&s, "standard", 100).await;
    let data = volume(&s, &t, "data", 2).await;
    let vm_with = |name: &str, extra: Value| {
        let mut body = json!({"name": name, "flavor": "small", "image": "debian-12"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let on_vm = |vm: String| {
        let (s, t) = (&s, t.clone());
        async move {
            let r = s.rest.get(&format!("{VOLUMES}?vm_id={vm}"), &t).await.unwrap();
            r.body["volumes"].as_array().cloned().unwrap_or_default()
        }
    };

    // A new boot volume (the flavor's 10 GiB) and a data volume at 1.
    let body = vm_with("first", json!({"boot_volume": {"volume_type": "standard"}, "volume_ids": [data]}));
    let first = op(&s, &t, "POST", VMS, &body).await["vm_id"].as_str().unwrap().to_owned();
    let held = on_vm(first.clone()).await;
    let boot = held.iter().find(|v| v["attachments"][0]["device_index"] == 0).cloned().unwrap_or(Value::Null);
    assert_eq!(
        (boot["status"].as_str(), boot["size_gib"].as_u64(), boot["delete_on_vm_delete"].as_bool()),
        (Some("IN_USE"), Some(10), Some(true)),
        "{held:?}"
    );
    let d = get(&s, &t, &data).await;
    assert_eq!(
        (d["status"].as_str(), &d["attachments"][0]["device_index"]),
        (Some("IN_USE"), &json!(1)),
        "{d}"
    );
    // The boot volume leaves only with its VM.
    let boot_id = boot["volume_id"].as_str().unwrap().to_owned();
    let r = s.rest.post(&format!("{VMS}/{first}:detach"), &t, &json!({"volume_id": boot_id})).await.unwrap();
    refused(&r, 409, "CONFLICT");
    let r = s.rest.post(&format!("{VOLUMES}/{boot_id}:extend"), &t, &json!({"size_gib": 20})).await.unwrap();
    refused(&r, 409, "CONFLICT");
    assert_eq!(boot["allowed_actions"], json!(["update"]), "{boot}");
    op(&s, &t, "DELETE", &format!("{VMS}/{first}"), &Value::Null).await;
    assert_eq!(get(&s, &t, &boot_id).await["status"], "DELETED", "a new boot volume goes with its VM");
    assert_eq!(get(&s, &t, &data).await["status"], "AVAILABLE", "a data volume never does");

    // A kept boot volume outlives its VM and boots the next.
    let body =
        vm_with("second", json!({"boot_volume": {"volume_type": "standard", "delete_on_vm_delete": false}}));
    let second = op(&s, &t, "POST", VMS, &body).await["vm_id"].as_str().unwrap().to_owned();
    let kept = on_vm(second.clone()).await[0]["volume_id"].as_str().unwrap().to_owned();
    op(&s, &t, "DELETE", &format!("{VMS}/{second}"), &Value::Null).await;
    let k = get(&s, &t, &kept).await;
    assert_eq!((k["status"].as_str(), &k["attachments"]), (Some("AVAILABLE"), &json!([])), "{k}");
    let body = vm_with("third", json!({"boot_volume": {"volume_id": kept}}));
    let third = op(&s, &t, "POST", VMS, &body).await["vm_id"].as_str().unwrap().to_owned();
    let k = get(&s, &t, &kept).await;
    assert_eq!(
        (&k["attachments"][0]["vm_id"], &k["delete_on_vm_delete"]),
        (&json!(third), &json!(false)),
        "{k}"
    );
    op(&s, &t, "DELETE", &format!("{VMS}/{third}"), &Value::Null).await;
    assert_eq!(get(&s, &t, &kept).await["status"], "AVAILABLE", "an existing boot volume stays by default");

    // Refused before any job.
    let field =
        |r: &hcp_testkit::rest::Reply| r.body["details"]["field"].as_str().unwrap_or_default().to_owned();
    for (extra, status, name) in [
        (json!({"boot_volume": {}}), 400, "boot_volume.volume_type"),
        (json!({"boot_volume": {"volume_type": "gold"}}), 400, "boot_volume.volume_type"),
        (
            json!({"boot_volume": {"volume_id": kept, "volume_type": "standard"}}),
            400,
            "boot_volume.volume_type",
        ),
        (json!({"volume_ids": [data, data]}), 400, "volume_ids[1]"),
        (json!({"volume_ids": [uuid::Uuid::now_v7().to_string()]}), 400, "volume_ids[0]"),
        (json!({"boot_volume": {"volume_id": data}}), 400, "boot_volume.volume_id"),
    ] {
        let r = s.rest.post(VMS, &t, &vm_with("bad", extra.clone())).await.unwrap();
        assert_eq!((r.status, field(&r)), (status, name.to_owned()), "{extra}: {}", r.body);
    }
    // A volume another VM holds is a conflict naming it.
    let body = vm_with("holder", json!({"volume_ids": [data]}));
    let holder = op(&s, &t, "POST", VMS, &body).await["vm_id"].as_str().unwrap().to_owned();
    let r = s.rest.post(VMS, &t, &vm_with("thief", json!({"volume_ids": [data]}))).await.unwrap();
    refused(&r, 409, "CONFLICT");
    assert!(r.str("message").contains(&holder), "{}", r.body);
    let vms = s.rest.get(VMS, &t).await.unwrap();
    let names: Vec<&str> =
        vms.body["vms"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(!names.contains(&"bad") && !names.contains(&"thief"), "{names:?}");
}
