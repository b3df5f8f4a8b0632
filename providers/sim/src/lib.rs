//! The simulated hypervisor: an in-memory provider that speaks
//! `hcp.provider.v1` through the SDK, like a real adapter, plus the
//! `hcp.sim.v1.SimControl` service for tests and demos: per-operation
//! latency, injected failures (before or after the effect, to model a lost
//! reply), out-of-band changes (power state, a VM removed behind HCP's back,
//! an unknown VM, a volume removed, attached or detached behind HCP's
//! back), call counters that prove exactly-once creation of VMs and
//! volumes, several hosts (with migration between them, and hosts that
//! fail), and volumes (`volumes`: block storage that outlives VMs).
//!
//! It is a product part (the quick start runs it), never a stand-in for
//! testing a real adapter.

pub mod cli;
mod guest;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcp_proto::sim;
use hcp_proto::sim::sim_control_server::{SimControl, SimControlServer};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, ServeConfig, pb};

use crate::volumes::SimVolume;
pub use crate::volumes::{BootVolume, DEFAULT_STORAGE, VmVolumes, VolumeSlot};

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Capability flags to report.
    pub capabilities: pb::Capabilities,
    /// Latency added to every Compute call.
    pub latency: Duration,
    /// Protocol revisions to announce (tests of version negotiation).
    pub protocol_versions: Vec<String>,
    /// Report "needs configuration" until credentials are configured.
    pub require_credentials: bool,
    /// Serve on a unix socket instead of TCP.
    pub unix_socket: Option<std::path::PathBuf>,
    /// Serve TLS.
    pub tls: Option<hcp_provider_sdk::ServerTls>,
    /// The simulated hosts.
    pub hosts: Vec<SimHost>,
    /// The storages volumes can go to (`VolumeSpec.storage`); an empty
    /// storage in a spec means [`DEFAULT_STORAGE`], which is always known.
    pub storages: Vec<String>,
}

/// A simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimHost {
    /// Name.
    pub name: String,
    /// Physical vCPUs.
    pub vcpus: u32,
    /// Physical memory.
    pub memory_mib: u64,
}

/// `n` hosts named `sim-host-1..n` of the given size.
pub fn hosts(n: u32, vcpus: u32, memory_mib: u64) -> Vec<SimHost> {
    (1..=n).map(|i| SimHost { name: format!("sim-host-{i}"), vcpus, memory_mib }).collect()
}

/// Hosts the simulator has unless told otherwise: three, large enough for
/// benchmarks of tens of thousands of small VMs.
pub fn default_hosts() -> Vec<SimHost> {
    hosts(3, 4096, 16 * 1024 * 1024)
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            capabilities: default_capabilities(),
            latency: Duration::ZERO,
            protocol_versions: vec![hcp_proto::PROVIDER_PROTOCOL_VERSION.to_owned()],
            require_credentials: false,
            unix_socket: None,
            tls: None,
            hosts: default_hosts(),
            storages: vec![DEFAULT_STORAGE.to_owned()],
        }
    }
}

/// The flags the simulator reports unless told otherwise.
pub fn default_capabilities() -> pb::Capabilities {
    pb::Capabilities {
        supports_cloud_init: true,
        supports_snapshot: true,
        supports_console_vnc: true,
        supports_console_serial: true,
        supports_console_log: true,
        supports_snapshot_running: true,
        supports_resize: true,
        supports_hot_resize: true,
        supports_live_migration: true,
        supports_cold_migration: true,
        supports_volumes: true,
        supports_hot_attach: true,
        supports_volume_extend_in_use: true,
        volumes_host_local: false,
        max_volumes_per_vm: DEFAULT_MAX_VOLUMES_PER_VM,
        supports_image_import: true,
        supports_capture: true,
        image_formats: SIM_IMAGE_FORMATS.iter().map(|f| *f as i32).collect(),
        ..Default::default()
    }
}

/// The formats the simulator's ImportImage takes, preferred first.
pub const SIM_IMAGE_FORMATS: [pb::DiskFormat; 2] = [pb::DiskFormat::Qcow2, pb::DiskFormat::Raw];

/// Data volume slots per VM the simulator reports with `volumes` unless
/// told otherwise.
pub const DEFAULT_MAX_VOLUMES_PER_VM: u32 = 16;

/// A capability name [`parse_capabilities`] does not know, or a value it
/// cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {name:?}")]
pub struct UnknownCapability {
    /// The name as given.
    pub name: String,
}

/// Parses a comma-separated list of capability names (`cloud_init,
/// console_vnc, ...`, with or without the `supports_` prefix), and
/// `max_volumes_per_vm=N`. With `volumes` and no `max_volumes_per_vm`,
/// [`DEFAULT_MAX_VOLUMES_PER_VM`] (the contract wants at least 1).
pub fn parse_capabilities(list: &str) -> Result<pb::Capabilities, UnknownCapability> {
    let mut c = pb::Capabilities::default();
    let mut max_volumes = None;
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(n) = raw.strip_prefix("max_volumes_per_vm=") {
            let n = n.parse::<u32>().map_err(|_| UnknownCapability { name: raw.to_owned() })?;
            max_volumes = Some(n);
            continue;
        }
        let name = raw.strip_prefix("supports_").unwrap_or(raw);
        let flag = match name {
            "cloud_init" => &mut c.supports_cloud_init,
            "snapshot" => &mut c.supports_snapshot,
            "snapshot_running" => &mut c.supports_snapshot_running,
            "live_migration" => &mut c.supports_live_migration,
            "console_vnc" => &mut c.supports_console_vnc,
            "console_spice" => &mut c.supports_console_spice,
            "console_rdp" => &mut c.supports_console_rdp,
            "console_serial" => &mut c.supports_console_serial,
            "console_log" => &mut c.supports_console_log,
            "gpu_passthrough" => &mut c.supports_gpu_passthrough,
            "resize" => &mut c.supports_resize,
            "hot_resize" => &mut c.supports_hot_resize,
            "cold_migration" => &mut c.supports_cold_migration,
            "volumes" => &mut c.supports_volumes,
            "hot_attach" => &mut c.supports_hot_attach,
            "volume_extend_in_use" => &mut c.supports_volume_extend_in_use,
            "volumes_host_local" => &mut c.volumes_host_local,
            "image_import" => &mut c.supports_image_import,
            "capture" => &mut c.supports_capture,
            other => return Err(UnknownCapability { name: other.to_owned() }),
        };
        *flag = true;
    }
    c.max_volumes_per_vm = match max_volumes {
        Some(n) => n,
        None if c.supports_volumes => DEFAULT_MAX_VOLUMES_PER_VM,
        None => 0,
    };
    if c.supports_image_import {
        c.image_formats = SIM_IMAGE_FORMATS.iter().map(|f| *f as i32).collect();
    }
    Ok(c)
}

