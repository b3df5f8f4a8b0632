//! HCP with real virtual machines: core and gateway (as processes, through
//! the REST API a tenant uses) with the libvirt provider process on
//! `qemu:///system`, booting the tiny TCG guest of `scripts/testbed.sh`.
//! What the guest printed on its serial port is the proof that it booted,
//! read its cloud-init seed, powered off on ACPI and rebooted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const PROVIDER: &str = env!("CARGO_BIN_EXE_hcp-provider-libvirt");
const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
const SLOW: Duration = Duration::from_secs(120);

/// The `hcp` binary, built beside this crate's binary by a workspace build.
fn hcp_exe() -> PathBuf {
    let exe = Path::new(PROVIDER).with_file_name("hcp");
    assert!(
        exe.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        exe.display()
    );
    exe
}

struct Kvm {
    stack: TestStack,
    bed: common::Testbed,
    config: PathBuf,
    port: u16,
    ops: String,
    tenant: String,
}

impl Kvm {
    /// Core + gateway (and the stack's sim in zone-1), plus the libvirt
    /// provider registered in zone `kvm-1` with image `tiny`.
    async fn start(jobs_toml: &str) -> Self {
        let opts = StackOptions { jobs_toml: jobs_toml.to_owned(), ..Default::default() };
        let mut stack = TestStack::start(&hcp_exe(), opts).await.unwrap();
        let bed = common::Testbed::new();
        let config = stack.dir().join("libvirt.toml");
        std::fs::write(&config, bed.config_toml("qemu:///system")).unwrap();
        let addr = stack
            .start_program("libvirt", Path::new(PROVIDER), &args(&config, "127.0.0.1:0"), &[])
            .await
            .unwrap();
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let ops = stack.ops_token();
        let tenant = stack.tenant_token("acme", &["demo"]);
        for (path, body) in [
            ("/api/hcp/ops/v1/zones", json!({"name": "kvm-1", "description": "libvirt on this machine"})),
            (
                "/api/hcp/ops/v1/images",
                json!({"name": "tiny", "os_type": "linux", "source": "tiny", "min_disk_gib": 1}),
            ),
            (
                "/api/hcp/ops/v1/providers",
                json!({"name": "kvm-1-libvirt", "zone": "kvm-1", "endpoint": format!("http://{addr}")}),
            ),
        ] {
            let r = stack.rest.post(path, &ops, &body).await.unwrap();
            assert_eq!(r.status, 201, "{path}: {}", r.body);
        }
        Self { stack, bed, config, port, ops, tenant }
    }

    /// Restarts the provider process on its port, with `failpoints`.
    async fn restart_provider(&mut self, failpoints: Option<&str>) {
        self.stack.kill("libvirt").await;
        let env: Vec<(&str, String)> = failpoints
            .map(|f| vec![(hcp_provider_libvirt::FAILPOINTS_ENV, f.to_owned())])
            .unwrap_or_default();
        let listen = format!("127.0.0.1:{}", self.port);
        self.stack
            .start_program("libvirt", Path::new(PROVIDER), &args(&self.config, &listen), &env)
            .await
            .unwrap();
        wait_until(Duration::from_secs(30), "the provider to be healthy", || async {
            let r = self.stack.rest.get("/api/hcp/ops/v1/providers", &self.ops).await?;
            let healthy = r.body["providers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "kvm-1-libvirt" && p["health"] == "HEALTHY");
            Ok(healthy.then_some(()))
        })
        .await
        .unwrap();
    }

    async fn create(&self, name: &str, extra: Value) -> (String, String) {
        let mut body = json!({"name": name, "flavor": "small", "image": "tiny", "zone": "kvm-1"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = self.stack.rest.post(VMS, &self.tenant, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        (r.str("vm_id"), r.str("job_id"))
    }

    async fn job(&self, job: &str) -> Value {
        wait_until(SLOW, "job to finish", || async {
            let r = self.stack.rest.get(&format!("/api/hcp/tenant/v1/jobs/{job}"), &self.tenant).await?;
            let st = r.str("status");
            Ok((st == "SUCCEEDED" || st == "FAILED").then_some(r.body))
        })
        .await
        .unwrap()
    }

    async fn succeed(&self, job: &str) {
        let j = self.job(job).await;
        assert_eq!(j["status"], "SUCCEEDED", "{j}\nprovider log:\n{}", self.stack.log("libvirt"));
    }

    async fn op(&self, method: &str, path: &str, body: &str) -> Value {
        let r = self.stack.rest.raw(method, path, Some(&self.tenant), Some(body)).await.unwrap();
        assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
        self.succeed(&r.str("job_id")).await;
        r.body
    }

    async fn status(&self, vm: &str) -> String {
        self.stack.rest.get(&format!("{VMS}/{vm}"), &self.tenant).await.unwrap().str("status")
    }

    fn serial(&self, vm: &str) -> String {
        let raw = std::fs::read(self.bed.state_dir.join(vm).join("serial.log")).unwrap_or_default();
        String::from_utf8_lossy(&raw).into_owned()
    }

    /// Waits until the serial log holds `pattern` at least `n` times.
    async fn serial_shows(&self, vm: &str, pattern: &str, n: usize) {
        let what = format!("{pattern:?} x{n} on the serial port");
        let r = wait_until(SLOW, &what, || async {
            Ok((self.serial(vm).matches(pattern).count() >= n).then_some(()))
        })
        .await;
        assert!(r.is_ok(), "{what}; serial log:\n{}", self.serial(vm));
    }
}

fn args(config: &Path, listen: &str) -> Vec<String> {
    vec!["--config".into(), config.display().to_string(), "--listen".into(), listen.into()]
}

fn domstate(vm: &str) -> String {
    common::virsh(&["domstate", vm]).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_vm_through_rest() {
    let kvm = Kvm::start("").await;
    let user_data = "#!/bin/sh\necho USER-DATA-RAN > /dev/ttyS0\n";
    let (vm, job) = kvm.create("web-1", json!({"hostname": "kvm-guest-1", "user_data": user_data})).await;
    kvm.succeed(&job).await;
    assert_eq!(kvm.status(&vm).await, "ACTIVE");
    assert_eq!(domstate(&vm), "running");
    // It booted, took its hostname from the seed and ran the user data.
    kvm.serial_shows(&vm, "HCP-GUEST-READY hostname=kvm-guest-1", 1).await;
    kvm.serial_shows(&vm, "USER-DATA-RAN", 1).await;

    // Stop is graceful: the guest sees the power button and powers off.
    kvm.op("POST", &format!("{VMS}/{vm}:stop"), "{}").await;
    assert_eq!(kvm.status(&vm).await, "STOPPED");
    assert_eq!(domstate(&vm), "shut off");
    assert!(kvm.serial(&vm).contains("HCP-GUEST: power button, powering off"), "{}", kvm.serial(&vm));

    kvm.op("POST", &format!("{VMS}/{vm}:start"), "{}").await;
    assert_eq!(kvm.status(&vm).await, "ACTIVE");
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 2).await;
    kvm.op("POST", &format!("{VMS}/{vm}:reboot"), "{}").await;
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 3).await;
    assert_eq!(domstate(&vm), "running");

    // The tenant's console points at HCP, never at the hypervisor ...
    let r = kvm
        .stack
        .rest
        .post(&format!("{VMS}/{vm}:console"), &kvm.tenant, &json!({"type": "vnc"}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.str("type"), "vnc");
    let url = r.str("url");
    let endpoint = provider_console(&kvm, &vm).await;
    assert!(!url.contains(&endpoint.port.to_string()) && !url.contains(&endpoint.password), "{url}");
    // ... and the endpoint core holds answers the RFB handshake.
    let mut sock =
        tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port as u16)).await.unwrap();
    let mut banner = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut banner)).await.unwrap().unwrap();
    assert_eq!(&banner, b"RFB 003.008\n");
    assert_eq!(endpoint.password.len(), 8, "a generated VNC password");

