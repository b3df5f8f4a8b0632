//! System tests of the vSphere provider: core, gateway, the
//! `hcp-provider-vsphere` process and vcsim (VMware's vCenter simulator,
//! built by `scripts/vcsim.sh`) run side by side; a tenant drives VMs
//! through REST, and the provider is killed at every step of a create.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_provider_sdk::Provider as _;
use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::vcsim::{Vcsim, VcsimOptions, present_or_skip};
use hcp_testkit::workspace_bin;
use serde_json::{Value, json};

const HCP: &str = env!("CARGO_BIN_EXE_hcp");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const WAIT: Duration = Duration::from_secs(90);

/// Core, gateway, vcsim and the vSphere provider, registered in zone `vc`
/// with the credentials vcsim expects.
struct Vc {
    s: TestStack,
    sim: Vcsim,
    ops: String,
    tenant: String,
    config: PathBuf,
    exe: PathBuf,
    port: u16,
}

impl Vc {
    async fn start(jobs_toml: &str) -> Option<Self> {
        if !present_or_skip("vsphere system test") {
            return None;
        }
        let login =
            VcsimOptions { login: Some(("hcp@vsphere.local".into(), "s3cret".into())), ..Default::default() };
        let sim = Vcsim::start(login).await.expect("vcsim starts");
        let opts = StackOptions {
            jobs_toml: jobs_toml.to_owned(),
            // Image imports from the test's file server on loopback.
            core_toml: hcp_testkit::flows::LOOPBACK_EGRESS.to_owned(),
            ..Default::default()
        };
        let mut s = TestStack::start(Path::new(HCP), opts).await.expect("stack starts");
        let exe = workspace_bin(Path::new(HCP), "hcp-provider-vsphere").unwrap();
        let config = s.dir().join("vsphere.toml");
        // No [auth]: the credentials come from HCP at registration. The
        // stack's image source maps onto vcsim's VM as template.
        std::fs::write(
            &config,
            sim.provider_toml("[timing]\nretry_base_ms = 20\n")
                .replace("[templates]\n", "[templates]\n\"debian-12-genericcloud\" = \"DC0_C0_RP0_VM0\"\n"),
        )
        .unwrap();
        let addr = s.start_program("vsphere", &exe, &args(&config, "127.0.0.1:0"), &[]).await.unwrap();
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let ops = s.ops_token();
        let tenant = s.tenant_token("acme", &["demo"]);
        let creds = json!({"username": "hcp@vsphere.local", "password": "s3cret"});
        // The zone's network, mapped onto a port group.
        s.register_provider("vc", "vc-1", &format!("http://{addr}"), creds, "VM Network").await.unwrap();
        Some(Self { s, sim, ops, tenant, config, exe, port })
    }

