//! `hcp.ops.v1` hosts, moves and zone placement: the hosts of a provider
//! with what HCP placed on them, drains, migrations, the operators' view of
//! a VM and a zone's placement settings. Reads need an ops role; writes
//! need `ops.admin`.

use std::collections::HashMap;

use hcp_proto::error::{ApiError, excerpt};
use hcp_proto::ids::{ProviderId, VmId};
use hcp_proto::ops::{self, HostRequest, ListHostsResponse, OpsVm};
use hcp_proto::tenant::VmOperationAccepted;

use super::{ApiContext, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert::{host_to_ops, vm_to_ops};
use crate::error::from_store;
use crate::model::{Drain, HostLoad, PlacementPolicy, VmStatus, ZonePlacement, now};
use crate::moves::{Asker, Moves};
use crate::store::StoreError;

/// The hosts of a provider.
pub async fn list(ctx: &ApiContext, p: &Principal, provider_id: &str) -> Result<ListHostsResponse, ApiError> {
    p.ops(Access::Read)?;
    let id: ProviderId = validate::id("provider_id", provider_id)?;
    ctx.store.get_provider(id).await.map_err(|e| from_store(e, &format!("provider {id}")))?;
    let hosts = ctx.store.list_hosts(Some(id)).await.map_err(|e| from_store(e, "hosts"))?;
    let loads = loads(ctx).await?;
    let mut out = Vec::with_capacity(hosts.len());
    for h in &hosts {
        out.push(view(ctx, h, &loads).await?);
    }
    Ok(ListHostsResponse { hosts: out })
}

/// What is placed on each host, read once per answer.
async fn loads(ctx: &ApiContext) -> Result<HashMap<(ProviderId, String), HostLoad>, ApiError> {
    Ok(ctx.store.host_loads().await.map_err(|e| from_store(e, "hosts"))?.into_iter().collect())
}

async fn view(
    ctx: &ApiContext,
    h: &crate::model::Host,
    loads: &HashMap<(ProviderId, String), HostLoad>,
) -> Result<ops::Host, ApiError> {
    let load = loads.get(&(h.provider_id, h.name.clone())).copied().unwrap_or_default();
    // During a drain: VMs whose move failed, and VMs in ERROR, which
    // cannot move until someone repairs or deletes them.
    let stuck = match (h.drain, h.drain_started_at) {
        (Drain::Draining, Some(since)) => {
            let mut stuck = ctx
                .store
                .failed_moves(h.provider_id, &h.name, since)
                .await
                .map_err(|e| from_store(e, "jobs"))?;
            let here =
                ctx.store.vms_on_host(h.provider_id, &h.name).await.map_err(|e| from_store(e, "vms"))?;
            let broken: Vec<_> = here
                .iter()
                .filter(|v| v.status == VmStatus::Error && !stuck.contains(&v.id))
                .map(|v| v.id)
                .collect();
            stuck.extend(broken);
            stuck
        }
        _ => Vec::new(),
    };
    Ok(host_to_ops(h, load, &stuck))
}

/// Starts (`drain`) or ends a drain of a host; returns the host as it is now.
pub async fn set_drain(
    ctx: &ApiContext,
    p: &Principal,
    req: HostRequest,
    drain: bool,
) -> Result<ops::Host, ApiError> {
    p.ops(Access::Write)?;
    let id: ProviderId = validate::id("provider_id", &req.provider_id)?;
    validate::required("host", &req.host)?;
    validate::text("host", &req.host, validate::MAX_HOST)?;
    let host = find(ctx, id, &req.host).await?;
    let next = match (drain, host.drain) {
        (true, Drain::InService) => Some(Drain::Draining),
        (true, _) => None,
        (false, Drain::InService) => None,
        (false, _) => Some(Drain::InService),
    };
    if let Some(next) = next {
        let action = if drain { AuditAction::HostDrain } else { AuditAction::HostUndrain };
        let resource = Resource::Host { provider: id, name: &host.name };
        let mut audit = ctx.audit(p, action, resource, AuditOutcome::Succeeded);
        audit.detail = format!("{} -> {}", host.drain.as_str(), next.as_str());
        ctx.store.set_drain(id, &host.name, next, now()).await.map_err(|e| from_store(e, "host"))?;
        ctx.append_audit(&audit).await?;
        tracing::info!(provider = %id, host = %host.name, drain = next.as_str(), "host drain state changed");
    }
    let host = find(ctx, id, &req.host).await?;
    view(ctx, &host, &loads(ctx).await?).await
}

async fn find(ctx: &ApiContext, provider: ProviderId, name: &str) -> Result<crate::model::Host, ApiError> {
    ctx.store.get_provider(provider).await.map_err(|e| from_store(e, &format!("provider {provider}")))?;
    let hosts = ctx.store.list_hosts(Some(provider)).await.map_err(|e| from_store(e, "hosts"))?;
    hosts.into_iter().find(|h| h.name == name).ok_or_else(|| ApiError::not_found("host", excerpt(name)))
}

/// The operators' view of a VM.
pub async fn get_vm(ctx: &ApiContext, p: &Principal, vm_id: &str) -> Result<OpsVm, ApiError> {
    p.ops(Access::Read)?;
    let id: VmId = validate::id("vm_id", vm_id)?;
    let vm = ctx.store.get_vm_internal(id).await.map_err(|e| from_store(e, &format!("vm {id}")))?;
    Ok(vm_to_ops(&vm))
}

/// Accepts a migration.
pub async fn migrate(
    ctx: &ApiContext,
    p: &Principal,
    request_id: &str,
    req: ops::MigrateVmRequest,
) -> Result<VmOperationAccepted, ApiError> {
    p.ops(Access::Write)?;
    let id: VmId = validate::id("vm_id", &req.vm_id)?;
    // Found, then no job in flight (named in details.job_id), before
    // anything else about the request.
    match ctx.store.get_vm_internal(id).await {
        Ok(vm) if vm.status == VmStatus::Deleted => return Err(ApiError::not_found("vm", id)),
        Ok(vm) => {
            if let Some(job) = vm.current_job_id {
                let message = format!("vm {id} is {}: job {job} is operating on it", vm.status);
                return Err(from_store(StoreError::Busy { job, message }, "vm"));
            }
        }
        Err(e) => return Err(from_store(e, &format!("vm {id}"))),
    }
    hcp_proto::rules::check(&req)?;
    let target = if req.target_host.is_empty() {
        None
    } else {
        validate::text("target_host", &req.target_host, validate::MAX_HOST)?;
        Some(req.target_host.as_str())
    };
    let moves = Moves::new(ctx.store.clone(), ctx.queue.clone(), ctx.config.jobs.max_attempts);
    let asker = Asker { actor: &p.subject, request_id };
    let (vm, job) = moves.migrate(&asker, id, target, req.live).await?;
    tracing::info!(vm_id = %vm.id, job_id = %job.id, "vm migration accepted");
    Ok(VmOperationAccepted {
        vm_id: vm.id.to_string(),
        job_id: job.id.to_string(),
        snapshot_id: None,
        volume_id: None,
        image_id: None,
    })
}

/// A zone's placement settings.
pub async fn get_zone_placement(
    ctx: &ApiContext,
    p: &Principal,
    zone: &str,
) -> Result<ops::ZonePlacement, ApiError> {
    p.ops(Access::Read)?;
    validate::label("zone", zone)?;
    let z = ctx.store.zone_placement(zone).await.map_err(|e| from_store(e, &format!("zone {zone}")))?;
    Ok(zone_to_ops(&z))
}

/// Sets a zone's placement settings.
pub async fn set_zone_placement(
    ctx: &ApiContext,
    p: &Principal,
    req: ops::SetZonePlacementRequest,
) -> Result<ops::ZonePlacement, ApiError> {
    p.ops(Access::Write)?;
    let z = req;
    validate::label("zone", &z.zone)?;
    let policy = if z.policy.is_empty() {
        PlacementPolicy::Spread
    } else {
        PlacementPolicy::parse(&z.policy).ok_or_else(|| {
            ApiError::invalid_field(
                "policy",
                format!("policy must be spread or pack, got {}", excerpt(&z.policy)),
            )
        })?
    };
    let ratio = |field: &str, v: Option<f64>, default: f64| -> Result<f64, ApiError> {
        let Some(v) = v else { return Ok(default) };
        if !(1.0..=64.0).contains(&v) {
            return Err(ApiError::invalid_field(field, format!("{field} must be between 1 and 64, got {v}")));
        }
        Ok(v)
    };
    let settings = ZonePlacement {
        zone: z.zone.clone(),
        policy,
        cpu_overcommit: ratio("cpu_overcommit", z.cpu_overcommit, crate::model::DEFAULT_CPU_OVERCOMMIT)?,
        memory_overcommit: ratio(
            "memory_overcommit",
            z.memory_overcommit,
            crate::model::DEFAULT_MEMORY_OVERCOMMIT,
        )?,
    };
    let mut audit =
        ctx.audit(p, AuditAction::ZonePlacement, Resource::Zone(&settings.zone), AuditOutcome::Succeeded);
    audit.detail = format!(
        "{} cpu x{} memory x{}",
        settings.policy, settings.cpu_overcommit, settings.memory_overcommit
    );
    ctx.store
        .set_zone_placement(&settings)
        .await
        .map_err(|e| from_store(e, &format!("zone {}", settings.zone)))?;
    ctx.append_audit(&audit).await?;
    Ok(zone_to_ops(&settings))
}

fn zone_to_ops(z: &ZonePlacement) -> ops::ZonePlacement {
    ops::ZonePlacement {
        zone: z.zone.clone(),
        policy: z.policy.as_str().to_owned(),
        cpu_overcommit: z.cpu_overcommit,
        memory_overcommit: z.memory_overcommit,
    }
}
