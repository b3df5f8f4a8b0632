//! Core's domain types: what the store persists and the API and job engine
//! reason about. Conversions to the wire types live in `api::convert`, so this
//! module does not depend on the proto's shape.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use hcp_proto::error::ErrorCode;
use hcp_proto::ids::{JobId, ProviderId, VmId, VolumeId};
use serde::{Deserialize, Serialize};

/// Returns the current time at the precision both store backends keep
/// (microseconds), so a value read back equals the value written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The stored and wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the stored spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// A VM's lifecycle state (see `hcp.tenant.v1.VmStatus`).
    VmStatus {
        /// Accepted; the create job has not finished.
        Pending = "PENDING",
        /// Running.
        Active = "ACTIVE",
        /// Defined but powered off.
        Stopped = "STOPPED",
        /// The last operation failed.
        Error = "ERROR",
        /// Gone from the hypervisor.
        Deleted = "DELETED",
        /// A start job is in flight.
        Starting = "STARTING",
        /// A stop job is in flight.
        Stopping = "STOPPING",
        /// A reboot job is in flight.
        Rebooting = "REBOOTING",
        /// A resize job is in flight.
        Resizing = "RESIZING",
        /// A delete job is in flight.
        Deleting = "DELETING",
    }
);

string_enum!(
    /// A job's state.
    JobStatus {
        /// Waiting for a worker (possibly until `run_after`).
        Queued = "QUEUED",
        /// Leased by a worker.
        Running = "RUNNING",
        /// Finished successfully.
        Succeeded = "SUCCEEDED",
        /// Finished with an error.
        Failed = "FAILED",
        /// Cancelled before it ran.
        Cancelled = "CANCELLED",
    }
);

string_enum!(
    /// What a job does.
    JobKind {
        /// Create and start a VM.
        CreateVm = "vm.create",
        /// Start a stopped VM.
        StartVm = "vm.start",
        /// Stop a running VM.
        StopVm = "vm.stop",
        /// Reboot a running VM.
        RebootVm = "vm.reboot",
        /// Give a VM another flavor.
        ResizeVm = "vm.resize",
        /// Delete a VM.
        DeleteVm = "vm.delete",
        /// Snapshot a VM.
        SnapshotCreate = "snapshot.create",
        /// Return a VM to a snapshot.
        SnapshotRevert = "snapshot.revert",
        /// Delete a snapshot.
        SnapshotDelete = "snapshot.delete",
        /// Move a VM to another host of its provider (operators).
        MigrateVm = "vm.migrate",
        /// Start a VM found down that should run, on another host when its
        /// own is down (the reconciler, by the VM's restart policy).
        RecoverVm = "vm.recover",
        /// Create a volume.
        CreateVolume = "volume.create",
        /// Delete a detached volume.
        DeleteVolume = "volume.delete",
        /// Grow a volume.
        ExtendVolume = "volume.extend",
        /// Attach a volume to a VM.
        AttachVolume = "volume.attach",
        /// Detach a volume from a VM.
        DetachVolume = "volume.detach",
        /// Make a private image of a stopped VM's root disk.
        CaptureVm = "vm.capture",
        /// Fetch an image from a URL and store it on providers (operators).
        ImportImage = "image.import",
        /// Remove an image from the providers that store it.
        DeleteImage = "image.delete",
    }
);

string_enum!(
    /// Where an image is in its life (see `hcp.common.v1.ImageStatus`).
    ImageStatus {
        /// An import or a capture runs.
        Importing = "IMPORTING",
        /// Usable for creates.
        Available = "AVAILABLE",
        /// The import, capture or deletion failed.
        Error = "ERROR",
        /// Being removed from its providers.
        Deleting = "DELETING",
    }
);

string_enum!(
    /// Who sees an image.
    ImageVisibility {
        /// Every tenant.
        Public = "PUBLIC",
        /// One project.
        Private = "PRIVATE",
    }
);

string_enum!(
    /// A CPU architecture images are built for.
    Architecture {
        /// 64-bit x86.
        X86_64 = "x86_64",
        /// 64-bit ARM.
        Aarch64 = "aarch64",
    }
);

