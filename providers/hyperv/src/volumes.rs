//! Volumes: dynamic VHDX files named by HCP volume id
//! (`hcp-vol-<uuid>.vhdx`) in a directory per storage, made and grown
//! through `Msvm_ImageManagementService`, read back with
//! `GetVirtualHardDiskSettingData`, listed and deleted as `CIM_DataFile`
//! (root/cimv2), and attached as a disk drive at location = slot of the
//! VM's SCSI controller with the VHDX in it.
//!
//! The file name is the only record: every call looks at the host first,
//! so a call repeated after a crash finds what the first one did. An
//! attach interrupted between its two adds leaves an empty disk drive at
//! the slot, which the next attach fills.

use std::collections::HashMap;

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::cim::{Instance, wql_literal};
use crate::errors::{HvError, invalid, map_error};
use crate::inventory::Vm;
use crate::wsman::{CIMV2, Epr, Param};
use crate::{DISK_DRIVE, Hyperv, IMS, MAX_VOLUMES, VHD, VSMS, rv};

const GIB: u64 = 1 << 30;
/// `CIM_DataFile.Delete`: the file is open (a running VM holds it).
const SHARING_VIOLATION: u32 = 15;

/// A volume's file name on the host.
pub(crate) fn file_name(volume_id: &str) -> String {
    format!("hcp-vol-{volume_id}.vhdx")
}

/// `D:\HCP\volumes` as WQL on `CIM_DataFile` names it: the drive (`d:`) and
/// the path below it with both separators (`\hcp\volumes\`), lower case.
/// `None` for a directory that is not on a drive.
pub(crate) fn split_dir(dir: &str) -> Option<(String, String)> {
    let dir = dir.trim_end_matches('\\').to_ascii_lowercase();
    let (drive, rest) = dir.split_at_checked(2)?;
    let mut chars = drive.chars();
    if !(chars.next()?.is_ascii_alphabetic() && chars.next()? == ':') {
        return None;
    }
    if !rest.starts_with('\\') || rest.len() < 2 || rest.contains(['/', '*', '?', '"', '<', '>', '|']) {
        return None;
    }
    if rest.split('\\').any(|p| p == "." || p == "..") {
        return None;
    }
    Some((drive.to_owned(), format!("{rest}\\")))
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attachment {
    vm_id: String,
    slot: u32,
}

/// A volume found on the host.
struct Found {
    path: String,
    bytes: u64,
}

fn gib_of(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(GIB)).unwrap_or(u32::MAX)
}

fn failed_precondition(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidState, message)
}

/// The InstanceID an object path (`...:Class.InstanceID="..."`) names.
fn instance_id_of(path: &str) -> Option<String> {
    let (_, rest) = path.split_once("InstanceID=\"")?;
    Some(rest.strip_suffix('"')?.replace("\\\\", "\\"))
}

impl Hyperv {
    /// The default volume directory.
    fn default_volume_dir(&self) -> String {
        match &self.config.volumes.dir {
            Some(d) => d.trim_end_matches('\\').to_owned(),
            None => format!("{}\\volumes", self.config.vm_dir.trim_end_matches('\\')),
        }
    }

    /// The directory of `storage` ("" is the default).
    fn volume_dir(&self, storage: &str) -> Result<String, ProviderError> {
        if storage.is_empty() {
            return Ok(self.default_volume_dir());
        }
        self.config
            .volumes
            .storage
            .get(storage)
            .map(|d| d.trim_end_matches('\\').to_owned())
            .ok_or_else(|| invalid("spec.storage", format!("no storage {storage:?} on this provider")))
    }

    /// Every volume directory, each once.
    fn volume_dirs(&self) -> Vec<String> {
        let mut dirs = vec![self.default_volume_dir()];
        for d in self.config.volumes.storage.values() {
            let d = d.trim_end_matches('\\').to_owned();
            if !dirs.iter().any(|x| x.eq_ignore_ascii_case(&d)) {
                dirs.push(d);
            }
        }
        dirs
    }

