//! The volume calls: qcow2 volumes named by their HCP id in a libvirt
//! storage pool, attached as virtio disks at the target their slot names
//! (live and persistent on a running domain, persistent on a stopped one),
//! grown by virStorageVolResize, or by blockResize while a running guest
//! holds them. Where a volume is attached is read from the domains' XML,
//! both the persistent and the live one, so that a call repeated after a
//! crash between the two finishes the job instead of refusing it.
//!
//! Locks: a call takes the volume's lock, then the VM's (CreateVm with
//! volumes takes the volumes' locks before the VM's too), so two calls on
//! one volume never interleave and there is one order, hence no deadlock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_vol::StorageVol;

use crate::Libvirt;
use crate::connection::CallError;
use crate::domain::{METADATA_NS, vm_id_of_metadata};
use crate::errors::invalid;
use crate::pool::{Found, find_pool, find_volume};
use crate::storage::{DiskRef, MAX_VOLUMES_PER_VM, Slot, disk_xml, disks_of, volume_id_of_file, volume_xml};

/// How long a live detach waits for the guest to let go of the disk.
const DETACH_WAIT: Duration = Duration::from_secs(60);

/// The disks of one of HCP's domains, persistent and live.
pub(crate) struct DomainDisks {
    pub vm_id: String,
    pub domain: Domain,
    pub running: bool,
    pub config: Vec<DiskRef>,
    pub live: Vec<DiskRef>,
}

impl DomainDisks {
    fn read(vm_id: String, domain: Domain) -> Result<Self, virt::error::Error> {
        let running = domain.is_active()?;
        let config = disks_of(&domain.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?);
        let live = if running { disks_of(&domain.xml_desc(0)?) } else { Vec::new() };
        Ok(Self { vm_id, domain, running, config, live })
    }

    /// The disk using `file`, in the persistent definition or live.
    pub(crate) fn disk_of(&self, file: &std::path::Path) -> Option<&DiskRef> {
        self.config.iter().chain(&self.live).find(|d| d.file == file)
    }

    /// The disk at `target`, in the persistent definition or live.
    fn at(&self, target: &str) -> Option<&DiskRef> {
        self.config.iter().chain(&self.live).find(|d| d.target == target)
    }
}

