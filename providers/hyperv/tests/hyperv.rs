//! The Hyper-V provider against `hcp-hyperv-sim`, a WS-Management server
//! simulating the documented part of `root/virtualization/v2` that
//! refuses and records every request off the contract: the conformance
//! kit, what a VM looks like on the host, jobs that fail, objects in use,
//! bad credentials, and the provider process killed at every step of a
//! create. Every test ends by checking that the simulator saw no violation.

use std::sync::Arc;
use std::time::Duration;

use hcp_hyperv_sim::{Faults, Running, SimConfig};
use hcp_provider_hyperv::Hyperv;
use hcp_provider_hyperv::config::Config;
use hcp_provider_sdk::{ErrorKind, Provider, pb};

const USER: &str = "hcp";
const PASSWORD: &str = "s3cret";

/// The image share as the host sees it (a UNC path, as in production).
const SHARE_HOST: &str = "\\\\files\\images";

/// A simulator, and the image share it sees (removed with it).
struct TestSim {
    running: Running,
    share: std::path::PathBuf,
}

impl std::ops::Deref for TestSim {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

impl Drop for TestSim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.share);
    }
}

async fn sim() -> TestSim {
    let share = std::env::temp_dir().join(format!("hcp-hyperv-share-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&share).unwrap();
    let config = SimConfig {
        switches: vec!["Default Switch".into(), "LAN".into()],
        users: vec![(USER.into(), PASSWORD.into())],
        shares: vec![(SHARE_HOST.into(), share.clone())],
        ..Default::default()
    };
    let running = hcp_hyperv_sim::start(config).await.expect("the simulator starts");
    // The image: a parent VHDX on the host.
    std::fs::write(running.sim.disk_dir().join("debian-12.vhdx"), vec![0u8; 4096]).unwrap();
    TestSim { running, share }
}

fn toml(sim: &Running, extra: &str) -> String {
    let dir = sim.sim.disk_dir();
    let share = match sim.sim.shares().first() {
        Some((host, local)) => {
            format!("image_share = \"{}\"\nimage_share_host_path = '{host}'\n", local.display())
        }
        None => String::new(),
    };
    format!(
        "{extra}{share}listen = \"127.0.0.1:0\"\nurl = \"{url}\"\nvm_dir = 'C:\\Hyper-V\\hcp'\nvm_dir_local = \"{dir}\"\n\
         image_dir = 'C:\\Hyper-V\\hcp'\n\
         [networks]\ndefault = \"Default Switch\"\nlan = \"LAN\"\n\
         [cloud_init]\nlocal_dir = \"{dir}\"\nhost_dir = 'C:\\Hyper-V\\hcp'\n\
         [tls]\nfingerprint = \"{fp}\"\n\
         [timing]\njob_poll_ms = 10\nretry_base_ms = 10\nretry_attempts = 4\nshutdown_timeout_seconds = 5\n\
         [vmconnect]\nport = {vmconnect}\n",
        vmconnect = sim.vmconnect_addr.expect("the simulator runs VMConnect").port(),
        url = sim.endpoint(),
        dir = dir.display(),
        fp = sim.fingerprint,
    )
}

async fn provider(sim: &Running, extra: &str) -> Hyperv {
    let p = Hyperv::new(Config::from_toml(&toml(sim, extra)).unwrap()).await.unwrap();
    p.configure(
        [("username".to_owned(), USER.to_owned()), ("password".to_owned(), PASSWORD.to_owned())].into(),
    )
    .await
    .unwrap();
    p
}

fn assert_no_violations(sim: &Running) {
    let v = sim.sim.violations();
    assert!(v.is_empty(), "requests off the contract: {v:#?}");
}

fn spec(name: &str, networks: &[&str], user_data: Option<&str>) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 2,
        memory_mib: 1024,
        disk_gib: 2,
        image: Some(pb::ImageRef { name: "debian-12".into(), source: "debian-12".into() }),
        networks: networks
            .iter()
            .map(|n| pb::NetworkAttachment { network: (*n).into(), backing: String::new() })
            .collect(),
        user_data: user_data.map(str::to_owned),
        hostname: "web".into(),
        labels: Default::default(),
        host: String::new(),
        ..Default::default()
    }
}

fn hcp_vms(sim: &Running) -> Vec<String> {
    let mut names: Vec<String> =
        sim.sim.vms().into_iter().map(|v| v.name).filter(|n| n.starts_with("hcp-")).collect();
    names.sort();
    names
}

struct Hooks(hcp_hyperv_sim::Sim);

impl hcp_provider_conformance::Hooks for Hooks {
    fn hypervisor_vm_ids(&self) -> Option<hcp_provider_conformance::HookFuture<'_, Vec<String>>> {
        Some(Box::pin(async move {
            Ok(self
                .0
                .vms()
                .into_iter()
                .filter_map(|v| v.name.strip_prefix("hcp-").map(str::to_owned))
                .collect())
        }))
    }

    fn fail_next_create_after_first_effect(&self) -> Option<hcp_provider_conformance::HookFuture<'_, ()>> {
        // The VM is defined, then its first added resource's job fails.
        Some(Box::pin(async move {
            let mut f = self.0.faults();
            f.job_failures.insert("AddResourceSettings".into(), "The operation failed (simulated).".into());
            self.0.set_faults(f);
            Ok(())
        }))
    }

    fn clear_faults(&self) -> hcp_provider_conformance::HookFuture<'_, ()> {
        Box::pin(async move {
            self.0.set_faults(Faults::default());
            Ok(())
        })
    }
}

