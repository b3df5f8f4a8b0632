//! # hcp-provider-proxmox
//!
//! The Proxmox VE provider: HCP's `hcp.provider.v1` served through the SDK,
//! mapped onto a PVE cluster's API (`client.rs`).
//!
//! - A VM is a **full clone** of the template for its image, with cores and
//!   memory from the flavor, `net0` on the bridge for its network, and
//!   cloud-init (`ciuser`, URL-encoded `sshkeys`, `ipconfig0`, user data as
//!   a `cicustom` snippet).
//! - Its HCP id travels in the description (`hcp-vm-id=<uuid>`, set by the
//!   clone itself) and in tags (`hcp` and `hcp-<uuid>`), so a create that is
//!   retried after any failure finds the VM instead of making a second one,
//!   and the reconciler can list every HCP VM from `/cluster/resources`.
//! - vmids come from `nextid` (which reserves nothing): a collision is
//!   answered by re-checking for our VM and trying another id.
//! - Volumes are images on a storage owned by a vmid that is never a VM
//!   (`volumes.owner_vmid`) and named `vm-<owner>-hcp-<volume id>`, attached
//!   as `scsiN`: PVE frees with a VM only the images it owns, so a volume
//!   outlives every VM it was attached to (`volumes.rs`).
//! - The serial console is PVE's `termproxy` (every VM gets `serial0:
//!   socket`), relayed to core's console proxy by the SDK's serial relay
//!   (`serial.rs`).
//! - Calls for one VM are serialized; PVE's transient failures are retried
//!   in the client; everything else is mapped once, in [`map_error`].

pub mod cli;
pub mod client;
pub mod config;
mod console;
mod create;
mod errors;
mod hosts;
mod images;
mod inventory;
mod provider;
mod serial;
mod snapshots;
mod spec;
mod start;
mod volumes;

use std::sync::Arc;

use hcp_provider_sdk::support::VmLocks;

use crate::client::Pve;
use crate::config::Config;

pub use crate::errors::map_error;
pub use crate::start::{StartError, run};

/// The provider.
pub struct Proxmox {
    pve: Arc<Pve>,
    config: Arc<Config>,
    locks: VmLocks,
    /// Calls for one volume are serialized too (taken before the VM's).
    volume_locks: VmLocks,
    version: tokio::sync::Mutex<Option<(u32, u32, String)>>,
    /// The serial console relay (bound at start).
    serial: std::sync::OnceLock<Arc<hcp_provider_sdk::serial::SerialRelay>>,
}
