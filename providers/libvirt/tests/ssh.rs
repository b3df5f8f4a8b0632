//! An SSH key pair through HCP on a real guest: a tenant imports the public
//! half of an ed25519 key made by `ssh-keygen` over REST, creates a libvirt
//! guest (TCG) with `key_names` on libvirt's NAT network, waits for the
//! address HCP reports for it, and logs in with `ssh` and the private half:
//! the command's output comes back. A second key, never imported, is
//! refused. The tiny guest's init installs the NoCloud meta-data's
//! `public-keys` into root's authorized_keys and runs Debian's dropbear
//! (`scripts/tiny-guest.sh`); nothing but the keys comes from HCP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Kvm, SLOW, VMS};
use hcp_testkit::stack::StackOptions;
use hcp_testkit::wait_until;
use serde_json::json;

/// Runs at every boot, before the SSH server starts: the guest takes a
/// DHCP lease on its NIC and configures it (`/etc/udhcpc.sh`).
const USER_DATA: &str = "#!/bin/sh\n\
    ip link set eth0 up\n\
    udhcpc -i eth0 -n -q -t 10 -T 2 -s /etc/udhcpc.sh >/dev/null 2>&1 || echo HCP-GUEST: no lease > /dev/ttyS0\n";

/// How long the guest's SSH server may take to answer once the guest has
/// an address (dropbear makes its host key at the first connection, under
/// TCG).
const SSH_READY: Duration = Duration::from_secs(180);

/// Private keys made for the test, removed when it ends, failed or not.
struct KeyDir(PathBuf);

impl KeyDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("hcp-ssh-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Makes an ed25519 key pair `name`; returns the public key line.
    fn keygen(&self, name: &str) -> String {
        let path = self.0.join(name);
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("{name}@hcp-test"), "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(path.with_extension("pub")).unwrap()
    }

    fn key(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ssh -i key root@ip command`, non-interactive, trusting any host key
/// and reading no configuration, agent or key of whoever runs the test.
async fn ssh(key: &Path, ip: &str, command: &str) -> Output {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
        .args(["-o", "PreferredAuthentications=publickey", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(key)
        .arg(format!("root@{ip}"))
        .arg(command)
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("ssh ends within a minute")
        .expect("ssh runs")
}

fn tools_present() -> bool {
    ["ssh", "ssh-keygen"].iter().all(|t| std::process::Command::new(t).arg("-V").output().is_ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_pair_lets_its_holder_into_the_guest_and_no_one_else() {
    if !tools_present() {
        println!("SKIP: ssh and ssh-keygen are missing (scripts/testbed.sh installs openssh-client)");
        return;
    }
    if !common::nat_network_active() {
        return;
    }
    // The reconciler reports the guest's address soon after its lease.
    let opts =
        StackOptions { core_toml: "[reconciler]\ninterval_seconds = 2\n".into(), ..Default::default() };
    let kvm = Kvm::start_with(opts).await;
    let keys = KeyDir::new();
    let public = keys.keygen("holder");
    keys.keygen("stranger");

    let path = "/api/hcp/tenant/v1/projects/demo/key-pairs";
    let r = kvm.stack.rest.post(path, &kvm.tenant, &json!({"name": "laptop", "public_key": public})).await;
    let r = r.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let (vm, job) = kvm
        .create(
            "ssh-1",
            json!({"networks": [{"network": "lan"}], "key_names": ["laptop"], "user_data": USER_DATA}),
        )
        .await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&vm, "HCP-GUEST: 1 ssh keys installed", 1).await;
    kvm.serial_shows(&vm, "HCP-GUEST: ssh server on port 22", 1).await;

    // The address HCP reports for the guest (its DHCP lease).
    let ip = wait_until(SLOW, "the guest's address in the VM's view", || async {
        let v = kvm.stack.rest.get(&format!("{VMS}/{vm}"), &kvm.tenant).await?;
        Ok(v.body["networks"][0]["ipv4"][0].as_str().map(str::to_owned))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; serial log:\n{}", kvm.serial(&vm)));
    println!("the guest has {ip}");

    // The key pair's holder gets in and the command's output comes back.
    let out = wait_until(SSH_READY, "an SSH login with the key pair", || async {
        let out = ssh(&keys.key("holder"), &ip, "echo HCP-SSH-OK $(hostname) $(id -u)").await;
        Ok(out.status.success().then_some(out))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; serial log:\n{}", kvm.serial(&vm)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), "HCP-SSH-OK ssh-1 0", "{stdout}");

    // A key never imported is refused by the server.
    let out = ssh(&keys.key("stranger"), &ip, "echo should-not-run").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stranger got in: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("Permission denied"), "{stderr}");

    let r = kvm.stack.rest.raw("DELETE", &format!("{VMS}/{vm}"), Some(&kvm.tenant), None).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    kvm.succeed(&r.str("job_id")).await;
}
