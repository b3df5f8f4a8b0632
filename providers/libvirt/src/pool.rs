//! The storage pools volumes live in: the default pool made ready at start
//! (defined as a `dir` pool when missing, built, started, autostarted), the
//! operator's extra pools checked, and the lookups every volume call needs:
//! a pool by name, a volume by HCP id in any of the pools.

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use crate::storage::{pool_path_of, volume_file_name};

/// Why a pool could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// libvirt refused a pool call.
    #[error("pool {pool}: {message}")]
    Libvirt {
        /// The pool.
        pool: String,
        /// libvirt's message.
        message: String,
    },
    /// `virsh pool-define-as` failed.
    #[error("pool {pool}: cannot define it: {message}")]
    Define {
        /// The pool.
        pool: String,
        /// virsh's message.
        message: String,
    },
    /// Its directory could not be made.
    #[error("pool {pool}: cannot create {}", dir.display())]
    Dir {
        /// The pool.
        pool: String,
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An extra pool the configuration names does not exist.
    #[error("extra_volume_pools: pool {0:?} does not exist on this host")]
    Missing(String),
}

/// The pool named `name`, if libvirt has it.
pub(crate) fn find_pool(c: &Connect, name: &str) -> Result<Option<StoragePool>, virt::error::Error> {
    Ok(c.list_all_storage_pools(0)?.into_iter().find(|p| p.name().is_ok_and(|n| n == name)))
}

/// The directory of a (`dir`) pool.
pub(crate) fn pool_path(pool: &StoragePool) -> Result<Option<PathBuf>, virt::error::Error> {
    Ok(pool_path_of(&pool.xml_desc(0)?))
}

/// Makes the default pool ready and checks the extra ones. The pool is
/// defined through `virsh` (the `virt` crate has no binding for
/// virStoragePoolDefineXML), then built, started and autostarted through
/// the API; each step is skipped when done, so two providers starting at
/// once, or a restart after a crash half way, converge.
pub(crate) fn prepare(
    c: &Connect,
    uri: &str,
    name: &str,
    dir: &Path,
    extra: &[String],
) -> Result<(), PoolError> {
    let lv =
        |e: virt::error::Error| PoolError::Libvirt { pool: name.to_owned(), message: e.message().into() };
    if find_pool(c, name).map_err(lv)?.is_none() {
        std::fs::create_dir_all(dir)
            .and_then(|()| crate::disks::set_mode(dir, 0o755))
            .map_err(|source| PoolError::Dir { pool: name.to_owned(), dir: dir.to_owned(), source })?;
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", uri, "pool-define-as", name, "dir", "--target"])
            .arg(dir)
            .output()
            .map_err(|e| PoolError::Define { pool: name.to_owned(), message: format!("virsh: {e}") })?;
        // Another provider may have defined it meanwhile: only its absence
        // afterwards is an error.
        if !out.status.success() && find_pool(c, name).map_err(lv)?.is_none() {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(PoolError::Define { pool: name.to_owned(), message });
        }
    }
    let pool = find_pool(c, name).map_err(lv)?.ok_or_else(|| PoolError::Libvirt {
        pool: name.to_owned(),
        message: "defined, yet not listed".into(),
    })?;
    if !pool.is_active().map_err(lv)? {
        // Building an existing directory is harmless; a real problem shows
        // in the start below.
        if let Err(e) = pool.build(0) {
            tracing::debug!(pool = name, error = %e.message(), "pool build");
        }
        if let Err(e) = pool.create(0)
            && !pool.is_active().unwrap_or(false)
        {
            return Err(lv(e));
        }
    }
    if !pool.autostart().unwrap_or(true)
        && let Err(e) = pool.set_autostart(true)
    {
        tracing::warn!(pool = name, error = %e.message(), "cannot mark the volume pool autostart");
    }
    for other in extra {
        if find_pool(c, other).map_err(lv)?.is_none() {
            return Err(PoolError::Missing(other.clone()));
        }
    }
    Ok(())
}

/// A volume found by its HCP id.
pub(crate) struct Found {
    /// The libvirt volume.
    pub vol: StorageVol,
    /// Its file.
    pub path: PathBuf,
    /// Its virtual size in bytes.
    pub capacity: u64,
}

impl Found {
    pub(crate) fn of(vol: StorageVol) -> Result<Self, virt::error::Error> {
        let path = PathBuf::from(vol.path()?);
        let capacity = vol.info()?.capacity;
        Ok(Self { vol, path, capacity })
    }
}

/// The volume `volume_id` in any of `pools`. A file placed behind libvirt's
/// back (a boot volume copied from its image, a crash before the pool
/// noticed it) is found after a refresh of the pools.
pub(crate) fn find_volume(
    c: &Connect,
    pools: &[String],
    volume_id: &str,
) -> Result<Option<Found>, virt::error::Error> {
    let file = volume_file_name(volume_id);
    for refresh in [false, true] {
        for name in pools {
            let Some(pool) = find_pool(c, name)? else { continue };
            if !pool.is_active()? {
                continue;
            }
            if refresh && let Err(e) = pool.refresh(0) {
                // Busy with another volume's creation: that one is not ours.
                tracing::debug!(pool = %name, error = %e.message(), "pool refresh");
            }
            match pool.lookup_storage_vol_by_name(&file) {
                Ok(vol) => return Ok(Some(Found::of(vol)?)),
                Err(e) if e.code().is(virt::error::ErrorNumber::NoStorageVolume) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}
