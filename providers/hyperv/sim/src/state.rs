//! The simulated host: VMs with their settings and devices, snapshots,
//! switches, jobs, enumerations in progress, and the files under the
//! simulated disk directory. Time moves lazily: every request (and every
//! accessor of the [`crate::Sim`] handle) first calls [`State::advance`],
//! which ends the jobs that are due, applies their effects, finishes guest
//! shutdowns, and forgets old jobs and idle enumerations.
//!
//! [`State::instances`] renders the whole host as instances of catalogue
//! classes; queries and gets run on that list, so what a client reads is
//! always consistent with what the methods changed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::model::{Epr, Instance, Val};
use crate::{Faults, RequestRecord, SimConfig, Stats};

/// The processor RASD's device-specific part of its InstanceID (the same
/// on every Hyper-V host).
pub(crate) const PROCESSOR_DEVICE: &str = "b637f346-6a6e-4dec-af52-bd70cb80a21d\\0";
/// The memory RASD's device-specific part.
pub(crate) const MEMORY_DEVICE: &str = "4764334d-e001-4176-82ee-5594ec9b530e";
/// The shutdown integration component's id.
const SHUTDOWN_IC: &str = "9F8233AC-BE49-4C79-8EE3-E7E1985B2077";
/// The KVP integration component's id.
const KVP_IC: &str = "2A34B1C2-FD73-4043-8A5B-DD2159BC743F";

/// VM power states (`EnabledState`, v2).
pub(crate) mod power {
    pub(crate) const RUNNING: u16 = 2;
    pub(crate) const OFF: u16 = 3;
    pub(crate) const STOPPING: u16 = 4;
    pub(crate) const SAVED: u16 = 6;
    pub(crate) const PAUSED: u16 = 9;
    pub(crate) const STARTING: u16 = 10;
    pub(crate) const NOT_APPLICABLE: u16 = 12;
    pub(crate) const SAVING: u16 = 32773;
    pub(crate) const PAUSING: u16 = 32776;
    pub(crate) const RESUMING: u16 = 32777;
}

/// What kind of setting data a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DevKind {
    /// `Msvm_ResourceAllocationSettingData`: controllers and drives.
    Rasd,
    /// `Msvm_StorageAllocationSettingData`: a VHD or ISO in a drive.
    Sasd,
    /// `Msvm_SyntheticEthernetPortSettingData`: a NIC.
    Port,
    /// `Msvm_EthernetPortAllocationSettingData`: a NIC's switch connection.
    Connection,
}

impl DevKind {
    pub(crate) fn class(self) -> &'static str {
        match self {
            Self::Rasd => "Msvm_ResourceAllocationSettingData",
            Self::Sasd => "Msvm_StorageAllocationSettingData",
            Self::Port => "Msvm_SyntheticEthernetPortSettingData",
            Self::Connection => "Msvm_EthernetPortAllocationSettingData",
        }
    }
}

/// A device of a VM.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Device {
    pub(crate) kind: DevKind,
    pub(crate) instance_id: String,
    pub(crate) element_name: String,
    pub(crate) resource_type: u16,
    pub(crate) subtype: String,
    /// The parent's InstanceID (resolved from the object path sent).
    pub(crate) parent: Option<String>,
    pub(crate) address_on_parent: Option<String>,
    pub(crate) host_resource: Vec<String>,
    /// The MAC (ports).
    pub(crate) address: Option<String>,
    pub(crate) static_mac: bool,
    pub(crate) vsi: Vec<String>,
    /// Connections: 2 connected, 3 disconnected.
    pub(crate) enabled_state: u16,
}

/// A snapshot (checkpoint) of a VM.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    /// The snapshot's GUID (its VSSD is `Microsoft:<GUID>`).
    pub(crate) guid: String,
    pub(crate) name: String,
    pub(crate) created: DateTime<Utc>,
    /// The VM's power state when it was taken.
    pub(crate) power: u16,
    pub(crate) cpus: u64,
    pub(crate) memory_mb: u64,
    pub(crate) devices: Vec<Device>,
    pub(crate) notes: Vec<String>,
    /// The snapshot it was taken after.
    pub(crate) parent: Option<String>,
}

/// A VM.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) guid: String,
    pub(crate) name: String,
    pub(crate) notes: Vec<String>,
    pub(crate) subtype: String,
    pub(crate) created: DateTime<Utc>,
    pub(crate) state: u16,
    pub(crate) requested: u16,
    pub(crate) state_changed: DateTime<Utc>,
    pub(crate) started: Option<Instant>,
    pub(crate) pid: u32,
    pub(crate) cpus: u64,
    pub(crate) memory_mb: u64,
    pub(crate) devices: Vec<Device>,
    pub(crate) snapshots: Vec<Snapshot>,
    /// The snapshot the VM runs from (`Parent` of its settings).
    pub(crate) current_snapshot: Option<String>,
    /// Guest integration services: the shutdown component and KVP data.
    pub(crate) integration: bool,
    pub(crate) guest_ip: String,
    /// A guest shutdown is under way and ends then.
    pub(crate) shutdown_at: Option<Instant>,
    /// A power job is running.
    pub(crate) busy: Option<String>,
    pub(crate) counters: crate::PowerCounters,
}

impl Vm {
    pub(crate) fn vssd_id(&self) -> String {
        format!("Microsoft:{}", self.guid)
    }

    pub(crate) fn processor_id(&self) -> String {
        format!("Microsoft:{}\\{PROCESSOR_DEVICE}", self.guid)
    }

