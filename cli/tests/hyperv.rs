//! System test of the Hyper-V provider: core, gateway, the
//! `hcp-provider-hyperv` process and the Hyper-V host simulator process
//! (`hcp-hyperv-sim`, WS-Management to `root/virtualization/v2`) run side
//! by side; a tenant drives VMs through REST, and the simulator must have
//! seen no request off the documented contract.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::rdp;
use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::workspace_bin;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const WAIT: Duration = Duration::from_secs(60);
/// The image share as the Hyper-V host sees it.
const SHARE_HOST: &str = "\\\\files\\images";

struct Hv {
    s: TestStack,
    control: Rest,
    tenant: String,
}

impl Hv {
    async fn start() -> Self {
        // Image imports from the test's file server on loopback.
        let opts =
            StackOptions { core_toml: hcp_testkit::flows::LOOPBACK_EGRESS.to_owned(), ..Default::default() };
        let mut s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
        let sim_exe = workspace_bin(Path::new(HCP), "hcp-hyperv-sim").unwrap();
        let provider_exe = workspace_bin(Path::new(HCP), "hcp-provider-hyperv").unwrap();
        let dir = s.dir().to_owned();
        let disks = dir.join("hyperv-disks");
        std::fs::create_dir_all(&disks).unwrap();
        std::fs::write(disks.join("debian-12.vhdx"), vec![0u8; 4096]).unwrap();
        // The image share: a directory here, `\\files\images` to the host.
        let share = dir.join("image-share");
        std::fs::create_dir_all(&share).unwrap();
        let cert = dir.join("hyperv.pem");
        let addr = s
            .start_program(
                "hyperv-sim",
                &sim_exe,
                &[
                    "--cert-out".into(),
                    cert.display().to_string(),
                    "--control-listen".into(),
                    "127.0.0.1:0".into(),
                    "--user".into(),
                    "hcp=s3cret".into(),
                    "--switch".into(),
                    "External".into(),
                    "--disk-dir".into(),
                    disks.display().to_string(),
                    "--share".into(),
                    format!("{SHARE_HOST}={}", share.display()),
                ],
                &[],
            )
            .await
            .unwrap();
        let control = std::fs::read_to_string(cert.with_extension("control")).unwrap();
        let vmconnect: std::net::SocketAddr =
            std::fs::read_to_string(cert.with_extension("vmconnect")).unwrap().parse().unwrap();
        let config = dir.join("hyperv.toml");
        std::fs::write(
            &config,
            format!(
                "url = \"https://{addr}/wsman\"\nvm_dir = 'C:\\Hyper-V\\hcp'\nvm_dir_local = \"{disks}\"\n\
                 image_share = \"{share}\"\nimage_share_host_path = '{SHARE_HOST}'\n\
                 [images]\n\"debian-12-genericcloud\" = 'C:\\Hyper-V\\hcp\\debian-12.vhdx'\n\
                 [cloud_init]\nlocal_dir = \"{disks}\"\nhost_dir = 'C:\\Hyper-V\\hcp'\n\
                 [tls]\nca_file = \"{cert}\"\n\
                 [timing]\njob_poll_ms = 10\nretry_base_ms = 10\nshutdown_timeout_seconds = 5\n\
                 [vmconnect]\nport = {port}\n",
                port = vmconnect.port(),
                disks = disks.display(),
                share = share.display(),
                cert = cert.display(),
            ),
        )
        .unwrap();
        let provider = s
            .start_program(
                "provider-hyperv",
                &provider_exe,
                &["--config".into(), config.display().to_string(), "--listen".into(), "127.0.0.1:0".into()],
                &[],
            )
            .await
            .unwrap();
        let creds = json!({"username": "hcp", "password": "s3cret"});
        s.register_provider("hv", "hv-1", &format!("http://{provider}"), creds, "External").await.unwrap();
        let tenant = s.tenant_token("acme", &["demo"]);
        Self { s, control: Rest::new(format!("http://{control}")), tenant }
    }

