//! Volumes: virtual disk files that outlive VMs.
//!
//! A volume is the file `[<datastore>] hcp-volumes/<volume id>.vmdk`, made
//! by `VirtualDiskManager.CreateVirtualDisk_Task` without any VM. Its name
//! is its key: every call finds the volume by searching the datastores'
//! `hcp-volumes` folders (`SearchDatastore_Task`), so a call repeated after
//! a crash finds what the first one made, and ListVolumes reports exactly
//! the files HCP made. Attachments are what the VMs' device lists say: a
//! `VirtualDisk` backed by that file, on the VM's first SCSI controller at
//! the unit of its slot (unit 7 is the controller's own). Attach and detach
//! are `ReconfigVM_Task` without a file operation, so vSphere neither makes
//! nor destroys the file; a volume attached to a VM grows through the
//! device (`capacityInKB`), a detached one with `ExtendVirtualDisk_Task`;
//! deletion is `DeleteVirtualDisk_Task`.

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Vsphere;
use crate::errors::{invalid, map_error};
use crate::inventory::Vm;
use crate::soap::VIM25;
use crate::vim::{self, Device, MoRef};

/// The folder of every datastore that holds HCP's volumes.
pub(crate) const VOLUME_FOLDER: &str = "hcp-volumes";

/// The data volumes one VM can have: the 16 units of one SCSI controller,
/// less unit 7 (the controller's own) and unit 0 (the root disk).
pub(crate) const MAX_VOLUMES_PER_VM: u32 = 14;

/// The SCSI controller types of vim25.
const SCSI_CONTROLLERS: &[&str] = &[
    "ParaVirtualSCSIController",
    "VirtualLsiLogicController",
    "VirtualLsiLogicSASController",
    "VirtualBusLogicController",
];

/// The SCSI unit of an attach slot: slot 0 (a boot volume) is unit 0,
/// slots 1 to 6 are units 1 to 6, and slots 7 to 14 skip the controller's
/// unit 7. None outside 0..=14.
pub(crate) fn unit_of_slot(slot: u32) -> Option<i32> {
    match slot {
        0..=6 => Some(slot as i32),
        7..=MAX_VOLUMES_PER_VM => Some(slot as i32 + 1),
        _ => None,
    }
}

/// The slot of a SCSI unit (the inverse of [`unit_of_slot`]).
pub(crate) fn slot_of_unit(unit: i32) -> Option<u32> {
    match unit {
        0..=6 => Some(unit as u32),
        8..=15 => Some(unit as u32 - 1),
        _ => None,
    }
}

/// The datastore path of a volume.
pub(crate) fn volume_path(datastore: &str, volume_id: &str) -> String {
    format!("[{datastore}] {VOLUME_FOLDER}/{volume_id}.vmdk")
}

/// The volume id of a datastore path, when it is one of HCP's volumes.
pub(crate) fn volume_of_path(path: &str) -> Option<&str> {
    let (_, rest) = path.strip_prefix('[')?.split_once("] ")?;
    let id = rest.strip_prefix(VOLUME_FOLDER)?.strip_prefix('/')?.strip_suffix(".vmdk")?;
    is_uuid(id).then_some(id)
}

/// A volume's file, as a datastore search found it.
#[derive(Debug, Clone)]
pub(crate) struct VolumeFile {
    pub(crate) id: String,
    pub(crate) datastore: String,
    pub(crate) capacity_kb: i64,
}

impl VolumeFile {
    fn path(&self) -> String {
        volume_path(&self.datastore, &self.id)
    }
}

/// Where a volume is attached.
#[derive(Debug, Clone)]
pub(crate) struct Attachment {
    pub(crate) vm: Vm,
    pub(crate) vm_id: String,
    pub(crate) device: Device,
}

impl Attachment {
    fn slot(&self) -> u32 {
        self.device.unit_number.and_then(slot_of_unit).unwrap_or(0)
    }
}

