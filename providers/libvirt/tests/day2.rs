//! The day-2 calls of `hcp.provider.v1` on a real guest, straight through
//! the provider's gRPC API (no core in between): one tiny TCG guest on
//! `qemu:///system` that ignores the ACPI power button (its user data kills
//! acpid at every boot) is looked at, reset, stopped at a timeout, powered
//! off by force, resized and deleted. What the guest printed on its serial
//! port, and what libvirt and `qemu-img` say of the domain, are the proof.
//! One guest serves every check, to keep the real-VM tests short on CI.

mod common;

use std::time::{Duration, Instant};

use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::{
    CreateVmRequest, ImageRef, ListVmsRequest, NetworkAttachment, PowerState, RebootVmRequest,
    ResizeVmRequest, StopVmRequest, VmInfo, VmRef, VmSpec,
};
use hcp_testkit::wait_until;
use tonic::transport::Channel;

/// Runs at every boot, before the banner: the guest stops listening to the
/// power button, says how many CPUs and how much memory it sees, and takes
/// a DHCP lease on its NIC (without configuring it: the lease on the
/// network's side is what libvirt reports).
const USER_DATA: &str = "#!/bin/sh\n\
    killall acpid\n\
    echo \"HCP-GUEST: acpid stopped cpus=$(grep -c ^processor /proc/cpuinfo) \
    mem_kib=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)\" > /dev/ttyS0\n\
    ip link set eth0 up\n\
    udhcpc -i eth0 -n -q -t 5 -T 2 -s /bin/true >/dev/null 2>&1 && echo HCP-GUEST: dhcp ok > /dev/ttyS0\n";

const BANNER: &str = "HCP-GUEST-READY";

/// The provider's default graceful-stop timeout in the test bed's config
/// (`stop_timeout_seconds` in `common::Testbed::config_toml`).
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// (CPUs, MemTotal KiB) the guest reported at each boot, in order.
fn guest_facts(serial: &str) -> Vec<(u32, u64)> {
    serial
        .lines()
        .filter_map(|l| l.split_once("HCP-GUEST: acpid stopped ").map(|(_, rest)| rest))
        .filter_map(|rest| {
            let value = |key: &str| {
                rest.split_whitespace().find_map(|kv| kv.strip_prefix(key)).map(|v| v.trim().to_owned())
            };
            Some((value("cpus=")?.parse().ok()?, value("mem_kib=")?.parse().ok()?))
        })
        .collect()
}

fn spec(network: NetworkAttachment) -> VmSpec {
    VmSpec {
        name: "day-two".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: Some(ImageRef { name: "tiny".into(), source: "tiny".into() }),
        networks: vec![network],
        user_data: Some(USER_DATA.into()),
        hostname: "day-two".into(),
        labels: Default::default(),
        host: String::new(),
        ..Default::default()
    }
}

fn power(vm: &VmInfo) -> PowerState {
    PowerState::try_from(vm.power_state).unwrap_or(PowerState::Unspecified)
}

