//! The methods of WIRE.md's table, after the WS-Management layer checked
//! parameter names and CIM types: embedded instances, references, and the
//! host's rules (power states, device limits, files).
//!
//! How refusals come back (README "Choices"):
//! - a malformed request (an embedded instance that does not fit its class,
//!   a reference of the wrong class or with the wrong keys, a path that is
//!   not a path, a missing required parameter) gets the method's Invalid
//!   Parameter return value (4 for the management and snapshot services,
//!   32773 for the others) and is recorded as a violation; an embedded
//!   element tree instead of CIM-XML text is a `w:SchemaValidationError`
//!   fault;
//! - a reference to an instance that no longer exists gets Invalid
//!   Parameter without a violation;
//! - state rules get Invalid State where the method documents one (5, or
//!   32775 for RequestStateChange and the image service);
//!   AddResourceSettings, which documents none, starts a job that ends in
//!   state 10 with ErrorCode 32775 (or 32773 for limits, 32779 for a
//!   missing file);
//! - everything that changes the host returns 4096 with a job, and
//!   InitiateShutdown returns 0 without one.

use std::collections::BTreeMap;

use chrono::Utc;

use crate::catalog::{Catalog, ClassDef, MethodDef};
use crate::cimxml::{self, EmbedError, Embedded};
use crate::model::{Epr, Instance, Val};
use crate::state::{DevKind, Device, DiskMeta, Effect, Snapshot, State, Vm, power, read_disk, switch_epr};
use crate::wql::parse_object_path;
use crate::wsman::Fault;

/// A parameter value as sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PVal {
    Text(String),
    Nil,
    Ref(Epr),
}

/// The input parameters by name (arrays repeat).
#[derive(Debug, Default)]
pub(crate) struct Params {
    pub(crate) values: BTreeMap<String, Vec<PVal>>,
}

impl Params {
    fn text(&self, name: &str) -> Option<&str> {
        self.values.get(name)?.iter().find_map(|v| match v {
            PVal::Text(t) => Some(t.as_str()),
            _ => None,
        })
    }

    fn texts(&self, name: &str) -> Vec<&str> {
        self.values
            .get(name)
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| match v {
                        PVal::Text(t) => Some(t.as_str()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn eprs(&self, name: &str) -> Vec<&Epr> {
        self.values
            .get(name)
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| match v {
                        PVal::Ref(e) => Some(e),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn epr(&self, name: &str) -> Option<&Epr> {
        self.eprs(name).into_iter().next()
    }

    /// Present with a non-nil value.
    fn given(&self, name: &str) -> bool {
        self.values.get(name).is_some_and(|vs| vs.iter().any(|v| *v != PVal::Nil))
    }
}

/// What a method returns.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub(crate) return_value: u32,
    /// Out references in order (a REF[] repeats its name).
    pub(crate) refs: Vec<(String, Epr)>,
    /// Out strings (an embedded instance's CIM-XML text).
    pub(crate) texts: Vec<(String, String)>,
}

/// Why a call stopped early.
enum Refusal {
    Fault(Fault),
    Out(Output),
}

type R<T> = Result<T, Refusal>;

/// Return values.
mod rv {
    pub(super) const STARTED: u32 = 4096;
    pub(super) const INVALID_STATE_DMTF: u32 = 5;
    pub(super) const INVALID_TYPE: u32 = 6;
    pub(super) const IN_USE: u32 = 32774;
    pub(super) const INVALID_STATE: u32 = 32775;
    pub(super) const FILE_NOT_FOUND: u32 = 32779;
}

/// Job error codes.
mod ec {
    pub(super) const INVALID_PARAMETER: u16 = 32773;
    pub(super) const INVALID_STATE: u16 = 32775;
    pub(super) const FILE_NOT_FOUND: u16 = 32779;
}

struct Call<'a> {
    s: &'a mut State,
    method: String,
    /// This method's Invalid Parameter value.
    invalid: u32,
}

impl Call<'_> {
    /// Refuses with a return value; `violation` records the reason.
    fn refuse(&mut self, rv: u32, msg: impl Into<String>, violation: bool) -> Refusal {
        let msg = msg.into();
        if violation {
            self.s.violations.push(format!("{}: {msg}", self.method));
        }
        tracing::debug!(method = %self.method, rv, %msg, "refused");
        Refusal::Out(Output { return_value: rv, refs: Vec::new(), texts: Vec::new() })
    }

    fn bad(&mut self, msg: impl Into<String>) -> Refusal {
        let rv = self.invalid;
        self.refuse(rv, msg, true)
    }

    fn embedded(&mut self, text: &str, expected: &str) -> R<Embedded> {
        match cimxml::parse(text, expected) {
            Ok(e) => Ok(e),
            Err(EmbedError::NotCimXml(m)) => {
                Err(Refusal::Fault(Fault::schema(format!("{}: {m}", self.method))))
            }
            Err(EmbedError::Invalid(m)) => Err(self.bad(m)),
        }
    }

    /// Resolves a reference parameter to an existing instance of `expected`.
    fn lookup(&mut self, e: &Epr, expected: &str) -> R<Instance> {
        let catalog = Catalog::get();
        if !catalog.is_a(&e.class, expected) {
            return Err(self.bad(format!("the reference is to a {}, not a {expected}", e.class)));
        }
        let keys = catalog.class(&e.class).map(|c| c.keys.clone()).unwrap_or_default();
        let mut names: Vec<&String> = e.selectors.iter().map(|(k, _)| k).collect();
        names.sort();
        let mut want: Vec<&String> = keys.iter().collect();
        want.sort();
        if names != want {
            return Err(self.bad(format!(
                "a reference to {} needs exactly the selectors {}",
                e.class,
                keys.join(", ")
            )));
        }
        let found = self.s.instances().into_iter().find(|i| {
            catalog.is_a(&i.class, &e.class)
                && e.selectors.iter().all(|(k, v)| i.key(k).eq_ignore_ascii_case(v))
        });
        match found {
            Some(i) => Ok(i),
            None => {
                let rv = self.invalid;
                Err(self.refuse(rv, format!("the referenced {} does not exist", e.class), false))
            }
        }
    }

    /// The InstanceID an object path in a `Parent` property names; the
    /// path must name `class` by its InstanceID.
    fn setting_path(&mut self, path: &str, class: &str) -> R<String> {
        let p = match parse_object_path(path) {
            Ok(p) => p,
            Err(e) => return Err(self.bad(format!("'{path}' is not a WMI object path: {e}"))),
        };
        if let Some(ns) = &p.namespace
            && !ns.replace('/', "\\").eq_ignore_ascii_case("root\\virtualization\\v2")
        {
            return Err(self.bad(format!("'{path}' is not in root\\virtualization\\v2")));
        }
        if !p.class.eq_ignore_ascii_case(class) {
            return Err(self.bad(format!("'{path}' names a {}, not a {class}", p.class)));
        }
        match p.keys.as_slice() {
            [(k, v)] if k == "InstanceID" => Ok(v.clone()),
            _ => Err(self.bad(format!("'{path}' must name the instance by InstanceID alone"))),
        }
    }

    fn job(&mut self, description: &str, job_type: Option<u16>, effect: Effect) -> String {
        let method = self.method.clone();
        self.s.start_job(&method, description, job_type, effect)
    }

    /// A job that fails: the host checked the request in the job.
    fn failed_job(&mut self, description: &str, code: u16, msg: String) -> Output {
        let id = uuid::Uuid::new_v4().to_string().to_uppercase();
        let method = self.method.clone();
        self.s.start_job_with(id.clone(), &method, description, None, Effect::None, Err((code, msg)));
        started(&id, Vec::new())
    }
}

fn job_epr(id: &str) -> Epr {
    Epr { class: "Msvm_ConcreteJob".into(), selectors: vec![("InstanceID".into(), id.to_owned())] }
}

fn started(job: &str, mut refs: Vec<(String, Epr)>) -> Output {
    refs.insert(0, ("Job".to_owned(), job_epr(job)));
    Output { return_value: rv::STARTED, refs, texts: Vec::new() }
}

fn setting_epr(kind_class: &str, id: &str) -> Epr {
    Epr { class: kind_class.to_owned(), selectors: vec![("InstanceID".into(), id.to_owned())] }
}

/// Runs a method on `target`.
pub(crate) fn invoke(
    s: &mut State,
    target: &Instance,
    class: &ClassDef,
    method: &MethodDef,
    p: &Params,
) -> Result<Output, Fault> {
    let invalid = match class.name.as_str() {
        "Msvm_VirtualSystemManagementService" | "Msvm_VirtualSystemSnapshotService" => 4,
        "CIM_DataFile" => file_rv::INVALID_PARAMETER,
        _ => 32773,
    };
    let mut c = Call { s, method: method.name.clone(), invalid };
    let result = (|| -> R<Output> {
        for d in method.params.iter().filter(|d| d.input && d.required) {
            if !p.given(&d.name) {
                return Err(c.bad(format!("the required parameter {} is missing", d.name)));
            }
        }
        if let Some(n) = c.s.faults.in_use.get_mut(&method.name).filter(|n| **n > 0) {
            *n -= 1;
            return Err(c.refuse(rv::IN_USE, "injected: in use", false));
        }
        match (class.name.as_str(), method.name.as_str()) {
            (_, "DefineSystem") => define_system(&mut c, p),
            (_, "DestroySystem") => destroy_system(&mut c, p),
            (_, "ModifySystemSettings") => modify_system_settings(&mut c, p),
            (_, "AddResourceSettings") => add_resource_settings(&mut c, p),
            (_, "ModifyResourceSettings") => modify_resource_settings(&mut c, p),
            (_, "RemoveResourceSettings") => remove_resource_settings(&mut c, p),
            (_, "RequestStateChange") => request_state_change(&mut c, target, p),
            (_, "InitiateShutdown") => initiate_shutdown(&mut c, target),
            (_, "CreateVirtualHardDisk") => create_virtual_hard_disk(&mut c, p),
            (_, "ResizeVirtualHardDisk") => resize_virtual_hard_disk(&mut c, p),
            (_, "GetVirtualHardDiskSettingData") => get_virtual_hard_disk_setting_data(&mut c, p),
            (_, "ConvertVirtualHardDisk") => convert_virtual_hard_disk(&mut c, p),
            ("CIM_DataFile", "Delete") => delete_file(&mut c, target),
            (_, "CreateSnapshot") => create_snapshot(&mut c, p),
            (_, "ApplySnapshot") => apply_snapshot(&mut c, p),
            (_, "DestroySnapshot") => destroy_snapshot(&mut c, p),
            (cl, m) => Err(c.bad(format!("{cl}.{m} is not simulated"))),
        }
    })();
    match result {
        Ok(o) | Err(Refusal::Out(o)) => Ok(o),
        Err(Refusal::Fault(f)) => Err(f),
    }
}

fn is_hex_mac(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_memory(c: &mut Call<'_>, mb: u64) -> R<()> {
    if !mb.is_multiple_of(2) {
        return Err(c.bad(format!("memory must be an even number of MB, not {mb}")));
    }
    let (min, max) = (c.s.config.memory_min_mb, c.s.config.memory_max_mb);
    if mb < min || mb > max {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("memory {mb} MB is outside {min}..={max} MB"), false));
    }
    Ok(())
}

fn check_cpus(c: &mut Call<'_>, n: u64) -> R<()> {
    let max = c.s.config.max_vcpus;
    if n == 0 || n > max {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("{n} virtual processors is outside 1..={max}"), false));
    }
    Ok(())
}