#[derive(Debug, Clone, Default)]
struct SimVm {
    native_id: String,
    power: pb::PowerState,
    vcpus: u32,
    memory_mib: u32,
    disk_gib: u32,
    /// Per NIC: what the network is here (the backing core sent, or the
    /// network name when it sent none).
    nics: Vec<String>,
    /// The host it is on.
    host: String,
    /// The guest's hostname.
    hostname: String,
    /// What the guest wrote on its serial port.
    serial: guest::SerialLog,
    /// Its VNC password (made at the first console asked for).
    vnc_password: String,
}

#[derive(Debug, Clone)]
struct ActiveFault {
    fault: sim::Fault,
    /// Failures left; None = until cleared.
    left: Option<u32>,
}

#[derive(Default)]
struct State {
    vms: BTreeMap<String, SimVm>,
    faults: Vec<ActiveFault>,
    latency: HashMap<String, Duration>,
    calls: HashMap<String, u64>,
    creations: HashMap<String, u32>,
    next_native: u64,
    in_flight: HashMap<String, u32>,
    overlapping_calls: u64,
    busy_micros: u64,
    credentials: Option<HashMap<String, String>>,
    /// Per VM: snapshot id -> (name, native id, power state recorded).
    snapshots: HashMap<String, BTreeMap<String, (String, String, pb::PowerState)>>,
    hard_reboots: u64,
    soft_reboots: u64,
    forced_stops: u64,
    graceful_stops: u64,
    /// Host name -> (spec, up).
    hosts: BTreeMap<String, (SimHost, bool)>,
    /// Volume id -> volume.
    volumes: BTreeMap<String, SimVolume>,
    /// Volumes ever created per id (boot volumes a CreateVm made too).
    volume_creations: HashMap<String, u32>,
    /// The storages volumes can go to.
    storages: Vec<String>,
    /// The SSH keys each VM was created with (its spec's, newline-joined),
    /// for tests to read through `Stats`.
    ssh_keys: HashMap<String, String>,
    /// Image id -> image.
    images: BTreeMap<String, sim::SimImage>,
    /// The image source each VM was created from (its spec's).
    image_sources: HashMap<String, String>,
}

impl State {
    /// The host a new VM goes to: the one asked for (known and up), else
    /// the up host with the fewest VMs.
    fn host_for(&self, asked: &str) -> Result<String, ProviderError> {
        if self.hosts.is_empty() {
            return Ok(String::new());
        }
        if !asked.is_empty() {
            return match self.hosts.get(asked) {
                None => Err(ProviderError::new(ErrorKind::InvalidArgument, format!("no host {asked}"))),
                Some((_, false)) => {
                    Err(ProviderError::new(ErrorKind::InvalidState, format!("host {asked} is down")))
                }
                Some(_) => Ok(asked.to_owned()),
            };
        }
        self.hosts
            .iter()
            .filter(|(_, (_, up))| *up)
            .min_by_key(|(name, _)| self.vms.values().filter(|v| &v.host == *name).count())
            .map(|(name, _)| name.clone())
            .ok_or_else(|| ProviderError::new(ErrorKind::Unavailable, "every host is down"))
    }

    fn host_up(&self, name: &str) -> bool {
        self.hosts.get(name).is_none_or(|(_, up)| *up)
    }

    /// A VM added out of band goes to the first host.
    fn first_host(&self) -> String {
        self.hosts.keys().next().cloned().unwrap_or_default()
    }
}

/// Runs `$effect` behind the call's accounting, latency and injected
/// fault (before the effect, or after it: a lost reply).
macro_rules! fault_gate {
    ($self:ident, $op:literal, $vm:expr, $effect:expr) => {{
        let (_in_flight, before, after) = $self.enter($op, $vm).await;
        if let Some(e) = before {
            return Err(e);
        }
        let result = $effect;
        if let Some(e) = after {
            return Err(e);
        }
        result
    }};
}

/// Marks a call for one VM as in flight until dropped, and adds its
/// duration to the busy time.
struct InFlight {
    state: Arc<Mutex<State>>,
    vm_id: String,
    started: std::time::Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.busy_micros += self.started.elapsed().as_micros() as u64;
        if let Some(n) = s.in_flight.get_mut(&self.vm_id) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.vm_id);
            }
        }
    }
}

/// The simulator; clones share state.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    capabilities: pb::Capabilities,
    default_latency: Duration,
    protocol_versions: Vec<String>,
    require_credentials: bool,
    /// The serial console relay, when [`run`] started one.
    serial: Arc<std::sync::OnceLock<Arc<hcp_provider_sdk::serial::SerialRelay>>>,
    /// The VNC server's port, when [`run`] started one.
    vnc: Arc<std::sync::OnceLock<u16>>,
}

impl SimVm {
    /// The guest boots: its banner on the serial port.
    fn boot(&mut self) {
        self.serial.write(guest::boot_banner(&self.hostname, &self.native_id).as_bytes());
    }
}

#[hcp_provider_sdk::async_trait]
impl hcp_provider_sdk::serial::SerialPorts for Sim {
    async fn open_serial(
        &self,
        vm_id: &str,
    ) -> Result<Box<dyn hcp_provider_sdk::serial::SerialStream>, ProviderError> {
        let hostname = {
            let s = self.lock();
            let vm = s.vms.get(vm_id).ok_or_else(|| ProviderError::not_found(vm_id))?;
            if vm.power != pb::PowerState::Running {
                return Err(ProviderError::new(ErrorKind::InvalidState, "vm is not running"));
            }
            vm.hostname.clone()
        };
        let sink = guest::sink(self.state.clone(), vm_id.to_owned(), |s: &mut State, id| {
            s.vms.get_mut(id).map(|vm| &mut vm.serial)
        });
        Ok(guest::shell(hostname, sink))
    }
}