#[tokio::test]
async fn the_provider_passes_the_conformance_kit() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(hcp_provider_sdk::serve(
        p,
        hcp_provider_sdk::ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let endpoint = format!("http://{}", rx.await.unwrap());
    let mut options = hcp_provider_conformance::Options::new(&endpoint);
    options.image_source = "debian-12".into();
    options.network = "default".into();
    options.call_timeout = Duration::from_secs(60);
    options.hooks = Some(Arc::new(Hooks(sim.sim.clone())));
    let report = hcp_provider_conformance::run(options).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    let skipped: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, hcp_provider_conformance::Outcome::Skip(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    // One host, no ListHosts: no host or migration check applies.
    assert_eq!(
        skipped,
        [
            "vnc console",
            "spice console",
            "serial console",
            "console log",
            "hot resize",
            "hosts: named, unique, with capacity and state; VMs report theirs",
            "create on a named host",
            "live migration: running VM to another host, repeated",
            "cold migration: stopped VM to another host, repeated",
        ],
        "{report}"
    );
    assert!(hcp_vms(&sim).is_empty(), "the kit cleaned up: {:?}", hcp_vms(&sim));
    assert_no_violations(&sim);
}

#[tokio::test]
async fn a_vm_is_defined_with_its_disk_seed_and_nics_and_marked_with_its_hcp_id() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let id = uuid::Uuid::new_v4().to_string();
    let req = pb::CreateVmRequest {
        vm_id: id.clone(),
        spec: Some(spec("web-1", &["default", "lan"], Some("#cloud-config\nhostname: web\n"))),
        start: true,
    };
    let vm = p.create_vm(req.clone()).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Running as i32);
    assert_eq!((vm.vcpus, vm.memory_mib), (2, 1024));
    assert_eq!(vm.interfaces.len(), 2);
    assert!(vm.interfaces.iter().all(|i| i.mac.len() == 17), "{vm:?}");
    let v = sim.sim.vm(&format!("hcp-{id}")).expect("the VM is on the host");
    assert_eq!(vm.native_id, v.guid);
    assert!(v.notes.contains(&format!("hcp-vm-id={id}")), "{:?}", v.notes);
    assert_eq!((v.cpus, v.memory_mb), (2, 1024));
    let subtypes: Vec<&str> = v.devices.iter().map(|d| d.subtype.as_str()).collect();
    for want in [
        "Microsoft:Hyper-V:Synthetic SCSI Controller",
        "Microsoft:Hyper-V:Synthetic Disk Drive",
        "Microsoft:Hyper-V:Virtual Hard Disk",
        "Microsoft:Hyper-V:Synthetic DVD Drive",
        "Microsoft:Hyper-V:Virtual CD/DVD Disk",
    ] {
        assert_eq!(subtypes.iter().filter(|s| **s == want).count(), 1, "{want}: {subtypes:?}");
    }
    assert_eq!(subtypes.iter().filter(|s| **s == "Microsoft:Hyper-V:Synthetic Ethernet Port").count(), 2);
    assert_eq!(subtypes.iter().filter(|s| **s == "Microsoft:Hyper-V:Ethernet Connection").count(), 2);
    // The disk: a differencing VHDX on the image, grown to the flavor.
    let vhd = format!("C:\\Hyper-V\\hcp\\hcp-{id}.vhdx");
    let file =
        sim.sim.files().into_iter().find(|f| f.path.eq_ignore_ascii_case(&vhd)).expect("the VHDX exists");
    assert_eq!((file.kind, file.size), (4, 2 << 30));
    assert!(file.parent.as_deref().is_some_and(|p| p.ends_with("debian-12.vhdx")), "{file:?}");
    // The seed: a NoCloud ISO the provider wrote where the host sees it.
    assert!(sim.sim.disk_dir().join(format!("hcp-{id}-seed.iso")).is_file());

    // A repeated create finds the VM and adds nothing.
    let again = p.create_vm(req).await.unwrap();
    assert_eq!(again.native_id, vm.native_id);
    assert_eq!(sim.sim.vm(&format!("hcp-{id}")).unwrap().devices.len(), v.devices.len());
    assert_eq!(hcp_vms(&sim), [format!("hcp-{id}")]);

    // Unknown images and switches are refused before anything is made.
    let other = uuid::Uuid::new_v4().to_string();
    let mut bad = spec("x", &["default"], None);
    bad.image.as_mut().unwrap().source = "no-such-image".into();
    let e = p
        .create_vm(pb::CreateVmRequest { vm_id: other.clone(), spec: Some(bad), start: true })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
    let e = p
        .create_vm(pb::CreateVmRequest {
            vm_id: other,
            spec: Some(spec("x", &["nowhere"], None)),
            start: true,
        })
        .await
        .unwrap_err();
    assert!(e.kind == ErrorKind::InvalidArgument && e.message.contains("spec.networks"), "{e:?}");
    assert_eq!(hcp_vms(&sim).len(), 1);

    // Delete: the VM, its VHDX and its seed are gone.
    assert!(p.delete_vm(&id).await.unwrap());
    assert!(!p.delete_vm(&id).await.unwrap());
    assert!(hcp_vms(&sim).is_empty());
    assert!(!sim.sim.disk_dir().join(format!("hcp-{id}.vhdx")).exists());
    assert!(!sim.sim.disk_dir().join(format!("hcp-{id}-seed.iso")).exists());

    // SSH keys alone (no user data) also make a seed: its meta-data
    // carries them as public-keys.
    let keyed = uuid::Uuid::new_v4().to_string();
    let mut with_keys = spec("keyed", &["default"], None);
    with_keys.ssh_authorized_keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK alice@example".into()];
    p.create_vm(pb::CreateVmRequest { vm_id: keyed.clone(), spec: Some(with_keys), start: false })
        .await
        .unwrap();
    let iso =
        std::fs::read(sim.sim.disk_dir().join(format!("hcp-{keyed}-seed.iso"))).expect("the seed exists");
    let needle = b"public-keys:\n  - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK alice@example\"";
    assert!(iso.windows(needle.len()).any(|w| w == needle), "the seed's meta-data holds the key");
    assert!(p.delete_vm(&keyed).await.unwrap());
    assert!(hcp_vms(&sim).is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn the_rdp_console_endpoint_names_the_vm_to_vmconnect() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let id = uuid::Uuid::new_v4().to_string();
    let req =
        pb::CreateVmRequest { vm_id: id.clone(), spec: Some(spec("con-1", &["default"], None)), start: true };
    let vm = p.create_vm(req).await.unwrap();
    let ep =
        p.get_console(pb::GetConsoleRequest { vm_id: id.clone(), protocol: "rdp".into() }).await.unwrap();
    let vmconnect = sim.vmconnect_addr.unwrap();
    assert_eq!(
        (ep.protocol.as_str(), ep.host.as_str(), ep.port),
        ("rdp", "127.0.0.1", u32::from(vmconnect.port()))
    );
    assert_eq!(ep.transport(), pb::ConsoleTransport::Tcp);
    assert!(!ep.tls && ep.password.is_empty(), "VMConnect does its own TLS and CredSSP: {ep:?}");
    assert_eq!(ep.preconnection_blob, vm.native_id, "the blob is the VM's GUID");
    // Opened as the gateway opens it: the blob in a preconnection PDU, then
    // the client's RDP.
    let (negotiation, conn) =
        hcp_testkit::rdp::connect(&format!("{}:{}", ep.host, ep.port), &ep.preconnection_blob).await.unwrap();
    assert_eq!(negotiation, hcp_testkit::rdp::Negotiation::Selected(hcp_testkit::rdp::CREDSSP));
    drop(conn);
    let sessions = sim.sim.vmconnect_sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].vm_name.as_deref(), Some(format!("hcp-{id}").as_str()));
    // Other console types are not Hyper-V's; an unknown VM is not found.
    let e =
        p.get_console(pb::GetConsoleRequest { vm_id: id.clone(), protocol: "vnc".into() }).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e:?}");
    let other = uuid::Uuid::new_v4().to_string();
    let e = p.get_console(pb::GetConsoleRequest { vm_id: other, protocol: "rdp".into() }).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}");
    assert!(p.delete_vm(&id).await.unwrap());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn vmconnect_refuses_and_records_what_names_no_vm() {
    let sim = sim().await;
    let addr = sim.vmconnect_addr.unwrap().to_string();
    // A GUID of no VM on the host.
    let unknown = uuid::Uuid::new_v4().to_string().to_uppercase();
    assert!(hcp_testkit::rdp::connect(&addr, &unknown).await.is_err(), "an unknown VM was connected");
    // A client that sends no preconnection PDU (RDP straight away).
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(hcp_testkit::rdp::handshake(&mut tcp, None).await.is_err());
    let v = hcp_testkit::wait_until(Duration::from_secs(10), "both refusals are recorded", || async {
        let v = sim.sim.violations();
        Ok((v.len() == 2).then_some(v))
    })
    .await
    .unwrap();
    assert!(v.iter().all(|l| l.starts_with("vmconnect:")), "{v:?}");
    assert!(v.iter().any(|l| l.contains(&unknown) && l.contains("no VM")), "{v:?}");
    assert!(v.iter().any(|l| l.contains("not a preconnection PDU")), "{v:?}");
}