fn define_system(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let e = c.embedded(p.text("SystemSettings").unwrap_or(""), "Msvm_VirtualSystemSettingData")?;
    let name = e.scalar("ElementName").unwrap_or("New Virtual Machine").to_owned();
    if name.chars().count() > 100 {
        return Err(c.bad("ElementName is longer than 100 characters"));
    }
    let subtype = e.scalar("VirtualSystemSubType").unwrap_or("Microsoft:Hyper-V:SubType:1").to_owned();
    if subtype != "Microsoft:Hyper-V:SubType:1" && subtype != "Microsoft:Hyper-V:SubType:2" {
        return Err(c.bad(format!("VirtualSystemSubType '{subtype}' is neither generation 1 nor 2")));
    }
    if let Some(t) = e.scalar("VirtualSystemType")
        && t != "Microsoft:Hyper-V:System:Realized"
    {
        return Err(c.bad(format!("VirtualSystemType '{t}' cannot be defined")));
    }
    if p.given("ReferenceConfiguration") {
        return Err(c.bad("ReferenceConfiguration is not simulated"));
    }
    let (mut cpus, mut memory_mb) = (1, 512);
    for text in p.texts("ResourceSettings") {
        let r = c.embedded(text, "CIM_ResourceAllocationSettingData")?;
        match r.class.as_str() {
            "Msvm_ProcessorSettingData" => {
                cpus = r.uint("VirtualQuantity").unwrap_or(cpus);
                check_cpus(c, cpus)?;
            }
            "Msvm_MemorySettingData" => {
                memory_mb = r.uint("VirtualQuantity").unwrap_or(memory_mb);
                check_memory(c, memory_mb)?;
            }
            other => {
                return Err(
                    c.bad(format!("{other} in DefineSystem is not simulated: use AddResourceSettings"))
                );
            }
        }
    }
    let guid = uuid::Uuid::new_v4().to_string().to_uppercase();
    let n = c.s.next();
    let now = Utc::now();
    let mut vm = Vm {
        guid: guid.clone(),
        name,
        notes: e.array("Notes"),
        subtype: subtype.clone(),
        created: now,
        state: power::OFF,
        requested: power::NOT_APPLICABLE,
        state_changed: now,
        started: None,
        pid: 0,
        cpus,
        memory_mb,
        devices: Vec::new(),
        snapshots: Vec::new(),
        current_snapshot: None,
        integration: !c.s.faults.no_shutdown_component,
        guest_ip: format!("192.168.{}.{}", 100 + n / 250, n % 250 + 2),
        shutdown_at: None,
        busy: None,
        counters: Default::default(),
    };
    if subtype.ends_with(":1") {
        // Generation 1 VMs come with their two IDE controllers.
        for channel in 0..2 {
            vm.devices.push(Device {
                kind: DevKind::Rasd,
                instance_id: format!("Microsoft:{guid}\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\{channel}"),
                element_name: "IDE Controller".into(),
                resource_type: 5,
                subtype: "Microsoft:Hyper-V:Emulated IDE Controller".into(),
                parent: None,
                address_on_parent: None,
                host_resource: Vec::new(),
                address: Some(channel.to_string()),
                static_mac: false,
                vsi: Vec::new(),
                enabled_state: 2,
            });
        }
    }
    let system = vm.epr();
    c.s.vms.insert(guid.clone(), vm);
    let job = c.job("Creating virtual machine", Some(1), Effect::Define(guid));
    Ok(started(&job, vec![("ResultingSystem".into(), system)]))
}

