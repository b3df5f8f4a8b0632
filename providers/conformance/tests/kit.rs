//! The conformance kit against the simulator (all capabilities, none,
//! resize without hot resize, volumes with and without their optional
//! flags), and against deliberately broken providers it must reject: a
//! create that is not idempotent, a delete that leaks, a resize half applied
//! before it is refused, MACs in upper case, a DeleteVm that takes its
//! volumes with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hcp_proto::sim::sim_control_client::SimControlClient;
use hcp_provider_conformance::{HookFuture, Hooks, Options, Outcome, run};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, ServeConfig, pb};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Starts the simulator in this process with `caps`; returns its endpoint.
async fn sim(caps: &str) -> String {
    sim_with_hosts(caps, hcp_provider_sim::default_hosts()).await
}

/// Starts the simulator with `caps` and `hosts`; returns its endpoint.
async fn sim_with_hosts(caps: &str, hosts: Vec<hcp_provider_sim::SimHost>) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let config = hcp_provider_sim::SimConfig {
        listen: any_port(),
        capabilities: hcp_provider_sim::parse_capabilities(caps).unwrap(),
        hosts,
        ..Default::default()
    };
    tokio::spawn(hcp_provider_sim::run(config, std::future::pending(), move |addr: String| {
        let _ = tx.send(addr);
    }));
    format!("http://{}", rx.await.unwrap())
}

/// Starts `sim` in this process, with its control service; returns its
/// endpoint.
async fn serve_sim(sim: hcp_provider_sim::Sim) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let control = sim.control();
    tokio::spawn(hcp_provider_sdk::serve_with(
        sim,
        control,
        ServeConfig { listen: any_port(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    format!("http://{}", rx.await.unwrap())
}

/// The simulator's control service drives a create into failing after its
/// effect (a lost reply), which is how the kit's half-made create check
/// runs against it; with the simulator itself at hand, the kit also looks
/// at the hypervisor's VMs and volumes.
struct SimHooks(String, Option<hcp_provider_sim::Sim>);

impl Hooks for SimHooks {
    fn hypervisor_vm_ids(&self) -> Option<HookFuture<'_, Vec<String>>> {
        let sim = self.1.clone()?;
        Some(Box::pin(async move { Ok(sim.vm_ids()) }))
    }

    fn hypervisor_volume_ids(&self) -> Option<HookFuture<'_, Vec<String>>> {
        let sim = self.1.clone()?;
        Some(Box::pin(async move { Ok(sim.volume_ids()) }))
    }

    fn fail_next_create_after_first_effect(&self) -> Option<HookFuture<'_, ()>> {
        Some(Box::pin(async move {
            let mut c = SimControlClient::connect(self.0.clone()).await.map_err(|e| e.to_string())?;
            let fault = hcp_proto::sim::Fault {
                operation: "CreateVm".into(),
                code: "UNAVAILABLE".into(),
                count: 1,
                message: "the reply was lost".into(),
                after_effect: true,
            };
            c.inject_fault(hcp_proto::sim::InjectFaultRequest { fault: Some(fault) })
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }))
    }
}

