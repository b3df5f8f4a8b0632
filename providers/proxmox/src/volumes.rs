//! Volumes: disk images on a PVE storage that outlive the VMs they are
//! attached to.
//!
//! - Each is allocated with `POST /nodes/{node}/storage/{storage}/content`
//!   under one owner vmid that is never a VM (`volumes.owner_vmid`), and
//!   named `vm-<owner>-hcp-<volume id>` (plus `.raw` on file storages). The
//!   name alone says a volume is HCP's and which one, so the storage
//!   listing finds every one of them, those HCP forgot included, and a
//!   repeated create finds the first one instead of making another.
//! - Why a foreign owner: PVE frees with a VM the disks its vmid owns and
//!   only those (`destroy_vm` skips volumes of other owners, and
//!   `destroy-unreferenced-disks` looks only for `vm-<vmid>-*`). A drive the
//!   VM does not own leaves its config without becoming `unusedN`, and
//!   removing an `unusedN` entry frees the volume only when the VM owns it.
//!   So DeleteVm, detaching and a crash anywhere in between can never free
//!   a volume; only DeleteVolume does.
//! - Slot N is the drive `scsiN` (1 to 30; `scsi0` is the root disk), set
//!   with `PUT .../config` and removed with `delete=scsiN`. PVE hot-plugs
//!   disks into a running VM when its `hotplug` option includes `disk`
//!   (its default).
//! - Attachments are read from the configs of HCP's VMs (their tags).

use std::collections::HashMap;

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use serde_json::Value;

use crate::Proxmox;
use crate::client::{Method, Params, encode_segment, lenient};
use crate::errors::{invalid, map_error};
use crate::inventory::{Found, Untagged, tags_of};

const GIB: u64 = 1 << 30;

/// The most data volumes a VM takes: `scsi1` to `scsi30` (PVE numbers SCSI
/// drives 0 to 30 and the root disk is `scsi0`).
pub(crate) const MAX_SLOTS: u32 = 30;

/// The tag of the helper VM a detached volume is resized on.
const RESIZER_TAG: &str = "hcp-volume-resizer";

/// The SCSI drive keys by slot (request parameter names are static).
const SCSI: [&str; 31] = [
    "scsi0", "scsi1", "scsi2", "scsi3", "scsi4", "scsi5", "scsi6", "scsi7", "scsi8", "scsi9", "scsi10",
    "scsi11", "scsi12", "scsi13", "scsi14", "scsi15", "scsi16", "scsi17", "scsi18", "scsi19", "scsi20",
    "scsi21", "scsi22", "scsi23", "scsi24", "scsi25", "scsi26", "scsi27", "scsi28", "scsi29", "scsi30",
];

/// A storage with `images` content as one node sees it.
#[derive(Debug, Clone)]
pub(crate) struct ImageStorage {
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) shared: bool,
    plugin: String,
}

impl ImageStorage {
    /// Storages of files (a directory, NFS, ...) want the format as the
    /// image name's extension; block storages (LVM, ZFS, RBD) want none.
    fn file_based(&self) -> bool {
        matches!(self.plugin.as_str(), "dir" | "nfs" | "cifs" | "glusterfs" | "btrfs" | "cephfs")
    }

    fn content_path(&self) -> String {
        format!("/nodes/{}/storage/{}/content", encode_segment(&self.node), encode_segment(&self.name))
    }
}

/// One of HCP's volumes found on the cluster.
#[derive(Debug, Clone)]
struct Located {
    volume_id: String,
    /// `storage:name`.
    volid: String,
    /// A node that sees it: the one holding it on local storage.
    storage: ImageStorage,
    /// Bytes.
    size: u64,
}

/// A volume's place in a VM of HCP's.
#[derive(Debug, Clone)]
struct Attachment {
    vm_id: String,
    vm: Found,
    key: String,
}

impl Attachment {
    fn slot(&self) -> u32 {
        self.key.strip_prefix("scsi").and_then(|n| n.parse().ok()).unwrap_or_default()
    }
}

/// The image name of an HCP volume.
pub(crate) fn volume_name(owner: u32, volume_id: &str, file_based: bool) -> String {
    let ext = if file_based { ".raw" } else { "" };
    format!("vm-{owner}-hcp-{volume_id}{ext}")
}

