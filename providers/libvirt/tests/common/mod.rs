//! What the libvirt provider's tests share: the test bed built by
//! `scripts/testbed.sh` (tiny guest image, running libvirtd), a state
//! directory per test, and the provider started in-process or as a process.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_testkit::stack::{StackOptions, TestStack};
use hcp_testkit::wait_until;
use serde_json::{Value, json};

/// The tiny guest and a per-test state directory.
pub struct Testbed {
    /// Where the guest image is.
    pub guest: PathBuf,
    /// This test's state directory (removed on drop when empty).
    pub state_dir: PathBuf,
    /// This test's volume pool (`hcp-test-<8 hex>`), undefined on drop.
    pub pool: String,
    /// Its directory, outside the state directory (whose emptiness after a
    /// test is checked), removed on drop.
    pub pool_dir: PathBuf,
}

impl Testbed {
    /// Finds the guest built by `scripts/testbed.sh`; panics with the fix
    /// when it is missing.
    pub fn new() -> Self {
        let root =
            PathBuf::from(std::env::var("HCP_TESTBED_DIR").unwrap_or_else(|_| "/var/tmp/hcp-testbed".into()));
        let guest = root.join("guest");
        assert!(
            guest.join("vmlinux").is_file() && guest.join("base.qcow2").is_file(),
            "the tiny guest is missing from {}: run `bash scripts/testbed.sh` (installs libvirt and QEMU, \
             starts libvirtd, builds the guest)",
            guest.display()
        );
        // World-traversable: QEMU runs as libvirt-qemu.
        let test_id = uuid::Uuid::new_v4().to_string();
        let state_dir = root.join("state").join(&test_id);
        let pool = format!("hcp-test-{}", &test_id[..8]);
        let pool_dir = root.join("pools").join(&test_id);
        std::fs::create_dir_all(root.join("pools")).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        for dir in [&root, &root.join("state"), &state_dir, &root.join("pools")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { guest, state_dir, pool, pool_dir }
    }

    /// The provider's TOML for `uri`.
    pub fn config_toml(&self, uri: &str) -> String {
        format!(
            "uri = \"{uri}\"\naccelerator = \"tcg\"\nstate_dir = \"{state}\"\nstop_timeout_seconds = 30\n\
             volume_pool = \"{pool}\"\nvolume_pool_dir = \"{pool_dir}\"\n\n\
             [images.tiny]\ndisk = \"{g}/base.qcow2\"\nkernel = \"{g}/vmlinux\"\ninitrd = \"{g}/initrd.gz\"\n\
             cmdline = \"console=tty0 console=ttyS0 panic=-1 quiet\"\n\n\
             [networks.default]\nuser = true\n\n[networks.nat]\nnetwork = \"default\"\n",
            state = self.state_dir.display(),
            pool = self.pool,
            pool_dir = self.pool_dir.display(),
            g = self.guest.display(),
        )
    }

    /// What the VM's guest wrote on its serial port, every boot of it
    /// (the log is appended to).
    pub fn serial(&self, vm: &str) -> String {
        let raw = std::fs::read(self.state_dir.join(vm).join("serial.log")).unwrap_or_default();
        String::from_utf8_lossy(&raw).into_owned()
    }

    /// Waits until the serial log holds `pattern` at least `n` times.
    pub async fn serial_shows(&self, vm: &str, pattern: &str, n: usize) {
        let what = format!("{pattern:?} x{n} on the serial port");
        let r = wait_until(SLOW, &what, || async {
            Ok((self.serial(vm).matches(pattern).count() >= n).then_some(()))
        })
        .await;
        assert!(r.is_ok(), "{what}; serial log:\n{}", self.serial(vm));
    }

    /// Starts the provider in this process.
    pub async fn start_in_process(&self, uri: &str) -> InProcess {
        let mut config = hcp_provider_libvirt::Config::parse(&self.config_toml(uri)).unwrap();
        config.listen = "127.0.0.1:0".parse().unwrap();
        let provider = hcp_provider_libvirt::Libvirt::connect(config).await.expect("libvirt answers");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let p = provider.clone();
        tokio::spawn(async move {
            let cfg = hcp_provider_sdk::ServeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            };
            hcp_provider_sdk::serve(p, cfg, std::future::pending(), move |addr| {
                let _ = tx.send(addr);
            })
            .await
        });
        InProcess { endpoint: format!("http://{}", rx.await.unwrap()), provider }
    }
}