string_enum!(
    /// A volume's lifecycle state (see `hcp.tenant.v1.Volume.Status`).
    VolumeStatus {
        /// Accepted; the create job has not finished.
        Creating = "CREATING",
        /// Ready and attached to nothing.
        Available = "AVAILABLE",
        /// An attach job is in flight.
        Attaching = "ATTACHING",
        /// Attached to a VM.
        InUse = "IN_USE",
        /// A detach job is in flight.
        Detaching = "DETACHING",
        /// An extend job is in flight.
        Extending = "EXTENDING",
        /// A delete job is in flight.
        Deleting = "DELETING",
        /// The last operation failed.
        Error = "ERROR",
        /// Gone from the hypervisor.
        Deleted = "DELETED",
    }
);

string_enum!(
    /// What HCP does about a VM found down while it should run.
    RestartPolicy {
        /// Nothing (the reconciler's power policy applies).
        Never = "never",
        /// Start it when it crashed or its host was lost.
        OnFailure = "on-failure",
        /// Start it whenever it is found down.
        Always = "always",
    }
);

string_enum!(
    /// A placement group's rule.
    GroupPolicy {
        /// Members on one host.
        Affinity = "affinity",
        /// Members on different hosts.
        AntiAffinity = "anti-affinity",
    }
);

string_enum!(
    /// A host's state as its provider reports it.
    HostState {
        /// Accepting VMs.
        Up = "UP",
        /// Failed or unreachable.
        Down = "DOWN",
        /// In the hypervisor's own maintenance mode.
        Maintenance = "MAINTENANCE",
    }
);

string_enum!(
    /// HCP's maintenance of a host.
    Drain {
        /// In service.
        InService = "",
        /// No new placements; its VMs are being moved off.
        Draining = "DRAINING",
        /// No new placements; nothing of HCP's left on it.
        Drained = "DRAINED",
    }
);

string_enum!(
    /// How a zone chooses among hosts that fit.
    PlacementPolicy {
        /// The least-loaded host first.
        Spread = "spread",
        /// The fullest host that fits first.
        Pack = "pack",
    }
);

/// A host of a provider, as last reported, with HCP's drain state.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// The provider.
    pub provider_id: ProviderId,
    /// Unique within the provider.
    pub name: String,
    /// Physical vCPUs.
    pub vcpus: u32,
    /// Physical memory.
    pub memory_mib: u64,
    /// As reported.
    pub state: HostState,
    /// HCP's maintenance.
    pub drain: Drain,
    /// When the current drain began.
    pub drain_started_at: Option<DateTime<Utc>>,
    /// Last report.
    pub updated_at: DateTime<Utc>,
}

/// What is placed on a host: VMs that are not deleted, and their size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLoad {
    /// VMs.
    pub vms: u32,
    /// Their vCPUs.
    pub vcpus: u64,
    /// Their memory.
    pub memory_mib: u64,
}

/// A zone's placement settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ZonePlacement {
    /// The zone.
    pub zone: String,
    /// Spread or pack.
    pub policy: PlacementPolicy,
    /// vCPU overcommit ratio.
    pub cpu_overcommit: f64,
    /// Memory overcommit ratio.
    pub memory_overcommit: f64,
}

/// vCPUs a host takes per physical vCPU unless its zone says otherwise.
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;
/// Memory a host takes per MiB unless its zone says otherwise.
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 1.0;

impl ZonePlacement {
    /// The settings of a zone never configured.
    pub fn defaults(zone: &str) -> Self {
        Self {
            zone: zone.to_owned(),
            policy: PlacementPolicy::Spread,
            cpu_overcommit: DEFAULT_CPU_OVERCOMMIT,
            memory_overcommit: DEFAULT_MEMORY_OVERCOMMIT,
        }
    }

    /// What a host of this zone may hold: its size times the zone's
    /// overcommit ratios, rounded down.
    pub fn room_of(&self, host: &Host) -> Room {
        let scale = |size: f64, ratio: f64| {
            let r = (size * ratio).floor();
            if r.is_finite() && r > 0.0 { r.min(u64::MAX as f64) as u64 } else { 0 }
        };
        Room {
            vcpus: scale(f64::from(host.vcpus), self.cpu_overcommit),
            memory_mib: scale(host.memory_mib as f64, self.memory_overcommit),
        }
    }
}

/// What a host may hold in all (see [`ZonePlacement::room_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory.
    pub memory_mib: u64,
}

impl Room {
    /// Whether a host holding `load` (vCPUs, memory) can take `vcpus` and
    /// `memory_mib` more.
    pub fn admits(&self, load: (u64, u64), vcpus: u64, memory_mib: u64) -> bool {
        load.0.saturating_add(vcpus) <= self.vcpus && load.1.saturating_add(memory_mib) <= self.memory_mib
    }
}

