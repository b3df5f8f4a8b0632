//! Disk images through `qemu-img`: a VM's qcow2 overlay on its image's
//! base disk, a boot volume's standalone copy of it, virtual sizes, growth
//! (never shrinking, never with internal snapshots), and file modes.

use std::path::Path;

use hcp_provider_sdk::{ErrorKind, ProviderError};

use crate::errors::{invalid, io_error};

#[cfg(unix)]
pub(crate) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates `dest` as a qcow2 overlay on `base` (whose format is `format`,
/// never probed), at least `disk_gib` large.
pub(crate) async fn make_overlay(
    base: &Path,
    format: &str,
    dest: &Path,
    disk_gib: u32,
) -> Result<(), ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let size = image_size(base, format).await?.max(u64::from(disk_gib) << 30);
    let tmp = dest.with_extension("qcow2.tmp");
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(base)
        .arg(&tmp)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    tokio::fs::rename(&tmp, dest).await.map_err(|e| io_error("place the overlay disk", e))
}

/// Creates `dest` as a standalone qcow2 copy of `base` (no backing file, so
/// it outlives the image), at least `disk_gib` large. Written under a name
/// that is not a volume's and renamed when complete, so a crash half way
/// leaves no half volume: a retry writes the copy again.
pub(crate) async fn copy_image(
    base: &Path,
    format: &str,
    dest: &Path,
    disk_gib: u32,
) -> Result<(), ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let size = image_size(base, format).await?.max(u64::from(disk_gib) << 30);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{name}.part"));
    let out = tokio::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", format, "-O", "qcow2"])
        .arg(base)
        .arg(&tmp)
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    resize_image(&tmp, size).await?;
    tokio::fs::rename(&tmp, dest).await.map_err(|e| io_error("place the boot volume", e))
}

/// `qemu-img info` of a disk image read as `format`.
pub(crate) async fn image_info(disk: &Path, format: &str) -> Result<serde_json::Value, ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let info = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", format])
        .arg(disk)
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !info.status.success() {
        return Err(tool(String::from_utf8_lossy(&info.stderr).trim().to_owned()));
    }
    serde_json::from_slice::<serde_json::Value>(&info.stdout)
        .map_err(|e| tool(format!("the info of {} is not JSON: {e}", disk.display())))
}

/// The virtual size, in bytes, of a disk image.
async fn image_size(disk: &Path, format: &str) -> Result<u64, ProviderError> {
    image_info(disk, format).await?["virtual-size"].as_u64().ok_or_else(|| {
        ProviderError::new(
            ErrorKind::Internal,
            format!("qemu-img: no virtual-size in the info of {}", disk.display()),
        )
    })
}

/// The backing file of a qcow2 image, as its header names it.
pub(crate) async fn backing_file(disk: &Path) -> Result<Option<std::path::PathBuf>, ProviderError> {
    let info = image_info(disk, "qcow2").await?;
    let name = info["full-backing-filename"].as_str().or_else(|| info["backing-filename"].as_str());
    Ok(name.map(std::path::PathBuf::from))
}

/// What growing a stopped domain's overlay to `disk_gib` takes: `None`
/// when it has that size already, else the new size in bytes. Refuses a
/// smaller size (disks only grow), and a disk holding internal snapshots
/// (qcow2 cannot resize those). Changes nothing.
pub(crate) async fn disk_growth(
    disk: &Path,
    disk_gib: u32,
    has_snapshots: bool,
) -> Result<Option<u64>, ProviderError> {
    let size = image_size(disk, "qcow2").await?;
    let want = u64::from(disk_gib) << 30;
    if want < size {
        return Err(invalid(format!(
            "disk_gib: {disk_gib} GiB is below the disk's {} GiB; disks only grow",
            size.div_ceil(1 << 30)
        )));
    }
    if want == size {
        return Ok(None);
    }
    if has_snapshots {
        return Err(ProviderError::new(
            ErrorKind::InvalidState,
            "the disk holds snapshots and cannot grow; delete them first",
        ));
    }
    Ok(Some(want))
}

/// Sets a (stopped domain's) disk image to `bytes`, with `qemu-img resize`.
pub(crate) async fn resize_image(disk: &Path, bytes: u64) -> Result<(), ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let out = tokio::process::Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(disk)
        .arg(bytes.to_string())
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}
