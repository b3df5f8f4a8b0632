//! The lifecycle of volumes: which operation a volume accepts in which
//! state, what each outcome does to it, and what a tenant may ask of it.
//! A volume job that touches an attached volume also holds the VM
//! (`JobKind::allowed_from`), so a VM job and a volume job on the same VM
//! never run at once.

use hcp_proto::error::ErrorCode;
use hcp_proto::ids::JobId;

use super::{Capability, JobParams, Outcome, missing, required_capabilities};
use crate::model::{Capabilities, JobKind, VmStatus, VolumeStatus};

/// Why a volume operation cannot be accepted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeRefusal {
    /// A job is operating on the volume.
    Busy(JobId),
    /// The volume is attached to a VM (delete, attach elsewhere).
    Attached,
    /// The volume is attached to no VM (detach).
    NotAttached,
    /// The volume's state does not allow it.
    WrongState {
        /// The states that would.
        allowed: &'static [VolumeStatus],
    },
}

impl JobKind {
    /// The volume states from which this volume operation may be asked.
    pub fn volume_allowed_from(self) -> &'static [VolumeStatus] {
        match self {
            JobKind::DeleteVolume => &[VolumeStatus::Available, VolumeStatus::Error],
            JobKind::ExtendVolume => &[VolumeStatus::Available, VolumeStatus::InUse],
            JobKind::AttachVolume => &[VolumeStatus::Available],
            JobKind::DetachVolume => &[VolumeStatus::InUse, VolumeStatus::Error],
            _ => &[],
        }
    }

    /// The state a volume is in while this job runs.
    pub fn volume_in_flight_status(self) -> Option<VolumeStatus> {
        match self {
            JobKind::CreateVolume => Some(VolumeStatus::Creating),
            JobKind::DeleteVolume => Some(VolumeStatus::Deleting),
            JobKind::ExtendVolume => Some(VolumeStatus::Extending),
            JobKind::AttachVolume => Some(VolumeStatus::Attaching),
            JobKind::DetachVolume => Some(VolumeStatus::Detaching),
            _ => None,
        }
    }
}

/// Decides whether `kind` may start on a volume in `status`, attached or
/// not, with `job` in flight; returns the state the volume takes while the
/// job runs. The VM it holds is decided by [`super::accept`].
pub fn accept_volume(
    kind: JobKind,
    status: VolumeStatus,
    attached: bool,
    job: Option<JobId>,
) -> Result<VolumeStatus, VolumeRefusal> {
    if let Some(job) = job {
        return Err(VolumeRefusal::Busy(job));
    }
    match kind {
        JobKind::DeleteVolume | JobKind::AttachVolume if attached => return Err(VolumeRefusal::Attached),
        JobKind::DetachVolume if !attached => return Err(VolumeRefusal::NotAttached),
        _ => {}
    }
    let allowed = kind.volume_allowed_from();
    if !allowed.contains(&status) {
        return Err(VolumeRefusal::WrongState { allowed });
    }
    kind.volume_in_flight_status().ok_or(VolumeRefusal::WrongState { allowed })
}

/// A metered volume change, published as `volume.<name>` usage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMetering {
    /// It exists (billable from now at its size).
    Created,
    /// Its size grew.
    Extended,
    /// It is gone.
    Deleted,
    /// It was attached to a VM.
    Attached,
    /// It was detached.
    Detached,
}

impl VolumeMetering {
    /// Every usage event.
    pub const ALL: &'static [VolumeMetering] = &[
        VolumeMetering::Created,
        VolumeMetering::Extended,
        VolumeMetering::Deleted,
        VolumeMetering::Attached,
        VolumeMetering::Detached,
    ];

    /// The usage event named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.as_str() == s)
    }

    /// The usage event's name.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMetering::Created => "volume.created",
            VolumeMetering::Extended => "volume.extended",
            VolumeMetering::Deleted => "volume.deleted",
            VolumeMetering::Attached => "volume.attached",
            VolumeMetering::Detached => "volume.detached",
        }
    }
}