/// The HCP volumes a VM's devices hold: (volume id, device).
pub(crate) fn attached_volumes(vm: &Vm) -> Vec<(String, Device)> {
    vm.devices
        .iter()
        .filter(|d| d.is_disk())
        .filter_map(|d| {
            let file = d.backing.as_ref()?.file_name.as_deref()?;
            Some((volume_of_path(file)?.to_owned(), d.clone()))
        })
        .collect()
}

/// The key of the VM's first SCSI controller, where volumes go.
fn scsi_controller(vm: &Vm, vm_id: &str) -> Result<i32, ProviderError> {
    vm.devices
        .iter()
        .filter(|d| SCSI_CONTROLLERS.contains(&d.xsi_type.as_str()))
        .min_by_key(|d| d.key)
        .map(|d| d.key)
        .ok_or_else(|| {
            ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {vm_id} has no SCSI controller for volumes"),
            )
        })
}

/// The device that plugs a volume's file in at `unit` (`key` negative: a
/// new device).
fn volume_disk(file: &VolumeFile, datastore: Option<MoRef>, controller: i32, unit: i32, key: i32) -> Device {
    Device {
        xsi_type: "VirtualDisk".to_owned(),
        key,
        device_info: None,
        backing: Some(vim::Backing {
            xsi_type: "VirtualDiskFlatVer2BackingInfo".to_owned(),
            file_name: Some(file.path()),
            datastore,
            device_name: None,
            network: None,
            port: None,
            disk_mode: Some("persistent".to_owned()),
            thin_provisioned: None,
        }),
        connectable: None,
        controller_key: Some(controller),
        unit_number: Some(unit),
        address_type: None,
        mac_address: None,
        // The file's own size: plugging in neither grows nor shrinks it
        // (none when the datastore did not say).
        capacity_kb: Some(file.capacity_kb).filter(|kb| *kb > 0),
        capacity_bytes: None,
    }
}