/// The VM a computer-system reference names (not the host).
fn vm_of_system(c: &mut Call<'_>, e: &Epr) -> R<String> {
    let inst = c.lookup(e, "CIM_ComputerSystem")?;
    let name = inst.key("Name").to_uppercase();
    if !c.s.vms.contains_key(&name) {
        return Err(c.bad(format!("{} is not a virtual machine", inst.key("Name"))));
    }
    Ok(name)
}

fn destroy_system(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let Some(e) = p.epr("AffectedSystem").cloned() else {
        return Err(c.bad("AffectedSystem is not a reference"));
    };
    let guid = vm_of_system(c, &e)?;
    let vm = &c.s.vms[&guid];
    if !(vm.state == power::OFF || vm.state == power::SAVED) || vm.busy.is_some() {
        let msg = format!("'{}' must be off or saved to be deleted (state {})", vm.name, vm.state);
        return Err(c.refuse(rv::INVALID_STATE_DMTF, msg, false));
    }
    let job = c.job("Deleting virtual machine", Some(3), Effect::Destroy(guid));
    Ok(started(&job, Vec::new()))
}

/// Finds the VM (and snapshot) whose settings have this InstanceID.
fn settings_owner(s: &State, instance_id: &str) -> Option<(String, Option<String>)> {
    for vm in s.vms.values() {
        if vm.vssd_id().eq_ignore_ascii_case(instance_id) {
            return Some((vm.guid.clone(), None));
        }
        for snap in &vm.snapshots {
            if format!("Microsoft:{}", snap.guid).eq_ignore_ascii_case(instance_id) {
                return Some((vm.guid.clone(), Some(snap.guid.clone())));
            }
        }
    }
    None
}

fn modify_system_settings(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let e = c.embedded(p.text("SystemSettings").unwrap_or(""), "Msvm_VirtualSystemSettingData")?;
    let Some(id) = e.scalar("InstanceID").map(str::to_owned) else {
        return Err(c.bad("the settings have no InstanceID to select them"));
    };
    let Some((guid, snapshot)) = settings_owner(c.s, &id) else {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("no settings {id}"), false));
    };
    let name = e.scalar("ElementName").map(str::to_owned);
    if name.as_ref().is_some_and(|n| n.chars().count() > 100) {
        return Err(c.bad("ElementName is longer than 100 characters"));
    }
    let notes = e.has("Notes").then(|| e.array("Notes"));
    let Some(vm) = c.s.vms.get_mut(&guid) else { return Err(c.bad("the virtual machine vanished")) };
    let before = Box::new(vm.clone());
    match snapshot {
        None => {
            if let Some(n) = name {
                vm.name = n;
            }
            if let Some(n) = notes {
                vm.notes = n;
            }
        }
        Some(sg) => {
            if let Some(snap) = vm.snapshots.iter_mut().find(|s| s.guid == sg) {
                if let Some(n) = name {
                    snap.name = n;
                }
                if let Some(n) = notes {
                    snap.notes = n;
                }
            }
        }
    }
    let job = c.job("Modifying virtual machine settings", Some(2), Effect::Undo(before));
    Ok(started(&job, Vec::new()))
}

/// Why one device could not be added.
enum AddError {
    Refused(Refusal),
    /// The job fails with this error code and description.
    Job(u16, String),
}

