//! CreateVM: a full clone of the template (found again after any failure by
//! its description, tagged pending at once), placed on its host, given its
//! boot volume, configured, given its volumes and started, each step
//! skipped when done.

use std::time::Duration;

use hcp_provider_sdk::{ErrorKind, ProviderError, pb};

use crate::Proxmox;
use crate::client::{Method, Params, encode_segment};
use crate::errors::{invalid, map_error};
use crate::inventory::{Untagged, id_line, pending_tags};
use crate::spec::dns_name;

impl Proxmox {
    /// Creates the VM of `req`, or finishes a create that was interrupted.
    pub(crate) async fn create(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let spec = req.spec.unwrap_or_default();
        if spec.vcpus == 0 {
            return Err(invalid("spec.vcpus", "must be at least 1"));
        }
        if spec.memory_mib < 16 {
            return Err(invalid("spec.memory_mib", "must be at least 16"));
        }
        let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
        if source.is_empty() {
            return Err(invalid("spec.image.source", "is required"));
        }
        if spec.user_data.is_some() && self.config.cloud_init.snippets_dir.is_none() {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "user data needs cloud_init.snippets_storage and snippets_dir",
            ));
        }
        // The volumes' locks before the VM's, in one order, as AttachVolume
        // takes them: no call waits for a lock another holds while waiting
        // for one it holds.
        let mut volume_ids: Vec<&str> = spec.volumes.iter().map(|v| v.volume_id.as_str()).collect();
        if !spec.boot_volume_id.is_empty() {
            volume_ids.push(&spec.boot_volume_id);
        }
        volume_ids.sort_unstable();
        volume_ids.dedup();
        let mut _volumes = Vec::with_capacity(volume_ids.len());
        for id in &volume_ids {
            _volumes.push(self.volume_locks.lock(id).await);
        }
        let _serial = self.locks.lock(&vm_id).await;
        let name = dns_name(&spec, &vm_id);
        let mut found = self.find(&vm_id, Untagged::Named(&name)).await?;
        if found.is_none() {
            let (tnode, tvmid) = self.template(&source).await?;
            for attempt in 0..10u32 {
                let newid = self.next_vmid().await?;
                if newid == 0 {
                    continue;
                }
                let mut params: Params = vec![
                    ("newid", newid.to_string()),
                    ("name", name.clone()),
                    ("full", "1".to_owned()),
                    ("description", format!("{}\nmanaged by HCP; do not edit this line", id_line(&vm_id))),
                ];
                if let Some(storage) = &self.config.storage {
                    params.push(("storage", storage.clone()));
                }
                let path = format!("/nodes/{}/qemu/{tvmid}/clone", encode_segment(&tnode));
                match self.pve.task(Method::Post, &path, params).await {
                    Ok(_) => {}
                    Err(e) if e.already_exists() => {
                        tracing::info!(vm_id, newid, attempt, "vmid collision; trying another");
                        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 50)).await;
                    }
                    Err(e) => return Err(map_error(e)),
                }
                found = self.find(&vm_id, Untagged::Named(&name)).await?;
                if let Some(f) = &found {
                    if !f.configured {
                        // Ours from now on, whatever happens next.
                        let tags: Params = vec![("tags", pending_tags(&vm_id))];
                        self.pve
                            .call(Method::Put, &format!("{}/config", f.path()), tags)
                            .await
                            .map_err(map_error)?;
                    }
                    break;
                }
            }
        }
        let mut f = found.ok_or_else(|| {
            ProviderError::new(ErrorKind::Busy, "no free vmid after 10 attempts (collisions)")
        })?;
        // Clones start on the template's node; a VM placed on another node
        // moves there before its first start (an offline migration, which
        // PVE makes with local disks as well as shared ones).
        if !spec.host.is_empty() && f.node != spec.host && f.status != "running" {
            self.migrate(&f, &spec.host, false).await?;
            f = self.require(&vm_id).await?;
        }
        // Before the configuration, which marks the VM done: the boot
        // volume replaces the clone's disk and is then grown to the flavor.
        if !spec.boot_volume_id.is_empty() {
            self.boot_from_volume(&f, &spec.boot_volume_id, &spec.boot_storage).await?;
        }
        if !f.configured {
            self.configure_vm(&f, &vm_id, &spec).await?;
        }
        // Each found attached already on a retry.
        for v in &spec.volumes {
            self.attach_locked(&v.volume_id, &vm_id, v.slot).await?;
        }
        if req.start && f.status != "running" {
            self.start(&f).await?;
        }
        self.refreshed(&vm_id).await
    }
}
