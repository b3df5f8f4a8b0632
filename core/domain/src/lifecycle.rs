//! The lifecycle of VMs, jobs and snapshots: one table, no I/O.
//!
//! Everything core decides about states is here: which operation a VM
//! accepts in which state and with which provider capabilities, the state
//! it is in while the job runs, the steps each kind of job runs, what a
//! job's outcome does to the job, the VM and its snapshot (with the usage
//! event and console revocation), and which actions a tenant may ask for
//! now. The API asks [`accept`] and [`required_capabilities`]; the engine
//! runs [`JobKind::steps`]; the store persists the [`Transition`] that
//! [`transition`] returns and decides nothing itself.

use hcp_proto::error::ErrorCode;
use hcp_proto::ids::JobId;
use serde::{Deserialize, Serialize};

use crate::model::{Capabilities, Job, JobKind, JobStatus, SnapshotStatus, VmStatus};

mod drift;
pub mod image;
mod reset;
mod volume;
pub use drift::{Correction, Drift, Verdict, correct, drift, drifted_console_revocation};
pub use reset::{ProviderView, RESET_TARGETS, reset_allowed, reset_contradiction, reset_metering};
pub use volume::{
    AttachedVm, AttachmentChange, Observed, VolumeAction, VolumeChange, VolumeDrift, VolumeMetering,
    VolumeRefusal, accept_volume, created_vm_volume, volume_allowed_actions, volume_change, volume_drift,
    volume_missing,
};

/// A provider capability flag (a field of `hcp.provider.v1.Capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// cloud-init user data.
    CloudInit,
    /// Snapshots.
    Snapshot,
    /// Snapshots of running VMs.
    SnapshotRunning,
    /// Live migration.
    LiveMigration,
    /// VNC consoles.
    ConsoleVnc,
    /// SPICE consoles.
    ConsoleSpice,
    /// RDP consoles.
    ConsoleRdp,
    /// Serial consoles.
    ConsoleSerial,
    /// GPU passthrough.
    GpuPassthrough,
    /// Resize of a stopped VM.
    Resize,
    /// Resize of a running VM.
    HotResize,
    /// Migration of a stopped VM (and evacuation from a host that is down).
    ColdMigration,
    /// Volumes.
    Volumes,
    /// Attach and detach on a running VM.
    HotAttach,
    /// Extending a volume attached to a running VM.
    VolumeExtendInUse,
    /// The guest's serial output (boot log).
    ConsoleLog,
    /// ImportImage: the provider stores an image core streams to it.
    ImageImport,
    /// CaptureImage: an image of a stopped VM's root disk.
    Capture,
}

impl Capability {
    /// Every flag.
    pub const ALL: &'static [Capability] = &[
        Capability::CloudInit,
        Capability::Snapshot,
        Capability::SnapshotRunning,
        Capability::LiveMigration,
        Capability::ConsoleVnc,
        Capability::ConsoleSpice,
        Capability::ConsoleRdp,
        Capability::ConsoleSerial,
        Capability::GpuPassthrough,
        Capability::Resize,
        Capability::HotResize,
        Capability::ColdMigration,
        Capability::Volumes,
        Capability::HotAttach,
        Capability::VolumeExtendInUse,
        Capability::ConsoleLog,
        Capability::ImageImport,
        Capability::Capture,
    ];

    /// The flag's name in the protocol, as a 409 FEATURE_NOT_SUPPORTED
    /// names it.
    pub fn flag(self) -> &'static str {
        match self {
            Capability::CloudInit => "supports_cloud_init",
            Capability::Snapshot => "supports_snapshot",
            Capability::SnapshotRunning => "supports_snapshot_running",
            Capability::LiveMigration => "supports_live_migration",
            Capability::ConsoleVnc => "supports_console_vnc",
            Capability::ConsoleSpice => "supports_console_spice",
            Capability::ConsoleRdp => "supports_console_rdp",
            Capability::ConsoleSerial => "supports_console_serial",
            Capability::GpuPassthrough => "supports_gpu_passthrough",
            Capability::Resize => "supports_resize",
            Capability::HotResize => "supports_hot_resize",
            Capability::ColdMigration => "supports_cold_migration",
            Capability::Volumes => "supports_volumes",
            Capability::HotAttach => "supports_hot_attach",
            Capability::VolumeExtendInUse => "supports_volume_extend_in_use",
            Capability::ConsoleLog => "supports_console_log",
            Capability::ImageImport => "supports_image_import",
            Capability::Capture => "supports_capture",
        }
    }

    /// Whether `caps` has this flag.
    pub fn of(self, caps: &Capabilities) -> bool {
        match self {
            Capability::CloudInit => caps.supports_cloud_init,
            Capability::Snapshot => caps.supports_snapshot,
            Capability::SnapshotRunning => caps.supports_snapshot_running,
            Capability::LiveMigration => caps.supports_live_migration,
            Capability::ConsoleVnc => caps.supports_console_vnc,
            Capability::ConsoleSpice => caps.supports_console_spice,
            Capability::ConsoleRdp => caps.supports_console_rdp,
            Capability::ConsoleSerial => caps.supports_console_serial,
            Capability::GpuPassthrough => caps.supports_gpu_passthrough,
            Capability::Resize => caps.supports_resize,
            Capability::HotResize => caps.supports_hot_resize,
            Capability::ColdMigration => caps.supports_cold_migration,
            Capability::Volumes => caps.supports_volumes,
            Capability::HotAttach => caps.supports_hot_attach,
            Capability::VolumeExtendInUse => caps.supports_volume_extend_in_use,
            Capability::ConsoleLog => caps.supports_console_log,
            Capability::ImageImport => caps.supports_image_import && !caps.image_formats.is_empty(),
            Capability::Capture => caps.supports_capture,
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.flag())
    }
}

/// A console protocol a tenant may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleProtocol {
    /// RFB.
    Vnc,
    /// SPICE.
    Spice,
    /// RDP.
    Rdp,
    /// A serial line.
    Serial,
}

impl ConsoleProtocol {
    /// Every protocol.
    pub const ALL: &'static [ConsoleProtocol] =
        &[ConsoleProtocol::Vnc, ConsoleProtocol::Spice, ConsoleProtocol::Rdp, ConsoleProtocol::Serial];

    /// Parses the request's spelling (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.as_str().eq_ignore_ascii_case(s))
    }

    /// The wire spelling ("vnc").
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleProtocol::Vnc => "vnc",
            ConsoleProtocol::Spice => "spice",
            ConsoleProtocol::Rdp => "rdp",
            ConsoleProtocol::Serial => "serial",
        }
    }

    /// The protocols the gateway has a browser page for, in the order a
    /// `web` console prefers them.
    pub const WITH_PAGES: &'static [ConsoleProtocol] =
        &[ConsoleProtocol::Vnc, ConsoleProtocol::Spice, ConsoleProtocol::Serial];

    /// The flag a provider needs to offer it.
    pub fn capability(self) -> Capability {
        match self {
            ConsoleProtocol::Vnc => Capability::ConsoleVnc,
            ConsoleProtocol::Spice => Capability::ConsoleSpice,
            ConsoleProtocol::Rdp => Capability::ConsoleRdp,
            ConsoleProtocol::Serial => Capability::ConsoleSerial,
        }
    }
}

/// What a tenant asks a console of: a protocol, or `web`, the browser page
/// of the first protocol with one ([`ConsoleProtocol::WITH_PAGES`]) that
/// the VM's provider offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleType {
    /// This protocol.
    Protocol(ConsoleProtocol),
    /// A page in the browser.
    Web,
}

