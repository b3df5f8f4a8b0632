//! Images: a template VM named `hcp-image-<image id>` per image, which is
//! also the image's `source` (CreateVm finds templates by name, `spec.rs`).
//!
//! - Import streams the bytes to PVE's `upload` (content `import`, with the
//!   announced sha256 as `checksum` so PVE verifies them too) as a file
//!   `import/hcp-image-<id>.<ext>` on `image_storage`, never held whole
//!   here; the file is complete only once the SDK has checked every byte
//!   (the multipart body ends after `chunk()` answered the end; any error
//!   drops the connection mid-body and PVE keeps nothing). A VM whose disk
//!   is imported from the file (`import-from`) becomes the template, then
//!   the file is removed.
//! - Capture is a full clone of the stopped VM, stripped of what belongs to
//!   that VM (HCP tags, SSH keys, user data), made a template.
//! - A VM of the image's name that is not a template is a step interrupted
//!   earlier: it is destroyed and the image made again. Whatever an import
//!   or capture made before failing is removed.

use hcp_provider_sdk::image::ImageUpload;
use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use serde_json::Value;

use crate::Proxmox;
use crate::client::{Method, Params, encode_segment, lenient};
use crate::errors::{invalid, map_error};
use crate::inventory::Found;

/// The template's name, which is the image's `source`.
fn template_name(image_id: &str) -> String {
    format!("hcp-image-{image_id}")
}

/// The description line naming the image.
fn image_line(image_id: &str) -> String {
    format!("hcp-image-id={image_id}\nmanaged by HCP; do not edit this line")
}

/// The extension PVE's `import` content wants for a disk image format.
fn import_extension(format: pb::DiskFormat) -> Option<&'static str> {
    match format {
        pb::DiskFormat::Qcow2 => Some("qcow2"),
        pb::DiskFormat::Raw => Some("raw"),
        pb::DiskFormat::Vmdk => Some("vmdk"),
        _ => None,
    }
}

/// How an image's VM is made.
enum Make<'a> {
    /// `POST /nodes/{node}/qemu` with these parameters.
    Create(Params),
    /// A clone of this VM with these parameters.
    Clone(&'a Found, Params),
}

impl Proxmox {
    /// The storage uploads go to (`image_storage`, else `storage`).
    pub(crate) fn import_storage(&self) -> Option<&str> {
        self.config.image_storage.as_deref().or(self.config.storage.as_deref())
    }

    /// The storage of an imported template's disk: `storage` (where
    /// clones go), else `volumes.storage`, else the import storage.
    fn template_storage(&self) -> Option<&str> {
        self.config.storage.as_deref().or(self.config.volumes.storage.as_deref()).or(self.import_storage())
    }

    /// Every QEMU VM of that name, with its template flag.
    async fn named_vms(&self, name: &str) -> Result<Vec<(Found, bool)>, ProviderError> {
        let items = self.resources("vm").await?;
        Ok(items
            .iter()
            .filter(|i| i["type"].as_str() == Some("qemu") && i["name"].as_str() == Some(name))
            .map(|i| (Self::found(i, true), lenient::flag(&i["template"])))
            .collect())
    }

    /// The finished image's template, after removing any half-made VM of
    /// its name.
    async fn finished_image(&self, name: &str) -> Result<Option<Found>, ProviderError> {
        let mut done = None;
        for (f, template) in self.named_vms(name).await? {
            if template && done.is_none() {
                done = Some(f);
            } else if !template {
                tracing::info!(name, vmid = f.vmid, "removing an image VM left half-made");
                self.destroy(&f).await?;
            }
        }
        Ok(done)
    }

