//! What an image import does before any provider sees a byte: fetch the
//! file once under the egress policy (bounded in size and time, hashed as
//! it arrives), refuse it unless its SHA-256 is the one the operator named,
//! take the disk out of an OVA, inspect it with qemu-img (the format it
//! claims, no backing file, no external data file or extent: an image that
//! reads other files of core's host is refused), and convert it to each
//! provider's format. Everything lives in one staging directory per image,
//! removed when the [`Staged`] value is dropped.
//!
//! qemu-img is always told the input format (`-f`): it never guesses, so a
//! raw file that happens to start like a qcow2 header is not read as one.

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_proto::ids::ImageId;
use sha2::Digest;

use crate::config::ImagesConfig;
use crate::egress::{DownloadError, DownloadLimits, EgressClient};
use crate::lifecycle::image::ImportFormat;
use crate::model::DiskFormat;

/// The largest virtual disk an image may describe, GiB (a flavor's disk is
/// at most this too).
pub const MAX_VIRTUAL_GIB: u64 = 65_536;

/// Fetches, checks and converts images for import jobs.
#[derive(Clone, Debug)]
pub struct ImageWork {
    egress: EgressClient,
    config: ImagesConfig,
}

/// Why an import could not get its image ready.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The download failed.
    #[error("cannot download the image")]
    Download(#[source] DownloadError),
    /// The file is not the one the operator named.
    #[error("the downloaded file's sha256 is {got}, not the {want} the import names")]
    Checksum {
        /// What the file hashes to.
        got: String,
        /// What the import said.
        want: String,
    },
    /// The file is not an image of the format named, or is one HCP refuses.
    #[error("{0}")]
    Format(String),
    /// qemu-img could not be run, or failed.
    #[error("{0}")]
    Tool(String),
    /// The staging directory could not be used.
    #[error("cannot stage the image in {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ImportError {
    /// Whether another attempt may succeed (a network failure, a full
    /// disk); a wrong file will not.
    pub fn retryable(&self) -> bool {
        match self {
            ImportError::Download(e) => e.retryable(),
            ImportError::Io { .. } => true,
            ImportError::Checksum { .. } | ImportError::Format(_) | ImportError::Tool(_) => false,
        }
    }
}

/// A disk file made ready for providers.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Its SHA-256, lower-case hex (what the provider checks).
    pub sha256: String,
}

/// An image in its staging directory (removed on drop).
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    disk: PathBuf,
    format: DiskFormat,
    /// The disk's virtual size.
    pub virtual_bytes: u64,
    converted: HashMap<DiskFormat, Converted>,
    qemu_img: PathBuf,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove an image's staging directory");
        }
    }
}

impl Staged {
    /// The smallest disk the image fits on, GiB.
    pub fn min_disk_gib(&self) -> u32 {
        u32::try_from(self.virtual_bytes.div_ceil(1 << 30).max(1)).unwrap_or(u32::MAX)
    }

    /// The image as `format` (converting it once, when it is not already).
    pub async fn as_format(&mut self, format: DiskFormat) -> Result<Converted, ImportError> {
        if let Some(c) = self.converted.get(&format) {
            return Ok(c.clone());
        }
        let path = if format == self.format {
            self.disk.clone()
        } else {
            let out = self.dir.join(format!("image.{}", format.as_str()));
            let mut args: Vec<std::ffi::OsString> = vec!["convert".into(), "-q".into(), "-f".into()];
            args.push(self.format.as_str().into());
            args.extend(["-O".into(), format.as_str().into()]);
            if format == DiskFormat::Vmdk {
                // The variant an OVF import (and vSphere's NFC upload) takes.
                args.extend(["-o".into(), "subformat=streamOptimized".into()]);
            }
            args.push(self.disk.clone().into_os_string());
            args.push(out.clone().into_os_string());
            run_tool(&self.qemu_img, &args).await?;
            out
        };
        let (size_bytes, sha256) = hash_file(&path).await?;
        let c = Converted { path, size_bytes, sha256 };
        self.converted.insert(format, c.clone());
        Ok(c)
    }
}

impl ImageWork {
    /// Image work through `egress`, bounded by `config`.
    pub fn new(egress: EgressClient, config: ImagesConfig) -> Self {
        Self { egress, config }
    }