impl Sim {
    /// Creates an empty simulator.
    pub fn new(config: &SimConfig) -> Self {
        let state = State {
            hosts: config.hosts.iter().map(|h| (h.name.clone(), (h.clone(), true))).collect(),
            storages: std::iter::once(DEFAULT_STORAGE.to_owned())
                .chain(config.storages.iter().cloned())
                .collect(),
            ..State::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            capabilities: config.capabilities.clone(),
            default_latency: config.latency,
            protocol_versions: config.protocol_versions.clone(),
            require_credentials: config.require_credentials,
            serial: Arc::default(),
            vnc: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the call, sleeps the configured latency, and returns the
    /// injected fault for `op`, if any, split by when it applies.
    async fn enter(&self, op: &str, vm_id: &str) -> (InFlight, Option<ProviderError>, Option<ProviderError>) {
        let (latency, guard) = {
            let mut s = self.lock();
            *s.calls.entry(op.to_owned()).or_default() += 1;
            let n = s.in_flight.entry(vm_id.to_owned()).or_default();
            *n += 1;
            if *n > 1 && !vm_id.is_empty() {
                s.overlapping_calls += 1;
            }
            let guard = InFlight {
                state: self.state.clone(),
                vm_id: vm_id.to_owned(),
                started: std::time::Instant::now(),
            };
            (s.latency.get(op).copied().unwrap_or(self.default_latency), guard)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut s = self.lock();
        let Some(i) = s.faults.iter().position(|f| f.fault.operation == op) else {
            return (guard, None, None);
        };
        let fault = s.faults[i].fault.clone();
        if let Some(left) = &mut s.faults[i].left {
            *left -= 1;
            if *left == 0 {
                s.faults.remove(i);
            }
        }
        let err = fault_error(&fault);
        if fault.after_effect { (guard, None, Some(err)) } else { (guard, Some(err), None) }
    }

    fn info_of(id: &str, vm: &SimVm) -> pb::VmInfo {
        pb::VmInfo {
            vm_id: id.to_owned(),
            power_state: vm.power as i32,
            native_id: vm.native_id.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_gib: vm.disk_gib,
            host: vm.host.clone(),
            interfaces: vm
                .nics
                .iter()
                .enumerate()
                .map(|(i, network)| synthetic_nic(id, i, network, vm.power == pb::PowerState::Running))
                .collect(),
        }
    }

    fn with_vm(
        &self,
        id: &str,
        f: impl FnOnce(&mut SimVm) -> Result<(), ProviderError>,
    ) -> Result<pb::VmInfo, ProviderError> {
        let mut s = self.lock();
        let vm = s.vms.get_mut(id).ok_or_else(|| ProviderError::not_found(id))?;
        f(vm)?;
        Ok(Self::info_of(id, vm))
    }

    /// CreateVm with the volumes the VM is created with: a boot volume
    /// (used as it is, or created from the image at `disk_gib`; slot 0) and
    /// data volumes attached at their slots. Idempotent by VM id: a VM that
    /// exists is returned as it is. Everything is checked before anything
    /// is made, so a refused create leaves nothing behind.
    pub async fn create_vm_with(
        &self,
        req: pb::CreateVmRequest,
        volumes: VmVolumes,
    ) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "CreateVm", &req.vm_id.clone(), {
            let spec = req.spec.unwrap_or_default();
            if (spec.user_data.is_some() || !spec.ssh_authorized_keys.is_empty())
                && !self.capabilities.supports_cloud_init
            {
                return Err(ProviderError::new(ErrorKind::Unsupported, "cloud-init is not supported"));
            }
            let mut s = self.lock();
            if let Some(vm) = s.vms.get(&req.vm_id) {
                Ok(Self::info_of(&req.vm_id, vm))
            } else {
                let host = s.host_for(&spec.host)?;
                let mut vm = SimVm {
                    native_id: String::new(),
                    power: if req.start { pb::PowerState::Running } else { pb::PowerState::Shutoff },
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    disk_gib: spec.disk_gib,
                    nics: spec
                        .networks
                        .iter()
                        .map(|n| if n.backing.is_empty() { n.network.clone() } else { n.backing.clone() })
                        .collect(),
                    host,
                    hostname: if spec.hostname.is_empty() {
                        spec.name.clone()
                    } else {
                        spec.hostname.clone()
                    },
                    serial: guest::SerialLog::default(),
                    vnc_password: String::new(),
                };
                vm.disk_gib = s.check_new_vm_volumes(&self.capabilities, &req.vm_id, &vm, &volumes)?;
                s.next_native += 1;
                vm.native_id = format!("sim-{}", s.next_native);
                if req.start {
                    vm.boot();
                }
                s.attach_new_vm_volumes(&req.vm_id, &vm, &volumes, self.capabilities.volumes_host_local);
                *s.creations.entry(req.vm_id.clone()).or_default() += 1;
                if !spec.ssh_authorized_keys.is_empty() {
                    s.ssh_keys.insert(req.vm_id.clone(), spec.ssh_authorized_keys.join("\n"));
                }
                let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
                s.image_sources.insert(req.vm_id.clone(), source);
                let info = Self::info_of(&req.vm_id, &vm);
                s.vms.insert(req.vm_id.clone(), vm);
                Ok(info)
            }
        })
    }

    /// The ids of the volumes the simulated hypervisor holds, as an
    /// operator would see them on its storage (test beds' look at the
    /// hypervisor, e.g. the conformance kit's `hypervisor_volume_ids`).
    pub fn volume_ids(&self) -> Vec<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    /// The ids of the VMs the simulated hypervisor holds.
    pub fn vm_ids(&self) -> Vec<String> {
        self.lock().vms.keys().cloned().collect()
    }

    /// Returns the control service for this simulator.
    pub fn control(&self) -> SimControlServer<Control> {
        SimControlServer::new(Control { sim: self.clone() })
    }
}

/// A NIC with a MAC derived from the VM id and the NIC's position, and,
/// while the VM runs, addresses derived from them (as if from DHCP and
/// SLAAC): stable across calls and restarts, distinct per VM.
fn synthetic_nic(vm_id: &str, index: usize, network: &str, running: bool) -> pb::InterfaceInfo {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{vm_id}/{index}").as_bytes());
    let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2]);
    let (ipv4, ipv6) = if running {
        (
            // Host part 2..=251: never the network, gateway or broadcast.
            vec![format!("10.{}.{}.{}", index, h[3], 2 + h[4] % 250)],
            vec![format!("fd00:{index:x}::{:02x}{:02x}:{:02x}{:02x}", h[0], h[1], h[2], h[5])],
        )
    } else {
        (Vec::new(), Vec::new())
    };
    pb::InterfaceInfo { network: network.to_owned(), mac, ipv4, ipv6 }
}

fn fault_error(f: &sim::Fault) -> ProviderError {
    let kind = match f.code.as_str() {
        "NOT_FOUND" => ErrorKind::NotFound,
        "FAILED_PRECONDITION" => ErrorKind::InvalidState,
        "INVALID_ARGUMENT" => ErrorKind::InvalidArgument,
        "UNIMPLEMENTED" => ErrorKind::Unsupported,
        "ABORTED" => ErrorKind::Busy,
        "PERMISSION_DENIED" => ErrorKind::PermissionDenied,
        "INTERNAL" => ErrorKind::Internal,
        _ => ErrorKind::Unavailable,
    };
    let msg = if f.message.is_empty() { format!("injected {} fault", f.code) } else { f.message.clone() };
    ProviderError::new(kind, msg)
}

#[hcp_provider_sdk::async_trait]
impl Provider for Sim {
    fn info(&self) -> ProviderInfo {
        let mut info = ProviderInfo::new("sim.hcp.dev", env!("CARGO_PKG_VERSION"), "sim");
        info.protocol_versions = self.protocol_versions.clone();
        info
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(self.capabilities.clone())
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        if credentials.values().any(|v| v.is_empty()) {
            return Err(ProviderError::new(ErrorKind::InvalidArgument, "empty credential value"));
        }
        self.lock().credentials = Some(credentials);
        Ok(())
    }

