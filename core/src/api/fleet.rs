//! `hcp.ops.v1` fleet operations: VMs across tenants (filters, keyset
//! pages, counts), a tenant's VM started, stopped, rebooted or deleted by
//! an operator (the tenant's own accepting path, the operator as actor), a
//! VM's state set by hand after asking its provider (`ResetVmState`), a VM
//! removed whose provider or host is gone (`ForceDeleteVm`) and what such
//! removals left on providers (`ListVmLeftovers`). Reads need an ops role;
//! writes need `ops.admin`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{ProviderId, VmId};
use hcp_proto::ops::{self, ListOpsVmsRequest, ListOpsVmsResponse, OpsVmCounts};
use hcp_proto::provider;
use hcp_proto::tenant::VmOperationAccepted;

use super::page::Binding;
use super::{ApiContext, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::{self, JobParams, Power, ProviderView};
use crate::model::{self, JobKind, VmStatus, now};
use crate::store::{FleetQuery, ForceDelete, StoreError};

/// How long a reset waits for the provider's answer.
const PROVIDER_ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The fleet listing, one page; the counts on the first.
pub async fn list(
    ctx: &ApiContext,
    p: &Principal,
    r: &ListOpsVmsRequest,
) -> Result<ListOpsVmsResponse, ApiError> {
    p.ops(Access::Read)?;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    // An id no provider has matches nothing (a removed provider's VMs
    // are gone with it): only its form is checked.
    let provider = match r.provider_id.as_str() {
        "" => None,
        id => Some(validate::id::<ProviderId>("provider_id", id)?),
    };
    let mut status = match hcp_proto::tenant::VmStatus::try_from(r.status) {
        Ok(s) => convert::vm_status_from_proto(s),
        Err(_) => return Err(ApiError::invalid_field("status", format!("unknown status {}", r.status))),
    };
    let status_since_before = match r.error_for_minutes {
        0 => None,
        n => {
            if status.is_some_and(|s| s != VmStatus::Error) {
                return Err(ApiError::invalid_field(
                    "error_for_minutes",
                    "error_for_minutes selects VMs in ERROR; it cannot go with another status",
                ));
            }
            status = Some(VmStatus::Error);
            Some(now() - chrono::Duration::minutes(i64::from(n)))
        }
    };
    let query = FleetQuery {
        page_size: validate::page_size(r.page_size, 100)?,
        after: None,
        tenant: non_empty(&r.tenant_id),
        project: non_empty(&r.project_id),
        provider,
        host: non_empty(&r.host),
        zone: non_empty(&r.zone),
        status,
        image: non_empty(&r.image),
        flavor: non_empty(&r.flavor),
        name_prefix: non_empty(&r.name_prefix),
        created_before: time("created_before", &r.created_before)?,
        created_after: time("created_after", &r.created_after)?,
        status_since_before,
    };
    let mut binding = Binding::new("fleet");
    binding.push(&p.subject);
    for part in [&r.tenant_id, &r.project_id, &r.provider_id, &r.host, &r.zone, &r.image, &r.flavor] {
        binding.push(part);
    }
    binding.push(status.map(|s| s.as_str()).unwrap_or(""));
    binding.push(&r.name_prefix).push(&r.created_before).push(&r.created_after);
    binding.push(&r.error_for_minutes.to_string());
    let first = r.page_token.is_empty();
    let query = FleetQuery { after: ctx.pages.open(&binding, &r.page_token)?, ..query };
    let (vms, next) = ctx.store.list_fleet(&query).await.map_err(|e| from_store(e, "vms"))?;
    let counts = if first {
        let rows = ctx.store.count_fleet(&query).await.map_err(|e| from_store(e, "vms"))?;
        let mut c = OpsVmCounts::default();
        for row in rows {
            let n = u32::try_from(row.vms).unwrap_or(u32::MAX);
            c.total += n;
            *c.by_status.entry(row.status.as_str().to_owned()).or_default() += n;
            *c.by_provider.entry(row.provider.to_string()).or_default() += n;
            *c.by_host.entry(format!("{}/{}", row.provider, row.host)).or_default() += n;
        }
        Some(c)
    } else {
        None
    };
    Ok(ListOpsVmsResponse {
        vms: vms.iter().map(|v| convert::fleet_vm_to_ops(&v.vm, Some(v.status_since))).collect(),
        next_page_token: next.map(|last| ctx.pages.seal(&binding, last)).unwrap_or_default(),
        counts,
    })
}

/// An RFC 3339 time filter; empty is none.
fn time(field: &str, value: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(value).map(|t| Some(t.with_timezone(&Utc))).map_err(|_| {
        ApiError::invalid_field(field, format!("{field} must be an RFC 3339 time, got {}", excerpt(value)))
    })
}

/// The VM an operator's write names, when it exists, is not deleted, and
/// (with `idle`) has no job in flight (409 naming it), whatever else is
/// wrong with the request.
async fn found(ctx: &ApiContext, vm_id: &str, idle: bool) -> Result<model::Vm, ApiError> {
    let id: VmId = validate::id("vm_id", vm_id)?;
    let vm = ctx.store.get_vm_internal(id).await.map_err(|e| from_store(e, &format!("vm {id}")))?;
    if vm.status == VmStatus::Deleted {
        return Err(ApiError::not_found("vm", id));
    }
    if idle && let Some(job) = vm.current_job_id {
        let message = format!("vm {id} is {}: job {job} is operating on it", vm.status);
        return Err(from_store(StoreError::Busy { job, message }, "vm"));
    }
    Ok(vm)
}

/// What an operator asks of a tenant's VM, as a job.
pub enum Action {
    /// Start it.
    Start,
    /// Stop it.
    Stop {
        /// Power off at once.
        force: bool,
        /// The guest's time to stop.
        timeout_seconds: u32,
    },
    /// Reboot it.
    Reboot {
        /// Reset.
        hard: bool,
    },
    /// Delete it.
    Delete,
}

/// Accepts an operator's start, stop, reboot or delete of a tenant's VM
/// through the tenant's own accepting transaction (the store checks the
/// state), with the operator as the job's actor. `rules` are the
/// request's field rules, checked after the VM's job in flight.
pub async fn operate(
    ctx: &ApiContext,
    p: &Principal,
    request_id: String,
    vm_id: &str,
    action: Action,
    rules: Result<(), ApiError>,
) -> Result<VmOperationAccepted, ApiError> {
    p.ops(Access::Write)?;
    let vm = found(ctx, vm_id, true).await?;
    rules?;
    let (kind, params) = match action {
        Action::Start => (JobKind::StartVm, JobParams::None),
        Action::Stop { force, timeout_seconds } => {
            (JobKind::StopVm, JobParams::Stop { force, timeout_seconds })
        }
        Action::Reboot { hard } => (JobKind::RebootVm, JobParams::Reboot { hard }),
        Action::Delete => (JobKind::DeleteVm, JobParams::None),
    };
    super::tenant::TenantApi::new(ctx.clone()).operate_as(p, &vm, kind, params, request_id).await
}

/// Sets a VM's state by hand, after asking its provider.
pub async fn reset_state(
    ctx: &ApiContext,
    p: &Principal,
    req: ops::ResetVmStateRequest,
) -> Result<ops::ResetVmStateResponse, ApiError> {
    p.ops(Access::Write)?;
    // The request's field rules were checked first (`OpsApi::write`).
    let vm = found(ctx, &req.vm_id, true).await?;
    let to = hcp_proto::tenant::VmStatus::try_from(req.status)
        .ok()
        .and_then(convert::vm_status_from_proto)
        .filter(|s| lifecycle::reset_allowed(*s))
        .ok_or_else(|| {
            ApiError::invalid_field(
                "status",
                format!("status must be ACTIVE, STOPPED or ERROR, got {}", req.status),
            )
        })?;
    let (seen, said) = ask_provider(ctx, &vm).await;
    let forced = match lifecycle::reset_contradiction(to, seen) {
        None => false,
        Some(_) if req.force => true,
        Some(why) => {
            let code = if seen == ProviderView::Unreachable {
                ErrorCode::ProviderUnavailable
            } else {
                ErrorCode::Conflict
            };
            return Err(ApiError::new(
                code,
                format!("cannot reset vm {} to {to}: {why}; force sets it anyway", vm.id),
            )
            .with_detail("provider_state", said.clone()));
        }
    };
    let mut audit = ctx.audit(p, AuditAction::VmResetState, Resource::Vm(vm.id), AuditOutcome::Succeeded);
    audit.tenant_id = vm.tenant_id.clone();
    audit.project_id = vm.project_id.clone();
    audit.detail = format!(
        "{} -> {to}; provider {said}{}; reason: {}",
        vm.status,
        if forced { "; forced" } else { "" },
        req.reason
    );
    let revoke = (to != VmStatus::Active).then(|| format!("the vm was set to {to} by an operator"));
    let message = format!("set to ERROR by an operator: {}", req.reason);
    ctx.store
        .reset_vm_state(
            vm.id,
            vm.status,
            to,
            &message,
            lifecycle::reset_metering(vm.status, to),
            revoke.as_deref(),
            &audit,
        )
        .await
        .map_err(|e| from_store(e, &format!("vm {}", vm.id)))?;
    tracing::info!(vm_id = %vm.id, from = %vm.status, to = %to, forced, "vm state reset by an operator");
    let now_vm = ctx.store.get_vm_internal(vm.id).await.map_err(|e| from_store(e, "vm"))?;
    Ok(ops::ResetVmStateResponse { vm: Some(convert::vm_to_ops(&now_vm)), provider_state: said, forced })
}

/// What the VM's provider says about it (GetVm), and how to name that.
async fn ask_provider(ctx: &ApiContext, vm: &model::Vm) -> (ProviderView, String) {
    let unreachable = (ProviderView::Unreachable, "UNREACHABLE".to_owned());
    let Ok(provider) = ctx.store.get_provider(vm.provider_id).await else { return unreachable };
    let Ok(mut compute) = ctx.clients.compute(&provider) else { return unreachable };
    let asked = compute.get_vm(provider::VmRef { vm_id: vm.id.to_string() });
    match tokio::time::timeout(PROVIDER_ASK_TIMEOUT, asked).await {
        Ok(Ok(info)) => {
            let power = provider::PowerState::try_from(info.into_inner().power_state)
                .unwrap_or(provider::PowerState::Unspecified);
            let view = match power {
                provider::PowerState::Running => ProviderView::Power(Power::Running),
                provider::PowerState::Shutoff | provider::PowerState::Crashed => {
                    ProviderView::Power(Power::Off)
                }
                _ => ProviderView::Unclear,
            };
            (view, power.as_str_name().trim_start_matches("POWER_STATE_").to_owned())
        }
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
            (ProviderView::Absent, "ABSENT".to_owned())
        }
        _ => unreachable,
    }
}

