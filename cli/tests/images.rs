//! Images end to end over REST on the simulator: an operator imports an
//! image from a URL (a file server the test runs), HCP verifies, converts
//! and stores it on the providers named, and a tenant creates a VM from it
//! with the backing that provider answered; a wrong checksum, a truncated
//! download, a stalled server, a 404, a file of another format and an image
//! that names a backing file each end the job FAILED with the reason and
//! nothing on any provider; one catalog name resolves to each provider's
//! own backing and placement keeps to providers that have one; a tenant
//! captures a stopped VM into a private image only its project sees, within
//! its image quota, and deletes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_testkit::files::{FileServer, Serve};
use hcp_testkit::rest::Reply;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};
use sha2::Digest;

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const OPS: &str = "/api/hcp/ops/v1";
const IMAGES: &str = "/api/hcp/common/v1/images";

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// A disk made by qemu-img in `dir`: `qemu-img create -f FORMAT` of `size`,
/// with `extra` options; its bytes.
fn disk(dir: &Path, name: &str, format: &str, size: &str, extra: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .args(extra)
        .arg(&path)
        .arg(size)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(path).unwrap()
}

/// Core's settings for imports from the test's file server on loopback,
/// staged in `staging`, with a short stall bound and two attempts.
fn options(staging: &Path) -> StackOptions {
    StackOptions {
        core_toml: format!(
            "[egress]\nallow_http = true\nallow_networks = [\"127.0.0.0/8\"]\n\n\
             [images]\nstaging_dir = \"{}\"\nstall_timeout_seconds = 2\n",
            staging.display()
        ),
        jobs_toml: "max_attempts = 2\n".into(),
        ..with_images()
    }
}

/// The stack's simulator with image import and capture.
fn with_images() -> StackOptions {
    let defaults = StackOptions::default();
    StackOptions {
        sim_capabilities: format!("{},image_import,capture", defaults.sim_capabilities),
        ..defaults
    }
}

/// Waits for an operator's job to end and returns it.
async fn ops_job(s: &TestStack, ops: &str, job: &str) -> Value {
    wait_until(Duration::from_secs(60), &format!("job {job} to end"), || async {
        let r = s.rest.get(&format!("{OPS}/jobs/{job}"), ops).await?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        let ended = ["SUCCEEDED", "FAILED", "CANCELLED"].contains(&r.str("status").as_str());
        Ok(ended.then_some(r.body))
    })
    .await
    .unwrap()
}

async fn import(s: &TestStack, ops: &str, body: Value) -> Reply {
    s.rest.post(&format!("{OPS}/images:import"), ops, &body).await.unwrap()
}

/// The images the simulator holds, by HCP image id.
async fn sim_images(s: &TestStack) -> std::collections::HashMap<String, hcp_proto::sim::SimImage> {
    s.sim_stats().await.unwrap().images
}