impl ConsoleType {
    /// Every type's wire spelling: the protocols, then `web`.
    pub fn names() -> impl Iterator<Item = &'static str> {
        ConsoleProtocol::ALL.iter().map(|p| p.as_str()).chain(std::iter::once(ConsoleType::Web.as_str()))
    }

    /// Parses the request's spelling (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case(ConsoleType::Web.as_str()) {
            return Some(ConsoleType::Web);
        }
        ConsoleProtocol::parse(s).map(ConsoleType::Protocol)
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleType::Protocol(p) => p.as_str(),
            ConsoleType::Web => "web",
        }
    }

    /// The protocol the session speaks, given what the provider offers:
    /// for `web` the first with a page it offers (VNC when none, which the
    /// capability check then refuses naming VNC's flag).
    pub fn protocol(self, caps: &Capabilities) -> ConsoleProtocol {
        match self {
            ConsoleType::Protocol(p) => p,
            ConsoleType::Web => ConsoleProtocol::WITH_PAGES
                .iter()
                .copied()
                .find(|p| p.capability().of(caps))
                .unwrap_or(ConsoleProtocol::Vnc),
        }
    }
}

/// One provider call of a job, as recorded in `job_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// CreateVm (not started).
    Create,
    /// StartVm.
    Start,
    /// StopVm.
    Stop,
    /// RebootVm.
    Reboot,
    /// ResizeVm.
    Resize,
    /// DeleteVm.
    Delete,
    /// CreateSnapshot.
    SnapshotCreate,
    /// RevertSnapshot.
    SnapshotRevert,
    /// DeleteSnapshot.
    SnapshotDelete,
    /// MigrateVm (skipped by a recovery that keeps the VM's host).
    Migrate,
    /// CreateVolume (skipped when the volume exists on the hypervisor;
    /// a host-local volume's create job leaves it to its first attach).
    VolumeCreate,
    /// DeleteVolume.
    VolumeDelete,
    /// ExtendVolume.
    VolumeExtend,
    /// AttachVolume.
    VolumeAttach,
    /// DetachVolume.
    VolumeDetach,
    /// CaptureImage.
    Capture,
    /// Fetch, verify and convert an image, then ImportImage on each
    /// provider.
    ImageImport,
    /// DeleteImage on each provider that stores the image.
    ImageDelete,
}

impl Step {
    /// Every step.
    pub const ALL: &'static [Step] = &[
        Step::Create,
        Step::Start,
        Step::Stop,
        Step::Reboot,
        Step::Resize,
        Step::Delete,
        Step::SnapshotCreate,
        Step::SnapshotRevert,
        Step::SnapshotDelete,
        Step::Migrate,
        Step::VolumeCreate,
        Step::VolumeDelete,
        Step::VolumeExtend,
        Step::VolumeAttach,
        Step::VolumeDetach,
        Step::Capture,
        Step::ImageImport,
        Step::ImageDelete,
    ];

    /// The step recorded as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|step| step.as_str() == s)
    }

    /// The output recorded for a delete step (of a VM or a snapshot):
    /// whether the provider still had what it deleted.
    pub fn deletion_output(existed: bool) -> &'static str {
        if existed { "deleted" } else { "absent" }
    }

    /// The recorded spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "provider.create",
            Step::Start => "provider.start",
            Step::Stop => "provider.stop",
            Step::Reboot => "provider.reboot",
            Step::Resize => "provider.resize",
            Step::Delete => "provider.delete",
            Step::SnapshotCreate => "provider.snapshot_create",
            Step::SnapshotRevert => "provider.snapshot_revert",
            Step::SnapshotDelete => "provider.snapshot_delete",
            Step::Migrate => "provider.migrate",
            Step::VolumeCreate => "provider.volume_create",
            Step::VolumeDelete => "provider.volume_delete",
            Step::VolumeExtend => "provider.volume_extend",
            Step::VolumeAttach => "provider.volume_attach",
            Step::VolumeDetach => "provider.volume_detach",
            Step::Capture => "provider.capture",
            Step::ImageImport => "provider.image_import",
            Step::ImageDelete => "provider.image_delete",
        }
    }
}

/// How a step in `job_steps` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    /// The provider answered; a resumed job skips it.
    Done,
    /// A cancellation cut the provider call; whether it happened is not
    /// known (the job ended CANCELLED).
    Interrupted,
}

impl StepStatus {
    /// Every step status.
    pub const ALL: &'static [StepStatus] = &[StepStatus::Done, StepStatus::Interrupted];

    /// The recorded spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Done => "done",
            StepStatus::Interrupted => "interrupted",
        }
    }

    /// The status recorded as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl JobKind {
    /// Every kind.
    pub const ALL: &'static [JobKind] = &[
        JobKind::CreateVm,
        JobKind::StartVm,
        JobKind::StopVm,
        JobKind::RebootVm,
        JobKind::ResizeVm,
        JobKind::DeleteVm,
        JobKind::SnapshotCreate,
        JobKind::SnapshotRevert,
        JobKind::SnapshotDelete,
        JobKind::MigrateVm,
        JobKind::RecoverVm,
        JobKind::CreateVolume,
        JobKind::DeleteVolume,
        JobKind::ExtendVolume,
        JobKind::AttachVolume,
        JobKind::DetachVolume,
        JobKind::CaptureVm,
        JobKind::ImportImage,
        JobKind::DeleteImage,
    ];

    /// Whether the job operates on an image and holds no VM (a capture is
    /// a VM's job that makes an image).
    pub fn is_image_job(self) -> bool {
        matches!(self, JobKind::ImportImage | JobKind::DeleteImage)
    }

    /// Whether the job operates on a volume.
    pub fn is_volume_job(self) -> bool {
        matches!(
            self,
            JobKind::CreateVolume
                | JobKind::DeleteVolume
                | JobKind::ExtendVolume
                | JobKind::AttachVolume
                | JobKind::DetachVolume
        )
    }

    /// The provider calls the job makes, in order.
    pub fn steps(self) -> &'static [Step] {
        match self {
            JobKind::CreateVm => &[Step::Create, Step::Start],
            JobKind::StartVm => &[Step::Start],
            JobKind::StopVm => &[Step::Stop],
            JobKind::RebootVm => &[Step::Reboot],
            JobKind::ResizeVm => &[Step::Resize],
            // Then the boot volume, when it goes with its VM.
            JobKind::DeleteVm => &[Step::Delete, Step::VolumeDelete],
            JobKind::SnapshotCreate => &[Step::SnapshotCreate],
            JobKind::SnapshotRevert => &[Step::SnapshotRevert],
            JobKind::SnapshotDelete => &[Step::SnapshotDelete],
            JobKind::MigrateVm => &[Step::Migrate],
            JobKind::RecoverVm => &[Step::Migrate, Step::Start],
            JobKind::CreateVolume => &[Step::VolumeCreate],
            JobKind::DeleteVolume => &[Step::VolumeDelete],
            JobKind::ExtendVolume => &[Step::VolumeExtend],
            // A host-local volume is made on the VM's host at its first
            // attachment.
            JobKind::AttachVolume => &[Step::VolumeCreate, Step::VolumeAttach],
            JobKind::DetachVolume => &[Step::VolumeDetach],
            JobKind::CaptureVm => &[Step::Capture],
            // Fetch, verify, convert and push to each provider: one step,
            // whose progress is each provider's backing, recorded as it
            // is stored (a worker that takes it over fetches again: the
            // staged file was on the first worker's disk).
            JobKind::ImportImage => &[Step::ImageImport],
            JobKind::DeleteImage => &[Step::ImageDelete],
        }
    }

    /// The VM states from which this operation may be requested.
    pub fn allowed_from(self) -> &'static [VmStatus] {
        match self {
            JobKind::CreateVm => &[],
            JobKind::StartVm => &[VmStatus::Stopped, VmStatus::Error],
            JobKind::StopVm => &[VmStatus::Active, VmStatus::Error],
            JobKind::RebootVm => &[VmStatus::Active],
            JobKind::ResizeVm => &[VmStatus::Active, VmStatus::Stopped],
            JobKind::DeleteVm => &[VmStatus::Active, VmStatus::Stopped, VmStatus::Error],
            JobKind::SnapshotCreate | JobKind::SnapshotRevert | JobKind::SnapshotDelete => {
                &[VmStatus::Active, VmStatus::Stopped]
            }
            JobKind::MigrateVm => &[VmStatus::Active, VmStatus::Stopped],
            // A VM that should run: ACTIVE in HCP, or put in ERROR by the
            // reconciler after its host vanished.
            JobKind::RecoverVm => &[VmStatus::Active, VmStatus::Error],
            // A VM a volume job holds: one attached to (or attaching) the
            // volume, steady.
            JobKind::AttachVolume | JobKind::DetachVolume | JobKind::ExtendVolume => {
                &[VmStatus::Active, VmStatus::Stopped]
            }
            JobKind::CreateVolume | JobKind::DeleteVolume => &[],
            // A capture reads the root disk of a VM that does not run.
            JobKind::CaptureVm => &[VmStatus::Stopped],
            JobKind::ImportImage | JobKind::DeleteImage => &[],
        }
    }

    /// The state the VM is in while the job runs; `None` keeps its state
    /// (snapshot jobs; the job still holds the VM).
    pub fn in_flight_status(self) -> Option<VmStatus> {
        match self {
            JobKind::CreateVm => Some(VmStatus::Pending),
            JobKind::StartVm => Some(VmStatus::Starting),
            JobKind::StopVm => Some(VmStatus::Stopping),
            JobKind::RebootVm => Some(VmStatus::Rebooting),
            JobKind::ResizeVm => Some(VmStatus::Resizing),
            JobKind::DeleteVm => Some(VmStatus::Deleting),
            JobKind::SnapshotCreate | JobKind::SnapshotRevert | JobKind::SnapshotDelete => None,
            // Tenants see a moving VM as it was (hosts are not theirs).
            JobKind::MigrateVm => None,
            JobKind::RecoverVm => Some(VmStatus::Starting),
            // The volume shows the operation; the VM keeps its state.
            JobKind::CreateVolume
            | JobKind::DeleteVolume
            | JobKind::ExtendVolume
            | JobKind::AttachVolume
            | JobKind::DetachVolume => None,
            // The image shows the operation; the VM stays STOPPED, held.
            JobKind::CaptureVm => None,
            JobKind::ImportImage | JobKind::DeleteImage => None,
        }
    }
}