/// The HCP volume id a volid of ours carries (`local-lvm:vm-<owner>-hcp-<id>`).
pub(crate) fn volume_id_of(volid: &str, owner: u32) -> Option<&str> {
    let name = volid.split_once(':')?.1;
    let rest = name.strip_prefix("vm-")?.strip_prefix(owner.to_string().as_str())?.strip_prefix("-hcp-")?;
    let id = rest.get(..36)?;
    let ext = rest.get(36..)?;
    (is_uuid(id) && matches!(ext, "" | ".raw" | ".qcow2" | ".vmdk")).then_some(id)
}

/// The volume of a drive value (`local-lvm:vm-100-disk-0,size=2G`).
pub(crate) fn drive_volid(value: &str) -> &str {
    let first = value.split(',').next().unwrap_or_default();
    first.strip_prefix("file=").or_else(|| first.strip_prefix("volume=")).unwrap_or(first)
}

/// A drive key (`scsiN`, `virtioN`, `sataN`, `ideN`) or an `unusedN`.
pub(crate) fn is_drive_or_unused(key: &str) -> bool {
    ["scsi", "virtio", "sata", "ide", "unused"].iter().any(|bus| {
        key.strip_prefix(bus).is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    })
}

/// Whether PVE hot-plugs disks into this VM (`hotplug` includes `disk`;
/// unset and `1` mean the default `network,disk,usb`).
fn hotplugs_disks(config: &Value) -> bool {
    match config["hotplug"].as_str() {
        None | Some("1") => true,
        Some(list) => list.split(',').any(|f| f.trim() == "disk"),
    }
}

fn volume_not_found(volume_id: &str) -> ProviderError {
    ProviderError::new(ErrorKind::NotFound, format!("volume {volume_id} not found"))
}

fn precondition(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidState, message)
}

fn info(loc: &Located, attachment: Option<&Attachment>) -> pb::VolumeInfo {
    pb::VolumeInfo {
        volume_id: loc.volume_id.clone(),
        size_gib: u32::try_from(loc.size.div_ceil(GIB)).unwrap_or(u32::MAX),
        native_id: loc.volid.clone(),
        vm_id: attachment.map(|a| a.vm_id.clone()).unwrap_or_default(),
        slot: attachment.map(Attachment::slot).unwrap_or_default(),
        host: if loc.storage.shared { String::new() } else { loc.storage.node.clone() },
    }
}

impl Proxmox {
    fn owner(&self) -> u32 {
        self.config.volumes.owner_vmid
    }

    /// The storage of volumes whose spec names none.
    pub(crate) fn default_volume_storage(&self) -> Option<&str> {
        self.config.volumes.storage.as_deref().or(self.config.storage.as_deref())
    }

