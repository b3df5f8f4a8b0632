//! HCP with real virtual machines: core and gateway (as processes, through
//! the REST API a tenant uses) with the libvirt provider process on
//! `qemu:///system`, booting the tiny TCG guest of `scripts/testbed.sh`.
//! What the guest printed on its serial port is the proof that it booted,
//! read its cloud-init seed, powered off on ACPI and rebooted.

mod common;

use std::time::Duration;

use common::{Kvm, SLOW, VMS, domstate, provider_console};
use serde_json::json;
use tokio::io::AsyncReadExt;

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
    let endpoint = provider_console(&kvm, &vm, "vnc").await;
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

/// Day-2 operations on a real guest through REST: a guest that ignores the
/// power button (its user data kills acpid) is stopped at the timeout the
/// tenant asked for; a HARD reboot is a reset (a new boot banner, no
/// shutdown); a resize changes vCPUs, memory and disk in the domain; and,
/// where libvirt's NAT network runs, the address the guest took by DHCP
/// shows in the VM read.
#[tokio::test(flavor = "multi_thread")]
async fn day_two_on_a_real_guest() {
    let kvm = Kvm::start("").await;
    let nat = common::nat_network_active();
    let user_data = "#!/bin/sh\nkillall acpid\necho HCP-GUEST: acpid stopped > /dev/ttyS0\n\
                     ip link set eth0 up\n\
                     udhcpc -i eth0 -n -q -t 5 -T 2 -s /bin/true >/dev/null 2>&1 && \
                     echo HCP-GUEST: dhcp ok > /dev/ttyS0\n";
    let networks = if nat { json!([{"network": "lan"}]) } else { json!([{"network": "default"}]) };
    let (vm, job) = kvm.create("day-two", json!({"user_data": user_data, "networks": networks})).await;
    kvm.succeed(&job).await;
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 1).await;
    assert!(kvm.serial(&vm).contains("HCP-GUEST: acpid stopped"), "{}", kvm.serial(&vm));
    if nat {
        assert!(kvm.serial(&vm).contains("HCP-GUEST: dhcp ok"), "{}", kvm.serial(&vm));
    }

    // HARD: the reset button. The guest boots again without being asked.
    kvm.op("POST", &format!("{VMS}/{vm}:reboot"), r#"{"type":"HARD"}"#).await;
    kvm.serial_shows(&vm, "HCP-GUEST-READY", 2).await;
    assert_eq!(domstate(&vm), "running");

    // The NIC as the tenant sees it: the domain's MAC; with DHCP, the
    // leased address (refreshed when the reboot job ended).
    let read = kvm.stack.rest.get(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap().body;
    let nic = &read["networks"][0];
    let xml = common::virsh(&["dumpxml", &vm]);
    let mac = nic["mac"].as_str().unwrap();
    assert!(mac.len() == 17 && xml.contains(&format!("<mac address='{mac}'/>")), "{read}\n{xml}");
    if nat {
        let ipv4 = nic["ipv4"][0].as_str().unwrap_or_default();
        assert!(ipv4.starts_with("192.168.122."), "the DHCP lease shows in the read: {read}");
        assert!(common::virsh(&["net-dhcp-leases", "default"]).contains(ipv4));
    }

    // A graceful stop the guest ignores ends at the tenant's timeout (3 s),
    // not at the provider's default (30 s), with the guest powered off.
    let started = std::time::Instant::now();
    kvm.op("POST", &format!("{VMS}/{vm}:stop"), r#"{"timeout_seconds":3}"#).await;
    let took = started.elapsed();
    assert_eq!(domstate(&vm), "shut off");
    assert!(!kvm.serial(&vm).contains("power button"), "acpid was dead: {}", kvm.serial(&vm));
    assert!(took < Duration::from_secs(30), "the stop waited {took:?}: the provider's default, not 3 s");
    let jobs = kvm.stack.rest.get(&format!("{VMS}/{vm}/jobs?kind=vm.stop"), &kvm.tenant).await.unwrap();
    assert_eq!(jobs.body["jobs"][0]["status"], "SUCCEEDED", "{}", jobs.body);

    // Resize the stopped domain: small (1 vCPU, 512 MiB, 10 GiB) to medium
    // (2 vCPUs, 2048 MiB, 20 GiB), read back from libvirt and the disk.
    kvm.op("POST", &format!("{VMS}/{vm}:resize"), r#"{"flavor":"medium"}"#).await;
    let info = common::virsh(&["dominfo", &vm]);
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
    };
    assert_eq!(field("CPU(s):"), "2", "{info}");
    assert_eq!(field("Max memory:"), "2097152 KiB", "{info}");
    let disk = kvm.bed.state_dir.join(&vm).join("disk.qcow2");
    let img = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&disk)
        .output()
        .unwrap();
    let size = serde_json::from_slice::<serde_json::Value>(&img.stdout).unwrap()["virtual-size"].as_u64();
    assert_eq!(size, Some(20 << 30));
    let read = kvm.stack.rest.get(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap().body;
    assert_eq!((read["flavor"].as_str(), read["vcpus"].as_u64()), (Some("medium"), Some(2)));
    // libvirt has no hot resize here: a running VM's resize is refused first.
    kvm.op("POST", &format!("{VMS}/{vm}:start"), "{}").await;
    let r =
        kvm.stack.rest.post(&format!("{VMS}/{vm}:resize"), &kvm.tenant, &json!({"flavor": "large"})).await;
    let r = r.unwrap();
    assert_eq!((r.status, r.body["details"]["capability"].as_str()), (409, Some("supports_hot_resize")));

    let r = kvm.stack.rest.delete(&format!("{VMS}/{vm}"), &kvm.tenant).await.unwrap();
    kvm.succeed(&r.str("job_id")).await;
    assert!(common::hcp_domains("qemu:///system", &kvm.bed).is_empty());
}
