//! The `Provider` implementation: capabilities, readiness, credentials and
//! the compute operations (power through `RequestStateChange` and
//! `InitiateShutdown`, resize, delete), delegating create, consoles and
//! snapshots to their modules.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::cim::wql_literal;
use crate::errors::{HvError, invalid, map_error};
use crate::inventory::Vm;
use crate::wsman::{Credentials, Epr, Param};
use crate::{Hyperv, VSMS, rv, state, vm_name};

impl Hyperv {
    pub(crate) async fn request_state(&self, vm: &Vm, requested: u16) -> Result<(), HvError> {
        match self
            .call(&vm.epr(), "RequestStateChange", &[("RequestedState", Param::Text(requested.to_string()))])
            .await
        {
            // 32775: the VM is already there (os-win reads it so too).
            Err(HvError::Method { code: rv::INVALID_STATE, .. })
                if self.reread(vm).await?.enabled_state == u64::from(requested) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    pub(crate) async fn wait_off(&self, vm: &Vm, timeout: Duration) -> Result<bool, HvError> {
        let deadline = Instant::now() + timeout;
        let poll = Duration::from_millis(self.config.timing.job_poll_ms);
        loop {
            if self.reread(vm).await?.off() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// DestroySystem keeps disks and ISOs: removes ours where the provider
    /// can reach them.
    pub(crate) async fn remove_files(&self, vm_id: &str) {
        let name = vm_name(vm_id);
        let files = [
            self.config.vm_dir_local.as_ref().map(|d| d.join(format!("{name}.vhdx"))),
            self.config.cloud_init.as_ref().map(|c| c.local_dir.join(format!("{name}-seed.iso"))),
        ];
        for f in files.into_iter().flatten() {
            match tokio::fs::remove_file(&f).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot remove a file of a deleted VM")
                }
            }
        }
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Hyperv {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("hyperv.hcp.dev", env!("CARGO_PKG_VERSION"), "hyperv")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let mut attributes = HashMap::new();
        attributes.insert("host".to_owned(), self.host_name().await.map_err(map_error)?.to_owned());
        Ok(pb::Capabilities {
            // Images are VHDX files on the image share (`images.rs`).
            supports_image_import: self.config.image_share.is_some(),
            supports_capture: self.config.image_share.is_some(),
            image_formats: vec![pb::DiskFormat::Vhdx as i32],
            supports_cloud_init: self.config.cloud_init.is_some() && hcp_nocloud::tool_available(),
            supports_snapshot: true,
            supports_snapshot_running: true,
            // CPUs, memory and the VHDX of a stopped VM.
            supports_resize: true,
            // VMConnect, relayed by the gateway.
            supports_console_rdp: true,
            // VHDX files on the VM's SCSI controller: Hyper-V adds and
            // removes SCSI disks of a running VM, and resizes a VHDX on
            // SCSI online (Windows Server 2012 R2 on).
            supports_volumes: true,
            supports_hot_attach: true,
            supports_volume_extend_in_use: true,
            volumes_host_local: !self.config.volumes.shared,
            max_volumes_per_vm: crate::MAX_VOLUMES,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.host.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        match self
            .host
            .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'")
            .await
        {
            Ok(h) => {
                Ok((true, format!("Hyper-V host {}", h.first().and_then(|h| h.get("Name")).unwrap_or("?"))))
            }
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        match (get("username"), get("password")) {
            (Some(username), Some(password)) => {
                self.host.set_credentials(Credentials { username, password });
                Ok(())
            }
            _ => Err(invalid("credentials", "give username and password")),
        }
    }

    fn needs_configuration(&self) -> bool {
        !self.host.has_credentials()
    }
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.create(req).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let vm = self.require(vm_id).await?;
        self.info(vm_id, &vm).await.map_err(map_error)
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let all = self
            .host
            .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
            .await
            .map_err(|e| map_error(e.into()))?;
        let mut vms = Vec::new();
        for i in all {
            let Some(id) = i.get("ElementName").and_then(|n| n.strip_prefix("hcp-")).filter(|id| is_uuid(id))
            else {
                continue;
            };
            let id = id.to_owned();
            let vm = Vm::of(&i);
            vms.push(pb::VmInfo {
                vm_id: id,
                power_state: vm.power() as i32,
                native_id: vm.guid.clone(),
                ..Default::default()
            });
        }
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let vm = self.require(vm_id).await?;
        if !vm.running() {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            self.failpoints.hit("start:after-start");
        }
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(vm_id, &vm).await.map_err(map_error)
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.off() {
            let wql =
                format!("SELECT * FROM Msvm_ShutdownComponent WHERE SystemName = {}", wql_literal(&vm.guid));
            let component = if req.force || !vm.running() {
                None
            } else {
                self.host.query(&wql).await.map_err(|e| map_error(e.into()))?.into_iter().next()
            };
            let graceful = match component {
                Some(c) => {
                    let target = Epr::new(
                        "Msvm_ShutdownComponent",
                        &[
                            (
                                "CreationClassName",
                                c.get("CreationClassName").unwrap_or("Msvm_ShutdownComponent"),
                            ),
                            ("DeviceID", c.get("DeviceID").unwrap_or_default()),
                            ("SystemCreationClassName", "Msvm_ComputerSystem"),
                            ("SystemName", &vm.guid),
                        ],
                    );
                    let timeout = Duration::from_secs(if req.timeout_seconds > 0 {
                        u64::from(req.timeout_seconds)
                    } else {
                        self.config.timing.shutdown_timeout_seconds
                    });
                    match self
                        .call(
                            &target,
                            "InitiateShutdown",
                            &[
                                ("Force", Param::Text("false".into())),
                                ("Reason", Param::Text("HCP stop".into())),
                            ],
                        )
                        .await
                    {
                        Ok(_) => self.wait_off(&vm, timeout).await.map_err(map_error)?,
                        Err(e) => {
                            tracing::info!(vm_id = req.vm_id, error = %e, "the guest cannot be asked to shut down");
                            false
                        }
                    }
                }
                // No integration services: nobody in the guest to ask.
                None => false,
            };
            if !graceful {
                self.request_state(&vm, state::OFF).await.map_err(map_error)?;
            }
        }
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.running() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        let requested = if req.hard { state::RESET } else { state::REBOOT };
        self.call(&vm.epr(), "RequestStateChange", &[("RequestedState", Param::Text(requested.to_string()))])
            .await
            .map_err(map_error)?;
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.vcpus == 0 || req.memory_mib == 0 {
            return Err(invalid("vcpus", "vcpus and memory_mib must be positive"));
        }
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.off() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not off: Hyper-V resizes stopped VMs", req.vm_id),
            ));
        }
        // The disk first: a refused shrink changes nothing else. The root
        // disk is the VM's own VHDX or its boot volume.
        if req.disk_gib > 0 {
            let root =
                self.root_disk(&vm).await.map_err(map_error)?.unwrap_or_else(|| self.vhd_path(&req.vm_id));
            match self.resize_vhd(&root, req.disk_gib).await {
                Ok(()) => {}
                Err(HvError::Method { code: rv::INVALID_PARAMETER, .. }) => {
                    return Err(invalid("disk_gib", "smaller than the disk; disks only grow"));
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        let vssd = self.settings(&vm).await.map_err(map_error)?;
        let d = self.devices(&vssd).await.map_err(map_error)?;
        self.size(&d, req.vcpus, req.memory_mib).await.map_err(map_error)?;
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let Some(vm) = self.find(vm_id).await.map_err(map_error)? else {
            // A create that failed before its define may have left its disk.
            self.remove_files(vm_id).await;
            return Ok(false);
        };
        if !vm.off() {
            self.request_state(&vm, state::OFF).await.map_err(map_error)?;
        }
        match self
            .call(&Self::service(VSMS), "DestroySystem", &[("AffectedSystem", Param::Ref(vm.epr()))])
            .await
        {
            Ok(_) => {}
            Err(HvError::Wsman(e)) if e.is_not_found() => {}
            Err(e) => return Err(map_error(e)),
        }
        self.remove_files(vm_id).await;
        Ok(true)
    }
    async fn import_image(
        &self,
        upload: hcp_provider_sdk::image::ImageUpload,
    ) -> Result<pb::ImageInfo, ProviderError> {
        self.import(upload).await
    }

    async fn capture_image(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        self.capture(req).await
    }

    async fn delete_image(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        self.delete_image_file(req).await
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        self.console(req).await
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        self.snapshot_create(req).await
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        self.snapshot_list(vm_id).await
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        self.snapshot_revert(req).await
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        self.snapshot_delete(req).await
    }

    async fn create_volume(&self, req: pb::CreateVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volume_create(req).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<pb::VolumeInfo, ProviderError> {
        self.volume_get(volume_id).await
    }

    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, ProviderError> {
        self.volume_list(req).await
    }

    async fn extend_volume(&self, req: pb::ExtendVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volume_extend(req).await
    }

    async fn attach_volume(&self, req: pb::AttachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volume_attach(req).await
    }

    async fn detach_volume(&self, req: pb::DetachVolumeRequest) -> Result<pb::VolumeInfo, ProviderError> {
        self.volume_detach(req).await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<bool, ProviderError> {
        self.volume_delete(volume_id).await
    }
}