    pub(crate) fn memory_id(&self) -> String {
        format!("Microsoft:{}\\{MEMORY_DEVICE}", self.guid)
    }

    pub(crate) fn device(&self, instance_id: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.instance_id.eq_ignore_ascii_case(instance_id))
    }

    pub(crate) fn running(&self) -> bool {
        self.state == power::RUNNING
    }

    pub(crate) fn epr(&self) -> Epr {
        Epr {
            class: "Msvm_ComputerSystem".into(),
            selectors: vec![
                ("CreationClassName".into(), "Msvm_ComputerSystem".into()),
                ("Name".into(), self.guid.clone()),
            ],
        }
    }
}

/// A virtual switch.
#[derive(Debug, Clone)]
pub(crate) struct Switch {
    pub(crate) guid: String,
    pub(crate) name: String,
}

/// What a job does when it ends.
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    None,
    /// DefineSystem: on failure the VM disappears again.
    Define(String),
    /// DestroySystem: on success the VM and its snapshots go.
    Destroy(String),
    /// A power transition: `to` on success, back to `from` on failure.
    Power {
        guid: String,
        from: u16,
        to: u16,
        reset: bool,
    },
    /// A configuration change applied at once: restored on failure.
    Undo(Box<Vm>),
    /// CreateSnapshot: the snapshot appears on success.
    CreateSnapshot(String, Box<Snapshot>),
    /// ApplySnapshot.
    ApplySnapshot(String, String),
    /// DestroySnapshot.
    DestroySnapshot(String, String),
    /// CreateVirtualHardDisk: the file appears on success.
    CreateDisk(PathBuf, DiskMeta),
    /// ResizeVirtualHardDisk.
    ResizeDisk(PathBuf, u64),
}

/// A job.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) method: String,
    pub(crate) description: String,
    pub(crate) job_type: Option<u16>,
    pub(crate) submitted: DateTime<Utc>,
    pub(crate) started: Instant,
    pub(crate) due: Instant,
    /// When it ended (monotonic and wall clock).
    pub(crate) ended: Option<(Instant, DateTime<Utc>)>,
    /// `Err((ErrorCode, ErrorDescription))` ends it in state 10.
    pub(crate) outcome: Result<(), (u16, String)>,
    pub(crate) effect: Effect,
}

/// An enumeration in progress.
#[derive(Debug, Clone)]
pub(crate) struct Enumeration {
    pub(crate) items: VecDeque<String>,
    pub(crate) last_used: Instant,
}

/// What a simulated VHD file holds (the simulator's own small format;
/// files it did not create count as fixed disks of their length).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DiskMeta {
    pub(crate) kind: u16,
    pub(crate) format: u16,
    pub(crate) size: u64,
    pub(crate) parent: Option<String>,
}

const DISK_MAGIC: &str = "hcp-hyperv-sim virtual disk\n";

/// Reads a disk's metadata.
pub(crate) fn read_disk(path: &Path) -> Option<DiskMeta> {
    let bytes = std::fs::read(path).ok()?;
    if let Some(rest) = bytes.strip_prefix(DISK_MAGIC.as_bytes())
        && let Ok(meta) = serde_json::from_slice(rest)
    {
        return Some(meta);
    }
    Some(DiskMeta { kind: 2, format: 3, size: bytes.len() as u64, parent: None })
}

/// Writes a disk file.
pub(crate) fn write_disk(path: &Path, meta: &DiskMeta) -> std::io::Result<()> {
    let mut bytes = DISK_MAGIC.as_bytes().to_vec();
    bytes.extend(serde_json::to_vec(meta).map_err(std::io::Error::other)?);
    std::fs::write(path, bytes)
}