    /// The bound on one provider call that stores or captures an image.
    pub fn provider_timeout(&self) -> Duration {
        Duration::from_secs(self.config.provider_timeout_seconds)
    }

    /// Fetches `url`, checks it is `sha256`, takes the disk out of an OVA,
    /// and inspects it as `format`.
    pub async fn fetch(
        &self,
        image: ImageId,
        url: &str,
        sha256: &str,
        format: ImportFormat,
    ) -> Result<Staged, ImportError> {
        let dir = self.config.staging_dir.join(image.to_string());
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ImportError::Io { path, source }
        };
        // What an earlier attempt left is not trusted: fetched again.
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        tokio::fs::create_dir_all(&dir).await.map_err(io_err(&dir))?;
        let mut staged = Staged {
            dir: dir.clone(),
            disk: dir.join("download"),
            format: format.disk(),
            virtual_bytes: 0,
            converted: HashMap::new(),
            qemu_img: self.config.qemu_img.clone(),
        };
        let limits = DownloadLimits {
            max_bytes: self.config.max_image_bytes,
            total: Duration::from_secs(self.config.download_timeout_seconds),
            stall: Duration::from_secs(self.config.stall_timeout_seconds),
            max_redirects: self.config.max_redirects,
        };
        let got = self.egress.download(url, &staged.disk, &limits).await.map_err(ImportError::Download)?;
        tracing::info!(bytes = got.bytes, from = %got.addr, "image downloaded");
        if got.sha256 != sha256 {
            return Err(ImportError::Checksum { got: got.sha256, want: sha256.to_owned() });
        }
        if format == ImportFormat::Ova {
            let ova = staged.disk.clone();
            let disk = dir.join("disk.vmdk");
            let limit = self.config.max_image_bytes;
            let to = disk.clone();
            tokio::task::spawn_blocking(move || unpack_ova(&ova, &to, limit))
                .await
                .map_err(|e| ImportError::Tool(format!("unpacking the OVA failed: {e}")))??;
            let _ = tokio::fs::remove_file(&staged.disk).await;
            staged.disk = disk;
        }
        staged.virtual_bytes = inspect(&self.config.qemu_img, &staged.disk, staged.format).await?;
        Ok(staged)
    }
}

/// Copies the first `.vmdk` member of the OVA (a tar) at `ova` to `to`, at
/// most `limit` bytes. The member's name is never used as a path.
fn unpack_ova(ova: &Path, to: &Path, limit: u64) -> Result<(), ImportError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImportError::Io { path, source }
    };
    let file = std::fs::File::open(ova).map_err(io_err(ova))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| ImportError::Format(format!("the file is not an OVA (a tar archive): {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| ImportError::Format(format!("the file is not an OVA (a tar archive): {e}")))?;
        let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        if !name.to_ascii_lowercase().ends_with(".vmdk") {
            continue;
        }
        if entry.size() > limit {
            return Err(ImportError::Format(format!("the OVA's disk {name} is larger than {limit} bytes")));
        }
        let mut out = std::fs::File::create(to).map_err(io_err(to))?;
        io::copy(&mut (&mut entry).take(limit), &mut out).map_err(io_err(to))?;
        out.sync_all().map_err(io_err(to))?;
        return Ok(());
    }
    Err(ImportError::Format("the OVA holds no .vmdk disk".into()))
}