impl crate::model::VolumeStatus {
    /// Every status.
    pub const ALL: &'static [crate::model::VolumeStatus] = {
        use crate::model::VolumeStatus::*;
        &[Creating, Available, Attaching, InUse, Detaching, Extending, Deleting, Error, Deleted]
    };
}

impl VmStatus {
    /// Every status.
    pub const ALL: &'static [VmStatus] = &[
        VmStatus::Pending,
        VmStatus::Active,
        VmStatus::Stopped,
        VmStatus::Error,
        VmStatus::Deleted,
        VmStatus::Starting,
        VmStatus::Stopping,
        VmStatus::Rebooting,
        VmStatus::Resizing,
        VmStatus::Deleting,
    ];

    /// True for the states in which a job is operating on the VM.
    pub fn is_transitional(self) -> bool {
        JobKind::ALL.iter().any(|k| k.in_flight_status() == Some(self))
    }
}

/// A VM's size: a flavor and what it stood for when applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    /// Flavor name.
    pub flavor: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Root disk.
    pub disk_gib: u32,
}

/// What a job was asked to do beyond its kind, stored with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JobParams {
    /// Nothing beyond the kind.
    #[default]
    None,
    /// How to stop.
    Stop {
        /// Power off at once.
        force: bool,
        /// Graceful shutdown time before powering off; 0: the provider's.
        timeout_seconds: u32,
    },
    /// How to reboot.
    Reboot {
        /// Reset instead of asking the guest.
        hard: bool,
    },
    /// A resize: the size is applied to the VM row at accept time (so the
    /// quota holds it), and `from` restores it if the job fails or is
    /// cancelled.
    Resize {
        /// The size before.
        from: Size,
        /// The size asked for.
        to: Size,
    },
    /// A move to another host: the VM row names `to` from accept time (so
    /// placement counts it there), and `from` is put back if the job fails
    /// or is cancelled.
    Migrate {
        /// The host before.
        from: String,
        /// The host asked for.
        to: String,
        /// Without stopping the VM.
        live: bool,
    },
    /// A create that holds volumes: its boot volume (made from the image
    /// when new) and the data volumes attached at create, by place. The
    /// engine builds the provider's spec from it; finishing writes the
    /// volumes' ends (`created_vm_volume`).
    CreateWithVolumes {
        /// The boot volume, if any.
        boot: Option<hcp_proto::ids::VolumeId>,
        /// Where a new boot volume is made (its type's storage there).
        boot_storage: String,
        /// Data volumes and their places (1, 2, ...).
        data: Vec<(hcp_proto::ids::VolumeId, u32)>,
    },
    /// A volume's growth: the size is applied to the volume row at accept
    /// time (so the quota holds it), and `from` restores it if the job
    /// fails or is cancelled.
    Extend {
        /// The size before, in GiB.
        from: u32,
        /// The size asked for.
        to: u32,
    },
    /// A restart of a VM found down, on host `to` when its own host is
    /// down (a cold move from storage both reach), else where it is.
    Recover {
        /// The host before.
        from: String,
        /// The host to rebuild it on; `None` keeps it where it is.
        to: Option<String>,
    },
    /// An image import: where from, what it must hash to, and where to.
    ImportImage {
        /// http(s) URL, checked against the egress policy when fetched.
        url: String,
        /// SHA-256 of the file, lower-case hex.
        sha256: String,
        /// The file's format (`ImportFormat`'s name).
        format: String,
        /// Provider names to store it on.
        providers: Vec<String>,
    },
    /// An image's removal, and the state it goes back to when cancelled
    /// before it ran.
    DeleteImage {
        /// Whether it was AVAILABLE (else ERROR).
        was_available: bool,
    },
}

impl JobParams {
    /// The host to put back on the VM when the job fails or is cancelled.
    fn host_before(&self) -> Option<String> {
        match self {
            JobParams::Migrate { from, .. } => Some(from.clone()),
            JobParams::Recover { from, to: Some(_) } => Some(from.clone()),
            _ => None,
        }
    }
}

/// The power state a provider reported after a snapshot revert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Running.
    Running,
    /// Not running.
    Off,
}

/// How a job attempt ended, as far as states are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done. `power` is the state after a snapshot revert.
    Succeeded {
        /// Power state after a revert; `None` for other jobs.
        power: Option<Power>,
    },
    /// Failed for good.
    Failed(ErrorCode),
    /// Failed in a way a later attempt may fix.
    Retry(ErrorCode),
    /// Cancelled by the tenant while queued.
    Cancelled,
    /// Cancelled while running: the worker stopped waiting for the
    /// provider's answer to this step, which may or may not have happened.
    Interrupted(Step),
}

/// A metered power or size change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// The VM started running (billable from now).
    Started,
    /// It stopped running.
    Stopped,
    /// It is gone.
    Deleted,
    /// Its size changed (billable at the new size from now).
    Resized,
}

impl Metering {
    /// Every usage event.
    pub const ALL: &'static [Metering] =
        &[Metering::Started, Metering::Stopped, Metering::Deleted, Metering::Resized];

    /// The usage event named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.as_str() == s)
    }

    /// The usage event's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Metering::Started => "started",
            Metering::Stopped => "stopped",
            Metering::Deleted => "deleted",
            Metering::Resized => "resized",
        }
    }
}

/// What finishing (or cancelling) a job changes. The store writes exactly
/// this, in one transaction with the audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The job's new state.
    pub job: JobStatus,
    /// The VM's new state; `None` leaves the VM as it is (and held by the
    /// job). `Some` releases the VM from the job.
    pub vm: Option<VmStatus>,
    /// The error recorded on the VM (only with a VM state of ERROR).
    pub vm_error: Option<ErrorCode>,
    /// A size to put back on the VM (a failed or cancelled resize).
    pub vm_size: Option<Size>,
    /// A host to put back on the VM (a failed or cancelled move).
    pub vm_host: Option<String>,
    /// The snapshot's new state, for snapshot jobs.
    pub snapshot: Option<SnapshotStatus>,
    /// The usage event to append.
    pub metering: Option<Metering>,
    /// Whether unused console tokens of the VM stop working.
    pub revoke_consoles: bool,
    /// Whether the job is announced to workers again (a retry).
    pub requeue: bool,
    /// What happens to the job's volume, for volume jobs.
    pub volume: Option<VolumeChange>,
    /// Whether the volumes attached to the VM become AVAILABLE, detached
    /// (the VM is gone; the provider left its volumes behind), and its
    /// boot volume DELETED when it went with the VM.
    pub release_volumes: bool,
    /// Whether the VM's boot volume takes the VM's disk size (a resize
    /// grew it).
    pub sync_boot_volume: bool,
    /// What happens to the job's image, for image jobs and captures.
    pub image: Option<image::ImageChange>,
}