/// What a finished job does to the volume's attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentChange {
    /// As it is.
    Keep,
    /// Attached to nothing (a detach done, an attach that did not happen).
    Clear,
}

/// What finishing (or cancelling) a volume job does to its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeChange {
    /// The volume's new state (releasing it from the job).
    pub status: VolumeStatus,
    /// The error recorded on it (only with ERROR).
    pub error: Option<ErrorCode>,
    /// A size to put back (a failed or cancelled extend).
    pub size: Option<u32>,
    /// Its attachment.
    pub attachment: AttachmentChange,
    /// The usage event to append.
    pub metering: Option<VolumeMetering>,
}

/// What `outcome` does to the volume of a job of `kind` accepted when the
/// volume was `prior` (`None` for a create). `None` for jobs without a
/// volume and for retries (the volume stays held).
pub fn volume_change(
    kind: JobKind,
    outcome: Outcome,
    prior: Option<VolumeStatus>,
    params: &JobParams,
) -> Option<VolumeChange> {
    if !kind.is_volume_job() {
        return None;
    }
    let restore_size = match params {
        JobParams::Extend { from, .. } => Some(*from),
        _ => None,
    };
    let keep = |status| VolumeChange {
        status,
        error: None,
        size: None,
        attachment: AttachmentChange::Keep,
        metering: None,
    };
    let before = prior.unwrap_or(VolumeStatus::Error);
    Some(match outcome {
        Outcome::Retry(_) => return None,
        Outcome::Succeeded { .. } => match kind {
            JobKind::CreateVolume => {
                VolumeChange { metering: Some(VolumeMetering::Created), ..keep(VolumeStatus::Available) }
            }
            JobKind::DeleteVolume => {
                VolumeChange { metering: Some(VolumeMetering::Deleted), ..keep(VolumeStatus::Deleted) }
            }
            JobKind::ExtendVolume => {
                VolumeChange { metering: Some(VolumeMetering::Extended), ..keep(before) }
            }
            JobKind::AttachVolume => {
                VolumeChange { metering: Some(VolumeMetering::Attached), ..keep(VolumeStatus::InUse) }
            }
            _ => VolumeChange {
                attachment: AttachmentChange::Clear,
                metering: Some(VolumeMetering::Detached),
                ..keep(VolumeStatus::Available)
            },
        },
        // A volume step cut by a cancellation may or may not have happened:
        // as with a failure, the reconciler settles what the hypervisor has.
        Outcome::Failed(_) | Outcome::Interrupted(_) => match kind {
            // It may half exist: ERROR, to be deleted.
            JobKind::CreateVolume | JobKind::DeleteVolume => {
                let code = match outcome {
                    Outcome::Failed(code) => code,
                    _ => ErrorCode::Cancelled,
                };
                VolumeChange { error: Some(code), ..keep(VolumeStatus::Error) }
            }
            // A disk only grows and an extend either happened or did not:
            // the volume is usable at its old size (the reconciler reads
            // the size the hypervisor reports).
            JobKind::ExtendVolume => VolumeChange { size: restore_size, ..keep(before) },
            // The provider answers an attach it could not make with an
            // error: the volume stays where it was; an attachment made
            // anyway is found by the reconciler.
            JobKind::AttachVolume => VolumeChange { attachment: AttachmentChange::Clear, ..keep(before) },
            _ => keep(before),
        },
        Outcome::Cancelled => match kind {
            JobKind::CreateVolume => {
                VolumeChange { error: Some(ErrorCode::Cancelled), ..keep(VolumeStatus::Error) }
            }
            JobKind::ExtendVolume => VolumeChange { size: restore_size, ..keep(before) },
            JobKind::AttachVolume => VolumeChange { attachment: AttachmentChange::Clear, ..keep(before) },
            _ => keep(before),
        },
    })
}