/// Checks `disk` is a `format` image HCP may use and returns its virtual
/// size: qemu-img reads it as `format` (never guessing), and a file whose
/// content is another format than the one named, one that names a backing
/// file, an external data file or extents outside itself is refused.
async fn inspect(qemu_img: &Path, disk: &Path, format: DiskFormat) -> Result<u64, ImportError> {
    let info = |forced: Option<DiskFormat>| {
        let mut args: Vec<std::ffi::OsString> = vec!["info".into(), "--output=json".into()];
        if let Some(f) = forced {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.push(disk.as_os_str().to_owned());
        args
    };
    let out = run_tool(qemu_img, &info(Some(format))).await.map_err(|e| match e {
        ImportError::Tool(why) => ImportError::Format(format!("the file is not a {format} image: {why}")),
        other => other,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| ImportError::Tool(format!("qemu-img info answered something that is not JSON: {e}")))?;
    if let Some(backing) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(ImportError::Format(format!(
            "the image names a backing file ({backing}); an imported image must be self-contained"
        )));
    }
    let specific = v.pointer("/format-specific/data");
    if let Some(file) = specific.and_then(|d| d.get("data-file")).and_then(|f| f.as_str()) {
        return Err(ImportError::Format(format!("the image names an external data file ({file})")));
    }
    if let Some(extents) = specific.and_then(|d| d.get("extents")).and_then(|e| e.as_array()) {
        let own = disk.to_string_lossy();
        for e in extents {
            let name = e.get("filename").and_then(|f| f.as_str()).unwrap_or_default();
            if name != own {
                return Err(ImportError::Format(format!(
                    "the vmdk's extent {name} is another file; an imported image must be self-contained"
                )));
            }
        }
    }
    // A raw file is anything; it must not be an image of another format
    // (a qcow2 read as raw boots nothing, and hides its header's claims).
    if format == DiskFormat::Raw {
        let probed = run_tool(qemu_img, &info(None)).await?;
        let p: serde_json::Value = serde_json::from_slice(&probed).unwrap_or_default();
        if let Some(actual) = p.get("format").and_then(|f| f.as_str()).filter(|f| *f != "raw") {
            return Err(ImportError::Format(format!(
                "the import says raw, but the file is a {actual} image"
            )));
        }
    }
    let size = v.get("virtual-size").and_then(|s| s.as_u64()).unwrap_or(0);
    if size == 0 {
        return Err(ImportError::Format(format!("the {format} image has no virtual size")));
    }
    if size > MAX_VIRTUAL_GIB << 30 {
        return Err(ImportError::Format(format!(
            "the image's virtual size ({size} bytes) is larger than {MAX_VIRTUAL_GIB} GiB"
        )));
    }
    Ok(size)
}

/// Runs qemu-img with `args`; its stdout, or its stderr as the error.
async fn run_tool(tool: &Path, args: &[std::ffi::OsString]) -> Result<Vec<u8>, ImportError> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ImportError::Tool(format!("cannot run {}: {e}", tool.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        let err: String = err.chars().take(500).collect();
        return Err(ImportError::Tool(format!("{} {}: {err}", tool.display(), out.status)));
    }
    Ok(out.stdout)
}

/// The size and SHA-256 of a file.
async fn hash_file(path: &Path) -> Result<(u64, String), ImportError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p).map_err(|source| ImportError::Io { path: p.clone(), source })?;
        let mut digest = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n: u64 = 0;
        loop {
            let read = f.read(&mut buf).map_err(|source| ImportError::Io { path: p.clone(), source })?;
            if read == 0 {
                break;
            }
            n += read as u64;
            digest.update(&buf[..read]);
        }
        Ok((n, hex::encode(digest.finalize())))
    })
    .await
    .map_err(|e| ImportError::Tool(format!("hashing the image failed: {e}")))?
}

/// The messages of an ImportImage call: the header, then the file in 1 MiB
/// pieces.
pub fn import_stream(
    header: hcp_proto::provider::ImportImageHeader,
    path: PathBuf,
) -> impl futures::Stream<Item = hcp_proto::provider::ImportImageChunk> + Send + 'static {
    use hcp_proto::provider::{ImportImageChunk, import_image_chunk::Part};
    use tokio::io::AsyncReadExt;
    enum State {
        Header(hcp_proto::provider::ImportImageHeader, PathBuf),
        Open(tokio::fs::File),
        Done,
    }
    futures::stream::unfold(State::Header(header, path), |state| async move {
        match state {
            State::Header(h, path) => {
                let next = match tokio::fs::File::open(&path).await {
                    Ok(f) => State::Open(f),
                    // The provider sees a short stream and refuses it.
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the staged image");
                        State::Done
                    }
                };
                Some((ImportImageChunk { part: Some(Part::Header(h)) }, next))
            }
            State::Open(mut f) => {
                let mut buf = vec![0u8; 1 << 20];
                let mut filled = 0;
                // Fill the piece (a read may return less).
                while filled < buf.len() {
                    match f.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the staged image");
                            break;
                        }
                    }
                }
                if filled == 0 {
                    return None;
                }
                buf.truncate(filled);
                Some((ImportImageChunk { part: Some(Part::Data(buf)) }, State::Open(f)))
            }
            State::Done => None,
        }
    })
}