impl Job {
    /// What `outcome` does for this job: [`transition`] for its VM and
    /// [`volume_change`] for its volume.
    pub fn transition(&self, outcome: Outcome) -> Transition {
        Transition {
            volume: volume_change(self.kind, outcome, self.prior_volume_status, &self.params),
            image: image::image_change(self.kind, outcome, &self.params),
            ..transition(self.kind, outcome, self.prior_status, &self.params)
        }
    }
}

/// What `outcome` does, for a job of `kind` accepted when the VM was
/// `prior` (`None` for a create).
pub fn transition(
    kind: JobKind,
    outcome: Outcome,
    prior: Option<VmStatus>,
    params: &JobParams,
) -> Transition {
    let restore_size = match params {
        JobParams::Resize { from, .. } => Some(from.clone()),
        _ => None,
    };
    let nothing = Transition {
        job: JobStatus::Queued,
        vm: None,
        vm_error: None,
        vm_size: None,
        vm_host: None,
        snapshot: None,
        metering: None,
        revoke_consoles: false,
        requeue: false,
        volume: None,
        release_volumes: false,
        sync_boot_volume: false,
        image: None,
    };
    let restore_host = params.host_before();
    if kind.is_volume_job() || kind.is_image_job() {
        // A volume job never changes its VM's state (what went wrong is
        // the volume's): it only releases the VM it held. An image job
        // holds no VM.
        let job = match outcome {
            Outcome::Retry(_) => return Transition { job: JobStatus::Queued, requeue: true, ..nothing },
            Outcome::Succeeded { .. } => JobStatus::Succeeded,
            Outcome::Failed(_) => JobStatus::Failed,
            Outcome::Cancelled | Outcome::Interrupted(_) => JobStatus::Cancelled,
        };
        return Transition { job, vm: prior, ..nothing };
    }
    match outcome {
        Outcome::Retry(_) => Transition { job: JobStatus::Queued, requeue: true, ..nothing },
        Outcome::Succeeded { power } => {
            let vm = match kind {
                JobKind::CreateVm | JobKind::StartVm | JobKind::RebootVm => VmStatus::Active,
                JobKind::StopVm => VmStatus::Stopped,
                JobKind::DeleteVm => VmStatus::Deleted,
                JobKind::SnapshotRevert => match power {
                    Some(Power::Running) => VmStatus::Active,
                    Some(Power::Off) | None => VmStatus::Stopped,
                },
                JobKind::RecoverVm => VmStatus::Active,
                // Back where it was: the job changed no power state.
                JobKind::ResizeVm
                | JobKind::SnapshotCreate
                | JobKind::SnapshotDelete
                | JobKind::MigrateVm
                | JobKind::CreateVolume
                | JobKind::DeleteVolume
                | JobKind::ExtendVolume
                | JobKind::AttachVolume
                | JobKind::DetachVolume
                | JobKind::CaptureVm
                | JobKind::ImportImage
                | JobKind::DeleteImage => prior.unwrap_or(VmStatus::Error),
            };
            let metering = match kind {
                JobKind::CreateVm | JobKind::StartVm => Some(Metering::Started),
                JobKind::StopVm => Some(Metering::Stopped),
                JobKind::DeleteVm => Some(Metering::Deleted),
                JobKind::ResizeVm => Some(Metering::Resized),
                JobKind::SnapshotRevert if Some(vm) != prior => {
                    Some(if vm == VmStatus::Active { Metering::Started } else { Metering::Stopped })
                }
                // A recovered VM was billed as running unless HCP had
                // marked it ERROR.
                JobKind::RecoverVm if prior != Some(VmStatus::Active) => Some(Metering::Started),
                JobKind::SnapshotRevert
                | JobKind::RebootVm
                | JobKind::SnapshotCreate
                | JobKind::SnapshotDelete
                | JobKind::MigrateVm
                | JobKind::RecoverVm
                | JobKind::CreateVolume
                | JobKind::DeleteVolume
                | JobKind::ExtendVolume
                | JobKind::AttachVolume
                | JobKind::DetachVolume
                | JobKind::CaptureVm
                | JobKind::ImportImage
                | JobKind::DeleteImage => None,
            };
            let snapshot = match kind {
                JobKind::SnapshotCreate => Some(SnapshotStatus::Available),
                JobKind::SnapshotDelete => Some(SnapshotStatus::Removed),
                _ => None,
            };
            Transition {
                job: JobStatus::Succeeded,
                vm: Some(vm),
                snapshot,
                metering,
                revoke_consoles: revokes_consoles_on_success(kind),
                release_volumes: kind == JobKind::DeleteVm,
                sync_boot_volume: kind == JobKind::ResizeVm,
                ..nothing
            }
        }
        // A capture only reads the VM's disk: what failed is the image's.
        Outcome::Failed(_) if kind == JobKind::CaptureVm => {
            Transition { job: JobStatus::Failed, vm: Some(prior.unwrap_or(VmStatus::Error)), ..nothing }
        }
        // A move that failed leaves the VM where it was, as it was: the
        // provider keeps the source until the target is complete.
        Outcome::Failed(_) if kind == JobKind::MigrateVm => Transition {
            job: JobStatus::Failed,
            vm: Some(prior.unwrap_or(VmStatus::Error)),
            vm_error: prior.is_none().then_some(ErrorCode::Internal),
            vm_host: restore_host,
            ..nothing
        },
        Outcome::Failed(code) => Transition {
            job: JobStatus::Failed,
            vm: Some(VmStatus::Error),
            vm_error: Some(code),
            vm_size: restore_size,
            vm_host: restore_host,
            snapshot: match kind {
                JobKind::SnapshotCreate | JobKind::SnapshotDelete => Some(SnapshotStatus::Error),
                _ => None,
            },
            revoke_consoles: revokes_consoles(kind),
            ..nothing
        },
        Outcome::Interrupted(step) => interrupted(kind, step, prior, restore_size, restore_host, nothing),
        Outcome::Cancelled => {
            // A cancelled create leaves a VM that may half exist: ERROR, to
            // be deleted. Other operations return the VM to where it was.
            let vm = match (kind, prior) {
                (JobKind::CreateVm, _) | (_, None) => VmStatus::Error,
                (_, Some(prior)) => prior,
            };
            // A VM left in ERROR says why.
            let vm_error = (vm == VmStatus::Error).then_some(ErrorCode::Cancelled);
            Transition {
                job: JobStatus::Cancelled,
                vm: Some(vm),
                vm_error,
                vm_size: restore_size,
                vm_host: restore_host,
                // An earlier attempt may have gone part of the way.
                snapshot: match kind {
                    JobKind::SnapshotCreate | JobKind::SnapshotDelete => Some(SnapshotStatus::Error),
                    _ => None,
                },
                ..nothing
            }
        }
    }
}