string_enum!(
    /// What a webhook endpoint can be told about (`event_types`); the
    /// spelling is the `type` of the payload and the `HCP-Event-Type`
    /// header.
    WebhookEvent {
        /// A job ended (succeeded, failed or cancelled).
        JobFinished = "job.finished",
        /// A VM's status changed: a job left it in a new state, or the
        /// reconciler corrected it.
        VmStatusChanged = "vm.status_changed",
        /// A volume's status changed: a volume job (create, attach, detach,
        /// extend, delete) left it in a new state.
        VolumeStatusChanged = "volume.status_changed",
    }
);

impl WebhookEvent {
    /// Every event type, in the order of their bits.
    pub const ALL: [WebhookEvent; 3] =
        [WebhookEvent::JobFinished, WebhookEvent::VmStatusChanged, WebhookEvent::VolumeStatusChanged];

    /// The bit this type has in an [`crate::webhook::EventTypes`] set.
    pub fn bit(self) -> i64 {
        match self {
            WebhookEvent::JobFinished => 1,
            WebhookEvent::VmStatusChanged => 2,
            WebhookEvent::VolumeStatusChanged => 4,
        }
    }
}

string_enum!(
    /// Where a webhook delivery stands.
    DeliveryStatus {
        /// Not yet accepted by the receiver (due, or waiting to retry).
        Pending = "PENDING",
        /// The receiver answered 2xx.
        Delivered = "DELIVERED",
    }
);

/// A tenant's SSH public key, imported into a project (HCP never holds the
/// private key). Checked and fingerprinted before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// Owning tenant.
    pub tenant_id: String,
    /// Owning project.
    pub project_id: String,
    /// Unique in the project.
    pub name: String,
    /// One OpenSSH public key line, as imported (trimmed).
    pub public_key: String,
    /// `SHA256:<base64 without padding>`.
    pub fingerprint: String,
    /// The OpenSSH algorithm name (`ssh-ed25519`, ...).
    pub key_type: String,
    /// The key's size in bits.
    pub bits: u32,
    /// The line's comment (empty when none).
    pub comment: String,
    /// When imported.
    pub created_at: DateTime<Utc>,
}

/// A key a VM was created with: the key pair's name and its public key as
/// it was when the create was accepted (kept with the VM's desired state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmKey {
    /// The key pair's name.
    pub name: String,
    /// Its OpenSSH public key line.
    pub public_key: String,
}

/// A tenant's placement group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementGroup {
    /// Id.
    pub id: hcp_proto::ids::PlacementGroupId,
    /// Owning tenant.
    pub tenant_id: String,
    /// Owning project.
    pub project_id: String,
    /// Unique in the project.
    pub name: String,
    /// Together or apart.
    pub policy: GroupPolicy,
    /// Refuse what cannot be satisfied (else a preference).
    pub strict: bool,
    /// When created.
    pub created_at: DateTime<Utc>,
}

string_enum!(
    /// How the reconciler cleaned a force-deleted VM's leftover on its
    /// provider.
    LeftoverCleanup {
        /// The provider still had the VM; it was deleted there.
        Removed = "removed",
        /// The provider no longer had it.
        Absent = "absent",
    }
);

string_enum!(
    /// A snapshot's state.
    SnapshotStatus {
        /// Its create job has not finished.
        Creating = "CREATING",
        /// Usable.
        Available = "AVAILABLE",
        /// The last operation on it failed.
        Error = "ERROR",
        /// Its delete job has not finished.
        Removing = "REMOVING",
        /// Deleted.
        Removed = "REMOVED",
    }
);

/// A network attachment as stored, with what the hypervisor last reported
/// of its NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// Network name as the zone publishes it.
    pub network: String,
    /// The NIC's MAC, once reported.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// IPv4 addresses last reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv4: Vec<String>,
    /// IPv6 addresses last reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<String>,
}

/// Where a tenant-facing call operates: a tenant and one of its projects.
/// Store calls take it whole, so the two cannot be swapped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The tenant (from the token).
    pub tenant: String,
    /// The project (from the request, granted by the token).
    pub project: String,
}

impl Scope {
    /// Makes a scope from ids already checked against the caller's grants.
    pub fn new(tenant: impl Into<String>, project: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), project: project.into() }
    }
}

