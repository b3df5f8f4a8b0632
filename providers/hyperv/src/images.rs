//! Images: VHDX files on the image share, a directory both this provider
//! (`image_share`) and the Hyper-V host (`image_share_host_path`) see.
//! WS-Management carries no files, so the provider writes them itself.
//!
//! - Import writes the stream to `.hcp-image-<id>.vhdx.partial`, fsyncs it
//!   and renames it to `hcp-image-<id>.vhdx` only after the SDK has
//!   checked every byte; then the host must read it as a virtual disk
//!   (`Msvm_ImageManagementService.GetVirtualHardDiskSettingData`), else it
//!   is removed. The image's `source` is the file's path as the host sees
//!   it; CreateVm makes each VM a differencing disk on it, as on any parent
//!   VHDX.
//! - Capture has the host copy the stopped VM's root disk to the share with
//!   `ConvertVirtualHardDisk` (a dynamic VHDX: a differencing disk comes
//!   out merged with its parent), under a temporary name renamed when the
//!   job succeeded.
//! - Delete removes the file (and any partial one) from the share.
//! - A finished file is the image: it exists only after its rename.

use std::path::PathBuf;

use hcp_provider_sdk::image::ImageUpload;
use hcp_provider_sdk::support::is_uuid;
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use tokio::io::AsyncWriteExt as _;

use crate::cim::Instance;
use crate::errors::{HvError, invalid, map_error};
use crate::wsman::Param;
use crate::{Hyperv, IMS};

/// The image's file name on the share.
fn file_name(image_id: &str) -> String {
    format!("hcp-image-{image_id}.vhdx")
}

/// Where one image lives: on the share as the provider sees it, and as
/// the host sees it.
struct Place {
    local: PathBuf,
    /// Where an import is written before its rename.
    partial: PathBuf,
    /// The host's path of the finished file: the image's source.
    host: String,
    /// The host's path of a capture's target before its rename (a `.vhdx`
    /// name, as ConvertVirtualHardDisk wants the format's extension).
    host_partial: String,
    local_host_partial: PathBuf,
}

fn unavailable(what: &str, e: std::io::Error) -> ProviderError {
    ProviderError::new(ErrorKind::Unavailable, format!("image share: {what}: {e}"))
}

