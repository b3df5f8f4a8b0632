//! What the libvirt provider's tests share: the test bed built by
//! `scripts/testbed.sh` (tiny guest image, running libvirtd), a state
//! directory per test, and the provider started in-process or as a process.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// The tiny guest and a per-test state directory.
pub struct Testbed {
    /// Where the guest image is.
    pub guest: PathBuf,
    /// This test's state directory (removed on drop when empty).
    pub state_dir: PathBuf,
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
        let state_dir = root.join("state").join(uuid::Uuid::new_v4().to_string());
        std::fs::create_dir_all(&state_dir).unwrap();
        for dir in [&root, &root.join("state"), &state_dir] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { guest, state_dir }
    }

    /// The provider's TOML for `uri`.
    pub fn config_toml(&self, uri: &str) -> String {
        format!(
            "uri = \"{uri}\"\naccelerator = \"tcg\"\nstate_dir = \"{state}\"\nstop_timeout_seconds = 30\n\n\
             [images.tiny]\ndisk = \"{g}/base.qcow2\"\nkernel = \"{g}/vmlinux\"\ninitrd = \"{g}/initrd.gz\"\n\
             cmdline = \"console=tty0 console=ttyS0 panic=-1 quiet\"\n\n\
             [networks.default]\nuser = true\n",
            state = self.state_dir.display(),
            g = self.guest.display(),
        )
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
    fn drop(&mut self) {
        // Only an empty directory goes: what a failed test left is evidence.
        let _ = std::fs::remove_dir(&self.state_dir);
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