/// A VM row.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    /// HCP id, also the key on the provider.
    pub id: VmId,
    /// Owning tenant (from the creator's token).
    pub tenant_id: String,
    /// Owning project.
    pub project_id: String,
    /// Tenant-chosen name.
    pub name: String,
    /// Flavor name, and the size it stood for at creation.
    pub flavor: String,
    /// vCPUs from the flavor.
    pub vcpus: u32,
    /// Memory from the flavor.
    pub memory_mib: u32,
    /// Disk from the flavor.
    pub disk_gib: u32,
    /// Image name.
    pub image: String,
    /// Image source as providers know it, resolved at creation.
    pub image_source: String,
    /// Zone the VM was placed in.
    pub zone: String,
    /// Provider the VM was placed on. Never shown to tenants.
    pub provider_id: ProviderId,
    /// Host of the provider it is on (or moving to); empty when the
    /// provider reports no hosts. Never shown to tenants.
    pub host: String,
    /// What to do when it is found down while it should run.
    pub restart_policy: RestartPolicy,
    /// Its placement group.
    pub placement_group_id: Option<hcp_proto::ids::PlacementGroupId>,
    /// Network attachments.
    pub networks: Vec<NetworkAttachment>,
    /// Tenant metadata.
    pub metadata: BTreeMap<String, String>,
    /// Tenant tags.
    pub tags: Vec<String>,
    /// cloud-init user data.
    pub user_data: Option<String>,
    /// SSH keys the guest authorizes, resolved from key pairs at create.
    pub ssh_keys: Vec<VmKey>,
    /// Guest hostname.
    pub hostname: String,
    /// Lifecycle state.
    pub status: VmStatus,
    /// Job operating on the VM, if any.
    pub current_job_id: Option<JobId>,
    /// Error code of the last failure, while status is ERROR.
    pub error_code: Option<ErrorCode>,
    /// Error message of the last failure.
    pub error_message: Option<String>,
    /// When accepted.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Where a volume is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// The VM.
    pub vm_id: VmId,
    /// Its place among the VM's data disks, from 1 (the provider's slot).
    pub device_index: u32,
}

/// A volume row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// HCP id, also the key on the provider.
    pub id: VolumeId,
    /// Owning tenant.
    pub tenant_id: String,
    /// Owning project.
    pub project_id: String,
    /// Tenant-chosen name.
    pub name: String,
    /// Size now (a pending extend's target from its acceptance).
    pub size_gib: u32,
    /// Zone it lives in.
    pub zone: String,
    /// Its type's name.
    pub volume_type: String,
    /// The provider holding it. Never shown to tenants.
    pub provider_id: ProviderId,
    /// The storage it was created in on that provider (the type's entry
    /// for the provider; empty: the provider's default).
    pub storage: String,
    /// The host whose storage holds it, on providers whose volumes are
    /// host-local; empty otherwise, and until its first attachment.
    pub host: String,
    /// The hypervisor's name for it once created there; `None` while it
    /// exists only in HCP (a host-local volume before its first
    /// attachment).
    pub native_id: Option<String>,
    /// Lifecycle state.
    pub status: VolumeStatus,
    /// Where it is attached (an attach in flight included).
    pub attachment: Option<Attachment>,
    /// Deleted with the VM it is the boot volume of.
    pub delete_on_vm_delete: bool,
    /// Job operating on the volume, if any.
    pub current_job_id: Option<JobId>,
    /// Error code of the last failure, while status is ERROR.
    pub error_code: Option<ErrorCode>,
    /// Error message of the last failure.
    pub error_message: Option<String>,
    /// Tenant metadata.
    pub metadata: BTreeMap<String, String>,
    /// Tenant tags.
    pub tags: Vec<String>,
    /// When accepted.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A volume type of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeType {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The largest volume of the type.
    pub max_size_gib: u32,
    /// Provider name -> storage on it.
    pub storage: BTreeMap<String, String>,
    /// When created.
    pub created_at: DateTime<Utc>,
}

impl VolumeType {
    /// Where volumes of this type live on `provider` (empty: its default).
    pub fn storage_on(&self, provider: &str) -> &str {
        self.storage.get(provider).map(String::as_str).unwrap_or("")
    }
}