/// What a VM's create job does to a volume it holds: a new boot volume
/// (accepted CREATING) or an existing one attached at create (accepted
/// ATTACHING). Success puts both IN_USE. A failed or cancelled create
/// leaves the VM in ERROR with its volumes still on it (the hypervisor
/// may have attached them): an existing volume stays IN_USE until the VM
/// is deleted, a new boot volume, which may half exist, is ERROR. `None`
/// for a retry (the job still holds them). With the usage event a success
/// appends.
pub fn created_vm_volume(
    outcome: Outcome,
    accepted_as: VolumeStatus,
) -> Option<(VolumeStatus, Option<VolumeMetering>)> {
    let new = accepted_as == VolumeStatus::Creating;
    match outcome {
        Outcome::Retry(_) => None,
        Outcome::Succeeded { .. } => Some((
            VolumeStatus::InUse,
            Some(if new { VolumeMetering::Created } else { VolumeMetering::Attached }),
        )),
        Outcome::Failed(_) | Outcome::Cancelled | Outcome::Interrupted(_) => {
            Some((if new { VolumeStatus::Error } else { VolumeStatus::InUse }, None))
        }
    }
}

/// Something a tenant may ask of a volume, as `allowed_actions` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeAction {
    /// Change name, metadata or tags.
    Update,
    /// Grow it.
    Extend,
    /// Attach it to a VM.
    Attach,
    /// Detach it from its VM.
    Detach,
    /// Delete it.
    Delete,
}

impl VolumeAction {
    /// Every action, in the order reads list them.
    pub const ALL: &'static [VolumeAction] = &[
        VolumeAction::Update,
        VolumeAction::Extend,
        VolumeAction::Attach,
        VolumeAction::Detach,
        VolumeAction::Delete,
    ];

    /// The spelling in `allowed_actions`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeAction::Update => "update",
            VolumeAction::Extend => "extend",
            VolumeAction::Attach => "attach",
            VolumeAction::Detach => "detach",
            VolumeAction::Delete => "delete",
        }
    }

    fn job_kind(self) -> Option<JobKind> {
        match self {
            VolumeAction::Update => None,
            VolumeAction::Extend => Some(JobKind::ExtendVolume),
            VolumeAction::Attach => Some(JobKind::AttachVolume),
            VolumeAction::Detach => Some(JobKind::DetachVolume),
            VolumeAction::Delete => Some(JobKind::DeleteVolume),
        }
    }
}

/// The VM a volume is attached to, as far as the volume's actions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedVm {
    /// Its state.
    pub status: VmStatus,
    /// Its job in flight.
    pub job: Option<JobId>,
}

/// What may be asked of a volume in `status` with `job` in flight,
/// attached to `vm` (or to nothing), on a provider with `caps`: what
/// [`accept_volume`], [`super::accept`] for the VM it holds and
/// [`required_capabilities`] would let through now. Attach is listed when
/// the volume could go to some VM (a stopped one needs no hot attach).
pub fn volume_allowed_actions(
    status: VolumeStatus,
    job: Option<JobId>,
    vm: Option<AttachedVm>,
    caps: &Capabilities,
) -> Vec<VolumeAction> {
    VolumeAction::ALL
        .iter()
        .copied()
        .filter(|action| match action.job_kind() {
            None => status != VolumeStatus::Deleted,
            Some(kind) => {
                if accept_volume(kind, status, vm.is_some(), job).is_err() {
                    return false;
                }
                let vm_status = match vm {
                    Some(vm) => {
                        if super::accept(kind, vm.status, vm.job).is_err() {
                            return false;
                        }
                        vm.status
                    }
                    None => VmStatus::Stopped,
                };
                missing(required_capabilities(kind, vm_status), caps).is_none()
            }
        })
        .collect()
}

/// The capability a volume operation lacks on `caps` for a VM in
/// `vm_status` (`None` when the volume is attached to none).
pub fn volume_missing(kind: JobKind, vm_status: Option<VmStatus>, caps: &Capabilities) -> Option<Capability> {
    missing(required_capabilities(kind, vm_status.unwrap_or(VmStatus::Stopped)), caps)
}

/// Where a hypervisor reports a volume: on a VM at a slot, or on none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The VM it is attached to, and at which slot; `None`: detached.
    pub attachment: Option<(hcp_proto::ids::VmId, u32)>,
}