    // Snapshot the running VM and go back to it.
    let snaps = format!("{VMS}/{vm}/snapshots");
    let snap =
        kvm.op("POST", &snaps, r#"{"name":"booted"}"#).await["snapshot_id"].as_str().unwrap().to_owned();
    assert!(common::virsh(&["snapshot-list", &vm, "--name"]).contains(&snap));
    kvm.op("POST", &format!("{snaps}/{snap}:revert"), "{}").await;
    assert_eq!(kvm.status(&vm).await, "ACTIVE");
    assert_eq!(domstate(&vm), "running", "a snapshot of a running VM reverts to running");

    // Delete leaves nothing behind: no domain, no overlay, no seed.
    let dir = kvm.bed.state_dir.join(&vm);
    assert!(dir.join("disk.qcow2").is_file() && dir.join("seed.iso").is_file());
    let r = kvm.stack.rest.delete(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
    assert_eq!(domstate(&vm), "", "the domain is gone");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(common::hcp_domains("qemu:///system", &kvm.bed).is_empty());
}

/// Asks the provider directly (as core does) for the console endpoint.
async fn provider_console(kvm: &Kvm, vm: &str) -> hcp_proto::provider::ConsoleEndpoint {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", kvm.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut compute = hcp_proto::provider::compute_client::ComputeClient::new(channel);
    compute
        .get_console(hcp_proto::provider::GetConsoleRequest { vm_id: vm.to_owned(), protocol: "vnc".into() })
        .await
        .unwrap()
        .into_inner()
}

/// The provider process dies at each step of a create; core retries the
/// job against the restarted provider; every VM ends ACTIVE on exactly one
/// domain, and no stray domain or directory is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_create_step_leaves_exactly_one_domain() {
    let mut kvm = Kvm::start("max_attempts = 100\nbackoff_max_ms = 500\n").await;
    let mut vms = Vec::new();
    for step in ["after-disk", "after-seed", "after-define", "after-start"] {
        kvm.restart_provider(Some(&format!("create:{step}"))).await;
        let (vm, job) = kvm.create(&format!("crash-{step}"), json!({})).await;
        let exit = kvm.stack.wait_exit("libvirt", SLOW).await.unwrap();
        assert!(!exit.success(), "the provider should have died {step}: {exit}");
        kvm.restart_provider(None).await;
        kvm.succeed(&job).await;
        assert_eq!(kvm.status(&vm).await, "ACTIVE", "{step}");
        assert_eq!(domstate(&vm), "running", "{step}");
        vms.push(vm);
        let mut domains = common::hcp_domains("qemu:///system", &kvm.bed);
        domains.sort();
        let mut want: Vec<String> = vms.iter().map(|v| format!("hcp-{v}")).collect();
        want.sort();
        assert_eq!(domains, want, "after a crash {step}: one domain per VM, nothing else");
        let mut dirs: Vec<String> = std::fs::read_dir(&kvm.bed.state_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        let mut want_dirs = vms.clone();
        want_dirs.sort();
        assert_eq!(dirs, want_dirs, "after a crash {step}: one directory per VM");
    }
    for vm in &vms {
        let r = kvm.stack.rest.delete(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap();
        kvm.succeed(&r.str("job_id")).await;
    }
    assert!(common::hcp_domains("qemu:///system", &kvm.bed).is_empty());
}
