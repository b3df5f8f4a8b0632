//! The audit trail's vocabulary as types: what was done ([`AuditAction`]),
//! to what ([`Resource`]) and how it ended ([`AuditOutcome`]). The trail
//! stores their names; these are the only places they are spelled, and
//! [`AuditEvent::new`](crate::model::AuditEvent::new) is how an event is
//! made.

use hcp_proto::ids::{JobId, PlacementGroupId, ProviderId, VmId, VolumeId, WebhookId};

use crate::lifecycle::Verdict;
use crate::model::JobKind;

/// What an actor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    /// An operation run as a job (`vm.create`, `snapshot.revert`, ...):
    /// accepted, then finished or cancelled.
    Job(JobKind),
    /// A VM's name, metadata or tags changed.
    VmUpdate,
    /// A console token issued, redeemed, refused or its session closed.
    VmConsole,
    /// A queued job cancelled.
    JobCancel,
    /// A provider registered.
    ProviderRegister,
    /// A provider removed.
    ProviderRemove,
    /// A flavor created.
    FlavorCreate,
    /// A flavor deleted.
    FlavorDelete,
    /// An image created.
    ImageCreate,
    /// An image deleted (or its removal from providers accepted).
    ImageDelete,
    /// What one provider resolves an image to, set or removed.
    ImageBackingSet,
    /// A zone created.
    ZoneCreate,
    /// A zone deleted.
    ZoneDelete,
    /// A network created or changed.
    NetworkCreate,
    /// A network deleted.
    NetworkDelete,
    /// A zone's placement settings changed.
    ZonePlacement,
    /// A project's quota set.
    QuotaSet,
    /// A placement group created.
    PlacementGroupCreate,
    /// A placement group deleted.
    PlacementGroupDelete,
    /// A host put in drain (or a VM the drain could not move).
    HostDrain,
    /// A host back in service.
    HostUndrain,
    /// The reconciler recorded the host a VM was moved to without HCP.
    ReconcileHost,
    /// The reconciler found a VM missing on its hypervisor.
    ReconcileMissing,
    /// The reconciler found a VM's power state changed without HCP.
    ReconcilePower,
    /// The reconciler could not start a recovery.
    ReconcileRestart,
    /// The reconciler found a VM HCP does not know.
    ReconcileOrphan,
    /// The reconciler recorded a volume attached or detached without HCP.
    ReconcileAttachment,
    /// An operator set a VM's state by hand.
    VmResetState,
    /// An operator removed a VM whose provider or host is gone.
    VmForceDelete,
    /// The reconciler deleted (or found gone) a force-deleted VM's
    /// leftover on its provider.
    ReconcileLeftover,
    /// A volume's name, metadata or tags changed.
    VolumeUpdate,
    /// A volume type created.
    VolumeTypeCreate,
    /// A volume type deleted.
    VolumeTypeDelete,
    /// An SSH key pair imported.
    KeyPairCreate,
    /// An SSH key pair deleted.
    KeyPairDelete,
    /// A webhook endpoint registered.
    WebhookCreate,
    /// A webhook endpoint deleted.
    WebhookDelete,
    /// A disabled webhook endpoint enabled again.
    WebhookEnable,
}

impl AuditAction {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Job(kind) => kind.as_str(),
            AuditAction::VmUpdate => "vm.update",
            AuditAction::VmConsole => "vm.console",
            AuditAction::JobCancel => "job.cancel",
            AuditAction::ProviderRegister => "provider.register",
            AuditAction::ProviderRemove => "provider.remove",
            AuditAction::FlavorCreate => "flavor.create",
            AuditAction::FlavorDelete => "flavor.delete",
            AuditAction::ImageCreate => "image.create",
            AuditAction::ImageDelete => "image.delete",
            AuditAction::ImageBackingSet => "image.backing.set",
            AuditAction::ZoneCreate => "zone.create",
            AuditAction::ZoneDelete => "zone.delete",
            AuditAction::NetworkCreate => "network.create",
            AuditAction::NetworkDelete => "network.delete",
            AuditAction::ZonePlacement => "zone.placement",
            AuditAction::QuotaSet => "quota.set",
            AuditAction::PlacementGroupCreate => "placement_group.create",
            AuditAction::PlacementGroupDelete => "placement_group.delete",
            AuditAction::HostDrain => "host.drain",
            AuditAction::HostUndrain => "host.undrain",
            AuditAction::ReconcileHost => "reconcile.host",
            AuditAction::ReconcileMissing => "reconcile.missing",
            AuditAction::ReconcilePower => "reconcile.power",
            AuditAction::ReconcileRestart => "reconcile.restart",
            AuditAction::ReconcileOrphan => "reconcile.orphan",
            AuditAction::ReconcileAttachment => "reconcile.attachment",
            AuditAction::VmResetState => "vm.reset_state",
            AuditAction::VmForceDelete => "vm.force_delete",
            AuditAction::ReconcileLeftover => "reconcile.leftover",
            AuditAction::VolumeUpdate => "volume.update",
            AuditAction::VolumeTypeCreate => "volume_type.create",
            AuditAction::VolumeTypeDelete => "volume_type.delete",
            AuditAction::KeyPairCreate => "key_pair.create",
            AuditAction::KeyPairDelete => "key_pair.delete",
            AuditAction::WebhookCreate => "webhook.create",
            AuditAction::WebhookDelete => "webhook.delete",
            AuditAction::WebhookEnable => "webhook.enable",
        }
    }
}

