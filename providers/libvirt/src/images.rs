//! Images imported from core and captured from VMs: volumes of the default
//! storage pool (the one HCP's volumes live in), named `hcp-image-<id>.<format>`
//! (`qcow2` or `raw`); `hcp-image-<id>` is the `ImageRef.source` CreateVm
//! takes. A VM made from one gets a qcow2 overlay on it (backing format given,
//! never probed) and boots from that disk by the image's own bootloader: no
//! `<kernel>` in its domain.
//!
//! Imports go through libvirt's stream API (virStorageVolUpload): the volume
//! is created empty and sparse, the bytes are sent as the SDK hands them out,
//! and the stream is finished only after the SDK said every byte arrived and
//! matched its SHA-256; any error aborts the stream and deletes the volume.
//!
//! Complete or partial: libvirt cannot rename a volume, so an image's data
//! volume exists while it is being written, and a provider that crashed mid
//! upload leaves one behind. The image counts as stored only when a second,
//! empty volume `hcp-image-<id>.complete` exists: it is created after the data
//! is complete and checked, and deleted first when the image is deleted. A
//! data volume without its marker is a leftover and is replaced by the next
//! import (or removed by DeleteImage). A marker is chosen over comparing the
//! volume's allocation with its capacity because an upload allocates the
//! volume sparsely, so a complete image may allocate less than its size.
//!
//! Captures flatten a stopped VM's root disk (`qemu-img convert` to qcow2,
//! which follows the overlay's backing chain) into a hidden file of the pool
//! directory, renamed into place when complete, then marked complete. A VM of
//! a configured direct-kernel image captures its disk only: kernel and
//! initramfs are not on it, so such an image boots only if its disk has a
//! bootloader (the disk-boot rule holds for every captured image).
//!
//! Images are not HCP volumes: ListVolumes knows volumes by their
//! `hcp-vol-` names only, so image volumes and markers never appear there.

use std::path::PathBuf;

use bytes::Bytes;
use hcp_provider_sdk::image::ImageUpload;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use crate::Libvirt;
use crate::config::ImageConfig;
use crate::connection::CallError;
use crate::disks::{backing_file, image_info, set_mode};
use crate::errors::{check_uuid, invalid, io_error};
use crate::pool::{find_pool, pool_path};
use crate::storage::{
    disks_of, image_id_of_source, image_marker_name, image_source, image_volume_name, image_volume_xml,
};
use crate::volumes::all_domain_disks;

/// The formats images are stored in, preferred first (`image_formats`).
pub(crate) const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// An image's volumes in the pool.
struct Stored {
    /// The data volume, its file and its format.
    data: Option<(StorageVol, PathBuf, &'static str)>,
    /// The marker saying the data is complete.
    marker: Option<StorageVol>,
}

impl Stored {
    fn complete(&self) -> Option<(PathBuf, &'static str)> {
        match (&self.data, &self.marker) {
            (Some((_, path, format)), Some(_)) => Some((path.clone(), format)),
            _ => None,
        }
    }

    /// Deletes the marker first, so that a crash half way leaves a partial
    /// image, never a complete-looking one. Whether anything was there.
    fn remove(self) -> Result<bool, virt::error::Error> {
        let existed = self.data.is_some() || self.marker.is_some();
        if let Some(marker) = self.marker {
            marker.delete(0)?;
        }
        if let Some((vol, _, _)) = self.data {
            vol.delete(0)?;
        }
        Ok(existed)
    }
}

fn lookup(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, virt::error::Error> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(vol) => Ok(Some(vol)),
        Err(e) if e.code().is(virt::error::ErrorNumber::NoStorageVolume) => Ok(None),
        Err(e) => Err(e),
    }
}

fn the_pool(c: &Connect, name: &str) -> Result<StoragePool, CallError> {
    find_pool(c, name)?.ok_or_else(|| hcp(ErrorKind::Internal, format!("pool {name} is gone")))
}