/// Every HCP domain's disks (those carrying HCP's metadata).
pub(crate) fn all_domain_disks(c: &Connect) -> Result<Vec<DomainDisks>, virt::error::Error> {
    let mut out = Vec::new();
    for d in c.list_all_domains(0)? {
        let Ok(meta) = d.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0) else {
            continue;
        };
        let Some(id) = vm_id_of_metadata(&meta) else { continue };
        match DomainDisks::read(id, d) {
            Ok(disks) => out.push(disks),
            // Gone since the listing.
            Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The domain `file` is attached to, and at which target.
fn attached<'a>(
    domains: &'a [DomainDisks],
    file: &std::path::Path,
) -> Option<(&'a DomainDisks, &'a DiskRef)> {
    domains.iter().find_map(|d| d.disk_of(file).map(|disk| (d, disk)))
}

/// A volume as the protocol says it.
pub(crate) fn volume_info(volume_id: &str, found: &Found, domains: &[DomainDisks]) -> pb::VolumeInfo {
    let (vm_id, slot) = match attached(domains, &found.path) {
        Some((d, disk)) => (d.vm_id.clone(), Slot::of_target(&disk.target).map_or(0, Slot::number)),
        None => (String::new(), 0),
    };
    pb::VolumeInfo {
        volume_id: volume_id.to_owned(),
        size_gib: u32::try_from(found.capacity.div_ceil(1 << 30)).unwrap_or(u32::MAX),
        native_id: found.path.display().to_string(),
        vm_id,
        slot,
        host: String::new(),
    }
}

fn hcp(kind: ErrorKind, message: impl Into<String>) -> CallError {
    CallError::Hcp(ProviderError::new(kind, message))
}

fn no_volume(volume_id: &str) -> CallError {
    hcp(ErrorKind::NotFound, format!("volume {volume_id} not found"))
}

fn gib(n: u32) -> u64 {
    u64::from(n) << 30
}

impl Libvirt {
    fn volume_pools(&self) -> Vec<String> {
        self.inner.config.volume_pools().map(str::to_owned).collect()
    }

    pub(crate) async fn volume_create(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let spec = req.spec.ok_or_else(|| invalid("spec: required"))?;
        let pool_name =
            self.inner.config.volume_pool_for(&spec.storage).map(str::to_owned).ok_or_else(|| {
                invalid(format!("storage: pool {:?} is not available on this host", spec.storage))
            })?;
        let (id, pools) = (req.volume_id.clone(), self.volume_pools());
        let bytes = gib(spec.size_gib);
        self.call(&format!("create volume {}", req.volume_id), move |c| {
            // A repeated create finds the volume, wherever it was made.
            if find_volume(c, &pools, &id)?.is_some() {
                return Ok(());
            }
            let pool = find_pool(c, &pool_name)?
                .ok_or_else(|| hcp(ErrorKind::Internal, format!("pool {pool_name} is gone")))?;
            if let Err(e) = StorageVol::create_xml(&pool, &volume_xml(&id, bytes), 0) {
                // Made meanwhile by a retry racing this call: fine.
                if find_volume(c, &pools, &id)?.is_none() {
                    return Err(e.into());
                }
            }
            Ok(())
        })
        .await?;
        self.failpoint("volume:create:after-create");
        self.volume_get(&req.volume_id).await
    }

    pub(crate) async fn volume_get(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        let (id, pools) = (volume_id.to_owned(), self.volume_pools());
        self.call(&format!("volume {volume_id}"), move |c| {
            let found = find_volume(c, &pools, &id)?.ok_or_else(|| no_volume(&id))?;
            Ok(volume_info(&id, &found, &all_domain_disks(c)?))
        })
        .await
    }

    pub(crate) async fn volume_list(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        let pools = self.volume_pools();
        let volumes = self
            .call("list volumes", move |c| {
                let domains = all_domain_disks(c)?;
                let mut out = Vec::new();
                for name in &pools {
                    let Some(pool) = find_pool(c, name)? else { continue };
                    if !pool.is_active()? {
                        continue;
                    }
                    // Files placed behind libvirt's back count too.
                    if let Err(e) = pool.refresh(0) {
                        tracing::debug!(pool = %name, error = %e.message(), "pool refresh");
                    }
                    for vol in pool.list_all_volumes(0)? {
                        let Ok(file) = vol.name() else { continue };
                        let Some(id) = volume_id_of_file(&file).map(str::to_owned) else { continue };
                        match Found::of(vol) {
                            Ok(found) => out.push(volume_info(&id, &found, &domains)),
                            Err(e) if e.code().is(virt::error::ErrorNumber::NoStorageVolume) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(hcp_provider_sdk::volume_page_of(volumes, &req))
    }

    /// Grows a volume: through the running domain that holds it
    /// (blockResize, so the guest sees the new size at once), else through
    /// the pool (virStorageVolResize).
    pub(crate) async fn volume_extend(
        &self,
        req: pb::ExtendVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let (id, pools) = (req.volume_id.clone(), self.volume_pools());
        let want = gib(req.size_gib);
        let size_gib = req.size_gib;
        let grew = self
            .call(&format!("extend volume {}", req.volume_id), move |c| {
                let found = find_volume(c, &pools, &id)?.ok_or_else(|| no_volume(&id))?;
                if want < found.capacity {
                    return Err(CallError::Hcp(invalid(format!(
                        "size_gib: {size_gib} GiB is below the volume's {} GiB; volumes only grow",
                        found.capacity.div_ceil(1 << 30)
                    ))));
                }
                if want == found.capacity {
                    return Ok(false);
                }
                let domains = all_domain_disks(c)?;
                let holder = domains
                    .iter()
                    .filter(|d| d.running)
                    .find_map(|d| d.live.iter().find(|disk| disk.file == found.path).map(|disk| (d, disk)));
                match holder {
                    Some((d, disk)) => {
                        d.domain.block_resize(&disk.target, want, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)?
                    }
                    None => found.vol.resize(want, 0)?,
                }
                Ok(true)
            })
            .await?;
        if grew {
            self.failpoint("volume:extend:after-resize");
        }
        self.volume_get(&req.volume_id).await
    }

    pub(crate) async fn volume_attach(
        &self,
        req: pb::AttachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let slot = Slot::data(req.slot).ok_or_else(|| {
            invalid(format!("slot: {} is not a data slot (1 to {MAX_VOLUMES_PER_VM})", req.slot))
        })?;
        let (id, vm, pools) = (req.volume_id.clone(), req.vm_id.clone(), self.volume_pools());
        self.call(&format!("attach volume {} to vm {}", req.volume_id, req.vm_id), move |c| {
            let found = find_volume(c, &pools, &id)?.ok_or_else(|| no_volume(&id))?;
            let domains = all_domain_disks(c)?;
            let Some(d) = domains.iter().find(|d| d.vm_id == vm) else {
                return Err(hcp(ErrorKind::NotFound, format!("vm {vm} not found")));
            };
            let target = slot.target();
            if let Some((other, disk)) = attached(&domains, &found.path)
                && (other.vm_id != vm || disk.target != target)
            {
                let at = Slot::of_target(&disk.target).map_or(0, Slot::number);
                return Err(hcp(
                    ErrorKind::InvalidState,
                    format!("volume {id} is attached to vm {} at slot {at}; detach it first", other.vm_id),
                ));
            }
            if let Some(disk) = d.at(&target)
                && disk.file != found.path
            {
                return Err(hcp(
                    ErrorKind::InvalidState,
                    format!("slot {} of vm {vm} holds another disk ({})", slot.number(), disk.file.display()),
                ));
            }
            // Whatever half is missing (after a crash between the live and
            // the persistent attach, or a start meanwhile) is added.
            let mut flags = 0;
            if !d.config.iter().any(|disk| disk.file == found.path) {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            }
            if d.running && !d.live.iter().any(|disk| disk.file == found.path) {
                flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            if flags != 0 {
                d.domain.attach_device_flags(&disk_xml(&found.path, slot, &id), flags)?;
            }
            Ok(())
        })
        .await?;
        self.failpoint("volume:attach:after-attach");
        self.volume_get(&req.volume_id).await
    }

    pub(crate) async fn volume_detach(
        &self,
        req: pb::DetachVolumeRequest,
    ) -> Result<pb::VolumeInfo, ProviderError> {
        let (id, vm, pools) = (req.volume_id.clone(), req.vm_id.clone(), self.volume_pools());
        let what = format!("detach volume {} from vm {}", req.volume_id, req.vm_id);
        // (the volume's file, the live target to wait for), when there is anything to detach.
        let detached = self
            .call(&what, move |c| {
                let Some(found) = find_volume(c, &pools, &id)? else { return Ok(None) };
                let domains = all_domain_disks(c)?;
                let Some(d) = domains.iter().find(|d| d.vm_id == vm) else { return Ok(None) };
                let Some(disk) = d.disk_of(&found.path) else { return Ok(None) };
                let Some(slot) = Slot::of_target(&disk.target) else {
                    return Err(hcp(
                        ErrorKind::Internal,
                        format!("volume {id} sits at {}, not a slot", disk.target),
                    ));
                };
                if slot == Slot::BOOT {
                    return Err(hcp(
                        ErrorKind::InvalidState,
                        format!(
                            "volume {id} is the boot volume of vm {vm}; it is freed when the vm is deleted"
                        ),
                    ));
                }
                let mut flags = 0;
                if d.config.iter().any(|disk| disk.file == found.path) {
                    flags |= virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
                }
                let live = d.running && d.live.iter().any(|disk| disk.file == found.path);
                if live {
                    flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
                }
                d.domain.detach_device_flags(&disk_xml(&found.path, slot, &id), flags)?;
                Ok(live.then(|| found.path.clone()))
            })
            .await?;
        if let Some(file) = detached {
            self.wait_released(&req.vm_id, file).await?;
        }
        self.failpoint("volume:detach:after-detach");
        match self.volume_get(&req.volume_id).await {
            Err(e) if e.kind == ErrorKind::NotFound => {
                Ok(pb::VolumeInfo { volume_id: req.volume_id, ..Default::default() })
            }
            other => other,
        }
    }

    /// Waits until the running domain's live XML no longer has `file`: a
    /// live detach returns before the guest has acknowledged the unplug.
    async fn wait_released(&self, vm_id: &str, file: PathBuf) -> Result<(), ProviderError> {
        let deadline = Instant::now() + DETACH_WAIT;
        loop {
            let (id, f) = (vm_id.to_owned(), file.clone());
            let holds = self
                .call(&format!("vm {vm_id}"), move |c| {
                    let d = match c.lookup_domain_by_uuid_string(&id) {
                        Ok(d) => d,
                        Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => return Ok(false),
                        Err(e) => return Err(e.into()),
                    };
                    Ok(d.is_active()? && disks_of(&d.xml_desc(0)?).iter().any(|disk| disk.file == f))
                })
                .await?;
            if !holds {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Retryable: the unplug is still pending in the guest, and a
                // repeated detach waits again.
                return Err(ProviderError::new(
                    ErrorKind::Busy,
                    format!("the guest of vm {vm_id} has not released the disk yet"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn volume_delete(&self, volume_id: &str) -> Result<bool, ProviderError> {
        let (id, pools) = (volume_id.to_owned(), self.volume_pools());
        let existed = self
            .call(&format!("delete volume {volume_id}"), move |c| {
                let Some(found) = find_volume(c, &pools, &id)? else { return Ok(false) };
                if let Some((d, _)) = attached(&all_domain_disks(c)?, &found.path) {
                    return Err(hcp(
                        ErrorKind::InvalidState,
                        format!("volume {id} is attached to vm {}; detach it first", d.vm_id),
                    ));
                }
                found.vol.delete(0)?;
                Ok(true)
            })
            .await?;
        if existed {
            self.failpoint("volume:delete:after-delete");
        }
        Ok(existed)
    }
}