/// Removes a VM whose provider or host is gone.
pub async fn force_delete(
    ctx: &ApiContext,
    p: &Principal,
    req: ops::ForceDeleteVmRequest,
) -> Result<ops::ForceDeleteVmResponse, ApiError> {
    p.ops(Access::Write)?;
    // The request's field rules were checked first (`OpsApi::write`):
    // whether a job in flight is refused depends on them.
    let vm = found(ctx, &req.vm_id, !req.force).await?;
    let leftover = req.leftover.unwrap_or(true);
    let mut audit = ctx.audit(p, AuditAction::VmForceDelete, Resource::Vm(vm.id), AuditOutcome::Succeeded);
    audit.tenant_id = vm.tenant_id.clone();
    audit.project_id = vm.project_id.clone();
    audit.detail = format!(
        "was {} on provider {} host {}; leftover {}; reason: {}",
        vm.status,
        vm.provider_id,
        vm.host,
        if leftover { "recorded" } else { "none (known gone)" },
        req.reason
    );
    if let Some(job) = vm.current_job_id {
        audit.job_id = job.to_string();
    }
    let fd = ForceDelete { vm: vm.id, end_job: req.force, leftover, reason: req.reason.clone(), audit };
    let done = ctx.store.force_delete_vm(&fd).await.map_err(|e| from_store(e, &format!("vm {}", vm.id)))?;
    tracing::warn!(
        vm_id = %vm.id,
        provider = %vm.provider_id,
        ended_job = ?done.ended_job,
        leftover,
        "vm force-deleted by an operator"
    );
    let now_vm = ctx.store.get_vm_internal(vm.id).await.map_err(|e| from_store(e, "vm"))?;
    Ok(ops::ForceDeleteVmResponse {
        vm: Some(convert::vm_to_ops(&now_vm)),
        ended_job_id: done.ended_job.map(|j| j.to_string()).unwrap_or_default(),
        detached_volumes: u32::try_from(done.detached_volumes).unwrap_or(u32::MAX),
        leftover_recorded: leftover,
    })
}