#[tokio::test]
async fn failed_jobs_objects_in_use_and_bad_credentials_are_told_apart() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let id = uuid::Uuid::new_v4().to_string();
    let req =
        pb::CreateVmRequest { vm_id: id.clone(), spec: Some(spec("jobs", &["default"], None)), start: false };
    p.create_vm(req).await.unwrap();

    // A job ending in state 10: not retryable, with Hyper-V's message.
    sim.sim.set_faults(Faults {
        job_failures: [(
            "RequestStateChange".to_owned(),
            "The virtual machine could not be started (simulated).".to_owned(),
        )]
        .into(),
        ..Default::default()
    });
    let e = p.start_vm(&id).await.unwrap_err();
    assert_eq!(e.retryable, Some(false), "{e:?}");
    assert!(e.message.contains("could not be started (simulated)"), "{e:?}");

    // 32774 (in use) twice: retried, and the start goes through.
    sim.sim
        .set_faults(Faults { in_use: [("RequestStateChange".to_owned(), 2)].into(), ..Default::default() });
    let vm = p.start_vm(&id).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Running as i32);

    // A graceful stop of a guest that ignores it ends in a turn-off at the
    // timeout; a VM without integration services is turned off at once.
    sim.sim.set_faults(Faults { guest_ignores_shutdown: true, ..Default::default() });
    let vm =
        p.stop_vm(pb::StopVmRequest { vm_id: id.clone(), force: false, timeout_seconds: 1 }).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Shutoff as i32);
    sim.sim.set_faults(Faults::default());

    // Wrong credentials: a credential error, not retried. With Basic after
    // one request; under Negotiate after one handshake (NEGOTIATE, then
    // AUTHENTICATE refused).
    for (scheme, requests) in [("basic", 1), ("negotiate", 2)] {
        let wrong =
            Hyperv::new(Config::from_toml(&toml(&sim, &format!("auth_scheme = \"{scheme}\"\n"))).unwrap())
                .await
                .unwrap();
        wrong
            .configure(
                [("username".to_owned(), USER.to_owned()), ("password".to_owned(), "wrong".to_owned())]
                    .into(),
            )
            .await
            .unwrap();
        let before = sim.sim.stats();
        let e = wrong.get_vm(&id).await.unwrap_err();
        assert_eq!((e.kind, e.retryable), (ErrorKind::PermissionDenied, Some(false)), "{scheme}: {e:?}");
        let after = sim.sim.stats();
        assert_eq!(
            (after.requests - before.requests, after.unauthorized - before.unauthorized),
            (requests, 1),
            "{scheme}"
        );
    }
    // The right ones under Basic work too (the rest of this file uses
    // NTLM, the default).
    let basic = provider(&sim, "auth_scheme = \"basic\"\n").await;
    assert_eq!(basic.get_vm(&id).await.unwrap().vm_id, id);

    assert!(p.delete_vm(&id).await.unwrap());
    assert_no_violations(&sim);
}