impl Hyperv {
    fn place(&self, image_id: &str) -> Result<Place, ProviderError> {
        if !is_uuid(image_id) {
            return Err(invalid("image_id", "must be a UUID"));
        }
        let (Some(local), Some(host)) = (&self.config.image_share, &self.config.image_share_host_path) else {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "images need image_share and image_share_host_path in the Hyper-V provider's configuration",
            ));
        };
        let name = file_name(image_id);
        let host = host.trim_end_matches('\\');
        let capture_name = format!("hcp-image-{image_id}.partial.vhdx");
        Ok(Place {
            local: local.join(&name),
            partial: local.join(format!(".{name}.partial")),
            host: format!("{host}\\{name}"),
            host_partial: format!("{host}\\{capture_name}"),
            local_host_partial: local.join(capture_name),
        })
    }

    /// Whether `source` names an image file on the share (what ImageInfo's
    /// source holds).
    pub(crate) fn is_share_image(&self, source: &str) -> bool {
        let Some(host) = &self.config.image_share_host_path else { return false };
        let prefix = format!("{}\\", host.trim_end_matches('\\'));
        source.len() > prefix.len()
            && source[..prefix.len()].eq_ignore_ascii_case(&prefix)
            && source[prefix.len()..]
                .strip_prefix("hcp-image-")
                .and_then(|rest| rest.strip_suffix(".vhdx"))
                .is_some_and(is_uuid)
    }

    /// The virtual size of the image file as the host reads it; an error
    /// when the host does not see it or cannot read it as a virtual disk.
    async fn host_reads(&self, host_path: &str) -> Result<u64, ProviderError> {
        match self.vhd_bytes(host_path).await {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(ProviderError::new(
                ErrorKind::Unavailable,
                format!(
                    "the Hyper-V host does not see {host_path}: image_share and image_share_host_path must be the same directory"
                ),
            )),
            Err(e @ HvError::Method { .. }) => {
                Err(invalid("image", format!("the Hyper-V host cannot read {host_path} as a VHDX: {e}")))
            }
            Err(e) => Err(map_error(e)),
        }
    }

    /// ImportImage: see the module's description.
    pub(crate) async fn import(&self, mut upload: ImageUpload) -> Result<pb::ImageInfo, ProviderError> {
        if upload.format() != pb::DiskFormat::Vhdx {
            return Err(invalid(
                "format",
                format!("{:?} is not one of image_formats (VHDX)", upload.format()),
            ));
        }
        let header = upload.header().clone();
        let place = self.place(&header.image_id)?;
        let _serial = self.locks.lock(&format!("image:{}", header.image_id)).await;
        let info = pb::ImageInfo {
            image_id: header.image_id.clone(),
            source: place.host.clone(),
            size_bytes: header.size_bytes,
        };
        if place.local.is_file() {
            upload.drain().await?;
            return Ok(info);
        }
        if let Err(e) = write_checked(&mut upload, &place.partial, &place.local).await {
            let _ = std::fs::remove_file(&place.partial);
            return Err(e);
        }
        if let Err(e) = self.host_reads(&place.host).await {
            let _ = std::fs::remove_file(&place.local);
            return Err(e);
        }
        Ok(info)
    }

    /// CaptureImage: see the module's description.
    pub(crate) async fn capture(&self, req: pb::CaptureImageRequest) -> Result<pb::ImageInfo, ProviderError> {
        if !is_uuid(&req.vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let place = self.place(&req.image_id)?;
        let _image = self.locks.lock(&format!("image:{}", req.image_id)).await;
        let _vm = self.locks.lock(&req.vm_id).await;
        let image = |size_bytes| pb::ImageInfo {
            image_id: req.image_id.clone(),
            source: place.host.clone(),
            size_bytes,
        };
        if place.local.is_file() {
            return Ok(image(self.host_reads(&place.host).await?));
        }
        let vm = self.require(&req.vm_id).await?;
        if !vm.off() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("VM {} must be stopped to be captured", req.vm_id),
            ));
        }
        let root = self.root_disk(&vm).await.map_err(map_error)?.ok_or_else(|| {
            ProviderError::new(ErrorKind::Internal, format!("VM {} has no root disk", req.vm_id))
        })?;
        // What an attempt cut short left.
        let _ = std::fs::remove_file(&place.local_host_partial);
        let mut settings = Instance::new("Msvm_VirtualHardDiskSettingData");
        settings.set("Type", "uint16", "3").set("Format", "uint16", "3").set(
            "Path",
            "string",
            place.host_partial.clone(),
        );
        let converted = self
            .call(
                &Self::service(IMS),
                "ConvertVirtualHardDisk",
                &[("SourcePath", Param::Text(root)), ("VirtualDiskSettingData", Param::Instance(settings))],
            )
            .await
            .map_err(map_error)
            .and_then(|_| {
                std::fs::rename(&place.local_host_partial, &place.local).map_err(|e| unavailable("rename", e))
            });
        if let Err(e) = converted {
            let _ = std::fs::remove_file(&place.local_host_partial);
            return Err(e);
        }
        match self.host_reads(&place.host).await {
            Ok(size) => Ok(image(size)),
            Err(e) => {
                let _ = std::fs::remove_file(&place.local);
                Err(e)
            }
        }
    }

    /// DeleteImage: the file and any partial one; true when the image was
    /// there.
    pub(crate) async fn delete_image_file(&self, req: pb::DeleteImageRequest) -> Result<bool, ProviderError> {
        let place = self.place(&req.image_id)?;
        let _serial = self.locks.lock(&format!("image:{}", req.image_id)).await;
        for leftover in [&place.partial, &place.local_host_partial] {
            match std::fs::remove_file(leftover) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(unavailable("remove", e)),
            }
        }
        match std::fs::remove_file(&place.local) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(unavailable("remove", e)),
        }
    }
}

/// Writes the checked bytes to `partial`, and only once the SDK answered
/// their end, syncs the file and renames it to `done` (then syncs the
/// directory, so the rename survives a crash).
async fn write_checked(
    upload: &mut ImageUpload,
    partial: &std::path::Path,
    done: &std::path::Path,
) -> Result<(), ProviderError> {
    let mut file = tokio::fs::File::create(partial).await.map_err(|e| unavailable("create", e))?;
    while let Some(bytes) = upload.chunk().await? {
        file.write_all(&bytes).await.map_err(|e| unavailable("write", e))?;
    }
    file.sync_all().await.map_err(|e| unavailable("sync", e))?;
    drop(file);
    tokio::fs::rename(partial, done).await.map_err(|e| unavailable("rename", e))?;
    if let Some(dir) = done.parent()
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        let _ = d.sync_all().await;
    }
    Ok(())
}