/// An association instance: its class and its two (role, reference)
/// ends.
pub(crate) type Association = (&'static str, (&'static str, Epr), (&'static str, Epr));

/// The host state.
pub(crate) struct State {
    pub(crate) config: SimConfig,
    pub(crate) disk_dir: PathBuf,
    pub(crate) vms: BTreeMap<String, Vm>,
    pub(crate) switches: Vec<Switch>,
    pub(crate) jobs: BTreeMap<String, Job>,
    pub(crate) enumerations: HashMap<String, Enumeration>,
    pub(crate) faults: Faults,
    pub(crate) violations: Vec<String>,
    pub(crate) log: Vec<RequestRecord>,
    pub(crate) stats: Stats,
    pub(crate) vmconnect: Vec<crate::VmConnectSession>,
    pub(crate) counter: u32,
    pub(crate) booted: DateTime<Utc>,
}

impl State {
    pub(crate) fn new(config: SimConfig, disk_dir: PathBuf) -> Self {
        let switches = config
            .switches
            .iter()
            .map(|name| Switch { guid: uuid::Uuid::new_v4().to_string().to_uppercase(), name: name.clone() })
            .collect();
        Self {
            config,
            disk_dir,
            vms: BTreeMap::new(),
            switches,
            jobs: BTreeMap::new(),
            enumerations: HashMap::new(),
            faults: Faults::default(),
            violations: Vec::new(),
            log: Vec::new(),
            stats: Stats::default(),
            vmconnect: Vec::new(),
            counter: 0,
            booted: Utc::now(),
        }
    }

    /// The next value of a host-wide counter (MACs, IPs, process ids).
    pub(crate) fn next(&mut self) -> u32 {
        self.counter += 1;
        self.counter
    }

    /// Maps a Windows path under the configured prefix onto the disk
    /// directory; `None` for paths elsewhere (they do not exist on the
    /// simulated host) or with `.`/`..` components.
    pub(crate) fn host_path(&self, windows: &str) -> Option<PathBuf> {
        map_path(&self.config.disk_prefix, &self.disk_dir, windows).or_else(|| self.share_path(windows))
    }

    /// Maps a Windows path under one of the configured shares onto its
    /// directory.
    pub(crate) fn share_path(&self, windows: &str) -> Option<PathBuf> {
        self.config.shares.iter().find_map(|(prefix, dir)| map_path(prefix, dir, windows))
    }

    /// Finds a VM by its GUID (any case).
    pub(crate) fn vm_mut(&mut self, guid: &str) -> Option<&mut Vm> {
        let key = guid.to_uppercase();
        self.vms.get_mut(&key)
    }

    /// Starts a job; the `faults.job_failures` entry for `method`, if any,
    /// makes it end in state 10.
    pub(crate) fn start_job(
        &mut self,
        method: &str,
        description: &str,
        job_type: Option<u16>,
        effect: Effect,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string().to_uppercase();
        let outcome = match self.faults.job_failures.remove(method) {
            Some(msg) => Err((32768, msg)),
            None => Ok(()),
        };
        self.start_job_with(id.clone(), method, description, job_type, effect, outcome);
        id
    }

    /// Starts a job that ends as `outcome` says.
    pub(crate) fn start_job_with(
        &mut self,
        id: String,
        method: &str,
        description: &str,
        job_type: Option<u16>,
        effect: Effect,
        outcome: Result<(), (u16, String)>,
    ) {
        let now = Instant::now();
        self.jobs.insert(
            id.clone(),
            Job {
                id,
                method: method.to_owned(),
                description: description.to_owned(),
                job_type,
                submitted: Utc::now(),
                started: now,
                due: now + self.config.job_duration,
                ended: None,
                outcome,
                effect,
            },
        );
    }

    /// Moves time forward: ends due jobs, finishes guest shutdowns, forgets
    /// old jobs and idle enumerations.
    pub(crate) fn advance(&mut self) {
        let now = Instant::now();
        let mut due: Vec<(Instant, String)> = self
            .jobs
            .values()
            .filter(|j| j.ended.is_none() && j.due <= now)
            .map(|j| (j.due, j.id.clone()))
            .collect();
        due.sort();
        for (_, id) in due {
            let Some(job) = self.jobs.get(&id).cloned() else { continue };
            let outcome = self.finish(&job);
            if let Some(j) = self.jobs.get_mut(&id) {
                j.outcome = outcome;
                j.ended = Some((now, Utc::now()));
            }
        }
        let retention = self.config.job_retention;
        self.jobs.retain(|_, j| j.ended.is_none_or(|(t, _)| now.duration_since(t) < retention));
        let ignore = self.faults.guest_ignores_shutdown;
        for vm in self.vms.values_mut() {
            if vm.shutdown_at.is_some_and(|t| t <= now) {
                vm.shutdown_at = None;
                if vm.state == power::RUNNING && !ignore {
                    vm.state = power::OFF;
                    vm.state_changed = Utc::now();
                    vm.started = None;
                    vm.counters.shutdowns += 1;
                }
            }
        }
        let idle = self.config.enumeration_timeout;
        self.enumerations.retain(|_, e| now.duration_since(e.last_used) < idle);
    }

    /// Applies a job's effect; returns its final outcome.
    fn finish(&mut self, job: &Job) -> Result<(), (u16, String)> {
        let ok = job.outcome.is_ok();
        match &job.effect {
            Effect::None => {}
            Effect::Define(guid) => {
                if !ok {
                    self.vms.remove(guid);
                }
            }
            Effect::Destroy(guid) => {
                if ok {
                    self.vms.remove(guid);
                }
            }
            Effect::Power { guid, from, to, reset } => {
                if let Some(vm) = self.vms.get_mut(guid) {
                    vm.busy = None;
                    vm.requested = power::NOT_APPLICABLE;
                    vm.state_changed = Utc::now();
                    if ok {
                        let was_running = *from == power::RUNNING || *from == power::PAUSED;
                        if *reset {
                            vm.counters.resets += 1;
                            vm.started = Some(Instant::now());
                        } else if *to == power::RUNNING && !was_running {
                            vm.counters.starts += 1;
                            vm.started = Some(Instant::now());
                            vm.pid = 4000 + self.counter;
                            self.counter += 1;
                        } else if *to == power::OFF && was_running {
                            vm.counters.stops += 1;
                        }
                        if *to != power::RUNNING && *to != power::PAUSED {
                            vm.started = None;
                            vm.shutdown_at = None;
                        }
                        vm.state = *to;
                    } else {
                        vm.state = *from;
                    }
                }
            }
            Effect::Undo(before) => {
                if !ok && let Some(vm) = self.vms.get_mut(&before.guid) {
                    let (state, requested, started, busy) =
                        (vm.state, vm.requested, vm.started, vm.busy.clone());
                    *vm = (**before).clone();
                    vm.state = state;
                    vm.requested = requested;
                    vm.started = started;
                    vm.busy = busy;
                }
            }
            Effect::CreateSnapshot(guid, snap) => {
                if ok && let Some(vm) = self.vms.get_mut(guid) {
                    vm.current_snapshot = Some(snap.guid.clone());
                    vm.snapshots.push((**snap).clone());
                }
            }
            Effect::ApplySnapshot(guid, snap_guid) => {
                let Some(vm) = self.vms.get_mut(guid) else {
                    return Err((32768, "the virtual machine no longer exists".into()));
                };
                if vm.state != power::OFF && vm.state != power::SAVED {
                    return Err((
                        32775,
                        format!(
                            "'{}' cannot apply a checkpoint in its current state ({})",
                            vm.name, vm.state
                        ),
                    ));
                }
                let Some(snap) =
                    vm.snapshots.iter().find(|s| s.guid.eq_ignore_ascii_case(snap_guid)).cloned()
                else {
                    return Err((32768, "the checkpoint no longer exists".into()));
                };
                if ok {
                    vm.cpus = snap.cpus;
                    vm.memory_mb = snap.memory_mb;
                    vm.devices = snap.devices.clone();
                    vm.current_snapshot = Some(snap.guid.clone());
                    // A checkpoint of a running VM holds its memory: applying
                    // it leaves the VM saved, as Hyper-V does.
                    vm.state = if snap.power == power::RUNNING || snap.power == power::PAUSED {
                        power::SAVED
                    } else {
                        power::OFF
                    };
                    vm.state_changed = Utc::now();
                    vm.started = None;
                }
            }
            Effect::DestroySnapshot(guid, snap_guid) => {
                if ok && let Some(vm) = self.vms.get_mut(guid) {
                    let parent =
                        vm.snapshots.iter().find(|s| &s.guid == snap_guid).and_then(|s| s.parent.clone());
                    vm.snapshots.retain(|s| &s.guid != snap_guid);
                    for s in &mut vm.snapshots {
                        if s.parent.as_deref() == Some(snap_guid) {
                            s.parent = parent.clone();
                        }
                    }
                    if vm.current_snapshot.as_deref() == Some(snap_guid) {
                        vm.current_snapshot = parent;
                    }
                }
            }
            Effect::CreateDisk(path, meta) => {
                if ok {
                    if path.exists() {
                        return Err((32768, format!("the file {} already exists", path.display())));
                    }
                    if let Some(parent) = &meta.parent
                        && self.host_path(parent).is_none_or(|p| !p.is_file())
                    {
                        return Err((32779, format!("the parent disk {parent} was not found")));
                    }
                    if let Err(e) = write_disk(path, meta) {
                        return Err((32768, format!("cannot create the disk: {e}")));
                    }
                }
            }
            Effect::ResizeDisk(path, size) => {
                if ok {
                    let Some(mut meta) = read_disk(path) else {
                        return Err((32779, "the disk was not found".into()));
                    };
                    meta.size = *size;
                    if let Err(e) = write_disk(path, &meta) {
                        return Err((32768, format!("cannot resize the disk: {e}")));
                    }
                }
            }
        }
        job.outcome.clone()
    }

    /// Every instance on the host.
    pub(crate) fn instances(&self) -> Vec<Instance> {
        let mut out = vec![self.host_cs()];
        out.extend(self.services());
        for s in &self.switches {
            out.push(switch_instance(s));
        }
        for vm in self.vms.values() {
            out.push(vm_cs(vm));
            out.push(vssd(vm, &self.config.host_name));
            for s in &vm.snapshots {
                out.push(snapshot_vssd(vm, s, &self.config.host_name));
            }
            out.extend(resource_instances(vm, &self.config.host_name));
            out.extend(components(vm));
        }
        for j in self.jobs.values() {
            out.push(job_instance(j, self.config.job_retention));
        }
        out.extend(self.data_files());
        for (class, (r1, e1), (r2, e2)) in self.associations() {
            out.push(Instance::new(class).set(r1, Val::Ref(e1)).set(r2, Val::Ref(e2)));
        }
        out
    }

    /// `CIM_DataFile` (root/cimv2) of every file under the disk directory,
    /// as WMI's file provider reports them: `Name` the whole path in lower
    /// case, `Drive` (`c:`), `Path` (`\\dir\\` with both separators),
    /// `FileName` without and `Extension` without its dot.
    pub(crate) fn data_files(&self) -> Vec<Instance> {
        let mut files = Vec::new();
        walk(&self.disk_dir, &mut files);
        let prefix = self.config.disk_prefix.trim_end_matches('\\');
        let mut out = Vec::new();
        for f in files {
            let Ok(rel) = f.strip_prefix(&self.disk_dir) else { continue };
            let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            let Some((file, dirs)) = parts.split_last() else { continue };
            let full = format!("{prefix}\\{}", parts.join("\\")).to_ascii_lowercase();
            let Some((drive, _)) = full.split_once('\\') else { continue };
            let mut path = full[drive.len()..full.len() - file.len()].to_owned();
            if dirs.is_empty() && !path.ends_with('\\') {
                path.push('\\');
            }
            let lower = file.to_ascii_lowercase();
            let (stem, ext) = lower.rsplit_once('.').unwrap_or((lower.as_str(), ""));
            let size = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            out.push(
                Instance::new("CIM_DataFile")
                    .set("Caption", Val::str(full.clone()))
                    .set("Name", Val::str(full.clone()))
                    .set("CreationClassName", Val::str("CIM_LogicalFile"))
                    .set("CSCreationClassName", Val::str("Win32_ComputerSystem"))
                    .set("CSName", Val::str(self.config.host_name.clone()))
                    .set("Drive", Val::str(drive))
                    .set("Extension", Val::str(ext))
                    .set("FileName", Val::str(stem))
                    .set("FileSize", Val::U(size))
                    .set("FileType", Val::str(format!("{} File", ext.to_ascii_uppercase())))
                    .set("FSCreationClassName", Val::str("Win32_FileSystem"))
                    .set("FSName", Val::str("NTFS"))
                    .set("Path", Val::str(path))
                    .set("Readable", Val::Bool(true))
                    .set("Writeable", Val::Bool(true)),
            );
        }
        out
    }

    /// The association instances: (class, (role, end), (role, end)).
    pub(crate) fn associations(&self) -> Vec<Association> {
        let mut out = Vec::new();
        for vm in self.vms.values() {
            let cs = vm.epr();
            let settings = vssd(vm, &self.config.host_name).epr();
            out.push((
                "Msvm_SettingsDefineState",
                ("ManagedElement", cs.clone()),
                ("SettingData", settings.clone()),
            ));
            for r in resource_instances(vm, &self.config.host_name) {
                out.push((
                    "Msvm_VirtualSystemSettingDataComponent",
                    ("GroupComponent", settings.clone()),
                    ("PartComponent", r.epr()),
                ));
            }
            for c in components(vm) {
                out.push(("Msvm_SystemDevice", ("GroupComponent", cs.clone()), ("PartComponent", c.epr())));
            }
            for s in &vm.snapshots {
                out.push((
                    "Msvm_SnapshotOfVirtualSystem",
                    ("Antecedent", cs.clone()),
                    ("Dependent", snapshot_vssd(vm, s, &self.config.host_name).epr()),
                ));
            }
        }
        out
    }

    fn host_cs(&self) -> Instance {
        let name = &self.config.host_name;
        Instance::new("Msvm_ComputerSystem")
            .set("Caption", Val::str("Hosting Computer System"))
            .set("Description", Val::str("Microsoft Hosting Computer System"))
            .set("ElementName", Val::str(name))
            .set("InstallDate", Val::Null)
            .set("OperationalStatus", Val::u16s(&[2]))
            .set("HealthState", Val::U(5))
            .set("EnabledState", Val::U(2))
            .set("RequestedState", Val::U(12))
            .set("EnabledDefault", Val::U(2))
            .set("CreationClassName", Val::str("Msvm_ComputerSystem"))
            .set("Name", Val::str(name))
            .set("NameFormat", Val::Null)
            .set("ResetCapability", Val::U(1))
            .set("NumberOfNumaNodes", Val::U(1))
            .set("TimeOfLastStateChange", Val::Dt(self.booted))
    }

    fn services(&self) -> Vec<Instance> {
        let host = &self.config.host_name;
        let service = |class: &str, name: &str, caption: &str, description: &str| {
            Instance::new(class)
                .set("Caption", Val::str(caption))
                .set("Description", Val::str(description))
                .set("ElementName", Val::str(caption))
                .set("Name", Val::str(name))
                .set("OperationalStatus", Val::u16s(&[2]))
                .set("StatusDescriptions", Val::strs(["OK"]))
                .set("HealthState", Val::U(5))
                .set("EnabledState", Val::U(2))
                .set("RequestedState", Val::U(12))
                .set("EnabledDefault", Val::U(2))
                .set("SystemCreationClassName", Val::str("Msvm_ComputerSystem"))
                .set("SystemName", Val::str(host))
                .set("CreationClassName", Val::str(class))
                .set("StartMode", Val::str("Automatic"))
                .set("Started", Val::Bool(true))
        };
        vec![
            service(
                "Msvm_VirtualSystemManagementService",
                "vmms",
                "Virtual System Management Service",
                "Service for creating, manipulating, and managing virtual machines",
            ),
            service(
                "Msvm_ImageManagementService",
                "vhdsvc",
                "Hyper-V Image Management Service",
                "Provides Image Management servicing for Hyper-V",
            ),
            service(
                "Msvm_VirtualSystemSnapshotService",
                "vssnapsvc",
                "Hyper-V Virtual System Snapshot Service",
                "Service for creating, destroying, and applying virtual machine snapshots",
            ),
        ]
    }
}

/// The Windows-path mapping (see [`State::host_path`]).
/// Every file below `dir`, depth first.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

pub(crate) fn map_path(prefix: &str, dir: &Path, windows: &str) -> Option<PathBuf> {
    let lower = windows.to_ascii_lowercase();
    let p = prefix.to_ascii_lowercase();
    let p = p.trim_end_matches('\\');
    let rest = lower.strip_prefix(p)?;
    if !rest.starts_with('\\') {
        return None;
    }
    // Keep the original case of the file name.
    let rest = &windows[windows.len() - rest.len()..];
    let mut out = dir.to_path_buf();
    let mut any = false;
    for part in rest.split('\\').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." || part.contains('/') || part.contains(':') {
            return None;
        }
        out.push(part);
        any = true;
    }
    any.then_some(out)
}