/// A `virsh dominfo` field, e.g. `CPU(s):`.
fn dominfo(vm: &str, field: &str) -> String {
    common::virsh(&["dominfo", vm])
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn virtual_size(disk: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["virtual-size"].as_u64()
}

async fn get(compute: &mut ComputeClient<Channel>, vm: &str) -> VmInfo {
    compute.get_vm(VmRef { vm_id: vm.to_owned() }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn day_two_calls_on_a_guest_that_ignores_acpi() {
    let bed = common::Testbed::new();
    let provider = bed.start_in_process("qemu:///system").await;
    let mut compute = ComputeClient::connect(provider.endpoint.clone()).await.unwrap();
    // The HCP network "lan" is not a key of the provider's [networks]
    // table: only the operator's mapping (backing) makes it resolvable.
    // "nat" is libvirt's NAT network with DHCP; where it does not run,
    // "default" (user-mode networking) stands in and the address check
    // is skipped, saying why.
    let nat = common::nat_network_active();
    let backing = if nat { "nat" } else { "default" };
    let lan = |backing: &str| NetworkAttachment { network: "lan".into(), backing: backing.into() };

    // A network neither the table nor a backing resolves is refused,
    // naming the field, before anything is made.
    for (attachment, field) in [(lan(""), "networks[0].network"), (lan("no-such"), "networks[0].backing")] {
        let id = uuid::Uuid::now_v7().to_string();
        let req = CreateVmRequest { vm_id: id, spec: Some(spec(attachment)), start: true };
        let err = compute.create_vm(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    let vm = uuid::Uuid::now_v7().to_string();
    let created = compute
        .create_vm(CreateVmRequest { vm_id: vm.clone(), spec: Some(spec(lan(backing))), start: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (power(&created), created.vcpus, created.memory_mib, created.disk_gib),
        (PowerState::Running, 1, 256, 1)
    );
    bed.serial_shows(&vm, BANNER, 1).await;
    let first_boot = guest_facts(&bed.serial(&vm));
    assert_eq!(first_boot.first().map(|f| f.0), Some(1), "{}", bed.serial(&vm));

    // GetVm: the NIC as the domain has it (the MAC of its XML, on the
    // libvirt network the backing named); with DHCP, the leased address.
    let info = get(&mut compute, &vm).await;
    assert_eq!(info.interfaces.len(), 1, "{info:?}");
    let nic = &info.interfaces[0];
    let xml = common::virsh(&["dumpxml", &vm]);
    assert!(nic.mac.len() == 17 && xml.contains(&format!("<mac address='{}'/>", nic.mac)), "{nic:?}\n{xml}");
    assert_eq!(nic.network, if nat { "default" } else { "user" });
    if nat {
        let leased = wait_until(Duration::from_secs(60), "the DHCP lease in GetVm", || async {
            let mut c = compute.clone();
            let ipv4 = get(&mut c, &vm).await.interfaces[0].ipv4.clone();
            Ok(ipv4.first().cloned())
        })
        .await;
        let ipv4 = leased.unwrap_or_else(|e| panic!("{e}; serial log:\n{}", bed.serial(&vm)));
        println!("GetVm shows the DHCP lease {ipv4} on {}", nic.mac);
        assert!(ipv4.starts_with("192.168.122."), "{ipv4}");
        assert!(common::virsh(&["net-dhcp-leases", "default"]).contains(&ipv4), "{ipv4}");
        // The inventory carries it too (core's reconciler reads addresses
        // from there).
        let listed = compute.list_vms(ListVmsRequest::default()).await.unwrap().into_inner();
        let mine = listed.vms.iter().find(|v| v.vm_id == vm).expect("listed");
        assert_eq!(mine.interfaces, get(&mut compute, &vm).await.interfaces);
    }

    // A hard reboot is the reset button: the guest, deaf to ACPI, boots
    // again (a second banner) without having been asked.
    let r = compute.reboot_vm(RebootVmRequest { vm_id: vm.clone(), hard: true }).await.unwrap().into_inner();
    assert_eq!(power(&r), PowerState::Running);
    bed.serial_shows(&vm, BANNER, 2).await;
    assert!(!bed.serial(&vm).contains("power button"), "{}", bed.serial(&vm));

    // A graceful stop the guest ignores: the provider asks (for the 3 s the
    // request gives, not its own 30 s default), then powers the domain off.
    let started = Instant::now();
    let r = compute
        .stop_vm(StopVmRequest { vm_id: vm.clone(), force: false, timeout_seconds: 3 })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(power(&r), PowerState::Shutoff);
    assert_eq!(common::domstate(&vm), "shut off");
    println!("a graceful stop with timeout_seconds 3 of a guest ignoring ACPI took {took:?}");
    assert!(took >= Duration::from_secs(3), "the guest was given its 3 s before the power-off ({took:?})");
    assert!(
        took < DEFAULT_STOP_TIMEOUT,
        "the stop took {took:?}: the provider's default, not the request's 3 s"
    );

    // A forced stop does not ask at all: it ends before the timeout it
    // carries (which a graceful stop of this guest would wait out).
    compute.start_vm(VmRef { vm_id: vm.clone() }).await.unwrap();
    bed.serial_shows(&vm, BANNER, 3).await;
    let started = Instant::now();
    let r = compute
        .stop_vm(StopVmRequest { vm_id: vm.clone(), force: true, timeout_seconds: 20 })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!((power(&r), common::domstate(&vm).as_str()), (PowerState::Shutoff, "shut off"));
    println!("a forced stop took {took:?}");
    assert!(took < Duration::from_secs(20), "a forced stop waited {took:?}, as if for the guest");

    // Resize the stopped domain (twice: idempotent): libvirt's definition,
    // the overlay disk, and the provider's answer all say the new sizes.
    let grow = ResizeVmRequest { vm_id: vm.clone(), vcpus: 2, memory_mib: 384, disk_gib: 2 };
    for _ in 0..2 {
        let r = compute.resize_vm(grow.clone()).await.unwrap().into_inner();
        assert_eq!((power(&r), r.vcpus, r.memory_mib, r.disk_gib), (PowerState::Shutoff, 2, 384, 2));
    }
    assert_eq!(dominfo(&vm, "CPU(s):"), "2");
    assert_eq!(dominfo(&vm, "Max memory:"), "393216 KiB");
    assert_eq!(dominfo(&vm, "Used memory:"), "393216 KiB");
    let disk = bed.state_dir.join(&vm).join("disk.qcow2");
    assert_eq!(virtual_size(&disk), Some(2 << 30));
    // Shrinking the disk is refused, and nothing else of the request
    // happens either.
    let shrink = ResizeVmRequest { vm_id: vm.clone(), vcpus: 1, memory_mib: 256, disk_gib: 1 };
    let err = compute.resize_vm(shrink).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!((dominfo(&vm, "CPU(s):").as_str(), virtual_size(&disk)), ("2", Some(2 << 30)));

    // The guest sees the new size when it boots again; running, the domain
    // is not resized (no hot resize here).
    compute.start_vm(VmRef { vm_id: vm.clone() }).await.unwrap();
    bed.serial_shows(&vm, BANNER, 4).await;
    let facts = guest_facts(&bed.serial(&vm));
    println!("(CPUs, MemTotal KiB) the guest saw at each boot: {facts:?}");
    let (cpus, mem_kib) = *facts.last().unwrap();
    assert_eq!(cpus, 2, "{facts:?}");
    assert!(mem_kib > first_boot[0].1 + 100 * 1024, "128 MiB more memory: {facts:?}");
    let err = compute.resize_vm(grow).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    let deleted = compute.delete_vm(VmRef { vm_id: vm.clone() }).await.unwrap().into_inner();
    assert!(deleted.existed);
    assert_eq!(common::domstate(&vm), "", "the domain is gone");
    assert!(!bed.state_dir.join(&vm).exists(), "the VM's files are gone");
    assert!(common::hcp_domains("qemu:///system", &bed).is_empty());
}