/// What a job of `kind` cancelled while its `step` ran leaves. The step's
/// provider call was cut, so whether it happened is unknown: a step that
/// changes whether the VM exists, runs or what its disk holds leaves it
/// ERROR (code CANCELLED) for the reconciler to settle from what the
/// hypervisor reports; a step that does not (a reboot, a snapshot taken or
/// removed) returns it to where it was. A deletion whose VM is already gone
/// (only its boot volume's removal was cut) ends the VM DELETED.
fn interrupted(
    kind: JobKind,
    step: Step,
    prior: Option<VmStatus>,
    restore_size: Option<Size>,
    restore_host: Option<String>,
    nothing: Transition,
) -> Transition {
    let cancelled = Transition { job: JobStatus::Cancelled, ..nothing };
    match (kind, step) {
        (JobKind::DeleteVm, Step::VolumeDelete) => Transition {
            vm: Some(VmStatus::Deleted),
            metering: Some(Metering::Deleted),
            revoke_consoles: true,
            release_volumes: true,
            ..cancelled
        },
        // A capture cut short leaves the VM's disk as it was; the image
        // may half exist, which the image's ERROR and its deletion handle.
        (JobKind::RebootVm | JobKind::CaptureVm, _) => {
            Transition { vm: Some(prior.unwrap_or(VmStatus::Error)), ..cancelled }
        }
        (JobKind::SnapshotCreate | JobKind::SnapshotDelete, _) => Transition {
            vm: Some(prior.unwrap_or(VmStatus::Error)),
            snapshot: Some(SnapshotStatus::Error),
            ..cancelled
        },
        // A move keeps its source until the target is complete: the VM is
        // where it was, as with a failed move.
        (JobKind::MigrateVm, _) => {
            Transition { vm: Some(prior.unwrap_or(VmStatus::Error)), vm_host: restore_host, ..cancelled }
        }
        _ => Transition {
            vm: Some(VmStatus::Error),
            vm_error: Some(ErrorCode::Cancelled),
            vm_size: restore_size,
            vm_host: restore_host,
            revoke_consoles: revokes_consoles(kind),
            ..cancelled
        },
    }
}

/// Whether a finished job of `kind` makes unused console tokens useless
/// (the VM stopped or went away).
fn revokes_consoles(kind: JobKind) -> bool {
    matches!(kind, JobKind::StopVm | JobKind::DeleteVm)
}

/// Whether a job of `kind` that succeeded makes unused console tokens
/// useless: the VM stopped, went away or moved (a token names the console
/// of the host it was issued for).
fn revokes_consoles_on_success(kind: JobKind) -> bool {
    revokes_consoles(kind) || matches!(kind, JobKind::MigrateVm | JobKind::RecoverVm)
}

/// Why a finished job of `kind` revoked the VM's console sessions, as the
/// console proxy tells the tenant when it ends an open one and as the audit
/// trail records it.
pub fn console_revocation(kind: JobKind, job: JobStatus) -> &'static str {
    match (kind, job) {
        (JobKind::DeleteVm, JobStatus::Succeeded) => "the vm was deleted",
        (JobKind::StopVm, JobStatus::Succeeded) => "the vm was stopped",
        (JobKind::MigrateVm | JobKind::RecoverVm, JobStatus::Succeeded) => "the vm moved to another host",
        _ => "the vm is in error",
    }
}

/// Why an operation cannot be accepted now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A job is operating on the VM.
    Busy(JobId),
    /// The VM's state does not allow it.
    WrongState {
        /// The states that would.
        allowed: &'static [VmStatus],
    },
}

/// Decides whether `kind` may start on a VM in `status` with `job` in
/// flight; returns the state the VM takes while the job runs.
pub fn accept(kind: JobKind, status: VmStatus, job: Option<JobId>) -> Result<VmStatus, Refusal> {
    if let Some(job) = job {
        return Err(Refusal::Busy(job));
    }
    let allowed = kind.allowed_from();
    if !allowed.contains(&status) {
        return Err(Refusal::WrongState { allowed });
    }
    Ok(kind.in_flight_status().unwrap_or(status))
}

/// Why a snapshot operation cannot take its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRefusal {
    /// The snapshot is removed: to the tenant, it does not exist.
    Gone,
    /// The snapshot's state does not allow the operation.
    WrongState(SnapshotStatus),
}

/// Decides whether a job of `kind` (a revert or a delete) may start on a
/// snapshot in `status`; returns the state the snapshot takes while the job
/// runs (`None`: it keeps its state). A revert needs an AVAILABLE snapshot;
/// a delete also takes one left in ERROR.
pub fn accept_snapshot(
    kind: JobKind,
    status: SnapshotStatus,
) -> Result<Option<SnapshotStatus>, SnapshotRefusal> {
    let deleting = kind == JobKind::SnapshotDelete;
    match status {
        SnapshotStatus::Removed => Err(SnapshotRefusal::Gone),
        SnapshotStatus::Available | SnapshotStatus::Error if deleting => Ok(Some(SnapshotStatus::Removing)),
        SnapshotStatus::Available if kind == JobKind::SnapshotRevert => Ok(None),
        _ => Err(SnapshotRefusal::WrongState(status)),
    }
}

/// The capabilities a provider needs for `kind` on a VM in `status`, most
/// general first (a refusal names the first one missing).
pub fn required_capabilities(kind: JobKind, status: VmStatus) -> &'static [Capability] {
    match (kind, status) {
        (JobKind::ResizeVm, VmStatus::Active) => &[Capability::HotResize],
        (JobKind::ResizeVm, _) => &[Capability::Resize],
        (JobKind::MigrateVm, VmStatus::Active) => &[Capability::LiveMigration],
        (JobKind::MigrateVm, _) => &[Capability::ColdMigration],
        (JobKind::SnapshotCreate, VmStatus::Active) => &[Capability::Snapshot, Capability::SnapshotRunning],
        (JobKind::SnapshotCreate | JobKind::SnapshotRevert | JobKind::SnapshotDelete, _) => {
            &[Capability::Snapshot]
        }
        (JobKind::AttachVolume | JobKind::DetachVolume, VmStatus::Active) => {
            &[Capability::Volumes, Capability::HotAttach]
        }
        (JobKind::ExtendVolume, VmStatus::Active) => &[Capability::Volumes, Capability::VolumeExtendInUse],
        (
            JobKind::AttachVolume
            | JobKind::DetachVolume
            | JobKind::ExtendVolume
            | JobKind::CreateVolume
            | JobKind::DeleteVolume,
            _,
        ) => &[Capability::Volumes],
        (JobKind::CaptureVm, _) => &[Capability::Capture],
        (JobKind::ImportImage | JobKind::DeleteImage, _) => &[Capability::ImageImport],
        (
            JobKind::CreateVm
            | JobKind::StartVm
            | JobKind::StopVm
            | JobKind::RebootVm
            | JobKind::DeleteVm
            // Whether it moves is decided when the host is known to be down.
            | JobKind::RecoverVm,
            _,
        ) => &[],
    }
}

/// Returns the first of `needs` that `caps` lacks.
pub fn missing(needs: &[Capability], caps: &Capabilities) -> Option<Capability> {
    needs.iter().copied().find(|c| !c.of(caps))
}

/// Something a tenant may ask of a VM, as `allowed_actions` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Change name, metadata or tags.
    Update,
    /// Start.
    Start,
    /// Stop gracefully.
    Stop,
    /// Power off.
    ForceStop,
    /// Reboot through the guest.
    Reboot,
    /// Reset.
    HardReboot,
    /// Change the flavor.
    Resize,
    /// Take a snapshot.
    Snapshot,
    /// Open a console.
    Console,
    /// Delete.
    Delete,
}

impl VmAction {
    /// Every action, in the order reads list them.
    pub const ALL: &'static [VmAction] = &[
        VmAction::Update,
        VmAction::Start,
        VmAction::Stop,
        VmAction::ForceStop,
        VmAction::Reboot,
        VmAction::HardReboot,
        VmAction::Resize,
        VmAction::Snapshot,
        VmAction::Console,
        VmAction::Delete,
    ];

    /// The spelling in `allowed_actions`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmAction::Update => "update",
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::ForceStop => "force_stop",
            VmAction::Reboot => "reboot",
            VmAction::HardReboot => "hard_reboot",
            VmAction::Resize => "resize",
            VmAction::Snapshot => "snapshot",
            VmAction::Console => "console",
            VmAction::Delete => "delete",
        }
    }

    /// The job the action starts; `None` for those that start none.
    fn job_kind(self) -> Option<JobKind> {
        match self {
            VmAction::Update | VmAction::Console => None,
            VmAction::Start => Some(JobKind::StartVm),
            VmAction::Stop | VmAction::ForceStop => Some(JobKind::StopVm),
            VmAction::Reboot | VmAction::HardReboot => Some(JobKind::RebootVm),
            VmAction::Resize => Some(JobKind::ResizeVm),
            VmAction::Snapshot => Some(JobKind::SnapshotCreate),
            VmAction::Delete => Some(JobKind::DeleteVm),
        }
    }
}