fn vm_cs(vm: &Vm) -> Instance {
    let on = vm.started.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
    let running = matches!(
        vm.state,
        power::RUNNING | power::PAUSED | power::STOPPING | power::SAVING | power::PAUSING | power::RESUMING
    );
    Instance::new("Msvm_ComputerSystem")
        .set("Caption", Val::str("Virtual Machine"))
        .set("Description", Val::str("Microsoft Virtual Machine"))
        .set("ElementName", Val::str(&vm.name))
        .set("InstallDate", Val::Dt(vm.created))
        .set("OperationalStatus", Val::u16s(&[2]))
        .set("StatusDescriptions", Val::strs(["Operating normally"]))
        .set("HealthState", Val::U(5))
        .set("EnabledState", Val::U(vm.state.into()))
        .set("RequestedState", Val::U(vm.requested.into()))
        .set("EnabledDefault", Val::U(2))
        .set("TimeOfLastStateChange", Val::Dt(vm.state_changed))
        .set("CreationClassName", Val::str("Msvm_ComputerSystem"))
        .set("Name", Val::str(&vm.guid))
        .set("NameFormat", Val::Null)
        .set("ResetCapability", Val::U(1))
        .set("OnTimeInMilliseconds", Val::U(on))
        .set("ProcessID", if running { Val::U(vm.pid.into()) } else { Val::Null })
        .set("TimeOfLastConfigurationChange", Val::Dt(vm.state_changed))
        .set("NumberOfNumaNodes", Val::U(1))
        .set("ReplicationState", Val::U(0))
        .set("ReplicationHealth", Val::U(0))
        .set("ReplicationMode", Val::U(0))
        .set("EnhancedSessionModeState", Val::U(if vm.running() && vm.integration { 2 } else { 3 }))
}