/// What force-deleted VMs left on providers.
pub async fn leftovers(
    ctx: &ApiContext,
    p: &Principal,
    req: &ops::ListVmLeftoversRequest,
) -> Result<ops::ListVmLeftoversResponse, ApiError> {
    p.ops(Access::Read)?;
    let provider = match req.provider_id.as_str() {
        "" => None,
        id => Some(validate::id::<ProviderId>("provider_id", id)?),
    };
    let rows =
        ctx.store.list_leftovers(provider, req.open_only).await.map_err(|e| from_store(e, "leftovers"))?;
    Ok(ops::ListVmLeftoversResponse {
        leftovers: rows
            .iter()
            .map(|l| ops::VmLeftover {
                vm_id: l.vm_id.to_string(),
                provider_id: l.provider_id.to_string(),
                host: l.host.clone(),
                tenant_id: l.tenant_id.clone(),
                project_id: l.project_id.clone(),
                recorded_at: Some(convert::ts(l.recorded_at)),
                recorded_by: l.recorded_by.clone(),
                reason: l.reason.clone(),
                cleaned_at: l.cleaned_at.map(convert::ts),
                cleaned_how: l.cleaned_how.map(|h| h.as_str().to_owned()).unwrap_or_default(),
            })
            .collect(),
    })
}