    /// Every (node, storage) pair with `images` content.
    pub(crate) async fn image_storages(&self) -> Result<Vec<ImageStorage>, ProviderError> {
        let items = self.resources("storage").await?;
        Ok(items
            .iter()
            .filter(|s| s["content"].as_str().unwrap_or_default().split(',').any(|c| c == "images"))
            .map(|s| ImageStorage {
                name: s["storage"].as_str().unwrap_or_default().to_owned(),
                node: s["node"].as_str().unwrap_or_default().to_owned(),
                shared: lenient::flag(&s["shared"]),
                plugin: s["plugintype"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// The storages to list: each shared one once (through the provider's
    /// node when it sees it), each local one on every node.
    async fn listing_targets(&self) -> Result<Vec<ImageStorage>, ProviderError> {
        let mut all = self.image_storages().await?;
        // The provider's node first, so a shared storage is read through it.
        all.sort_by_key(|s| s.node != self.config.node);
        let mut seen_shared: Vec<String> = Vec::new();
        Ok(all
            .into_iter()
            .filter(|s| {
                if !s.shared {
                    return true;
                }
                if seen_shared.contains(&s.name) {
                    return false;
                }
                seen_shared.push(s.name.clone());
                true
            })
            .collect())
    }

    /// HCP's volumes on one storage (those of the owner vmid, by name).
    async fn volumes_on(&self, storage: &ImageStorage) -> Result<Vec<Located>, ProviderError> {
        let params: Params = vec![("content", "images".to_owned()), ("vmid", self.owner().to_string())];
        let data = self.pve.call(Method::Get, &storage.content_path(), params).await.map_err(map_error)?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| {
                let volid = item["volid"].as_str()?;
                let volume_id = volume_id_of(volid, self.owner())?;
                Some(Located {
                    volume_id: volume_id.to_owned(),
                    volid: volid.to_owned(),
                    storage: storage.clone(),
                    size: lenient::u64(&item["size"]).unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn all_volumes(&self) -> Result<Vec<Located>, ProviderError> {
        let mut out = Vec::new();
        for storage in self.listing_targets().await? {
            out.extend(self.volumes_on(&storage).await?);
        }
        Ok(out)
    }

    async fn locate(&self, volume_id: &str) -> Result<Option<Located>, ProviderError> {
        Ok(self.all_volumes().await?.into_iter().find(|v| v.volume_id == volume_id))
    }

    /// Where HCP's volumes are attached, by volume id: every HCP VM's
    /// config, one read each.
    async fn attachments(&self) -> Result<HashMap<String, Attachment>, ProviderError> {
        let items = self.resources("vm").await?;
        let mut out = HashMap::new();
        for item in
            items.iter().filter(|i| i["type"].as_str() == Some("qemu") && !lenient::flag(&i["template"]))
        {
            let Some(vm_id) = tags_of(item)
                .into_iter()
                .find_map(|t| t.strip_prefix("hcp-").filter(|id| is_uuid(id)).map(str::to_owned))
            else {
                continue;
            };
            let vm = Self::found(item, true);
            let config = match self.pve.call(Method::Get, &format!("{}/config", vm.path()), Vec::new()).await
            {
                Ok(c) => c,
                // Deleted since the listing.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(map_error(e)),
            };
            for (key, value) in config.as_object().into_iter().flatten() {
                if !SCSI.contains(&key.as_str()) {
                    continue;
                }
                let Some(volume_id) = value.as_str().and_then(|v| volume_id_of(drive_volid(v), self.owner()))
                else {
                    continue;
                };
                out.insert(
                    volume_id.to_owned(),
                    Attachment { vm_id: vm_id.clone(), vm: vm.clone(), key: key.clone() },
                );
            }
        }
        Ok(out)
    }

    async fn described_volume(&self, loc: &Located) -> Result<pb::VolumeInfo, ProviderError> {
        let attachments = self.attachments().await?;
        Ok(info(loc, attachments.get(&loc.volume_id)))
    }

    /// A VM at the owner vmid would take every HCP volume with it when
    /// destroyed: refuse to allocate more until the operator moves one.
    async fn check_owner_is_no_vm(&self) -> Result<(), ProviderError> {
        let owner = self.owner();
        let vms = self.resources("vm").await?;
        if let Some(vm) = vms.iter().find(|v| lenient::u64(&v["vmid"]) == Some(u64::from(owner))) {
            return Err(precondition(format!(
                "vmid {owner} (volumes.owner_vmid) is a VM ({:?}); destroying it would free HCP's volumes, \
                 so volumes.owner_vmid must name a vmid no VM has",
                vm["name"].as_str().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// CreateVolume: found again by its name, or allocated.
    pub(crate) async fn volume_create(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let id = req.volume_id.as_str();
        let spec = req.spec.unwrap_or_default();
        let _serial = self.volume_locks.lock(id).await;
        if let Some(loc) = self.locate(id).await? {
            return self.described_volume(&loc).await;
        }
        let wanted = if spec.storage.is_empty() {
            self.default_volume_storage()
                .ok_or_else(|| invalid("spec.storage", "no storage given and no volumes.storage configured"))?
                .to_owned()
        } else {
            spec.storage.clone()
        };
        let storages: Vec<ImageStorage> =
            self.image_storages().await?.into_iter().filter(|s| s.name == wanted).collect();
        let Some(first) = storages.first() else {
            return Err(invalid(
                "spec.storage",
                format!("{wanted:?} is no storage for disk images on this cluster"),
            ));
        };
        let storage = if !spec.host.is_empty() {
            storages.iter().find(|s| s.node == spec.host).ok_or_else(|| {
                invalid("spec.host", format!("node {:?} has no storage {wanted:?}", spec.host))
            })?
        } else {
            storages.iter().find(|s| s.node == self.config.node).unwrap_or(first)
        };
        self.check_owner_is_no_vm().await?;
        let params: Params = vec![
            ("filename", volume_name(self.owner(), id, storage.file_based())),
            ("size", format!("{}G", spec.size_gib)),
            ("vmid", self.owner().to_string()),
            ("format", "raw".to_owned()),
        ];
        match self.pve.call(Method::Post, &storage.content_path(), params).await {
            Ok(_) => {}
            // An earlier attempt allocated it and its answer was lost.
            Err(e) if e.already_exists() => {}
            Err(e) => return Err(map_error(e)),
        }
        let loc = self.locate(id).await?.ok_or_else(|| {
            ProviderError::new(ErrorKind::Internal, format!("volume {id} was allocated but is not listed"))
        })?;
        Ok(info(&loc, None))
    }

    pub(crate) async fn volume_get(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        let loc = self.locate(volume_id).await?.ok_or_else(|| volume_not_found(volume_id))?;
        self.described_volume(&loc).await
    }

    pub(crate) async fn volume_list(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        let volumes = self.all_volumes().await?;
        let attachments = self.attachments().await?;
        let infos = volumes.iter().map(|v| info(v, attachments.get(&v.volume_id))).collect();
        Ok(hcp_provider_sdk::volume_page_of(infos, &req))
    }

    /// ExtendVolume: `PUT .../resize` on the drive of the VM it is attached
    /// to (online when the VM runs), or of a helper VM when it is detached:
    /// PVE resizes images only through a VM's drive, its API has no
    /// storage-level resize.
    pub(crate) async fn volume_extend(
        &self,
        req: pb::ExtendVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let id = req.volume_id.as_str();
        let _serial = self.volume_locks.lock(id).await;
        let loc = self.locate(id).await?.ok_or_else(|| volume_not_found(id))?;
        let want = u64::from(req.size_gib) * GIB;
        let attachment = self.attachments().await?.remove(id);
        if want < loc.size {
            return Err(invalid(
                "size_gib",
                format!(
                    "{} GiB is below the volume's {} GiB; volumes only grow",
                    req.size_gib,
                    loc.size.div_ceil(GIB)
                ),
            ));
        }
        if want == loc.size {
            if attachment.is_none() {
                // A resize that did its work but failed after it may have
                // left its helper behind.
                self.sweep_resizer(&loc).await?;
            }
            return Ok(info(&loc, attachment.as_ref()));
        }
        let Some(a) = attachment else {
            self.extend_detached(&loc, req.size_gib).await?;
            let loc = self.locate(id).await?.ok_or_else(|| volume_not_found(id))?;
            return Ok(info(&loc, None));
        };
        let _vm = self.locks.lock(&a.vm_id).await;
        let params: Params = vec![("disk", a.key.clone()), ("size", format!("{}G", req.size_gib))];
        self.pve.task(Method::Put, &format!("{}/resize", a.vm.path()), params).await.map_err(map_error)?;
        let loc = self.locate(id).await?.ok_or_else(|| volume_not_found(id))?;
        Ok(info(&loc, Some(&a)))
    }

    /// Grows a detached volume. PVE resizes images only through a VM's
    /// drive, so the volume is put on a helper VM for the resize: a VM with
    /// no disk of its own, never started, tagged [`RESIZER_TAG`], on the
    /// node that holds the volume; it is destroyed afterwards. A helper
    /// left by a crash is found by its tag, reused, and then destroyed;
    /// destroying it frees nothing of HCP's, as it owns no image.
    async fn extend_detached(&self, loc: &Located, size_gib: u32) -> Result<(), ProviderError> {
        let node = loc.storage.node.clone();
        // One helper at a time per node (volume ids are UUIDs: no clash).
        let _turn = self.volume_locks.lock(&format!("resizer@{node}")).await;
        let helper = match self.find_resizer(&node).await? {
            Some(f) => f,
            None => self.make_resizer(&node).await?,
        };
        let config = self.vm_config(&helper).await?;
        // Still there after a resize that was cut short?
        let held =
            self.drives_holding(&config, |v| v == loc.volid).into_iter().find(|k| SCSI.contains(&k.as_str()));
        let key = match held {
            Some(key) => key,
            None => {
                let free = SCSI[1..].iter().find(|k| config[**k].is_null()).ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::Busy,
                        format!("the resize helper on {node} has no free slot"),
                    )
                })?;
                let params: Params = vec![(*free, loc.volid.clone())];
                self.pve
                    .call(Method::Put, &format!("{}/config", helper.path()), params)
                    .await
                    .map_err(map_error)?;
                (*free).to_owned()
            }
        };
        let params: Params = vec![("disk", key), ("size", format!("{size_gib}G"))];
        self.pve.task(Method::Put, &format!("{}/resize", helper.path()), params).await.map_err(map_error)?;
        self.retire_resizer(&helper).await
    }

    /// Destroys a helper VM left holding this volume.
    async fn sweep_resizer(&self, loc: &Located) -> Result<(), ProviderError> {
        let _turn = self.volume_locks.lock(&format!("resizer@{}", loc.storage.node)).await;
        let Some(helper) = self.find_resizer(&loc.storage.node).await? else {
            return Ok(());
        };
        let config = self.vm_config(&helper).await?;
        if self.drives_holding(&config, |v| v == loc.volid).is_empty() {
            return Ok(());
        }
        self.retire_resizer(&helper).await
    }

    async fn find_resizer(&self, node: &str) -> Result<Option<Found>, ProviderError> {
        let items = self.resources("vm").await?;
        Ok(items
            .iter()
            .find(|i| {
                i["type"].as_str() == Some("qemu")
                    && i["node"].as_str() == Some(node)
                    && tags_of(i).iter().any(|t| t == RESIZER_TAG)
            })
            .map(|i| Self::found(i, true)))
    }

    /// `POST /nodes/{node}/qemu`: options only, no disk, never started.
    async fn make_resizer(&self, node: &str) -> Result<Found, ProviderError> {
        for _ in 0..10u32 {
            let vmid = self.next_vmid().await?;
            if vmid == 0 {
                continue;
            }
            let params: Params = vec![
                ("vmid", vmid.to_string()),
                ("name", "hcp-volume-resizer".to_owned()),
                ("tags", RESIZER_TAG.to_owned()),
                (
                    "description",
                    "HCP attaches a detached volume here to resize it, then deletes this VM. \
                     It owns no disk: deleting it frees nothing."
                        .to_owned(),
                ),
            ];
            match self.pve.task(Method::Post, &format!("/nodes/{}/qemu", encode_segment(node)), params).await
            {
                Ok(_) => {}
                Err(e) if e.already_exists() => continue,
                Err(e) => return Err(map_error(e)),
            }
            if let Some(f) = self.find_resizer(node).await? {
                return Ok(f);
            }
        }
        Err(ProviderError::new(ErrorKind::Busy, "no free vmid for the resize helper after 10 attempts"))
    }

    /// Drops HCP's volumes from the helper, then destroys it (without
    /// `destroy-unreferenced-disks`: it owns nothing to free).
    async fn retire_resizer(&self, helper: &Found) -> Result<(), ProviderError> {
        self.release_volumes(helper).await?;
        let params: Params = vec![("purge", "1".to_owned())];
        match self.pve.task(Method::Delete, &helper.path(), params).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// AttachVolume: `scsiN=<volid>` in one config update (hot-plugged
    /// into a running VM).
    pub(crate) async fn volume_attach(
        &self,
        req: pb::AttachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let (id, vm_id) = (req.volume_id.as_str(), req.vm_id.as_str());
        let _volume = self.volume_locks.lock(id).await;
        let _vm = self.locks.lock(vm_id).await;
        self.attach_locked(id, vm_id, req.slot).await
    }

    /// AttachVolume's work, for a caller holding the volume's and the VM's
    /// locks (CreateVm attaches `VmSpec.volumes` this way).
    pub(crate) async fn attach_locked(
        &self,
        id: &str,
        vm_id: &str,
        slot: u32,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let Some(key) = SCSI.get(slot as usize).filter(|_| slot >= 1) else {
            return Err(invalid("slot", format!("must be 1 to {MAX_SLOTS} (scsi1 to scsi{MAX_SLOTS})")));
        };
        let loc = self.locate(id).await?.ok_or_else(|| volume_not_found(id))?;
        let f = self.require(vm_id).await?;
        self.sweep_resizer(&loc).await?;
        if let Some(a) = self.attachments().await?.remove(id) {
            if a.vm_id == vm_id && a.key == *key {
                return Ok(info(&loc, Some(&a)));
            }
            return Err(precondition(format!(
                "volume {id} is attached to vm {} at slot {}; detach it first",
                a.vm_id,
                a.slot()
            )));
        }
        if !loc.storage.shared && loc.storage.node != f.node {
            return Err(precondition(format!(
                "volume {id} is on the local storage of {}, and vm {vm_id} runs on {}",
                loc.storage.node, f.node
            )));
        }
        let config = self.vm_config(&f).await?;
        if let Some(taken) = config[*key].as_str() {
            return Err(precondition(format!("slot {slot} of vm {vm_id} ({key}) holds {taken}")));
        }
        if f.status != "stopped" && !hotplugs_disks(&config) {
            return Err(precondition(format!(
                "vm {vm_id} is {} and its hotplug option does not include disk",
                f.status
            )));
        }
        let params: Params = vec![(*key, loc.volid.clone())];
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        let a = Attachment { vm_id: vm_id.to_owned(), vm: f, key: (*key).to_owned() };
        Ok(info(&loc, Some(&a)))
    }

    /// Makes the HCP volume `id` the root disk (`scsi0`) of a VM being
    /// created, for a caller holding the volume's and the VM's locks.
    ///
    /// An existing volume must be detached (or already this VM's root
    /// disk) and reachable from the VM's node; it is used as it is. A
    /// missing one is copied from the clone's own root disk (the image) to
    /// `vm-<owner>-hcp-<id>` on `storage` (empty: the default volume
    /// storage) with `POST .../content/{volid}` `target=...`: PVE names
    /// every disk a clone or an import makes itself, and this copy is the
    /// one call that writes an image under a name of ours. Then one config
    /// update puts the volume at `scsi0` first in the boot order; the
    /// clone's disk becomes `unusedN` (the VM owns it) and is freed.
    ///
    /// Each step is found done on a retry: the copy by the volume's name,
    /// the swap by `scsi0`, the clean-up by the `unusedN` left.
    pub(crate) async fn boot_from_volume(
        &self,
        f: &Found,
        id: &str,
        storage: &str,
    ) -> Result<(), ProviderError> {
        let config = self.vm_config(f).await?;
        let root = config[SCSI[0]].as_str().map(drive_volid).unwrap_or_default();
        if volume_id_of(root, self.owner()) == Some(id) {
            return self.free_unused_own_disks(f).await;
        }
        let loc = match self.locate(id).await? {
            Some(loc) => {
                if let Some(a) = self.attachments().await?.remove(id) {
                    return Err(precondition(format!(
                        "volume {id} is attached to vm {} at slot {}; a boot volume must be detached",
                        a.vm_id,
                        a.slot()
                    )));
                }
                if !loc.storage.shared && loc.storage.node != f.node {
                    return Err(precondition(format!(
                        "volume {id} is on the local storage of {}, and the vm is on {}",
                        loc.storage.node, f.node
                    )));
                }
                self.sweep_resizer(&loc).await?;
                loc
            }
            None => self.copy_root_disk(f, &config, id, storage).await?,
        };
        let (old_key, _) = self.boot_disk(f).await?;
        let mut params: Params = vec![(SCSI[0], loc.volid.clone()), ("boot", "order=scsi0".to_owned())];
        if old_key != SCSI[0] {
            params.push(("delete", old_key));
        }
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        self.free_unused_own_disks(f).await
    }

    /// Copies the VM's root disk to a new HCP volume `id`.
    async fn copy_root_disk(
        &self,
        f: &Found,
        config: &Value,
        id: &str,
        storage: &str,
    ) -> Result<Located, ProviderError> {
        let wanted = if storage.is_empty() {
            self.default_volume_storage()
                .ok_or_else(|| {
                    invalid("spec.boot_storage", "no storage given and no volumes.storage configured")
                })?
                .to_owned()
        } else {
            storage.to_owned()
        };
        let target = self
            .image_storages()
            .await?
            .into_iter()
            .find(|s| s.name == wanted && s.node == f.node)
            .ok_or_else(|| {
                invalid(
                    "spec.boot_storage",
                    format!("{wanted:?} is no storage for disk images on node {:?}", f.node),
                )
            })?;
        self.check_owner_is_no_vm().await?;
        let (key, _) = self.boot_disk(f).await?;
        let source = config[key.as_str()].as_str().map(drive_volid).unwrap_or_default().to_owned();
        let Some((source_storage, _)) = source.split_once(':') else {
            return Err(ProviderError::new(
                ErrorKind::Internal,
                format!("the root disk {key} of the clone names no storage volume ({source:?})"),
            ));
        };
        let path = format!(
            "/nodes/{}/storage/{}/content/{}",
            encode_segment(&f.node),
            encode_segment(source_storage),
            encode_segment(&source)
        );
        let name = volume_name(self.owner(), id, target.file_based());
        let params: Params =
            vec![("target", format!("{}:{name}", target.name)), ("target_node", f.node.clone())];
        match self.pve.task(Method::Post, &path, params).await {
            Ok(_) => {}
            // A copy whose answer was lost.
            Err(e) if e.already_exists() => {}
            Err(e) => return Err(map_error(e)),
        }
        self.locate(id).await?.ok_or_else(|| {
            ProviderError::new(ErrorKind::Internal, format!("volume {id} was copied but is not listed"))
        })
    }

    /// Frees the `unusedN` disks a VM owns (its clone disk, replaced by a
    /// boot volume). Removing an `unusedN` frees the image only when the VM
    /// owns it, so HCP's volumes are never touched.
    async fn free_unused_own_disks(&self, f: &Found) -> Result<(), ProviderError> {
        let config = self.vm_config(f).await?;
        let owner = self.owner();
        let unused: Vec<String> = self
            .drives_holding(&config, |volid| volume_id_of(volid, owner).is_none())
            .into_iter()
            .filter(|k| k.starts_with("unused"))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let params: Params = vec![("delete", unused.join(","))];
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }

    /// DetachVolume: `delete=<its drives>` (hot-unplugged from a running
    /// VM). The volume is not the VM's own, so PVE drops the drive from the
    /// config and keeps the image.
    pub(crate) async fn volume_detach(
        &self,
        req: pb::DetachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let (id, vm_id) = (req.volume_id.as_str(), req.vm_id.as_str());
        let _volume = self.volume_locks.lock(id).await;
        let _vm = self.locks.lock(vm_id).await;
        let Some(loc) = self.locate(id).await? else {
            // Gone: detached from everything.
            return Ok(pb::VolumeInfo { volume_id: id.to_owned(), ..Default::default() });
        };
        let Some(f) = self.find(vm_id, Untagged::Ignore).await? else {
            return self.described_volume(&loc).await;
        };
        let config = self.vm_config(&f).await?;
        let keys = self.drives_holding(&config, |volid| volid == loc.volid);
        if keys.is_empty() {
            return self.described_volume(&loc).await;
        }
        if keys.iter().any(|k| k == SCSI[0]) {
            return Err(precondition(format!(
                "volume {id} is the boot volume of vm {vm_id} (slot 0); it leaves the vm only with DeleteVm"
            )));
        }
        if f.status != "stopped" && !hotplugs_disks(&config) {
            return Err(precondition(format!(
                "vm {vm_id} is {} and its hotplug option does not include disk",
                f.status
            )));
        }
        self.drop_drives(&f, &keys).await?;
        Ok(info(&loc, None))
    }

    /// DeleteVolume of a detached volume: `DELETE .../content/{volid}`
    /// (an `imgdel` task).
    pub(crate) async fn volume_delete(&self, volume_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.volume_locks.lock(volume_id).await;
        let Some(loc) = self.locate(volume_id).await? else {
            return Ok(false);
        };
        if let Some(a) = self.attachments().await?.remove(volume_id) {
            return Err(precondition(format!(
                "volume {volume_id} is attached to vm {} at slot {}; detach it first",
                a.vm_id,
                a.slot()
            )));
        }
        self.sweep_resizer(&loc).await?;
        let path = format!("{}/{}", loc.storage.content_path(), encode_segment(&loc.volid));
        if let Err(e) = self.pve.task(Method::Delete, &path, Vec::new()).await {
            // Freed after all (by a call whose answer was lost)?
            if self.locate(volume_id).await?.is_some() {
                return Err(map_error(e));
            }
        }
        Ok(true)
    }

    /// Before a VM is destroyed its HCP volumes leave its config, so that
    /// nothing of theirs depends on how PVE treats the disks of a VM it
    /// destroys (it frees only the ones the VM owns, which ours are not).
    pub(crate) async fn release_volumes(&self, f: &Found) -> Result<(), ProviderError> {
        let config = match self.pve.call(Method::Get, &format!("{}/config", f.path()), Vec::new()).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(map_error(e)),
        };
        let owner = self.owner();
        let keys = self.drives_holding(&config, |volid| volume_id_of(volid, owner).is_some());
        if keys.is_empty() {
            return Ok(());
        }
        self.drop_drives(f, &keys).await
    }

    /// The drive and `unusedN` keys of a config whose volume passes `hit`.
    fn drives_holding(&self, config: &Value, hit: impl Fn(&str) -> bool) -> Vec<String> {
        config
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| {
                is_drive_or_unused(k)
                    && v.as_str().is_some_and(|v| !v.contains("media=cdrom") && hit(drive_volid(v)))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Removes drives from a VM's config. A volume of another owner leaves
    /// the config at once; should PVE list one as `unusedN` all the same,
    /// that entry goes too (removing `unusedN` frees only a volume the VM
    /// owns, never ours).
    async fn drop_drives(&self, f: &Found, keys: &[String]) -> Result<(), ProviderError> {
        let path = format!("{}/config", f.path());
        let before = self.vm_config(f).await?;
        let volids: Vec<&str> =
            keys.iter().filter_map(|k| before[k.as_str()].as_str()).map(drive_volid).collect();
        let params: Params = vec![("delete", keys.join(","))];
        self.pve.call(Method::Put, &path, params).await.map_err(map_error)?;
        let after = self.vm_config(f).await?;
        let unused: Vec<String> = self
            .drives_holding(&after, |volid| volids.contains(&volid))
            .into_iter()
            .filter(|k| k.starts_with("unused"))
            .collect();
        if !unused.is_empty() {
            let params: Params = vec![("delete", unused.join(","))];
            self.pve.call(Method::Put, &path, params).await.map_err(map_error)?;
        }
        Ok(())
    }

    async fn vm_config(&self, f: &Found) -> Result<Value, ProviderError> {
        self.pve.call(Method::Get, &format!("{}/config", f.path()), Vec::new()).await.map_err(map_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_carry_the_hcp_id() {
        let id = "0190b5f2-0000-7000-8000-000000000001";
        let lvm = volume_name(999_999_999, id, false);
        assert_eq!(lvm, format!("vm-999999999-hcp-{id}"));
        for (volid, want) in [
            (format!("local-lvm:{lvm}"), Some(id)),
            (format!("nfs:{}", volume_name(999_999_999, id, true)), Some(id)),
            (format!("local-lvm:vm-999999998-hcp-{id}"), None),
            ("local-lvm:vm-999999999-disk-0".to_owned(), None),
            (format!("local-lvm:vm-999999999-hcp-{id}.img"), None),
            (format!("vm-999999999-hcp-{id}"), None),
        ] {
            assert_eq!(volume_id_of(&volid, 999_999_999), want, "{volid}");
        }
        assert_eq!(drive_volid("file=local:vm-1-disk-0,size=2G"), "local:vm-1-disk-0");
        assert!(is_drive_or_unused("scsi30") && is_drive_or_unused("unused0") && !is_drive_or_unused("net0"));
    }

    #[test]
    fn disks_hot_plug_unless_the_vm_says_otherwise() {
        for (hotplug, want) in [
            (Value::Null, true),
            (Value::from("1"), true),
            (Value::from("network,disk"), true),
            (Value::from("0"), false),
            (Value::from("network,usb"), false),
        ] {
            let config = serde_json::json!({ "hotplug": hotplug });
            assert_eq!(hotplugs_disks(&config), want, "{hotplug}");
        }
    }
}