fn vssd(vm: &Vm, host: &str) -> Instance {
    let parent = vm.current_snapshot.as_ref().map(|s| snapshot_epr(s).wmi_path(host));
    Instance::new("Msvm_VirtualSystemSettingData")
        .set("InstanceID", Val::str(vm.vssd_id()))
        .set("Caption", Val::str("Virtual Machine Settings"))
        .set("Description", Val::str("Active settings for the virtual machine."))
        .set("ElementName", Val::str(&vm.name))
        .set("VirtualSystemIdentifier", Val::str(&vm.guid))
        .set("VirtualSystemType", Val::str("Microsoft:Hyper-V:System:Realized"))
        .set("Notes", Val::strs(vm.notes.clone()))
        .set("CreationTime", Val::Dt(vm.created))
        .set("ConfigurationID", Val::str(&vm.guid))
        .set("ConfigurationDataRoot", Val::str("C:\\ProgramData\\Microsoft\\Windows\\Hyper-V"))
        .set(
            "ConfigurationFile",
            Val::str(format!(
                "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V\\Virtual Machines\\{}.vmcx",
                vm.guid
            )),
        )
        .set("AutomaticStartupAction", Val::U(2))
        .set("AutomaticShutdownAction", Val::U(4))
        .set("AutomaticRecoveryAction", Val::U(3))
        .set("Parent", parent.map(Val::Str).unwrap_or(Val::Null))
        .set("IsSaved", Val::Bool(vm.state == power::SAVED))
        .set("Version", Val::str("9.0"))
        .set("VirtualSystemSubType", Val::str(&vm.subtype))
        .set("SecureBootEnabled", Val::Bool(vm.subtype.ends_with(":2")))
}