impl From<Refusal> for AddError {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

fn add_resource_settings(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let Some(e) = p.epr("AffectedConfiguration").cloned() else {
        return Err(c.bad("AffectedConfiguration is not a reference"));
    };
    let inst = c.lookup(&e, "CIM_VirtualSystemSettingData")?;
    let id = inst.key("InstanceID");
    let guid = match settings_owner(c.s, &id) {
        Some((g, None)) => g,
        _ => {
            return Err(c.bad(format!(
                "{id} is not the settings of a virtual machine (a checkpoint's cannot change)"
            )));
        }
    };
    let mut settings = Vec::new();
    for text in p.texts("ResourceSettings") {
        settings.push(c.embedded(text, "CIM_ResourceAllocationSettingData")?);
    }
    if settings.is_empty() {
        return Err(c.bad("ResourceSettings is empty"));
    }
    let before = c.s.vms[&guid].clone();
    let mut work = before.clone();
    let mut results = Vec::new();
    for e in &settings {
        match add_one(c, &work, e) {
            Ok(d) => {
                results.push((
                    "ResultingResourceSettings".to_owned(),
                    setting_epr(d.kind.class(), &d.instance_id),
                ));
                work.devices.push(d);
            }
            Err(AddError::Refused(r)) => return Err(r),
            Err(AddError::Job(code, msg)) => {
                tracing::debug!(%msg, "AddResourceSettings job fails");
                return Ok(c.failed_job("Adding resource settings", code, msg));
            }
        }
    }
    c.s.vms.insert(guid, work);
    let job = c.job("Adding resource settings", Some(2), Effect::Undo(Box::new(before)));
    Ok(started(&job, results))
}

const SCSI: &str = "Microsoft:Hyper-V:Synthetic SCSI Controller";
const IDE: &str = "Microsoft:Hyper-V:Emulated IDE Controller";
const DISK_DRIVE: &str = "Microsoft:Hyper-V:Synthetic Disk Drive";
const DVD_DRIVE: &str = "Microsoft:Hyper-V:Synthetic DVD Drive";
const VHD: &str = "Microsoft:Hyper-V:Virtual Hard Disk";
const ISO: &str = "Microsoft:Hyper-V:Virtual CD/DVD Disk";
const NIC: &str = "Microsoft:Hyper-V:Synthetic Ethernet Port";
const CONNECTION: &str = "Microsoft:Hyper-V:Ethernet Connection";

fn add_one(c: &mut Call<'_>, vm: &Vm, e: &Embedded) -> Result<Device, AddError> {
    let Some(rt) = e.uint("ResourceType") else { return Err(c.bad("ResourceType is required").into()) };
    let Some(sub) = e.scalar("ResourceSubType").map(str::to_owned) else {
        return Err(c.bad("ResourceSubType is required").into());
    };
    let name = e.scalar("ElementName").map(str::to_owned);
    let new_id = || format!("Microsoft:{}\\{}", vm.guid, uuid::Uuid::new_v4().to_string().to_uppercase());
    let mut d = Device {
        kind: DevKind::Rasd,
        instance_id: String::new(),
        element_name: String::new(),
        resource_type: rt as u16,
        subtype: sub.clone(),
        parent: None,
        address_on_parent: None,
        host_resource: Vec::new(),
        address: None,
        static_mac: false,
        vsi: Vec::new(),
        enabled_state: 2,
    };
    let off = vm.state == power::OFF;
    match (e.class.as_str(), rt, sub.as_str()) {
        ("Msvm_ResourceAllocationSettingData", 6, SCSI) => {
            if !off {
                return Err(AddError::Job(
                    ec::INVALID_STATE,
                    "a SCSI controller can be added only while the VM is off".into(),
                ));
            }
            if vm.devices.iter().filter(|d| d.subtype == SCSI).count() >= 4 {
                return Err(AddError::Job(
                    ec::INVALID_PARAMETER,
                    "a VM has at most 4 SCSI controllers".into(),
                ));
            }
            d.instance_id = new_id();
            d.element_name = name.unwrap_or_else(|| "SCSI Controller".into());
            d.vsi = vec![format!("{{{}}}", uuid::Uuid::new_v4())];
        }
        ("Msvm_ResourceAllocationSettingData", 5, IDE) => {
            return Err(AddError::Job(
                ec::INVALID_PARAMETER,
                if vm.subtype.ends_with(":2") {
                    "generation 2 VMs have no IDE controller".into()
                } else {
                    "a generation 1 VM has exactly its 2 IDE controllers".into()
                },
            ));
        }
        ("Msvm_ResourceAllocationSettingData", 17, DISK_DRIVE)
        | ("Msvm_ResourceAllocationSettingData", 16, DVD_DRIVE) => {
            let Some(parent) = e.scalar("Parent") else {
                return Err(c.bad("a drive needs Parent (its controller)").into());
            };
            let pid = c.setting_path(parent, "Msvm_ResourceAllocationSettingData")?;
            let Some(ctrl) =
                vm.device(&pid).filter(|d| d.resource_type == 5 || d.resource_type == 6).cloned()
            else {
                return Err(c.bad(format!("Parent {pid} is not a controller of this VM")).into());
            };
            let slots = if ctrl.resource_type == 6 { 64 } else { 2 };
            if ctrl.resource_type == 5 && !off {
                return Err(AddError::Job(
                    ec::INVALID_STATE,
                    "IDE drives can be added only while the VM is off".into(),
                ));
            }
            let taken = |slot: u32| {
                vm.devices.iter().any(|x| {
                    x.parent.as_deref() == Some(ctrl.instance_id.as_str())
                        && x.address_on_parent.as_deref() == Some(&slot.to_string())
                })
            };
            let slot = match e.scalar("AddressOnParent") {
                Some(a) => match a.trim().parse::<u32>() {
                    Ok(v) if v < slots => v,
                    _ => {
                        return Err(c
                            .bad(format!("AddressOnParent '{a}' is not a slot 0..{slots} of the controller"))
                            .into());
                    }
                },
                None => match (0..slots).find(|s| !taken(*s)) {
                    Some(s) => s,
                    None => {
                        return Err(AddError::Job(
                            ec::INVALID_PARAMETER,
                            "the controller has no free slot".into(),
                        ));
                    }
                },
            };
            if taken(slot) {
                return Err(AddError::Job(
                    ec::INVALID_PARAMETER,
                    format!("slot {slot} of the controller is in use"),
                ));
            }
            d.instance_id = format!("{}\\{slot}\\0\\D", ctrl.instance_id);
            d.element_name =
                name.unwrap_or_else(|| if rt == 17 { "Hard Drive".into() } else { "DVD Drive".into() });
            d.parent = Some(ctrl.instance_id.clone());
            d.address_on_parent = Some(slot.to_string());
        }
        ("Msvm_StorageAllocationSettingData", 31, VHD | ISO) => {
            let Some(parent) = e.scalar("Parent") else {
                return Err(c.bad("a disk image needs Parent (its drive)").into());
            };
            let pid = c.setting_path(parent, "Msvm_ResourceAllocationSettingData")?;
            let want = if sub == VHD { 17 } else { 16 };
            let Some(drive) = vm.device(&pid).filter(|d| d.resource_type == want).cloned() else {
                return Err(c
                    .bad(format!(
                        "Parent {pid} is not a {} of this VM",
                        if want == 17 { "disk drive" } else { "DVD drive" }
                    ))
                    .into());
            };
            if vm
                .devices
                .iter()
                .any(|x| x.kind == DevKind::Sasd && x.parent.as_deref() == Some(drive.instance_id.as_str()))
            {
                return Err(AddError::Job(
                    ec::INVALID_PARAMETER,
                    "the drive already holds a disk image".into(),
                ));
            }
            let hr = e.array("HostResource");
            let [file] = hr.as_slice() else {
                return Err(c.bad("HostResource must hold exactly one file path").into());
            };
            let Some(local) = c.s.host_path(file) else {
                return Err(c
                    .bad(format!("{file} is outside the simulated disk directory {}", c.s.config.disk_prefix))
                    .into());
            };
            if !local.is_file() {
                return Err(AddError::Job(ec::FILE_NOT_FOUND, format!("the file {file} was not found")));
            }
            d.kind = DevKind::Sasd;
            d.instance_id = match drive.instance_id.strip_suffix("\\D") {
                Some(base) => format!("{base}\\L"),
                None => format!("{}\\L", drive.instance_id),
            };
            d.element_name = name.unwrap_or_else(|| {
                if want == 17 { "Hard Disk Image".into() } else { "ISO Disk Image".into() }
            });
            d.parent = Some(drive.instance_id.clone());
            d.host_resource = vec![file.clone()];
        }
        ("Msvm_SyntheticEthernetPortSettingData", 10, NIC) => {
            if !off {
                return Err(AddError::Job(
                    ec::INVALID_STATE,
                    "a network adapter can be added only while the VM is off".into(),
                ));
            }
            if vm.devices.iter().filter(|d| d.kind == DevKind::Port).count() >= 8 {
                return Err(AddError::Job(
                    ec::INVALID_PARAMETER,
                    "a VM has at most 8 network adapters".into(),
                ));
            }
            d.static_mac = e.boolean("StaticMacAddress").unwrap_or(false);
            let mac = match e.scalar("Address") {
                Some(a) if is_hex_mac(a) => a.to_uppercase(),
                Some(a) if !a.is_empty() => {
                    return Err(c.bad(format!("Address '{a}' is not 12 hex digits")).into());
                }
                _ if d.static_mac => return Err(c.bad("StaticMacAddress needs Address").into()),
                _ => {
                    let n = c.s.next();
                    format!("00155D{:06X}", n & 0xFF_FFFF)
                }
            };
            d.kind = DevKind::Port;
            d.instance_id = new_id();
            d.element_name = name.unwrap_or_else(|| "Network Adapter".into());
            d.address = Some(mac);
            let vsi = e.array("VirtualSystemIdentifiers");
            d.vsi = if vsi.is_empty() { vec![format!("{{{}}}", uuid::Uuid::new_v4())] } else { vsi };
        }
        ("Msvm_EthernetPortAllocationSettingData", 33, CONNECTION) => {
            let Some(parent) = e.scalar("Parent") else {
                return Err(c.bad("a connection needs Parent (its port)").into());
            };
            let pid = c.setting_path(parent, "Msvm_SyntheticEthernetPortSettingData")?;
            let Some(port) = vm.device(&pid).filter(|d| d.kind == DevKind::Port).cloned() else {
                return Err(c.bad(format!("Parent {pid} is not a network adapter of this VM")).into());
            };
            if vm.devices.iter().any(|x| {
                x.kind == DevKind::Connection && x.parent.as_deref() == Some(port.instance_id.as_str())
            }) {
                return Err(AddError::Job(
                    ec::INVALID_PARAMETER,
                    "the network adapter is connected already".into(),
                ));
            }
            let hr = e.array("HostResource");
            let [switch] = hr.as_slice() else {
                return Err(c.bad("HostResource must hold exactly one switch path").into());
            };
            let path = switch_path(c, switch)?;
            let state = e.uint("EnabledState").unwrap_or(2);
            if state != 2 && state != 3 {
                return Err(c.bad(format!("EnabledState {state} is neither 2 (connected) nor 3")).into());
            }
            d.kind = DevKind::Connection;
            d.instance_id = format!("{}\\C", port.instance_id);
            d.element_name = name.unwrap_or_else(|| "Dynamic Ethernet Switch Port".into());
            d.parent = Some(port.instance_id.clone());
            d.host_resource = vec![path];
            d.enabled_state = state as u16;
        }
        ("Msvm_ProcessorSettingData" | "Msvm_MemorySettingData", _, _) => {
            return Err(c
                .bad("processor and memory settings exist already: use ModifyResourceSettings")
                .into());
        }
        (class, rt, sub) => {
            return Err(c.bad(format!("{class} with ResourceType {rt} and ResourceSubType '{sub}' is not simulated (or does not fit the class)")).into());
        }
    }
    Ok(d)
}

/// Checks a `HostResource` switch path; returns it in canonical form.
fn switch_path(c: &mut Call<'_>, path: &str) -> R<String> {
    let p = match parse_object_path(path) {
        Ok(p) => p,
        Err(e) => return Err(c.bad(format!("'{path}' is not a WMI object path: {e}"))),
    };
    if !p.class.eq_ignore_ascii_case("Msvm_VirtualEthernetSwitch") {
        return Err(c.bad(format!("'{path}' names a {}, not a Msvm_VirtualEthernetSwitch", p.class)));
    }
    let mut names: Vec<&str> = p.keys.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names != ["CreationClassName", "Name"] {
        return Err(c.bad(format!("'{path}' must give CreationClassName and Name")));
    }
    let name = p.keys.iter().find(|(k, _)| k == "Name").map(|(_, v)| v.clone()).unwrap_or_default();
    let Some(sw) = c.s.switches.iter().find(|s| s.guid.eq_ignore_ascii_case(&name)).cloned() else {
        return Err(c.bad(format!("no switch named {name}")));
    };
    Ok(switch_epr(&sw).wmi_path(&c.s.config.host_name))
}

/// The VM GUID in a setting InstanceID (`Microsoft:<GUID>\...`).
fn vm_of_setting(id: &str) -> Option<String> {
    let rest = id.get(..10).filter(|p| p.eq_ignore_ascii_case("Microsoft:")).map(|_| &id[10..])?;
    Some(rest.split('\\').next()?.to_uppercase())
}

fn modify_resource_settings(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let mut settings = Vec::new();
    for text in p.texts("ResourceSettings") {
        settings.push(c.embedded(text, "CIM_ResourceAllocationSettingData")?);
    }
    if settings.is_empty() {
        return Err(c.bad("ResourceSettings is empty"));
    }
    let mut guid: Option<String> = None;
    let mut results = Vec::new();
    let mut work: Option<Vm> = None;
    for e in &settings {
        let Some(id) = e.scalar("InstanceID").map(str::to_owned) else {
            return Err(c.bad("the settings have no InstanceID to select them"));
        };
        let owner = vm_of_setting(&id).filter(|g| c.s.vms.contains_key(g));
        let Some(g) = owner else {
            let rv = c.invalid;
            return Err(c.refuse(rv, format!("no settings {id}"), false));
        };
        if guid.as_ref().is_some_and(|x| *x != g) {
            return Err(c.bad("changing several VMs in one call is not simulated"));
        }
        guid = Some(g.clone());
        let vm = work.get_or_insert_with(|| c.s.vms[&g].clone());
        let off = vm.state == power::OFF;
        if id.eq_ignore_ascii_case(&vm.processor_id()) {
            if e.class != "Msvm_ProcessorSettingData" {
                return Err(c.bad(format!("{id} is a Msvm_ProcessorSettingData, not a {}", e.class)));
            }
            if let Some(n) = e.uint("VirtualQuantity") {
                check_cpus(c, n)?;
                let vm = work.as_mut().ok_or_else(|| c.bad("internal"))?;
                if n != vm.cpus && !off {
                    let msg = format!("'{}' must be off to change its processor count", vm.name);
                    return Err(c.refuse(rv::INVALID_STATE_DMTF, msg, false));
                }
                vm.cpus = n;
            }
            results.push((
                "ResultingResourceSettings".to_owned(),
                setting_epr("Msvm_ProcessorSettingData", &id),
            ));
        } else if id.eq_ignore_ascii_case(&vm.memory_id()) {
            if e.class != "Msvm_MemorySettingData" {
                return Err(c.bad(format!("{id} is a Msvm_MemorySettingData, not a {}", e.class)));
            }
            if e.boolean("DynamicMemoryEnabled") == Some(true) {
                return Err(c.bad("dynamic memory is not simulated"));
            }
            if let Some(mb) = e.uint("VirtualQuantity") {
                check_memory(c, mb)?;
                let vm = work.as_mut().ok_or_else(|| c.bad("internal"))?;
                if mb != vm.memory_mb && !off {
                    let msg = format!("'{}' must be off to change its memory", vm.name);
                    return Err(c.refuse(rv::INVALID_STATE_DMTF, msg, false));
                }
                vm.memory_mb = mb;
            }
            results
                .push(("ResultingResourceSettings".to_owned(), setting_epr("Msvm_MemorySettingData", &id)));
        } else {
            let Some(dev) = vm.device(&id).cloned() else {
                let rv = c.invalid;
                return Err(c.refuse(rv, format!("no settings {id}"), false));
            };
            if e.class != dev.kind.class() {
                return Err(c.bad(format!("{id} is a {}, not a {}", dev.kind.class(), e.class)));
            }
            let mut new = dev.clone();
            if let Some(n) = e.scalar("ElementName") {
                new.element_name = n.to_owned();
            }
            match dev.kind {
                DevKind::Sasd if e.has("HostResource") => {
                    let hr = e.array("HostResource");
                    let [file] = hr.as_slice() else {
                        return Err(c.bad("HostResource must hold exactly one file path"));
                    };
                    let Some(local) = c.s.host_path(file) else {
                        return Err(c.bad(format!("{file} is outside the simulated disk directory")));
                    };
                    if !local.is_file() {
                        let rv = c.invalid;
                        return Err(c.refuse(rv, format!("the file {file} was not found"), false));
                    }
                    new.host_resource = vec![file.clone()];
                }
                DevKind::Connection => {
                    if e.has("HostResource") {
                        let hr = e.array("HostResource");
                        let [switch] = hr.as_slice() else {
                            return Err(c.bad("HostResource must hold exactly one switch path"));
                        };
                        new.host_resource = vec![switch_path(c, switch)?];
                    }
                    if let Some(st) = e.uint("EnabledState") {
                        if st != 2 && st != 3 {
                            return Err(c.bad(format!("EnabledState {st} is neither 2 nor 3")));
                        }
                        new.enabled_state = st as u16;
                    }
                }
                DevKind::Port => {
                    if let Some(a) = e
                        .scalar("Address")
                        .filter(|a| !a.eq_ignore_ascii_case(dev.address.as_deref().unwrap_or("")))
                    {
                        if !is_hex_mac(a) {
                            return Err(c.bad(format!("Address '{a}' is not 12 hex digits")));
                        }
                        if !off {
                            return Err(c.refuse(
                                rv::INVALID_STATE_DMTF,
                                "the MAC address can change only while the VM is off",
                                false,
                            ));
                        }
                        new.address = Some(a.to_uppercase());
                        new.static_mac = true;
                    }
                }
                _ => {}
            }
            let vm = work.as_mut().ok_or_else(|| c.bad("internal"))?;
            if let Some(slot) = vm.devices.iter_mut().find(|d| d.instance_id == dev.instance_id) {
                *slot = new;
            }
            results.push((
                "ResultingResourceSettings".to_owned(),
                setting_epr(dev.kind.class(), &dev.instance_id),
            ));
        }
    }
    let (Some(g), Some(work)) = (guid, work) else { return Err(c.bad("nothing to modify")) };
    let before = c.s.vms[&g].clone();
    c.s.vms.insert(g, work);
    let job = c.job("Modifying resource settings", Some(2), Effect::Undo(Box::new(before)));
    Ok(started(&job, results))
}

fn remove_resource_settings(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let eprs: Vec<Epr> = p.eprs("ResourceSettings").into_iter().cloned().collect();
    if eprs.is_empty() {
        return Err(c.bad("ResourceSettings is empty"));
    }
    let mut guid: Option<String> = None;
    let mut ids = Vec::new();
    for e in &eprs {
        let inst = c.lookup(e, "CIM_ResourceAllocationSettingData")?;
        let id = inst.key("InstanceID");
        let Some(g) = vm_of_setting(&id).filter(|g| c.s.vms.contains_key(g)) else {
            return Err(c.bad(format!("{id} is not a device of a virtual machine")));
        };
        if guid.as_ref().is_some_and(|x| *x != g) {
            return Err(c.bad("changing several VMs in one call is not simulated"));
        }
        let vm = &c.s.vms[&g];
        let Some(dev) = vm.device(&id) else {
            return Err(c.bad(format!("{id} (processor or memory) cannot be removed")));
        };
        if dev.kind == DevKind::Port && vm.state != power::OFF {
            return Err(c.refuse(
                rv::INVALID_STATE_DMTF,
                "a network adapter can be removed only while the VM is off",
                false,
            ));
        }
        ids.push(dev.instance_id.clone());
        guid = Some(g);
    }
    let Some(g) = guid else { return Err(c.bad("nothing to remove")) };
    let Some(vm) = c.s.vms.get_mut(&g) else { return Err(c.bad("the virtual machine vanished")) };
    let before = Box::new(vm.clone());
    // Removing a controller or drive removes what hangs below it.
    let mut gone = ids;
    loop {
        let more: Vec<String> = vm
            .devices
            .iter()
            .filter(|d| d.parent.as_ref().is_some_and(|p| gone.contains(p)) && !gone.contains(&d.instance_id))
            .map(|d| d.instance_id.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        gone.extend(more);
    }
    vm.devices.retain(|d| !gone.contains(&d.instance_id));
    let job = c.job("Removing resource settings", Some(2), Effect::Undo(before));
    Ok(started(&job, Vec::new()))
}

fn request_state_change(c: &mut Call<'_>, target: &Instance, p: &Params) -> R<Output> {
    let requested: u16 = p.text("RequestedState").and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    if !matches!(requested, 2 | 3 | 6 | 9 | 10 | 11) {
        return Err(c.refuse(
            rv::INVALID_STATE,
            format!("RequestedState {requested} is not simulated (v2 uses 2, 3, 6, 9, 10, 11)"),
            true,
        ));
    }
    let guid = target.key("Name").to_uppercase();
    let Some(vm) = c.s.vms.get(&guid) else {
        return Err(c.refuse(rv::INVALID_STATE, "the host's own state cannot be changed", true));
    };
    let from = vm.state;
    // (transitional state, final state, job type, reset)
    let plan = match (requested, from) {
        _ if vm.busy.is_some() => None,
        (2 | 10, power::OFF | power::SAVED) => Some((power::STARTING, power::RUNNING, 12, false)),
        (2, power::PAUSED) => Some((power::RESUMING, power::RUNNING, 27, false)),
        (3, power::RUNNING | power::PAUSED | power::SAVED) => Some((power::STOPPING, power::OFF, 13, false)),
        (6, power::RUNNING | power::PAUSED) => Some((power::SAVING, power::SAVED, 14, false)),
        (9, power::RUNNING) => Some((power::PAUSING, power::PAUSED, 26, false)),
        (10 | 11, power::RUNNING) => Some((power::RUNNING, power::RUNNING, 28, true)),
        (11, power::PAUSED) => Some((power::RUNNING, power::RUNNING, 28, true)),
        _ => None,
    };
    let Some((transitional, to, job_type, reset)) = plan else {
        let msg = format!("'{}' cannot go from state {from} to {requested}", vm.name);
        return Err(c.refuse(rv::INVALID_STATE, msg, false));
    };
    let description = match job_type {
        12 => "Turning on virtual machine",
        27 => "Resuming virtual machine",
        13 => "Turning off virtual machine",
        14 => "Saving virtual machine",
        26 => "Pausing virtual machine",
        _ => "Resetting virtual machine",
    };
    let job = c.job(description, Some(job_type), Effect::Power { guid: guid.clone(), from, to, reset });
    if let Some(vm) = c.s.vms.get_mut(&guid) {
        vm.state = transitional;
        vm.requested = requested;
        vm.busy = Some(job.clone());
        vm.shutdown_at = None;
        vm.state_changed = Utc::now();
    }
    Ok(started(&job, Vec::new()))
}

fn initiate_shutdown(c: &mut Call<'_>, target: &Instance) -> R<Output> {
    let guid = target.key("SystemName").to_uppercase();
    let delay = c.s.config.shutdown_delay;
    let Some(vm) = c.s.vms.get_mut(&guid) else {
        return Err(c.refuse(rv::INVALID_STATE, "no such virtual machine", false));
    };
    if vm.state != power::RUNNING || vm.busy.is_some() {
        return Err(c.refuse(rv::INVALID_STATE, "the virtual machine is not running", false));
    }
    if vm.shutdown_at.is_some() {
        return Err(c.refuse(32782, "a shutdown is in progress", false));
    }
    vm.shutdown_at = Some(std::time::Instant::now() + delay);
    Ok(Output { return_value: 0, refs: Vec::new(), texts: Vec::new() })
}

fn create_virtual_hard_disk(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let e = c.embedded(p.text("VirtualDiskSettingData").unwrap_or(""), "Msvm_VirtualHardDiskSettingData")?;
    let kind = e.uint("Type").unwrap_or(0);
    let format = e.uint("Format").unwrap_or(0);
    if !matches!(kind, 2..=4) {
        return Err(c.bad(format!("Type {kind} is not 2 (fixed), 3 (dynamic) or 4 (differencing)")));
    }
    if !matches!(format, 2..=4) {
        return Err(c.bad(format!("Format {format} is not 2 (VHD), 3 (VHDX) or 4 (VHD set)")));
    }
    let Some(path) = e.scalar("Path").map(str::to_owned) else { return Err(c.bad("Path is required")) };
    let ext = path.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    let want = match format {
        2 => "vhd",
        3 => "vhdx",
        _ => "vhds",
    };
    if ext != want {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("{path}: Format {format} needs the extension .{want}"), false));
    }
    let Some(local) = c.s.host_path(&path) else {
        return Err(
            c.bad(format!("{path} is outside the simulated disk directory {}", c.s.config.disk_prefix))
        );
    };
    let (size, parent) = if kind == 4 {
        let Some(parent) = e.scalar("ParentPath").filter(|p| !p.is_empty()).map(str::to_owned) else {
            return Err(c.bad("a differencing disk (Type 4) needs ParentPath"));
        };
        let Some(parent_local) = c.s.host_path(&parent) else {
            return Err(c.bad(format!("{parent} is outside the simulated disk directory")));
        };
        let size = read_disk(&parent_local).map(|m| m.size).unwrap_or(0);
        (size, Some(parent))
    } else {
        match e.uint("MaxInternalSize") {
            Some(n) if n > 0 => (n, None),
            _ => return Err(c.bad("a fixed or dynamic disk needs MaxInternalSize")),
        }
    };
    if let Some(dir) = local.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let meta = DiskMeta { kind: kind as u16, format: format as u16, size, parent };
    let job = c.job("Creating virtual hard disk", None, Effect::CreateDisk(local, meta));
    Ok(started(&job, Vec::new()))
}

