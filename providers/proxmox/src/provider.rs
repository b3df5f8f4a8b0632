//! The `Provider` implementation: capabilities (from the version, nodes and
//! storages), readiness, credentials and the compute operations (power,
//! resize, delete), delegating create, hosts, consoles and snapshots to
//! their modules.

use std::collections::HashMap;
use std::time::Duration;

use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::Proxmox;
use crate::client::{Credentials, Method, Params, PveError, lenient};
use crate::errors::{invalid, map_error};
use crate::inventory::{Found, Untagged, tags_of};

impl Proxmox {
    /// The server's version, probed once: `(major, minor, text)`.
    async fn version(&self) -> Result<(u32, u32, String), PveError> {
        let mut cached = self.version.lock().await;
        if let Some(v) = cached.as_ref() {
            return Ok(v.clone());
        }
        let data = self.pve.call(Method::Get, "/version", Vec::new()).await?;
        let text = data["version"].as_str().unwrap_or_default().to_owned();
        let mut parts = text.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), text);
        tracing::info!(version = %v.2, "proxmox VE version");
        *cached = Some(v.clone());
        Ok(v)
    }

    pub(crate) async fn start(&self, f: &Found) -> Result<(), ProviderError> {
        match self.pve.task(Method::Post, &format!("{}/status/start", f.path()), Vec::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.message().contains("already running") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    pub(crate) async fn hard_stop(&self, f: &Found) -> Result<(), ProviderError> {
        let mut params: Params = Vec::new();
        // `overrule-shutdown` (abort a pending shutdown task) is in the 9.x
        // schema; older servers refuse unknown parameters.
        if self.version().await.map_err(map_error)?.0 >= 9 {
            params.push(("overrule-shutdown", "1".to_owned()));
        }
        self.pve.task(Method::Post, &format!("{}/status/stop", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Proxmox {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("proxmox.hcp.dev", env!("CARGO_PKG_VERSION"), "proxmox")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let version = self.version().await.map_err(map_error)?;
        let storages = self.resources("storage").await?;
        let nodes = self.resources("node").await?;
        let ci = &self.config.cloud_init;
        let snippets = match &ci.snippets_storage {
            Some(name) => storages.iter().any(|s| {
                s["storage"].as_str() == Some(name)
                    && s["content"].as_str().unwrap_or_default().split(',').any(|c| c == "snippets")
            }),
            None => false,
        };
        let online = nodes.iter().filter(|n| n["status"].as_str() == Some("online")).count();
        let shared = storages.iter().any(|s| {
            lenient::flag(&s["shared"])
                && self.config.storage.as_deref().is_none_or(|want| s["storage"].as_str() == Some(want))
        });
        let image_storages = self.image_storages().await?;
        let default_storage = self.default_volume_storage();
        let volumes = image_storages.iter().any(|s| Some(s.name.as_str()) == default_storage);
        let volumes_shared =
            image_storages.iter().any(|s| Some(s.name.as_str()) == default_storage && s.shared);
        let mut attributes = HashMap::new();
        attributes.insert("pve_version".to_owned(), version.2.clone());
        attributes.insert("node".to_owned(), self.config.node.clone());
        Ok(pb::Capabilities {
            // Images are templates (`images.rs`). Import uploads to a
            // storage with `import` content, whose disk-image formats are
            // these; capture clones, which needs nothing more.
            supports_image_import: self.takes_imports(&storages),
            supports_capture: true,
            image_formats: [pb::DiskFormat::Qcow2, pb::DiskFormat::Raw, pb::DiskFormat::Vmdk]
                .into_iter()
                .map(|f| f as i32)
                .collect(),
            supports_cloud_init: snippets,
            supports_snapshot: true,
            supports_snapshot_running: true,
            supports_live_migration: shared && online > 1,
            // Offline migration copies local disks too.
            supports_cold_migration: online > 1,
            // Volumes on the default volume storage (`volumes.storage`, else
            // `storage`) when the cluster has it with `images` content.
            supports_volumes: volumes,
            // PVE hot-plugs disks (its default `hotplug` includes `disk`; a
            // VM set otherwise is refused per call) and resizes them online.
            supports_hot_attach: volumes,
            supports_volume_extend_in_use: volumes,
            // A storage that is not `shared` is one node's own.
            volumes_host_local: volumes && !volumes_shared,
            max_volumes_per_vm: if volumes { crate::volumes::MAX_SLOTS } else { 0 },
            supports_console_vnc: true,
            // termproxy on `serial0`, relayed (`serial.rs`). No console log:
            // PVE has no API for what a guest wrote on its serial port.
            supports_console_serial: self.serial.get().is_some(),
            // Cores, memory and disk of a stopped VM. Not of a running one:
            // PVE hot-plugs CPUs and memory only with `hotplug` including
            // them and NUMA enabled, which HCP's clones do not set up.
            supports_resize: true,
            supports_hot_resize: false,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.pve.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        // Every probe asks the cluster with the credentials in use, so a
        // revoked or expired token (or an unreachable cluster) makes the
        // provider not ready at the next probe, not never.
        match self.pve.call(Method::Get, "/version", Vec::new()).await {
            Ok(data) => Ok((true, format!("proxmox VE {}", data["version"].as_str().unwrap_or("?")))),
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        let creds = match (get("token_id"), get("token_secret"), get("username"), get("password")) {
            (Some(id), Some(secret), _, _) => Credentials::Token { id, secret },
            (_, _, Some(username), Some(password)) => Credentials::Password { username, password },
            _ => {
                return Err(invalid(
                    "credentials",
                    "give token_id and token_secret, or username and password",
                ));
            }
        };
        self.pve.set_credentials(creds).await;
        Ok(())
    }

    fn needs_configuration(&self) -> bool {
        !self.pve.has_credentials()
    }
    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.create(req).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.described(vm_id).await
    }
    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        self.hosts().await
    }

    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        self.move_to_host(req).await
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let items = self.resources("vm").await?;
        let vms: Vec<pb::VmInfo> = items
            .iter()
            .filter(|i| i["type"].as_str() == Some("qemu") && tags_of(i).iter().any(|t| t == "hcp"))
            .filter_map(|i| {
                let id = tags_of(i)
                    .into_iter()
                    .find_map(|t| t.strip_prefix("hcp-").filter(|id| is_uuid(id)).map(str::to_owned))?;
                Some(Self::found(i, true).info(&id))
            })
            .collect();
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "running" {
            self.start(&f).await?;
        }
        self.refreshed(vm_id).await
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        if f.status == "stopped" {
            return Ok(f.info(&req.vm_id));
        }
        if req.force {
            self.hard_stop(&f).await?;
        } else {
            let timeout = if req.timeout_seconds == 0 {
                self.config.timing.shutdown_timeout_seconds
            } else {
                u64::from(req.timeout_seconds)
            };
            let path = format!("{}/status/shutdown", f.path());
            let params = vec![("timeout", timeout.to_string())];
            // The task runs as long as the guest takes, up to the timeout.
            let runs_up_to = Duration::from_secs(timeout);
            match self.pve.task_within(Method::Post, &path, params, runs_up_to).await {
                Ok(_) => {}
                Err(PveError::Task { message, .. }) => {
                    tracing::info!(vm_id = %req.vm_id, %message, "ACPI shutdown failed; stopping hard");
                    self.hard_stop(&f).await?;
                }
                Err(e) if e.message().contains("not running") => {}
                Err(e) => return Err(map_error(e)),
            }
        }
        self.refreshed(&req.vm_id).await
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.as_str();
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "running" {
            return Err(ProviderError::new(ErrorKind::InvalidState, format!("vm {vm_id} is not running")));
        }
        // `reset` is the reset button; `reboot` asks the guest (ACPI).
        let action = if req.hard { "reset" } else { "reboot" };
        self.pve
            .task(Method::Post, &format!("{}/status/{action}", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        self.refreshed(vm_id).await
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.as_str();
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "stopped" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {vm_id} is {}; it is resized only when stopped", f.status),
            ));
        }
        if req.disk_gib > 0 {
            let (_, current) = self.boot_disk(&f).await?;
            if f64::from(req.disk_gib) < current {
                return Err(invalid(
                    "disk_gib",
                    format!("{} GiB is below the disk's {current} GiB; disks only grow", req.disk_gib),
                ));
            }
        }
        // Setting what is already set is a no-op, so a retry is safe.
        let params: Params = vec![("cores", req.vcpus.to_string()), ("memory", req.memory_mib.to_string())];
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        self.grow_disk(&f, req.disk_gib).await?;
        self.refreshed(vm_id).await
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        // A clone whose tags were never written is found by its description.
        let Some(f) = self.find(vm_id, Untagged::Any).await? else {
            return Ok(false);
        };
        if f.status == "running" {
            self.hard_stop(&f).await?;
        }
        // Never a volume: they leave the config first (and PVE would not
        // free them anyway, as they belong to volumes.owner_vmid).
        self.release_volumes(&f).await?;
        let params: Params = vec![("purge", "1".to_owned()), ("destroy-unreferenced-disks", "1".to_owned())];
        match self.pve.task(Method::Delete, &f.path(), params).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(map_error(e)),
        }
        if let Some(dir) = &self.config.cloud_init.snippets_dir {
            let _ = std::fs::remove_file(dir.join(Self::snippet_name(vm_id)));
        }
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
        self.delete_image_vm(req).await
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
