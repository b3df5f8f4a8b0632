//! What the reconciler does about a VM whose hypervisor disagrees with
//! HCP's record: [`drift`] says whether it does, [`correct`] what the
//! configured policy makes of it. The reconciler only carries it out (a
//! compare-and-set on the VM, a start or stop on the hypervisor, an audit
//! event named by [`Drift::audit_action`] and [`Verdict::as_str`]).

use hcp_proto::error::ErrorCode;

use super::{Metering, Power};
use crate::audit::AuditAction;
use crate::model::{MissingPolicy, PowerPolicy, VmStatus};

/// A disagreement between a VM's record and its hypervisor, on a VM no
/// job holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// Recorded ACTIVE or STOPPED, absent from the provider's inventory.
    Missing,
    /// The hypervisor reports this power state against the record.
    Power(Power),
}

impl Drift {
    /// The audit action of a decision about this drift.
    pub fn audit_action(self) -> AuditAction {
        match self {
            Drift::Missing => AuditAction::ReconcileMissing,
            Drift::Power(_) => AuditAction::ReconcilePower,
        }
    }
}

/// What became of a drift, as the audit event's outcome says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded only.
    Reported,
    /// HCP's record (or the hypervisor) was brought back in line.
    Repaired,
    /// The VM was marked deleted.
    Reaped,
    /// The record took the hypervisor's state.
    Adopted,
    /// A repair on the hypervisor was tried and failed.
    Failed,
}

impl Verdict {
    /// The audit event's outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Reported => "reported",
            Verdict::Repaired => "repaired",
            Verdict::Reaped => "reaped",
            Verdict::Adopted => "adopted",
            Verdict::Failed => "failed",
        }
    }
}

/// What to do about a drift. `vm`, `vm_error` and `metering` are written in
/// one transaction, only if the VM is still as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correction {
    /// The audit outcome when carried out.
    pub verdict: Verdict,
    /// The VM's new recorded state; `None` leaves the record.
    pub vm: Option<VmStatus>,
    /// The error recorded on the VM, with a VM state of ERROR.
    pub vm_error: Option<ErrorCode>,
    /// The usage event to append.
    pub metering: Option<Metering>,
    /// Bring the hypervisor to this power state.
    pub drive: Option<Power>,
}

impl Correction {
    /// The sentence recorded with `vm_error`: the only correction that
    /// marks a VM ERROR is for a VM its hypervisor lost.
    pub fn error_message(&self) -> Option<&'static str> {
        self.vm_error.map(|_| "the vm disappeared from its hypervisor")
    }
}

/// Why a correction that records the VM as `new` ends its console
/// sessions, if it does: a VM recorded as not running has no console.
pub fn drifted_console_revocation(new: VmStatus) -> Option<&'static str> {
    match new {
        VmStatus::Stopped => Some("the vm stopped outside HCP"),
        VmStatus::Error | VmStatus::Deleted => Some("the vm disappeared from its hypervisor"),
        _ => None,
    }
}

/// Whether a VM recorded as `recorded` and observed `observed` (`None`:
/// absent from the inventory) drifted. Only settled states drift: a VM in
/// a transitional state is some job's business.
pub fn drift(recorded: VmStatus, observed: Option<Power>) -> Option<Drift> {
    match (recorded, observed) {
        (VmStatus::Active | VmStatus::Stopped, None) => Some(Drift::Missing),
        (VmStatus::Active, Some(Power::Off)) | (VmStatus::Stopped, Some(Power::Running)) => {
            observed.map(Drift::Power)
        }
        _ => None,
    }
}