fn staged_files(dir: &PathBuf) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_image_makes_vms_and_a_broken_import_leaves_nothing() {
    let work = hcp_testkit::TempDir::new().unwrap();
    let staging = work.path().join("staging");
    let qcow2 = disk(work.path(), "tiny.qcow2", "qcow2", "64M", &[]);
    let raw = disk(work.path(), "tiny.raw", "raw", "2M", &[]);
    // A qcow2 whose backing file is a file of core's host.
    let backed = disk(work.path(), "backed.qcow2", "qcow2", "64M", &["-F", "raw", "-b", "/etc/hostname"]);
    let files = FileServer::start(vec![
        ("/tiny.qcow2", Serve::File(qcow2.clone())),
        ("/tiny.raw", Serve::File(raw.clone())),
        ("/moved", Serve::Redirect("/tiny.qcow2".into())),
        ("/to-metadata", Serve::Redirect("http://169.254.169.254/latest/meta-data".into())),
        ("/truncated", Serve::Truncated(qcow2.clone())),
        ("/stalls", Serve::Stall(qcow2.clone())),
        ("/text", Serve::File(b"not a disk at all\n".repeat(100))),
        ("/backed.qcow2", Serve::File(backed.clone())),
    ])
    .await
    .unwrap();
    let mut s = TestStack::start(Path::new(HCP), options(&staging)).await.unwrap();
    let ops = s.ops_token();
    let tenant = s.tenant_token("acme", &["demo"]);

    // The import: stored on the simulator as it is (its first format is
    // qcow2), the SHA-256 it received the file's.
    let r = import(
        &s,
        &ops,
        json!({"name": "tiny", "url": files.url("/tiny.qcow2"), "sha256": sha256(&qcow2), "format": "qcow2",
               "providers": ["sim-1"], "os_type": "linux", "os_version": "1"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let (id, job) = (r.str("image_id"), r.str("job_id"));
    let image = s.rest.get(&format!("{IMAGES}/tiny"), &ops).await.unwrap();
    assert!(["IMPORTING", "AVAILABLE"].contains(&image.str("status").as_str()), "{}", image.body);
    let j = ops_job(&s, &ops, &job).await;
    assert_eq!(j["status"], "SUCCEEDED", "{j}");
    let image = s.rest.get(&format!("{IMAGES}/tiny"), &ops).await.unwrap().body;
    assert_eq!(image["status"], "AVAILABLE", "{image}");
    assert_eq!(image["backings"], json!({"sim-1": format!("sim-image-{id}")}), "{image}");
    assert_eq!(image["min_disk_gib"], 1, "64 MiB of virtual disk: {image}");
    let held = sim_images(&s).await;
    let stored = &held[&id];
    assert_eq!((stored.origin.as_str(), stored.sha256.as_str()), ("imported", sha256(&qcow2).as_str()));
    assert_eq!(stored.format, hcp_proto::provider::DiskFormat::Qcow2 as i32);
    // Tenants see the image, never its backings.
    let seen = s.rest.get(&format!("{IMAGES}/tiny"), &tenant).await.unwrap().body;
    assert_eq!((seen["backings"].clone(), seen["source"].clone()), (json!({}), json!("")), "{seen}");

    // A VM from it gets the simulator's own source.
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/demo/vms",
            &tenant,
            &json!({"name": "from-import", "flavor": "small", "image": "tiny"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    let done = s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(s.sim_stats().await.unwrap().image_sources[&vm], format!("sim-image-{id}"));

    // A raw file is converted to the simulator's first format, and a
    // redirect is followed (the target checked like the URL).
    for (name, path, bytes, format) in
        [("tiny-raw", "/tiny.raw", &raw, "raw"), ("moved", "/moved", &qcow2, "qcow2")]
    {
        let r = import(
            &s,
            &ops,
            json!({"name": name, "url": files.url(path), "sha256": sha256(bytes), "format": format,
                   "providers": ["sim-1"]}),
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.body);
        let j = ops_job(&s, &ops, &r.str("job_id")).await;
        assert_eq!(j["status"], "SUCCEEDED", "{name}: {j}");
        let stored = sim_images(&s).await.remove(&r.str("image_id")).unwrap();
        assert_eq!(stored.format, hcp_proto::provider::DiskFormat::Qcow2 as i32, "{name}");
        if format == "raw" {
            assert_ne!(stored.sha256, sha256(&raw), "the raw file was converted");
        }
    }

    // Each broken import ends FAILED saying why; its image is ERROR and no
    // provider holds it; nothing stays staged.
    let other = sha256(b"some other file");
    let broken = [
        ("bad-sum", "/tiny.qcow2", other.clone(), "qcow2", "sha256"),
        ("missing", "/nowhere", sha256(&qcow2), "qcow2", "404"),
        ("cut", "/truncated", sha256(&qcow2), "qcow2", "ended after"),
        ("stalled", "/stalls", sha256(&qcow2), "qcow2", "sent nothing"),
        ("not-qcow2", "/text", sha256(&b"not a disk at all\n".repeat(100)), "qcow2", "not a qcow2 image"),
        ("backed", "/backed.qcow2", sha256(&backed), "qcow2", "backing file"),
        ("metadata", "/to-metadata", sha256(&qcow2), "qcow2", "169.254.169.254"),
    ];
    for (name, path, sum, format, says) in broken {
        let r = import(
            &s,
            &ops,
            json!({"name": name, "url": files.url(path), "sha256": sum, "format": format, "providers": ["sim-1"]}),
        )
        .await;
        assert_eq!(r.status, 202, "{name}: {}", r.body);
        let j = ops_job(&s, &ops, &r.str("job_id")).await;
        assert_eq!(j["status"], "FAILED", "{name}: {j}");
        let message = j["error_message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
        let image = s.rest.get(&format!("{IMAGES}/{name}"), &ops).await.unwrap().body;
        assert_eq!(image["status"], "ERROR", "{name}: {image}");
        assert!(image["error_message"].as_str().unwrap_or_default().contains(says), "{name}: {image}");
        assert!(
            !sim_images(&s).await.contains_key(&r.str("image_id")),
            "{name} left an image on the simulator"
        );
        // An image in ERROR is deleted at once (nothing was stored).
        let d = s.rest.delete(&format!("{OPS}/images/{name}"), &ops).await.unwrap();
        assert_eq!((d.status, d.body["job_id"].clone()), (200, json!("")), "{name}: {}", d.body);
    }
    assert!(staged_files(&staging).is_empty(), "left staged: {:?}", staged_files(&staging));

    // Refused before any job, naming the field.
    let base = json!({"name": "x", "url": files.url("/tiny.qcow2"), "sha256": sha256(&qcow2), "format": "qcow2",
                      "providers": ["sim-1"]});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let plain = format!("http://{}", s.start_sim("plain", "cloud_init").await.unwrap());
    s.rest
        .post(
            &format!("{OPS}/providers"),
            &ops,
            &json!({"name": "plain", "zone": "zone-1", "endpoint": plain}),
        )
        .await
        .unwrap();
    for (body, status, field) in [
        (with("url", json!("file:///etc/passwd")), 400, "url"),
        (with("url", json!("http://169.254.169.254/disk.qcow2")), 400, "url"),
        (with("sha256", json!("Z".repeat(64))), 400, "sha256"),
        (with("format", json!("iso")), 400, "format"),
        (with("providers", json!([])), 400, "providers"),
        (with("providers", json!(["nobody"])), 400, "providers[0]"),
        (with("providers", json!(["sim-1", "sim-1"])), 400, "providers[1]"),
        (with("providers", json!(["plain"])), 409, "providers[0]"),
        (with("name", json!("tiny")), 409, ""),
    ] {
        let r = import(&s, &ops, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        if !field.is_empty() {
            assert_eq!(r.body["details"]["field"], field, "{body}: {}", r.body);
        }
    }

    // Deleting: refused while a VM uses it; then a job removes it from the
    // simulator.
    let d = s.rest.delete(&format!("{OPS}/images/tiny"), &ops).await.unwrap();
    assert_eq!(d.status, 409, "{}", d.body);
    let r = s.rest.delete(&format!("/api/hcp/tenant/v1/projects/demo/vms/{vm}"), &tenant).await.unwrap();
    s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    let d = s.rest.delete(&format!("{OPS}/images/tiny"), &ops).await.unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    let j = ops_job(&s, &ops, d.body["job_id"].as_str().unwrap()).await;
    assert_eq!(j["status"], "SUCCEEDED", "{j}");
    assert!(!sim_images(&s).await.contains_key(&id));
    assert_eq!(s.rest.get(&format!("{IMAGES}/tiny"), &ops).await.unwrap().status, 404);
    s.kill("plain").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_catalog_name_resolves_to_each_providers_backing() {
    let mut s = TestStack::start(Path::new(HCP), StackOptions::default()).await.unwrap();
    let ops = s.ops_token();
    let tenant = s.tenant_token("acme", &["demo"]);
    let addr = s.start_sim("sim-2", "cloud_init").await.unwrap();
    s.register_provider("zone-2", "sim-2", &format!("http://{addr}"), json!({}), "default").await.unwrap();
    let r = s
        .rest
        .post(&format!("{OPS}/images"), &ops, &json!({"name": "multi", "backings": {"sim-1": "tpl-on-one"}}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["source"], "", "with backings, no source for the others: {}", r.body);
    let bad =
        s.rest.post(&format!("{OPS}/images"), &ops, &json!({"name": "x", "backings": {"nobody": "t"}})).await;
    assert_eq!(bad.as_ref().unwrap().body["details"]["field"], "image.backings.nobody");

    let create =
        |zone: &str| json!({"name": format!("in-{zone}"), "flavor": "small", "image": "multi", "zone": zone});
    // Only sim-1 has it: zone-2 cannot take the VM.
    let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &tenant, &create("zone-2")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["details"]["field"], "image");
    // Backed on sim-2 too, under another name.
    let r = s
        .rest
        .raw(
            "PUT",
            &format!("{OPS}/images/multi/backings/sim-2"),
            Some(&ops),
            Some(r#"{"source": "tpl-on-two"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["backings"], json!({"sim-1": "tpl-on-one", "sim-2": "tpl-on-two"}));
    let mut vms = Vec::new();
    for zone in ["zone-1", "zone-2"] {
        let r = s.rest.post("/api/hcp/tenant/v1/projects/demo/vms", &tenant, &create(zone)).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        let done = s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
        assert_eq!(done["status"], "SUCCEEDED", "{done}");
        vms.push(r.str("vm_id"));
    }
    assert_eq!(s.sim_stats().await.unwrap().image_sources[&vms[0]], "tpl-on-one");
    let mut two = hcp_proto::sim::sim_control_client::SimControlClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(),
    );
    let stats = two.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.image_sources[&vms[1]], "tpl-on-two");
    s.kill("sim-2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_captures_a_stopped_vm_into_a_private_image() {
    let s = TestStack::start(Path::new(HCP), with_images()).await.unwrap();
    let ops = s.ops_token();
    let tenant = s.tenant_token("acme", &["demo", "other"]);
    let vms = "/api/hcp/tenant/v1/projects/demo/vms";
    let r = s
        .rest
        .post(vms, &tenant, &json!({"name": "src", "flavor": "small", "image": "debian-12"}))
        .await
        .unwrap();
    let vm = r.str("vm_id");
    s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    let capture = |name: &str| json!({"image_name": name});
    let r = s.rest.post(&format!("{vms}/{vm}:capture"), &tenant, &capture("golden")).await.unwrap();
    assert_eq!(r.status, 409, "a running VM: {}", r.body);
    let r = s.rest.post(&format!("{vms}/{vm}:stop"), &tenant, &json!({"force": true})).await.unwrap();
    s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    let r = s.rest.post(&format!("{vms}/{vm}:capture"), &tenant, &capture("debian-12")).await.unwrap();
    assert_eq!((r.status, r.body["details"]["field"].clone()), (409, json!("image_name")), "{}", r.body);

    // A capture whose provider fails after making the image (its answer
    // lost, not retryable): the job FAILED, the image ERROR, the VM as it
    // was, and nothing left on the provider.
    let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(s.sim_channel().await.unwrap());
    let fault = hcp_proto::sim::Fault {
        operation: "CaptureImage".into(),
        code: "INVALID_ARGUMENT".into(),
        count: 1,
        message: "the disk is unreadable".into(),
        after_effect: true,
    };
    sim.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) }).await.unwrap();
    let r = s.rest.post(&format!("{vms}/{vm}:capture"), &tenant, &capture("broken")).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let broken = r.str("image_id");
    let done = s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(done["status"], "FAILED", "{done}");
    let image = s.rest.get(&format!("{IMAGES}/broken?project_id=demo"), &tenant).await.unwrap().body;
    assert_eq!(image["status"], "ERROR", "{image}");
    assert!(!s.sim_stats().await.unwrap().images.contains_key(&broken), "the failed capture is left");
    assert_eq!(s.rest.get(&format!("{vms}/{vm}"), &tenant).await.unwrap().body["status"], "STOPPED");
    let r = s.rest.delete("/api/hcp/tenant/v1/projects/demo/images/broken", &tenant).await.unwrap();
    assert_eq!(
        (r.status, r.body["job_id"].clone()),
        (202, json!("")),
        "nothing stored: gone at once: {}",
        r.body
    );

    // The capture: a private image of the project, on the VM's provider.
    let r = s.rest.post(&format!("{vms}/{vm}:capture"), &tenant, &capture("golden")).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.str("image_id");
    let done = s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        (done["status"].clone(), done["kind"].clone()),
        (json!("SUCCEEDED"), json!("vm.capture")),
        "{done}"
    );
    let v = s.rest.get(&format!("{vms}/{vm}"), &tenant).await.unwrap().body;
    assert_eq!(v["status"], "STOPPED", "the VM is as it was: {v}");
    let image = s.rest.get(&format!("{IMAGES}/golden?project_id=demo"), &tenant).await.unwrap().body;
    assert_eq!(
        (image["status"].clone(), image["visibility"].clone(), image["project_id"].clone()),
        (json!("AVAILABLE"), json!("PRIVATE"), json!("demo")),
        "{image}"
    );
    let stored = s.sim_stats().await.unwrap().images.remove(&id).unwrap();
    assert_eq!((stored.origin.as_str(), stored.vm_id.as_str()), ("captured", vm.as_str()));
    // Only its project sees it and creates from it.
    let listed = |project: &str| {
        let path = format!("{IMAGES}?project_id={project}");
        let s = &s;
        let tenant = &tenant;
        async move {
            let v = s.rest.get(&path, tenant).await.unwrap().body;
            v["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert!(listed("demo").await.contains(&"golden".to_owned()));
    assert!(!listed("other").await.contains(&"golden".to_owned()));
    assert_eq!(s.rest.get(&format!("{IMAGES}/golden?project_id=other"), &tenant).await.unwrap().status, 404);
    let stranger = s.tenant_token("evil", &["demo"]);
    assert_eq!(s.rest.get(&format!("{IMAGES}/golden?project_id=demo"), &stranger).await.unwrap().status, 404);
    let r = s
        .rest
        .post(
            "/api/hcp/tenant/v1/projects/other/vms",
            &tenant,
            &json!({"name": "x", "flavor": "small", "image": "golden"}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body["details"]["field"].clone()), (400, json!("image")), "{}", r.body);
    let r = s
        .rest
        .post(vms, &tenant, &json!({"name": "copy", "flavor": "small", "image": "golden"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let copy = r.str("vm_id");
    s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.sim_stats().await.unwrap().image_sources[&copy], format!("sim-image-{id}"));

    // The image quota: one image, counted here.
    let r = s
        .rest
        .raw(
            "PUT",
            "/api/hcp/ops/v1/tenants/acme/projects/demo/quota",
            Some(&ops),
            Some(r#"{"max_images": 1}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let q = s.rest.get("/api/hcp/tenant/v1/projects/demo/quota", &tenant).await.unwrap().body;
    assert_eq!((q["images"].clone(), q["max_images"].clone()), (json!(1), json!(1)), "{q}");
    let r = s.rest.post(&format!("{vms}/{vm}:capture"), &tenant, &capture("second")).await.unwrap();
    assert_eq!((r.status, r.body["code"].clone()), (429, json!("QUOTA_EXCEEDED")), "{}", r.body);

    // The tenant deletes it once no VM uses it; a job removes it from the
    // provider.
    let images = "/api/hcp/tenant/v1/projects/demo/images";
    let r = s.rest.delete(&format!("{images}/golden"), &tenant).await.unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s.rest.delete(&format!("{images}/debian-12"), &tenant).await.unwrap();
    assert_eq!(r.status, 404, "a public image is not the tenant's: {}", r.body);
    let r = s.rest.delete(&format!("{vms}/{copy}"), &tenant).await.unwrap();
    s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    let r = s.rest.delete(&format!("{images}/golden"), &tenant).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let done = s.rest.finished_job(&tenant, &r.str("job_id"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert!(!s.sim_stats().await.unwrap().images.contains_key(&id));
    assert!(!listed("demo").await.contains(&"golden".to_owned()));
}