#[tokio::test]
async fn the_simulator_conforms() {
    let caps = "cloud_init,snapshot,console_vnc,console_log,resize,hot_resize,live_migration,cold_migration,\
                volumes,hot_attach,volume_extend_in_use,image_import,capture";
    let the_sim = hcp_provider_sim::Sim::new(&hcp_provider_sim::SimConfig {
        capabilities: hcp_provider_sim::parse_capabilities(caps).unwrap(),
        ..Default::default()
    });
    let endpoint = serve_sim(the_sim.clone()).await;
    let mut options = Options::new(&endpoint);
    options.network = "default".into();
    options.hooks = Some(Arc::new(SimHooks(endpoint.clone(), Some(the_sim.clone()))));
    let report = run(options).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.count(|o| *o == Outcome::Pass) >= 10);
    // Consoles it does not declare are skipped, visibly, and must be refused.
    let skipped: Vec<_> = report
        .checks
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Skip(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(skipped, vec!["spice console", "rdp console", "serial console"]);
    for check in [
        "snapshots:",
        "resize: stopped and running",
        "interfaces:",
        "hosts:",
        "create on a named host",
        "live migration:",
        "cold migration:",
        "image import: bytes checked",
        "capture: a stopped VM only",
        "volumes: create is idempotent",
        "volumes: extend grows",
        "volumes: attach to a stopped VM",
        "volumes: DeleteVolume of an attached volume",
        "volumes: detach",
        "volumes: hot attach and detach",
        "volumes: extend while attached to a running VM",
        "volumes: DeleteVm leaves an attached volume behind",
        "volumes: cleanup",
    ] {
        assert!(report.checks.iter().any(|(n, o)| n.starts_with(check) && *o == Outcome::Pass), "{check}");
    }
    assert!(
        report
            .checks
            .iter()
            .any(|(n, o)| n.starts_with("a create failed after its first effect") && *o == Outcome::Pass),
        "{report}"
    );
    // The day-2 checks each show in the report, and the simulator saw the
    // flags they send: hard and soft reboots, forced and graceful stops.
    for check in
        ["lifecycle: start", "reboot: soft and hard", "stop: graceful with a timeout", "stop: forced"]
    {
        assert!(report.checks.iter().any(|(n, o)| n.starts_with(check) && *o == Outcome::Pass), "{check}");
    }
    let mut control = SimControlClient::connect(endpoint).await.unwrap();
    let stats = control.stats(hcp_proto::sim::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.hard_reboots >= 1 && stats.soft_reboots >= 1, "{stats:?}");
    assert!(stats.forced_stops >= 2 && stats.graceful_stops >= 2, "{stats:?}");
    // Every volume the kit made was made once and is gone.
    assert!(stats.volume_creations.len() >= 6, "{stats:?}");
    assert!(stats.volume_creations.values().all(|n| *n == 1), "{stats:?}");
    assert_eq!(stats.volume_count, 0, "{stats:?}");
    assert!(the_sim.vm_ids().is_empty());
}

