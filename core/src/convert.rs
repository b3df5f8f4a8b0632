//! Conversions between core's domain types and the wire types. The tenant
//! view is built here and only here, which is where "tenants never see
//! providers, hosts or native ids" is enforced: `vm_to_tenant` has no field
//! to put them in, and images lose their `source` for tenants.

use chrono::{DateTime, Utc};
use hcp_proto::{common, ops, provider, tenant};

use crate::model::{
    AuditEvent, Capabilities, DiskFormat, Flavor, Image, ImageStatus, ImageVisibility, Job, JobStatus,
    Provider, ProviderTransport, Vm, VmStatus, Volume, VolumeStatus, Zone,
};

/// Converts a time to a protobuf timestamp.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// Reads provider capability flags.
pub fn capabilities_from_proto(c: &provider::Capabilities) -> Capabilities {
    Capabilities {
        supports_cloud_init: c.supports_cloud_init,
        supports_snapshot: c.supports_snapshot,
        supports_live_migration: c.supports_live_migration,
        supports_console_vnc: c.supports_console_vnc,
        supports_console_spice: c.supports_console_spice,
        supports_console_rdp: c.supports_console_rdp,
        supports_console_serial: c.supports_console_serial,
        supports_gpu_passthrough: c.supports_gpu_passthrough,
        supports_snapshot_running: c.supports_snapshot_running,
        supports_resize: c.supports_resize,
        supports_hot_resize: c.supports_hot_resize,
        supports_cold_migration: c.supports_cold_migration,
        supports_volumes: c.supports_volumes,
        supports_hot_attach: c.supports_hot_attach,
        supports_volume_extend_in_use: c.supports_volume_extend_in_use,
        volumes_host_local: c.volumes_host_local,
        max_volumes_per_vm: c.max_volumes_per_vm,
        supports_console_log: c.supports_console_log,
        supports_image_import: c.supports_image_import,
        supports_capture: c.supports_capture,
        image_formats: c
            .image_formats()
            .filter_map(|f| match f {
                provider::DiskFormat::Qcow2 => Some(DiskFormat::Qcow2),
                provider::DiskFormat::Raw => Some(DiskFormat::Raw),
                provider::DiskFormat::Vmdk => Some(DiskFormat::Vmdk),
                provider::DiskFormat::Vhdx => Some(DiskFormat::Vhdx),
                provider::DiskFormat::Unspecified => None,
            })
            .collect(),
        attributes: c.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Writes provider capability flags.
pub fn capabilities_to_proto(c: &Capabilities) -> provider::Capabilities {
    provider::Capabilities {
        supports_cloud_init: c.supports_cloud_init,
        supports_snapshot: c.supports_snapshot,
        supports_live_migration: c.supports_live_migration,
        supports_console_vnc: c.supports_console_vnc,
        supports_console_spice: c.supports_console_spice,
        supports_console_rdp: c.supports_console_rdp,
        supports_console_serial: c.supports_console_serial,
        supports_gpu_passthrough: c.supports_gpu_passthrough,
        supports_snapshot_running: c.supports_snapshot_running,
        supports_resize: c.supports_resize,
        supports_hot_resize: c.supports_hot_resize,
        supports_cold_migration: c.supports_cold_migration,
        supports_volumes: c.supports_volumes,
        supports_hot_attach: c.supports_hot_attach,
        supports_volume_extend_in_use: c.supports_volume_extend_in_use,
        volumes_host_local: c.volumes_host_local,
        max_volumes_per_vm: c.max_volumes_per_vm,
        supports_console_log: c.supports_console_log,
        supports_image_import: c.supports_image_import,
        supports_capture: c.supports_capture,
        image_formats: c.image_formats.iter().map(|f| disk_format_to_proto(*f) as i32).collect(),
        attributes: c.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The wire form of a disk format.
pub fn disk_format_to_proto(f: DiskFormat) -> provider::DiskFormat {
    match f {
        DiskFormat::Qcow2 => provider::DiskFormat::Qcow2,
        DiskFormat::Raw => provider::DiskFormat::Raw,
        DiskFormat::Vmdk => provider::DiskFormat::Vmdk,
        DiskFormat::Vhdx => provider::DiskFormat::Vhdx,
    }
}

/// Maps a VM status to the wire enum.
pub fn vm_status_to_proto(s: VmStatus) -> tenant::VmStatus {
    match s {
        VmStatus::Pending => tenant::VmStatus::Pending,
        VmStatus::Active => tenant::VmStatus::Active,
        VmStatus::Stopped => tenant::VmStatus::Stopped,
        VmStatus::Error => tenant::VmStatus::Error,
        VmStatus::Deleted => tenant::VmStatus::Deleted,
        VmStatus::Starting => tenant::VmStatus::Starting,
        VmStatus::Stopping => tenant::VmStatus::Stopping,
        VmStatus::Rebooting => tenant::VmStatus::Rebooting,
        VmStatus::Resizing => tenant::VmStatus::Resizing,
        VmStatus::Deleting => tenant::VmStatus::Deleting,
    }
}

/// Maps a wire VM status to the domain (None for UNSPECIFIED).
pub fn vm_status_from_proto(s: tenant::VmStatus) -> Option<VmStatus> {
    Some(match s {
        tenant::VmStatus::Unspecified => return None,
        tenant::VmStatus::Pending => VmStatus::Pending,
        tenant::VmStatus::Active => VmStatus::Active,
        tenant::VmStatus::Stopped => VmStatus::Stopped,
        tenant::VmStatus::Error => VmStatus::Error,
        tenant::VmStatus::Deleted => VmStatus::Deleted,
        tenant::VmStatus::Starting => VmStatus::Starting,
        tenant::VmStatus::Stopping => VmStatus::Stopping,
        tenant::VmStatus::Rebooting => VmStatus::Rebooting,
        tenant::VmStatus::Resizing => VmStatus::Resizing,
        tenant::VmStatus::Deleting => VmStatus::Deleting,
    })
}

/// Maps a wire job status to the domain (None for UNSPECIFIED).
pub fn job_status_from_proto(s: tenant::JobStatus) -> Option<JobStatus> {
    Some(match s {
        tenant::JobStatus::Unspecified => return None,
        tenant::JobStatus::Queued => JobStatus::Queued,
        tenant::JobStatus::Running => JobStatus::Running,
        tenant::JobStatus::Succeeded => JobStatus::Succeeded,
        tenant::JobStatus::Failed => JobStatus::Failed,
        tenant::JobStatus::Cancelled => JobStatus::Cancelled,
    })
}

/// The tenant's view of a VM; `caps` are its provider's capabilities
/// (for `allowed_actions`; `None` when the provider is gone).
pub fn vm_to_tenant(vm: &Vm, caps: Option<&Capabilities>) -> tenant::Vm {
    let none = Capabilities::default();
    let allowed = crate::lifecycle::allowed_actions(vm.status, vm.current_job_id, caps.unwrap_or(&none));
    tenant::Vm {
        vm_id: vm.id.to_string(),
        project_id: vm.project_id.clone(),
        name: vm.name.clone(),
        flavor: vm.flavor.clone(),
        image: vm.image.clone(),
        zone: vm.zone.clone(),
        networks: vm
            .networks
            .iter()
            .map(|n| tenant::NetworkAttachment {
                network: n.network.clone(),
                mac: n.mac.clone(),
                ipv4: n.ipv4.clone(),
                ipv6: n.ipv6.clone(),
            })
            .collect(),
        metadata: vm.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        tags: vm.tags.clone(),
        status: vm_status_to_proto(vm.status) as i32,
        job_id: vm.current_job_id.map(|j| j.to_string()).unwrap_or_default(),
        error: vm.error_code.map(tenant_error),
        has_user_data: vm.user_data.is_some(),
        hostname: vm.hostname.clone(),
        created_at: Some(ts(vm.created_at)),
        updated_at: Some(ts(vm.updated_at)),
        allowed_actions: allowed.iter().map(|a| a.as_str().to_owned()).collect(),
        placement_group_id: vm.placement_group_id.map(|g| g.to_string()).unwrap_or_default(),
        restart_policy: restart_policy_to_proto(vm.restart_policy) as i32,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
        key_names: vm.ssh_keys.iter().map(|k| k.name.clone()).collect(),
    }
}

/// Maps a volume status to the wire enum.
pub fn volume_status_to_proto(s: VolumeStatus) -> tenant::volume::Status {
    use tenant::volume::Status as W;
    match s {
        VolumeStatus::Creating => W::Creating,
        VolumeStatus::Available => W::Available,
        VolumeStatus::Attaching => W::Attaching,
        VolumeStatus::InUse => W::InUse,
        VolumeStatus::Detaching => W::Detaching,
        VolumeStatus::Extending => W::Extending,
        VolumeStatus::Deleting => W::Deleting,
        VolumeStatus::Error => W::Error,
        VolumeStatus::Deleted => W::Deleted,
    }
}

/// Maps a wire volume status to the domain's (`None` for unspecified).
pub fn volume_status_from_proto(s: tenant::volume::Status) -> Option<VolumeStatus> {
    VolumeStatus::ALL.iter().copied().find(|v| volume_status_to_proto(*v) == s)
}

/// The tenant's view of a volume: no provider, storage, host or native id
/// (the message has no field for them). `vm` is the VM it is attached to,
/// for `allowed_actions`.
pub fn volume_to_tenant(
    v: &Volume,
    vm: Option<crate::lifecycle::AttachedVm>,
    caps: Option<&Capabilities>,
) -> tenant::Volume {
    let none = Capabilities::default();
    let mut allowed =
        crate::lifecycle::volume_allowed_actions(v.status, v.current_job_id, vm, caps.unwrap_or(&none));
    if v.attachment.is_some_and(|a| a.device_index == 0) {
        // A boot volume leaves its VM only with it, and grows with its disk.
        allowed.retain(|a| {
            !matches!(a, crate::lifecycle::VolumeAction::Detach | crate::lifecycle::VolumeAction::Extend)
        });
    }
    tenant::Volume {
        volume_id: v.id.to_string(),
        project_id: v.project_id.clone(),
        name: v.name.clone(),
        size_gib: v.size_gib,
        zone: v.zone.clone(),
        volume_type: v.volume_type.clone(),
        status: volume_status_to_proto(v.status) as i32,
        attachments: v
            .attachment
            .iter()
            .map(|a| tenant::VolumeAttachment { vm_id: a.vm_id.to_string(), device_index: a.device_index })
            .collect(),
        metadata: v.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        tags: v.tags.clone(),
        job_id: v.current_job_id.map(|j| j.to_string()).unwrap_or_default(),
        error: v.error_code.map(tenant_error),
        allowed_actions: allowed.iter().map(|a| a.as_str().to_owned()).collect(),
        created_at: Some(ts(v.created_at)),
        updated_at: Some(ts(v.updated_at)),
        delete_on_vm_delete: v.delete_on_vm_delete,
    }
}

/// A volume type on the wire; `for_ops` decides whether `storage` is shown.
pub fn volume_type_to_proto(t: &crate::model::VolumeType, for_ops: bool) -> common::VolumeType {
    common::VolumeType {
        name: t.name.clone(),
        description: t.description.clone(),
        max_size_gib: t.max_size_gib,
        storage: if for_ops {
            t.storage.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        } else {
            Default::default()
        },
        created_at: Some(ts(t.created_at)),
    }
}

/// What a tenant is told of a failed operation: the code and a sentence
/// made from it. The stored message is the provider's own text, which can
/// name nodes, hosts, storage or native ids; operators read it in the ops
/// job view (`GET /api/hcp/ops/v1/jobs/{id}`) and the logs.
pub fn tenant_error(code: hcp_proto::error::ErrorCode) -> tenant::OperationError {
    use hcp_proto::error::ErrorCode;
    let message = match code {
        ErrorCode::ProviderError => "the hypervisor refused or failed the operation",
        ErrorCode::ProviderUnavailable => "the hypervisor could not be reached",
        ErrorCode::DeadlineExceeded => "the hypervisor did not finish the operation in time",
        ErrorCode::InvalidArgument => "the hypervisor refused the request as invalid",
        ErrorCode::NotFound => "the hypervisor no longer has this resource",
        ErrorCode::Conflict => "the hypervisor's state did not allow the operation",
        ErrorCode::FeatureNotSupported => "the hypervisor does not support the operation",
        ErrorCode::QuotaExceeded => "the hypervisor is out of capacity",
        ErrorCode::Cancelled => "the operation was cancelled",
        _ => "the operation failed inside HCP",
    };
    tenant::OperationError {
        code: code.as_str().to_owned(),
        message: format!("{message}; an operator can see the details of this job"),
    }
}

/// The operator's view of a job, with the full error.
pub fn job_to_ops(job: &Job) -> hcp_proto::ops::OpsJob {
    hcp_proto::ops::OpsJob {
        job_id: job.id.to_string(),
        tenant_id: job.tenant_id.clone(),
        project_id: job.project_id.clone(),
        kind: job.kind.as_str().to_owned(),
        vm_id: job.vm_id.map(|v| v.to_string()).unwrap_or_default(),
        status: job.status.as_str().to_owned(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        actor: job.actor.clone(),
        error_code: job.error_code.map(|c| c.as_str().to_owned()).unwrap_or_default(),
        error_message: job.error_message.clone().unwrap_or_default(),
        created_at: Some(ts(job.created_at)),
        finished_at: job.finished_at.map(ts),
        cancel_requested: job.cancel_requested_at.is_some(),
        cancel_requested_by: job.cancel_requested_by.clone().unwrap_or_default(),
        steps: Vec::new(),
    }
}

/// A job's step log, for the operator's view.
pub fn job_steps_to_ops(steps: &[crate::store::StepRecord]) -> Vec<hcp_proto::ops::OpsJobStep> {
    steps
        .iter()
        .map(|s| hcp_proto::ops::OpsJobStep {
            step: s.step.as_str().to_owned(),
            status: s.status.as_str().to_owned(),
            finished_at: Some(ts(s.finished_at)),
        })
        .collect()
}

/// The tenant's view of a job.
pub fn job_to_tenant(job: &Job) -> tenant::Job {
    let status = match job.status {
        JobStatus::Queued => tenant::JobStatus::Queued,
        JobStatus::Running => tenant::JobStatus::Running,
        JobStatus::Succeeded => tenant::JobStatus::Succeeded,
        JobStatus::Failed => tenant::JobStatus::Failed,
        JobStatus::Cancelled => tenant::JobStatus::Cancelled,
    };
    // The last attempt's error is shown while a retry is pending too, so a
    // tenant can see why a job is taking long.
    tenant::Job {
        job_id: job.id.to_string(),
        project_id: job.project_id.clone(),
        kind: job.kind.as_str().to_owned(),
        resource_id: match (job.volume_id, job.vm_id) {
            (Some(volume), _) => volume.to_string(),
            (None, Some(vm)) => vm.to_string(),
            (None, None) => String::new(),
        },
        status: status as i32,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        error: job.error_code.map(tenant_error),
        created_at: Some(ts(job.created_at)),
        started_at: job.started_at.map(ts),
        finished_at: job.finished_at.map(ts),
        updated_at: Some(ts(job.updated_at)),
        vm_id: job.vm_id.map(|v| v.to_string()).unwrap_or_default(),
        actor: job.actor.clone(),
        request_id: job.request_id.clone(),
        snapshot_id: job.snapshot_id.map(|s| s.to_string()).unwrap_or_default(),
        volume_id: job.volume_id.map(|v| v.to_string()).unwrap_or_default(),
        cancel_requested: job.cancel_requested_at.is_some() && job.status == JobStatus::Running,
    }
}

/// A flavor on the wire.
pub fn flavor_to_proto(f: &Flavor) -> common::Flavor {
    common::Flavor {
        name: f.name.clone(),
        vcpus: f.vcpus,
        memory_mib: f.memory_mib,
        disk_gib: f.disk_gib,
        description: f.description.clone(),
        created_at: Some(ts(f.created_at)),
    }
}

/// An image on the wire; `for_ops` decides whether `source` is shown.
pub fn image_to_proto(i: &Image, for_ops: bool) -> common::Image {
    common::Image {
        name: i.name.clone(),
        os_type: i.os_type.clone(),
        source: if for_ops { i.source.clone() } else { String::new() },
        min_disk_gib: i.min_disk_gib,
        description: i.description.clone(),
        created_at: Some(ts(i.created_at)),
        backings: if for_ops {
            i.backings.iter().map(|(p, b)| (p.clone(), b.source.clone())).collect()
        } else {
            Default::default()
        },
        os_version: i.os_version.clone(),
        architecture: i.architecture.as_str().to_owned(),
        min_memory_mib: i.min_memory_mib,
        visibility: match i.visibility {
            ImageVisibility::Public => common::ImageVisibility::Public,
            ImageVisibility::Private => common::ImageVisibility::Private,
        } as i32,
        status: match i.status {
            ImageStatus::Importing => common::ImageStatus::Importing,
            ImageStatus::Available => common::ImageStatus::Available,
            ImageStatus::Error => common::ImageStatus::Error,
            ImageStatus::Deleting => common::ImageStatus::Deleting,
        } as i32,
        image_id: i.id.to_string(),
        project_id: i.project_id.clone(),
        size_bytes: i.size_bytes,
        sha256: i.sha256.clone(),
        error_message: i.error_message.clone().unwrap_or_default(),
        job_id: i.job_id.map(|j| j.to_string()).unwrap_or_default(),
    }
}

/// A network as tenants see it (no backings).
pub fn network_to_proto(n: &crate::model::Network) -> common::Network {
    common::Network {
        name: n.name.clone(),
        zone: n.zone.clone(),
        description: n.description.clone(),
        created_at: Some(ts(n.created_at)),
    }
}

/// A network as operators see it.
pub fn network_to_ops(n: &crate::model::Network) -> ops::NetworkDefinition {
    ops::NetworkDefinition {
        name: n.name.clone(),
        zone: n.zone.clone(),
        description: n.description.clone(),
        backings: n.backings.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        created_at: Some(ts(n.created_at)),
    }
}

/// A zone on the wire.
pub fn zone_to_proto(z: &Zone) -> common::Zone {
    common::Zone {
        name: z.name.clone(),
        description: z.description.clone(),
        created_at: Some(ts(z.created_at)),
    }
}

/// A provider as operators see it.
pub fn provider_to_proto(p: &Provider) -> ops::Provider {
    let transport = ProviderTransport::of(&p.endpoint);
    ops::Provider {
        provider_id: p.id.to_string(),
        name: p.name.clone(),
        zone: p.zone.clone(),
        endpoint: p.endpoint.clone(),
        plugin_name: p.plugin_name.clone(),
        plugin_version: p.plugin_version.clone(),
        hypervisor: p.hypervisor.clone(),
        protocol_version: p.protocol_version.clone(),
        capabilities: Some(capabilities_to_proto(&p.capabilities)),
        health: if p.healthy { ops::ProviderHealth::Healthy } else { ops::ProviderHealth::Unhealthy } as i32,
        health_message: p.health_message.clone(),
        last_probe_at: p.last_probe_at.map(ts),
        created_at: Some(ts(p.created_at)),
        has_credentials: p.has_credentials,
        transport: match transport {
            Some(ProviderTransport::Tls) => ops::ProviderTransport::Tls,
            Some(ProviderTransport::Unix) => ops::ProviderTransport::Unix,
            Some(ProviderTransport::Loopback | ProviderTransport::Plaintext) => {
                ops::ProviderTransport::Plaintext
            }
            None => ops::ProviderTransport::Unspecified,
        } as i32,
        // What is safe to show: fingerprints and names, never the key.
        tls: (transport == Some(ProviderTransport::Tls)).then(|| ops::ProviderTlsStatus {
            ca_sha256_fingerprints: p.tls.ca_pem.as_deref().map(fingerprints).unwrap_or_default(),
            server_name: p.tls.server_name.clone().unwrap_or_default(),
            has_client_certificate: p.tls.client_cert_pem.is_some(),
        }),
        allow_plaintext: p.allow_plaintext,
    }
}

/// SHA-256 fingerprints (`AA:BB:…`) of the certificates in `pem`; those
/// that do not parse are left out (a stored PEM was checked when it was
/// registered).
pub fn fingerprints(pem: &str) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(&c)))
        .collect()
}

/// An audit event as operators see it.
pub fn audit_to_proto(e: &AuditEvent) -> ops::AuditEvent {
    ops::AuditEvent {
        event_id: e.id.to_string(),
        at: Some(ts(e.at)),
        actor: e.actor.clone(),
        tenant_id: e.tenant_id.clone(),
        project_id: e.project_id.clone(),
        action: e.action.clone(),
        resource_type: e.resource_type.clone(),
        resource_id: e.resource_id.clone(),
        outcome: e.outcome.clone(),
        job_id: e.job_id.clone(),
        trace_id: e.trace_id.clone(),
        detail: e.detail.clone(),
    }
}

/// A snapshot as tenants see it.
pub fn snapshot_to_proto(s: &crate::model::Snapshot) -> tenant::Snapshot {
    use crate::model::SnapshotStatus as S;
    let status = match s.status {
        S::Creating => tenant::SnapshotStatus::Creating,
        S::Available => tenant::SnapshotStatus::Available,
        S::Error => tenant::SnapshotStatus::SnapshotError,
        S::Removing => tenant::SnapshotStatus::Removing,
        S::Removed => tenant::SnapshotStatus::Removed,
    };
    tenant::Snapshot {
        snapshot_id: s.id.to_string(),
        vm_id: s.vm_id.to_string(),
        name: s.name.clone(),
        status: status as i32,
        created_at: Some(ts(s.created_at)),
        updated_at: Some(ts(s.updated_at)),
    }
}

/// A restart policy on the wire (UNSPECIFIED reads as NEVER).
pub fn restart_policy_from_proto(p: tenant::RestartPolicy) -> crate::model::RestartPolicy {
    match p {
        tenant::RestartPolicy::Unspecified | tenant::RestartPolicy::Never => {
            crate::model::RestartPolicy::Never
        }
        tenant::RestartPolicy::OnFailure => crate::model::RestartPolicy::OnFailure,
        tenant::RestartPolicy::Always => crate::model::RestartPolicy::Always,
    }
}

/// A restart policy for the wire.
pub fn restart_policy_to_proto(p: crate::model::RestartPolicy) -> tenant::RestartPolicy {
    match p {
        crate::model::RestartPolicy::Never => tenant::RestartPolicy::Never,
        crate::model::RestartPolicy::OnFailure => tenant::RestartPolicy::OnFailure,
        crate::model::RestartPolicy::Always => tenant::RestartPolicy::Always,
    }
}

/// The tenant's view of a placement group and its members.
pub fn placement_group_to_tenant(
    g: &crate::model::PlacementGroup,
    members: &[crate::store::Member],
) -> tenant::PlacementGroup {
    tenant::PlacementGroup {
        placement_group_id: g.id.to_string(),
        project_id: g.project_id.clone(),
        name: g.name.clone(),
        policy: match g.policy {
            crate::model::GroupPolicy::Affinity => tenant::PlacementPolicy::Affinity,
            crate::model::GroupPolicy::AntiAffinity => tenant::PlacementPolicy::AntiAffinity,
        } as i32,
        strict: g.strict,
        vm_ids: members.iter().map(|m| m.vm_id.to_string()).collect(),
        created_at: Some(ts(g.created_at)),
    }
}

/// The tenant's view of a key pair (a public key; there is no private one).
pub fn key_pair_to_tenant(k: &crate::model::KeyPair) -> tenant::KeyPair {
    tenant::KeyPair {
        name: k.name.clone(),
        project_id: k.project_id.clone(),
        public_key: k.public_key.clone(),
        fingerprint: k.fingerprint.clone(),
        key_type: k.key_type.clone(),
        bits: k.bits,
        comment: k.comment.clone(),
        created_at: Some(ts(k.created_at)),
    }
}

/// The operators' view of a VM.
pub fn vm_to_ops(vm: &Vm) -> hcp_proto::ops::OpsVm {
    fleet_vm_to_ops(vm, None)
}

/// The operators' view of a VM, with when it entered its status when known.
pub fn fleet_vm_to_ops(vm: &Vm, status_since: Option<DateTime<Utc>>) -> hcp_proto::ops::OpsVm {
    hcp_proto::ops::OpsVm {
        status_since: status_since.map(ts),
        created_at: Some(ts(vm.created_at)),
        image: vm.image.clone(),
        flavor: vm.flavor.clone(),
        vm_id: vm.id.to_string(),
        tenant_id: vm.tenant_id.clone(),
        project_id: vm.project_id.clone(),
        name: vm.name.clone(),
        status: vm.status.as_str().to_owned(),
        zone: vm.zone.clone(),
        provider_id: vm.provider_id.to_string(),
        host: vm.host.clone(),
        job_id: vm.current_job_id.map(|j| j.to_string()).unwrap_or_default(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        restart_policy: vm.restart_policy.as_str().to_owned(),
        placement_group_id: vm.placement_group_id.map(|g| g.to_string()).unwrap_or_default(),
    }
}

/// The operators' view of a host, with what is placed on it.
pub fn host_to_ops(
    h: &crate::model::Host,
    load: crate::model::HostLoad,
    stuck: &[hcp_proto::ids::VmId],
) -> hcp_proto::ops::Host {
    hcp_proto::ops::Host {
        provider_id: h.provider_id.to_string(),
        name: h.name.clone(),
        vcpus: h.vcpus,
        memory_mib: h.memory_mib,
        state: h.state.as_str().to_owned(),
        drain: h.drain.as_str().to_owned(),
        vms: load.vms,
        used_vcpus: u32::try_from(load.vcpus).unwrap_or(u32::MAX),
        used_memory_mib: load.memory_mib,
        stuck_vm_ids: stuck.iter().map(|v| v.to_string()).collect(),
        updated_at: Some(ts(h.updated_at)),
    }
}