fn resize_virtual_hard_disk(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let path = p.text("Path").unwrap_or("").to_owned();
    let size: u64 = p.text("MaxInternalSize").and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    let Some(local) = c.s.host_path(&path) else {
        return Err(c.bad(format!("{path} is outside the simulated disk directory")));
    };
    let Some(meta) = read_disk(&local) else {
        return Err(c.refuse(rv::FILE_NOT_FOUND, format!("{path} was not found"), false));
    };
    // Hyper-V grows disks only: the new size must be at least the current
    // one rounded up to 512 bytes.
    let floor = meta.size.div_ceil(512) * 512;
    if size < floor {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("{size} is below the disk's size {}", meta.size), false));
    }
    // Online resizing (Windows Server 2012 R2 on): a VHDX on a SCSI
    // controller of a running VM; anything else in use must wait.
    for (vm, controller) in users_of(c.s, &path) {
        if vm.state != power::OFF && (meta.format != 3 || controller != SCSI) {
            return Err(c.refuse(
                rv::INVALID_STATE,
                format!(
                    "'{}' runs with {path} on a {controller}: only a VHDX on SCSI resizes online",
                    vm.name
                ),
                false,
            ));
        }
    }
    let job = c.job("Resizing virtual hard disk", None, Effect::ResizeDisk(local, size));
    Ok(started(&job, Vec::new()))
}