pub(crate) fn snapshot_epr(guid: &str) -> Epr {
    Epr {
        class: "Msvm_VirtualSystemSettingData".into(),
        selectors: vec![("InstanceID".into(), format!("Microsoft:{guid}"))],
    }
}

fn snapshot_vssd(vm: &Vm, s: &Snapshot, host: &str) -> Instance {
    Instance::new("Msvm_VirtualSystemSettingData")
        .set("InstanceID", Val::str(format!("Microsoft:{}", s.guid)))
        .set("Caption", Val::str("Virtual Machine Settings"))
        .set("Description", Val::str("Checkpoint settings for the virtual machine."))
        .set("ElementName", Val::str(&s.name))
        .set("VirtualSystemIdentifier", Val::str(&vm.guid))
        .set("VirtualSystemType", Val::str("Microsoft:Hyper-V:Snapshot:Realized"))
        .set("Notes", Val::strs(s.notes.clone()))
        .set("CreationTime", Val::Dt(s.created))
        .set("ConfigurationID", Val::str(&s.guid))
        .set(
            "Parent",
            s.parent.as_ref().map(|p| Val::Str(snapshot_epr(p).wmi_path(host))).unwrap_or(Val::Null),
        )
        .set("IsSaved", Val::Bool(s.power == power::RUNNING || s.power == power::PAUSED))
        .set("Version", Val::str("9.0"))
        .set("VirtualSystemSubType", Val::str(&vm.subtype))
}