/// What the policies make of `drift` on a VM recorded as `recorded`.
pub fn correct(drift: Drift, recorded: VmStatus, missing: MissingPolicy, power: PowerPolicy) -> Correction {
    let report =
        Correction { verdict: Verdict::Reported, vm: None, vm_error: None, metering: None, drive: None };
    match drift {
        Drift::Missing => match missing {
            MissingPolicy::Report => report,
            MissingPolicy::Repair => Correction {
                verdict: Verdict::Repaired,
                vm: Some(VmStatus::Error),
                vm_error: Some(ErrorCode::NotFound),
                // It was billed as running until now.
                metering: (recorded == VmStatus::Active).then_some(Metering::Stopped),
                ..report
            },
            MissingPolicy::Reap => Correction {
                verdict: Verdict::Reaped,
                vm: Some(VmStatus::Deleted),
                metering: Some(Metering::Deleted),
                ..report
            },
        },
        Drift::Power(observed) => match power {
            PowerPolicy::Report => report,
            PowerPolicy::Repair => Correction {
                verdict: Verdict::Repaired,
                drive: Some(if recorded == VmStatus::Active { Power::Running } else { Power::Off }),
                ..report
            },
            PowerPolicy::Adopt => {
                let (vm, metering) = match observed {
                    Power::Running => (VmStatus::Active, Metering::Started),
                    Power::Off => (VmStatus::Stopped, Metering::Stopped),
                };
                Correction { verdict: Verdict::Adopted, vm: Some(vm), metering: Some(metering), ..report }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_recorded_as_not_running_loses_its_consoles() {
        for (new, why) in [
            (VmStatus::Stopped, Some("the vm stopped outside HCP")),
            (VmStatus::Error, Some("the vm disappeared from its hypervisor")),
            (VmStatus::Deleted, Some("the vm disappeared from its hypervisor")),
            (VmStatus::Active, None),
        ] {
            assert_eq!(drifted_console_revocation(new), why, "{new:?}");
        }
    }
    use crate::model::MissingPolicy as M;
    use crate::model::PowerPolicy as P;
    use Power::{Off, Running};
    use VmStatus::*;

    /// Every recorded state against every observation, as literal rows.
    #[test]
    fn drift_is_a_settled_state_the_hypervisor_contradicts() {
        #[rustfmt::skip]
        let rows: &[(VmStatus, Option<Power>, Option<Drift>)] = &[
            (Active,   None,          Some(Drift::Missing)),
            (Active,   Some(Off),     Some(Drift::Power(Off))),
            (Active,   Some(Running), None),
            (Stopped,  None,          Some(Drift::Missing)),
            (Stopped,  Some(Running), Some(Drift::Power(Running))),
            (Stopped,  Some(Off),     None),
            (Error,    None,          None),
            (Error,    Some(Running), None),
            (Deleted,  None,          None),
            (Pending,  None,          None),
            (Starting, Some(Off),     None),
            (Stopping, Some(Running), None),
            (Deleting, None,          None),
        ];
        for &(recorded, observed, expected) in rows {
            assert_eq!(drift(recorded, observed), expected, "{recorded} observed {observed:?}");
        }
    }

    /// Every drift under every policy, as literal rows: (drift, recorded,
    /// missing policy, power policy) -> (verdict, new state, error,
    /// metering, drive).
    #[test]
    fn each_policy_corrects_as_configured() {
        use Metering::{Deleted as UDeleted, Started as UStarted, Stopped as UStopped};
        type Row = (
            Drift,
            VmStatus,
            M,
            P,
            Verdict,
            Option<VmStatus>,
            Option<ErrorCode>,
            Option<Metering>,
            Option<Power>,
        );
        let nf = Some(ErrorCode::NotFound);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (Drift::Missing,        Active,  M::Report, P::Report, Verdict::Reported, None,          None, None,            None),
            (Drift::Missing,        Active,  M::Repair, P::Report, Verdict::Repaired, Some(Error),   nf,   Some(UStopped),  None),
            (Drift::Missing,        Stopped, M::Repair, P::Report, Verdict::Repaired, Some(Error),   nf,   None,            None),
            (Drift::Missing,        Active,  M::Reap,   P::Report, Verdict::Reaped,   Some(Deleted), None, Some(UDeleted),  None),
            (Drift::Missing,        Stopped, M::Reap,   P::Adopt,  Verdict::Reaped,   Some(Deleted), None, Some(UDeleted),  None),
            (Drift::Power(Off),     Active,  M::Reap,   P::Report, Verdict::Reported, None,          None, None,            None),
            (Drift::Power(Off),     Active,  M::Report, P::Repair, Verdict::Repaired, None,          None, None,            Some(Running)),
            (Drift::Power(Running), Stopped, M::Report, P::Repair, Verdict::Repaired, None,          None, None,            Some(Off)),
            (Drift::Power(Off),     Active,  M::Report, P::Adopt,  Verdict::Adopted,  Some(Stopped), None, Some(UStopped),  None),
            (Drift::Power(Running), Stopped, M::Repair, P::Adopt,  Verdict::Adopted,  Some(Active),  None, Some(UStarted),  None),
        ];
        for &(d, recorded, missing, power, verdict, vm, vm_error, metering, drive) in rows {
            let expected = Correction { verdict, vm, vm_error, metering, drive };
            assert_eq!(
                correct(d, recorded, missing, power),
                expected,
                "{d:?} on {recorded} with {missing:?}/{power:?}"
            );
        }
    }

    #[test]
    fn names_are_the_audit_trails() {
        assert_eq!(Drift::Missing.audit_action().as_str(), "reconcile.missing");
        assert_eq!(Drift::Power(Off).audit_action().as_str(), "reconcile.power");
        let outcomes: Vec<_> =
            [Verdict::Reported, Verdict::Repaired, Verdict::Reaped, Verdict::Adopted, Verdict::Failed]
                .map(Verdict::as_str)
                .into();
        assert_eq!(outcomes, ["reported", "repaired", "reaped", "adopted", "failed"]);
    }
}
