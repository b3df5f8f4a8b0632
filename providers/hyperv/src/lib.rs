//! # hcp-provider-hyperv
//!
//! The Microsoft Hyper-V provider: HCP's `hcp.provider.v1` served through
//! the SDK, mapped onto the documented WMI v2 classes of
//! `root/virtualization/v2`, invoked directly over WS-Management
//! ([`wsman`], [`cim`]); no PowerShell text is built or parsed.
//!
//! - A VM is defined (`DefineSystem`) with the name `hcp-<vm id>` and the id
//!   in its notes, so a create retried after any failure finds it
//!   (`ElementName`) instead of defining a second one.
//! - Each later step of a create (CPUs and memory, the SCSI controller,
//!   the disk drive, the differencing VHDX grown to the flavor, its
//!   attachment, one synthetic NIC and its switch connection per network)
//!   looks first and is skipped when done.
//! - Methods answering 4096 are followed through `Msvm_ConcreteJob` to
//!   their end; "in use" (32774) is retried with backoff; everything is
//!   mapped once, in [`map_error`].
//! - Calls for one VM are serialized, and calls for one volume.
//! - Volumes (`volumes.rs`) are dynamic VHDX files `hcp-vol-<volume id>.vhdx`
//!   in a directory per storage, attached as a disk drive at location =
//!   slot of the VM's SCSI controller (root disk at 0, seed DVD at 63, so
//!   62 volumes), hot while the VM runs; DeleteVm never touches them.
//!   A boot volume (`VmSpec.boot_volume_id`) is such a file at location 0
//!   instead of the VM's own differencing VHDX: found, or made as a
//!   differencing VHDX on the image; it leaves the VM only with DeleteVm.
//!
//! `../WIRE.md` fixes what is sent, against Microsoft's documentation.

pub mod cim;
pub mod cli;
pub mod config;
mod console;
mod create;
mod errors;
mod images;
mod inventory;
mod methods;
pub mod ntlm;
mod provider;
mod snapshots;
mod spec;
mod start;
pub(crate) mod volumes;
pub mod wsman;

use std::sync::Arc;

use hcp_provider_sdk::support::{Failpoints, VmLocks};

use crate::config::Config;
use crate::wsman::Wsman;

pub use crate::errors::{HvError, map_error};
pub use crate::start::{StartError, run};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-define`, `create:after-controller`,
/// `create:after-drive`, `create:after-vhd`, `create:after-disk`,
/// `create:after-dvd`, `create:after-seed`,
/// `create:after-nic`, `create:after-connection`, `create:after-boot-volume`
/// (a new boot volume made and grown), `create:after-volume` (a data volume
/// of the create attached), `start:after-start`,
/// `volume:after-create` (the VHDX made), `volume:after-drive` (an attach's
/// drive added, its VHDX not yet); the process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_HYPERV_FAILPOINTS";

const VSMS: &str = "Msvm_VirtualSystemManagementService";
const IMS: &str = "Msvm_ImageManagementService";
const VSSS: &str = "Msvm_VirtualSystemSnapshotService";
const SCSI: &str = "Microsoft:Hyper-V:Synthetic SCSI Controller";
const DISK_DRIVE: &str = "Microsoft:Hyper-V:Synthetic Disk Drive";
const VHD: &str = "Microsoft:Hyper-V:Virtual Hard Disk";
const DVD_DRIVE: &str = "Microsoft:Hyper-V:Synthetic DVD Drive";
const ISO: &str = "Microsoft:Hyper-V:Virtual CD/DVD Disk";
const NIC: &str = "Microsoft:Hyper-V:Synthetic Ethernet Port";
const CONNECTION: &str = "Microsoft:Hyper-V:Ethernet Connection";
/// The seed DVD's location on the SCSI controller: its last (64 locations,
/// 0..=63), so that volumes take 1..=62 and the root disk 0.
const DVD_LOCATION: u32 = 63;
/// The most volumes a VM has: the controller's locations less the root
/// disk's and the seed DVD's.
const MAX_VOLUMES: u32 = 62;

/// `RequestedState` values (Msvm_ComputerSystem.RequestStateChange).
mod state {
    pub(super) const RUNNING: u16 = 2;
    pub(super) const OFF: u16 = 3;
    pub(super) const SAVED: u16 = 6;
    pub(super) const PAUSED: u16 = 9;
    pub(super) const REBOOT: u16 = 10;
    pub(super) const RESET: u16 = 11;
}

/// Method return values.
mod rv {
    pub(super) const OK: u32 = 0;
    pub(super) const JOB: u32 = 4096;
    pub(super) const ACCESS_DENIED: u32 = 32769;
    pub(super) const NOT_SUPPORTED: u32 = 32770;
    pub(super) const INVALID_PARAMETER: u32 = 32773;
    pub(super) const IN_USE: u32 = 32774;
    pub(super) const INVALID_STATE: u32 = 32775;
    pub(super) const FILE_NOT_FOUND: u32 = 32779;
}

/// A VM's name on Hyper-V.
pub fn vm_name(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// The provider.
pub struct Hyperv {
    host: Arc<Wsman>,
    config: Arc<Config>,
    host_name: tokio::sync::OnceCell<String>,
    locks: VmLocks,
    failpoints: Failpoints,
}