/// A job row.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Job id.
    pub id: JobId,
    /// Tenant of the VM.
    pub tenant_id: String,
    /// Project of the VM.
    pub project_id: String,
    /// Operation.
    pub kind: JobKind,
    /// VM operated on (or held: an attach, a detach, an extend of a volume
    /// attached to it); `None` for a volume job that holds no VM.
    pub vm_id: Option<VmId>,
    /// Volume operated on, for volume jobs.
    pub volume_id: Option<VolumeId>,
    /// Image made or removed, for image jobs and captures.
    pub image_id: Option<hcp_proto::ids::ImageId>,
    /// State.
    pub status: JobStatus,
    /// Attempts started.
    pub attempts: u32,
    /// Most attempts allowed.
    pub max_attempts: u32,
    /// Not run before this time (retry backoff).
    pub run_after: DateTime<Utc>,
    /// Worker holding the lease.
    pub lease_owner: Option<String>,
    /// When the lease lapses unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Error code when failed (or of the last failed attempt).
    pub error_code: Option<ErrorCode>,
    /// Error message.
    pub error_message: Option<String>,
    /// Who asked for it (JWT subject).
    pub actor: String,
    /// W3C traceparent of the request that created it.
    pub traceparent: Option<String>,
    /// When accepted.
    pub created_at: DateTime<Utc>,
    /// First attempt start.
    pub started_at: Option<DateTime<Utc>>,
    /// Completion.
    pub finished_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The VM's status when the operation was accepted (None for creates).
    pub prior_status: Option<VmStatus>,
    /// The volume's status when a volume job was accepted (None for
    /// creates).
    pub prior_volume_status: Option<VolumeStatus>,
    /// The snapshot a snapshot job operates on.
    pub snapshot_id: Option<hcp_proto::ids::SnapshotId>,
    /// What the job was asked to do beyond its kind.
    pub params: crate::lifecycle::JobParams,
    /// The request's X-Request-Id, or its trace id.
    pub request_id: String,
    /// When a cancellation of the running job was asked for (the worker
    /// holding it stops the running step and finishes it CANCELLED).
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Who asked for the cancellation.
    pub cancel_requested_by: Option<String>,
}

impl Job {
    /// A job for `kind` on `vm`, queued now.
    pub fn queued(
        kind: JobKind,
        scope: &Scope,
        vm: Option<VmId>,
        actor: &str,
        max_attempts: u32,
        traceparent: Option<String>,
        request_id: &str,
    ) -> Self {
        let t = now();
        Job {
            id: JobId::new(),
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            kind,
            vm_id: vm,
            volume_id: None,
            image_id: None,
            status: JobStatus::Queued,
            attempts: 0,
            max_attempts,
            run_after: t,
            lease_owner: None,
            lease_expires_at: None,
            error_code: None,
            error_message: None,
            actor: actor.to_owned(),
            traceparent,
            created_at: t,
            started_at: None,
            finished_at: None,
            updated_at: t,
            prior_status: None,
            prior_volume_status: None,
            snapshot_id: None,
            params: crate::lifecycle::JobParams::None,
            request_id: request_id.to_owned(),
            cancel_requested_at: None,
            cancel_requested_by: None,
        }
    }
}

/// A snapshot row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Id, also the key on the provider.
    pub id: hcp_proto::ids::SnapshotId,
    /// The VM.
    pub vm_id: VmId,
    /// Tenant-chosen name.
    pub name: String,
    /// State.
    pub status: SnapshotStatus,
    /// When accepted.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A flavor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flavor {
    /// Unique name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Root disk.
    pub disk_gib: u32,
    /// Free text.
    pub description: String,
    /// When created.
    pub created_at: DateTime<Utc>,
}

/// An image of the catalog: public (the operators') or private to one
/// project (a capture), with what each provider resolves it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// HCP's id.
    pub id: hcp_proto::ids::ImageId,
    /// Name, unique among public images and within a project's private ones.
    pub name: String,
    /// Public, or private to `tenant_id`/`project_id`.
    pub visibility: ImageVisibility,
    /// A private image's tenant; empty for public ones.
    pub tenant_id: String,
    /// A private image's project; empty for public ones.
    pub project_id: String,
    /// Where it is in its life.
    pub status: ImageStatus,
    /// OS family.
    pub os_type: String,
    /// OS version.
    pub os_version: String,
    /// CPU architecture.
    pub architecture: Architecture,
    /// The backing of every provider without its own in `backings`; empty:
    /// none.
    pub source: String,
    /// Provider name -> what it resolves there.
    pub backings: BTreeMap<String, ImageBacking>,
    /// Smallest disk.
    pub min_disk_gib: u32,
    /// Smallest memory.
    pub min_memory_mib: u32,
    /// Free text.
    pub description: String,
    /// Bytes HCP stored (after conversion); 0 for operator-made backings.
    pub size_bytes: u64,
    /// SHA-256 of the imported file.
    pub sha256: String,
    /// Why it is in ERROR.
    pub error_message: Option<String>,
    /// The job importing, capturing or deleting it.
    pub job_id: Option<JobId>,
    /// The VM a capture was made from.
    pub captured_from: Option<VmId>,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// What one provider resolves an image to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBacking {
    /// What goes in `ImageRef.source`.
    pub source: String,
    /// Whether the provider stored it for HCP (an import or a capture), so
    /// deleting the image removes it there; false for a template or file
    /// the operator made.
    pub stored: bool,
}

