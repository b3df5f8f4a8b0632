//! # hcp-provider-vsphere
//!
//! The VMware vSphere provider: HCP's `hcp.provider.v1` served through the
//! SDK, mapped onto vim25 (SOAP) towards vCenter or a standalone ESXi
//! ([`soap`], [`vim`]).
//!
//! - A VM is a clone of the template for its image (`CloneVM_Task`) into
//!   the configured folder, resource pool and datastore, named
//!   `hcp-<vm id>`, whose **instance UUID is the HCP VM id** (set by the
//!   clone itself) and whose `extraConfig` carries `hcp.vm_id`. A create
//!   retried after any failure finds the VM with `FindByUuid` instead of
//!   making a second one, and the reconciler recognizes HCP's VMs by name
//!   and instance UUID.
//! - After the clone, one `ReconfigVM_Task` brings CPUs, memory, the disk
//!   (it only grows), the NICs (one VMXNET3 per HCP network, on the port
//!   group the network maps to) and cloud-init's `guestinfo` keys to what
//!   the spec says; it is skipped when they already are, so every step of
//!   a create can be repeated.
//! - Tasks are awaited through a private PropertyCollector
//!   (`WaitForUpdatesEx`); faults are mapped once, in [`map_error`].
//! - Calls for one VM are serialized.
//! - Volumes are disk files `[<datastore>] hcp-volumes/<volume id>.vmdk`
//!   made without a VM (`CreateVirtualDisk_Task`), found by name, plugged
//!   into a VM's first SCSI controller and unplugged without a file
//!   operation; DeleteVm unplugs them before `Destroy_Task`, which deletes
//!   every disk still attached (`volumes.rs`).
//! - A boot volume is such a file at SCSI unit 0: a CreateVm with
//!   `boot_volume_id` clones the template, copies the template's disk to
//!   the volume (unless it exists: then it is booted as it is) and, in the
//!   one reconfiguration of the create, swaps the clone's own disk for it
//!   and plugs in the `volumes` at their slots.
//! - Images are templates named `hcp-image-<image id>` in the VM folder:
//!   imported through an OVF descriptor and an NFC lease (the VMDK core
//!   sent), or captured by cloning a stopped VM as a template
//!   (`images.rs`). Their source is that name, which CreateVm resolves as
//!   it resolves any template name.

pub mod cli;
pub mod config;
mod console;
mod create;
mod errors;
mod hosts;
mod images;
mod inventory;
mod provider;
mod snapshots;
pub mod soap;
mod spec;
mod start;
pub mod vim;
mod volumes;

use std::collections::HashMap;
use std::sync::Arc;

use hcp_provider_sdk::support::{Failpoints, VmLocks};

use crate::config::Config;
use crate::inventory::Places;
use crate::soap::Soap;

pub use crate::errors::map_error;
pub use crate::start::{StartError, run};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-clone-submit`, `create:after-clone`,
/// `create:after-reconfigure`, `create:after-power-on` (a create with
/// `start`) and `start:after-power-on` (core's start step after a create);
/// for volumes `volume-create:after-mkdir`, `volume-create:after-disk`,
/// `volume-attach:after-reconfigure`, `volume-detach:after-reconfigure`,
/// `volume-extend:after-grow`, `volume-delete:after-disk` and
/// `delete:after-detach` (DeleteVm: volumes unplugged, the VM not yet
/// destroyed); for a create with a boot volume `boot-volume:after-copy`
/// (the image's disk copied under its temporary name) and
/// `boot-volume:after-move` (the copy under the volume's name, not yet the
/// VM's root disk); for images `image-import:after-lease` (ImportVApp made
/// the VM, no byte sent), `image-import:after-complete` (the lease
/// completed, the VM not yet a template) and `capture:after-clone`; the
/// process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_VSPHERE_FAILPOINTS";

/// The `extraConfig` key naming the HCP VM.
pub const ID_KEY: &str = "hcp.vm_id";

/// A VM's name on vSphere.
pub fn vm_name(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// The provider.
pub struct Vsphere {
    soap: Arc<Soap>,
    config: Arc<Config>,
    console_trust: hcp_tls::Trust,
    /// The host of `sdk_url`: where a console ticket that names no host is
    /// used.
    vsphere_host: String,
    places: tokio::sync::OnceCell<Places>,
    locks: VmLocks,
    /// Clones sent whose answer never came (by HCP VM id): vCenter may
    /// still be making them, invisibly until they end, so a retried create
    /// waits for them instead of cloning again.
    lost_clones: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    failpoints: Failpoints,
    /// HostSystem moid -> name, as the last ListHosts saw them.
    host_names: std::sync::Mutex<HashMap<String, String>>,
}