/// The VMs whose settings name the file `path`, with the subtype of the
/// controller its drive is on.
fn users_of<'a>(s: &'a State, path: &str) -> Vec<(&'a Vm, String)> {
    let mut out = Vec::new();
    for vm in s.vms.values() {
        for d in vm.devices.iter().filter(|d| d.kind == DevKind::Sasd) {
            if !d.host_resource.iter().any(|h| h.eq_ignore_ascii_case(path)) {
                continue;
            }
            let controller = d
                .parent
                .as_deref()
                .and_then(|drive| vm.device(drive))
                .and_then(|drive| drive.parent.as_deref())
                .and_then(|ctrl| vm.device(ctrl))
                .map(|ctrl| ctrl.subtype.clone())
                .unwrap_or_default();
            out.push((vm, controller));
        }
    }
    out
}

fn get_virtual_hard_disk_setting_data(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let path = p.text("Path").unwrap_or("").to_owned();
    let Some(local) = c.s.host_path(&path) else {
        return Err(c.bad(format!("{path} is outside the simulated disk directory")));
    };
    let Some(meta) = read_disk(&local).filter(|_| local.is_file()) else {
        return Err(c.refuse(rv::FILE_NOT_FOUND, format!("{path} was not found"), false));
    };
    // A file someone else put on a share is read as what it is: a VHDX
    // starts with its file type identifier `vhdxfile` (MS-VHDX 2.2.1), a
    // VHD ends with a footer whose cookie is `conectix`; anything else is
    // not a virtual disk (32768, Failed: which code Hyper-V gives is not
    // documented).
    if c.s.share_path(&path).is_some() && !is_sim_disk(&local) && !is_virtual_disk(&local) {
        return Err(c.refuse(32768, format!("{path} is not a virtual hard disk"), false));
    }
    let mut vhd = Instance::new("Msvm_VirtualHardDiskSettingData")
        .set("Type", Val::U(u64::from(meta.kind)))
        .set("Format", Val::U(u64::from(meta.format)))
        .set("Path", Val::str(path.clone()))
        .set("MaxInternalSize", Val::U(meta.size))
        .set("BlockSize", Val::U(if meta.format == 3 { 33_554_432 } else { 2_097_152 }))
        .set("LogicalSectorSize", Val::U(512))
        .set("PhysicalSectorSize", Val::U(if meta.format == 3 { 4096 } else { 512 }));
    if let Some(parent) = &meta.parent {
        vhd = vhd.set("ParentPath", Val::str(parent.clone()));
    }
    // Answered at once (0): the page allows a job, reading metadata needs
    // none here.
    Ok(Output { return_value: 0, refs: Vec::new(), texts: vec![("SettingData".to_owned(), vhd.to_cimxml())] })
}

