//! Power (start, ACPI stop with a deadline, reboot), resize of a stopped
//! domain (its root disk: overlay or boot volume), and delete with the
//! VM's own files, never a volume.

use std::time::{Duration, Instant};

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Libvirt;
use crate::connection::{CallError, not_running};
use crate::disks::{disk_growth, resize_image};
use crate::errors::{invalid, io_error};
use crate::inventory::info_of;
use crate::storage::{Slot, disks_of};

impl Libvirt {
    pub(crate) async fn start(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("start vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            // Started meanwhile by someone else: fine.
            if !d.is_active()?
                && let Err(e) = d.create()
                && !d.is_active().unwrap_or(false)
            {
                return Err(e.into());
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    pub(crate) async fn stop(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let what = format!("stop vm {vm_id}");
        if !req.force {
            let timeout = if req.timeout_seconds > 0 {
                Duration::from_secs(u64::from(req.timeout_seconds))
            } else {
                self.inner.config.stop_timeout()
            };
            let deadline = Instant::now() + timeout;
            // The power button is pressed again every few seconds: a guest
            // still booting may not be listening for it yet.
            loop {
                let id = vm_id.clone();
                let active = self
                    .call(&what, move |c| {
                        let d = c.lookup_domain_by_uuid_string(&id)?;
                        if !d.is_active()? {
                            return Ok(false);
                        }
                        match d.shutdown() {
                            Ok(()) => Ok(true),
                            Err(_) if !d.is_active()? => Ok(false),
                            Err(e) => Err(e.into()),
                        }
                    })
                    .await?;
                if !active {
                    return self.info(&vm_id).await;
                }
                let press = Instant::now() + Duration::from_secs(3);
                while Instant::now() < press.min(deadline) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if self.presence(&vm_id).await? == Some(false) {
                        return self.info(&vm_id).await;
                    }
                }
                if Instant::now() >= deadline {
                    tracing::info!(vm_id, ?timeout, "guest did not power off in time; powering off");
                    break;
                }
            }
        }
        let id = vm_id.clone();
        self.call(&what, move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            if d.is_active()?
                && let Err(e) = d.destroy()
                && d.is_active()?
            {
                return Err(e.into());
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    pub(crate) async fn reboot(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let id = req.vm_id.clone();
        self.call(&format!("reboot vm {}", req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            if !d.is_active()? {
                return Err(not_running());
            }
            if req.hard {
                // The reset button: the guest is not asked.
                d.reset()?;
            } else {
                d.reboot(0)?;
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    /// Sets vCPUs and memory of a stopped domain's definition, and grows its
    /// overlay disk. Everything that can refuse the request (the state, the
    /// sizes, a disk that would shrink or holds snapshots) is checked before
    /// anything changes; each change is idempotent, so a retry after a
    /// partial resize completes it.
    pub(crate) async fn resize(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.memory_mib < 32 {
            return Err(invalid("memory_mib: must be at least 32"));
        }
        let vm_id = req.vm_id.clone();
        let id = vm_id.clone();
        // The root disk is the VM's overlay or its boot volume: whichever
        // the definition names at `vda`.
        let (has_snapshots, disk) = self
            .call(&format!("resize vm {vm_id}"), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if d.is_active()? {
                    return Err(CallError::Hcp(ProviderError::new(
                        ErrorKind::InvalidState,
                        "a running domain cannot be resized on this host (no hot resize); stop it first",
                    )));
                }
                let root = disks_of(&d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?)
                    .into_iter()
                    .find(|disk| disk.target == Slot::BOOT.target())
                    .map(|disk| disk.file);
                Ok((d.num_snapshots(0)? > 0, root))
            })
            .await?;
        let disk = disk.unwrap_or_else(|| self.vm_dir(&vm_id).join("disk.qcow2"));
        let grow_to = if req.disk_gib > 0 && disk.is_file() {
            disk_growth(&disk, req.disk_gib, has_snapshots).await?
        } else {
            None
        };
        let id = vm_id.clone();
        let (vcpus, memory_mib) = (req.vcpus, req.memory_mib);
        self.call(&format!("resize vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let config = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            let now = d.info()?;
            // The maximum and the current value move in an order that
            // never puts the current above the maximum.
            let max_vcpus = config | virt::sys::VIR_DOMAIN_VCPU_MAXIMUM;
            if vcpus >= now.nr_virt_cpu {
                d.set_vcpus_flags(vcpus, max_vcpus)?;
                d.set_vcpus_flags(vcpus, config)?;
            } else {
                d.set_vcpus_flags(vcpus, config)?;
                d.set_vcpus_flags(vcpus, max_vcpus)?;
            }
            let kib = u64::from(memory_mib) * 1024;
            let max_mem = config | virt::sys::VIR_DOMAIN_MEM_MAXIMUM;
            if kib >= now.max_mem {
                d.set_memory_flags(kib, max_mem)?;
                d.set_memory_flags(kib, config)?;
            } else {
                d.set_memory_flags(kib, config)?;
                d.set_memory_flags(kib, max_mem)?;
            }
            Ok(())
        })
        .await?;
        if let Some(bytes) = grow_to {
            resize_image(&disk, bytes).await?;
        }
        self.info(&vm_id).await
    }

    pub(crate) async fn delete(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let id = vm_id.to_owned();
        let existed = self
            .call(&format!("delete vm {vm_id}"), move |c| {
                let d = match c.lookup_domain_by_uuid_string(&id) {
                    Ok(d) => d,
                    Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                if d.is_active()?
                    && let Err(e) = d.destroy()
                    && d.is_active()?
                {
                    return Err(e.into());
                }
                let flags =
                    virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
                if let Err(e) = d.undefine_flags(flags) {
                    // Drivers without NVRAM support refuse the flag.
                    if d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA).is_err() {
                        return Err(e.into());
                    }
                }
                Ok(true)
            })
            .await?;
        // Only the VM's own directory goes (overlay, seed, serial log): the
        // undefine above removes no storage, and volumes, its boot volume
        // included, live in a pool outside it, so they stay, detached.
        let dir = self.vm_dir(vm_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove the vm's files", e)),
        }
        Ok(existed)
    }
}