impl Image {
    /// A public, AVAILABLE image that every provider resolves to `source`,
    /// with nothing else set (the catalog entry of the simplest kind).
    pub fn public(name: &str, source: &str, at: DateTime<Utc>) -> Self {
        Image {
            id: hcp_proto::ids::ImageId::new(),
            name: name.to_owned(),
            visibility: ImageVisibility::Public,
            tenant_id: String::new(),
            project_id: String::new(),
            status: ImageStatus::Available,
            os_type: "linux".to_owned(),
            os_version: String::new(),
            architecture: Architecture::X86_64,
            source: source.to_owned(),
            backings: BTreeMap::new(),
            min_disk_gib: 0,
            min_memory_mib: 0,
            description: String::new(),
            size_bytes: 0,
            sha256: String::new(),
            error_message: None,
            job_id: None,
            captured_from: None,
            created_at: at,
            updated_at: at,
        }
    }

    /// What `provider` resolves the image to, if it has it.
    pub fn backing_on(&self, provider: &str) -> Option<&str> {
        match self.backings.get(provider) {
            Some(b) => Some(b.source.as_str()),
            None if !self.source.is_empty() => Some(self.source.as_str()),
            None => None,
        }
    }

    /// Whether the image's bytes count against a project's image quota:
    /// private images, at their size rounded up to a whole GiB.
    pub fn quota_gib(&self) -> u64 {
        self.size_bytes.div_ceil(1 << 30)
    }
}

/// A zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// When created.
    pub created_at: DateTime<Utc>,
}

/// A network of a zone, with its mapping onto each provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Name, unique within the zone.
    pub name: String,
    /// Zone.
    pub zone: String,
    /// Free text.
    pub description: String,
    /// Provider name -> what the network is on that provider.
    pub backings: BTreeMap<String, String>,
    /// When created.
    pub created_at: DateTime<Utc>,
}

impl Network {
    /// What the network is on `provider` (its name when not mapped).
    pub fn backing_on(&self, provider: &str) -> &str {
        self.backings.get(provider).map(String::as_str).unwrap_or(&self.name)
    }
}

/// The on-disk format of an image's bytes (`hcp.provider.v1.DiskFormat`),
/// as an import names it and as providers take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU's copy-on-write format.
    Qcow2,
    /// Plain bytes.
    Raw,
    /// VMware's virtual disk.
    Vmdk,
    /// Hyper-V's virtual disk.
    Vhdx,
}

impl DiskFormat {
    /// Every format a provider can take.
    pub const ALL: &'static [DiskFormat] =
        &[DiskFormat::Qcow2, DiskFormat::Raw, DiskFormat::Vmdk, DiskFormat::Vhdx];

    /// The name an import request, `qemu-img` and the catalog use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhdx => "vhdx",
        }
    }

    /// The format named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|f| f.as_str() == s)
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capability flags as stored (mirrors `hcp.provider.v1.Capabilities`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// cloud-init user data.
    pub supports_cloud_init: bool,
    /// Snapshots.
    pub supports_snapshot: bool,
    /// Live migration.
    pub supports_live_migration: bool,
    /// VNC console.
    pub supports_console_vnc: bool,
    /// SPICE console.
    pub supports_console_spice: bool,
    /// RDP console.
    pub supports_console_rdp: bool,
    /// Serial console.
    pub supports_console_serial: bool,
    /// GPU passthrough.
    pub supports_gpu_passthrough: bool,
    /// Snapshots of running VMs.
    pub supports_snapshot_running: bool,
    /// Resize of stopped VMs.
    pub supports_resize: bool,
    /// Resize of running VMs.
    pub supports_hot_resize: bool,
    /// Migration of stopped VMs (and evacuation from a host that is down).
    pub supports_cold_migration: bool,
    /// Volumes (attach and detach on stopped VMs, boot volumes).
    pub supports_volumes: bool,
    /// Attach and detach on running VMs.
    pub supports_hot_attach: bool,
    /// Extending a volume attached to a running VM.
    pub supports_volume_extend_in_use: bool,
    /// Volumes live on one host's storage.
    pub volumes_host_local: bool,
    /// The most data volumes one VM can have attached.
    pub max_volumes_per_vm: u32,
    /// The guest's serial output (boot log).
    pub supports_console_log: bool,
    /// ImportImage and DeleteImage.
    pub supports_image_import: bool,
    /// CaptureImage.
    pub supports_capture: bool,
    /// The formats ImportImage takes, preferred first.
    pub image_formats: Vec<DiskFormat>,
    /// Free-form facts.
    pub attributes: BTreeMap<String, String>,
}

