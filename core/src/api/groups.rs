//! Tenants' placement groups (`VmService` methods, served by
//! [`super::tenant::TenantApi`]): create, list, read and delete. Members
//! join at create time (`CreateVmRequest.placement_group_id`) and leave when
//! deleted; a group with members cannot be deleted.

use hcp_proto::error::ApiError;
use hcp_proto::ids::PlacementGroupId;
use hcp_proto::tenant::{
    CreatePlacementGroupRequest, ListPlacementGroupsResponse, PlacementGroup, PlacementPolicy,
};

use super::{ApiContext, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert::placement_group_to_tenant;
use crate::error::from_store;
use crate::model::{self, GroupPolicy, Scope, now};
use crate::store::StoreError;

/// Creates a group.
pub async fn create(
    ctx: &ApiContext,
    p: &Principal,
    req: CreatePlacementGroupRequest,
) -> Result<PlacementGroup, ApiError> {
    validate::project_id(&req.project_id)?;
    let scope = p.scope(&req.project_id, Access::Write)?;
    let g = req.placement_group.unwrap_or_default();
    validate::label("placement_group.name", &g.name)?;
    let policy = match PlacementPolicy::try_from(g.policy) {
        Ok(PlacementPolicy::Affinity) => GroupPolicy::Affinity,
        Ok(PlacementPolicy::AntiAffinity) => GroupPolicy::AntiAffinity,
        _ => {
            return Err(ApiError::invalid_field(
                "placement_group.policy",
                "placement_group.policy must be AFFINITY or ANTI_AFFINITY",
            ));
        }
    };
    if !g.vm_ids.is_empty() {
        return Err(ApiError::invalid_field(
            "placement_group.vm_ids",
            "placement_group.vm_ids is output only: VMs join at create time",
        ));
    }
    let group = model::PlacementGroup {
        id: PlacementGroupId::new(),
        tenant_id: scope.tenant.clone(),
        project_id: scope.project.clone(),
        name: g.name.clone(),
        policy,
        strict: g.strict,
        created_at: now(),
    };
    let mut audit = ctx.audit(
        p,
        AuditAction::PlacementGroupCreate,
        Resource::PlacementGroup(group.id),
        AuditOutcome::Succeeded,
    );
    audit.project_id = scope.project.clone();
    audit.detail = format!("{} {}", if group.strict { "strict" } else { "soft" }, group.policy);
    ctx.store.create_placement_group(&group, &audit).await.map_err(|e| match e {
        StoreError::AlreadyExists { .. } => ApiError::new(
            hcp_proto::error::ErrorCode::AlreadyExists,
            format!("project {} already has a placement group named {}", scope.project, group.name),
        )
        .with_detail("field", "placement_group.name"),
        e => from_store(e, "placement group"),
    })?;
    Ok(placement_group_to_tenant(&group, &[]))
}

/// The project's groups.
pub async fn list(
    ctx: &ApiContext,
    p: &Principal,
    project_id: &str,
) -> Result<ListPlacementGroupsResponse, ApiError> {
    validate::project_id(project_id)?;
    let scope = p.scope(project_id, Access::Read)?;
    let groups =
        ctx.store.list_placement_groups(&scope).await.map_err(|e| from_store(e, "placement groups"))?;
    let mut out = Vec::with_capacity(groups.len());
    for g in &groups {
        let members = ctx.store.group_members(g.id).await.map_err(|e| from_store(e, "placement group"))?;
        out.push(placement_group_to_tenant(g, &members));
    }
    Ok(ListPlacementGroupsResponse { placement_groups: out })
}

/// One group with its members.
pub async fn get(
    ctx: &ApiContext,
    p: &Principal,
    project_id: &str,
    id: &str,
) -> Result<PlacementGroup, ApiError> {
    let (scope, id) = target(p, project_id, id, Access::Read)?;
    let g = ctx
        .store
        .get_placement_group(&scope, id)
        .await
        .map_err(|e| from_store(e, &format!("placement group {id}")))?;
    let members = ctx.store.group_members(id).await.map_err(|e| from_store(e, "placement group"))?;
    Ok(placement_group_to_tenant(&g, &members))
}

/// Deletes an empty group.
pub async fn delete(ctx: &ApiContext, p: &Principal, project_id: &str, id: &str) -> Result<(), ApiError> {
    let (scope, id) = target(p, project_id, id, Access::Write)?;
    let mut audit = ctx.audit(
        p,
        AuditAction::PlacementGroupDelete,
        Resource::PlacementGroup(id),
        AuditOutcome::Succeeded,
    );
    audit.project_id = scope.project.clone();
    ctx.store
        .delete_placement_group(&scope, id, &audit)
        .await
        .map_err(|e| from_store(e, &format!("placement group {id}")))
}

pub(super) fn target(
    p: &Principal,
    project_id: &str,
    id: &str,
    access: Access,
) -> Result<(Scope, PlacementGroupId), ApiError> {
    validate::project_id(project_id)?;
    let scope = p.scope(project_id, access)?;
    let id: PlacementGroupId = validate::id("placement_group_id", id)?;
    Ok((scope, id))
}