/// The VM's RASDs: processor, memory, then the devices.
pub(crate) fn resource_instances(vm: &Vm, host: &str) -> Vec<Instance> {
    let mut out = vec![
        Instance::new("Msvm_ProcessorSettingData")
            .set("InstanceID", Val::str(vm.processor_id()))
            .set("Caption", Val::str("Processor"))
            .set("Description", Val::str("Settings for Microsoft Virtual Processor."))
            .set("ElementName", Val::str("Processor"))
            .set("ResourceType", Val::U(3))
            .set("ResourceSubType", Val::str("Microsoft:Hyper-V:Processor"))
            .set("PoolID", Val::str(""))
            .set("ConsumerVisibility", Val::U(3))
            .set("AllocationUnits", Val::str("percent / 1000"))
            .set("VirtualQuantity", Val::U(vm.cpus))
            .set("Reservation", Val::U(0))
            .set("Limit", Val::U(100000))
            .set("Weight", Val::U(100))
            .set("AutomaticAllocation", Val::Bool(true))
            .set("AutomaticDeallocation", Val::Bool(true))
            .set("VirtualQuantityUnits", Val::str("count"))
            .set("LimitCPUID", Val::Bool(false))
            .set("HwThreadsPerCore", Val::U(0))
            .set("LimitProcessorFeatures", Val::Bool(false))
            .set("EnableHostResourceProtection", Val::Bool(false))
            .set("ExposeVirtualizationExtensions", Val::Bool(false)),
        Instance::new("Msvm_MemorySettingData")
            .set("InstanceID", Val::str(vm.memory_id()))
            .set("Caption", Val::str("Memory"))
            .set("Description", Val::str("Settings for Microsoft Virtual Machine Memory."))
            .set("ElementName", Val::str("Memory"))
            .set("ResourceType", Val::U(4))
            .set("ResourceSubType", Val::str("Microsoft:Hyper-V:Memory"))
            .set("PoolID", Val::str(""))
            .set("ConsumerVisibility", Val::U(2))
            .set("AllocationUnits", Val::str("byte * 2^20"))
            .set("VirtualQuantity", Val::U(vm.memory_mb))
            .set("Reservation", Val::U(vm.memory_mb))
            .set("Limit", Val::U(vm.memory_mb))
            .set("Weight", Val::U(5000))
            .set("AutomaticAllocation", Val::Bool(true))
            .set("AutomaticDeallocation", Val::Bool(true))
            .set("VirtualQuantityUnits", Val::str("byte * 2^20"))
            .set("DynamicMemoryEnabled", Val::Bool(false))
            .set("TargetMemoryBuffer", Val::U(20))
            .set("IsVirtualized", Val::Bool(true))
            .set("SwapFilesInUse", Val::Bool(false)),
    ];
    for d in &vm.devices {
        out.push(device_instance(vm, d, host));
    }
    out
}

fn device_instance(vm: &Vm, d: &Device, host: &str) -> Instance {
    let parent = d.parent.as_ref().and_then(|p| vm.device(p)).map(|p| {
        Epr { class: p.kind.class().into(), selectors: vec![("InstanceID".into(), p.instance_id.clone())] }
            .wmi_path(host)
    });
    let caption = match d.kind {
        DevKind::Rasd => "Resource",
        DevKind::Sasd => "Hard Disk Image",
        DevKind::Port => "Virtual Ethernet Port",
        DevKind::Connection => "Ethernet Switch Port Settings",
    };
    let mut i = Instance::new(d.kind.class())
        .set("InstanceID", Val::str(&d.instance_id))
        .set("Caption", Val::str(caption))
        .set("ElementName", Val::str(&d.element_name))
        .set("ResourceType", Val::U(d.resource_type.into()))
        .set("ResourceSubType", Val::str(&d.subtype))
        .set("PoolID", Val::str(""))
        .set("ConsumerVisibility", Val::U(3))
        .set("HostResource", Val::strs(d.host_resource.clone()))
        .set("VirtualQuantity", Val::U(1))
        .set("Limit", Val::U(1))
        .set("Weight", Val::U(0))
        .set("AutomaticAllocation", Val::Bool(true))
        .set("AutomaticDeallocation", Val::Bool(true))
        .set("Parent", parent.map(Val::Str).unwrap_or(Val::Null))
        .set("AddressOnParent", d.address_on_parent.clone().map(Val::Str).unwrap_or(Val::Null))
        .set("VirtualQuantityUnits", Val::str("count"));
    match d.kind {
        DevKind::Rasd => {
            i = i.set("VirtualSystemIdentifiers", Val::strs(d.vsi.clone()));
        }
        DevKind::Sasd => {
            i = i
                .set("Access", Val::U(3))
                .set("HostResourceBlockSize", Val::Null)
                .set("CachingMode", Val::U(0));
        }
        DevKind::Port => {
            i = i
                .set("Address", d.address.clone().map(Val::Str).unwrap_or(Val::Null))
                .set("StaticMacAddress", Val::Bool(d.static_mac))
                .set("VirtualSystemIdentifiers", Val::strs(d.vsi.clone()))
                .set("DeviceNamingEnabled", Val::Bool(false))
                .set("AllowPacketDirect", Val::Bool(false))
                .set("ClusterMonitored", Val::Bool(true));
        }
        DevKind::Connection => {
            i = i.set("EnabledState", Val::U(d.enabled_state.into()));
        }
    }
    i
}