#[tokio::test]
async fn volumes_without_hot_attach_or_extend_in_use_must_refuse_them_and_host_local_ones_work() {
    let endpoint = sim("volumes,volumes_host_local,max_volumes_per_vm=2").await;
    let report = run(Options::new(&endpoint)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    let outcome = |name: &str| report.checks.iter().find(|(n, _)| n == name).map(|(_, o)| o.clone());
    for refused in [
        "volumes: attach to a running VM refused without supports_hot_attach",
        "volumes: extend in use refused without supports_volume_extend_in_use",
    ] {
        assert_eq!(outcome(refused), Some(Outcome::Pass), "{refused}");
    }
    assert_eq!(
        outcome("volumes: hot attach and detach on a running VM"),
        Some(Outcome::Skip("the provider does not declare supports_hot_attach".into()))
    );
    assert_eq!(
        outcome("volumes: extend while attached to a running VM"),
        Some(Outcome::Skip("the provider does not declare supports_volume_extend_in_use".into()))
    );
}

#[tokio::test]
async fn without_volumes_every_volume_check_is_skipped_with_the_reason() {
    let report = run(Options::new(&sim("cloud_init,resize").await)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    let volume_checks: Vec<_> = report.checks.iter().filter(|(n, _)| n.starts_with("volumes:")).collect();
    assert_eq!(volume_checks.len(), 10, "{report}");
    let why = Outcome::Skip("the provider does not declare supports_volumes".into());
    assert!(volume_checks.iter().all(|(_, o)| *o == why), "{report}");
    assert!(
        report.checks.iter().any(|(n, o)| n == "volumes refused as UNIMPLEMENTED" && *o == Outcome::Pass)
    );
}

#[tokio::test]
async fn without_hot_resize_a_running_resize_must_be_refused_and_the_skip_says_why() {
    let report = run(Options::new(&sim("resize").await)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert!(report.checks.iter().any(|(n, o)| {
        n == "resize: stopped, idempotent, disks only grow; running refused" && *o == Outcome::Pass
    }));
    let hot = report.checks.iter().find(|(n, _)| n == "hot resize").map(|(_, o)| o.clone());
    assert_eq!(hot, Some(Outcome::Skip("the provider does not declare supports_hot_resize".into())));
}

#[tokio::test]
async fn a_provider_without_capabilities_conforms_with_skips() {
    let report = run(Options::new(&sim("").await)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    // The four consoles and the console log, snapshots, resize and both
    // migrations it lacks, the half-made create (no hooks), the NICs (no
    // network given), the ten volume checks, image import and capture.
    assert_eq!(report.count(|o| matches!(o, Outcome::Skip(_))), 23, "{report}");
    for refused in ["image import refused as UNIMPLEMENTED", "capture refused as UNIMPLEMENTED"] {
        assert!(
            report.checks.iter().any(|(n, o)| n == refused && *o == Outcome::Pass),
            "{refused}: {report}"
        );
    }
    assert!(
        report.checks.iter().any(|(n, o)| n == "console log refused as UNIMPLEMENTED" && *o == Outcome::Pass)
    );
    assert!(
        report.checks.iter().any(|(n, o)| n == "migration refused without its flag" && *o == Outcome::Pass)
    );
    assert!(report.checks.iter().any(|(n, o)| n == "resize refused as UNIMPLEMENTED" && *o == Outcome::Pass));
    assert!(
        report
            .checks
            .iter()
            .any(|(n, o)| n == "user data refused without supports_cloud_init" && *o == Outcome::Pass)
    );
}

#[tokio::test]
async fn a_provider_without_hosts_skips_the_host_checks_and_refuses_moves() {
    let report = run(Options::new(&sim_with_hosts("live_migration", Vec::new()).await)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    let why = Outcome::Skip("the provider reports no hosts (ListHosts is UNIMPLEMENTED)".into());
    for check in ["hosts:", "create on a named host", "live migration:", "cold migration:"] {
        let got = report.checks.iter().find(|(n, _)| n.starts_with(check)).map(|(_, o)| o.clone());
        assert_eq!(got, Some(why.clone()), "{check}");
    }
    assert!(report.checks.iter().any(|(n, o)| n == "migration without hosts refused" && *o == Outcome::Pass));
}

#[tokio::test]
async fn one_host_up_is_not_enough_to_move() {
    let hosts = hcp_provider_sim::hosts(1, 8, 8192);
    let report =
        run(Options::new(&sim_with_hosts("live_migration,cold_migration", hosts).await)).await.unwrap();
    assert!(report.passed(), "{report}");
    let got = report.checks.iter().find(|(n, _)| n.starts_with("live migration:")).map(|(_, o)| o.clone());
    assert_eq!(got, Some(Outcome::Skip("the provider reports 1 host(s) up; moves need two".into())));
    assert!(report.checks.iter().any(|(n, o)| n.starts_with("hosts:") && *o == Outcome::Pass));
}

/// Makes a new VM on every CreateVm, even for a known id; with `leaky`,
/// DeleteVm also answers that it deleted without deleting.
#[derive(Default, Clone)]
struct Broken {
    vms: Arc<Mutex<Vec<(String, String, pb::PowerState)>>>,
    leaky: bool,
}

impl Broken {
    fn find(&self, id: &str) -> Result<pb::VmInfo, ProviderError> {
        let vms = self.vms.lock().unwrap();
        vms.iter()
            .rev()
            .find(|(v, _, _)| v == id)
            .map(|(v, n, p)| pb::VmInfo {
                vm_id: v.clone(),
                native_id: n.clone(),
                power_state: *p as i32,
                ..Default::default()
            })
            .ok_or_else(|| ProviderError::not_found(id))
    }

    fn set(&self, id: &str, power: pb::PowerState) -> Result<pb::VmInfo, ProviderError> {
        let mut vms = self.vms.lock().unwrap();
        let mut found = false;
        for vm in vms.iter_mut().filter(|(v, _, _)| v == id) {
            vm.2 = power;
            found = true;
        }
        drop(vms);
        if !found {
            return Err(ProviderError::not_found(id));
        }
        self.find(id)
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Broken {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("broken.example", "0.0.1", "broken")
    }
    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(pb::Capabilities::default())
    }
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.spec.as_ref().is_some_and(|s| s.user_data.is_some()) {
            return Err(ProviderError::new(ErrorKind::Unsupported, "no cloud-init"));
        }
        let native = uuid::Uuid::new_v4().to_string();
        self.vms.lock().unwrap().push((req.vm_id.clone(), native, pb::PowerState::Shutoff));
        self.find(&req.vm_id)
    }
    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.find(vm_id)
    }
    async fn list_vms(&self, _: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let vms = self.vms.lock().unwrap();
        let vms = vms
            .iter()
            .map(|(v, n, p)| pb::VmInfo {
                vm_id: v.clone(),
                native_id: n.clone(),
                power_state: *p as i32,
                ..Default::default()
            })
            .collect();
        Ok(pb::ListVmsResponse { vms, next_page_token: String::new() })
    }
    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.set(vm_id, pb::PowerState::Running)
    }
    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.set(&req.vm_id, pb::PowerState::Shutoff)
    }
    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm = self.find(&req.vm_id)?;
        if vm.power_state != pb::PowerState::Running as i32 {
            return Err(ProviderError::new(ErrorKind::InvalidState, "not running"));
        }
        Ok(vm)
    }
    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        if self.leaky {
            return Ok(self.find(vm_id).is_ok());
        }
        let mut vms = self.vms.lock().unwrap();
        let before = vms.len();
        vms.retain(|(v, _, _)| v != vm_id);
        Ok(vms.len() != before)
    }
    async fn get_console(&self, _: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        Err(ProviderError::new(ErrorKind::Unsupported, "no consoles"))
    }
}