fn gib_of_kb(kb: i64) -> u32 {
    u32::try_from((kb.max(0) as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX)
}

fn kb_of_gib(gib: u32) -> i64 {
    i64::from(gib) << 20
}

fn info(file: &VolumeFile, attached: Option<&Attachment>) -> pb::VolumeInfo {
    // An attached disk's device says its size (it may have grown there).
    let kb = attached.map_or(file.capacity_kb, |a| a.device.disk_bytes() / 1024).max(file.capacity_kb);
    pb::VolumeInfo {
        volume_id: file.id.clone(),
        size_gib: gib_of_kb(kb),
        native_id: file.path(),
        vm_id: attached.map(|a| a.vm_id.clone()).unwrap_or_default(),
        slot: attached.map(Attachment::slot).unwrap_or_default(),
        host: String::new(),
    }
}

fn lock_key(volume_id: &str) -> String {
    format!("volume:{volume_id}")
}

impl Vsphere {
    fn managers(&self, content: &vim::ServiceContent) -> Result<(MoRef, MoRef), ProviderError> {
        match (&content.file_manager, &content.virtual_disk_manager) {
            (Some(f), Some(d)) => Ok((f.clone(), d.clone())),
            _ => Err(ProviderError::new(
                ErrorKind::Unsupported,
                "this vSphere endpoint has no FileManager or VirtualDiskManager",
            )),
        }
    }

    /// Every datastore of the datacenter: (name, moref, browser).
    async fn datastores(&self) -> Result<Vec<(String, MoRef, MoRef)>, ProviderError> {
        let places = self.places().await?.clone();
        let list = self
            .properties(&places.datacenter, &["datastore"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("datastore").cloned())
            .map(|x| x.children.iter().filter_map(|c| <MoRef as vim::FromXml>::from_xml(c).ok()).collect())
            .unwrap_or_else(Vec::new);
        let mut out = Vec::new();
        for ds in list {
            let Some(o) = self.properties(&ds, &["name", "browser"]).await.map_err(map_error)? else {
                continue;
            };
            let name = o.prop("name").map(|n| n.text.trim().to_owned()).unwrap_or_default();
            let Some(browser) = o.prop("browser").and_then(|b| <MoRef as vim::FromXml>::from_xml(b).ok())
            else {
                continue;
            };
            out.push((name, ds, browser));
        }
        Ok(out)
    }

    /// Makes the datastore's volume folder, unless it is there.
    async fn volume_folder(
        &self,
        file_manager: &MoRef,
        datacenter: &MoRef,
        datastore: &str,
    ) -> Result<(), ProviderError> {
        let folder = format!("[{datastore}] {VOLUME_FOLDER}");
        let mkdir = vim::MakeDirectory {
            xmlns: VIM25,
            this: file_manager,
            name: &folder,
            datacenter,
            create_parents: true,
        };
        match self.soap.invoke::<_, vim::Nothing>("MakeDirectory", &mkdir, false).await {
            Ok(_) => Ok(()),
            Err(e) if e.fault() == Some("FileAlreadyExists") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// A datastore's reference by name.
    async fn datastore_ref(&self, name: &str) -> Result<Option<MoRef>, ProviderError> {
        Ok(self.datastores().await?.into_iter().find(|(n, _, _)| n == name).map(|(_, ds, _)| ds))
    }

    /// The datastore a volume of `storage` goes to (empty: the configured
    /// one).
    async fn volume_datastore(&self, storage: &str) -> Result<String, ProviderError> {
        let name = match (storage, &self.config.datastore) {
            ("", Some(d)) => d.clone(),
            ("", None) => {
                return Err(invalid(
                    "spec.storage",
                    "no datastore named and none configured (set datastore in the provider's configuration)",
                ));
            }
            (s, _) => s.to_owned(),
        };
        if self.datastores().await?.iter().any(|(n, _, _)| *n == name) {
            Ok(name)
        } else {
            Err(invalid("spec.storage", format!("no datastore {name:?} in the datacenter")))
        }
    }

    /// The volume files in one datastore's volume folder named like
    /// `pattern`.
    async fn search(
        &self,
        datastore: &str,
        browser: &MoRef,
        pattern: &str,
    ) -> Result<Vec<VolumeFile>, ProviderError> {
        let folder = format!("[{datastore}] {VOLUME_FOLDER}");
        let req = vim::SearchDatastore {
            xmlns: VIM25,
            this: browser,
            datastore_path: &folder,
            search_spec: vim::SearchSpec::disks(pattern),
        };
        let result = match self.soap.task_xml("SearchDatastore_Task", &req).await {
            Ok(r) => r,
            // No volume was ever made there.
            Err(e) if e.fault() == Some("FileNotFound") => return Ok(Vec::new()),
            Err(e) => return Err(map_error(e)),
        };
        Ok(result
            .map(|r| vim::disk_files(&r))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                let id = f.path.strip_suffix(".vmdk").filter(|id| is_uuid(id))?;
                Some(VolumeFile {
                    id: id.to_owned(),
                    datastore: datastore.to_owned(),
                    capacity_kb: f.capacity_kb,
                })
            })
            .collect())
    }

    /// The volume's file, on whichever datastore it is.
    pub(crate) async fn find_volume(&self, volume_id: &str) -> Result<Option<VolumeFile>, ProviderError> {
        for (name, _, browser) in self.datastores().await? {
            if let Some(f) =
                self.search(&name, &browser, &format!("{volume_id}.vmdk")).await?.into_iter().next()
            {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// Where the volume is attached among HCP's VMs.
    async fn attachment(&self, volume_id: &str) -> Result<Option<Attachment>, ProviderError> {
        for vm in self.inventory().await? {
            if let Some((_, device)) = attached_volumes(&vm).into_iter().find(|(id, _)| id == volume_id) {
                let vm_id = vm.instance_uuid.to_ascii_lowercase();
                return Ok(Some(Attachment { vm, vm_id, device }));
            }
        }
        Ok(None)
    }

    async fn volume_info(&self, file: &VolumeFile) -> Result<pb::VolumeInfo, ProviderError> {
        Ok(info(file, self.attachment(&file.id).await?.as_ref()))
    }

    async fn require_volume(&self, volume_id: &str) -> Result<VolumeFile, ProviderError> {
        self.find_volume(volume_id)
            .await?
            .ok_or_else(|| ProviderError::new(ErrorKind::NotFound, format!("volume {volume_id} not found")))
    }

    /// Creates the volume's disk file, or finds it made.
    pub(crate) async fn volume_create(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let spec = req.spec.ok_or_else(|| invalid("spec", "required"))?;
        if spec.size_gib == 0 {
            return Err(invalid("spec.size_gib", "must be at least 1"));
        }
        let _serial = self.locks.lock(&lock_key(&req.volume_id)).await;
        if let Some(file) = self.find_volume(&req.volume_id).await? {
            return self.volume_info(&file).await;
        }
        let datastore = self.volume_datastore(&spec.storage).await?;
        let content = self.soap.content().await.map_err(map_error)?.clone();
        let (file_manager, disk_manager) = self.managers(&content)?;
        let datacenter = self.places().await?.datacenter.clone();
        self.volume_folder(&file_manager, &datacenter, &datastore).await?;
        self.failpoints.hit("volume-create:after-mkdir");
        let file = VolumeFile { id: req.volume_id.clone(), datastore, capacity_kb: kb_of_gib(spec.size_gib) };
        let path = file.path();
        let create = vim::CreateVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            name: &path,
            datacenter: &datacenter,
            spec: vim::DiskSpec::thin(file.capacity_kb),
        };
        match self.soap.task("CreateVirtualDisk_Task", &create).await {
            Ok(_) => {}
            // Made by an earlier call whose answer was lost.
            Err(e) if e.fault() == Some("FileAlreadyExists") => {}
            Err(e) => return Err(map_error(e)),
        }
        self.failpoints.hit("volume-create:after-disk");
        tracing::info!(volume_id = req.volume_id, path, "volume created");
        let made = self.require_volume(&req.volume_id).await?;
        self.volume_info(&made).await
    }

    pub(crate) async fn volume_get(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        let file = self.require_volume(volume_id).await?;
        self.volume_info(&file).await
    }

    pub(crate) async fn volume_list(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        let mut files = Vec::new();
        for (name, _, browser) in self.datastores().await? {
            files.extend(self.search(&name, &browser, "*.vmdk").await?);
        }
        let mut attached = std::collections::HashMap::new();
        for vm in self.inventory().await? {
            for (id, device) in attached_volumes(&vm) {
                let vm_id = vm.instance_uuid.to_ascii_lowercase();
                attached.insert(id, Attachment { vm: vm.clone(), vm_id, device });
            }
        }
        let volumes = files.iter().map(|f| info(f, attached.get(&f.id))).collect();
        Ok(hcp_provider_sdk::volume_page_of(volumes, &req))
    }

    pub(crate) async fn volume_extend(
        &self,
        req: pb::ExtendVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let _serial = self.locks.lock(&lock_key(&req.volume_id)).await;
        let file = self.require_volume(&req.volume_id).await?;
        let attached = self.attachment(&req.volume_id).await?;
        let have = info(&file, attached.as_ref()).size_gib;
        if req.size_gib < have {
            return Err(invalid(
                "size_gib",
                format!("{} GiB is smaller than the volume ({have} GiB); volumes only grow", req.size_gib),
            ));
        }
        if req.size_gib == have {
            return Ok(info(&file, attached.as_ref()));
        }
        let want = kb_of_gib(req.size_gib);
        match attached {
            // The disk grows through its VM, running or not: vSphere
            // extends an attached disk online.
            Some(a) => {
                let _vm = self.locks.lock(&a.vm_id).await;
                let mut grown = a.device.clone();
                grown.capacity_kb = Some(want);
                grown.capacity_bytes = Some(want * 1024);
                let change = vim::ConfigSpec {
                    device_change: vec![vim::DeviceChange::new("edit", grown)],
                    ..Default::default()
                };
                self.reconfigure(&a.vm, change).await?;
            }
            None => {
                let content = self.soap.content().await.map_err(map_error)?.clone();
                let (_, disk_manager) = self.managers(&content)?;
                let datacenter = self.places().await?.datacenter.clone();
                let path = file.path();
                let extend = vim::ExtendVirtualDisk {
                    xmlns: VIM25,
                    this: &disk_manager,
                    name: &path,
                    datacenter: &datacenter,
                    new_capacity_kb: want,
                    eager_zero: false,
                };
                self.soap.task("ExtendVirtualDisk_Task", &extend).await.map_err(map_error)?;
            }
        }
        self.failpoints.hit("volume-extend:after-grow");
        let file = self.require_volume(&req.volume_id).await?;
        self.volume_info(&file).await
    }

    pub(crate) async fn volume_attach(
        &self,
        req: pb::AttachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let unit = match req.slot {
            1..=MAX_VOLUMES_PER_VM => unit_of_slot(req.slot),
            _ => None,
        }
        .ok_or_else(|| invalid("slot", format!("must be 1 to {MAX_VOLUMES_PER_VM}, got {}", req.slot)))?;
        let _serial = self.locks.lock(&lock_key(&req.volume_id)).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        let file = self.require_volume(&req.volume_id).await?;
        let vm = self.require(&req.vm_id).await?;
        if let Some(a) = self.attachment(&req.volume_id).await? {
            if a.vm_id == req.vm_id && a.slot() == req.slot {
                return Ok(info(&file, Some(&a)));
            }
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!(
                    "volume {} is attached to vm {} at slot {}; detach it first",
                    req.volume_id,
                    a.vm_id,
                    a.slot()
                ),
            ));
        }
        let controller = scsi_controller(&vm, &req.vm_id)?;
        if vm.devices.iter().any(|d| d.controller_key == Some(controller) && d.unit_number == Some(unit)) {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("slot {} of vm {} is taken by another disk", req.slot, req.vm_id),
            ));
        }
        let datastore = self.datastore_ref(&file.datastore).await?;
        let disk = volume_disk(&file, datastore, controller, unit, -200);
        // No file operation: the disk exists and is only plugged in.
        let change = vim::ConfigSpec {
            device_change: vec![vim::DeviceChange::new("add", disk)],
            ..Default::default()
        };
        self.reconfigure(&vm, change).await?;
        self.failpoints.hit("volume-attach:after-reconfigure");
        tracing::info!(volume_id = req.volume_id, vm_id = req.vm_id, slot = req.slot, "volume attached");
        self.volume_info(&file).await
    }

    pub(crate) async fn volume_detach(
        &self,
        req: pb::DetachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let _serial = self.locks.lock(&lock_key(&req.volume_id)).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        let Some(file) = self.find_volume(&req.volume_id).await? else {
            return Ok(pb::VolumeInfo { volume_id: req.volume_id, ..Default::default() });
        };
        if let Some(vm) = self.find(&req.vm_id, &[]).await? {
            let boot = attached_volumes(&vm)
                .into_iter()
                .any(|(id, d)| id == req.volume_id && d.unit_number == Some(0));
            if boot {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!(
                        "volume {} is the boot volume of vm {} (slot 0); it leaves the VM only with DeleteVm",
                        req.volume_id, req.vm_id
                    ),
                ));
            }
            self.detach_from(&vm, Some(&req.volume_id)).await?;
            self.failpoints.hit("volume-detach:after-reconfigure");
        }
        self.volume_info(&file).await
    }

    /// Unplugs HCP's volumes from `vm` (one, or every one), keeping their
    /// files: no file operation in the device change, whereas
    /// `Destroy_Task` would delete every disk still attached.
    pub(crate) async fn detach_from(&self, vm: &Vm, only: Option<&str>) -> Result<(), ProviderError> {
        let remove: Vec<vim::DeviceChange> = attached_volumes(vm)
            .into_iter()
            .filter(|(id, _)| only.is_none_or(|o| o == id))
            .map(|(_, device)| vim::DeviceChange::new("remove", device))
            .collect();
        if remove.is_empty() {
            return Ok(());
        }
        let n = remove.len();
        self.reconfigure(vm, vim::ConfigSpec { device_change: remove, ..Default::default() }).await?;
        tracing::info!(vm = %vm.name, volumes = n, "volumes detached");
        Ok(())
    }

    pub(crate) async fn volume_delete(&self, volume_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&lock_key(volume_id)).await;
        let Some(file) = self.find_volume(volume_id).await? else { return Ok(false) };
        if let Some(a) = self.attachment(volume_id).await? {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("volume {volume_id} is attached to vm {}; detach it first", a.vm_id),
            ));
        }
        let content = self.soap.content().await.map_err(map_error)?.clone();
        let (_, disk_manager) = self.managers(&content)?;
        let datacenter = self.places().await?.datacenter.clone();
        let path = file.path();
        let delete = vim::DeleteVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            name: &path,
            datacenter: &datacenter,
        };
        match self.soap.task("DeleteVirtualDisk_Task", &delete).await {
            Ok(_) => {}
            // Deleted meanwhile.
            Err(e) if e.fault() == Some("FileNotFound") => {}
            Err(e) => return Err(map_error(e)),
        }
        self.failpoints.hit("volume-delete:after-disk");
        tracing::info!(volume_id, path, "volume deleted");
        Ok(true)
    }
}