/// The logical devices a running VM exposes: the shutdown component (with
/// integration services) and the KVP exchange component.
fn components(vm: &Vm) -> Vec<Instance> {
    if !matches!(vm.state, power::RUNNING | power::STOPPING | power::PAUSED) {
        return Vec::new();
    }
    let device = |class: &str, ic: &str, name: &str, description: &str| {
        Instance::new(class)
            .set("Caption", Val::str(name))
            .set("Description", Val::str(description))
            .set("ElementName", Val::str(name))
            .set("Name", Val::str(name))
            .set("OperationalStatus", Val::u16s(&[2]))
            .set("StatusDescriptions", Val::strs(["OK"]))
            .set("HealthState", Val::U(5))
            .set("EnabledState", Val::U(2))
            .set("RequestedState", Val::U(12))
            .set("EnabledDefault", Val::U(7))
            .set("SystemCreationClassName", Val::str("Msvm_ComputerSystem"))
            .set("SystemName", Val::str(&vm.guid))
            .set("CreationClassName", Val::str(class))
            .set("DeviceID", Val::str(format!("Microsoft:{}\\{ic}", vm.guid)))
            .set("Availability", Val::U(3))
            .set("AdditionalAvailability", Val::u16s(&[3]))
    };
    let mut out = Vec::new();
    if vm.integration {
        out.push(device("Msvm_ShutdownComponent", SHUTDOWN_IC, "Shutdown", "Microsoft Shutdown Service"));
    }
    let mut kvp = device(
        "Msvm_KvpExchangeComponent",
        KVP_IC,
        "Key-Value Pair Exchange",
        "Microsoft Key-Value Pair Exchange Service",
    );
    let has_nic = vm.devices.iter().any(|d| d.kind == DevKind::Connection);
    let items: Vec<String> = if vm.integration && vm.state == power::RUNNING {
        let item = |name: &str, data: &str| {
            Instance::new("Msvm_KvpExchangeDataItem")
                .set("Caption", Val::str("Key-Value Pair Exchange Data Item"))
                .set("Name", Val::str(name))
                .set("Data", Val::str(data))
                .set("Source", Val::U(2))
                .to_cimxml()
        };
        let mut v = vec![
            item("FullyQualifiedDomainName", &vm.name),
            item("OSName", "Linux"),
            item("IntegrationServicesVersion", "3.1"),
        ];
        if has_nic && !vm.guest_ip.is_empty() {
            v.push(item("NetworkAddressIPv4", &vm.guest_ip));
            v.push(item("RDPAddressIPv4", &vm.guest_ip));
        }
        v
    } else {
        Vec::new()
    };
    kvp = kvp.set("GuestIntrinsicExchangeItems", Val::strs(items));
    out.push(kvp);
    out
}

fn switch_instance(s: &Switch) -> Instance {
    Instance::new("Msvm_VirtualEthernetSwitch")
        .set("Caption", Val::str("Virtual Switch"))
        .set("Description", Val::str("Microsoft Virtual Switch"))
        .set("ElementName", Val::str(&s.name))
        .set("OperationalStatus", Val::u16s(&[2]))
        .set("HealthState", Val::U(5))
        .set("EnabledState", Val::U(2))
        .set("RequestedState", Val::U(12))
        .set("EnabledDefault", Val::U(2))
        .set("CreationClassName", Val::str("Msvm_VirtualEthernetSwitch"))
        .set("Name", Val::str(&s.guid))
        .set("ResetCapability", Val::U(5))
}

/// The switch's reference.
pub(crate) fn switch_epr(s: &Switch) -> Epr {
    switch_instance(s).epr()
}

fn job_instance(j: &Job, retention: Duration) -> Instance {
    let (state, percent, status) = match (&j.ended, &j.outcome) {
        (None, _) => (4, 50, "Job is running"),
        (Some(_), Ok(())) => (7, 100, "Job completed successfully"),
        (Some(_), Err(_)) => (10, 100, "Job failed"),
    };
    let elapsed = match j.ended {
        Some((t, _)) => t.duration_since(j.started),
        None => j.started.elapsed(),
    };
    let (code, description) = match (&j.ended, &j.outcome) {
        (Some(_), Err((c, m))) => (u64::from(*c), Val::str(m)),
        _ => (0, Val::Null),
    };
    Instance::new("Msvm_ConcreteJob")
        .set("InstanceID", Val::str(&j.id))
        .set("Caption", Val::str(&j.description))
        .set("Description", Val::str(&j.description))
        .set("ElementName", Val::str(&j.description))
        .set("Name", Val::str(&j.description))
        .set("OperationalStatus", Val::u16s(if state == 10 { &[6] } else { &[2] }))
        .set("StatusDescriptions", Val::strs([status]))
        .set("HealthState", Val::U(5))
        .set("JobStatus", Val::str(status))
        .set("TimeSubmitted", Val::Dt(j.submitted))
        .set("StartTime", Val::Dt(j.submitted))
        .set("ElapsedTime", Val::Interval(elapsed))
        .set("JobRunTimes", Val::U(1))
        .set("LocalOrUtcTime", Val::U(2))
        .set("Priority", Val::U(0))
        .set("PercentComplete", Val::U(percent))
        .set("DeleteOnCompletion", Val::Bool(false))
        .set("ErrorCode", Val::U(code))
        .set("ErrorDescription", description.clone())
        .set("ErrorSummaryDescription", description)
        .set("JobState", Val::U(state))
        .set("TimeOfLastStateChange", Val::Dt(j.ended.map(|(_, d)| d).unwrap_or(j.submitted)))
        .set("TimeBeforeRemoval", Val::Interval(retention))
        .set("Cancellable", Val::Bool(false))
        .set("JobType", j.job_type.map(|t| Val::U(t.into())).unwrap_or(Val::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_map_under_the_disk_directory() {
        let dir = Path::new("/tmp/d");
        let check = |win: &str, expected: Option<&str>| {
            assert_eq!(map_path("C:\\Hyper-V\\hcp\\", dir, win), expected.map(PathBuf::from), "{win}");
        };
        check("C:\\Hyper-V\\hcp\\a.vhdx", Some("/tmp/d/a.vhdx"));
        check("c:\\hyper-v\\HCP\\Sub\\B.ISO", Some("/tmp/d/Sub/B.ISO"));
        check("C:\\Hyper-V\\hcpx\\a.vhdx", None);
        check("C:\\Hyper-V\\hcp\\..\\a.vhdx", None);
        check("C:\\Hyper-V\\hcp\\", None);
        check("D:\\a.vhdx", None);
    }
}