/// Whether the file holds the simulator's own disk format.
fn is_sim_disk(path: &std::path::Path) -> bool {
    use std::io::Read as _;
    let mut head = [0u8; 14];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == *b"hcp-hyperv-sim"
}

/// Whether the file starts like a VHDX or ends like a VHD.
fn is_virtual_disk(path: &std::path::Path) -> bool {
    use std::io::{Read as _, Seek as _};
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut sig = [0u8; 8];
    if f.read_exact(&mut sig).is_ok() && &sig == b"vhdxfile" {
        return true;
    }
    f.seek(std::io::SeekFrom::End(-512)).is_ok() && f.read_exact(&mut sig).is_ok() && &sig == b"conectix"
}

/// `ConvertVirtualHardDisk(SourcePath, VirtualDiskSettingData)`: a new
/// disk at the setting data's `Path` with its `Type` (2 fixed, 3 dynamic)
/// and `Format` (2 VHD, 3 VHDX), holding the source's data (a differencing
/// source is merged with its parents), in a job. Refused at once: a
/// source that does not exist (32779) or that a running VM holds open
/// (32774, System is in use), a Type or Format out of range, a Path of
/// the wrong extension (32773) or outside the host's directories. The job
/// fails (32768) when the target exists by then.
fn convert_virtual_hard_disk(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let source = p.text("SourcePath").unwrap_or("").to_owned();
    let Some(source_local) = c.s.host_path(&source) else {
        return Err(c.bad(format!("{source} is outside the simulated disk directory")));
    };
    let Some(source_meta) = read_disk(&source_local).filter(|_| source_local.is_file()) else {
        return Err(c.refuse(rv::FILE_NOT_FOUND, format!("{source} was not found"), false));
    };
    if let Some((vm, _)) = users_of(c.s, &source).into_iter().find(|(vm, _)| vm.state != power::OFF) {
        let msg = format!("{source} is open by '{}'", vm.name);
        return Err(c.refuse(rv::IN_USE, msg, false));
    }
    let e = c.embedded(p.text("VirtualDiskSettingData").unwrap_or(""), "Msvm_VirtualHardDiskSettingData")?;
    let kind = e.uint("Type").unwrap_or(0);
    let format = e.uint("Format").unwrap_or(0);
    if !matches!(kind, 2 | 3) {
        return Err(c.bad(format!("Type {kind} is not 2 (fixed) or 3 (dynamic)")));
    }
    if !matches!(format, 2 | 3) {
        return Err(c.bad(format!("Format {format} is not 2 (VHD) or 3 (VHDX)")));
    }
    let Some(path) = e.scalar("Path").map(str::to_owned) else { return Err(c.bad("Path is required")) };
    let want = if format == 2 { "vhd" } else { "vhdx" };
    if path.rsplit('.').next().unwrap_or("").to_ascii_lowercase() != want {
        let rv = c.invalid;
        return Err(c.refuse(rv, format!("{path}: Format {format} needs the extension .{want}"), false));
    }
    let Some(local) = c.s.host_path(&path) else {
        return Err(c.bad(format!("{path} is outside the simulated disk directory")));
    };
    let meta = DiskMeta { kind: kind as u16, format: format as u16, size: source_meta.size, parent: None };
    let job = c.job("Converting virtual hard disk", None, Effect::CreateDisk(local, meta));
    Ok(started(&job, Vec::new()))
}