    async fn create(&self, name: &str) -> (String, String) {
        let body = json!({"name": name, "flavor": "small", "image": "debian-12", "zone": "vc",
                          "networks": [{"network": "default"}]});
        let r = self.s.rest.post(VMS, &self.tenant, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        (r.str("vm_id"), r.str("job_id"))
    }

    async fn succeed(&self, job: &str) {
        let j: Value = self.s.rest.finished_job(&self.tenant, job, WAIT).await.unwrap();
        assert_eq!(j["status"], "SUCCEEDED", "{j}\nprovider log:\n{}", self.s.log("vsphere"));
    }

    async fn operate(&self, vm: &str, action: &str, body: Value, expect: &str) -> Value {
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
        r.body
    }

    /// A provider of the test's own on the same vCenter, to look at it
    /// without the process under test.
    async fn own_provider(&self) -> hcp_provider_vsphere::Vsphere {
        let p = hcp_provider_vsphere::Vsphere::new(
            hcp_provider_vsphere::config::Config::from_toml(&std::fs::read_to_string(&self.config).unwrap())
                .unwrap(),
        )
        .await
        .unwrap();
        p.configure(
            [("username".into(), "hcp@vsphere.local".into()), ("password".into(), "s3cret".into())].into(),
        )
        .await
        .unwrap();
        p
    }

    /// HCP's VMs on vCenter, by name.
    async fn on_vcenter(&self) -> Vec<String> {
        let p = self.own_provider().await;
        let mut ids: Vec<String> = p
            .list_vms(Default::default())
            .await
            .unwrap()
            .vms
            .into_iter()
            .map(|v| format!("hcp-{}", v.vm_id))
            .collect();
        ids.sort();
        ids
    }

    /// Restarts the provider on its port, with `failpoints`.
    async fn restart_provider(&mut self, failpoints: Option<&str>) {
        self.s.kill("vsphere").await;
        let mut env: Vec<(&str, String)> = failpoints
            .map(|f| vec![(hcp_provider_vsphere::FAILPOINTS_ENV, f.to_owned())])
            .unwrap_or_default();
        env.push(("RUST_LOG", "info,hcp_provider_vsphere=debug".to_owned()));
        let listen = format!("127.0.0.1:{}", self.port);
        self.s.start_program("vsphere", &self.exe, &args(&self.config, &listen), &env).await.unwrap();
        let since = chrono::Utc::now();
        self.s.rest.provider_healthy_since(&self.ops, "vc-1", since, Duration::from_secs(30)).await.unwrap();
    }
}

fn args(config: &Path, listen: &str) -> Vec<String> {
    vec!["--config".into(), config.display().to_string(), "--listen".into(), listen.into()]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_lives_and_dies_on_vsphere() {
    let Some(vc) = Vc::start("").await else { return };
    let (vm, job) = vc.create("web-1").await;
    vc.succeed(&job).await;
    let read = vc.s.rest.get(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap().body;
    assert_eq!(read["status"], "ACTIVE", "{read}");
    let mac = read["networks"][0]["mac"].as_str().unwrap_or_default();
    assert_eq!(mac.len(), 17, "the NIC vCenter made shows in the VM read: {read}");
    assert!(!read.to_string().contains("vm-"), "no moref reaches the tenant: {read}");
    assert_eq!(vc.on_vcenter().await, [format!("hcp-{vm}")]);

    vc.operate(&vm, "stop", json!({}), "STOPPED").await;
    vc.operate(&vm, "start", json!({}), "ACTIVE").await;
    vc.operate(&vm, "reboot", json!({}), "ACTIVE").await;
    vc.operate(&vm, "reboot", json!({"type": "HARD"}), "ACTIVE").await;
    // Hot-add is on: a running VM grows.
    vc.operate(&vm, "resize", json!({"flavor": "medium"}), "ACTIVE").await;
    let read = vc.s.rest.get(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap().body;
    assert_eq!(read["flavor"], "medium", "{read}");

    // A snapshot of the running VM; stopped, then reverted: running again.
    let snaps = format!("{VMS}/{vm}/snapshots");
    let r = vc.s.rest.post(&snaps, &vc.tenant, &json!({"name": "booted"})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let snap = r.str("snapshot_id");
    vc.succeed(&r.str("job_id")).await;
    vc.operate(&vm, "stop", json!({}), "STOPPED").await;
    let r = vc.s.rest.post(&format!("{snaps}/{snap}:revert"), &vc.tenant, &json!({})).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    vc.succeed(&r.str("job_id")).await;
    let read = vc.s.rest.get(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap();
    assert_eq!(read.str("status"), "ACTIVE", "{}", read.body);

    // The console: the tenant gets HCP's URL, never vCenter's ticket. The
    // gateway redeems the token, asks the provider (AcquireTicket webmks),
    // opens wss://vcenter/ticket/<ticket> trusting vCenter's certificate
    // by its pinned fingerprint, and relays the RFB of the test bed's
    // WebMKS stand-in, whose ServerInit names the VM.
    let c = vc.s.console(&format!("{VMS}/{vm}"), &vc.tenant, &json!({})).await.unwrap();
    assert_eq!(c["type"], "vnc");
    assert!(
        !c.to_string().contains(&format!(":{}", vc.sim.port)) && !c.to_string().contains("/ticket/"),
        "{c}"
    );
    let url = c["url"].as_str().unwrap();
    let mut console = hcp_testkit::console::open(url, None).await.unwrap();
    let init = console.handshake().await.unwrap().expect("the proxy relays the VM's screen");
    assert_eq!(init.name, format!("vcsim hcp-{vm}"));
    assert_eq!((init.width, init.height), (64, 48));
    assert!(console.close().await.unwrap().rfb);
    // Once is once.
    let again = hcp_testkit::console::session(url, None).await.unwrap();
    assert_eq!((again.code, again.reason.as_str(), again.rfb), (4403, "console token already used", false));

    vc.operate(&vm, "delete", json!({}), "DELETED").await;
    assert!(vc.on_vcenter().await.is_empty());
}

/// The provider process dies at each step of a create; core retries the
/// job against the restarted provider; every VM ends ACTIVE on exactly one
/// vCenter VM, and nothing else is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_create_step_leaves_exactly_one_vm() {
    let Some(mut vc) = Vc::start("max_attempts = 100\nbackoff_max_ms = 500\n").await else { return };
    let mut vms = Vec::new();
    // Core creates, then starts: the power-on is its own step.
    for step in [
        "create:after-clone-submit",
        "create:after-clone",
        "create:after-reconfigure",
        "start:after-power-on",
    ] {
        vc.restart_provider(Some(step)).await;
        let (vm, job) = vc.create(&format!("crash-{}", step.replace(':', "-"))).await;
        let exit = vc.s.wait_exit("vsphere", WAIT).await.unwrap();
        assert!(!exit.success(), "the provider should have died {step}: {exit}");
        vc.restart_provider(None).await;
        vc.succeed(&job).await;
        let read = vc.s.rest.get(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap();
        assert_eq!(read.str("status"), "ACTIVE", "{step}: {}", read.body);
        vms.push(vm);
        let mut want: Vec<String> = vms.iter().map(|v| format!("hcp-{v}")).collect();
        want.sort();
        assert_eq!(vc.on_vcenter().await, want, "after a crash {step}: one VM per HCP VM, nothing else");
    }
    for vm in &vms {
        let r = vc.s.rest.delete(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap();
        vc.succeed(&r.str("job_id")).await;
    }
    assert!(vc.on_vcenter().await.is_empty());
}

/// The cluster's hosts reach core's ops view; a VM moves between them with
/// RelocateVM_Task (live when the flags allow it, else stopped), its host
/// changes in the ops view and on vCenter, and it keeps its state.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_moves_between_vcenter_hosts() {
    let Some(vc) = Vc::start("").await else { return };
    let providers = vc.s.rest.get("/api/hcp/ops/v1/providers", &vc.ops).await.unwrap().body;
    let provider =
        providers["providers"].as_array().unwrap().iter().find(|p| p["name"] == "vc-1").unwrap().clone();
    let id = provider["provider_id"].as_str().unwrap();
    let hosts = vc.s.rest.get(&format!("/api/hcp/ops/v1/providers/{id}/hosts"), &vc.ops).await.unwrap().body;
    let names: Vec<String> =
        hosts["hosts"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2"], "{hosts}");
    assert!(
        hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["state"] == "UP" && h["vcpus"].as_u64() > Some(0))
    );
    assert_eq!(provider["capabilities"]["supports_cold_migration"], true, "{provider}");
    let live = provider["capabilities"]["supports_live_migration"] == true;
    println!("vcsim: live migration {live}");

    let (vm, job) = vc.create("mover").await;
    vc.succeed(&job).await;
    let host = |vm: String| {
        let vc = &vc;
        async move { vc.s.rest.get(&format!("/api/hcp/ops/v1/vms/{vm}"), &vc.ops).await.unwrap().str("host") }
    };
    let before = host(vm.clone()).await;
    assert!(names.contains(&before), "placed on a cluster host: {before}");
    let expect = if live {
        "ACTIVE"
    } else {
        vc.operate(&vm, "stop", json!({}), "STOPPED").await;
        "STOPPED"
    };
    let target = names.iter().find(|n| **n != before).unwrap().clone();
    let r =
        vc.s.rest
            .post(&format!("/api/hcp/ops/v1/vms/{vm}:migrate"), &vc.ops, &json!({"target_host": target}))
            .await
            .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    vc.succeed(&r.str("job_id")).await;
    assert_eq!(host(vm.clone()).await, target);
    let read = vc.s.rest.get(&format!("{VMS}/{vm}"), &vc.tenant).await.unwrap();
    assert_eq!(read.str("status"), expect, "{}", read.body);
    // vCenter itself has it on the target host.
    let p = vc.own_provider().await;
    p.list_hosts().await.unwrap();
    assert_eq!(p.get_vm(&vm).await.unwrap().host, target);
    vc.operate(&vm, "delete", json!({}), "DELETED").await;
}

/// An image imported through HCP from a URL is converted by core to a
/// streamOptimized VMDK, imported into vcsim as an OVF (ImportVApp with an
/// NFC lease) and made a template; a VM is cloned from it, and deleting the
/// image destroys the template.
#[tokio::test]
async fn an_image_imported_through_hcp_makes_a_vm_on_vsphere() {
    let Some(vc) = Vc::start("").await else { return };
    let qcow2 = hcp_testkit::flows::small_qcow2().unwrap();
    let files = hcp_testkit::files::FileServer::start(vec![(
        "/small.qcow2",
        hcp_testkit::files::Serve::File(qcow2.clone()),
    )])
    .await
    .unwrap();
    let url = files.url("/small.qcow2");
    let backing = hcp_testkit::flows::image_imported_and_used(
        &vc.s.rest,
        &vc.ops,
        &vc.tenant,
        ("small", &url, &qcow2, "qcow2"),
        "vc-1",
        "vc",
        &json!({"networks": [{"network": "default"}]}),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(backing.contains("hcp-image-"), "{backing}");
}

/// Issue 28's flow through HCP on vcsim: a volume outlives its VM and goes
/// to the next; a kept boot volume boots the next VM.
#[tokio::test]
async fn a_volume_outlives_its_vm_on_vsphere() {
    let Some(vc) = Vc::start("").await else { return };
    hcp_testkit::flows::volume_outlives_its_vm(
        &vc.s.rest,
        &vc.ops,
        &vc.tenant,
        "vc",
        &json!({"networks": [{"network": "default"}]}),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}