#[tokio::test]
async fn a_provider_whose_create_is_not_idempotent_fails_clearly() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let broken = Broken::default();
    tokio::spawn(hcp_provider_sdk::serve(
        broken.clone(),
        ServeConfig { listen: any_port(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let endpoint = format!("http://{}", rx.await.unwrap());
    let report = run(Options::new(&endpoint)).await.unwrap();
    println!("{report}");
    assert!(!report.passed());
    let failures: HashMap<&str, &str> = report.failures().into_iter().collect();
    let msg = failures.get("create is idempotent").expect("the idempotency check fails");
    assert!(msg.contains("not idempotent"), "{msg}");
    // The kit cleaned up after itself even so.
    assert!(broken.vms.lock().unwrap().is_empty(), "left behind: {:?}", broken.vms.lock().unwrap());
}

#[tokio::test]
async fn a_provider_that_leaks_vms_fails_the_cleanup_check() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let leaky = Broken { leaky: true, ..Default::default() };
    tokio::spawn(hcp_provider_sdk::serve(
        leaky.clone(),
        ServeConfig { listen: any_port(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let report = run(Options::new(&format!("http://{}", rx.await.unwrap()))).await.unwrap();
    println!("{report}");
    let failures: HashMap<&str, &str> = report.failures().into_iter().collect();
    let msg = failures
        .get("cleanup: nothing left in the inventory or on the hypervisor")
        .expect("the cleanup check fails");
    assert!(msg.contains("still lists"), "{msg}");
    assert!(!leaky.vms.lock().unwrap().is_empty(), "the provider did leak");
}

/// The simulator with two day-2 mistakes: a resize refused for its disk
/// has already changed the vCPUs, and MACs are reported in upper case.
struct Sloppy(hcp_provider_sim::Sim);

#[hcp_provider_sdk::async_trait]
impl Provider for Sloppy {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("sloppy.example", "0.0.1", "sloppy")
    }
    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        self.0.capabilities().await
    }
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.create_vm(req).await
    }
    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let mut vm = self.0.get_vm(vm_id).await?;
        for nic in &mut vm.interfaces {
            nic.mac = nic.mac.to_ascii_uppercase();
        }
        Ok(vm)
    }
    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        self.0.list_vms(req).await
    }
    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.0.start_vm(vm_id).await
    }
    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.stop_vm(req).await
    }
    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.reboot_vm(req).await
    }
    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.resize_vm(pb::ResizeVmRequest { disk_gib: 0, ..req.clone() }).await?;
        self.0.resize_vm(req).await
    }
    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        self.0.delete_vm(vm_id).await
    }
    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        self.0.get_console(req).await
    }
}