    /// Destroys a VM with its disks; one already gone is fine.
    async fn destroy(&self, f: &Found) -> Result<(), ProviderError> {
        if f.status == "running" {
            self.hard_stop(f).await?;
        }
        let params: Params = vec![("purge", "1".to_owned()), ("destroy-unreferenced-disks", "1".to_owned())];
        match self.pve.task(Method::Delete, &f.path(), params).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Removes the upload `volid` from `storage` when it is there.
    async fn remove_import_file(&self, storage: &str, volid: &str) -> Result<(), ProviderError> {
        let node = encode_segment(&self.config.node);
        let path = format!("/nodes/{node}/storage/{}/content", encode_segment(storage));
        let listed = self
            .pve
            .call(Method::Get, &path, vec![("content", "import".to_owned())])
            .await
            .map_err(map_error)?;
        let present = listed.as_array().is_some_and(|l| l.iter().any(|v| v["volid"].as_str() == Some(volid)));
        if present {
            self.pve
                .task(Method::Delete, &format!("{path}/{}", encode_segment(volid)), Vec::new())
                .await
                .map_err(map_error)?;
        }
        Ok(())
    }

    /// A new vmid for an image VM made as `how` says (the parameters
    /// besides the new vmid), trying another when someone took it
    /// meanwhile; then the VM found by its name.
    async fn make_vm(&self, name: &str, how: Make<'_>) -> Result<Found, ProviderError> {
        for _ in 0..10u32 {
            let vmid = self.next_vmid().await?;
            if vmid == 0 {
                continue;
            }
            let (path, key) = match &how {
                Make::Create(_) => (format!("/nodes/{}/qemu", encode_segment(&self.config.node)), "vmid"),
                Make::Clone(vm, _) => (format!("{}/clone", vm.path()), "newid"),
            };
            let (Make::Create(rest) | Make::Clone(_, rest)) = &how;
            let mut params: Params = vec![(key, vmid.to_string())];
            params.extend(rest.iter().cloned());
            match self.pve.task(Method::Post, &path, params).await {
                Ok(_) => {}
                Err(e) if e.already_exists() => continue,
                Err(e) => return Err(map_error(e)),
            }
            if let Some((f, _)) = self.named_vms(name).await?.into_iter().find(|(f, _)| f.vmid == vmid) {
                return Ok(f);
            }
        }
        Err(ProviderError::new(ErrorKind::Busy, "no free vmid after 10 attempts (collisions)"))
    }

    /// ImportImage: see the module's description.
    pub(crate) async fn import(&self, mut upload: ImageUpload) -> Result<pb::ImageInfo, ProviderError> {
        let header = upload.header().clone();
        if !is_uuid(&header.image_id) {
            return Err(invalid("image_id", "must be a UUID"));
        }
        let Some(ext) = import_extension(upload.format()) else {
            return Err(invalid("format", format!("{:?} is not one of image_formats", upload.format())));
        };
        let (Some(storage), Some(disk_storage)) = (self.import_storage(), self.template_storage()) else {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "image import needs image_storage or storage",
            ));
        };
        let name = template_name(&header.image_id);
        let _serial = self.locks.lock(&name).await;
        let info = |image_id: String| pb::ImageInfo {
            image_id,
            source: name.clone(),
            size_bytes: header.size_bytes,
        };
        if self.finished_image(&name).await?.is_some() {
            upload.drain().await?;
            return Ok(info(header.image_id));
        }
        let file = format!("{name}.{ext}");
        let volid = format!("{storage}:import/{file}");
        // A partial upload of an earlier attempt is replaced.
        self.remove_import_file(storage, &volid).await?;
        let made = self.import_steps(&mut upload, storage, disk_storage, &name, &file, &volid).await;
        // The file is not needed once the template has its disk; after a
        // failure nothing of the attempt stays.
        let cleaned = self.remove_import_file(storage, &volid).await;
        if let Err(e) = made {
            if let Err(c) = cleaned {
                tracing::warn!(error = %c, volid, "cannot remove a failed import's file");
            }
            for (f, template) in self.named_vms(&name).await.unwrap_or_default() {
                if !template && let Err(c) = self.destroy(&f).await {
                    tracing::warn!(error = %c, vmid = f.vmid, "cannot remove a failed import's VM");
                }
            }
            return Err(e);
        }
        if let Err(c) = cleaned {
            tracing::warn!(error = %c, volid, "cannot remove an import's file");
        }
        Ok(info(header.image_id))
    }

    async fn import_steps(
        &self,
        upload: &mut ImageUpload,
        storage: &str,
        disk_storage: &str,
        name: &str,
        file: &str,
        volid: &str,
    ) -> Result<(), ProviderError> {
        let header = upload.header().clone();
        let node = encode_segment(&self.config.node);
        let path = format!("/nodes/{node}/storage/{}/upload", encode_segment(storage));
        let fields: Params = vec![
            ("content", "import".to_owned()),
            ("checksum", header.sha256.to_ascii_lowercase()),
            ("checksum-algorithm", "sha256".to_owned()),
        ];
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let send = self.pve.upload(&path, fields, file, header.size_bytes, rx);
        let feed = async {
            let tx = tx;
            loop {
                match upload.chunk().await {
                    Ok(Some(bytes)) => {
                        // PVE stopped reading: its answer says why.
                        if tx.send(Ok(bytes)).await.is_err() {
                            return Ok(());
                        }
                    }
                    // Every byte arrived and matched: the body may end.
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other("the image stream was refused"))).await;
                        return Err(e);
                    }
                }
            }
        };
        let (sent, fed) = tokio::join!(send, feed);
        fed?;
        let upid = sent.map_err(map_error)?;
        if let Some(upid) = upid.as_str() {
            self.pve.wait(upid).await.map_err(map_error)?;
        }
        let params: Params = vec![
            ("name", name.to_owned()),
            ("description", image_line(&header.image_id)),
            ("scsihw", "virtio-scsi-pci".to_owned()),
            ("scsi0", format!("{disk_storage}:0,import-from={volid}")),
            ("ide2", format!("{disk_storage}:cloudinit")),
            ("boot", "order=scsi0".to_owned()),
            ("ostype", "l26".to_owned()),
        ];
        let f = self.make_vm(name, Make::Create(params)).await?;
        self.pve
            .task(Method::Post, &format!("{}/template", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        Ok(())
    }

    /// CaptureImage: see the module's description.
    pub(crate) async fn capture(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        if !is_uuid(&req.image_id) {
            return Err(invalid("image_id", "must be a UUID"));
        }
        if !is_uuid(&req.vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let name = template_name(&req.image_id);
        let _image = self.locks.lock(&name).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        if let Some(f) = self.finished_image(&name).await? {
            return self.image_info(&req.image_id, &f).await;
        }
        let vm = self.require(&req.vm_id).await?;
        if vm.status != "stopped" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("VM {} must be stopped to be captured (it is {})", req.vm_id, vm.status),
            ));
        }
        match self.capture_steps(&vm, &req.image_id, &name).await {
            Ok(f) => self.image_info(&req.image_id, &f).await,
            Err(e) => {
                for (f, template) in self.named_vms(&name).await.unwrap_or_default() {
                    if !template && let Err(c) = self.destroy(&f).await {
                        tracing::warn!(error = %c, vmid = f.vmid, "cannot remove a failed capture's VM");
                    }
                }
                Err(e)
            }
        }
    }

    async fn capture_steps(&self, vm: &Found, image_id: &str, name: &str) -> Result<Found, ProviderError> {
        let mut params: Params =
            vec![("name", name.to_owned()), ("full", "1".to_owned()), ("description", image_line(image_id))];
        if let Some(storage) = &self.config.storage {
            params.push(("storage", storage.clone()));
        }
        let f = self.make_vm(name, Make::Clone(vm, params)).await?;
        // What was the VM's own must not reach VMs made from the image:
        // its HCP tags (it would be found as that VM), its SSH keys and
        // its user data snippet (removed with the VM).
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        let owned: Vec<&str> =
            ["tags", "sshkeys", "cicustom"].into_iter().filter(|k| !config[*k].is_null()).collect();
        if !owned.is_empty() {
            let params: Params = vec![("delete", owned.join(","))];
            self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        }
        self.pve
            .task(Method::Post, &format!("{}/template", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        Ok(f)
    }

    /// The ImageInfo of a template: its boot disk's size.
    async fn image_info(&self, image_id: &str, f: &Found) -> Result<pb::ImageInfo, ProviderError> {
        let (_, gib) = self.boot_disk(f).await?;
        Ok(pb::ImageInfo {
            image_id: image_id.to_owned(),
            source: template_name(image_id),
            size_bytes: (gib * f64::from(1u32 << 30)) as u64,
        })
    }

    /// DeleteImage: the template of that image (and an upload left behind);
    /// true when there was one.
    pub(crate) async fn delete_image_vm(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        if !is_uuid(&req.image_id) {
            return Err(invalid("image_id", "must be a UUID"));
        }
        let name = template_name(&req.image_id);
        let _serial = self.locks.lock(&name).await;
        let vms = self.named_vms(&name).await?;
        let existed = vms.iter().any(|(_, template)| *template);
        for (f, _) in &vms {
            self.destroy(f).await?;
        }
        if let Some(storage) = self.import_storage() {
            for ext in ["qcow2", "raw", "vmdk"] {
                self.remove_import_file(storage, &format!("{storage}:import/{name}.{ext}")).await?;
            }
        }
        Ok(existed)
    }

    /// Whether the import storage takes `import` content on the node.
    pub(crate) fn takes_imports(&self, storages: &[Value]) -> bool {
        let Some(want) = self.import_storage() else {
            return false;
        };
        storages.iter().any(|s| {
            s["storage"].as_str() == Some(want)
                && s["node"].as_str().is_none_or(|n| n == self.config.node)
                && s["content"].as_str().unwrap_or_default().split(',').any(|c| c == "import")
        })
    }
}