/// A registered provider endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    /// Id.
    pub id: ProviderId,
    /// Operator's unique name.
    pub name: String,
    /// Zone served.
    pub zone: String,
    /// gRPC endpoint URI.
    pub endpoint: String,
    /// From the handshake.
    pub plugin_name: String,
    /// From the handshake.
    pub plugin_version: String,
    /// From the handshake.
    pub hypervisor: String,
    /// Negotiated protocol revision.
    pub protocol_version: String,
    /// Last reported capabilities.
    pub capabilities: Capabilities,
    /// Result of the last probe.
    pub healthy: bool,
    /// Why unhealthy, or the probe's message.
    pub health_message: String,
    /// When last probed.
    pub last_probe_at: Option<DateTime<Utc>>,
    /// When registered.
    pub created_at: DateTime<Utc>,
    /// Whether sealed credentials are stored for it.
    pub has_credentials: bool,
    /// What core trusts on its TLS channel, as registered.
    pub tls: ProviderTls,
    /// The operator registered a plaintext endpoint that is not loopback
    /// anyway (see [`ProviderTransport::keeps_secrets`]).
    pub allow_plaintext: bool,
}

impl Provider {
    /// Whether core may send this provider secrets (its credentials):
    /// over a channel that keeps them, or plaintext the operator allowed.
    pub fn may_receive_secrets(&self) -> bool {
        ProviderTransport::of(&self.endpoint).is_some_and(|t| t.keeps_secrets() || self.allow_plaintext)
    }
}

/// A value sealed with core's secrets key (XChaCha20-Poly1305, the
/// provider's id as associated data). `Debug` shows its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(pub Vec<u8>);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

/// What core trusts on one provider's TLS channel, as the operator
/// registered it. Each part left out comes from core's `[providers]`
/// configuration when the channel is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderTls {
    /// CA certificates (PEM) that sign the provider's certificate.
    pub ca_pem: Option<String>,
    /// Core's client certificate chain (PEM) for mutual TLS.
    pub client_cert_pem: Option<String>,
    /// The private key of `client_cert_pem`, sealed.
    pub client_key: Option<Sealed>,
    /// The name the provider's certificate must carry, when it is not the
    /// endpoint's host.
    pub server_name: Option<String>,
}

impl ProviderTls {
    /// Whether nothing was registered.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The channel between core and a provider, read from its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderTransport {
    /// `https://`: TLS.
    Tls,
    /// `unix:///path`: a socket on core's own host.
    Unix,
    /// `http://` to 127.0.0.0/8, `::1` or `localhost`: plaintext that never
    /// leaves the host.
    Loopback,
    /// `http://` to any other host: plaintext on the network.
    Plaintext,
}

impl ProviderTransport {
    /// The transport of an endpoint URI; None when its scheme is none of
    /// `https://`, `http://` and `unix:///` or it names no host.
    pub fn of(endpoint: &str) -> Option<Self> {
        if endpoint.starts_with("unix:///") {
            return Some(Self::Unix);
        }
        let host = endpoint_host(endpoint)?;
        if endpoint.starts_with("https://") {
            return Some(Self::Tls);
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback());
        Some(if loopback { Self::Loopback } else { Self::Plaintext })
    }

    /// Whether secrets sent over it stay secret without the operator's
    /// override: everything but plaintext on the network.
    pub fn keeps_secrets(self) -> bool {
        self != Self::Plaintext
    }
}

/// The host of an `http://` or `https://` endpoint, without the brackets of
/// an IPv6 address; None for other schemes or when it names no host.
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint.strip_prefix("https://").or_else(|| endpoint.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // user:password@ never belongs in an endpoint, and would hide the host.
    if authority.contains('@') {
        return None;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, _)| h)?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then_some(host)
}