/// What may be asked of a VM in `status`, with `job` in flight, on a
/// provider with `caps`: exactly what [`accept`] and
/// [`required_capabilities`] would let through now.
pub fn allowed_actions(status: VmStatus, job: Option<JobId>, caps: &Capabilities) -> Vec<VmAction> {
    VmAction::ALL
        .iter()
        .copied()
        .filter(|action| match action.job_kind() {
            None if status == VmStatus::Deleted => false,
            None if *action == VmAction::Update => true,
            None => {
                job.is_none()
                    && status == VmStatus::Active
                    && ConsoleProtocol::ALL.iter().any(|p| p.capability().of(caps))
            }
            Some(kind) => {
                accept(kind, status, job).is_ok()
                    && missing(required_capabilities(kind, status), caps).is_none()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every snapshot state for a revert and a delete, as literal rows.
    #[test]
    fn snapshot_operations_take_snapshots_in_the_states_they_allow() {
        use JobKind::{SnapshotDelete as Del, SnapshotRevert as Rev};
        use SnapshotRefusal::{Gone, WrongState};
        use SnapshotStatus::*;
        type Row = (JobKind, SnapshotStatus, Result<Option<SnapshotStatus>, SnapshotRefusal>);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (Rev, Creating,  Err(WrongState(Creating))),
            (Rev, Available, Ok(None)),
            (Rev, Error,     Err(WrongState(Error))),
            (Rev, Removing,  Err(WrongState(Removing))),
            (Rev, Removed,   Err(Gone)),
            (Del, Creating,  Err(WrongState(Creating))),
            (Del, Available, Ok(Some(Removing))),
            (Del, Error,     Ok(Some(Removing))),
            (Del, Removing,  Err(WrongState(Removing))),
            (Del, Removed,   Err(Gone)),
        ];
        for &(kind, status, expected) in rows {
            assert_eq!(accept_snapshot(kind, status), expected, "{kind} on a snapshot {status}");
        }
    }

    fn size(flavor: &str, n: u32) -> Size {
        Size { flavor: flavor.to_owned(), vcpus: n, memory_mib: 512 * n, disk_gib: 10 * n }
    }

    fn params(kind: JobKind) -> JobParams {
        match kind {
            JobKind::StopVm => JobParams::Stop { force: false, timeout_seconds: 0 },
            JobKind::RebootVm => JobParams::Reboot { hard: true },
            JobKind::ResizeVm => JobParams::Resize { from: size("small", 1), to: size("large", 2) },
            JobKind::MigrateVm => JobParams::Migrate { from: "h1".into(), to: "h2".into(), live: true },
            JobKind::RecoverVm => JobParams::Recover { from: "h1".into(), to: Some("h2".into()) },
            _ => JobParams::None,
        }
    }

    /// What every outcome of every kind does, from every state the kind is
    /// accepted from, as literal rows: kind, prior state, outcome -> job
    /// state, VM state, VM error, usage event, snapshot state, consoles
    /// revoked, requeued, size restored, host restored.
    #[test]
    fn steps_parse_from_their_recorded_names() {
        for &step in Step::ALL {
            assert_eq!(Step::parse(step.as_str()), Some(step));
        }
        assert_eq!(Step::parse("provider.create"), Some(Step::Create));
        assert_eq!(Step::parse("provider.teleport"), None);
        let kinds: usize = JobKind::ALL.iter().map(|k| k.steps().len()).sum();
        assert!(kinds >= Step::ALL.len(), "every step belongs to some kind");
    }

    #[test]
    fn a_web_console_is_the_first_page_the_provider_offers() {
        let caps = |flags: &[Capability]| {
            let mut c = Capabilities::default();
            for f in flags {
                match f {
                    Capability::ConsoleVnc => c.supports_console_vnc = true,
                    Capability::ConsoleSpice => c.supports_console_spice = true,
                    Capability::ConsoleSerial => c.supports_console_serial = true,
                    _ => {}
                }
            }
            c
        };
        use Capability as C;
        use ConsoleProtocol as P;
        for (offered, page) in [
            (&[C::ConsoleVnc, C::ConsoleSpice, C::ConsoleSerial][..], P::Vnc),
            (&[C::ConsoleSpice, C::ConsoleSerial][..], P::Spice),
            (&[C::ConsoleSerial][..], P::Serial),
            (&[][..], P::Vnc),
        ] {
            assert_eq!(ConsoleType::Web.protocol(&caps(offered)), page, "{offered:?}");
        }
        assert_eq!(ConsoleType::Protocol(P::Rdp).protocol(&caps(&[])), P::Rdp);
        assert_eq!(ConsoleType::parse("WEB"), Some(ConsoleType::Web));
        assert_eq!(ConsoleType::parse("serial"), Some(ConsoleType::Protocol(P::Serial)));
        assert_eq!(ConsoleType::parse("telnet"), None);
        assert_eq!(ConsoleType::names().collect::<Vec<_>>(), ["vnc", "spice", "rdp", "serial", "web"]);
    }

    #[test]
    fn console_revocations_say_why() {
        use JobStatus as J;
        for (kind, job, why) in [
            (JobKind::StopVm, J::Succeeded, "the vm was stopped"),
            (JobKind::DeleteVm, J::Succeeded, "the vm was deleted"),
            (JobKind::MigrateVm, J::Succeeded, "the vm moved to another host"),
            (JobKind::RecoverVm, J::Succeeded, "the vm moved to another host"),
            (JobKind::StopVm, J::Failed, "the vm is in error"),
            (JobKind::DeleteVm, J::Failed, "the vm is in error"),
        ] {
            assert_eq!(console_revocation(kind, job), why, "{kind:?} {job:?}");
        }
    }

    #[test]
    fn every_kind_outcome_and_prior_state() {
        use ErrorCode as E;
        use JobKind as K;
        use JobStatus as J;
        use Metering as M;
        use SnapshotStatus as S;
        use VmStatus as V;
        const OK: Outcome = Outcome::Succeeded { power: None };
        const OK_ON: Outcome = Outcome::Succeeded { power: Some(Power::Running) };
        const OK_OFF: Outcome = Outcome::Succeeded { power: Some(Power::Off) };
        const FAIL: Outcome = Outcome::Failed(ErrorCode::ProviderError);
        const RETRY: Outcome = Outcome::Retry(ErrorCode::ProviderUnavailable);
        const CANCEL: Outcome = Outcome::Cancelled;
        type Row = (
            JobKind,
            Option<VmStatus>,
            Outcome,
            JobStatus,
            Option<VmStatus>,
            Option<ErrorCode>,
            Option<Metering>,
            Option<SnapshotStatus>,
            bool,
            bool,
            bool,
            bool,
        );
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (K::CreateVm,       None,             OK,     J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::CreateVm,       None,             OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::CreateVm,       None,             OK_OFF, J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::CreateVm,       None,             FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            (K::CreateVm,       None,             RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::CreateVm,       None,             CANCEL, J::Cancelled, Some(V::Error),   Some(E::Cancelled),     None,             None,               false, false, false, false),
            (K::StartVm,        Some(V::Stopped), OK,     J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            // A capture only reads the disk: whatever happens, the VM is
            // as it was (the image takes the failure).
            (K::CaptureVm,      Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::CaptureVm,      Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::CaptureVm,      Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::CaptureVm,      Some(V::Stopped), FAIL,   J::Failed,    Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::CaptureVm,      Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::CaptureVm,      Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::StartVm,        Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::StartVm,        Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::StartVm,        Some(V::Error),   OK,     J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Error),   OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Error),   OK_OFF, J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::StartVm,        Some(V::Error),   FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            (K::StartVm,        Some(V::Error),   RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::StartVm,        Some(V::Error),   CANCEL, J::Cancelled, Some(V::Error),   Some(E::Cancelled),     None,             None,               false, false, false, false),
            (K::StopVm,         Some(V::Active),  OK,     J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               true,  false, false, false),
            (K::StopVm,         Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::StopVm,         Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::StopVm,         Some(V::Error),   OK,     J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Error),   OK_ON,  J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Error),   OK_OFF, J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               true,  false, false, false),
            (K::StopVm,         Some(V::Error),   FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               true,  false, false, false),
            (K::StopVm,         Some(V::Error),   RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::StopVm,         Some(V::Error),   CANCEL, J::Cancelled, Some(V::Error),   Some(E::Cancelled),     None,             None,               false, false, false, false),
            (K::RebootVm,       Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::RebootVm,       Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::RebootVm,       Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::RebootVm,       Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            (K::RebootVm,       Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::RebootVm,       Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, true,  false),
            (K::ResizeVm,       Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::ResizeVm,       Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, true,  false),
            (K::ResizeVm,       Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Stopped), None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   Some(M::Resized), None,               false, false, false, false),
            (K::ResizeVm,       Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, true,  false),
            (K::ResizeVm,       Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::ResizeVm,       Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, true,  false),
            (K::DeleteVm,       Some(V::Active),  OK,     J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::DeleteVm,       Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::DeleteVm,       Some(V::Stopped), OK,     J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::DeleteVm,       Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::DeleteVm,       Some(V::Error),   OK,     J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Error),   OK_ON,  J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Error),   OK_OFF, J::Succeeded, Some(V::Deleted), None,                   Some(M::Deleted), None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Error),   FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               true,  false, false, false),
            (K::DeleteVm,       Some(V::Error),   RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::DeleteVm,       Some(V::Error),   CANCEL, J::Cancelled, Some(V::Error),   Some(E::Cancelled),     None,             None,               false, false, false, false),
            (K::SnapshotCreate, Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotCreate, Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotCreate, Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Available), false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotCreate, Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  OK,     J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Stopped), None,                   Some(M::Stopped), None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotRevert, Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotRevert, Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotDelete, Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   None,             Some(S::Removed),   false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             Some(S::Error),     false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::SnapshotDelete, Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             Some(S::Error),     false, false, false, false),
            (K::MigrateVm,      Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Active),  FAIL,   J::Failed,    Some(V::Active),  None,                   None,             None,               false, false, false, true),
            (K::MigrateVm,      Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::MigrateVm,      Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, true),
            (K::MigrateVm,      Some(V::Stopped), OK,     J::Succeeded, Some(V::Stopped), None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Stopped), OK_ON,  J::Succeeded, Some(V::Stopped), None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Stopped), OK_OFF, J::Succeeded, Some(V::Stopped), None,                   None,             None,               true,  false, false, false),
            (K::MigrateVm,      Some(V::Stopped), FAIL,   J::Failed,    Some(V::Stopped), None,                   None,             None,               false, false, false, true),
            (K::MigrateVm,      Some(V::Stopped), RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::MigrateVm,      Some(V::Stopped), CANCEL, J::Cancelled, Some(V::Stopped), None,                   None,             None,               false, false, false, true),
            (K::RecoverVm,      Some(V::Active),  OK,     J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Active),  OK_ON,  J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Active),  OK_OFF, J::Succeeded, Some(V::Active),  None,                   None,             None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Active),  FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, true),
            (K::RecoverVm,      Some(V::Active),  RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::RecoverVm,      Some(V::Active),  CANCEL, J::Cancelled, Some(V::Active),  None,                   None,             None,               false, false, false, true),
            (K::RecoverVm,      Some(V::Error),   OK,     J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Error),   OK_ON,  J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Error),   OK_OFF, J::Succeeded, Some(V::Active),  None,                   Some(M::Started), None,               true,  false, false, false),
            (K::RecoverVm,      Some(V::Error),   FAIL,   J::Failed,    Some(V::Error),   Some(E::ProviderError), None,             None,               false, false, false, true),
            (K::RecoverVm,      Some(V::Error),   RETRY,  J::Queued,    None,             None,                   None,             None,               false, true,  false, false),
            (K::RecoverVm,      Some(V::Error),   CANCEL, J::Cancelled, Some(V::Error),   Some(E::Cancelled),     None,             None,               false, false, false, true),
        ];
        for &(kind, prior, outcome, job, vm, vm_error, metering, snapshot, revoke, requeue, size, host) in
            rows
        {
            let expected = Transition {
                job,
                vm,
                vm_error,
                vm_size: size.then(|| self::size("small", 1)),
                vm_host: host.then(|| "h1".to_owned()),
                snapshot,
                metering,
                revoke_consoles: revoke,
                requeue,
                volume: None,
                release_volumes: kind == JobKind::DeleteVm && job == JobStatus::Succeeded,
                sync_boot_volume: kind == JobKind::ResizeVm && job == JobStatus::Succeeded,
                image: None,
            };
            let got = transition(kind, outcome, prior, &params(kind));
            assert_eq!(got, expected, "{kind} {outcome:?} from {prior:?}");
            // What every row keeps: an error is recorded exactly when the VM
            // ends in ERROR, only a retry keeps the VM held, and a finished
            // job releases it.
            assert_eq!(got.vm_error.is_some(), got.vm == Some(VmStatus::Error), "{kind} {outcome:?}");
            assert_eq!(got.requeue, got.vm.is_none(), "{kind} {outcome:?}");
            assert!(got.vm.is_none_or(|s| !s.is_transitional()), "{kind} {outcome:?}");
        }
        // Every state each kind is accepted from has its six rows (volume
        // kinds have theirs in `volume.rs`).
        for &kind in JobKind::ALL.iter().filter(|k| !k.is_volume_job() && !k.is_image_job()) {
            let priors: Vec<Option<VmStatus>> = if kind == JobKind::CreateVm {
                vec![None]
            } else {
                kind.allowed_from().iter().copied().map(Some).collect()
            };
            for prior in priors {
                for outcome in [OK, OK_ON, OK_OFF, FAIL, RETRY, CANCEL] {
                    let n = rows.iter().filter(|r| (r.0, r.1, r.2) == (kind, prior, outcome)).count();
                    assert_eq!(n, 1, "{kind} {outcome:?} from {prior:?} has {n} rows");
                }
            }
        }
    }

    #[test]
    fn a_job_interrupted_while_running_leaves_the_vm_per_kind_and_step() {
        use ErrorCode as E;
        use JobKind as K;
        use Metering as M;
        use SnapshotStatus as S;
        use Step as P;
        use VmStatus as V;
        // kind, prior, interrupted step, vm, vm error, metering, snapshot,
        // revoke consoles, size restored, host restored, volumes released.
        type Row = (
            JobKind,
            Option<VmStatus>,
            Step,
            VmStatus,
            Option<ErrorCode>,
            Option<Metering>,
            Option<SnapshotStatus>,
            bool,
            bool,
            bool,
            bool,
        );
        const C: Option<ErrorCode> = Some(E::Cancelled);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (K::CreateVm,       None,             P::Create,         V::Error,   C,    None,             None,           false, false, false, false),
            (K::CreateVm,       None,             P::Start,          V::Error,   C,    None,             None,           false, false, false, false),
            (K::StartVm,        Some(V::Stopped), P::Start,          V::Error,   C,    None,             None,           false, false, false, false),
            (K::StartVm,        Some(V::Error),   P::Start,          V::Error,   C,    None,             None,           false, false, false, false),
            (K::StopVm,         Some(V::Active),  P::Stop,           V::Error,   C,    None,             None,           true,  false, false, false),
            (K::StopVm,         Some(V::Error),   P::Stop,           V::Error,   C,    None,             None,           true,  false, false, false),
            (K::RebootVm,       Some(V::Active),  P::Reboot,         V::Active,  None, None,             None,           false, false, false, false),
            (K::ResizeVm,       Some(V::Active),  P::Resize,         V::Error,   C,    None,             None,           false, true,  false, false),
            (K::ResizeVm,       Some(V::Stopped), P::Resize,         V::Error,   C,    None,             None,           false, true,  false, false),
            (K::DeleteVm,       Some(V::Active),  P::Delete,         V::Error,   C,    None,             None,           true,  false, false, false),
            (K::DeleteVm,       Some(V::Stopped), P::Delete,         V::Error,   C,    None,             None,           true,  false, false, false),
            (K::DeleteVm,       Some(V::Error),   P::Delete,         V::Error,   C,    None,             None,           true,  false, false, false),
            // The VM is gone already; only its boot volume's removal was cut.
            (K::DeleteVm,       Some(V::Active),  P::VolumeDelete,   V::Deleted, None, Some(M::Deleted), None,           true,  false, false, true),
            (K::DeleteVm,       Some(V::Stopped), P::VolumeDelete,   V::Deleted, None, Some(M::Deleted), None,           true,  false, false, true),
            (K::DeleteVm,       Some(V::Error),   P::VolumeDelete,   V::Deleted, None, Some(M::Deleted), None,           true,  false, false, true),
            (K::SnapshotCreate, Some(V::Active),  P::SnapshotCreate, V::Active,  None, None,             Some(S::Error), false, false, false, false),
            (K::SnapshotCreate, Some(V::Stopped), P::SnapshotCreate, V::Stopped, None, None,             Some(S::Error), false, false, false, false),
            (K::SnapshotRevert, Some(V::Active),  P::SnapshotRevert, V::Error,   C,    None,             None,           false, false, false, false),
            (K::SnapshotRevert, Some(V::Stopped), P::SnapshotRevert, V::Error,   C,    None,             None,           false, false, false, false),
            (K::SnapshotDelete, Some(V::Active),  P::SnapshotDelete, V::Active,  None, None,             Some(S::Error), false, false, false, false),
            (K::SnapshotDelete, Some(V::Stopped), P::SnapshotDelete, V::Stopped, None, None,             Some(S::Error), false, false, false, false),
            (K::MigrateVm,      Some(V::Active),  P::Migrate,        V::Active,  None, None,             None,           false, false, true,  false),
            (K::MigrateVm,      Some(V::Stopped), P::Migrate,        V::Stopped, None, None,             None,           false, false, true,  false),
            (K::RecoverVm,      Some(V::Active),  P::Migrate,        V::Error,   C,    None,             None,           false, false, true,  false),
            (K::RecoverVm,      Some(V::Active),  P::Start,          V::Error,   C,    None,             None,           false, false, true,  false),
            (K::RecoverVm,      Some(V::Error),   P::Migrate,        V::Error,   C,    None,             None,           false, false, true,  false),
            (K::RecoverVm,      Some(V::Error),   P::Start,          V::Error,   C,    None,             None,           false, false, true,  false),
            // A capture only reads the disk: the VM is as it was.
            (K::CaptureVm,      Some(V::Stopped), P::Capture,        V::Stopped, None, None,             None,           false, false, false, false),
        ];
        for &(kind, prior, step, vm, vm_error, metering, snapshot, revoke, size, host, release) in rows {
            let expected = Transition {
                job: JobStatus::Cancelled,
                vm: Some(vm),
                vm_error,
                vm_size: size.then(|| self::size("small", 1)),
                vm_host: host.then(|| "h1".to_owned()),
                snapshot,
                metering,
                revoke_consoles: revoke,
                requeue: false,
                volume: None,
                release_volumes: release,
                sync_boot_volume: false,
                image: None,
            };
            let got = transition(kind, Outcome::Interrupted(step), prior, &params(kind));
            assert_eq!(got, expected, "{kind} interrupted at {step} from {prior:?}");
            assert_eq!(got.vm_error.is_some(), got.vm == Some(VmStatus::Error), "{kind} {step}");
        }
        // Every state each kind is accepted from has a row for each of its
        // steps (volume kinds have theirs in `volume.rs`).
        for &kind in JobKind::ALL.iter().filter(|k| !k.is_volume_job() && !k.is_image_job()) {
            let priors: Vec<Option<VmStatus>> = if kind == JobKind::CreateVm {
                vec![None]
            } else {
                kind.allowed_from().iter().copied().map(Some).collect()
            };
            for prior in priors {
                for &step in kind.steps() {
                    let n = rows.iter().filter(|r| (r.0, r.1, r.2) == (kind, prior, step)).count();
                    assert_eq!(n, 1, "{kind} interrupted at {step} from {prior:?} has {n} rows");
                }
            }
        }
    }

    #[test]
    fn accept_follows_the_table_and_names_the_job_in_flight() {
        let job = JobId::new();
        for &kind in JobKind::ALL {
            for &status in VmStatus::ALL {
                let got = accept(kind, status, None);
                if kind.allowed_from().contains(&status) {
                    let next = got.unwrap();
                    assert_eq!(next, kind.in_flight_status().unwrap_or(status));
                } else {
                    assert_eq!(got, Err(Refusal::WrongState { allowed: kind.allowed_from() }));
                }
                assert_eq!(accept(kind, status, Some(job)), Err(Refusal::Busy(job)));
            }
        }
        // A transitional state accepts nothing.
        for &status in VmStatus::ALL.iter().filter(|s| s.is_transitional()) {
            assert!(JobKind::ALL.iter().all(|k| accept(*k, status, None).is_err()), "{status}");
        }
    }

    #[test]
    fn resize_needs_the_flag_for_the_vms_power_state() {
        let mut caps = Capabilities { supports_resize: true, ..Default::default() };
        assert_eq!(missing(required_capabilities(JobKind::ResizeVm, VmStatus::Stopped), &caps), None);
        assert_eq!(
            missing(required_capabilities(JobKind::ResizeVm, VmStatus::Active), &caps),
            Some(Capability::HotResize)
        );
        caps.supports_snapshot = true;
        assert_eq!(
            missing(required_capabilities(JobKind::SnapshotCreate, VmStatus::Active), &caps),
            Some(Capability::SnapshotRunning)
        );
        assert_eq!(missing(required_capabilities(JobKind::SnapshotCreate, VmStatus::Stopped), &caps), None);
    }

    #[test]
    fn allowed_actions_agree_with_accept() {
        let all = Capabilities {
            supports_snapshot: true,
            supports_snapshot_running: true,
            supports_resize: true,
            supports_hot_resize: true,
            supports_console_vnc: true,
            ..Default::default()
        };
        let names = |v: Vec<VmAction>| v.into_iter().map(VmAction::as_str).collect::<Vec<_>>();
        assert_eq!(
            names(allowed_actions(VmStatus::Active, None, &all)),
            [
                "update",
                "stop",
                "force_stop",
                "reboot",
                "hard_reboot",
                "resize",
                "snapshot",
                "console",
                "delete"
            ]
        );
        assert_eq!(
            names(allowed_actions(VmStatus::Stopped, None, &Capabilities::default())),
            ["update", "start", "delete"]
        );
        assert_eq!(names(allowed_actions(VmStatus::Active, Some(JobId::new()), &all)), ["update"]);
        assert!(allowed_actions(VmStatus::Deleted, None, &all).is_empty());
        // An action is listed exactly when its operation would be accepted.
        for &status in VmStatus::ALL {
            for caps in [Capabilities::default(), all.clone()] {
                let listed = allowed_actions(status, None, &caps);
                for &action in VmAction::ALL {
                    let Some(kind) = action.job_kind() else { continue };
                    let ok = accept(kind, status, None).is_ok()
                        && missing(required_capabilities(kind, status), &caps).is_none();
                    assert_eq!(listed.contains(&action), ok, "{action:?} on {status}");
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for &c in Capability::ALL {
            assert!(c.flag().starts_with("supports_"));
        }
        for &p in ConsoleProtocol::ALL {
            assert_eq!(ConsoleProtocol::parse(&p.as_str().to_uppercase()), Some(p));
        }
        assert_eq!(ConsoleProtocol::parse("telnet"), None);
        for &k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            for s in k.steps() {
                assert!(s.as_str().starts_with("provider."));
            }
        }
        let p = JobParams::Resize { from: size("a", 1), to: size("b", 2) };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<JobParams>(&text).unwrap(), p);
    }
}