/// The provider process is killed at every step of a create (after the
/// define, after each added resource, after the start); a restarted
/// provider given the same request finishes it, and the host holds
/// exactly one VM with one of each device.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_create_step_leaves_exactly_one_vm() {
    use hcp_proto::provider::compute_client::ComputeClient;
    use hcp_proto::provider::identity_client::IdentityClient;
    let sim = sim().await;
    let dir = sim.sim.disk_dir();
    let config = dir.join("provider.toml");
    std::fs::write(&config, toml(&sim, "")).unwrap();
    let exe = env!("CARGO_BIN_EXE_hcp-provider-hyperv");
    let start = |failpoint: Option<&str>| {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--config").arg(&config).arg("--listen").arg("127.0.0.1:0").kill_on_drop(true);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
        if let Some(f) = failpoint {
            cmd.env(hcp_provider_hyperv::FAILPOINTS_ENV, f);
        }
        cmd.spawn().unwrap()
    };
    // The provider announces its address on stdout.
    async fn address(child: &mut tokio::process::Child) -> String {
        use tokio::io::AsyncBufReadExt;
        let out = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(addr) = l.split_whitespace().find_map(|w| w.strip_prefix("addr=")) {
                return addr.trim_matches('"').to_owned();
            }
            if let Some(i) = l.find("127.0.0.1:") {
                return l[i..].split(|c: char| c.is_whitespace() || c == '"').next().unwrap().to_owned();
            }
        }
        panic!("the provider printed no address");
    }
    let mut made = Vec::new();
    for step in [
        "create:after-define",
        "create:after-controller",
        "create:after-drive",
        "create:after-vhd",
        "create:after-disk",
        "create:after-dvd",
        "create:after-seed",
        "create:after-nic",
        "create:after-connection",
        "start:after-start",
    ] {
        let id = uuid::Uuid::new_v4().to_string();
        let req = pb::CreateVmRequest {
            vm_id: id.clone(),
            spec: Some(spec(step, &["default"], Some("#cloud-config\n"))),
            start: false,
        };
        let mut child = start(Some(step));
        let addr = address(&mut child).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(channel.clone())
            .configure(pb::ConfigureRequest {
                credentials: [
                    ("username".to_owned(), USER.to_owned()),
                    ("password".to_owned(), PASSWORD.to_owned()),
                ]
                .into(),
            })
            .await
            .unwrap();
        let mut compute = ComputeClient::new(channel);
        let r = if step.starts_with("start:") {
            compute.create_vm(req.clone()).await.unwrap();
            compute.start_vm(pb::VmRef { vm_id: id.clone() }).await.map(|_| ())
        } else {
            compute.create_vm(req.clone()).await.map(|_| ())
        };
        assert!(r.is_err(), "{step}: the provider should have died");
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
        assert!(!status.success(), "{step}: {status}");
        // Restarted, it finishes what core asks again.
        let mut child = start(None);
        let addr = address(&mut child).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(channel.clone())
            .configure(pb::ConfigureRequest {
                credentials: [
                    ("username".to_owned(), USER.to_owned()),
                    ("password".to_owned(), PASSWORD.to_owned()),
                ]
                .into(),
            })
            .await
            .unwrap();
        let mut compute = ComputeClient::new(channel);
        compute.create_vm(req).await.unwrap_or_else(|s| panic!("{step}: the retried create: {s:?}"));
        let vm = compute.start_vm(pb::VmRef { vm_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(vm.power_state, pb::PowerState::Running as i32, "{step}");
        made.push(format!("hcp-{id}"));
        made.sort();
        assert_eq!(hcp_vms(&sim), made, "after a crash {step}: one VM per HCP VM");
        let v = sim.sim.vm(&format!("hcp-{id}")).unwrap();
        let mut subtypes: Vec<String> = v.devices.iter().map(|d| d.subtype.clone()).collect();
        subtypes.sort();
        let before = subtypes.len();
        subtypes.dedup();
        assert_eq!(subtypes.len(), before, "after a crash {step}: a device was added twice: {subtypes:?}");
        drop(child);
    }
    // Clean up through a provider of the test's own.
    let p = provider(&sim, "").await;
    for name in &made {
        assert!(p.delete_vm(name.trim_start_matches("hcp-")).await.unwrap());
    }
    assert!(hcp_vms(&sim).is_empty());
    assert_no_violations(&sim);
}

/// The location on the SCSI controller of the disk drive holding `file` in
/// the simulator's view of a VM, if any.
fn slot_of(sim: &Running, vm_id: &str, file: &str) -> Option<String> {
    let v = sim.sim.vm(&format!("hcp-{vm_id}"))?;
    let image = v.devices.iter().find(|d| d.host_resource.iter().any(|h| h.eq_ignore_ascii_case(file)))?;
    let drive = v.devices.iter().find(|d| Some(&d.instance_id) == image.parent.as_ref())?;
    drive.address_on_parent.clone()
}

fn volume_files(sim: &Running) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(sim.sim.disk_dir().join("volumes"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_volume_moves_between_vms_grows_online_outlives_its_vm_and_is_deleted_once() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_volumes && caps.supports_hot_attach && caps.supports_volume_extend_in_use);
    assert!(caps.volumes_host_local);
    assert_eq!(caps.max_volumes_per_vm, 62);

    let vol = uuid::Uuid::new_v4().to_string();
    let file = format!("C:\\Hyper-V\\hcp\\volumes\\hcp-vol-{vol}.vhdx");
    let create = pb::CreateVolumeRequest {
        volume_id: vol.clone(),
        spec: Some(pb::VolumeSpec { name: "data".into(), size_gib: 1, ..Default::default() }),
    };
    let made = p.create_volume(create.clone()).await.unwrap();
    assert_eq!((made.size_gib, made.native_id.as_str(), made.vm_id.as_str()), (1, file.as_str(), ""));
    // Repeated: the same volume, one file.
    assert_eq!(p.create_volume(create.clone()).await.unwrap(), made);
    assert_eq!(volume_files(&sim), vec![format!("hcp-vol-{vol}.vhdx")]);
    let mut unknown = create.clone();
    unknown.volume_id = uuid::Uuid::new_v4().to_string();
    unknown.spec.as_mut().unwrap().storage = "gold".into();
    assert_eq!(p.create_volume(unknown).await.unwrap_err().kind, ErrorKind::InvalidArgument);

    // Attached to a running VM at slot 1: location 1 of its controller.
    let a = uuid::Uuid::new_v4().to_string();
    let b = uuid::Uuid::new_v4().to_string();
    p.create_vm(pb::CreateVmRequest {
        vm_id: a.clone(),
        spec: Some(spec("a", &["default"], Some("#cloud-config\n"))),
        start: true,
    })
    .await
    .unwrap();
    p.create_vm(pb::CreateVmRequest {
        vm_id: b.clone(),
        spec: Some(spec("b", &["default"], None)),
        start: false,
    })
    .await
    .unwrap();
    let attach =
        |vm: &str, slot| pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: vm.to_owned(), slot };
    let on_a = p.attach_volume(attach(&a, 1)).await.unwrap();
    assert_eq!((on_a.vm_id.as_str(), on_a.slot), (a.as_str(), 1));
    assert_eq!(slot_of(&sim, &a, &file).as_deref(), Some("1"));
    // The seed DVD sits at the last location, out of the volumes' way.
    let seed = sim.sim.vm(&format!("hcp-{a}")).unwrap();
    assert!(
        seed.devices
            .iter()
            .any(|d| d.subtype.ends_with("DVD Drive") && d.address_on_parent.as_deref() == Some("63"))
    );
    // Repeated: nothing added; elsewhere: refused.
    assert_eq!(p.attach_volume(attach(&a, 1)).await.unwrap(), on_a);
    let drives = |vm: &str| sim.sim.vm(&format!("hcp-{vm}")).unwrap().devices.len();
    let before = drives(&a);
    assert_eq!(p.attach_volume(attach(&a, 1)).await.unwrap(), on_a);
    assert_eq!(drives(&a), before);
    assert_eq!(p.attach_volume(attach(&a, 2)).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.attach_volume(attach(&b, 1)).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.delete_volume(&vol).await.unwrap_err().kind, ErrorKind::InvalidState);
    let ghost =
        pb::AttachVolumeRequest { volume_id: uuid::Uuid::new_v4().to_string(), vm_id: a.clone(), slot: 2 };
    assert_eq!(p.attach_volume(ghost).await.unwrap_err().kind, ErrorKind::NotFound);
    let other = uuid::Uuid::new_v4().to_string();
    p.create_volume(pb::CreateVolumeRequest { volume_id: other.clone(), spec: create.spec.clone() })
        .await
        .unwrap();
    let taken = pb::AttachVolumeRequest { volume_id: other.clone(), vm_id: a.clone(), slot: 1 };
    assert_eq!(p.attach_volume(taken).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert!(p.delete_volume(&other).await.unwrap());

    // Grown while the VM runs; the same size again is done; smaller refused.
    let extend = |gib| pb::ExtendVolumeRequest { volume_id: vol.clone(), size_gib: gib };
    assert_eq!(p.extend_volume(extend(3)).await.unwrap().size_gib, 3);
    assert_eq!(p.extend_volume(extend(3)).await.unwrap().size_gib, 3);
    assert_eq!(p.extend_volume(extend(2)).await.unwrap_err().kind, ErrorKind::InvalidArgument);

    // Detached from the running VM (twice), attached to the stopped one.
    let detach = |vm: &str| pb::DetachVolumeRequest { volume_id: vol.clone(), vm_id: vm.to_owned() };
    let off = p.detach_volume(detach(&a)).await.unwrap();
    assert_eq!((off.vm_id.as_str(), off.size_gib), ("", 3));
    assert_eq!(slot_of(&sim, &a, &file), None);
    assert_eq!(p.detach_volume(detach(&a)).await.unwrap(), off);
    let on_b = p.attach_volume(attach(&b, 5)).await.unwrap();
    assert_eq!((on_b.vm_id.as_str(), on_b.slot), (b.as_str(), 5));
    let listed = p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes;
    assert_eq!(listed, vec![on_b.clone()]);
    assert_eq!(p.get_volume(&vol).await.unwrap(), on_b);

    // Deleting the VM keeps the VHDX, detached.
    assert!(p.delete_vm(&b).await.unwrap());
    assert_eq!(volume_files(&sim), vec![format!("hcp-vol-{vol}.vhdx")]);
    let left = p.get_volume(&vol).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.slot, left.size_gib), ("", 0, 3));
    assert_eq!(p.detach_volume(detach(&b)).await.unwrap(), left);

    // Deleted once; then gone.
    assert!(p.delete_volume(&vol).await.unwrap());
    assert!(!p.delete_volume(&vol).await.unwrap());
    assert_eq!(p.get_volume(&vol).await.unwrap_err().kind, ErrorKind::NotFound);
    assert!(volume_files(&sim).is_empty());
    assert!(p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes.is_empty());

    assert!(p.delete_vm(&a).await.unwrap());
    assert!(hcp_vms(&sim).is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn a_boot_volume_outlives_its_vm_and_boots_the_next_with_data_volumes_at_their_slots() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let boot = uuid::Uuid::new_v4().to_string();
    let boot_file = format!("C:\\Hyper-V\\hcp\\volumes\\hcp-vol-{boot}.vhdx");
    let data = uuid::Uuid::new_v4().to_string();
    let data_file = format!("C:\\Hyper-V\\hcp\\volumes\\hcp-vol-{data}.vhdx");
    p.create_volume(pb::CreateVolumeRequest {
        volume_id: data.clone(),
        spec: Some(pb::VolumeSpec { size_gib: 1, ..Default::default() }),
    })
    .await
    .unwrap();
    let with_volumes = |name: &str, volumes: Vec<pb::VolumeAttachment>| {
        let mut s = spec(name, &["default"], None);
        s.boot_volume_id = boot.clone();
        s.volumes = volumes;
        s
    };
    let at = |id: &str, slot| pb::VolumeAttachment { volume_id: id.to_owned(), slot };

    // Refused before anything is made: an unknown storage for a new boot
    // volume, an unknown data volume, a slot out of range.
    let a = uuid::Uuid::new_v4().to_string();
    let create = |vm: &str, spec: pb::VmSpec| pb::CreateVmRequest {
        vm_id: vm.to_owned(),
        spec: Some(spec),
        start: false,
    };
    let mut gold = with_volumes("a", Vec::new());
    gold.boot_storage = "gold".into();
    assert_eq!(p.create_vm(create(&a, gold)).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    let ghost = with_volumes("a", vec![at(&uuid::Uuid::new_v4().to_string(), 1)]);
    assert_eq!(p.create_vm(create(&a, ghost)).await.unwrap_err().kind, ErrorKind::NotFound);
    let slot_63 = with_volumes("a", vec![at(&data, 63)]);
    assert_eq!(p.create_vm(create(&a, slot_63)).await.unwrap_err().kind, ErrorKind::InvalidArgument);
    assert!(hcp_vms(&sim).is_empty());
    assert_eq!(volume_files(&sim), vec![format!("hcp-vol-{data}.vhdx")]);

    // A new boot volume from the image at disk_gib, on location 0; the data
    // volume at its slot; no root disk of the VM's own.
    let req = create(&a, with_volumes("a", vec![at(&data, 3)]));
    p.create_vm(req.clone()).await.unwrap();
    let on_a = p.get_volume(&boot).await.unwrap();
    assert_eq!(
        (on_a.vm_id.as_str(), on_a.slot, on_a.size_gib, on_a.native_id.as_str()),
        (a.as_str(), 0, 2, boot_file.as_str())
    );
    assert_eq!(slot_of(&sim, &a, &boot_file).as_deref(), Some("0"));
    assert_eq!(slot_of(&sim, &a, &data_file).as_deref(), Some("3"));
    let data_on_a = p.get_volume(&data).await.unwrap();
    assert_eq!((data_on_a.vm_id.as_str(), data_on_a.slot), (a.as_str(), 3));
    assert!(!sim.sim.disk_dir().join(format!("hcp-{a}.vhdx")).exists());
    let mut listed: Vec<(String, String, u32)> = p
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .volumes
        .into_iter()
        .map(|v| (v.volume_id, v.vm_id, v.slot))
        .collect();
    listed.sort();
    let mut want = vec![(boot.clone(), a.clone(), 0), (data.clone(), a.clone(), 3)];
    want.sort();
    assert_eq!(listed, want);

    // Repeated: one VM, one boot volume, nothing added.
    let devices = |vm: &str| sim.sim.vm(&format!("hcp-{vm}")).unwrap().devices.len();
    let before = devices(&a);
    p.create_vm(req.clone()).await.unwrap();
    assert_eq!(devices(&a), before);
    assert_eq!(hcp_vms(&sim), vec![format!("hcp-{a}")]);
    assert_eq!(volume_files(&sim).len(), 2);
    assert_eq!(p.get_volume(&boot).await.unwrap(), on_a);

    // The boot volume leaves only with DeleteVm; a second VM cannot take it.
    let detach = pb::DetachVolumeRequest { volume_id: boot.clone(), vm_id: a.clone() };
    assert_eq!(p.detach_volume(detach).await.unwrap_err().kind, ErrorKind::InvalidState);
    assert_eq!(p.delete_volume(&boot).await.unwrap_err().kind, ErrorKind::InvalidState);
    let c = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        p.create_vm(create(&c, with_volumes("c", Vec::new()))).await.unwrap_err().kind,
        ErrorKind::InvalidState
    );
    assert_eq!(hcp_vms(&sim), vec![format!("hcp-{a}")]);

    // ResizeVm grows the boot volume.
    let resize = pb::ResizeVmRequest { vm_id: a.clone(), vcpus: 2, memory_mib: 1024, disk_gib: 3 };
    p.resize_vm(resize).await.unwrap();
    assert_eq!(p.get_volume(&boot).await.unwrap().size_gib, 3);

    // DeleteVm leaves both volumes, detached, with their sizes.
    assert!(p.delete_vm(&a).await.unwrap());
    let left = p.get_volume(&boot).await.unwrap();
    assert_eq!((left.vm_id.as_str(), left.slot, left.size_gib), ("", 0, 3));
    assert_eq!(p.get_volume(&data).await.unwrap().vm_id, "");
    assert_eq!(volume_files(&sim).len(), 2);

    // A second VM boots from it as it is: no image, the size kept.
    let b = uuid::Uuid::new_v4().to_string();
    let mut from_volume = with_volumes("b", Vec::new());
    from_volume.image = None;
    p.create_vm(create(&b, from_volume)).await.unwrap();
    let on_b = p.get_volume(&boot).await.unwrap();
    assert_eq!((on_b.vm_id.as_str(), on_b.slot, on_b.size_gib), (b.as_str(), 0, 3));
    assert_eq!(slot_of(&sim, &b, &boot_file).as_deref(), Some("0"));

    // Clean up.
    assert!(p.delete_vm(&b).await.unwrap());
    assert!(p.delete_volume(&boot).await.unwrap());
    assert!(p.delete_volume(&data).await.unwrap());
    assert!(volume_files(&sim).is_empty());
    assert!(hcp_vms(&sim).is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn volumes_go_to_their_storage_and_list_across_storages() {
    let sim = sim().await;
    let extra = "[volumes]\ndir = 'C:\\Hyper-V\\hcp\\vols'\nshared = true\n[volumes.storage]\ngold = 'C:\\Hyper-V\\hcp\\gold'\n";
    // The [volumes] table goes after the others: appended to the file.
    let text = format!("{}{extra}", toml(&sim, ""));
    let p = Hyperv::new(Config::from_toml(&text).unwrap()).await.unwrap();
    p.configure(
        [("username".to_owned(), USER.to_owned()), ("password".to_owned(), PASSWORD.to_owned())].into(),
    )
    .await
    .unwrap();
    assert!(!p.capabilities().await.unwrap().volumes_host_local);
    let mut ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for (id, storage) in ids.iter().zip(["", "gold", "gold"]) {
        let v = p
            .create_volume(pb::CreateVolumeRequest {
                volume_id: id.clone(),
                spec: Some(pb::VolumeSpec { size_gib: 2, storage: storage.into(), ..Default::default() }),
            })
            .await
            .unwrap();
        let dir = if storage.is_empty() { "vols" } else { "gold" };
        assert_eq!(v.native_id, format!("C:\\Hyper-V\\hcp\\{dir}\\hcp-vol-{id}.vhdx"));
    }
    // A file that is not HCP's is not listed.
    std::fs::write(sim.sim.disk_dir().join("gold").join("notes.vhdx"), b"x").unwrap();
    ids.sort();
    let page =
        p.list_volumes(pb::ListVolumesRequest { page_size: 2, page_token: String::new() }).await.unwrap();
    let rest = p
        .list_volumes(pb::ListVolumesRequest { page_size: 2, page_token: page.next_page_token.clone() })
        .await
        .unwrap();
    let listed: Vec<String> = page.volumes.iter().chain(&rest.volumes).map(|v| v.volume_id.clone()).collect();
    assert_eq!(listed, ids);
    assert!(rest.next_page_token.is_empty());
    for id in &ids {
        assert_eq!(p.get_volume(id).await.unwrap().size_gib, 2);
        assert!(p.delete_volume(id).await.unwrap());
    }
    assert!(p.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().volumes.is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn a_crash_in_a_volume_create_or_attach_converges_on_one_file_and_one_drive() {
    use hcp_proto::provider::compute_client::ComputeClient;
    use hcp_proto::provider::identity_client::IdentityClient;
    let sim = sim().await;
    let config = sim.sim.disk_dir().join("provider.toml");
    std::fs::write(&config, toml(&sim, "")).unwrap();
    // A provider process (with a failpoint), configured, as core reaches it.
    async fn connect(
        config: &std::path::Path,
        failpoint: Option<&str>,
    ) -> (tokio::process::Child, ComputeClient<tonic::transport::Channel>) {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcp-provider-hyperv"));
        cmd.arg("--config").arg(config).arg("--listen").arg("127.0.0.1:0").kill_on_drop(true);
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
        if let Some(f) = failpoint {
            cmd.env(hcp_provider_hyperv::FAILPOINTS_ENV, f);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(a) = l.split_whitespace().find_map(|w| w.strip_prefix("addr=")) {
                addr = Some(a.trim_matches('"').to_owned());
                break;
            }
            if let Some(i) = l.find("127.0.0.1:") {
                addr = Some(l[i..].split(|c: char| c.is_whitespace() || c == '"').next().unwrap().to_owned());
                break;
            }
        }
        let addr = addr.expect("the provider printed its address");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        IdentityClient::new(channel.clone())
            .configure(pb::ConfigureRequest {
                credentials: [
                    ("username".to_owned(), USER.to_owned()),
                    ("password".to_owned(), PASSWORD.to_owned()),
                ]
                .into(),
            })
            .await
            .unwrap();
        (child, ComputeClient::new(channel))
    }
    let p = provider(&sim, "").await;
    let vm = uuid::Uuid::new_v4().to_string();
    p.create_vm(pb::CreateVmRequest {
        vm_id: vm.clone(),
        spec: Some(spec("v", &["default"], None)),
        start: true,
    })
    .await
    .unwrap();
    let vol = uuid::Uuid::new_v4().to_string();
    let create = pb::CreateVolumeRequest {
        volume_id: vol.clone(),
        spec: Some(pb::VolumeSpec { size_gib: 4, ..Default::default() }),
    };
    let attach = pb::AttachVolumeRequest { volume_id: vol.clone(), vm_id: vm.clone(), slot: 7 };

    // Killed once the VHDX exists: the create repeated answers with it.
    let (mut child, mut c) = connect(&config, Some("volume:after-create")).await;
    assert!(c.create_volume(create.clone()).await.is_err(), "the provider should have died");
    assert!(!tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap().success());
    let (_child, mut c) = connect(&config, None).await;
    let made = c.create_volume(create.clone()).await.unwrap().into_inner();
    assert_eq!((made.volume_id.as_str(), made.size_gib), (vol.as_str(), 4));
    assert_eq!(volume_files(&sim), vec![format!("hcp-vol-{vol}.vhdx")]);

    // Killed between the drive and the VHDX: the attach repeated fills
    // that drive instead of adding a second.
    let (mut child, mut c) = connect(&config, Some("volume:after-drive")).await;
    assert!(c.attach_volume(attach.clone()).await.is_err(), "the provider should have died");
    assert!(!tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap().success());
    let drives_at_7 = || {
        sim.sim
            .vm(&format!("hcp-{vm}"))
            .unwrap()
            .devices
            .iter()
            .filter(|d| d.address_on_parent.as_deref() == Some("7"))
            .count()
    };
    assert_eq!(drives_at_7(), 1);
    let (_child, mut c) = connect(&config, None).await;
    let on = c.attach_volume(attach.clone()).await.unwrap().into_inner();
    assert_eq!((on.vm_id.as_str(), on.slot), (vm.as_str(), 7));
    assert_eq!(drives_at_7(), 1);
    assert_eq!(c.attach_volume(attach).await.unwrap().into_inner(), on);

    // A create with a new boot volume and a data volume, killed after the
    // boot volume's VHDX is made (not yet grown), once it is whole, after
    // the define and after the data volume's attach: the create repeated
    // gives one VM, one boot volume at location 0 grown to the flavor, and
    // the data volume once at its slot.
    let data = uuid::Uuid::new_v4().to_string();
    p.create_volume(pb::CreateVolumeRequest {
        volume_id: data.clone(),
        spec: Some(pb::VolumeSpec { size_gib: 1, ..Default::default() }),
    })
    .await
    .unwrap();
    let mut boots = Vec::new();
    for step in ["create:after-vhd", "create:after-boot-volume", "create:after-define", "create:after-volume"]
    {
        let (vm_b, boot) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
        let mut s = spec(step, &["default"], None);
        s.boot_volume_id = boot.clone();
        s.volumes = vec![pb::VolumeAttachment { volume_id: data.clone(), slot: 2 }];
        let req = pb::CreateVmRequest { vm_id: vm_b.clone(), spec: Some(s), start: false };
        let (mut child, mut c) = connect(&config, Some(step)).await;
        assert!(c.create_vm(req.clone()).await.is_err(), "{step}: the provider should have died");
        assert!(
            !tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap().success()
        );
        let (_child, mut c) = connect(&config, None).await;
        c.create_vm(req).await.unwrap_or_else(|s| panic!("{step}: the retried create: {s:?}"));
        boots.push(boot.clone());
        let b = p.get_volume(&boot).await.unwrap();
        assert_eq!((b.vm_id.as_str(), b.slot, b.size_gib), (vm_b.as_str(), 0, 2), "{step}");
        let d = p.get_volume(&data).await.unwrap();
        assert_eq!((d.vm_id.as_str(), d.slot), (vm_b.as_str(), 2), "{step}");
        let at = |slot: &str| {
            sim.sim
                .vm(&format!("hcp-{vm_b}"))
                .unwrap()
                .devices
                .iter()
                .filter(|d| d.address_on_parent.as_deref() == Some(slot))
                .count()
        };
        assert_eq!((at("0"), at("2")), (1, 1), "{step}: one drive at each slot");
        assert_eq!(volume_files(&sim).len(), boots.len() + 2, "{step}: one boot volume per create");
        assert!(p.delete_vm(&vm_b).await.unwrap());
    }

    // Clean up.
    for id in boots.iter().chain([&data]) {
        assert!(p.delete_volume(id).await.unwrap());
    }
    assert!(p.delete_vm(&vm).await.unwrap());
    assert!(p.delete_volume(&vol).await.unwrap());
    assert!(volume_files(&sim).is_empty());
    assert_no_violations(&sim);
}

// ---- images ----------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Bytes that start like a VHDX (its `vhdxfile` identifier), all the
/// simulator reads of a file it did not make.
fn vhdx_bytes() -> Vec<u8> {
    let mut data = b"vhdxfile".to_vec();
    data.resize(200 * 1024, 0);
    data
}

/// An ImportImage stream as core sends it: the header, then `data` in
/// chunks; `announced_sha256` is what the header claims.
async fn upload_of(
    image_id: &str,
    data: &[u8],
    announced_sha256: &str,
) -> hcp_provider_sdk::image::ImageUpload {
    use pb::import_image_chunk::Part;
    let mut parts = vec![Ok(pb::ImportImageChunk {
        part: Some(Part::Header(pb::ImportImageHeader {
            image_id: image_id.to_owned(),
            name: "test image".into(),
            format: pb::DiskFormat::Vhdx as i32,
            size_bytes: data.len() as u64,
            sha256: announced_sha256.to_owned(),
            min_disk_gib: 1,
        })),
    })];
    for c in data.chunks(64 * 1024) {
        parts.push(Ok(pb::ImportImageChunk { part: Some(Part::Data(c.to_vec())) }));
    }
    hcp_provider_sdk::image::ImageUpload::start(futures::stream::iter(parts)).await.expect("a valid header")
}

/// The files on the image share, by name.
fn share_files(sim: &TestSim) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&sim.share)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn an_imported_image_is_a_file_on_the_share_vms_are_made_on_and_delete_removes() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let caps = p.capabilities().await.unwrap();
    assert!(caps.supports_image_import && caps.supports_capture);
    assert_eq!(caps.image_formats, [pb::DiskFormat::Vhdx as i32]);
    let data = vhdx_bytes();
    let id = uuid::Uuid::new_v4().to_string();
    let info = p.import_image(upload_of(&id, &data, &sha256_hex(&data)).await).await.unwrap();
    let file = format!("hcp-image-{id}.vhdx");
    assert_eq!(info.source, format!("{SHARE_HOST}\\{file}"));
    assert_eq!(info.size_bytes, data.len() as u64);
    assert_eq!(share_files(&sim), vec![file.clone()], "the finished file only");
    assert_eq!(std::fs::read(sim.share.join(&file)).unwrap(), data);
    // Again: the stored image answers.
    assert_eq!(p.import_image(upload_of(&id, &data, &sha256_hex(&data)).await).await.unwrap(), info);

    // A VM on it: its own differencing disk has the share's file as parent.
    let vm_id = uuid::Uuid::new_v4().to_string();
    let mut s = spec("from-image", &["default"], None);
    s.image = Some(pb::ImageRef { name: "imported".into(), source: info.source.clone() });
    p.create_vm(pb::CreateVmRequest { vm_id: vm_id.clone(), spec: Some(s), start: false }).await.unwrap();
    let disk = std::fs::read_to_string(sim.sim.disk_dir().join(format!("hcp-{vm_id}.vhdx"))).unwrap();
    assert!(disk.contains(&file), "the VM's disk is made on the image: {disk}");
    assert!(p.delete_vm(&vm_id).await.unwrap());

    let req = pb::DeleteImageRequest { image_id: id, source: info.source };
    assert!(p.delete_image(req.clone()).await.unwrap());
    assert!(share_files(&sim).is_empty());
    assert!(!p.delete_image(req).await.unwrap());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn a_failed_import_leaves_nothing_on_the_share() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let data = vhdx_bytes();
    let id = uuid::Uuid::new_v4().to_string();
    // Bytes that are not the announced ones.
    let e = p.import_image(upload_of(&id, &data, &sha256_hex(b"other")).await).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(share_files(&sim).is_empty(), "{:?}", share_files(&sim));
    // The announced bytes, but not a virtual disk: the host cannot read it.
    let junk = vec![1u8; 64 * 1024];
    let e = p.import_image(upload_of(&id, &junk, &sha256_hex(&junk)).await).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(e.message.contains("cannot read"), "{e}");
    assert!(share_files(&sim).is_empty(), "{:?}", share_files(&sim));
    // The same id then imports.
    let info = p.import_image(upload_of(&id, &data, &sha256_hex(&data)).await).await.unwrap();
    assert!(p.delete_image(pb::DeleteImageRequest { image_id: id, source: info.source }).await.unwrap());
    assert!(share_files(&sim).is_empty());
    assert_no_violations(&sim);
}

#[tokio::test]
async fn capture_converts_the_stopped_vms_disk_onto_the_share_and_a_failed_job_leaves_nothing() {
    let sim = sim().await;
    let p = provider(&sim, "").await;
    let vm_id = uuid::Uuid::new_v4().to_string();
    p.create_vm(pb::CreateVmRequest {
        vm_id: vm_id.clone(),
        spec: Some(spec("cap", &["default"], None)),
        start: true,
    })
    .await
    .unwrap();
    let image_id = uuid::Uuid::new_v4().to_string();
    let req =
        pb::CaptureImageRequest { vm_id: vm_id.clone(), image_id: image_id.clone(), name: "cap".into() };
    let e = p.capture_image(req.clone()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState, "{e}");
    p.stop_vm(pb::StopVmRequest { vm_id: vm_id.clone(), force: true, timeout_seconds: 1 }).await.unwrap();

    // The host's conversion job fails: nothing on the share.
    let mut f = sim.sim.faults();
    f.job_failures
        .insert("ConvertVirtualHardDisk".into(), "The system failed to convert (simulated).".into());
    sim.sim.set_faults(f);
    let e = p.capture_image(req.clone()).await.unwrap_err();
    assert!(e.message.contains("failed to convert"), "{e}");
    assert!(share_files(&sim).is_empty(), "{:?}", share_files(&sim));
    sim.sim.set_faults(Faults::default());

    let info = p.capture_image(req.clone()).await.unwrap();
    let file = format!("hcp-image-{image_id}.vhdx");
    assert_eq!(info.source, format!("{SHARE_HOST}\\{file}"));
    assert_eq!(share_files(&sim), vec![file.clone()]);
    // A dynamic VHDX of its own (the VM's differencing disk merged), not a
    // child of the VM's parent.
    let made = std::fs::read_to_string(sim.share.join(&file)).unwrap();
    assert!(made.contains("\"kind\":3") && made.contains("\"parent\":null"), "{made}");
    assert_eq!(p.capture_image(req).await.unwrap(), info, "idempotent");
    let vm = p.get_vm(&vm_id).await.unwrap();
    assert_eq!(vm.power_state, pb::PowerState::Shutoff as i32, "the VM is left as it was");
    assert!(p.delete_vm(&vm_id).await.unwrap());
    assert!(p.delete_image(pb::DeleteImageRequest { image_id, source: info.source }).await.unwrap());
    assert!(share_files(&sim).is_empty());
    assert_no_violations(&sim);
}