/// An audit event to append (the store assigns nothing: ids and times are
/// set by the caller so the event can be logged before it is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Event id.
    pub id: hcp_proto::ids::EventId,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// JWT subject or `system:<component>`.
    pub actor: String,
    /// Tenant concerned (empty for ops-wide actions).
    pub tenant_id: String,
    /// Project concerned.
    pub project_id: String,
    /// Dotted action name.
    pub action: String,
    /// Resource kind.
    pub resource_type: String,
    /// Resource id or name.
    pub resource_id: String,
    /// accepted / succeeded / failed / denied.
    pub outcome: String,
    /// Related job.
    pub job_id: String,
    /// Trace of the request or job.
    pub trace_id: String,
    /// Error code or short detail.
    pub detail: String,
}

impl AuditEvent {
    /// An event of `actor` doing `action` to `resource`, ended as `outcome`,
    /// stamped now; tenant, project, job, trace and detail are the caller's
    /// to fill in.
    pub fn new(
        actor: &str,
        action: crate::audit::AuditAction,
        resource: crate::audit::Resource<'_>,
        outcome: crate::audit::AuditOutcome<'_>,
    ) -> Self {
        AuditEvent {
            id: hcp_proto::ids::EventId::new(),
            at: now(),
            actor: actor.to_owned(),
            tenant_id: String::new(),
            project_id: String::new(),
            action: action.as_str().to_owned(),
            resource_type: resource.kind().to_owned(),
            resource_id: resource.id(),
            outcome: outcome.to_string(),
            job_id: String::new(),
            trace_id: String::new(),
            detail: String::new(),
        }
    }
}

/// A console session (the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// Tenant bound to.
    pub tenant_id: String,
    /// Project bound to.
    pub project_id: String,
    /// VM bound to.
    pub vm_id: VmId,
    /// Console protocol.
    pub protocol: String,
    /// Unusable after this time.
    pub expires_at: DateTime<Utc>,
    /// Set when redeemed (single use).
    pub used_at: Option<DateTime<Utc>>,
    /// Set when revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When issued.
    pub created_at: DateTime<Utc>,
    /// The client's address, stored when the session opens: a SPICE
    /// channel joining the session must come from it.
    pub client_address: Option<String>,
    /// Set when the session (a SPICE session's main channel) ended: no
    /// channel joins it any more.
    pub ended_at: Option<DateTime<Utc>>,
}

/// What to do about a VM the hypervisor no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// Record it.
    #[default]
    Report,
    /// Mark the VM ERROR (NOT_FOUND) so the tenant sees it and can delete it.
    Repair,
    /// Mark the VM DELETED.
    Reap,
}

/// What to do about a power state changed behind HCP's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PowerPolicy {
    /// Record it.
    #[default]
    Report,
    /// Start or stop the VM on the hypervisor to match the desired state.
    Repair,
    /// Make the desired state follow the hypervisor.
    Adopt,
}

/// What to do about HCP-tagged VMs HCP does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OrphanPolicy {
    /// Record it.
    #[default]
    Report,
    /// Delete it on the hypervisor.
    Reap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_classified_by_scheme_and_host() {
        use ProviderTransport::*;
        for (endpoint, want) in [
            ("https://provider.example:50061", Some(Tls)),
            ("https://10.0.0.5:50061", Some(Tls)),
            ("unix:///run/hcp/sim.sock", Some(Unix)),
            ("http://127.0.0.1:50061", Some(Loopback)),
            ("http://127.8.9.10:50061", Some(Loopback)),
            ("http://localhost:50061", Some(Loopback)),
            ("http://LOCALHOST", Some(Loopback)),
            ("http://[::1]:50061", Some(Loopback)),
            ("http://[::ffff:127.0.0.1]:50061", Some(Loopback)),
            ("http://192.0.2.10:50061", Some(Plaintext)),
            ("http://[2001:db8::1]:50061", Some(Plaintext)),
            ("http://128.0.0.1:50061", Some(Plaintext)),
            ("http://localhost.example:50061", Some(Plaintext)),
            ("http://127.0.0.1.example:50061", Some(Plaintext)),
            // A userinfo part would hide the real host behind a loopback name.
            ("http://127.0.0.1@192.0.2.10:50061", None),
            ("http://:50061", None),
            ("http://[::1", None),
            ("ftp://127.0.0.1", None),
            ("unix://relative.sock", None),
        ] {
            assert_eq!(ProviderTransport::of(endpoint), want, "{endpoint}");
        }
        assert!(Tls.keeps_secrets() && Unix.keeps_secrets() && Loopback.keeps_secrets());
        assert!(!Plaintext.keeps_secrets());
    }
}