    async fn create(&self, name: &str) -> String {
        let body = json!({"name": name, "flavor": "small", "image": "debian-12", "zone": "hv",
                          "networks": [{"network": "default"}], "user_data": "#cloud-config\n"});
        let r = self.s.rest.post(VMS, &self.tenant, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        let vm = r.str("vm_id");
        self.succeed(&r.str("job_id")).await;
        vm
    }

    async fn succeed(&self, job: &str) {
        let j: Value = self.s.rest.finished_job(&self.tenant, job, WAIT).await.unwrap();
        assert_eq!(j["status"], "SUCCEEDED", "{j}\nprovider log:\n{}", self.s.log("provider-hyperv"));
    }

    async fn operate(&self, vm: &str, action: &str, body: Value, expect: &str) {
        let r = if action == "delete" {
            self.s.rest.delete(&format!("{VMS}/{vm}"), &self.tenant).await
        } else {
            self.s.rest.post(&format!("{VMS}/{vm}:{action}"), &self.tenant, &body).await
        }
        .unwrap();
        assert_eq!(r.status, 202, "{action}: {}", r.body);
        self.succeed(&r.str("job_id")).await;
        let read = self.s.rest.get(&format!("{VMS}/{vm}"), &self.tenant).await.unwrap();
        assert_eq!(read.str("status"), expect, "after {action}: {}", read.body);
    }

    /// The simulated host's view of the VM named for `vm`.
    async fn host_vm(&self, vm: &str) -> Option<Value> {
        let vms = self.control.get("/_sim/vms", "").await.unwrap().body;
        vms.as_array().unwrap().iter().find(|v| v["name"] == format!("hcp-{vm}")).cloned()
    }

    async fn assert_no_violations(&self) {
        let v = self.control.get("/_sim/violations", "").await.unwrap().body;
        assert_eq!(v, json!([]), "requests off the contract");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_lives_and_dies_on_hyperv() {
    let hv = Hv::start().await;
    let vm = hv.create("web-1").await;
    let read = hv.s.rest.get(&format!("{VMS}/{vm}"), &hv.tenant).await.unwrap().body;
    assert_eq!(read["status"], "ACTIVE", "{read}");
    assert_eq!(read["networks"][0]["mac"].as_str().map(str::len), Some(17), "{read}");
    let host = hv.host_vm(&vm).await.expect("the VM is on the host");
    assert_eq!((host["cpus"].as_u64(), host["memory_mb"].as_u64()), (Some(1), Some(512)), "{host}");
    // The address the guest reports through KVP shows in the VM read.
    assert_eq!(read["networks"][0]["ipv4"][0], host["guest_ip"], "{read}");

    // Stop is graceful: the guest shuts down through its shutdown
    // component, no turn-off.
    hv.operate(&vm, "stop", json!({}), "STOPPED").await;
    let host = hv.host_vm(&vm).await.unwrap();
    assert_eq!(
        (host["counters"]["shutdowns"].as_u64(), host["counters"]["stops"].as_u64()),
        (Some(1), Some(0)),
        "{host}"
    );
    hv.operate(&vm, "start", json!({}), "ACTIVE").await;
    hv.operate(&vm, "reboot", json!({}), "ACTIVE").await;
    hv.operate(&vm, "reboot", json!({"type": "HARD"}), "ACTIVE").await;

    // A snapshot of the running VM; stopped, then reverted: running again.
    let snaps = format!("{VMS}/{vm}/snapshots");
    let r = hv.s.rest.post(&snaps, &hv.tenant, &json!({"name": "booted"})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let snap = r.str("snapshot_id");
    hv.succeed(&r.str("job_id")).await;
    let host = hv.host_vm(&vm).await.unwrap();
    assert_eq!(host["snapshots"][0]["name"], format!("hcp-{snap}"), "{host}");
    hv.operate(&vm, "stop", json!({"force": true}), "STOPPED").await;
    let r = hv.s.rest.post(&format!("{snaps}/{snap}:revert"), &hv.tenant, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    hv.succeed(&r.str("job_id")).await;
    let read = hv.s.rest.get(&format!("{VMS}/{vm}"), &hv.tenant).await.unwrap();
    assert_eq!(read.str("status"), "ACTIVE", "{}", read.body);

    // Console: VMConnect, RDP to the host's port 2179, reached through the
    // gateway's relay. A native client sends the single-use token as its
    // preconnection blob (FreeRDP: /pcb:<token>); the relay names the VM to
    // VMConnect by its GUID, and VMConnect's answer (CredSSP) comes back.
    let c = hv.s.console(&format!("{VMS}/{vm}"), &hv.tenant, &json!({"type": "rdp"})).await.unwrap();
    assert_eq!(c["type"], "rdp", "{c}");
    assert!(c.get("web_url").is_none_or(|w| w == ""), "no browser page for RDP: {c}");
    let token = c["token"].as_str().unwrap().to_owned();
    assert!(c["url"].as_str().unwrap().ends_with(&format!("/console/rdp?token={token}")), "{c}");
    let address = c["address"].as_str().unwrap().to_owned();
    // Hostile clients do not hold the relay up: garbage where the
    // preconnection PDU should be is closed at once, and a silent client
    // waits alone.
    let mut junk = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _ = junk.write_all(&[0xff; 4096]).await;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(WAIT, junk.read(&mut byte)).await.expect("garbage is closed");
    assert_eq!(n.unwrap_or(0), 0, "the relay answered garbage");
    let _silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (negotiation, mut conn) = rdp::connect(&address, &token).await.unwrap();
    assert_eq!(negotiation, rdp::Negotiation::Selected(rdp::CREDSSP));
    // What follows (the client's TLS hello, here a stand-in) reaches the
    // host untouched.
    let hello = b"\x16\x03\x01\x00\x05hello";
    conn.write_all(hello).await.unwrap();
    conn.shutdown().await.unwrap();
    drop(conn);
    let guid = host["guid"].as_str().unwrap().to_owned();
    let session = hcp_testkit::wait_until(WAIT, "the VMConnect session ends", || async {
        let all = hv.control.get("/_sim/vmconnect", "").await?.body;
        Ok(all.as_array().and_then(|a| a.last()).filter(|s| s["bytes_after"] == hello.len()).cloned())
    })
    .await
    .unwrap();
    assert_eq!(session["blob"], guid, "the relay named the VM by its GUID: {session}");
    assert_eq!(session["vm_name"], format!("hcp-{vm}"), "{session}");
    assert_eq!(session["outcome"], "confirmed CredSSP", "{session}");
    assert_eq!(session["requested_protocols"], 3, "TLS and CredSSP offered: {session}");
    // The token works once: the relay closes the second connection
    // without reaching the host.
    let again = rdp::connect(&address, &token).await;
    assert!(again.is_err(), "a used token was relayed: {again:?}");
    // The same session over the websocket route, with a new token.
    let c = hv.s.console(&format!("{VMS}/{vm}"), &hv.tenant, &json!({"type": "rdp"})).await.unwrap();
    let ws = rdp::over_websocket(c["url"].as_str().unwrap()).await.unwrap();
    assert_eq!(ws, Ok(rdp::Negotiation::Selected(rdp::CREDSSP)));
    let sessions = hv.control.get("/_sim/vmconnect", "").await.unwrap().body;
    assert_eq!(sessions.as_array().map(Vec::len), Some(2), "one host session per token: {sessions}");
    // Both sessions' ends are in the audit trail, with what they moved.
    let ops = hv.s.ops_token();
    let closed = hcp_testkit::wait_until(WAIT, "both console ends audited", || async {
        let r =
            hv.s.rest
                .get(&format!("/api/hcp/ops/v1/audit-events?resource_id={vm}&action=vm.console"), &ops)
                .await?;
        let ends: Vec<Value> = r.body["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["outcome"].as_str().is_some_and(|o| o.starts_with("closed:")))
            .cloned()
            .collect();
        Ok((ends.len() == 2).then_some(ends))
    })
    .await
    .unwrap();
    for end in &closed {
        let detail = end["detail"].as_str().unwrap_or_default();
        let moved = |key: &str| {
            detail.split_whitespace().find_map(|kv| kv.strip_prefix(key)).and_then(|n| n.parse::<u64>().ok())
        };
        assert!(moved("bytes_to_server=").is_some_and(|n| n > 0), "{end}");
        assert!(moved("bytes_to_client=").is_some_and(|n| n > 0), "{end}");
    }
    // A VNC console is not Hyper-V's: refused before any token exists.
    let r =
        hv.s.rest.post(&format!("{VMS}/{vm}:console"), &hv.tenant, &json!({"type": "vnc"})).await.unwrap();
    assert_eq!(
        (r.status, r.body["details"]["capability"].as_str()),
        (409, Some("supports_console_vnc")),
        "{}",
        r.body
    );

    hv.operate(&vm, "delete", json!({}), "DELETED").await;
    assert!(hv.host_vm(&vm).await.is_none());

    // A VM without integration services (no shutdown component) is turned
    // off at once by a graceful stop.
    hv.control.post("/_sim/faults", "", &json!({"no_shutdown_component": true})).await.unwrap();
    let bare = hv.create("bare").await;
    hv.control.post("/_sim/faults", "", &json!({})).await.unwrap();
    hv.operate(&bare, "stop", json!({}), "STOPPED").await;
    let host = hv.host_vm(&bare).await.unwrap();
    assert_eq!(
        (host["counters"]["shutdowns"].as_u64(), host["counters"]["stops"].as_u64()),
        (Some(0), Some(1)),
        "{host}"
    );
    hv.operate(&bare, "delete", json!({}), "DELETED").await;
    hv.assert_no_violations().await;
}

/// An image imported through HCP from a URL is converted to VHDX by core,
/// written by the provider to the image share and checked by the host; a
/// VM is made on it, and deleting the image removes the file from the
/// share.
#[tokio::test]
async fn an_image_imported_through_hcp_makes_a_vm_on_hyperv() {
    let hv = Hv::start().await;
    let qcow2 = hcp_testkit::flows::small_qcow2().unwrap();
    let files = hcp_testkit::files::FileServer::start(vec![(
        "/small.qcow2",
        hcp_testkit::files::Serve::File(qcow2.clone()),
    )])
    .await
    .unwrap();
    let url = files.url("/small.qcow2");
    let vm = json!({"networks": [{"network": "default"}], "user_data": "#cloud-config\n"});
    let backing = hcp_testkit::flows::image_imported_and_used(
        &hv.s.rest,
        &hv.s.ops_token(),
        &hv.tenant,
        ("small", &url, &qcow2, "qcow2"),
        "hv-1",
        "hv",
        &vm,
        WAIT,
    )
    .await
    .unwrap();
    assert!(backing.starts_with(SHARE_HOST) && backing.ends_with(".vhdx"), "{backing}");
    let share = hv.s.dir().join("image-share");
    let left: Vec<_> = std::fs::read_dir(&share).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the image share still holds {left:?}");
    hv.assert_no_violations().await;
}

/// Issue 28's flow through HCP on the Hyper-V test bed: a volume outlives
/// its VM and goes to the next; a kept boot volume boots the next VM.
#[tokio::test]
async fn a_volume_outlives_its_vm_on_hyperv() {
    let hv = Hv::start().await;
    let ops = hv.s.ops_token();
    let vm = json!({"networks": [{"network": "default"}], "user_data": "#cloud-config\n"});
    hcp_testkit::flows::volume_outlives_its_vm(&hv.s.rest, &ops, &hv.tenant, "hv", &vm, WAIT).await.unwrap();
    hv.assert_no_violations().await;
}