/// The image's volumes, after a refresh of the pool (a capture writes its
/// file behind libvirt's back).
fn stored(c: &Connect, pool_name: &str, image_id: &str) -> Result<Stored, CallError> {
    let pool = the_pool(c, pool_name)?;
    if let Err(e) = pool.refresh(0) {
        // Busy with another volume's upload: ours are known already.
        tracing::debug!(pool = pool_name, error = %e.message(), "pool refresh");
    }
    let mut data = None;
    for format in FORMATS {
        if let Some(vol) = lookup(&pool, &image_volume_name(image_id, format))? {
            let path = PathBuf::from(vol.path()?);
            data = Some((vol, path, format));
            break;
        }
    }
    let marker = lookup(&pool, &image_marker_name(image_id))?;
    Ok(Stored { data, marker })
}

fn hcp(kind: ErrorKind, message: impl Into<String>) -> CallError {
    CallError::Hcp(ProviderError::new(kind, message))
}

fn info(image_id: &str, path: &std::path::Path) -> pb::ImageInfo {
    let size_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    pb::ImageInfo { image_id: image_id.to_owned(), source: image_source(image_id), size_bytes }
}

/// The file a capture writes before renaming it into place.
fn capture_part_name(image_id: &str) -> String {
    format!(".{}.part", image_volume_name(image_id, "qcow2"))
}

/// What the upload thread is given.
enum Piece {
    Data(Bytes),
    /// Every byte arrived and matched: finish the stream.
    End,
}

impl Libvirt {
    fn image_pool(&self) -> String {
        self.inner.config.volume_pool.clone()
    }

    fn images_enabled(&self) -> Result<(), ProviderError> {
        if self.inner.capabilities.supports_image_import {
            Ok(())
        } else {
            Err(ProviderError::new(ErrorKind::Unsupported, "images are not supported on the test driver"))
        }
    }

    /// The image a CreateVm's `image.source` names and its format: a
    /// complete image volume for `hcp-image-<id>`, else a configured image.
    pub(crate) async fn image_for(&self, source: &str) -> Result<(ImageConfig, &'static str), ProviderError> {
        let missing = || invalid(format!("image.source: image {source:?} is not available on this host"));
        let Some(id) = image_id_of_source(source).filter(|_| self.images_enabled().is_ok()) else {
            return self.inner.config.image(source).map(|i| (i, "qcow2")).ok_or_else(missing);
        };
        let (pool, id) = (self.image_pool(), id.to_owned());
        let found = self.call(&format!("image {id}"), move |c| Ok(stored(c, &pool, &id)?.complete())).await?;
        let (disk, format) = found.ok_or_else(missing)?;
        Ok((ImageConfig { disk, kernel: None, initrd: None, cmdline: None }, format))
    }