/// What a CreateVm asks of volumes, checked before anything is made.
#[derive(Debug, Default)]
pub(crate) struct VolumesAtCreate {
    /// The boot volume: its id, and its file when it exists already.
    boot: Option<(String, Option<VolumeFile>)>,
    /// The datastore a new boot volume goes to.
    boot_datastore: String,
    /// Data volumes and their slots.
    data: Vec<(VolumeFile, u32)>,
}

impl VolumesAtCreate {
    /// The lock keys of every volume named, sorted: taken before the VM's
    /// own lock, in the order AttachVolume takes them (volume, then VM).
    pub(crate) fn lock_keys(spec: &pb::VmSpec) -> Vec<String> {
        let mut keys: Vec<String> = std::iter::once(spec.boot_volume_id.as_str())
            .filter(|id| !id.is_empty())
            .chain(spec.volumes.iter().map(|v| v.volume_id.as_str()))
            .map(lock_key)
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

impl Vsphere {
    /// Checks the volumes a create names: the boot volume detached (or
    /// already this VM's), the data volumes existing, at valid distinct
    /// slots, and detached (or already at that slot of this VM).
    pub(crate) async fn volumes_at_create(
        &self,
        vm_id: &str,
        spec: &pb::VmSpec,
    ) -> Result<VolumesAtCreate, ProviderError> {
        let mut plan = VolumesAtCreate::default();
        let mut slots = std::collections::HashSet::new();
        for v in &spec.volumes {
            if !is_uuid(&v.volume_id) {
                return Err(invalid("spec.volumes", format!("{:?} is not a volume id", v.volume_id)));
            }
            if !(1..=MAX_VOLUMES_PER_VM).contains(&v.slot) || !slots.insert(v.slot) {
                return Err(invalid(
                    "spec.volumes",
                    format!("slot {} is out of 1 to {MAX_VOLUMES_PER_VM} or given twice", v.slot),
                ));
            }
            if v.volume_id == spec.boot_volume_id || plan.data.iter().any(|(f, _)| f.id == v.volume_id) {
                return Err(invalid("spec.volumes", format!("volume {} is named twice", v.volume_id)));
            }
            let file = self.require_volume(&v.volume_id).await?;
            self.free_for(&v.volume_id, vm_id, v.slot).await?;
            plan.data.push((file, v.slot));
        }
        if !spec.boot_volume_id.is_empty() {
            let id = &spec.boot_volume_id;
            if !is_uuid(id) {
                return Err(invalid("spec.boot_volume_id", "must be a UUID"));
            }
            let file = self.find_volume(id).await?;
            match &file {
                Some(_) => self.free_for(id, vm_id, 0).await?,
                None => plan.boot_datastore = self.volume_datastore(&spec.boot_storage).await?,
            }
            plan.boot = Some((id.clone(), file));
        }
        Ok(plan)
    }

    /// Refuses a volume attached anywhere but at `slot` of `vm_id`.
    async fn free_for(&self, volume_id: &str, vm_id: &str, slot: u32) -> Result<(), ProviderError> {
        match self.attachment(volume_id).await? {
            Some(a) if a.vm_id != vm_id || a.slot() != slot => Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!(
                    "volume {volume_id} is attached to vm {} at slot {}; detach it first",
                    a.vm_id,
                    a.slot()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The boot volume's file, made from the template's root disk when it
    /// does not exist: copied under a name no call lists, grown to
    /// `disk_gib` (never below the image's size), and only then moved to
    /// its volume name, so the volume appears whole or not at all. A call
    /// repeated after a crash deletes a half-made copy and starts over.
    pub(crate) async fn boot_volume(
        &self,
        plan: &VolumesAtCreate,
        image_source: &str,
        disk_gib: u32,
    ) -> Result<Option<VolumeFile>, ProviderError> {
        let Some((id, existing)) = &plan.boot else { return Ok(None) };
        if let Some(file) = existing {
            return Ok(Some(file.clone()));
        }
        if let Some(file) = self.find_volume(id).await? {
            return Ok(Some(file));
        }
        let template = self.template(image_source).await?;
        let devices = self
            .properties(&template, &["config.hardware.device"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("config.hardware.device").cloned())
            .map(|x| x.children.iter().map(Device::from_xml).collect::<Vec<_>>())
            .unwrap_or_default();
        let root = devices
            .iter()
            .find(|d| d.is_disk() && d.unit_number == Some(0))
            .or_else(|| devices.iter().find(|d| d.is_disk()))
            .ok_or_else(|| invalid("spec.image", "the template has no disk to make a boot volume of"))?;
        let source = root
            .backing
            .as_ref()
            .and_then(|b| b.file_name.clone())
            .ok_or_else(|| invalid("spec.image", "the template's disk is not a file"))?;
        let want_kb = kb_of_gib(disk_gib).max(root.disk_bytes() / 1024);

        let datastore = plan.boot_datastore.clone();
        let content = self.soap.content().await.map_err(map_error)?.clone();
        let (file_manager, disk_manager) = self.managers(&content)?;
        let datacenter = self.places().await?.datacenter.clone();
        self.volume_folder(&file_manager, &datacenter, &datastore).await?;
        // Not a UUID: never listed as a volume.
        let partial = format!("[{datastore}] {VOLUME_FOLDER}/{id}.partial.vmdk");
        let delete = vim::DeleteVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            name: &partial,
            datacenter: &datacenter,
        };
        match self.soap.task("DeleteVirtualDisk_Task", &delete).await {
            Ok(_) => tracing::info!(path = partial, "a half-made boot volume deleted"),
            Err(e) if e.fault() == Some("FileNotFound") => {}
            Err(e) => return Err(map_error(e)),
        }
        let copy = vim::CopyVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            source_name: &source,
            source_datacenter: &datacenter,
            dest_name: &partial,
            dest_datacenter: &datacenter,
            force: false,
        };
        self.soap.task("CopyVirtualDisk_Task", &copy).await.map_err(map_error)?;
        self.failpoints.hit("boot-volume:after-copy");
        // To the size asked, or the image's: a copy's size is not always
        // what the datastore reports (vcsim does not know it), and growing
        // to the source's own size changes nothing.
        let extend = vim::ExtendVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            name: &partial,
            datacenter: &datacenter,
            new_capacity_kb: want_kb,
            eager_zero: false,
        };
        self.soap.task("ExtendVirtualDisk_Task", &extend).await.map_err(map_error)?;
        let path = volume_path(&datastore, id);
        let rename = vim::MoveVirtualDisk {
            xmlns: VIM25,
            this: &disk_manager,
            source_name: &partial,
            source_datacenter: &datacenter,
            dest_name: &path,
            dest_datacenter: &datacenter,
            force: false,
        };
        self.soap.task("MoveVirtualDisk_Task", &rename).await.map_err(map_error)?;
        self.failpoints.hit("boot-volume:after-move");
        tracing::info!(volume_id = id, path, source, "boot volume made from the image");
        self.require_volume(id).await.map(Some)
    }

    /// The device changes that make `boot` the VM's root disk (the clone's
    /// own disk deleted) and plug the data volumes in at their slots;
    /// empty when they are there already.
    pub(crate) async fn volume_changes(
        &self,
        vm: &Vm,
        vm_id: &str,
        boot: Option<&VolumeFile>,
        plan: &VolumesAtCreate,
    ) -> Result<Vec<vim::DeviceChange>, ProviderError> {
        if boot.is_none() && plan.data.is_empty() {
            return Ok(Vec::new());
        }
        let controller = scsi_controller(vm, vm_id)?;
        let have = attached_volumes(vm);
        let mut changes = Vec::new();
        let swapped =
            |file: &VolumeFile| have.iter().any(|(id, d)| *id == file.id && d.unit_number == Some(0));
        if let Some(file) = boot.filter(|f| !swapped(f)) {
            let root = vm.disk().filter(|d| d.unit_number == Some(0)).cloned();
            // The volume takes the root disk's place (its controller).
            let at = root.as_ref().and_then(|r| r.controller_key).unwrap_or(controller);
            if let Some(root) = root {
                // The clone's own disk is nobody else's file: deleted with
                // the swap, so that it does not leak.
                let own = root
                    .backing
                    .as_ref()
                    .and_then(|b| b.file_name.as_deref())
                    .and_then(volume_of_path)
                    .is_none();
                let mut remove = vim::DeviceChange::new("remove", root);
                if own {
                    remove.file_operation = Some("destroy");
                }
                changes.push(remove);
            }
            let datastore = self.datastore_ref(&file.datastore).await?;
            changes.push(vim::DeviceChange::new("add", volume_disk(file, datastore, at, 0, -300)));
        }
        for (i, (file, slot)) in plan.data.iter().enumerate() {
            if have.iter().any(|(id, _)| *id == file.id) {
                continue;
            }
            let unit = unit_of_slot(*slot).unwrap_or_default();
            if vm.devices.iter().any(|d| d.controller_key == Some(controller) && d.unit_number == Some(unit))
            {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!("slot {slot} of vm {vm_id} is taken by another disk"),
                ));
            }
            let datastore = self.datastore_ref(&file.datastore).await?;
            changes.push(vim::DeviceChange::new(
                "add",
                volume_disk(file, datastore, controller, unit, -200 - i as i32),
            ));
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_skip_the_controllers_unit() {
        let units: Vec<i32> = (1..=MAX_VOLUMES_PER_VM).filter_map(unit_of_slot).collect();
        assert_eq!(units, [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(unit_of_slot(0), Some(0));
        assert_eq!(unit_of_slot(15), None);
        for slot in 0..=MAX_VOLUMES_PER_VM {
            assert_eq!(unit_of_slot(slot).and_then(slot_of_unit), Some(slot));
        }
        assert_eq!(slot_of_unit(7), None);
    }

    #[test]
    fn volume_paths_name_the_volume() {
        let id = "6f1c1a8e-0b1d-4c36-9a57-2d1e6b1f0c11";
        let path = volume_path("LocalDS_0", id);
        assert_eq!(path, format!("[LocalDS_0] hcp-volumes/{id}.vmdk"));
        assert_eq!(volume_of_path(&path), Some(id));
        assert_eq!(volume_of_path("[LocalDS_0] hcp-volumes/notes.vmdk"), None);
        assert_eq!(volume_of_path(&format!("[LocalDS_0] vm-1/{id}.vmdk")), None);
        assert_eq!(volume_of_path("[LocalDS_0] DC0_C0_RP0_VM0/disk1.vmdk"), None);
    }

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(gib_of_kb(kb_of_gib(3)), 3);
        assert_eq!(gib_of_kb(kb_of_gib(3) + 1), 4);
        assert_eq!(gib_of_kb(0), 0);
    }
}