    fn needs_configuration(&self) -> bool {
        self.require_credentials && self.lock().credentials.is_none()
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let volumes = VmVolumes::of(req.spec.as_ref());
        self.create_vm_with(req, volumes).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "GetVm", vm_id, self.with_vm(vm_id, |_| Ok(())))
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        fault_gate!(self, "ListVms", "", {
            let s = self.lock();
            let size = if req.page_size == 0 { 1000 } else { req.page_size as usize };
            let mut vms: Vec<pb::VmInfo> = s
                .vms
                .range::<String, _>((
                    std::ops::Bound::Excluded(req.page_token.clone()),
                    std::ops::Bound::Unbounded,
                ))
                .take(size + 1)
                .map(|(id, vm)| Self::info_of(id, vm))
                .collect();
            let next = if vms.len() > size {
                vms.truncate(size);
                vms.last().map(|v| v.vm_id.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListVmsResponse { vms, next_page_token: next })
        })
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "StartVm", vm_id, {
            let mut s = self.lock();
            let host =
                s.vms.get(vm_id).map(|v| v.host.clone()).ok_or_else(|| ProviderError::not_found(vm_id))?;
            if !s.host_up(&host) {
                return Err(ProviderError::new(ErrorKind::InvalidState, format!("host {host} is down")));
            }
            let vm = s.vms.get_mut(vm_id).ok_or_else(|| ProviderError::not_found(vm_id))?;
            if vm.power != pb::PowerState::Running {
                vm.boot();
            }
            vm.power = pb::PowerState::Running;
            Ok(Self::info_of(vm_id, vm))
        })
    }

    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        if self.lock().hosts.is_empty() {
            return Err(ProviderError::new(ErrorKind::Unsupported, "the simulator has no hosts"));
        }
        fault_gate!(self, "ListHosts", "", {
            let s = self.lock();
            Ok(s.hosts
                .values()
                .map(|(h, up)| pb::HostInfo {
                    name: h.name.clone(),
                    vcpus: h.vcpus,
                    memory_mib: h.memory_mib,
                    state: if *up { pb::HostState::HostUp } else { pb::HostState::HostDown } as i32,
                })
                .collect())
        })
    }

    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let caps = self.capabilities.clone();
        fault_gate!(self, "MigrateVm", &req.vm_id.clone(), {
            let mut s = self.lock();
            let (from, power) = s
                .vms
                .get(&req.vm_id)
                .map(|v| (v.host.clone(), v.power))
                .ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            if from == req.target_host {
                return Ok(Self::info_of(&req.vm_id, &s.vms[&req.vm_id]));
            }
            match s.hosts.get(&req.target_host) {
                None => {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidArgument,
                        format!("no host {}", req.target_host),
                    ));
                }
                Some((_, false)) => {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        format!("host {} is down", req.target_host),
                    ));
                }
                Some(_) => {}
            }
            if caps.volumes_host_local && s.has_volumes(&req.vm_id) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    "the vm has volumes on its host's own storage; detach them first",
                ));
            }
            let running = power == pb::PowerState::Running;
            if req.live {
                if !caps.supports_live_migration {
                    return Err(ProviderError::new(
                        ErrorKind::Unsupported,
                        "live migration is not supported",
                    ));
                }
                if !running {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        "a live migration needs a running vm",
                    ));
                }
            } else {
                if !caps.supports_cold_migration {
                    return Err(ProviderError::new(
                        ErrorKind::Unsupported,
                        "cold migration is not supported",
                    ));
                }
                if running {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        "the vm is running; migrate it live",
                    ));
                }
            }
            let vm = s.vms.get_mut(&req.vm_id).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            vm.host = req.target_host.clone();
            // Rebuilt from shared storage: not running on the new host.
            if vm.power == pb::PowerState::Crashed {
                vm.power = pb::PowerState::Shutoff;
            }
            Ok(Self::info_of(&req.vm_id, vm))
        })
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "StopVm", &req.vm_id.clone(), {
            let force = req.force;
            let info = self.with_vm(&req.vm_id, |vm| {
                if vm.power == pb::PowerState::Running {
                    vm.serial.write(guest::POWER_DOWN.as_bytes());
                }
                vm.power = pb::PowerState::Shutoff;
                Ok(())
            });
            if info.is_ok() {
                let mut s = self.lock();
                if force { s.forced_stops += 1 } else { s.graceful_stops += 1 }
            }
            info
        })
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "RebootVm", &req.vm_id.clone(), {
            let info = self.with_vm(&req.vm_id, |vm| {
                if vm.power != pb::PowerState::Running {
                    return Err(ProviderError::new(ErrorKind::InvalidState, "vm is not running"));
                }
                vm.serial.write(b"reboot: Restarting system\r\n");
                vm.boot();
                Ok(())
            });
            if info.is_ok() {
                let mut s = self.lock();
                if req.hard { s.hard_reboots += 1 } else { s.soft_reboots += 1 }
            }
            info
        })
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let caps = self.capabilities.clone();
        fault_gate!(self, "ResizeVm", &req.vm_id.clone(), {
            if !caps.supports_resize && !caps.supports_hot_resize {
                return Err(ProviderError::new(ErrorKind::Unsupported, "resize is not supported"));
            }
            self.with_vm(&req.vm_id, |vm| {
                let running = vm.power == pb::PowerState::Running;
                if running && !caps.supports_hot_resize {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        "a running vm cannot be resized here",
                    ));
                }
                if !running && !caps.supports_resize {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        "a stopped vm cannot be resized here",
                    ));
                }
                if req.disk_gib != 0 && req.disk_gib < vm.disk_gib {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "disk_gib {} is below the disk's {} GiB; disks only grow",
                            req.disk_gib, vm.disk_gib
                        ),
                    ));
                }
                vm.vcpus = req.vcpus;
                vm.memory_mib = req.memory_mib;
                if req.disk_gib != 0 {
                    vm.disk_gib = req.disk_gib;
                }
                Ok(())
            })
            .inspect(|vm| {
                // A VM that boots from a volume grows that volume.
                let mut s = self.lock();
                if let Some(boot) = s
                    .volumes
                    .values_mut()
                    .find(|v| v.attached.as_ref().is_some_and(|(on, slot)| *on == vm.vm_id && *slot == 0))
                {
                    boot.size_gib = boot.size_gib.max(vm.disk_gib);
                }
            })
        })
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        fault_gate!(self, "DeleteVm", vm_id, {
            let mut s = self.lock();
            s.snapshots.remove(vm_id);
            // The VM's own disk goes with it; its volumes (its boot volume
            // too) stay, detached.
            s.detach_all(vm_id);
            Ok(s.vms.remove(vm_id).is_some())
        })
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        fault_gate!(self, "CreateSnapshot", &req.vm_id.clone(), {
            if !self.capabilities.supports_snapshot {
                return Err(ProviderError::new(ErrorKind::Unsupported, "snapshots are not supported"));
            }
            let mut s = self.lock();
            let power =
                s.vms.get(&req.vm_id).map(|v| v.power).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            let existing = s.snapshots.get(&req.vm_id).and_then(|m| m.get(&req.snapshot_id)).cloned();
            let (name, native) = match existing {
                Some((name, native, _)) => (name, native),
                None => {
                    if power == pb::PowerState::Running && !self.capabilities.supports_snapshot_running {
                        return Err(ProviderError::new(
                            ErrorKind::InvalidState,
                            "snapshots of running vms are not supported",
                        ));
                    }
                    s.next_native += 1;
                    let native = format!("snap-{}", s.next_native);
                    s.snapshots
                        .entry(req.vm_id.clone())
                        .or_default()
                        .insert(req.snapshot_id.clone(), (req.name.clone(), native.clone(), power));
                    (req.name.clone(), native)
                }
            };
            Ok(pb::SnapshotInfo {
                snapshot_id: req.snapshot_id.clone(),
                vm_id: req.vm_id.clone(),
                name,
                native_id: native,
            })
        })
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        fault_gate!(self, "ListSnapshots", vm_id, {
            let s = self.lock();
            if !s.vms.contains_key(vm_id) {
                return Err(ProviderError::not_found(vm_id));
            }
            Ok(s.snapshots
                .get(vm_id)
                .map(|m| {
                    m.iter()
                        .map(|(id, (name, native, _))| pb::SnapshotInfo {
                            snapshot_id: id.clone(),
                            vm_id: vm_id.to_owned(),
                            name: name.clone(),
                            native_id: native.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        fault_gate!(self, "RevertSnapshot", &req.vm_id.clone(), {
            let mut s = self.lock();
            let power = s
                .snapshots
                .get(&req.vm_id)
                .and_then(|m| m.get(&req.snapshot_id))
                .map(|(_, _, p)| *p)
                .ok_or_else(|| {
                    ProviderError::new(ErrorKind::NotFound, format!("snapshot {} not found", req.snapshot_id))
                })?;
            let vm = s.vms.get_mut(&req.vm_id).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            vm.power = power;
            Ok(Self::info_of(&req.vm_id, vm))
        })
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        fault_gate!(self, "DeleteSnapshot", &req.vm_id.clone(), {
            let mut s = self.lock();
            Ok(s.snapshots.get_mut(&req.vm_id).and_then(|m| m.remove(&req.snapshot_id)).is_some())
        })
    }

    async fn get_console_log(&self, req: pb::GetConsoleLogRequest) -> Result<pb::ConsoleLog, ProviderError> {
        fault_gate!(self, "GetConsoleLog", &req.vm_id.clone(), {
            if !self.capabilities.supports_console_log {
                return Err(ProviderError::new(ErrorKind::Unsupported, "console logs are not supported"));
            }
            let s = self.lock();
            let vm = s.vms.get(&req.vm_id).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            Ok(vm.serial.tail(req.tail_lines))
        })
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        fault_gate!(self, "GetConsole", &req.vm_id.clone(), {
            if req.protocol == "serial" && self.capabilities.supports_console_serial {
                self.with_vm(&req.vm_id, |vm| {
                    if vm.power == pb::PowerState::Running {
                        Ok(())
                    } else {
                        Err(ProviderError::new(ErrorKind::InvalidState, "vm is not running"))
                    }
                })?;
                return match self.serial.get() {
                    Some(relay) => relay.endpoint(&req.vm_id),
                    None => Err(ProviderError::new(
                        ErrorKind::Unavailable,
                        "this simulator runs no serial relay (only `run` starts one)",
                    )),
                };
            }
            if req.protocol != "vnc" || !self.capabilities.supports_console_vnc {
                return Err(ProviderError::new(
                    ErrorKind::Unsupported,
                    format!("{} consoles are not supported", req.protocol),
                ));
            }
            let Some(&port) = self.vnc.get() else {
                // In-process, without `run`: an endpoint nothing serves.
                return self.with_vm(&req.vm_id, |vm| guest::running(vm.power)).map(|_| {
                    pb::ConsoleEndpoint {
                        protocol: "vnc".to_owned(),
                        host: "127.0.0.1".to_owned(),
                        port: 5900,
                        password: "sim-console".to_owned(),
                        ..Default::default()
                    }
                });
            };
            let mut password = String::new();
            self.with_vm(&req.vm_id, |vm| {
                guest::running(vm.power)?;
                if vm.vnc_password.is_empty() {
                    vm.vnc_password = guest::vnc_password();
                }
                password.clone_from(&vm.vnc_password);
                Ok(())
            })?;
            Ok(pb::ConsoleEndpoint {
                protocol: "vnc".to_owned(),
                host: "127.0.0.1".to_owned(),
                port: u32::from(port),
                password,
                ..Default::default()
            })
        })
    }

    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        fault_gate!(self, "CreateVolume", &volume_key(&req.volume_id), {
            self.lock().create_volume(&self.capabilities, req)
        })
    }

    async fn get_volume(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        fault_gate!(self, "GetVolume", &volume_key(volume_id), {
            self.lock().get_volume(&self.capabilities, volume_id)
        })
    }

    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        fault_gate!(self, "ListVolumes", "", {
            let all = self.lock().all_volumes(&self.capabilities)?;
            Ok(hcp_provider_sdk::volume_page_of(all, &req))
        })
    }

    async fn extend_volume(&self, req: pb::ExtendVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        fault_gate!(self, "ExtendVolume", &volume_key(&req.volume_id), {
            self.lock().extend_volume(&self.capabilities, &req)
        })
    }

    async fn attach_volume(&self, req: pb::AttachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        fault_gate!(self, "AttachVolume", &volume_key(&req.volume_id), {
            self.lock().attach_volume(&self.capabilities, &req)
        })
    }

    async fn detach_volume(&self, req: pb::DetachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        fault_gate!(self, "DetachVolume", &volume_key(&req.volume_id), {
            self.lock().detach_volume(&self.capabilities, &req)
        })
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<bool, ProviderError> {
        fault_gate!(self, "DeleteVolume", &volume_key(volume_id), {
            self.lock().delete_volume(&self.capabilities, volume_id)
        })
    }

    async fn import_image(
        &self,
        mut upload: hcp_provider_sdk::image::ImageUpload,
    ) -> Result<pb::ImageInfo, ProviderError> {
        let id = upload.header().image_id.clone();
        fault_gate!(self, "ImportImage", &image_key(&id), {
            if !self.capabilities.supports_image_import {
                return Err(ProviderError::new(ErrorKind::Unsupported, "image import is not supported"));
            }
            if !self.capabilities.image_formats.contains(&(upload.format() as i32)) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidArgument,
                    format!("format {:?} is not one of image_formats", upload.format()),
                ));
            }
            let stored = self.lock().images.get(&id).cloned();
            if let Some(done) = stored {
                upload.drain().await?;
                return Ok(pb::ImageInfo { image_id: id, source: done.source, size_bytes: done.size_bytes });
            }
            // Nothing is kept until every byte arrived and matched.
            while upload.chunk().await?.is_some() {}
            let header = upload.header().clone();
            let image = sim::SimImage {
                source: format!("sim-image-{id}"),
                origin: "imported".to_owned(),
                format: header.format,
                size_bytes: header.size_bytes,
                sha256: header.sha256,
                vm_id: String::new(),
            };
            let mut s = self.lock();
            let image = s.images.entry(id.clone()).or_insert(image).clone();
            Ok(pb::ImageInfo { image_id: id, source: image.source, size_bytes: image.size_bytes })
        })
    }

    async fn capture_image(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        fault_gate!(self, "CaptureImage", &req.vm_id, {
            if !self.capabilities.supports_capture {
                return Err(ProviderError::new(ErrorKind::Unsupported, "capture is not supported"));
            }
            let mut s = self.lock();
            if let Some(done) = s.images.get(&req.image_id) {
                return Ok(pb::ImageInfo {
                    image_id: req.image_id.clone(),
                    source: done.source.clone(),
                    size_bytes: done.size_bytes,
                });
            }
            let vm = s.vms.get(&req.vm_id).ok_or_else(|| ProviderError::not_found(&req.vm_id))?;
            if vm.power != pb::PowerState::Shutoff {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!("VM {} must be stopped to be captured", req.vm_id),
                ));
            }
            let image = sim::SimImage {
                source: format!("sim-image-{}", req.image_id),
                origin: "captured".to_owned(),
                format: pb::DiskFormat::Qcow2 as i32,
                size_bytes: u64::from(vm.disk_gib) << 30,
                sha256: String::new(),
                vm_id: req.vm_id.clone(),
            };
            s.images.insert(req.image_id.clone(), image.clone());
            Ok(pb::ImageInfo { image_id: req.image_id, source: image.source, size_bytes: image.size_bytes })
        })
    }

    async fn delete_image(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        fault_gate!(self, "DeleteImage", &image_key(&req.image_id), {
            if !self.capabilities.supports_image_import && !self.capabilities.supports_capture {
                return Err(ProviderError::new(ErrorKind::Unsupported, "images are not supported"));
            }
            Ok(self.lock().images.remove(&req.image_id).is_some())
        })
    }
}