    pub(crate) async fn image_import(&self, mut upload: ImageUpload) -> Result<pb::ImageInfo, ProviderError> {
        self.images_enabled()?;
        let header = upload.header().clone();
        let format = match upload.format() {
            pb::DiskFormat::Qcow2 => "qcow2",
            pb::DiskFormat::Raw => "raw",
            other => {
                return Err(invalid(format!(
                    "format: {} is not one of this provider's image_formats (QCOW2, RAW)",
                    other.as_str_name()
                )));
            }
        };
        let id = header.image_id.clone();
        let lock = self.lock(&id);
        let _held = lock.lock().await;
        let (pool, image) = (self.image_pool(), id.clone());
        let done = self
            .call(&format!("image {id}"), move |c| {
                let s = stored(c, &pool, &image)?;
                if let Some((path, _)) = s.complete() {
                    return Ok(Some(info(&image, &path)));
                }
                // A partial one (a crash mid upload) is replaced.
                s.remove()?;
                Ok(None)
            })
            .await?;
        if let Some(info) = done {
            upload.drain().await?;
            return Ok(info);
        }

        let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(4);
        let (pool, size) = (self.image_pool(), header.size_bytes);
        let name = image_volume_name(&id, format);
        let what = format!("upload image {id}");
        let writer = self.call(&what, move |c| {
            let vol = StorageVol::create_xml(&the_pool(c, &pool)?, &image_volume_xml(&name, size), 0)?;
            let sent = (|| -> Result<PathBuf, CallError> {
                let stream = Stream::new(c, 0)?;
                vol.upload(&stream, 0, size, 0)?;
                loop {
                    match rx.blocking_recv() {
                        Some(Piece::Data(bytes)) => {
                            let mut at = 0;
                            while at < bytes.len() {
                                // A blocking stream takes some bytes or fails.
                                match usize::try_from(stream.send(&bytes[at..])?) {
                                    Ok(n) if n > 0 => at += n,
                                    _ => {
                                        return Err(hcp(
                                            ErrorKind::Internal,
                                            "the upload stream took no bytes",
                                        ));
                                    }
                                }
                            }
                        }
                        Some(Piece::End) => {
                            stream.finish()?;
                            return Ok(PathBuf::from(vol.path()?));
                        }
                        None => {
                            let _ = stream.abort();
                            return Err(hcp(ErrorKind::Internal, "the upload was abandoned"));
                        }
                    }
                }
            })();
            if sent.is_err()
                && let Err(e) = vol.delete(0)
            {
                tracing::warn!(error = %e.message(), volume = %name, "cannot delete a failed upload");
            }
            sent
        });
        let reader = async move {
            loop {
                match upload.chunk().await? {
                    Some(bytes) => {
                        if tx.send(Piece::Data(bytes)).await.is_err() {
                            // The writer failed; its error is the answer.
                            return Ok(());
                        }
                    }
                    None => {
                        let _ = tx.send(Piece::End).await;
                        return Ok::<(), ProviderError>(());
                    }
                }
            }
        };
        let (written, read) = tokio::join!(writer, reader);
        read?;
        let path = written?;
        if let Err(e) = self.check_image(&path, format).await {
            self.delete_stored(&id).await?;
            return Err(e);
        }
        self.failpoint("image:import:after-upload");
        self.mark_complete(&id).await?;
        Ok(info(&id, &path))
    }

    /// The bytes are an image of the announced format, standing alone: a
    /// qcow2 naming a backing file would make VMs read a file of this host.
    async fn check_image(&self, path: &std::path::Path, format: &str) -> Result<(), ProviderError> {
        let info = image_info(path, format)
            .await
            .map_err(|e| invalid(format!("the image is not a valid {format} image: {}", e.message)))?;
        if info.get("backing-filename").is_some() {
            return Err(invalid("the image names a backing file; images must stand alone"));
        }
        Ok(())
    }