/// What an action was done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A VM.
    Vm(VmId),
    /// A job.
    Job(JobId),
    /// A provider.
    Provider(ProviderId),
    /// A flavor, by name.
    Flavor(&'a str),
    /// An image, by name.
    Image(&'a str),
    /// A zone, by name.
    Zone(&'a str),
    /// A network of a zone.
    Network {
        /// The zone.
        zone: &'a str,
        /// The network's name.
        name: &'a str,
    },
    /// A project (its quota).
    Project(&'a str),
    /// A placement group.
    PlacementGroup(PlacementGroupId),
    /// A provider's host.
    Host {
        /// The provider.
        provider: ProviderId,
        /// The host's name.
        name: &'a str,
    },
    /// A volume.
    Volume(VolumeId),
    /// A volume type, by name.
    VolumeType(&'a str),
    /// A project's key pair, by name (the event's project says whose).
    KeyPair(&'a str),
    /// A webhook endpoint.
    Webhook(WebhookId),
}

impl Resource<'_> {
    /// The stored resource type.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Vm(_) => "vm",
            Resource::Job(_) => "job",
            Resource::Provider(_) => "provider",
            Resource::Flavor(_) => "flavor",
            Resource::Image(_) => "image",
            Resource::Zone(_) => "zone",
            Resource::Network { .. } => "network",
            Resource::Project(_) => "project",
            Resource::PlacementGroup(_) => "placement_group",
            Resource::Host { .. } => "host",
            Resource::Volume(_) => "volume",
            Resource::VolumeType(_) => "volume_type",
            Resource::KeyPair(_) => "key_pair",
            Resource::Webhook(_) => "webhook",
        }
    }

    /// The stored resource id.
    pub fn id(&self) -> String {
        match self {
            Resource::Vm(id) => id.to_string(),
            Resource::Job(id) => id.to_string(),
            Resource::Provider(id) => id.to_string(),
            Resource::Flavor(name)
            | Resource::Image(name)
            | Resource::Zone(name)
            | Resource::Project(name)
            | Resource::VolumeType(name)
            | Resource::KeyPair(name) => (*name).to_owned(),
            Resource::Volume(id) => id.to_string(),
            Resource::Network { zone, name } => format!("{zone}/{name}"),
            Resource::PlacementGroup(id) => id.to_string(),
            Resource::Host { provider, name } => format!("{provider}/{name}"),
            Resource::Webhook(id) => id.to_string(),
        }
    }
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome<'a> {
    /// A job was accepted for it.
    Accepted,
    /// Done.
    Succeeded,
    /// Failed (the detail says why).
    Failed,
    /// A console token was issued.
    Issued,
    /// A console session opened.
    Opened,
    /// Refused, with why when there is a short reason.
    Refused(Option<&'a str>),
    /// A console session closed, and why.
    Closed(&'a str),
    /// What the reconciler made of a drift.
    Drift(Verdict),
    /// The reconciler recorded what it found (a host).
    Recorded,
}

impl std::fmt::Display for AuditOutcome<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditOutcome::Accepted => f.write_str("accepted"),
            AuditOutcome::Succeeded => f.write_str("succeeded"),
            AuditOutcome::Failed => f.write_str("failed"),
            AuditOutcome::Issued => f.write_str("issued"),
            AuditOutcome::Opened => f.write_str("opened"),
            AuditOutcome::Refused(None) => f.write_str("refused"),
            AuditOutcome::Refused(Some(why)) => write!(f, "refused: {why}"),
            AuditOutcome::Closed(reason) => write!(f, "closed: {reason}"),
            AuditOutcome::Drift(verdict) => f.write_str(verdict.as_str()),
            AuditOutcome::Recorded => f.write_str("recorded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_ones_the_trail_stores() {
        let vm = VmId::new();
        let p = ProviderId::new();
        let rows: &[(AuditAction, Resource<'_>, AuditOutcome<'_>, &str, &str, String, &str)] = &[
            (
                AuditAction::Job(JobKind::CreateVm),
                Resource::Vm(vm),
                AuditOutcome::Accepted,
                "vm.create",
                "vm",
                vm.to_string(),
                "accepted",
            ),
            (
                AuditAction::VmConsole,
                Resource::Vm(vm),
                AuditOutcome::Refused(Some("vm gone")),
                "vm.console",
                "vm",
                vm.to_string(),
                "refused: vm gone",
            ),
            (
                AuditAction::VmConsole,
                Resource::Vm(vm),
                AuditOutcome::Closed("client left"),
                "vm.console",
                "vm",
                vm.to_string(),
                "closed: client left",
            ),
            (
                AuditAction::NetworkCreate,
                Resource::Network { zone: "z1", name: "lan" },
                AuditOutcome::Succeeded,
                "network.create",
                "network",
                "z1/lan".to_owned(),
                "succeeded",
            ),
            (
                AuditAction::HostDrain,
                Resource::Host { provider: p, name: "h1" },
                AuditOutcome::Refused(None),
                "host.drain",
                "host",
                format!("{p}/h1"),
                "refused",
            ),
            (
                AuditAction::ReconcileMissing,
                Resource::Vm(vm),
                AuditOutcome::Drift(Verdict::Reaped),
                "reconcile.missing",
                "vm",
                vm.to_string(),
                "reaped",
            ),
            (
                AuditAction::PlacementGroupDelete,
                Resource::Project("p1"),
                AuditOutcome::Failed,
                "placement_group.delete",
                "project",
                "p1".to_owned(),
                "failed",
            ),
        ];
        for (action, resource, outcome, a, kind, id, o) in rows {
            assert_eq!(
                (action.as_str(), resource.kind(), resource.id(), outcome.to_string()),
                (*a, *kind, id.clone(), (*o).to_owned())
            );
        }
    }
}