/// The key of an image's calls for the per-id concurrency detection.
fn image_key(id: &str) -> String {
    format!("image/{id}")
}

/// The key of a volume's calls for the per-id concurrency detection.
fn volume_key(id: &str) -> String {
    format!("volume/{id}")
}

/// The `SimControl` service.
#[derive(Clone)]
pub struct Control {
    sim: Sim,
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl SimControl for Control {
    async fn inject_fault(
        &self,
        req: tonic::Request<sim::InjectFaultRequest>,
    ) -> Reply<sim::InjectFaultResponse> {
        let fault =
            req.into_inner().fault.ok_or_else(|| tonic::Status::invalid_argument("fault is required"))?;
        let left = if fault.count == 0 { None } else { Some(fault.count) };
        self.sim.lock().faults.push(ActiveFault { fault, left });
        Ok(tonic::Response::new(sim::InjectFaultResponse {}))
    }

    async fn set_latency(
        &self,
        req: tonic::Request<sim::SetLatencyRequest>,
    ) -> Reply<sim::SetLatencyResponse> {
        let r = req.into_inner();
        self.sim.lock().latency.insert(r.operation, Duration::from_millis(u64::from(r.latency_ms)));
        Ok(tonic::Response::new(sim::SetLatencyResponse {}))
    }

    async fn clear(&self, _: tonic::Request<sim::ClearRequest>) -> Reply<sim::ClearResponse> {
        let mut s = self.sim.lock();
        s.faults.clear();
        s.latency.clear();
        Ok(tonic::Response::new(sim::ClearResponse {}))
    }

    async fn stats(&self, _: tonic::Request<sim::StatsRequest>) -> Reply<sim::StatsResponse> {
        let s = self.sim.lock();
        Ok(tonic::Response::new(sim::StatsResponse {
            calls: s.calls.clone(),
            creations: s.creations.clone(),
            vm_count: s.vms.len() as u32,
            overlapping_calls: s.overlapping_calls,
            busy_micros: s.busy_micros,
            hard_reboots: s.hard_reboots,
            soft_reboots: s.soft_reboots,
            forced_stops: s.forced_stops,
            graceful_stops: s.graceful_stops,
            volume_creations: s.volume_creations.clone(),
            volume_count: s.volumes.len() as u32,
            ssh_authorized_keys: s.ssh_keys.clone(),
            images: s.images.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            image_sources: s.image_sources.clone(),
            credential_keys: {
                let mut keys: Vec<String> = s.credentials.iter().flat_map(|c| c.keys().cloned()).collect();
                keys.sort();
                keys
            },
        }))
    }

    async fn set_power_state(
        &self,
        req: tonic::Request<sim::SetPowerStateRequest>,
    ) -> Reply<sim::SetPowerStateResponse> {
        let r = req.into_inner();
        let power = pb::PowerState::try_from(r.power_state)
            .map_err(|_| tonic::Status::invalid_argument("unknown power_state"))?;
        self.sim
            .with_vm(&r.vm_id, |vm| {
                vm.power = power;
                Ok(())
            })
            .map_err(|e| e.to_status())?;
        Ok(tonic::Response::new(sim::SetPowerStateResponse {}))
    }

    async fn remove_vm(&self, req: tonic::Request<sim::RemoveVmRequest>) -> Reply<sim::RemoveVmResponse> {
        let id = req.into_inner().vm_id;
        let mut s = self.sim.lock();
        s.vms.remove(&id).ok_or_else(|| ProviderError::not_found(&id).to_status())?;
        // As when an administrator undefines a VM: its disks stay.
        s.detach_all(&id);
        Ok(tonic::Response::new(sim::RemoveVmResponse {}))
    }

    async fn add_vms(&self, req: tonic::Request<sim::AddVmsRequest>) -> Reply<sim::AddVmResponse> {
        let r = req.into_inner();
        let power = pb::PowerState::try_from(r.power_state).unwrap_or(pb::PowerState::Running);
        let mut s = self.sim.lock();
        for id in r.vm_ids {
            s.next_native += 1;
            let vm = SimVm {
                native_id: format!("sim-{}", s.next_native),
                power,
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                nics: Vec::new(),
                host: s.first_host(),
                ..SimVm::default()
            };
            s.vms.insert(id, vm);
        }
        Ok(tonic::Response::new(sim::AddVmResponse {}))
    }

    async fn set_host_state(
        &self,
        req: tonic::Request<sim::SetHostStateRequest>,
    ) -> Reply<sim::SetHostStateResponse> {
        let r = req.into_inner();
        let up = match pb::HostState::try_from(r.state) {
            Ok(pb::HostState::HostUp) => true,
            Ok(pb::HostState::HostDown) => false,
            _ => return Err(tonic::Status::invalid_argument("state must be HOST_UP or HOST_DOWN")),
        };
        let mut s = self.sim.lock();
        let entry = s
            .hosts
            .get_mut(&r.host)
            .ok_or_else(|| tonic::Status::not_found(format!("no host {}", r.host)))?;
        entry.1 = up;
        if !up {
            // A host that fails takes its running guests down with it.
            for vm in s.vms.values_mut().filter(|v| v.host == r.host) {
                if vm.power == pb::PowerState::Running {
                    vm.power = pb::PowerState::Crashed;
                }
            }
        }
        Ok(tonic::Response::new(sim::SetHostStateResponse {}))
    }

    async fn remove_volume(
        &self,
        req: tonic::Request<sim::RemoveVolumeRequest>,
    ) -> Reply<sim::RemoveVolumeResponse> {
        let id = req.into_inner().volume_id;
        let mut s = self.sim.lock();
        s.volumes.remove(&id).ok_or_else(|| tonic::Status::not_found(format!("volume {id} not found")))?;
        Ok(tonic::Response::new(sim::RemoveVolumeResponse {}))
    }

    async fn set_volume_attachment(
        &self,
        req: tonic::Request<sim::SetVolumeAttachmentRequest>,
    ) -> Reply<sim::SetVolumeAttachmentResponse> {
        let r = req.into_inner();
        self.sim.lock().set_attachment(&r.volume_id, &r.vm_id, r.slot).map_err(|e| e.to_status())?;
        Ok(tonic::Response::new(sim::SetVolumeAttachmentResponse {}))
    }

    async fn add_volume(&self, req: tonic::Request<sim::AddVolumeRequest>) -> Reply<sim::AddVolumeResponse> {
        let r = req.into_inner();
        let host_local = self.sim.capabilities.volumes_host_local;
        let mut s = self.sim.lock();
        let host = match (host_local, r.host.is_empty()) {
            (false, _) => String::new(),
            (true, true) => s.first_host(),
            (true, false) if s.hosts.contains_key(&r.host) => r.host,
            (true, false) => return Err(tonic::Status::invalid_argument(format!("no host {}", r.host))),
        };
        s.add_unknown_volume(&r.volume_id, if r.size_gib == 0 { 10 } else { r.size_gib }, host);
        Ok(tonic::Response::new(sim::AddVolumeResponse {}))
    }

    async fn add_vm(&self, req: tonic::Request<sim::AddVmRequest>) -> Reply<sim::AddVmResponse> {
        let r = req.into_inner();
        let power = pb::PowerState::try_from(r.power_state).unwrap_or(pb::PowerState::Running);
        let mut s = self.sim.lock();
        s.next_native += 1;
        let vm = SimVm {
            native_id: format!("sim-{}", s.next_native),
            power,
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 10,
            nics: Vec::new(),
            host: s.first_host(),
            ..SimVm::default()
        };
        s.vms.insert(r.vm_id, vm);
        Ok(tonic::Response::new(sim::AddVmResponse {}))
    }
}

/// Runs the simulator until `shutdown` resolves.
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), hcp_provider_sdk::ServeError> {
    let sim = Sim::new(&config);
    if sim.capabilities.supports_console_serial {
        // The console proxy runs beside the simulator: loopback.
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let relay = hcp_provider_sdk::serial::SerialRelay::bind(listen, "", Arc::new(sim.clone()))
            .await
            .map_err(|source| hcp_provider_sdk::ServeError::Bind { addr: listen, source })?;
        let _ = sim.serial.set(relay);
    }
    if sim.capabilities.supports_console_vnc {
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let bind = |source| hcp_provider_sdk::ServeError::Bind { addr: listen, source };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
        let port = listener.local_addr().map_err(bind)?.port();
        let _ = sim.vnc.set(port);
        tokio::spawn(guest::serve_vnc(listener, sim.clone()));
    }
    let control = sim.control();
    let serve = ServeConfig {
        listen: config.listen,
        unix_socket: config.unix_socket.clone(),
        tls: config.tls.clone(),
        ..ServeConfig::default()
    };
    hcp_provider_sdk::serve_with(sim, control, serve, shutdown, ready).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_lists() {
        let c = parse_capabilities("cloud_init, supports_console_vnc").unwrap();
        assert!(c.supports_cloud_init && c.supports_console_vnc && !c.supports_snapshot);
        assert!(parse_capabilities("warp_drive").is_err());
        assert_eq!(parse_capabilities("").unwrap(), pb::Capabilities::default());
    }

    #[tokio::test]
    async fn create_is_idempotent_and_counts_creations() {
        let sim = Sim::new(&SimConfig::default());
        let req = pb::CreateVmRequest {
            vm_id: "0190b5f2-0000-7000-8000-000000000001".into(),
            spec: Some(pb::VmSpec::default()),
            start: false,
        };
        let a = sim.create_vm(req.clone()).await.unwrap();
        let b = sim.create_vm(req.clone()).await.unwrap();
        assert_eq!(a.native_id, b.native_id);
        assert_eq!(sim.lock().creations[&req.vm_id], 1);
        assert!(sim.delete_vm(&req.vm_id).await.unwrap());
        assert!(!sim.delete_vm(&req.vm_id).await.unwrap());
    }

    #[tokio::test]
    async fn faults_after_effect_model_lost_replies() {
        let sim = Sim::new(&SimConfig::default());
        sim.lock().faults.push(ActiveFault {
            fault: sim::Fault {
                operation: "CreateVm".into(),
                code: "UNAVAILABLE".into(),
                count: 1,
                message: String::new(),
                after_effect: true,
            },
            left: Some(1),
        });
        let req = pb::CreateVmRequest {
            vm_id: "0190b5f2-0000-7000-8000-000000000002".into(),
            spec: Some(pb::VmSpec::default()),
            start: false,
        };
        let err = sim.create_vm(req.clone()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        // The VM exists although the caller saw a failure; a retry finds it.
        sim.create_vm(req.clone()).await.unwrap();
        assert_eq!(sim.lock().creations[&req.vm_id], 1);
    }

    const VM: &str = "0190b5f2-0000-7000-8000-000000000003";

    fn create(networks: &[(&str, &str)]) -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            vm_id: VM.into(),
            spec: Some(pb::VmSpec {
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                networks: networks
                    .iter()
                    .map(|(n, b)| pb::NetworkAttachment { network: (*n).into(), backing: (*b).into() })
                    .collect(),
                ..Default::default()
            }),
            start: false,
        }
    }

    fn resize(vcpus: u32, memory_mib: u32, disk_gib: u32) -> pb::ResizeVmRequest {
        pb::ResizeVmRequest { vm_id: VM.into(), vcpus, memory_mib, disk_gib }
    }

    fn sim_with(caps: &str) -> Sim {
        Sim::new(&SimConfig { capabilities: parse_capabilities(caps).unwrap(), ..Default::default() })
    }

    #[tokio::test]
    async fn resize_sets_the_sizes_grows_the_disk_only_and_follows_the_flags() {
        let sim = sim_with("resize,hot_resize");
        sim.create_vm(create(&[])).await.unwrap();
        for _ in 0..2 {
            let vm = sim.resize_vm(resize(2, 2048, 20)).await.unwrap();
            assert_eq!((vm.vcpus, vm.memory_mib, vm.disk_gib), (2, 2048, 20));
        }
        // 0 leaves the disk; below the current size is refused, untouched.
        let vm = sim.resize_vm(resize(4, 4096, 0)).await.unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib, vm.disk_gib), (4, 4096, 20));
        assert_eq!(sim.resize_vm(resize(1, 512, 10)).await.unwrap_err().kind, ErrorKind::InvalidArgument);
        assert_eq!(sim.get_vm(VM).await.unwrap().vcpus, 4);
        // Running: resized with hot resize ...
        sim.start_vm(VM).await.unwrap();
        let vm = sim.resize_vm(resize(1, 512, 0)).await.unwrap();
        assert_eq!((vm.power_state, vm.vcpus), (pb::PowerState::Running as i32, 1));

        // ... refused without it (stopped still works) ...
        let cold = sim_with("resize");
        cold.create_vm(create(&[])).await.unwrap();
        cold.resize_vm(resize(2, 1024, 0)).await.unwrap();
        cold.start_vm(VM).await.unwrap();
        assert_eq!(cold.resize_vm(resize(4, 1024, 0)).await.unwrap_err().kind, ErrorKind::InvalidState);
        assert_eq!(cold.get_vm(VM).await.unwrap().vcpus, 2);

        // ... and unsupported without either flag.
        let none = sim_with("");
        none.create_vm(create(&[])).await.unwrap();
        assert_eq!(none.resize_vm(resize(2, 1024, 0)).await.unwrap_err().kind, ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn hard_and_soft_reboots_and_forced_and_graceful_stops_are_counted_apart() {
        let sim = Sim::new(&SimConfig::default());
        sim.create_vm(create(&[])).await.unwrap();
        sim.start_vm(VM).await.unwrap();
        for hard in [true, false, false] {
            sim.reboot_vm(pb::RebootVmRequest { vm_id: VM.into(), hard }).await.unwrap();
        }
        let stop = |force| pb::StopVmRequest { vm_id: VM.into(), force, timeout_seconds: 30 };
        sim.stop_vm(stop(false)).await.unwrap();
        sim.start_vm(VM).await.unwrap();
        sim.stop_vm(stop(true)).await.unwrap();
        sim.stop_vm(stop(true)).await.unwrap();
        let s = sim.lock();
        assert_eq!((s.hard_reboots, s.soft_reboots), (1, 2));
        assert_eq!((s.forced_stops, s.graceful_stops), (2, 1));
    }

    #[tokio::test]
    async fn the_control_service_changes_volumes_behind_hcps_back_and_counts_them() {
        let sim = Sim::new(&SimConfig::default());
        let control = Control { sim: sim.clone() };
        let vol = "0190b5f2-0000-7000-8000-0000000000c1";
        let made = "0190b5f2-0000-7000-8000-0000000000c2";
        sim.create_vm(create(&[])).await.unwrap();
        control
            .add_volume(tonic::Request::new(sim::AddVolumeRequest {
                volume_id: vol.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let v = sim.get_volume(vol).await.unwrap();
        assert_eq!((v.size_gib, v.vm_id.as_str()), (10, ""));
        let attach = |vm: &str, slot| sim::SetVolumeAttachmentRequest {
            volume_id: vol.into(),
            vm_id: vm.into(),
            slot,
        };
        control.set_volume_attachment(tonic::Request::new(attach(VM, 2))).await.unwrap();
        assert_eq!(sim.get_volume(vol).await.unwrap().slot, 2);
        // A VM removed behind HCP's back leaves its volumes, detached.
        control.remove_vm(tonic::Request::new(sim::RemoveVmRequest { vm_id: VM.into() })).await.unwrap();
        assert!(sim.get_volume(vol).await.unwrap().vm_id.is_empty());
        let gone = control.set_volume_attachment(tonic::Request::new(attach(VM, 2))).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound);
        sim.create_volume(pb::CreateVolumeRequest {
            volume_id: made.into(),
            spec: Some(pb::VolumeSpec { size_gib: 1, ..Default::default() }),
        })
        .await
        .unwrap();
        control
            .remove_volume(tonic::Request::new(sim::RemoveVolumeRequest { volume_id: vol.into() }))
            .await
            .unwrap();
        assert_eq!(sim.get_volume(vol).await.unwrap_err().kind, ErrorKind::NotFound);
        let stats = control.stats(tonic::Request::new(sim::StatsRequest {})).await.unwrap().into_inner();
        assert_eq!(stats.volume_count, 1);
        assert_eq!(stats.volume_creations, [(made.to_owned(), 1)].into_iter().collect());
    }

    #[tokio::test]
    async fn nics_follow_the_networks_with_stable_macs_and_addresses_while_running() {
        let sim = Sim::new(&SimConfig::default());
        let vm = sim.create_vm(create(&[("default", ""), ("lan", "br-lan")])).await.unwrap();
        let nics = vm.interfaces;
        assert_eq!(nics.len(), 2);
        // The backing core sent names what the NIC is on; else the network.
        assert_eq!((nics[0].network.as_str(), nics[1].network.as_str()), ("default", "br-lan"));
        assert_ne!(nics[0].mac, nics[1].mac);
        for nic in &nics {
            let octets: Vec<&str> = nic.mac.split(':').collect();
            assert!(octets.len() == 6 && nic.mac == nic.mac.to_ascii_lowercase(), "{}", nic.mac);
            assert!(nic.ipv4.is_empty() && nic.ipv6.is_empty(), "stopped: no addresses yet");
        }
        let running = sim.start_vm(VM).await.unwrap().interfaces;
        for (i, nic) in running.iter().enumerate() {
            assert_eq!(nic.mac, nics[i].mac, "the MAC does not change when the VM starts");
            let v4: std::net::Ipv4Addr = nic.ipv4[0].parse().unwrap();
            assert_eq!(v4.octets()[..2], [10, i as u8]);
            assert!((2..=251).contains(&v4.octets()[3]), "{v4}");
            nic.ipv6[0].parse::<std::net::Ipv6Addr>().unwrap();
        }
        // Deterministic: another simulator gives the same VM the same NICs.
        let again = Sim::new(&SimConfig::default());
        again.create_vm(create(&[("default", ""), ("lan", "br-lan")])).await.unwrap();
        assert_eq!(again.start_vm(VM).await.unwrap().interfaces, running);
    }
}