impl Drop for Testbed {
    /// Every test cleans up what it made, also when it fails: each domain
    /// whose files live in this test's state directory is destroyed and
    /// undefined (a guest left running holds a core under TCG), then the
    /// directory goes with its overlays, seeds and logs. A failed test's
    /// assertions print the serial log they needed.
    fn drop(&mut self) {
        for domain in hcp_domains("qemu:///system", self) {
            virsh(&["destroy", &domain]);
            virsh(&["undefine", &domain, "--snapshots-metadata"]);
            if std::thread::panicking() {
                eprintln!("cleanup: removed domain {domain}, left by a failed test");
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        // The test's pool with whatever volumes a failed test left in it.
        if virsh(&["pool-info", &self.pool]).contains(&self.pool) {
            virsh(&["pool-destroy", &self.pool]);
            virsh(&["pool-undefine", &self.pool]);
        }
        let _ = std::fs::remove_dir_all(&self.pool_dir);
    }
}

/// A provider running in the test process.
pub struct InProcess {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// The provider itself, to inspect.
    pub provider: hcp_provider_libvirt::Libvirt,
}

/// Names of the HCP domains on `uri` whose files are in this test bed's
/// state directory (other tests run beside this one). The test driver's
/// state lives inside the provider's own connection, so there the kit's
/// ListVms checks after every delete are what counts.
pub fn hcp_domains(uri: &str, bed: &Testbed) -> Vec<String> {
    if uri.starts_with("test:") {
        return Vec::new();
    }
    let mine = bed.state_dir.display().to_string();
    virsh(&["list", "--all", "--name"])
        .lines()
        .filter(|l| l.starts_with("hcp-"))
        .filter(|d| virsh(&["dumpxml", d]).contains(&mine))
        .map(str::to_owned)
        .collect()
}

/// Runs virsh against qemu:///system; returns stdout.
pub fn virsh(args: &[&str]) -> String {
    let out =
        std::process::Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub const PROVIDER: &str = env!("CARGO_BIN_EXE_hcp-provider-libvirt");
pub const VMS: &str = "/api/hcp/tenant/v1/projects/demo/vms";
pub const SLOW: Duration = Duration::from_secs(120);

/// The `hcp` binary, built beside this crate's binary by a workspace build.
pub fn hcp_exe() -> PathBuf {
    let exe = Path::new(PROVIDER).with_file_name("hcp");
    assert!(
        exe.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        exe.display()
    );
    exe
}

pub struct Kvm {
    pub stack: TestStack,
    pub bed: Testbed,
    pub config: PathBuf,
    pub port: u16,
    pub ops: String,
    pub tenant: String,
}

impl Kvm {
    /// Core + gateway (and the stack's sim in zone-1), plus the libvirt
    /// provider registered in zone `kvm-1` with image `tiny`.
    pub async fn start(jobs_toml: &str) -> Self {
        Self::start_with(StackOptions { jobs_toml: jobs_toml.to_owned(), ..Default::default() }).await
    }

    /// The same with other stack options.
    pub async fn start_with(opts: StackOptions) -> Self {
        let mut stack = TestStack::start(&hcp_exe(), opts).await.unwrap();
        let bed = Testbed::new();
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
            // The zone's networks: "default" resolved by the provider under
            // its own name (user-mode networking), "lan" mapped onto the
            // provider's "nat" entry (libvirt's NAT network with DHCP).
            ("/api/hcp/ops/v1/networks", json!({"name": "default", "zone": "kvm-1"})),
            (
                "/api/hcp/ops/v1/networks",
                json!({"name": "lan", "zone": "kvm-1", "backings": {"kvm-1-libvirt": "nat"}}),
            ),
        ] {
            let r = stack.rest.post(path, &ops, &body).await.unwrap();
            assert_eq!(r.status, 201, "{path}: {}", r.body);
        }
        Self { stack, bed, config, port, ops, tenant }
    }

    /// Restarts the provider process on its port, with `failpoints`.
    pub async fn restart_provider(&mut self, failpoints: Option<&str>) {
        self.stack.kill("libvirt").await;
        let env: Vec<(&str, String)> = failpoints
            .map(|f| vec![(hcp_provider_libvirt::FAILPOINTS_ENV, f.to_owned())])
            .unwrap_or_default();
        let listen = format!("127.0.0.1:{}", self.port);
        self.stack
            .start_program("libvirt", Path::new(PROVIDER), &args(&self.config, &listen), &env)
            .await
            .unwrap();
        let since = chrono::Utc::now();
        self.stack
            .rest
            .provider_healthy_since(&self.ops, "kvm-1-libvirt", since, Duration::from_secs(30))
            .await
            .unwrap();
    }

    pub async fn create(&self, name: &str, extra: Value) -> (String, String) {
        let mut body = json!({"name": name, "flavor": "small", "image": "tiny", "zone": "kvm-1"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = self.stack.rest.post(VMS, &self.tenant, &body).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        (r.str("vm_id"), r.str("job_id"))
    }

    pub async fn job(&self, job: &str) -> Value {
        self.stack.rest.finished_job(&self.tenant, job, SLOW).await.unwrap()
    }

    pub async fn succeed(&self, job: &str) {
        let j = self.job(job).await;
        assert_eq!(j["status"], "SUCCEEDED", "{j}\nprovider log:\n{}", self.stack.log("libvirt"));
    }

    pub async fn op(&self, method: &str, path: &str, body: &str) -> Value {
        let r = self.stack.rest.raw(method, path, Some(&self.tenant), Some(body)).await.unwrap();
        assert_eq!(r.status, 202, "{method} {path}: {}", r.body);
        self.succeed(&r.str("job_id")).await;
        r.body
    }

    pub async fn status(&self, vm: &str) -> String {
        self.stack.rest.get(&format!("{VMS}/{vm}"), &self.tenant).await.unwrap().str("status")
    }

    pub fn serial(&self, vm: &str) -> String {
        self.bed.serial(vm)
    }

    /// Waits until the serial log holds `pattern` at least `n` times.
    pub async fn serial_shows(&self, vm: &str, pattern: &str, n: usize) {
        self.bed.serial_shows(vm, pattern, n).await;
    }
}

pub fn args(config: &Path, listen: &str) -> Vec<String> {
    vec!["--config".into(), config.display().to_string(), "--listen".into(), listen.into()]
}

/// Whether libvirt's "default" NAT network (DHCP by dnsmasq) is active;
/// says why not when it is not.
pub fn nat_network_active() -> bool {
    let info = virsh(&["net-info", "default"]);
    let active = info.lines().any(|l| l.starts_with("Active:") && l.ends_with("yes"));
    if !active {
        println!("SKIP the DHCP address check: libvirt's default NAT network is not active here ({info:?})");
    }
    active
}

pub fn domstate(vm: &str) -> String {
    virsh(&["domstate", vm]).trim().to_owned()
}

/// Asks the provider directly (as core does) for the `protocol` console's
/// endpoint.
pub async fn provider_console(kvm: &Kvm, vm: &str, protocol: &str) -> hcp_proto::provider::ConsoleEndpoint {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", kvm.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut compute = hcp_proto::provider::compute_client::ComputeClient::new(channel);
    compute
        .get_console(hcp_proto::provider::GetConsoleRequest {
            vm_id: vm.to_owned(),
            protocol: protocol.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the VM has a `vm.console` audit event whose outcome starts
/// with `prefix` (session ends are recorded after the socket closes).
pub async fn wait_until_audit(kvm: &Kvm, vm: &str, prefix: &str) {
    wait_until(Duration::from_secs(30), &format!("a console audit event {prefix:?}"), || async {
        let r =
            kvm.stack.rest.get(&format!("/api/hcp/ops/v1/audit-events?resource_id={vm}"), &kvm.ops).await?;
        let found = r.body["events"].as_array().into_iter().flatten().any(|e| {
            e["action"] == "vm.console" && e["outcome"].as_str().is_some_and(|o| o.starts_with(prefix))
        });
        Ok(found.then_some(()))
    })
    .await
    .unwrap();
}

/// Runs at every boot, in the background: once a second, every virtio disk
/// with a serial whose serial or size changed is reported; `vol-writer`
/// writes `HCP-DATA-<serial>` at the start of each data disk without one.
pub const USER_DATA: &str = r#"#!/bin/sh
(
while :; do
  for b in /sys/block/vd*; do
    d=${b##*/}
    s=$(cat $b/serial 2>/dev/null); n=$(cat $b/size 2>/dev/null)
    [ -n "$s" ] || continue
    [ "$s $n" = "$(cat /tmp/seen-$d 2>/dev/null)" ] && continue
    echo "$s $n" > /tmp/seen-$d
    data=$(dd if=/dev/$d bs=64 count=1 2>/dev/null | tr -cd 'A-Za-z0-9=-')
    echo "HCP-VOL: dev=$d serial=$s sectors=$n data=$data" > /dev/ttyS0
    case "$(hostname):$d:$data" in
      vol-writer:vda:*|vol-writer:*:HCP-DATA*) ;;
      vol-writer:*) printf 'HCP-DATA-%s' "$s" | dd of=/dev/$d bs=512 conv=sync,fsync 2>/dev/null &&
        echo "HCP-VOL: wrote serial=$s dev=$d" > /dev/ttyS0 ;;
    esac
  done
  sleep 1
done
) </dev/null >/dev/null 2>&1 &
"#;

/// Sectors of 512 bytes in a GiB.
pub const GIB_SECTORS: u64 = (1 << 30) / 512;

/// The guest's report of the disk with `volume_id`'s serial at `gib` GiB,
/// with the data it read at its start (`HCP-DATA-…`, or empty).
pub fn report(volume_id: &str, gib: u64, data: &str) -> String {
    format!(
        "serial={} sectors={} data={data}",
        hcp_provider_libvirt::storage::disk_serial(volume_id),
        gib * GIB_SECTORS
    )
}