/// What the reconciler records about a volume no job holds, whose
/// hypervisor disagrees with HCP's record. Volumes are never deleted or
/// detached on the hypervisor by the reconciler: HCP's record follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeDrift {
    /// Made on the hypervisor and gone from its inventory: ERROR
    /// (NOT_FOUND), to be deleted by the tenant.
    Missing,
    /// Attached there (to one of HCP's VMs) while HCP says otherwise: the
    /// record takes the attachment, IN_USE.
    Attached(hcp_proto::ids::VmId, u32),
    /// Detached there while HCP says attached: AVAILABLE.
    Detached,
}

impl VolumeDrift {
    /// The volume's state once recorded.
    pub fn status(self) -> VolumeStatus {
        match self {
            VolumeDrift::Missing => VolumeStatus::Error,
            VolumeDrift::Attached(..) => VolumeStatus::InUse,
            VolumeDrift::Detached => VolumeStatus::Available,
        }
    }
}

/// Whether a volume recorded in `status`, attached as `attachment`, made
/// on the hypervisor or not (`made`), disagrees with what the hypervisor
/// reports (`observed`, `None`: not in its inventory). A volume in a
/// transitional state or never made there has nothing to compare; one
/// already in ERROR is left to its tenant.
pub fn volume_drift(
    status: VolumeStatus,
    attachment: Option<crate::model::Attachment>,
    made: bool,
    observed: Option<Observed>,
) -> Option<VolumeDrift> {
    if !made || !matches!(status, VolumeStatus::Available | VolumeStatus::InUse) {
        return None;
    }
    let Some(observed) = observed else { return Some(VolumeDrift::Missing) };
    let recorded = attachment.map(|a| (a.vm_id, a.device_index));
    match (recorded, observed.attachment) {
        (r, o) if r == o => None,
        (_, Some((vm, slot))) => Some(VolumeDrift::Attached(vm, slot)),
        (Some(_), None) => Some(VolumeDrift::Detached),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorCode as E;
    use VolumeStatus::*;

    fn job() -> JobId {
        JobId::new()
    }

    /// Every volume kind from every state, attached or not, as literal rows.
    #[test]
    fn volume_operations_are_accepted_from_the_states_they_allow() {
        use JobKind::{AttachVolume as Att, DeleteVolume as Del, DetachVolume as Det, ExtendVolume as Ext};
        use VolumeRefusal::{Attached as A, NotAttached as N};
        let wrong = |kind: JobKind| Err(VolumeRefusal::WrongState { allowed: kind.volume_allowed_from() });
        type Row = (JobKind, VolumeStatus, bool, Result<VolumeStatus, VolumeRefusal>);
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            (Del, Available, false, Ok(Deleting)),
            (Del, Error,     false, Ok(Deleting)),
            (Del, Error,     true,  Err(A)),
            (Del, InUse,     true,  Err(A)),
            (Del, Creating,  false, wrong(Del)),
            (Del, Deleted,   false, wrong(Del)),
            (Del, Deleting,  false, wrong(Del)),
            (Ext, Available, false, Ok(Extending)),
            (Ext, InUse,     true,  Ok(Extending)),
            (Ext, Error,     false, wrong(Ext)),
            (Ext, Creating,  false, wrong(Ext)),
            (Ext, Deleted,   false, wrong(Ext)),
            (Ext, Extending, false, wrong(Ext)),
            (Att, Available, false, Ok(Attaching)),
            (Att, InUse,     true,  Err(A)),
            (Att, Error,     false, wrong(Att)),
            (Att, Creating,  false, wrong(Att)),
            (Att, Deleted,   false, wrong(Att)),
            (Det, InUse,     true,  Ok(Detaching)),
            (Det, Error,     true,  Ok(Detaching)),
            (Det, Available, false, Err(N)),
            (Det, Attaching, true,  wrong(Det)),
            (Det, Deleted,   false, Err(N)),
        ];
        for (kind, status, attached, expected) in rows {
            assert_eq!(
                accept_volume(kind, status, attached, None),
                expected,
                "{kind} on {status} attached={attached}"
            );
        }
        let busy = job();
        assert_eq!(accept_volume(Del, Available, false, Some(busy)), Err(VolumeRefusal::Busy(busy)));
        // A create is accepted by the store, never through this door.
        assert!(accept_volume(JobKind::CreateVolume, Available, false, None).is_err());
    }

    /// What every outcome of every volume kind does to the volume, from
    /// every state the kind is accepted from: kind, prior, outcome ->
    /// state, error, size restored, attachment, usage event.
    #[test]
    fn every_volume_kind_outcome_and_prior_state() {
        use AttachmentChange::{Clear, Keep};
        use JobKind as K;
        use VolumeMetering as M;
        let ok = Outcome::Succeeded { power: None };
        let failed = Outcome::Failed(E::ProviderUnavailable);
        let cancelled = Outcome::Cancelled;
        // Cancelled while the kind's provider call ran: as a failure.
        let cut = |kind: JobKind| Outcome::Interrupted(*kind.steps().last().unwrap());
        let ext = JobParams::Extend { from: 5, to: 8 };
        let none = JobParams::None;
        type Row<'a> = (
            JobKind,
            Option<VolumeStatus>,
            Outcome,
            &'a JobParams,
            (VolumeStatus, Option<E>, Option<u32>, AttachmentChange, Option<M>),
        );
        #[rustfmt::skip]
        let rows: Vec<Row<'_>> = vec![
            (K::CreateVolume, None,            ok,        &none, (Available, None, None, Keep, Some(M::Created))),
            (K::CreateVolume, None,            failed,    &none, (Error, Some(E::ProviderUnavailable), None, Keep, None)),
            (K::CreateVolume, None,            cancelled, &none, (Error, Some(E::Cancelled), None, Keep, None)),
            (K::DeleteVolume, Some(Available), ok,        &none, (Deleted, None, None, Keep, Some(M::Deleted))),
            (K::DeleteVolume, Some(Error),     ok,        &none, (Deleted, None, None, Keep, Some(M::Deleted))),
            (K::DeleteVolume, Some(Available), failed,    &none, (Error, Some(E::ProviderUnavailable), None, Keep, None)),
            (K::DeleteVolume, Some(Error),     failed,    &none, (Error, Some(E::ProviderUnavailable), None, Keep, None)),
            (K::DeleteVolume, Some(Available), cancelled, &none, (Available, None, None, Keep, None)),
            (K::DeleteVolume, Some(Error),     cancelled, &none, (Error, None, None, Keep, None)),
            (K::ExtendVolume, Some(Available), ok,        &ext,  (Available, None, None, Keep, Some(M::Extended))),
            (K::ExtendVolume, Some(InUse),     ok,        &ext,  (InUse, None, None, Keep, Some(M::Extended))),
            (K::ExtendVolume, Some(Available), failed,    &ext,  (Available, None, Some(5), Keep, None)),
            (K::ExtendVolume, Some(InUse),     failed,    &ext,  (InUse, None, Some(5), Keep, None)),
            (K::ExtendVolume, Some(Available), cancelled, &ext,  (Available, None, Some(5), Keep, None)),
            (K::ExtendVolume, Some(InUse),     cancelled, &ext,  (InUse, None, Some(5), Keep, None)),
            (K::AttachVolume, Some(Available), ok,        &none, (InUse, None, None, Keep, Some(M::Attached))),
            (K::AttachVolume, Some(Available), failed,    &none, (Available, None, None, Clear, None)),
            (K::AttachVolume, Some(Available), cancelled, &none, (Available, None, None, Clear, None)),
            (K::DetachVolume, Some(InUse),     ok,        &none, (Available, None, None, Clear, Some(M::Detached))),
            (K::DetachVolume, Some(Error),     ok,        &none, (Available, None, None, Clear, Some(M::Detached))),
            (K::DetachVolume, Some(InUse),     failed,    &none, (InUse, None, None, Keep, None)),
            (K::DetachVolume, Some(Error),     failed,    &none, (Error, None, None, Keep, None)),
            (K::DetachVolume, Some(InUse),     cancelled, &none, (InUse, None, None, Keep, None)),
            (K::DetachVolume, Some(Error),     cancelled, &none, (Error, None, None, Keep, None)),
            (K::CreateVolume, None,            cut(K::CreateVolume), &none, (Error, Some(E::Cancelled), None, Keep, None)),
            (K::DeleteVolume, Some(Available), cut(K::DeleteVolume), &none, (Error, Some(E::Cancelled), None, Keep, None)),
            (K::DeleteVolume, Some(Error),     cut(K::DeleteVolume), &none, (Error, Some(E::Cancelled), None, Keep, None)),
            (K::ExtendVolume, Some(Available), cut(K::ExtendVolume), &ext,  (Available, None, Some(5), Keep, None)),
            (K::ExtendVolume, Some(InUse),     cut(K::ExtendVolume), &ext,  (InUse, None, Some(5), Keep, None)),
            (K::AttachVolume, Some(Available), cut(K::AttachVolume), &none, (Available, None, None, Clear, None)),
            (K::DetachVolume, Some(InUse),     cut(K::DetachVolume), &none, (InUse, None, None, Keep, None)),
            (K::DetachVolume, Some(Error),     cut(K::DetachVolume), &none, (Error, None, None, Keep, None)),
        ];
        for &(kind, prior, outcome, params, (status, error, size, attachment, metering)) in &rows {
            let expected = VolumeChange { status, error, size, attachment, metering };
            assert_eq!(
                volume_change(kind, outcome, prior, params),
                Some(expected),
                "{kind} from {prior:?}, {outcome:?}"
            );
            // The VM it held is released as it was, whatever happened.
            let t = super::super::transition(kind, outcome, Some(VmStatus::Active), params);
            assert_eq!(t.vm, Some(VmStatus::Active), "{kind} {outcome:?}");
            assert!(!t.release_volumes && t.metering.is_none() && t.vm_error.is_none());
        }
        // Every state each kind is accepted from has its four rows.
        for &kind in JobKind::ALL.iter().filter(|k| k.is_volume_job()) {
            let priors: Vec<Option<VolumeStatus>> = if kind == K::CreateVolume {
                vec![None]
            } else {
                kind.volume_allowed_from().iter().copied().map(Some).collect()
            };
            for prior in priors {
                for outcome in [ok, failed, cancelled, cut(kind)] {
                    let n = rows.iter().filter(|r| (r.0, r.1, r.2) == (kind, prior, outcome)).count();
                    assert_eq!(n, 1, "{kind} {outcome:?} from {prior:?} has {n} rows");
                }
            }
        }
        // A retry leaves everything held.
        for &kind in JobKind::ALL.iter().filter(|k| k.is_volume_job()) {
            assert_eq!(
                volume_change(kind, Outcome::Retry(E::ProviderUnavailable), Some(Available), &none),
                None
            );
            let t = super::super::transition(
                kind,
                Outcome::Retry(E::ProviderUnavailable),
                Some(VmStatus::Active),
                &none,
            );
            assert!(t.requeue && t.vm.is_none());
        }
        // VM jobs change no volume.
        assert_eq!(volume_change(K::DeleteVm, ok, None, &none), None);
    }

    #[test]
    fn volume_actions_agree_with_acceptance_and_capabilities() {
        let caps = Capabilities { supports_volumes: true, ..Default::default() };
        let hot =
            Capabilities { supports_hot_attach: true, supports_volume_extend_in_use: true, ..caps.clone() };
        let names = |v: Vec<VolumeAction>| v.into_iter().map(VolumeAction::as_str).collect::<Vec<_>>();
        let running = Some(AttachedVm { status: VmStatus::Active, job: None });
        let stopped = Some(AttachedVm { status: VmStatus::Stopped, job: None });
        assert_eq!(
            names(volume_allowed_actions(Available, None, None, &caps)),
            ["update", "extend", "attach", "delete"]
        );
        assert_eq!(
            names(volume_allowed_actions(InUse, None, stopped, &caps)),
            ["update", "extend", "detach"]
        );
        // A running VM needs the hot flags.
        assert_eq!(names(volume_allowed_actions(InUse, None, running, &caps)), ["update"]);
        assert_eq!(names(volume_allowed_actions(InUse, None, running, &hot)), ["update", "extend", "detach"]);
        // The VM's job holds the volume too.
        let busy_vm = Some(AttachedVm { status: VmStatus::Active, job: Some(job()) });
        assert_eq!(names(volume_allowed_actions(InUse, None, busy_vm, &hot)), ["update"]);
        assert_eq!(names(volume_allowed_actions(Creating, Some(job()), None, &hot)), ["update"]);
        assert_eq!(names(volume_allowed_actions(Error, None, None, &hot)), ["update", "delete"]);
        assert!(volume_allowed_actions(Deleted, None, None, &hot).is_empty());
        // Without volumes, only what lives in HCP.
        assert_eq!(
            names(volume_allowed_actions(Available, None, None, &Capabilities::default())),
            ["update"]
        );
    }

    /// Every recorded state against every observation, as literal rows.
    #[test]
    fn volume_drift_follows_the_hypervisor() {
        use crate::model::Attachment;
        let vm = hcp_proto::ids::VmId::new();
        let other = hcp_proto::ids::VmId::new();
        let at = |vm, device_index| Some(Attachment { vm_id: vm, device_index });
        let seen = |a| Some(Observed { attachment: a });
        type Row = (VolumeStatus, Option<Attachment>, bool, Option<Observed>, Option<VolumeDrift>);
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            (Available, None,         true,  seen(None),               None),
            (Available, None,         true,  None,                     Some(VolumeDrift::Missing)),
            (Available, None,         true,  seen(Some((vm, 2))),      Some(VolumeDrift::Attached(vm, 2))),
            (InUse,     at(vm, 1),    true,  seen(Some((vm, 1))),      None),
            (InUse,     at(vm, 1),    true,  seen(None),               Some(VolumeDrift::Detached)),
            (InUse,     at(vm, 1),    true,  seen(Some((other, 1))),   Some(VolumeDrift::Attached(other, 1))),
            (InUse,     at(vm, 1),    true,  None,                     Some(VolumeDrift::Missing)),
            // Never made there (host-local, not yet attached): nothing to compare.
            (Available, None,         false, None,                     None),
            // A job's states and ERROR are not the reconciler's.
            (Attaching, at(vm, 1),    true,  seen(None),               None),
            (Creating,  None,         true,  None,                     None),
            (Error,     None,         true,  None,                     None),
            (Deleted,   None,         true,  None,                     None),
        ];
        for (status, attachment, made, observed, expected) in rows {
            assert_eq!(
                volume_drift(status, attachment, made, observed),
                expected,
                "{status} {attachment:?} made={made} {observed:?}"
            );
        }
        assert_eq!(VolumeDrift::Missing.status(), Error);
        assert_eq!(VolumeDrift::Attached(vm, 1).status(), InUse);
        assert_eq!(VolumeDrift::Detached.status(), Available);
    }

    #[test]
    fn a_vm_create_leaves_its_volumes_on_the_vm_whatever_happened() {
        use VolumeMetering as M;
        let ok = Outcome::Succeeded { power: None };
        let failed = Outcome::Failed(E::ProviderError);
        #[rustfmt::skip]
        let rows = [
            (ok,                Creating,  Some((InUse, Some(M::Created)))),
            (ok,                Attaching, Some((InUse, Some(M::Attached)))),
            (failed,            Creating,  Some((Error, None))),
            (failed,            Attaching, Some((InUse, None))),
            (Outcome::Cancelled, Creating, Some((Error, None))),
            (Outcome::Cancelled, Attaching, Some((InUse, None))),
            (Outcome::Retry(E::ProviderUnavailable), Creating, None),
            (Outcome::Retry(E::ProviderUnavailable), Attaching, None),
        ];
        for (outcome, accepted_as, expected) in rows {
            assert_eq!(created_vm_volume(outcome, accepted_as), expected, "{outcome:?} {accepted_as}");
        }
    }

    #[test]
    fn usage_event_names_are_distinct() {
        let names: std::collections::BTreeSet<_> = VolumeMetering::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(names.len(), VolumeMetering::ALL.len());
    }
}