    /// The virtual size of a VHD(X), `None` when the file is not there.
    pub(crate) async fn vhd_bytes(&self, path: &str) -> Result<Option<u64>, HvError> {
        let out = match self
            .call(
                &Self::service(IMS),
                "GetVirtualHardDiskSettingData",
                &[("Path", Param::Text(path.to_owned()))],
            )
            .await
        {
            Ok(out) => out,
            Err(HvError::Method { code: rv::FILE_NOT_FOUND, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let data = out
            .text("SettingData")
            .and_then(Instance::from_cim_xml)
            .ok_or_else(|| HvError::Unexpected(format!("no setting data for {path}")))?;
        Ok(Some(data.num("MaxInternalSize").unwrap_or(0)))
    }

    /// The volume's file, in whichever storage holds it.
    async fn find_volume(&self, volume_id: &str) -> Result<Option<Found>, HvError> {
        for dir in self.volume_dirs() {
            let path = format!("{dir}\\{}", file_name(volume_id));
            if let Some(bytes) = self.vhd_bytes(&path).await? {
                return Ok(Some(Found { path, bytes }));
            }
        }
        Ok(None)
    }

    /// The VHDs attached to HCP's VMs, by path (lower case): the VM and the
    /// location of the drive holding it.
    async fn attachments(&self) -> Result<HashMap<String, Attachment>, HvError> {
        let vms: HashMap<String, String> = self
            .host
            .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
            .await?
            .iter()
            .filter_map(|i| {
                let id = i.get("ElementName")?.strip_prefix("hcp-").filter(|id| is_uuid(id))?;
                Some((i.get("Name")?.to_ascii_uppercase(), id.to_owned()))
            })
            .collect();
        let drives: HashMap<String, u32> = self
            .host
            .query(&format!(
                "SELECT * FROM Msvm_ResourceAllocationSettingData WHERE ResourceSubType = {}",
                wql_literal(DISK_DRIVE)
            ))
            .await?
            .iter()
            .filter_map(|d| {
                let slot = d.get("AddressOnParent")?.trim().parse().ok()?;
                Some((d.get("InstanceID")?.to_ascii_uppercase(), slot))
            })
            .collect();
        let images = self
            .host
            .query(&format!(
                "SELECT * FROM Msvm_StorageAllocationSettingData WHERE ResourceSubType = {}",
                wql_literal(VHD)
            ))
            .await?;
        let mut out = HashMap::new();
        for image in images {
            // A VM's settings are `Microsoft:<VM GUID>\...`; checkpoints'
            // copies carry the checkpoint's GUID and are left out.
            let Some(guid) = image
                .get("InstanceID")
                .and_then(|i| i.strip_prefix("Microsoft:"))
                .and_then(|i| i.split('\\').next())
            else {
                continue;
            };
            let Some(vm_id) = vms.get(&guid.to_ascii_uppercase()) else { continue };
            let Some(slot) = image
                .get("Parent")
                .and_then(instance_id_of)
                .and_then(|d| drives.get(&d.to_ascii_uppercase()).copied())
            else {
                continue;
            };
            for file in image.all("HostResource") {
                out.insert(file.to_ascii_lowercase(), Attachment { vm_id: vm_id.clone(), slot });
            }
        }
        Ok(out)
    }

    fn volume_info(volume_id: &str, found: &Found, at: Option<&Attachment>) -> pb::VolumeInfo {
        pb::VolumeInfo {
            volume_id: volume_id.to_owned(),
            size_gib: gib_of(found.bytes),
            native_id: found.path.clone(),
            vm_id: at.map(|a| a.vm_id.clone()).unwrap_or_default(),
            slot: at.map(|a| a.slot).unwrap_or(0),
            // The provider reports no hosts (VmInfo.host is empty too).
            host: String::new(),
        }
    }

    async fn volume_now(&self, volume_id: &str) -> Result<(Found, Option<Attachment>), ProviderError> {
        let found = self
            .find_volume(volume_id)
            .await
            .map_err(map_error)?
            .ok_or_else(|| ProviderError::new(ErrorKind::NotFound, format!("no volume {volume_id}")))?;
        let at = self.attachments().await.map_err(map_error)?.remove(&found.path.to_ascii_lowercase());
        Ok((found, at))
    }

    /// CreateVolume.
    pub(crate) async fn volume_create(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let spec = req.spec.ok_or_else(|| invalid("spec", "required"))?;
        let dir = self.volume_dir(&spec.storage)?;
        if !spec.host.is_empty()
            && !spec.host.eq_ignore_ascii_case(self.host_name().await.map_err(map_error)?)
        {
            return Err(invalid("spec.host", format!("{:?} is not this provider's host", spec.host)));
        }
        let _serial = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        if let Some(found) = self.find_volume(&req.volume_id).await.map_err(map_error)? {
            let at = self.attachments().await.map_err(map_error)?.remove(&found.path.to_ascii_lowercase());
            return Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()));
        }
        let path = format!("{dir}\\{}", file_name(&req.volume_id));
        let mut vhd = Instance::new("Msvm_VirtualHardDiskSettingData");
        vhd.set("Type", "uint16", "3").set("Format", "uint16", "3").set("Path", "string", path.clone()).set(
            "MaxInternalSize",
            "uint64",
            (u64::from(spec.size_gib) * GIB).to_string(),
        );
        let made = self
            .call(
                &Self::service(IMS),
                "CreateVirtualHardDisk",
                &[("VirtualDiskSettingData", Param::Instance(vhd))],
            )
            .await;
        self.failpoints.hit("volume:after-create");
        match made {
            Ok(_) => {}
            // The file appeared meanwhile (the host's "exists" job error):
            // what is there now is the answer.
            Err(e @ HvError::Job { .. }) => {
                if self.vhd_bytes(&path).await.map_err(map_error)?.is_none() {
                    return Err(map_error(e));
                }
            }
            Err(e) => return Err(map_error(e)),
        }
        let (found, at) = self.volume_now(&req.volume_id).await?;
        Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()))
    }

    /// GetVolume.
    pub(crate) async fn volume_get(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        let (found, at) = self.volume_now(volume_id).await?;
        Ok(Self::volume_info(volume_id, &found, at.as_ref()))
    }

    /// ListVolumes: `hcp-vol-<uuid>.vhdx` in every volume directory.
    pub(crate) async fn volume_list(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        let attachments = self.attachments().await.map_err(map_error)?;
        let mut out: Vec<pb::VolumeInfo> = Vec::new();
        for dir in self.volume_dirs() {
            let Some((drive, path)) = split_dir(&dir) else { continue };
            let wql = format!(
                "SELECT * FROM CIM_DataFile WHERE Drive = {} AND Path = {} AND Extension = 'vhdx'",
                wql_literal(&drive),
                wql_literal(&path)
            );
            let files = self.host.query_in(CIMV2, &wql).await.map_err(|e| map_error(e.into()))?;
            for f in files {
                let Some(id) = f
                    .get("FileName")
                    .and_then(|n| n.to_ascii_lowercase().strip_prefix("hcp-vol-").map(str::to_owned))
                    .filter(|id| is_uuid(id))
                else {
                    continue;
                };
                if out.iter().any(|v| v.volume_id == id) {
                    continue;
                }
                let file = format!("{dir}\\{}", file_name(&id));
                // Gone between the listing and now: not listed.
                let Some(bytes) = self.vhd_bytes(&file).await.map_err(map_error)? else { continue };
                let found = Found { path: file, bytes };
                out.push(Self::volume_info(&id, &found, attachments.get(&found.path.to_ascii_lowercase())));
            }
        }
        Ok(hcp_provider_sdk::volume_page_of(out, &req))
    }

    /// ExtendVolume: `ResizeVirtualHardDisk`, online for a VHDX on SCSI.
    pub(crate) async fn volume_extend(
        &self,
        req: pb::ExtendVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let _serial = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let (found, at) = self.volume_now(&req.volume_id).await?;
        let now = gib_of(found.bytes);
        if req.size_gib < now {
            return Err(invalid("size_gib", format!("the volume has {now} GiB; volumes only grow")));
        }
        if req.size_gib > now {
            let bytes = u64::from(req.size_gib) * GIB;
            self.call(
                &Self::service(IMS),
                "ResizeVirtualHardDisk",
                &[
                    ("Path", Param::Text(found.path.clone())),
                    ("MaxInternalSize", Param::Text(bytes.to_string())),
                ],
            )
            .await
            .map_err(map_error)?;
        }
        let found = Found {
            bytes: self.vhd_bytes(&found.path).await.map_err(map_error)?.unwrap_or(found.bytes),
            ..found
        };
        Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()))
    }

    /// AttachVolume: a disk drive at location `slot` of the VM's SCSI
    /// controller, then the VHDX in it; hot while the VM runs.
    pub(crate) async fn volume_attach(
        &self,
        req: pb::AttachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        if req.slot == 0 || req.slot > MAX_VOLUMES {
            return Err(invalid("slot", format!("must be 1 to {MAX_VOLUMES}")));
        }
        let _volume = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        let (found, at) = self.volume_now(&req.volume_id).await?;
        match &at {
            Some(a) if a.vm_id == req.vm_id && a.slot == req.slot => {
                return Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()));
            }
            Some(a) => {
                return Err(failed_precondition(format!(
                    "volume {} is attached to vm {} at slot {}",
                    req.volume_id, a.vm_id, a.slot
                )));
            }
            None => {}
        }
        let vm = self.require(&req.vm_id).await?;
        self.attach_file(&vm, &req.vm_id, &found.path, req.slot).await?;
        let (found, at) = self.volume_now(&req.volume_id).await?;
        Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()))
    }

    async fn attach_file(&self, vm: &Vm, vm_id: &str, file: &str, slot: u32) -> Result<(), ProviderError> {
        let err = |e: HvError| map_error(e);
        if !(vm.running() || vm.off()) {
            return Err(failed_precondition(format!("vm {vm_id} is neither running nor off")));
        }
        let vssd = self.settings(vm).await.map_err(err)?;
        let d = self.devices(&vssd).await.map_err(err)?;
        let controller = d
            .controller()
            .cloned()
            .ok_or_else(|| failed_precondition(format!("vm {vm_id} has no SCSI controller")))?;
        let controller_path = self.path_of(&controller).await.map_err(err)?;
        let drive = match d.drive_at(&controller_path, slot) {
            Some(dr) => {
                let dr_path = self.path_of(dr).await.map_err(err)?;
                if dr.get("ResourceSubType") != Some(DISK_DRIVE) || d.image_in(&dr_path).is_some() {
                    return Err(failed_precondition(format!("slot {slot} of vm {vm_id} is taken")));
                }
                // An empty drive an interrupted attach left: filled now.
                dr.clone()
            }
            None => {
                let mut dr = Instance::new("Msvm_ResourceAllocationSettingData");
                dr.set("ResourceType", "uint16", "17")
                    .set("ResourceSubType", "string", DISK_DRIVE)
                    .set("Parent", "string", controller_path.clone())
                    .set("AddressOnParent", "string", slot.to_string());
                self.add(&vssd, dr).await.map_err(err)?;
                self.failpoints.hit("volume:after-drive");
                let d = self.devices(&vssd).await.map_err(err)?;
                d.drive_at(&controller_path, slot).cloned().ok_or_else(|| {
                    err(HvError::Unexpected(format!("the disk drive at {slot} is missing after its add")))
                })?
            }
        };
        let mut sasd = Instance::new("Msvm_StorageAllocationSettingData");
        sasd.set("ResourceType", "uint16", "31")
            .set("ResourceSubType", "string", VHD)
            .set("Parent", "string", self.path_of(&drive).await.map_err(err)?)
            .set_array("HostResource", "string", vec![file.to_owned()]);
        self.add(&vssd, sasd).await.map_err(err)?;
        Ok(())
    }

    /// The boot volume of a create: its file when it exists (detached, or
    /// already this VM's root disk after an interrupted create), else made
    /// in `storage` as a differencing VHDX on the image's `parent`. Either
    /// way grown to `disk_gib` when smaller: a create that died between the
    /// make and the grow converges, and a VM's root disk is never below its
    /// flavor's (as ResizeVm keeps it). Its content is never touched.
    pub(crate) async fn boot_volume_file(
        &self,
        vm_id: &str,
        volume_id: &str,
        storage: &str,
        parent: impl FnOnce() -> Result<String, ProviderError>,
        disk_gib: u32,
    ) -> Result<String, ProviderError> {
        let found = match self.find_volume(volume_id).await.map_err(map_error)? {
            Some(found) => {
                if let Some(a) =
                    self.attachments().await.map_err(map_error)?.get(&found.path.to_ascii_lowercase())
                    && !(a.vm_id == vm_id && a.slot == 0)
                {
                    return Err(failed_precondition(format!(
                        "boot_volume_id: volume {volume_id} is attached to vm {} at slot {}",
                        a.vm_id, a.slot
                    )));
                }
                found
            }
            None => {
                // Checked before anything is made: the storage, the image.
                let dir = self.volume_dir(storage).map_err(|_| {
                    invalid("spec.boot_storage", format!("no storage {storage:?} on this provider"))
                })?;
                let path = format!("{dir}\\{}", file_name(volume_id));
                self.ensure_vhd(&path, &parent()?, disk_gib).await?;
                self.failpoints.hit("create:after-boot-volume");
                return Ok(path);
            }
        };
        let want = u64::from(disk_gib.max(1)) * GIB;
        if found.bytes < want {
            self.resize_vhd(&found.path, disk_gib.max(1)).await.map_err(map_error)?;
        }
        Ok(found.path)
    }

    /// The files of the data volumes a create attaches, each checked: it
    /// exists (NOT_FOUND otherwise) and is detached or already at its slot
    /// of this VM (FAILED_PRECONDITION otherwise).
    pub(crate) async fn data_volume_files(
        &self,
        vm_id: &str,
        volumes: &[(String, u32)],
    ) -> Result<Vec<(String, u32)>, ProviderError> {
        if volumes.is_empty() {
            return Ok(Vec::new());
        }
        let attachments = self.attachments().await.map_err(map_error)?;
        let mut out = Vec::new();
        for (id, slot) in volumes {
            let found = self
                .find_volume(id)
                .await
                .map_err(map_error)?
                .ok_or_else(|| ProviderError::new(ErrorKind::NotFound, format!("no volume {id}")))?;
            if let Some(a) = attachments.get(&found.path.to_ascii_lowercase())
                && !(a.vm_id == vm_id && a.slot == *slot)
            {
                return Err(failed_precondition(format!(
                    "volume {id} is attached to vm {} at slot {}",
                    a.vm_id, a.slot
                )));
            }
            out.push((found.path, *slot));
        }
        Ok(out)
    }

    /// Attaches the data volumes of a create (after its devices), each
    /// skipped when its file is in a drive of the VM already.
    pub(crate) async fn attach_at_create(
        &self,
        vm: &Vm,
        vm_id: &str,
        files: &[(String, u32)],
    ) -> Result<(), ProviderError> {
        for (file, slot) in files {
            let vssd = self.settings(vm).await.map_err(map_error)?;
            let d = self.devices(&vssd).await.map_err(map_error)?;
            if d.storage.iter().any(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(file))) {
                continue;
            }
            self.attach_file(vm, vm_id, file, *slot).await?;
            self.failpoints.hit("create:after-volume");
        }
        Ok(())
    }

    /// DetachVolume: the drive holding the VHDX is removed (and the VHDX
    /// with it); the file stays.
    pub(crate) async fn volume_detach(
        &self,
        req: pb::DetachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let _volume = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        let gone = || pb::VolumeInfo { volume_id: req.volume_id.clone(), ..Default::default() };
        let Some(found) = self.find_volume(&req.volume_id).await.map_err(map_error)? else {
            return Ok(gone());
        };
        let at = self.attachments().await.map_err(map_error)?.remove(&found.path.to_ascii_lowercase());
        if let Some(a) = &at
            && a.vm_id == req.vm_id
            && a.slot == 0
        {
            return Err(failed_precondition(format!(
                "volume {} is the boot volume of vm {}: it leaves only with DeleteVm",
                req.volume_id, req.vm_id
            )));
        }
        if let Some(vm) = self.find(&req.vm_id).await.map_err(map_error)? {
            let vssd = self.settings(&vm).await.map_err(map_error)?;
            let d = self.devices(&vssd).await.map_err(map_error)?;
            let drive = d
                .storage
                .iter()
                .find(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(&found.path)))
                .and_then(|s| s.get("Parent"))
                .and_then(instance_id_of);
            if let Some(drive) = drive {
                if !(vm.running() || vm.off()) {
                    return Err(failed_precondition(format!("vm {} is neither running nor off", req.vm_id)));
                }
                let target = Epr::new("Msvm_ResourceAllocationSettingData", &[("InstanceID", &drive)]);
                self.call(
                    &Self::service(VSMS),
                    "RemoveResourceSettings",
                    &[("ResourceSettings", Param::Ref(target))],
                )
                .await
                .map_err(map_error)?;
            }
        }
        let at = self.attachments().await.map_err(map_error)?.remove(&found.path.to_ascii_lowercase());
        Ok(Self::volume_info(&req.volume_id, &found, at.as_ref()))
    }

    /// DeleteVolume: `CIM_DataFile.Delete` of a detached volume's file.
    pub(crate) async fn volume_delete(&self, volume_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&format!("volume:{volume_id}")).await;
        let Some(found) = self.find_volume(volume_id).await.map_err(map_error)? else {
            return Ok(false);
        };
        if let Some(a) = self.attachments().await.map_err(map_error)?.get(&found.path.to_ascii_lowercase()) {
            return Err(failed_precondition(format!(
                "volume {volume_id} is attached to vm {}: detach it first",
                a.vm_id
            )));
        }
        let file = Epr::cimv2("CIM_DataFile", &[("Name", &found.path)]);
        match self.host.invoke(&file, "Delete", &[]).await {
            Ok(out) if out.return_value == rv::OK => Ok(true),
            Ok(out) if out.return_value == SHARING_VIOLATION => {
                Err(failed_precondition(format!("volume {volume_id} is in use on the host")))
            }
            Ok(out) => Err(map_error(HvError::Method {
                method: "CIM_DataFile.Delete".into(),
                code: out.return_value,
            })),
            // Gone between the look and the delete.
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(map_error(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_split_into_drive_and_path_for_wql() {
        assert_eq!(
            split_dir("C:\\Hyper-V\\hcp\\volumes"),
            Some(("c:".into(), "\\hyper-v\\hcp\\volumes\\".into()))
        );
        assert_eq!(split_dir("D:\\vols\\"), Some(("d:".into(), "\\vols\\".into())));
        assert_eq!(split_dir("\\\\fs\\share"), None);
        assert_eq!(split_dir("C:"), None);
        assert_eq!(split_dir("C:\\a\\..\\b"), None);
        assert_eq!(split_dir("volumes"), None);
    }

    #[test]
    fn drive_paths_give_their_instance_id() {
        assert_eq!(
            instance_id_of(
                "\\\\H\\root\\virtualization\\v2:Msvm_ResourceAllocationSettingData.InstanceID=\"Microsoft:G\\\\C\\\\3\\\\0\\\\D\""
            ),
            Some("Microsoft:G\\C\\3\\0\\D".into())
        );
        assert_eq!(instance_id_of("nothing"), None);
    }

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(gib_of(GIB), 1);
        assert_eq!(gib_of(GIB + 1), 2);
        assert_eq!(gib_of(0), 0);
    }
}
