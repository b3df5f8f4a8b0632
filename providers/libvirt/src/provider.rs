//! The `Provider` implementation: every call checks its ids, takes the VM's
//! lock where it changes the VM, and runs in its module.

use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::errors::check_uuid;
use crate::{Libvirt, VmVolumes};

#[hcp_provider_sdk::async_trait]
impl Provider for Libvirt {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("hcp.libvirt", env!("CARGO_PKG_VERSION"), "kvm")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(self.inner.capabilities.clone())
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        match self.call("probe", |c| Ok(c.is_alive()?)).await {
            Ok(true) => Ok((true, format!("connected to {}", self.inner.config.uri))),
            Ok(false) => Ok((false, "the libvirt connection is not alive".to_owned())),
            Err(e) => Ok((false, e.message)),
        }
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let volumes = VmVolumes::of(req.spec.as_ref());
        self.create_vm_with_volumes(req, volumes).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.info(vm_id).await
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        self.list(req).await
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let _held = lock.lock().await;
        self.start(vm_id).await
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.stop(req).await
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.reboot(req).await
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.resize(req).await
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let existed = {
            let _held = lock.lock().await;
            self.delete(vm_id).await?
        };
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(vm_id);
        Ok(existed)
    }

    async fn get_console_log(&self, req: pb::GetConsoleLogRequest) -> Result<pb::ConsoleLog, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        if !self.inner.capabilities.supports_console_log {
            return Err(ProviderError::new(ErrorKind::Unsupported, "console logs are not supported"));
        }
        self.console_log(req).await
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        self.console(req).await
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_create(req).await
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.snapshot_list(vm_id).await
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_revert(req).await
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_delete(req).await
    }

    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", &req.volume_id)?;
        let lock = self.lock(&req.volume_id);
        let _held = lock.lock().await;
        self.volume_create(req).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", volume_id)?;
        self.volume_get(volume_id).await
    }

    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        self.volumes_enabled()?;
        self.volume_list(req).await
    }

    async fn extend_volume(&self, req: pb::ExtendVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", &req.volume_id)?;
        let lock = self.lock(&req.volume_id);
        let _held = lock.lock().await;
        self.volume_extend(req).await
    }

    async fn attach_volume(&self, req: pb::AttachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", &req.volume_id)?;
        check_uuid("vm_id", &req.vm_id)?;
        // The volume first, then the VM: the one order every call keeps.
        let volume = self.lock(&req.volume_id);
        let _volume = volume.lock().await;
        let vm = self.lock(&req.vm_id);
        let _vm = vm.lock().await;
        self.volume_attach(req).await
    }

    async fn detach_volume(&self, req: pb::DetachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", &req.volume_id)?;
        check_uuid("vm_id", &req.vm_id)?;
        let volume = self.lock(&req.volume_id);
        let _volume = volume.lock().await;
        let vm = self.lock(&req.vm_id);
        let _vm = vm.lock().await;
        self.volume_detach(req).await
    }

    async fn import_image(
        &self,
        upload: hcp_provider_sdk::image::ImageUpload,
    ) -> Result<pb::ImageInfo, ProviderError> {
        self.image_import(upload).await
    }

    async fn capture_image(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        self.image_capture(req).await
    }

    async fn delete_image(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        self.image_delete(req).await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<bool, ProviderError> {
        self.volumes_enabled()?;
        check_uuid("volume_id", volume_id)?;
        let lock = self.lock(volume_id);
        let existed = {
            let _held = lock.lock().await;
            self.volume_delete(volume_id).await?
        };
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(volume_id);
        Ok(existed)
    }
}

impl Libvirt {
    /// CreateVm with a boot volume and data volumes: what `VmSpec`'s
    /// `boot_volume_id`, `boot_storage` and `volumes` will carry once the
    /// proto has them. Takes the volumes' locks (in id order), then the
    /// VM's, as every volume call does (an imported or captured image's
    /// lock is taken with the volumes').
    pub async fn create_vm_with_volumes(
        &self,
        req: pb::CreateVmRequest,
        volumes: VmVolumes,
    ) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let mut ids: Vec<String> = volumes.boot_volume_id.iter().cloned().collect();
        for (i, v) in volumes.volumes.iter().enumerate() {
            check_uuid(&format!("volumes[{i}].volume_id"), &v.volume_id)?;
            ids.push(v.volume_id.clone());
        }
        if let Some(boot) = &volumes.boot_volume_id {
            check_uuid("boot_volume_id", boot)?;
        }
        if !volumes.is_empty() {
            self.volumes_enabled()?;
        }
        // An image's lock too: a DeleteImage cannot slip between the
        // overlay's making and the check for overlays resting on the image.
        let source = req.spec.as_ref().and_then(|s| s.image.as_ref()).map(|i| i.source.as_str());
        if let Some(image_id) = source.and_then(crate::storage::image_id_of_source) {
            ids.push(image_id.to_owned());
        }
        ids.sort();
        ids.dedup();
        let locks: Vec<_> = ids.iter().map(|id| self.lock(id)).collect();
        let mut held = Vec::with_capacity(locks.len());
        for lock in &locks {
            held.push(lock.lock().await);
        }
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.create(req, volumes).await
    }

    fn volumes_enabled(&self) -> Result<(), ProviderError> {
        if self.inner.capabilities.supports_volumes {
            Ok(())
        } else {
            Err(ProviderError::new(ErrorKind::Unsupported, "volumes are not supported on the test driver"))
        }
    }
}