#[tokio::test]
async fn half_applied_resizes_and_upper_case_macs_fail_by_name() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let config = hcp_provider_sim::SimConfig {
        capabilities: hcp_provider_sim::parse_capabilities("resize").unwrap(),
        ..Default::default()
    };
    tokio::spawn(hcp_provider_sdk::serve(
        Sloppy(hcp_provider_sim::Sim::new(&config)),
        ServeConfig { listen: any_port(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let mut options = Options::new(&format!("http://{}", rx.await.unwrap()));
    options.network = "default".into();
    let report = run(options).await.unwrap();
    println!("{report}");
    let failures: HashMap<&str, &str> = report.failures().into_iter().collect();
    let resize = failures
        .get("resize: stopped, idempotent, disks only grow; running refused")
        .expect("the resize check fails");
    assert!(resize.contains("refused for its disk still changed the vCPUs"), "{resize}");
    let nics = failures
        .get("interfaces: one well-formed NIC per network, stable MACs")
        .expect("the NIC check fails");
    assert!(nics.contains("is not lower-case"), "{nics}");
    assert_eq!(failures.len(), 2, "{report}");
}

/// The simulator with DeleteVm that takes the VM's volumes with it, which
/// the contract forbids.
struct VolumeEater(hcp_provider_sim::Sim);

#[hcp_provider_sdk::async_trait]
impl Provider for VolumeEater {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("volume-eater.example", "0.0.1", "volume-eater")
    }
    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        self.0.capabilities().await
    }
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.create_vm(req).await
    }
    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.0.get_vm(vm_id).await
    }
    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        self.0.list_vms(req).await
    }
    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.0.start_vm(vm_id).await
    }
    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.stop_vm(req).await
    }
    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.0.reboot_vm(req).await
    }
    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let all = self.0.list_volumes(pb::ListVolumesRequest::default()).await?;
        // Its data volumes (a boot volume the sim detaches only with its VM).
        for v in all.volumes.into_iter().filter(|v| v.vm_id == vm_id && v.slot > 0) {
            let detach = pb::DetachVolumeRequest { volume_id: v.volume_id.clone(), vm_id: vm_id.to_owned() };
            self.0.detach_volume(detach).await?;
            self.0.delete_volume(&v.volume_id).await?;
        }
        self.0.delete_vm(vm_id).await
    }
    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        self.0.get_console(req).await
    }
    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.0.create_volume(req).await
    }
    async fn get_volume(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        self.0.get_volume(volume_id).await
    }
    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        self.0.list_volumes(req).await
    }
    async fn extend_volume(&self, req: pb::ExtendVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.0.extend_volume(req).await
    }
    async fn attach_volume(&self, req: pb::AttachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.0.attach_volume(req).await
    }
    async fn detach_volume(&self, req: pb::DetachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.0.detach_volume(req).await
    }
    async fn delete_volume(&self, volume_id: &str) -> Result<bool, ProviderError> {
        self.0.delete_volume(volume_id).await
    }
}

#[tokio::test]
async fn a_delete_vm_that_takes_its_volumes_fails_by_name() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Only what VolumeEater passes on is declared.
    let the_sim = hcp_provider_sim::Sim::new(&hcp_provider_sim::SimConfig {
        capabilities: hcp_provider_sim::parse_capabilities("volumes,hot_attach,volume_extend_in_use")
            .unwrap(),
        ..Default::default()
    });
    tokio::spawn(hcp_provider_sdk::serve(
        VolumeEater(the_sim.clone()),
        ServeConfig { listen: any_port(), ..Default::default() },
        std::future::pending(),
        move |a| {
            let _ = tx.send(a);
        },
    ));
    let report = run(Options::new(&format!("http://{}", rx.await.unwrap()))).await.unwrap();
    println!("{report}");
    let failures: HashMap<&str, &str> = report.failures().into_iter().collect();
    let msg = failures
        .get("volumes: DeleteVm leaves an attached volume behind, detached")
        .expect("the DeleteVm check fails");
    assert!(msg.contains("DeleteVm took the volume with it"), "{msg}");
    assert_eq!(failures.len(), 1, "{report}");
    // The kit cleaned up after itself even so.
    assert!(the_sim.volume_ids().is_empty() && the_sim.vm_ids().is_empty());
}

#[tokio::test]
async fn a_serial_console_carries_the_guests_line_and_its_ticket_opens_it_once() {
    // `run` starts the simulator's serial relay: the kit reaches the
    // guest's shell through it.
    let report = run(Options::new(&sim("console_serial,console_log").await)).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    for check in ["serial console", "console log"] {
        assert!(report.checks.iter().any(|(n, o)| n == check && *o == Outcome::Pass), "{check}: {report}");
    }
}
