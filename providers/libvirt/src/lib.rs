//! # hcp-provider-libvirt
//!
//! The KVM/QEMU provider: an HCP provider process (built on
//! `hcp-provider-sdk`) that drives libvirtd. A VM is a persistent libvirt
//! domain whose UUID is the HCP VM id, booting from a qcow2 overlay on the
//! image's base disk, with a NoCloud seed when the tenant gave user data or
//! a hostname, a logged serial port and a password-protected VNC server on
//! a local address that only core's console proxy is told about.
//!
//! Every call is idempotent by the VM id and serialized per VM; libvirt's
//! blocking API runs on the blocking pool; a lost connection is reopened on
//! the next call. Module map: [`config`] (the file), [`domain`] (the XML),
//! [`seed`] (cloud-init), [`errors`] (the error mapping); inside, `start`
//! (connecting, [`StartError`], [`run`]), `connection` (calls on the
//! blocking pool, reconnects, per-VM locks), `provider` (the `Provider`
//! impl), `create`, `disks` (qcow2 overlays and growth), `lifecycle`
//! (power, resize, delete), `inventory` (a domain as the protocol says it),
//! `console`, `snapshots`, [`storage`] (what a volume is: file name, slot,
//! disk XML), `pool` (storage pools), `volumes` (the volume calls) and
//! `images` (imported and captured images, volumes of the default pool).

pub mod cli;
pub mod config;
mod connection;
mod console;
mod create;
mod disks;
pub mod domain;
pub mod errors;
mod images;
mod inventory;
mod lifecycle;
mod pool;
mod provider;
mod serial;
mod snapshots;
mod start;
pub mod storage;
mod volumes;
/// The NoCloud seed, shared with the Hyper-V provider.
pub use hcp_nocloud as seed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hcp_provider_sdk::pb;
use virt::connect::Connect;

pub use crate::config::{Accelerator, Config};
pub use crate::pool::PoolError;
pub use crate::start::{StartError, run};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-boot-volume`, `create:after-disk`,
/// `create:after-seed`, `create:after-define`, `create:after-start`,
/// `volume:create:after-create`, `volume:attach:after-attach`,
/// `volume:detach:after-detach`, `volume:extend:after-resize`,
/// `volume:delete:after-delete`, `image:import:after-upload` (the bytes
/// are in the pool, the completion marker is not); the process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_LIBVIRT_FAILPOINTS";

/// The volumes of a VM at its creation: what `VmSpec.boot_volume_id`,
/// `boot_storage` and `volumes` say in the protocol's description, which
/// the proto's `VmSpec` does not carry yet; taken by
/// [`Libvirt::create_vm_with_volumes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmVolumes {
    /// The root disk becomes this volume: created from the image (grown to
    /// the flavor's disk) when missing, used as it is when present.
    pub boot_volume_id: Option<String>,
    /// The pool a missing boot volume is created in (`VolumeSpec.storage`
    /// rules: empty is the default pool).
    pub boot_storage: String,
    /// Data volumes attached from the start.
    pub volumes: Vec<VolumeAttachment>,
}

impl VmVolumes {
    /// What a CreateVm's spec asks for.
    pub fn of(spec: Option<&pb::VmSpec>) -> Self {
        let Some(spec) = spec else { return Self::default() };
        VmVolumes {
            boot_volume_id: Some(spec.boot_volume_id.clone()).filter(|id| !id.is_empty()),
            boot_storage: spec.boot_storage.clone(),
            volumes: spec
                .volumes
                .iter()
                .map(|v| VolumeAttachment { volume_id: v.volume_id.clone(), slot: v.slot })
                .collect(),
        }
    }

    /// No boot volume, no data volumes.
    pub fn is_empty(&self) -> bool {
        self.boot_volume_id.is_none() && self.volumes.is_empty()
    }
}

/// A data volume attached at a VM's creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    /// The HCP volume id (the volume exists).
    pub volume_id: String,
    /// Its slot, 1 to [`storage::MAX_VOLUMES_PER_VM`].
    pub slot: u32,
}

/// The provider.
#[derive(Clone)]
pub struct Libvirt {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    conn: Mutex<Option<Connect>>,
    domain_type: &'static str,
    capabilities: pb::Capabilities,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failpoints: hcp_provider_sdk::support::Failpoints,
    /// The serial console relay (QEMU domains only), bound at start.
    serial: std::sync::OnceLock<Arc<hcp_provider_sdk::serial::SerialRelay>>,
}