/// `CIM_DataFile.Delete` return values (its method page).
mod file_rv {
    pub(super) const SHARING_VIOLATION: u32 = 15;
    pub(super) const INVALID_PARAMETER: u32 = 21;
}

fn delete_file(c: &mut Call<'_>, target: &Instance) -> R<Output> {
    let name = target.key("Name");
    let Some(local) = c.s.host_path(&name) else {
        return Err(c.bad(format!("{name} is outside the simulated disk directory")));
    };
    // A running VM holds its disks open; a stopped one does not.
    if let Some((vm, _)) = users_of(c.s, &name).into_iter().find(|(vm, _)| vm.state != power::OFF) {
        let msg = format!("{name} is open by '{}'", vm.name);
        return Err(c.refuse(file_rv::SHARING_VIOLATION, msg, false));
    }
    if let Err(e) = std::fs::remove_file(&local) {
        return Err(c.refuse(8, format!("cannot delete {name}: {e}"), false));
    }
    Ok(Output { return_value: 0, refs: Vec::new(), texts: Vec::new() })
}

fn create_snapshot(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let Some(e) = p.epr("AffectedSystem").cloned() else {
        return Err(c.bad("AffectedSystem is not a reference"));
    };
    let guid = vm_of_system(c, &e)?;
    let kind: u16 = p.text("SnapshotType").and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    if kind != 2 {
        return Err(c.refuse(
            rv::INVALID_TYPE,
            format!("SnapshotType {kind} is not simulated (2, full)"),
            true,
        ));
    }
    if let Some(settings) = p.text("SnapshotSettings").filter(|t| !t.trim().is_empty()) {
        c.embedded(settings, "Msvm_VirtualSystemSnapshotSettingData")?;
    }
    if p.given("ResultingSnapshot") {
        return Err(c.bad("ResultingSnapshot as input is not simulated"));
    }
    let vm = &c.s.vms[&guid];
    if vm.busy.is_some() || !matches!(vm.state, power::RUNNING | power::OFF | power::SAVED | power::PAUSED) {
        let msg = format!("'{}' cannot take a checkpoint in state {}", vm.name, vm.state);
        return Err(c.refuse(rv::INVALID_STATE_DMTF, msg, false));
    }
    let now = Utc::now();
    let snap = Snapshot {
        guid: uuid::Uuid::new_v4().to_string().to_uppercase(),
        name: format!("{} - ({})", vm.name, now.format("%-m/%-d/%Y - %-I:%M:%S %p")),
        created: now,
        power: vm.state,
        cpus: vm.cpus,
        memory_mb: vm.memory_mb,
        devices: vm.devices.clone(),
        notes: Vec::new(),
        parent: vm.current_snapshot.clone(),
    };
    let job = c.job("Creating checkpoint", None, Effect::CreateSnapshot(guid, Box::new(snap)));
    Ok(started(&job, Vec::new()))
}

/// The (VM, snapshot) a snapshot reference names.
fn snapshot_of(c: &mut Call<'_>, e: &Epr) -> R<(String, String)> {
    let inst = c.lookup(e, "CIM_VirtualSystemSettingData")?;
    match settings_owner(c.s, &inst.key("InstanceID")) {
        Some((vm, Some(snap))) => Ok((vm, snap)),
        _ => Err(c.bad(format!("{} is not a checkpoint", inst.key("InstanceID")))),
    }
}

fn apply_snapshot(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let Some(e) = p.epr("Snapshot").cloned() else { return Err(c.bad("Snapshot is not a reference")) };
    let (vm, snap) = snapshot_of(c, &e)?;
    // Always a job: the state rule (off or saved) is checked when it ends.
    let job = c.job("Applying checkpoint", None, Effect::ApplySnapshot(vm, snap));
    Ok(started(&job, Vec::new()))
}

fn destroy_snapshot(c: &mut Call<'_>, p: &Params) -> R<Output> {
    let Some(e) = p.epr("AffectedSnapshot").cloned() else {
        return Err(c.bad("AffectedSnapshot is not a reference"));
    };
    let (vm, snap) = snapshot_of(c, &e)?;
    let job = c.job("Deleting checkpoint", None, Effect::DestroySnapshot(vm, snap));
    Ok(started(&job, Vec::new()))
}
