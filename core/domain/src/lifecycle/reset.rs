//! What an operator may set a VM's state to by hand (`ResetVmState`), and
//! whether what its provider reports contradicts that state. The API asks
//! the provider (GetVm) first; a contradiction is refused unless the
//! operator forces it.

use super::{Metering, Power};
use crate::model::VmStatus;

/// The states an operator may reset a VM to: the settled states a VM can
/// be in with no job on it (DELETED is force-delete's, never a reset's).
pub const RESET_TARGETS: &[VmStatus] = &[VmStatus::Active, VmStatus::Stopped, VmStatus::Error];

/// What the provider said about the VM when asked before a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderView {
    /// It has the VM in this power state.
    Power(Power),
    /// It answered that it does not have the VM.
    Absent,
    /// It has the VM in a state that is neither running nor off (paused,
    /// suspended, unspecified).
    Unclear,
    /// It could not be asked (unreachable, unhealthy, failed).
    Unreachable,
}

/// Whether `target` is a state an operator may reset to.
pub fn reset_allowed(target: VmStatus) -> bool {
    RESET_TARGETS.contains(&target)
}

/// Why resetting a VM to `target` contradicts what its provider reports,
/// or `None` when it does not. ERROR never contradicts (it claims nothing
/// about the hypervisor); ACTIVE needs the VM running, STOPPED needs it
/// off; a provider that cannot say refuses both.
pub fn reset_contradiction(target: VmStatus, seen: ProviderView) -> Option<&'static str> {
    match (target, seen) {
        (VmStatus::Error, _) => None,
        (_, ProviderView::Unreachable) => Some("the provider cannot be asked for the vm's state"),
        (_, ProviderView::Absent) => Some("the provider does not have the vm"),
        (_, ProviderView::Unclear) => Some("the provider reports the vm neither running nor off"),
        (VmStatus::Active, ProviderView::Power(Power::Running)) => None,
        (VmStatus::Active, ProviderView::Power(Power::Off)) => Some("the provider reports the vm off"),
        (VmStatus::Stopped, ProviderView::Power(Power::Off)) => None,
        (VmStatus::Stopped, ProviderView::Power(Power::Running)) => {
            Some("the provider reports the vm running")
        }
        (_, _) => Some("not a state a vm can be reset to"),
    }
}

/// The usage event a reset from `from` to `to` writes: a VM that starts or
/// stops counting as running.
pub fn reset_metering(from: VmStatus, to: VmStatus) -> Option<Metering> {
    match (from == VmStatus::Active, to == VmStatus::Active) {
        (false, true) => Some(Metering::Started),
        (true, false) => Some(Metering::Stopped),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Power::{Off, Running};
    use ProviderView::{Absent, Unclear, Unreachable};
    use VmStatus::*;

    #[test]
    fn only_settled_states_are_reset_targets() {
        #[rustfmt::skip]
        let rows: &[(VmStatus, bool)] = &[
            (Active, true), (Stopped, true), (Error, true), (Deleted, false), (Pending, false),
            (Starting, false), (Stopping, false), (Rebooting, false), (Resizing, false), (Deleting, false),
        ];
        for &(s, ok) in rows {
            assert_eq!(reset_allowed(s), ok, "{s}");
        }
    }

    /// Every target against every provider answer, as literal rows.
    #[test]
    fn a_reset_contradicts_what_the_provider_reports() {
        #[rustfmt::skip]
        let rows: &[(VmStatus, ProviderView, bool)] = &[
            (Active,  ProviderView::Power(Running), false),
            (Active,  ProviderView::Power(Off),     true),
            (Active,  Absent,                       true),
            (Active,  Unclear,                      true),
            (Active,  Unreachable,                  true),
            (Stopped, ProviderView::Power(Off),     false),
            (Stopped, ProviderView::Power(Running), true),
            (Stopped, Absent,                       true),
            (Stopped, Unclear,                      true),
            (Stopped, Unreachable,                  true),
            (Error,   ProviderView::Power(Running), false),
            (Error,   ProviderView::Power(Off),     false),
            (Error,   Absent,                       false),
            (Error,   Unreachable,                  false),
            (Deleted, ProviderView::Power(Off),     true),
        ];
        for &(target, seen, contradicts) in rows {
            assert_eq!(reset_contradiction(target, seen).is_some(), contradicts, "{target} seen {seen:?}");
        }
    }

    #[test]
    fn a_reset_meters_a_vm_that_starts_or_stops_running() {
        #[rustfmt::skip]
        let rows: &[(VmStatus, VmStatus, Option<Metering>)] = &[
            (Error,   Active,  Some(Metering::Started)),
            (Stopped, Active,  Some(Metering::Started)),
            (Active,  Active,  None),
            (Active,  Stopped, Some(Metering::Stopped)),
            (Active,  Error,   Some(Metering::Stopped)),
            (Error,   Stopped, None),
            (Stopping, Stopped, None),
        ];
        for &(from, to, m) in rows {
            assert_eq!(reset_metering(from, to), m, "{from} -> {to}");
        }
    }
}