    async fn mark_complete(&self, image_id: &str) -> Result<(), ProviderError> {
        let (pool, id) = (self.image_pool(), image_id.to_owned());
        self.call(&format!("image {image_id}"), move |c| {
            let pool = the_pool(c, &pool)?;
            if lookup(&pool, &image_marker_name(&id))?.is_none() {
                StorageVol::create_xml(&pool, &image_volume_xml(&image_marker_name(&id), 0), 0)?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes the image's volumes, and the hidden file of a capture cut
    /// short by a crash. Whether anything was there.
    async fn delete_stored(&self, image_id: &str) -> Result<bool, ProviderError> {
        let (pool, id) = (self.image_pool(), image_id.to_owned());
        let (existed, dir) = self
            .call(&format!("delete image {image_id}"), move |c| {
                let existed = stored(c, &pool, &id)?.remove()?;
                Ok((existed, pool_path(&the_pool(c, &pool)?)?))
            })
            .await?;
        if let Some(dir) = dir {
            let part = dir.join(capture_part_name(image_id));
            match tokio::fs::remove_file(&part).await {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove a partial capture", e)),
            }
        }
        Ok(existed)
    }

    pub(crate) async fn image_capture(
        &self,
        req: pb::CaptureImageRequest,
    ) -> Result<pb::ImageInfo, ProviderError> {
        self.images_enabled()?;
        check_uuid("vm_id", &req.vm_id)?;
        check_uuid("image_id", &req.image_id)?;
        let image_lock = self.lock(&req.image_id);
        let _image = image_lock.lock().await;
        let vm_lock = self.lock(&req.vm_id);
        let _vm = vm_lock.lock().await;
        let (pool, id, vm) = (self.image_pool(), req.image_id.clone(), req.vm_id.clone());
        // The image when stored; else the VM's root disk and the pool's directory.
        let state = self
            .call(&format!("capture vm {vm} as image {id}"), move |c| {
                let s = stored(c, &pool, &id)?;
                if let Some((path, _)) = s.complete() {
                    return Ok(Err(info(&id, &path)));
                }
                s.remove()?;
                let domain = c.lookup_domain_by_uuid_string(&vm).map_err(|e| {
                    if e.code().is(virt::error::ErrorNumber::NoDomain) {
                        hcp(ErrorKind::NotFound, format!("vm {vm} not found"))
                    } else {
                        CallError::Virt(e)
                    }
                })?;
                if domain.is_active()? {
                    return Err(hcp(
                        ErrorKind::InvalidState,
                        format!("vm {vm} is running; stop it to capture it"),
                    ));
                }
                let xml = domain.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                let disk = disks_of(&xml)
                    .into_iter()
                    .find(|d| d.target == "vda")
                    .ok_or_else(|| hcp(ErrorKind::Internal, format!("vm {vm} has no root disk")))?;
                let dir = pool_path(&the_pool(c, &pool)?)?
                    .ok_or_else(|| hcp(ErrorKind::Internal, format!("pool {pool} has no directory")))?;
                Ok(Ok((disk.file, dir)))
            })
            .await?;
        let (disk, dir) = match state {
            Err(info) => return Ok(info),
            Ok(found) => found,
        };
        let dest = dir.join(image_volume_name(&req.image_id, "qcow2"));
        // Hidden while written, named so that DeleteImage finds a leftover.
        let tmp = dir.join(capture_part_name(&req.image_id));
        let out = tokio::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
            .arg(&disk)
            .arg(&tmp)
            .output()
            .await
            .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}")))?;
        if !out.status.success() {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ProviderError::new(
                ErrorKind::Internal,
                format!("qemu-img: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        set_mode(&tmp, 0o644).map_err(|e| io_error("open the captured image to QEMU", e))?;
        tokio::fs::rename(&tmp, &dest).await.map_err(|e| io_error("place the captured image", e))?;
        self.mark_complete(&req.image_id).await?;
        Ok(info(&req.image_id, &dest))
    }

    pub(crate) async fn image_delete(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        self.images_enabled()?;
        check_uuid("image_id", &req.image_id)?;
        let lock = self.lock(&req.image_id);
        let _held = lock.lock().await;
        let (pool, id) = (self.image_pool(), req.image_id.clone());
        // The image's file and every file-backed disk of HCP's domains.
        let (file, disks) = self
            .call(&format!("image {id}"), move |c| {
                let s = stored(c, &pool, &id)?;
                let file = s.data.as_ref().map(|(_, path, _)| path.clone());
                let mut disks = Vec::new();
                for d in all_domain_disks(c)? {
                    for disk in d.config.iter().chain(&d.live) {
                        disks.push((d.vm_id.clone(), disk.file.clone()));
                    }
                }
                Ok((file, disks))
            })
            .await?;
        if let Some(file) = file {
            // libvirt keeps no count of overlays: each disk's header names
            // its backing file.
            for (vm_id, disk) in disks {
                let backing = match backing_file(&disk).await {
                    Ok(b) => b,
                    // Not a qcow2 (or gone meanwhile): nothing rests on it.
                    Err(e) => {
                        tracing::debug!(disk = %disk.display(), error = %e.message, "backing file");
                        None
                    }
                };
                if backing.as_deref() == Some(file.as_path()) {
                    return Err(ProviderError::new(
                        ErrorKind::InvalidState,
                        format!(
                            "image {} is the base of vm {vm_id}'s disk; delete the VM first",
                            req.image_id
                        ),
                    ));
                }
            }
        }
        self.delete_stored(&req.image_id).await
    }
}
