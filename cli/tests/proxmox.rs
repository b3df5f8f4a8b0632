//! System test of the Proxmox provider: core, gateway, the
//! `hcp-provider-proxmox` process and the Proxmox VE simulator process
//! (built from the official 9.1.3 schema) run side by side; a tenant drives
//! a VM through REST from create to delete, opens its VNC and serial
//! consoles through the gateway, and every request the provider and the
//! gateway sent to "Proxmox" must be valid against the schema.

use std::path::Path;
use std::time::Duration;

use hcp_testkit::rest::Rest;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::{wait_until, workspace_bin};
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const WAIT: Duration = Duration::from_secs(60);
/// The simulated cluster's API token secret.
const TOKEN_SECRET: &str = "5f0c8a52-3b1e-4c7d-9a8e-2d6f4b1c9e07";

async fn finished(rest: &Rest, token: &str, job: &str) -> Value {
    rest.finished_job(token, job, WAIT).await.expect("job finishes")
}

async fn operate(s: &TestStack, token: &str, vm: &str, action: &str, expect: &str) {
    let r = if action == "delete" {
        s.rest.delete(&format!("{VMS}/{vm}"), token).await
    } else {
        s.rest.post(&format!("{VMS}/{vm}:{action}"), token, &json!({})).await
    }
    .unwrap();
    assert_eq!(r.status, 202, "{action}: {}", r.body);
    let job = finished(&s.rest, token, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{action}: {job}");
    let vm = s.rest.get(&format!("{VMS}/{vm}"), token).await.unwrap();
    assert_eq!(vm.str("status"), expect, "after {action}: {}", vm.body);
}

/// Core, gateway, the PVE simulator (tasks running `task_ms`) and the
/// Proxmox provider process, registered in zone `pve`.
struct Pve {
    s: TestStack,
    /// The simulated cluster's API address.
    pve: String,
    /// The simulator's control API.
    control: String,
    /// The provider's address, its config file and executable.
    provider: String,
    config: std::path::PathBuf,
    provider_exe: std::path::PathBuf,
}

async fn pve_stack(task_ms: u64, jobs_toml: &str) -> Pve {
    pve_stack_with(task_ms, jobs_toml, &[], "").await
}

/// As [`pve_stack`], with more flags for the simulator and more keys for
/// the provider's configuration.
async fn pve_stack_with(task_ms: u64, jobs_toml: &str, sim_args: &[&str], provider_toml: &str) -> Pve {
    let opts = StackOptions {
        jobs_toml: jobs_toml.to_owned(),
        // Image imports from the test's file server on loopback.
        core_toml: hcp_testkit::flows::LOOPBACK_EGRESS.to_owned(),
        ..Default::default()
    };
    let mut s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
    let sim_exe = workspace_bin(Path::new(HCP), "hcp-proxmox-sim").unwrap();
    let provider_exe = workspace_bin(Path::new(HCP), "hcp-provider-proxmox").unwrap();
    let dir = s.dir().to_owned();
    let snippets = dir.join("snippets");
    std::fs::create_dir_all(&snippets).unwrap();
    let cert = dir.join("pve.pem");
    let token_secret = TOKEN_SECRET;
    let pve = s
        .start_program(
            "proxmox-sim",
            &sim_exe,
            &[
                "--cert-out".into(),
                cert.display().to_string(),
                "--control-listen".into(),
                "127.0.0.1:0".into(),
                "--snippets-dir".into(),
                snippets.display().to_string(),
                "--token".into(),
                format!("hcp@pve!provider={token_secret}"),
                "--task-ms".into(),
                task_ms.to_string(),
            ]
            .into_iter()
            .chain(sim_args.iter().map(|a| a.to_string()))
            .collect::<Vec<String>>(),
            &[],
        )
        .await
        .unwrap();
    let control = std::fs::read_to_string(cert.with_extension("control")).unwrap();
    // No [auth]: the credentials come from HCP at registration.
    let config = dir.join("proxmox.toml");
    std::fs::write(
        &config,
        format!(
            "api_url = \"https://{pve}\"\nnode = \"pve1\"\n{provider_toml}\
             [tls]\nca_file = \"{cert}\"\n\
             [cloud_init]\nuser = \"debian\"\nsnippets_storage = \"local\"\nsnippets_dir = \"{snippets}\"\n\
             [timing]\ntask_poll_ms = 20\nretry_base_ms = 20\n\
             [volumes]\nstorage = \"local-lvm\"\n",
            cert = cert.display(),
            snippets = snippets.display(),
        ),
    )
    .unwrap();
    let provider = s
        .start_program(
            "provider-proxmox",
            &provider_exe,
            &["--config".into(), config.display().to_string(), "--listen".into(), "127.0.0.1:0".into()],
            &[],
        )
        .await
        .unwrap();

    // The operator registers it in a zone of its own, with the token.
    // The zone's network is mapped onto a bridge of this cluster.
    let creds = json!({"token_id": "hcp@pve!provider", "token_secret": token_secret});
    let registered =
        s.register_provider("pve", "pve-1", &format!("http://{provider}"), creds, "vmbr9").await.unwrap();
    assert_eq!(registered["capabilities"]["supports_cloud_init"], true, "{registered}");

    Pve { s, pve, control, provider, config, provider_exe }
}

#[tokio::test]
async fn a_vm_lives_and_dies_on_proxmox() {
    if !hcp_proxmox_sim::schema::present_or_skip("a_vm_lives_and_dies_on_proxmox") {
        return;
    }
    let Pve { s, pve, control, .. } = pve_stack(20, "").await;
    let t = s.tenant_token("acme", &["demo"]);
    let body = json!({"name": "web-1", "flavor": "medium", "image": "debian-12", "zone": "pve",
                      "networks": [{"network": "default"}], "user_data": "#cloud-config\nhostname: web-1\n"});
    let r = s.rest.post(VMS, &t, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    let job = finished(&s.rest, &t, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(s.rest.get(&format!("{VMS}/{vm}"), &t).await.unwrap().str("status"), "ACTIVE");

    // Proxmox holds one clone, sized by the flavor, marked with the VM id.
    let sim = Rest::new(format!("http://{control}"));
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    let guests: Vec<&Value> = vms.as_array().unwrap().iter().filter(|v| v["template"] == false).collect();
    assert_eq!(guests.len(), 1, "{vms}");
    assert_eq!(guests[0]["status"], "running");
    assert_eq!(guests[0]["config"]["cores"], "2");
    assert_eq!(guests[0]["config"]["memory"], "2048");
    assert_eq!(guests[0]["config"]["tags"], format!("hcp;hcp-{vm}"));
    let net0 = guests[0]["config"]["net0"].as_str().unwrap();
    assert!(net0.ends_with(",bridge=vmbr9"), "the catalog's mapping reached Proxmox: {net0}");
    // The VM read shows the NIC's MAC and the address the guest agent reports.
    let read = s.rest.get(&format!("{VMS}/{vm}"), &t).await.unwrap().body;
    let mac = read["networks"][0]["mac"].as_str().unwrap();
    assert!(net0.to_ascii_lowercase().contains(mac) && mac.len() == 17, "{read}");
    assert!(read["networks"][0]["ipv4"][0].is_string(), "{read}");

    // Resize: Proxmox does it only stopped, so a running VM gets the 409.
    let r = s.rest.post(&format!("{VMS}/{vm}:resize"), &t, &json!({"flavor": "large"})).await.unwrap();
    assert_eq!((r.status, r.body["details"]["capability"].as_str()), (409, Some("supports_hot_resize")));

    operate(&s, &t, &vm, "stop", "STOPPED").await;
    let r = s.rest.post(&format!("{VMS}/{vm}:resize"), &t, &json!({"flavor": "large"})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(finished(&s.rest, &t, &r.str("job_id")).await["status"], "SUCCEEDED");
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    let guest = vms.as_array().unwrap().iter().find(|v| v["template"] == false).unwrap().clone();
    assert_eq!(
        (guest["config"]["cores"].as_str(), guest["config"]["memory"].as_str()),
        (Some("4"), Some("8192"))
    );
    assert!(guest["config"]["scsi0"].as_str().unwrap().contains("size=40G"), "{guest}");
    operate(&s, &t, &vm, "start", "ACTIVE").await;
    operate(&s, &t, &vm, "reboot", "ACTIVE").await;
    // The console: the gateway redeems the token, asks the provider for
    // the endpoint (vncproxy), opens the simulator's vncwebsocket over TLS
    // with the provider's token, answers the VNC challenge, and offers the
    // tenant RFB without authentication; the ServerInit is the VM's.
    let c = s.console(&format!("{VMS}/{vm}"), &t, &json!({})).await.unwrap();
    assert_eq!(c["type"], "vnc");
    assert!(!c.to_string().contains(&pve), "the tenant never sees the cluster: {c}");
    let url = c["url"].as_str().unwrap();
    let mut console = hcp_testkit::console::open(url, None).await.unwrap();
    let init = console.handshake().await.unwrap().expect("the proxy relays the VM's screen");
    let vmid = guests[0]["vmid"].as_u64().unwrap() as u32;
    assert_eq!(init.name, hcp_proxmox_sim::vnc::server_name(vmid));
    assert_eq!((init.width, init.height), (hcp_proxmox_sim::vnc::WIDTH, hcp_proxmox_sim::vnc::HEIGHT));
    let closed = console.close().await.unwrap();
    assert!(closed.rfb, "{closed:?}");
    // Once is once.
    let again = hcp_testkit::console::session(url, None).await.unwrap();
    assert_eq!((again.code, again.reason.as_str(), again.rfb), (4403, "console token already used", false));

    // The serial console: the gateway redeems the token and connects to
    // the provider's serial relay, which opens PVE's termproxy for serial0
    // and its vncwebsocket; a command typed in the tenant's websocket is
    // answered by the guest's shell.
    let c = s.console(&format!("{VMS}/{vm}"), &t, &json!({"type": "serial"})).await.unwrap();
    assert_eq!(c["type"], "serial");
    assert!(!c.to_string().contains(&pve), "the tenant never sees the cluster: {c}");
    let mut serial = hcp_testkit::console::open(c["url"].as_str().unwrap(), None).await.unwrap();
    let hello = serial.read_until("root@web-1:~# ").await.unwrap().unwrap();
    assert!(hello.contains("starting serial terminal on interface serial0"), "{hello:?}");
    serial.send(b"hostname\r").await.unwrap();
    serial.read_until("hostname\r\nweb-1\r\n").await.unwrap().unwrap();
    serial.send_text("echo typed as text\r").await.unwrap();
    serial.read_until("\r\ntyped as text\r\n").await.unwrap().unwrap();
    let closed = serial.close().await.unwrap();
    assert!(!closed.rfb, "{closed:?}");

    // Neither the vncproxy and termproxy tickets nor the API token the
    // gateway and the provider sent is in any log or file of HCP's
    // processes (the simulator's own log aside).
    let requests = sim.get("/_sim/requests", "").await.unwrap().body;
    let tickets: Vec<String> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["template"].as_str().is_some_and(|t| t.ends_with("/vncwebsocket")))
        .map(|r| r["params"]["vncticket"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tickets.len(), 2, "the VNC and the serial session each opened a vncwebsocket");
    for entry in std::fs::read_dir(s.dir()).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("proxmox-sim") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for secret in tickets.iter().map(String::as_str).chain([TOKEN_SECRET]) {
            assert!(!text.contains(secret), "{} holds a console secret", entry.path().display());
        }
    }
    // A stopped VM has no serial console (stopped hard: PVE's `status/stop`).
    let r = s.rest.post(&format!("{VMS}/{vm}:stop"), &t, &json!({"force": true})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(finished(&s.rest, &t, &r.str("job_id")).await["status"], "SUCCEEDED");
    let r = s.rest.post(&format!("{VMS}/{vm}:console"), &t, &json!({"type": "serial"})).await.unwrap();
    assert_eq!((r.status, r.str("code").as_str()), (409, "CONFLICT"), "{}", r.body);
    operate(&s, &t, &vm, "delete", "DELETED").await;
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    assert_eq!(vms.as_array().unwrap().len(), 1, "only the template is left: {vms}");

    // A clone task that ends in error fails the tenant's job, and leaves no
    // VM behind. The tenant is told the code, never Proxmox's own text
    // (storage and node names); the operator's job view has it.
    let msg = "storage 'local-lvm' does not have enough free space";
    let f = sim.post("/_sim/faults", "", &json!({"task_exits": {"qmclone": msg}})).await.unwrap();
    assert_eq!(f.status, 204, "{}", f.body);
    let r = s
        .rest
        .post(VMS, &t, &json!({"name": "doomed", "flavor": "small", "image": "debian-12", "zone": "pve"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = finished(&s.rest, &t, &r.str("job_id")).await;
    assert_eq!(job["status"], "FAILED", "{job}");
    assert_eq!(job["error"]["code"], "PROVIDER_ERROR", "{job}");
    let told = job["error"]["message"].as_str().unwrap_or_default();
    assert!(!told.contains("local-lvm") && !told.contains("pve"), "internals leaked to the tenant: {job}");
    let ops_job =
        s.rest.get(&format!("/api/hcp/ops/v1/jobs/{}", r.str("job_id")), &s.ops_token()).await.unwrap();
    assert_eq!(ops_job.status, 200, "{}", ops_job.body);
    assert!(ops_job.str("error_message").contains(msg), "{}", ops_job.body);
    assert_eq!(ops_job.str("tenant_id"), "acme");
    let denied = s.rest.get(&format!("/api/hcp/ops/v1/jobs/{}", r.str("job_id")), &t).await.unwrap();
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(job["attempts"], 1, "a task error is not retried: {job}");
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    assert_eq!(vms.as_array().unwrap().len(), 1, "only the template is left: {vms}");

    // Every request the provider sent is valid against the PVE schema.
    let requests = sim.get("/_sim/requests", "").await.unwrap().body;
    let requests = requests.as_array().unwrap();
    let bad: Vec<&Value> = requests.iter().filter(|r| r["violations"] != json!({})).collect();
    assert!(bad.is_empty(), "schema violations: {bad:#?}");
    for path in [
        "/clone",
        "/status/stop",
        "/status/start",
        "/status/reboot",
        "/vncproxy",
        "/termproxy",
        "/vncwebsocket",
    ] {
        assert!(requests.iter().any(|r| r["path"].as_str().unwrap().ends_with(path)), "no {path} request");
    }
    println!("{} requests validated against the PVE 9.1.3 schema, 0 violations", requests.len());
}

#[tokio::test]
async fn a_provider_killed_mid_create_is_retried_without_a_second_vm() {
    if !hcp_proxmox_sim::schema::present_or_skip(
        "a_provider_killed_mid_create_is_retried_without_a_second_vm",
    ) {
        return;
    }
    // Clone tasks take a second and a half: long enough to kill the
    // provider while it waits on one.
    // Retries back off long enough to outlast the provider's restart.
    let retries = "max_attempts = 10\nbackoff_base_ms = 250\nbackoff_max_ms = 2000\n";
    let Pve { mut s, control, provider, config, provider_exe, .. } = pve_stack(1500, retries).await;
    let sim = Rest::new(format!("http://{control}"));
    let t = s.tenant_token("acme", &["demo"]);
    let body = json!({"name": "web-2", "flavor": "small", "image": "debian-12", "zone": "pve"});
    let r = s.rest.post(VMS, &t, &body).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let vm = r.str("vm_id");
    wait_until(WAIT, "the clone to start", || async {
        let guests = sim.get("/_sim/vms", "").await?.body;
        Ok(guests.as_array().into_iter().flatten().any(|v| v["template"] == false).then_some(()))
    })
    .await
    .unwrap();
    s.kill("provider-proxmox").await;
    s.start_program(
        "provider-proxmox",
        &provider_exe,
        &["--config".into(), config.display().to_string(), "--listen".into(), provider.clone()],
        &[],
    )
    .await
    .unwrap();
    let job = finished(&s.rest, &t, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    let mine: Vec<&Value> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["config"]["tags"].as_str().is_some_and(|t| t.contains(&vm)))
        .collect();
    assert_eq!(mine.len(), 1, "exactly one VM for the create: {vms}");
    assert_eq!(mine[0]["status"], "running");
    let guests = vms.as_array().unwrap().iter().filter(|v| v["template"] == false).count();
    assert_eq!(guests, 1, "no half-made clone left: {vms}");
}

#[tokio::test]
async fn quorum_loss_is_retried_and_a_revoked_token_makes_the_provider_unhealthy() {
    if !hcp_proxmox_sim::schema::present_or_skip(
        "quorum_loss_is_retried_and_a_revoked_token_makes_the_provider_unhealthy",
    ) {
        return;
    }
    let Pve { s, control, .. } = pve_stack(20, "").await;
    let sim = Rest::new(format!("http://{control}"));
    let t = s.tenant_token("acme", &["demo"]);

    // The cluster loses quorum for three writes: the create is retried by
    // core with backoff and succeeds once quorum is back, with one VM.
    let f = sim.post("/_sim/faults", "", &json!({"quorum_loss": 3})).await.unwrap();
    assert_eq!(f.status, 204, "{}", f.body);
    let r = s
        .rest
        .post(VMS, &t, &json!({"name": "q", "flavor": "small", "image": "debian-12", "zone": "pve"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let job = finished(&s.rest, &t, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert!(job["attempts"].as_u64().unwrap() >= 2, "the quorum loss was retried: {job}");
    let vms = sim.get("/_sim/vms", "").await.unwrap().body;
    assert_eq!(vms.as_array().unwrap().iter().filter(|v| v["template"] == false).count(), 1, "{vms}");

    // The token is revoked on the cluster: core sees the provider unhealthy
    // at the next probe and places nothing there.
    let f = sim.post("/_sim/faults", "", &json!({"revoke_tokens": true})).await.unwrap();
    assert_eq!(f.status, 204, "{}", f.body);
    let ops = s.ops_token();
    wait_until(WAIT, "the provider to be unhealthy", || async {
        let r = s.rest.get("/api/hcp/ops/v1/providers", &ops).await?;
        let unhealthy = r.body["providers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "pve-1" && p["health"] == "UNHEALTHY");
        Ok(unhealthy.then_some(()))
    })
    .await
    .unwrap();
    let r = s
        .rest
        .post(VMS, &t, &json!({"name": "r", "flavor": "small", "image": "debian-12", "zone": "pve"}))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "no healthy provider in the zone: {}", r.body);
}

#[tokio::test]
async fn a_running_vm_moves_between_proxmox_nodes_and_keeps_running() {
    if !hcp_proxmox_sim::schema::present_or_skip("a_running_vm_moves_between_proxmox_nodes_and_keeps_running")
    {
        return;
    }
    // Two nodes and a storage both reach: PVE migrates running VMs there.
    let Pve { s, control, .. } =
        pve_stack_with(20, "", &["--nodes", "pve1,pve2", "--shared-storage", "ceph"], "storage = \"ceph\"\n")
            .await;
    let ops = s.ops_token();
    let providers = s.rest.get("/api/hcp/ops/v1/providers", &ops).await.unwrap().body;
    let provider =
        providers["providers"].as_array().unwrap().iter().find(|p| p["zone"] == "pve").unwrap().clone();
    let caps = &provider["capabilities"];
    assert_eq!(
        (caps["supports_live_migration"].as_bool(), caps["supports_cold_migration"].as_bool()),
        (Some(true), Some(true)),
        "{provider}"
    );
    let id = provider["provider_id"].as_str().unwrap();
    let hosts = s.rest.get(&format!("/api/hcp/ops/v1/providers/{id}/hosts"), &ops).await.unwrap().body;
    let names: Vec<&str> =
        hosts["hosts"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pve1", "pve2"], "{hosts}");
    assert!(
        hosts["hosts"].as_array().unwrap().iter().all(|h| h["state"] == "UP" && h["vcpus"] == 8),
        "{hosts}"
    );

    let t = s.tenant_token("acme", &["demo"]);
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let body = json!({"name": name, "flavor": "small", "image": "debian-12", "zone": "pve"});
        let r = s.rest.post(VMS, &t, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(finished(&s.rest, &t, &r.str("job_id")).await["status"], "SUCCEEDED");
        vms.push(r.str("vm_id"));
    }
    let host = |vm: String| {
        let s = &s;
        let ops = &ops;
        async move { s.rest.get(&format!("/api/hcp/ops/v1/vms/{vm}"), ops).await.unwrap().str("host") }
    };
    // Spread: one per node (the second was cloned on pve1 and moved to
    // pve2 before its first start).
    assert_eq!(
        (host(vms[0].clone()).await, host(vms[1].clone()).await),
        ("pve1".to_owned(), "pve2".to_owned())
    );

    let vm = &vms[0];
    let console = s.console(&format!("{VMS}/{vm}"), &t, &json!({})).await.unwrap();
    let r = s.rest.post(&format!("/api/hcp/ops/v1/vms/{vm}:migrate"), &ops, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(s.rest.get(&format!("{VMS}/{vm}"), &t).await.unwrap().str("status"), "ACTIVE");
    let job = finished(&s.rest, &t, &r.str("job_id")).await;
    assert_eq!(job["status"], "SUCCEEDED", "{job}");
    assert_eq!(host(vm.clone()).await, "pve2");
    assert_eq!(s.rest.get(&format!("{VMS}/{vm}"), &t).await.unwrap().str("status"), "ACTIVE");
    let sim = Rest::new(format!("http://{control}"));
    let guests = sim.get("/_sim/vms", "").await.unwrap().body;
    let guest = guests
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["config"]["tags"].as_str().is_some_and(|t| t.contains(vm.as_str())))
        .unwrap()
        .clone();
    assert_eq!(
        (guest["node"].as_str(), guest["status"].as_str()),
        (Some("pve2"), Some("running")),
        "{guest}"
    );
    assert_eq!(guest["migrations"], 1, "{guest}");
    // The console token issued before the move is revoked.
    let proxy = s.token(None, &[], &["console.proxy"], 300);
    let mut broker = hcp_proto::console::console_broker_service_client::ConsoleBrokerServiceClient::new(
        s.core_channel().await.unwrap(),
    );
    let mut req = tonic::Request::new(hcp_proto::console::RedeemConsoleRequest {
        token: console["token"].as_str().unwrap().to_owned(),
        protocol: "vnc".into(),
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {proxy}").parse().unwrap());
    let err = broker.redeem_console(req).await.unwrap_err();
    assert!(err.message().contains("revoked"), "{err:?}");

    // Every request to "Proxmox" was valid against the schema, and the
    // moves were `migrate` calls: one offline (placement), one online.
    let requests = sim.get("/_sim/requests", "").await.unwrap().body;
    let requests = requests.as_array().unwrap();
    let bad: Vec<&Value> = requests.iter().filter(|r| r["violations"] != json!({})).collect();
    assert!(bad.is_empty(), "schema violations: {bad:#?}");
    let moves = requests.iter().filter(|r| r["path"].as_str().unwrap().ends_with("/migrate")).count();
    assert_eq!(moves, 2, "one move at create, one live");
}

/// An image imported through HCP from a URL lands on the PVE simulator as
/// a template (uploaded with content `import`, then made a template), a VM
/// is cloned from it, and deleting the image removes the template; every
/// request valid against the schema.
#[tokio::test]
async fn an_image_imported_through_hcp_makes_a_vm_on_proxmox() {
    if !hcp_proxmox_sim::schema::present_or_skip("an_image_imported_through_hcp_makes_a_vm_on_proxmox") {
        return;
    }
    let Pve { s, control, .. } = pve_stack_with(20, "", &[], "image_storage = \"local\"\n").await;
    let qcow2 = hcp_testkit::flows::small_qcow2().unwrap();
    let files = hcp_testkit::files::FileServer::start(vec![(
        "/small.qcow2",
        hcp_testkit::files::Serve::File(qcow2.clone()),
    )])
    .await
    .unwrap();
    let t = s.tenant_token("acme", &["demo"]);
    let url = files.url("/small.qcow2");
    let backing = hcp_testkit::flows::image_imported_and_used(
        &s.rest,
        &s.ops_token(),
        &t,
        ("small", &url, &qcow2, "qcow2"),
        "pve-1",
        "pve",
        &json!({"networks": [{"network": "default"}]}),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(backing.starts_with("hcp-image-"), "{backing}");
    let sim = Rest::new(format!("http://{control}"));
    let requests = sim.get("/_sim/requests", "").await.unwrap().body;
    let requests = requests.as_array().cloned().unwrap_or_default();
    assert!(
        requests.iter().any(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/storage/local/upload"))),
        "the image was uploaded to the storage: {requests:#?}"
    );
    let bad: Vec<&Value> = requests.iter().filter(|r| r["violations"] != json!({})).collect();
    assert!(bad.is_empty(), "schema violations: {bad:#?}");
}

/// Issue 28's flow through HCP on the PVE simulator: a volume outlives its
/// VM and goes to the next; a kept boot volume boots the next VM; every
/// request valid against the schema.
#[tokio::test]
async fn a_volume_outlives_its_vm_on_proxmox() {
    if !hcp_proxmox_sim::schema::present_or_skip("a_volume_outlives_its_vm_on_proxmox") {
        return;
    }
    let Pve { s, control, .. } = pve_stack(20, "").await;
    let t = s.tenant_token("acme", &["demo"]);
    let vm = json!({"networks": [{"network": "default"}]});
    hcp_testkit::flows::volume_outlives_its_vm(
        &s.rest,
        &s.ops_token(),
        &t,
        "pve",
        &vm,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    // Every request the provider sent is valid against the PVE schema.
    let sim = Rest::new(format!("http://{control}"));
    let requests = sim.get("/_sim/requests", "").await.unwrap().body;
    let bad: Vec<&Value> =
        requests.as_array().into_iter().flatten().filter(|r| r["violations"] != json!({})).collect();
    assert!(bad.is_empty(), "schema violations: {bad:#?}");
}
