//! CreateVM: the root disk (an overlay of the image, or a boot volume in a
//! pool), the NoCloud seed, the domain defined from its plan (UUID = HCP VM
//! id, data volumes attached) and started, each step repeatable.

use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::config::ImageConfig;
use crate::connection::CallError;
use crate::disks::{copy_image, make_overlay, set_mode};
use crate::domain::{DomainPlan, VolumeDisk};
use crate::errors::{invalid, io_error};
use crate::pool::{find_pool, find_volume, pool_path};
use crate::storage::{MAX_VOLUMES_PER_VM, Slot, volume_file_name};
use crate::volumes::all_domain_disks;
use crate::{Libvirt, VmVolumes, seed};

impl Libvirt {
    pub(crate) async fn create(
        &self,
        req: pb::CreateVmRequest,
        volumes: VmVolumes,
    ) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let spec = req.spec.ok_or_else(|| invalid("spec: required"))?;
        if (spec.user_data.is_some() || !spec.ssh_authorized_keys.is_empty())
            && !self.inner.capabilities.supports_cloud_init
        {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "cloud-init is not supported on this host",
            ));
        }
        if let Some(active) = self.presence(&vm_id).await? {
            if req.start && !active {
                self.start(&vm_id).await?;
            }
            return self.info(&vm_id).await;
        }
        let config = &self.inner.config;
        let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
        // An imported or captured image (a volume of the default pool,
        // booting by its own bootloader), else a configured one.
        let (image, image_format) = self.image_for(&source).await?;
        if spec.vcpus == 0 {
            return Err(invalid("vcpus: must be at least 1"));
        }
        if spec.memory_mib < 32 {
            return Err(invalid("memory_mib: must be at least 32"));
        }
        // The operator's mapping names a key of this host's [networks]
        // table; without one the HCP name is the key.
        let backings = config.backings();
        let nics = backings.resolve(&spec.networks, |key| backings.get(key).cloned()).map_err(|e| {
            let (index, field, key) = match e {
                BackingError::UnknownNetwork { index, network } => (index, "network", network),
                BackingError::UnknownBacking { index, backing } => (index, "backing", backing),
            };
            invalid(format!("networks[{index}].{field}: network {key:?} is not available on this host"))
        })?;
        if !image.disk.is_file() {
            return Err(ProviderError::new(
                ErrorKind::Internal,
                format!("image {source:?}: base disk {} is missing on this host", image.disk.display()),
            ));
        }

        let data_volumes = self.data_volumes(&vm_id, &volumes).await?;

        let dir = self.vm_dir(&vm_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("create the vm directory", e))?;
        set_mode(&dir, 0o755).map_err(|e| io_error("open the vm directory", e))?;
        let disk = match &volumes.boot_volume_id {
            Some(boot) => {
                let disk = self
                    .boot_volume(&vm_id, boot, &volumes.boot_storage, (&image, image_format), spec.disk_gib)
                    .await?;
                self.failpoint("create:after-boot-volume");
                disk
            }
            None => {
                let disk = dir.join("disk.qcow2");
                if !disk.exists() {
                    make_overlay(&image.disk, image_format, &disk, spec.disk_gib).await?;
                }
                disk
            }
        };
        self.failpoint("create:after-disk");
        let user_data = spec.user_data.clone().unwrap_or_default();
        let seed = if spec.user_data.is_some()
            || !spec.hostname.is_empty()
            || !spec.ssh_authorized_keys.is_empty()
        {
            let path = dir.join("seed.iso");
            seed::build(&path, &vm_id, &spec.hostname, &user_data, &spec.ssh_authorized_keys)
                .await
                .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("cloud-init seed: {e}")))?;
            Some(path)
        } else {
            None
        };
        self.failpoint("create:after-seed");
        let plan = DomainPlan {
            vm_id: vm_id.clone(),
            vm_name: spec.name.clone(),
            domain_type: self.inner.domain_type,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk,
            boot_volume_id: volumes.boot_volume_id.clone(),
            volumes: data_volumes,
            seed,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            nics,
            serial_log: dir.join("serial.log"),
            vnc_listen: config.vnc_listen,
            vnc_password: password(8),
            spice_password: password(24),
            image: source,
            labels: spec.labels.into_iter().collect(),
        };
        let xml = plan.to_xml();
        let id = vm_id.clone();
        self.call(&format!("define vm {vm_id}"), move |c| match c.define_domain_xml(&xml) {
            Ok(_) => Ok(()),
            // Someone defined it meanwhile (a retry racing a slow first try).
            Err(e) if c.lookup_domain_by_uuid_string(&id).is_ok() => {
                tracing::info!(error = %e.message(), "domain appeared while defining it");
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
        .await?;
        self.failpoint("create:after-define");
        if req.start {
            self.start(&vm_id).await?;
        }
        self.failpoint("create:after-start");
        self.info(&vm_id).await
    }
}

impl Libvirt {
    /// The data volumes a new VM starts with: slots valid and distinct,
    /// each volume existing and attached nowhere (the VM does not exist
    /// yet, so anywhere would be another VM).
    async fn data_volumes(&self, vm_id: &str, volumes: &VmVolumes) -> Result<Vec<VolumeDisk>, ProviderError> {
        let mut slots = BTreeSet::new();
        let mut ids = BTreeSet::new();
        ids.extend(volumes.boot_volume_id.clone());
        for (i, v) in volumes.volumes.iter().enumerate() {
            let slot = Slot::data(v.slot).ok_or_else(|| {
                invalid(format!(
                    "volumes[{i}].slot: {} is not a data slot (1 to {MAX_VOLUMES_PER_VM})",
                    v.slot
                ))
            })?;
            if !slots.insert(slot) {
                return Err(invalid(format!("volumes[{i}].slot: slot {} is given twice", v.slot)));
            }
            if !ids.insert(v.volume_id.clone()) {
                return Err(invalid(format!(
                    "volumes[{i}].volume_id: volume {} is given twice",
                    v.volume_id
                )));
            }
        }
        if volumes.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let (wanted, pools) = (
            volumes.volumes.clone(),
            self.inner.config.volume_pools().map(str::to_owned).collect::<Vec<_>>(),
        );
        let vm = vm_id.to_owned();
        self.call(&format!("volumes of vm {vm_id}"), move |c| {
            let domains = all_domain_disks(c)?;
            let mut out = Vec::new();
            for (i, v) in wanted.into_iter().enumerate() {
                let found = find_volume(c, &pools, &v.volume_id)?.ok_or_else(|| {
                    CallError::Hcp(ProviderError::new(
                        ErrorKind::NotFound,
                        format!("volumes[{i}]: volume {} not found", v.volume_id),
                    ))
                })?;
                if let Some(d) = domains.iter().find(|d| d.vm_id != vm && d.disk_of(&found.path).is_some()) {
                    return Err(CallError::Hcp(ProviderError::new(
                        ErrorKind::InvalidState,
                        format!("volumes[{i}]: volume {} is attached to vm {}", v.volume_id, d.vm_id),
                    )));
                }
                let slot = Slot::data(v.slot).unwrap_or(Slot::BOOT);
                out.push(VolumeDisk { volume_id: v.volume_id, file: found.path, slot });
            }
            Ok(out)
        })
        .await
    }

    /// The boot volume's file: the volume as it is when it exists (and is
    /// no other VM's), else a copy of the image made in `storage`'s pool.
    async fn boot_volume(
        &self,
        vm_id: &str,
        volume_id: &str,
        storage: &str,
        (image, format): (&ImageConfig, &str),
        disk_gib: u32,
    ) -> Result<PathBuf, ProviderError> {
        let config = &self.inner.config;
        let pool_name = config.volume_pool_for(storage).map(str::to_owned).ok_or_else(|| {
            invalid(format!("boot_storage: pool {storage:?} is not available on this host"))
        })?;
        let pools: Vec<String> = config.volume_pools().map(str::to_owned).collect();
        let (id, vm) = (volume_id.to_owned(), vm_id.to_owned());
        // Either the volume's file, or the directory to make it in.
        let found = self
            .call(&format!("boot volume {volume_id}"), move |c| {
                if let Some(found) = find_volume(c, &pools, &id)? {
                    if let Some(d) = all_domain_disks(c)?
                        .iter()
                        .find(|d| d.vm_id != vm && d.disk_of(&found.path).is_some())
                    {
                        return Err(CallError::Hcp(ProviderError::new(
                            ErrorKind::InvalidState,
                            format!("boot_volume_id: volume {id} is attached to vm {}", d.vm_id),
                        )));
                    }
                    return Ok(Ok(found.path));
                }
                let pool = find_pool(c, &pool_name)?.ok_or_else(|| {
                    CallError::Hcp(ProviderError::new(
                        ErrorKind::Internal,
                        format!("pool {pool_name} is gone"),
                    ))
                })?;
                let dir = pool_path(&pool)?.ok_or_else(|| {
                    CallError::Hcp(ProviderError::new(
                        ErrorKind::Internal,
                        format!("pool {pool_name} has no directory to copy an image into"),
                    ))
                })?;
                Ok(Err(dir))
            })
            .await?;
        let dir = match found {
            Ok(path) => return Ok(path),
            Err(dir) => dir,
        };
        let dest = dir.join(volume_file_name(volume_id));
        copy_image(&image.disk, format, &dest, disk_gib).await?;
        // The pool learns of the file at its next refresh (find_volume).
        Ok(dest)
    }
}

/// A random console password of `len` characters: 8 for VNC (RFB's DES
/// auth uses 8 bytes), more for SPICE (its ticket holds up to 60).
fn password(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}
