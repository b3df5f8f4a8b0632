//! The `Provider` implementation: capabilities, readiness, credentials and
//! the compute operations (power, resize, delete), delegating create,
//! hosts, consoles, snapshots and volumes to their modules.

use std::collections::HashMap;
use std::time::Duration;

use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::Vsphere;
use crate::errors::{invalid, map_error};
use crate::inventory::Vm;
use crate::soap::VIM25;
use crate::spec::grow_disk;
use crate::vim::{self, MoRef};

/// Why a soft reboot of a guest without running VMware Tools is refused.
pub(crate) const NO_TOOLS_FOR_SOFT_REBOOT: &str =
    "VMware Tools are not running in the guest; a soft reboot needs them — ask for a hard reboot";

impl Vsphere {
    pub(crate) async fn reconfigure(&self, vm: &Vm, change: vim::ConfigSpec) -> Result<(), ProviderError> {
        let req = vim::ReconfigVm { xmlns: VIM25, this: &vm.moref, spec: change };
        self.soap.task("ReconfigVM_Task", &req).await.map_err(map_error)?;
        Ok(())
    }

    pub(crate) async fn power_on(&self, vm: &Vm) -> Result<(), ProviderError> {
        match self.soap.task_this("PowerOnVM_Task", &vm.moref).await {
            Ok(_) => Ok(()),
            // Someone powered it on meanwhile.
            Err(e) if e.fault() == Some("InvalidPowerState") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    pub(crate) async fn power_off(&self, vm: &Vm) -> Result<(), ProviderError> {
        match self.soap.task_this("PowerOffVM_Task", &vm.moref).await {
            Ok(_) => Ok(()),
            Err(e) if e.fault() == Some("InvalidPowerState") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Waits until the VM is powered off, at most `timeout`.
    pub(crate) async fn off_within(&self, vm: &Vm, timeout: Duration) -> Result<bool, ProviderError> {
        let off = self
            .soap
            .watch(&vm.moref, &["runtime.powerState"], timeout, |c| {
                c.val.as_ref().filter(|v| v.text.trim() == "poweredOff").map(|_| ())
            })
            .await
            .map_err(map_error)?;
        Ok(off.is_some())
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Vsphere {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("vsphere.hcp.dev", env!("CARGO_PKG_VERSION"), "vsphere")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let content = self.soap.content().await.map_err(map_error)?.clone();
        let places = self.places().await?.clone();
        // Live migration needs a cluster of more than one host and storage
        // they all reach.
        let owner = self
            .properties(&places.pool, &["owner"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("owner").and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok()));
        let hosts = match &owner {
            Some(c) if c.kind == "ClusterComputeResource" => self
                .properties(c, &["host"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("host").map(|h| h.children.len()))
                .unwrap_or(0),
            _ => 1,
        };
        let shared = match &places.datastore {
            Some(ds) => self
                .properties(ds, &["summary.multipleHostAccess"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("summary.multipleHostAccess").map(|v| v.text.trim() == "true"))
                .unwrap_or(false),
            None => false,
        };
        let mut attributes = HashMap::new();
        attributes.insert("api_type".to_owned(), content.api_type.clone());
        attributes.insert("api_version".to_owned(), content.api_version.clone());
        attributes.insert("product".to_owned(), content.full_name.clone());
        attributes.insert("cluster_hosts".to_owned(), hosts.to_string());
        Ok(pb::Capabilities {
            // Images are templates: imported from a stream-optimized VMDK
            // through an OVF import, or cloned from a stopped VM.
            supports_image_import: true,
            supports_capture: true,
            image_formats: vec![pb::DiskFormat::Vmdk as i32],
            supports_cloud_init: self.config.cloud_init,
            supports_snapshot: true,
            // With memory: the snapshot of a running VM keeps it running.
            supports_snapshot_running: true,
            supports_live_migration: hosts > 1 && shared,
            // A powered-off VM moves with its disks (RelocateVM_Task).
            supports_cold_migration: hosts > 1,
            // Disk files on datastores (see `volumes`).
            supports_volumes: true,
            // vSphere hot-adds and hot-removes SCSI disks.
            supports_hot_attach: true,
            // and grows an attached disk online.
            supports_volume_extend_in_use: true,
            // Datastores are reached by every host of the cluster that
            // mounts them; a volume on a datastore a host does not mount
            // fails to attach there (vSphere's error, passed on).
            volumes_host_local: false,
            max_volumes_per_vm: crate::volumes::MAX_VOLUMES_PER_VM,
            // WebMKS (RFB over a websocket) through the console proxy.
            supports_console_vnc: true,
            supports_resize: true,
            supports_hot_resize: self.config.hot_add,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.soap.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        // A call in the session, so that revoked credentials or an
        // unreachable vCenter make the provider not ready.
        let content = match self.soap.content().await {
            Ok(c) => c.clone(),
            Err(e) => return Ok((false, e.to_string())),
        };
        if let Err(e) = self.places().await {
            return Ok((false, e.message));
        }
        match self.properties(&content.root_folder, &["name"]).await {
            Ok(_) => Ok((true, content.full_name)),
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        match (get("username"), get("password")) {
            (Some(u), Some(p)) => {
                self.soap.set_credentials(u, p).await;
                Ok(())
            }
            _ => Err(invalid("credentials", "give username and password")),
        }
    }

    fn needs_configuration(&self) -> bool {
        !self.soap.has_credentials()
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.create(req).await
    }

    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        Ok(self.hosts().await?.into_iter().map(|(_, h)| h).collect())
    }
    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.migrate(req).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        Ok(self.info(&self.require(vm_id).await?, vm_id))
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let vms = self
            .inventory()
            .await?
            .into_iter()
            .map(|vm| {
                let id = vm.instance_uuid.to_ascii_lowercase();
                self.info(&vm, &id)
            })
            .collect();
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let vm = self.require(vm_id).await?;
        if vm.running() {
            return Ok(self.info(&vm, vm_id));
        }
        self.power_on(&vm).await?;
        self.failpoints.hit("start:after-power-on");
        Ok(self.info(&self.reread(&vm).await?, vm_id))
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if vm.power == "poweredOff" {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if req.force || !vm.running() {
            self.power_off(&vm).await?;
        } else {
            let timeout = Duration::from_secs(if req.timeout_seconds > 0 {
                u64::from(req.timeout_seconds)
            } else {
                self.config.timing.shutdown_timeout_seconds
            });
            match self.soap.invoke_this::<vim::Nothing>("ShutdownGuest", &vm.moref, false).await {
                Ok(_) => {
                    if !self.off_within(&vm, timeout).await? {
                        tracing::info!(
                            vm_id = req.vm_id,
                            ?timeout,
                            "the guest did not shut down in time; powering off"
                        );
                        self.power_off(&vm).await?;
                    }
                }
                // Off meanwhile.
                Err(e) if e.fault() == Some("InvalidPowerState") => {}
                // Nobody in the guest to ask (no VMware Tools): power off.
                Err(e) if matches!(e.fault(), Some("ToolsUnavailable" | "NotSupported")) => {
                    tracing::info!(vm_id = req.vm_id, error = %e, "cannot ask the guest to shut down; powering off");
                    self.power_off(&vm).await?;
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
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
        if req.hard {
            self.soap.task_this("ResetVM_Task", &vm.moref).await.map_err(map_error)?;
        } else {
            match self.soap.invoke_this::<vim::Nothing>("RebootGuest", &vm.moref, false).await {
                Ok(_) => {}
                // Only VMware Tools can ask the guest to restart. Unlike a
                // stop, a soft reboot is not turned into a hard one: a reset
                // is not what was asked for, and the caller may ask for it.
                Err(e) if e.fault() == Some("ToolsUnavailable") => {
                    tracing::info!(vm_id = req.vm_id, error = %e, "soft reboot refused: no VMware Tools running");
                    return Err(ProviderError::new(ErrorKind::InvalidState, NO_TOOLS_FOR_SOFT_REBOOT));
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.vcpus == 0 || req.memory_mib == 0 {
            return Err(invalid("vcpus", "vcpus and memory_mib must be positive"));
        }
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let mut change = vim::ConfigSpec::default();
        if vm.vcpus != req.vcpus {
            change.num_cpus = Some(req.vcpus as i32);
        }
        if vm.memory_mib != req.memory_mib {
            change.memory_mb = Some(i64::from(req.memory_mib));
        }
        if let Some(grow) = grow_disk(&vm, req.disk_gib)? {
            change.device_change.push(grow);
        }
        if change.is_empty() {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if vm.running() {
            let cpu_ok = change.num_cpus.is_none_or(|n| vm.cpu_hot_add && n as u32 > vm.vcpus);
            let mem_ok = change.memory_mb.is_none_or(|m| vm.memory_hot_add && m as u32 > vm.memory_mib);
            if !(cpu_ok && mem_ok) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!(
                        "vm {} is running: CPUs and memory only grow while running, and only with hot-add enabled",
                        req.vm_id
                    ),
                ));
            }
        }
        self.reconfigure(&vm, change).await?;
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let Some(vm) = self.find(vm_id, &[]).await? else { return Ok(false) };
        if vm.power != "poweredOff" {
            self.power_off(&vm).await?;
        }
        // Destroy_Task deletes every disk still attached: volumes are
        // unplugged first, so only the VM's own disk goes.
        self.detach_from(&vm, None).await?;
        self.failpoints.hit("delete:after-detach");
        match self.soap.task_this("Destroy_Task", &vm.moref).await {
            Ok(_) => Ok(true),
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(true),
            Err(e) => Err(map_error(e)),
        }
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
}
