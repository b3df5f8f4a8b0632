//! Creating a VM: the request checked once into a [`ValidCreate`] (no I/O,
//! every field named), then resolved against the catalog (flavor, image,
//! zone, the zones that have every network, the placement group), then
//! placed and accepted in one transaction per candidate until one takes it.

use std::collections::BTreeMap;

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{PlacementGroupId, VmId};
use hcp_proto::tenant::{CreateVmRequest, VmOperationAccepted};

use super::TenantApi;
use crate::api::idempotency::{self, Key};
use crate::api::validate;
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::Capability;
use crate::model::{
    self, Flavor, Image, JobKind, NetworkAttachment, PlacementGroup, RestartPolicy, Scope, VmStatus,
};
use crate::placement;
use crate::store::{Catalog, Member, StoreError};

/// Candidates a create tries when a strict group's rule refuses the first.
const MAX_PLACEMENT_TRIES: usize = 32;

/// A create request whose fields are each within their limits: what the
/// store and placement are handed, never the raw request.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ValidCreate {
    pub(super) name: String,
    pub(super) flavor: String,
    pub(super) image: String,
    /// The zone asked for, if any.
    pub(super) zone: Option<String>,
    /// The networks to attach, in order.
    pub(super) networks: Vec<String>,
    pub(super) metadata: BTreeMap<String, String>,
    /// Sorted, without duplicates.
    pub(super) tags: Vec<String>,
    pub(super) user_data: Option<String>,
    /// The request's, or the name in lower case.
    pub(super) hostname: String,
    pub(super) restart_policy: RestartPolicy,
    pub(super) placement_group: Option<PlacementGroupId>,
}

impl ValidCreate {
    /// Checks every field of `req`, in the order the API documents, and
    /// names the first one that is wrong.
    pub(super) fn parse(req: &CreateVmRequest) -> Result<Self, ApiError> {
        validate::label("name", &req.name)?;
        validate::label("flavor", &req.flavor)?;
        validate::label("image", &req.image)?;
        if !req.zone.is_empty() {
            validate::label("zone", &req.zone)?;
        }
        validate::count("networks", req.networks.len(), validate::MAX_NETWORKS)?;
        for (i, n) in req.networks.iter().enumerate() {
            validate::label(&format!("networks[{i}].network"), &n.network)?;
            for (field, set) in
                [("mac", !n.mac.is_empty()), ("ipv4", !n.ipv4.is_empty()), ("ipv6", !n.ipv6.is_empty())]
            {
                if set {
                    return Err(ApiError::invalid_field(
                        &format!("networks[{i}].{field}"),
                        format!("networks[{i}].{field} is reported by HCP and cannot be set"),
                    ));
                }
            }
        }
        validate::metadata(req.metadata.iter())?;
        validate::tags("tags", &req.tags)?;
        if let Some(ud) = &req.user_data {
            validate::text("user_data", ud, validate::MAX_USER_DATA)?;
        }
        let hostname =
            if req.hostname.is_empty() { req.name.to_ascii_lowercase() } else { req.hostname.clone() };
        validate::label("hostname", &hostname)?;
        let restart_policy = hcp_proto::tenant::RestartPolicy::try_from(req.restart_policy)
            .map(convert::restart_policy_from_proto)
            .map_err(|_| {
                ApiError::invalid_field(
                    "restart_policy",
                    format!("restart_policy {} is not NEVER, ON_FAILURE or ALWAYS", req.restart_policy),
                )
            })?;
        let placement_group = if req.placement_group_id.is_empty() {
            None
        } else {
            Some(validate::id("placement_group_id", &req.placement_group_id)?)
        };
        let mut tags = req.tags.clone();
        tags.sort();
        tags.dedup();
        Ok(Self {
            name: req.name.clone(),
            flavor: req.flavor.clone(),
            image: req.image.clone(),
            zone: Some(req.zone.clone()).filter(|z| !z.is_empty()),
            networks: req.networks.iter().map(|n| n.network.clone()).collect(),
            metadata: req.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            tags,
            user_data: req.user_data.clone(),
            hostname,
            restart_policy,
            placement_group,
        })
    }
}

/// The idempotency fingerprint of a create: the request's fields, so the
/// same key with another request is told apart.
pub(super) fn fingerprint_create(req: &CreateVmRequest) -> serde_json::Value {
    let metadata: BTreeMap<_, _> = req.metadata.iter().collect();
    serde_json::json!({
        "method": JobKind::CreateVm.as_str(),
        "project_id": req.project_id,
        "name": req.name,
        "flavor": req.flavor,
        "image": req.image,
        "zone": req.zone,
        "networks": req.networks.iter().map(|n| n.network.clone()).collect::<Vec<_>>(),
        "metadata": metadata,
        "tags": req.tags,
        "user_data": req.user_data,
        "hostname": req.hostname,
        "placement_group_id": req.placement_group_id,
        "restart_policy": req.restart_policy,
    })
}

impl TenantApi {
    pub(super) async fn create_vm(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        request_id: String,
        req: CreateVmRequest,
    ) -> Result<VmOperationAccepted, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Write)?;
        let idem = Key::json(&scope.tenant, key?, &fingerprint_create(&req));
        // The key is not read first: the accepting transaction inserts it
        // before anything else, so a key already used fails there (and is
        // answered from its record), and a create that fails before that is
        // answered from the record when there is one. A fresh key, the
        // common case, costs no extra round trip.
        let created = match ValidCreate::parse(&req) {
            Ok(valid) => self.create_new(&p, &scope, idem.as_ref(), request_id, valid).await,
            Err(e) => Err(e),
        };
        match created {
            Err(e) if idem.is_some() => match idempotency::replay(&self.ctx, idem.as_ref()).await? {
                Some(answer) => Ok(answer),
                None => Err(e),
            },
            r => r,
        }
    }

    /// [`Self::create_vm`] for a key not seen before (or none).
    async fn create_new(
        &self,
        p: &Principal,
        scope: &Scope,
        idem: Option<&Key>,
        request_id: String,
        req: ValidCreate,
    ) -> Result<VmOperationAccepted, ApiError> {
        let group = match req.placement_group {
            Some(id) => Some(self.placement_group(scope, id).await?),
            None => None,
        };
        // The catalog from memory (store::cache); a name it lacks may be
        // newer than the copy, so the database has the last word.
        let catalog = self.ctx.store.catalog().await.map_err(|e| from_store(e, "catalog"))?;
        let (flavor, image) = self.flavor_and_image(&catalog, &req).await?;
        let zone = req.zone.as_deref();
        if let Some(z) = zone {
            self.known_zone(&catalog, z).await?;
        }
        let zones = self.network_zones(&catalog, &req.networks, zone).await?;
        let mut needs = Vec::new();
        if req.user_data.is_some() {
            needs.push(Capability::CloudInit);
        }
        let request = placement::Request {
            zone,
            zones: zones.as_deref(),
            needs: &needs,
            vcpus: flavor.vcpus,
            memory_mib: flavor.memory_mib,
            group: group.as_ref().map(|(g, m)| (g, m.as_slice())),
            ..placement::Request::default()
        };
        let candidates = placement::candidates(&self.ctx.store, &request).await?;
        let guard = request.guard();

        let vm_id = VmId::new();
        let job = self.new_job(p, scope, vm_id, JobKind::CreateVm, &request_id);
        let t = job.created_at;
        let mut vm = model::Vm {
            id: vm_id,
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            name: req.name,
            flavor: flavor.name.clone(),
            vcpus: flavor.vcpus,
            memory_mib: flavor.memory_mib,
            disk_gib: flavor.disk_gib,
            image: image.name.clone(),
            image_source: image.source.clone(),
            zone: String::new(),
            provider_id: hcp_proto::ids::ProviderId(uuid::Uuid::nil()),
            host: String::new(),
            restart_policy: req.restart_policy,
            placement_group_id: group.as_ref().map(|(g, _)| g.id),
            networks: req
                .networks
                .into_iter()
                .map(|network| NetworkAttachment { network, ..Default::default() })
                .collect(),
            metadata: req.metadata,
            tags: req.tags,
            user_data: req.user_data,
            hostname: req.hostname,
            status: VmStatus::Pending,
            current_job_id: Some(job.id),
            error_code: None,
            error_message: None,
            created_at: t,
            updated_at: t,
        };
        let mut audit = self.ctx.audit(
            p,
            AuditAction::Job(JobKind::CreateVm),
            Resource::Vm(vm_id),
            AuditOutcome::Accepted,
        );
        audit.project_id = scope.project.clone();
        audit.job_id = job.id.to_string();
        let answer = VmOperationAccepted {
            vm_id: vm_id.to_string(),
            job_id: job.id.to_string(),
            snapshot_id: None,
            volume_id: None,
        };
        let record = idempotency::record(&self.ctx, idem, &answer);
        // The host's room, and a strict group's rule, are checked again in
        // the transaction: a concurrent create that took the room or the
        // host first sends this one on to the next candidate.
        let mut refused = None;
        let mut no_room = None;
        for choice in candidates.iter().take(MAX_PLACEMENT_TRIES) {
            vm.zone = choice.provider.zone.clone();
            vm.provider_id = choice.provider.id;
            vm.host = choice.host.clone();
            let room = choice.capacity.as_ref();
            match self.ctx.store.accept_create(&vm, &job, &audit, record.as_ref(), room, guard.as_ref()).await
            {
                Ok(()) => {
                    self.ctx.store.note_placed(vm.provider_id, &vm.host, vm.vcpus, vm.memory_mib);
                    self.ctx.announce(job.id);
                    tracing::info!(vm_id = %vm_id, job_id = %job.id, provider = %choice.provider.name,
                        host = %choice.host, "vm create accepted");
                    return Ok(answer);
                }
                Err(StoreError::Conflict(msg)) if guard.is_some() => refused = Some(msg),
                Err(StoreError::NoRoom(msg)) => no_room = Some(msg),
                Err(StoreError::IdempotencyRace) => {
                    return idempotency::replay_after_race(&self.ctx, idem).await;
                }
                Err(StoreError::QuotaExceeded(msg)) => {
                    return Err(ApiError::new(ErrorCode::QuotaExceeded, msg));
                }
                Err(e) => return Err(from_store(e, "vm")),
            }
        }
        if let (Some(msg), None) = (&no_room, &refused) {
            tracing::info!(reason = %msg, "create refused: the hosts it could go to filled up meanwhile");
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "no host has room for {} vCPUs and {} MiB (capacity times the zone's overcommit ratios): \
                     concurrent creates took the last of it",
                    vm.vcpus, vm.memory_mib
                ),
            )
            .with_detail("reason", "capacity"));
        }
        let (g, _) = group.as_ref().ok_or_else(ApiError::internal)?;
        tracing::info!(reason = ?refused, group = %g.id, "create refused by its placement group");
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "placement group {} (strict {}) cannot take another member: every host that could take the vm is ruled out",
                g.name, g.policy
            ),
        )
        .with_detail("reason", "placement_group")
        .with_detail("field", "placement_group_id"))
    }

    /// The placement group the VM joins, in the caller's project, with its
    /// members.
    async fn placement_group(
        &self,
        scope: &Scope,
        id: PlacementGroupId,
    ) -> Result<(PlacementGroup, Vec<Member>), ApiError> {
        let g = self.ctx.store.get_placement_group(scope, id).await.map_err(|e| match e {
            StoreError::NotFound => ApiError::invalid_field(
                "placement_group_id",
                format!("unknown placement group {id} in project {}", scope.project),
            ),
            e => from_store(e, "placement group"),
        })?;
        let members = self.ctx.store.group_members(id).await.map_err(|e| from_store(e, "placement group"))?;
        Ok((g, members))
    }

    /// The flavor and image named, from the catalog copy or the database;
    /// the image must fit the flavor's disk.
    async fn flavor_and_image(
        &self,
        catalog: &Catalog,
        req: &ValidCreate,
    ) -> Result<(Flavor, Image), ApiError> {
        let flavor = match catalog.flavors.get(&req.flavor) {
            Some(f) => f.clone(),
            None => self.ctx.store.get_flavor(&req.flavor).await.map_err(|e| match e {
                StoreError::NotFound => {
                    ApiError::invalid_field("flavor", format!("unknown flavor {}", excerpt(&req.flavor)))
                }
                e => from_store(e, "flavor"),
            })?,
        };
        let image = match catalog.images.get(&req.image) {
            Some(i) => i.clone(),
            None => self.ctx.store.get_image(&req.image).await.map_err(|e| match e {
                StoreError::NotFound => {
                    ApiError::invalid_field("image", format!("unknown image {}", excerpt(&req.image)))
                }
                e => from_store(e, "image"),
            })?,
        };
        if image.min_disk_gib > flavor.disk_gib {
            return Err(ApiError::invalid_field(
                "flavor",
                format!(
                    "image {} needs a {} GiB disk; flavor {} has {} GiB",
                    image.name, image.min_disk_gib, flavor.name, flavor.disk_gib
                ),
            ));
        }
        Ok((flavor, image))
    }

    /// The zone asked for exists (in the copy, or the database).
    async fn known_zone(&self, catalog: &Catalog, zone: &str) -> Result<(), ApiError> {
        if catalog.zones.iter().any(|x| x.name == zone)
            || self
                .ctx
                .store
                .list_zones()
                .await
                .map_err(|e| from_store(e, "zone"))?
                .iter()
                .any(|x| x.name == zone)
        {
            return Ok(());
        }
        Err(ApiError::invalid_field("zone", format!("unknown zone {}", excerpt(zone))))
    }

    /// The zones that have every network asked for (within `zone` when
    /// given), so that placement keeps to them; `None` without networks.
    /// A network no such zone has is named.
    async fn network_zones(
        &self,
        catalog: &Catalog,
        wanted: &[String],
        zone: Option<&str>,
    ) -> Result<Option<Vec<String>>, ApiError> {
        if wanted.is_empty() {
            return Ok(None);
        }
        let known = |list: &[model::Network]| wanted.iter().all(|n| list.iter().any(|c| &c.name == n));
        let fresh;
        let networks: &[model::Network] = if known(&catalog.networks) {
            &catalog.networks
        } else {
            fresh = self.ctx.store.list_networks(None).await.map_err(|e| from_store(e, "networks"))?;
            &fresh
        };
        let in_zone = networks.iter().filter(|c| zone.is_none_or(|z| c.zone == z));
        let mut zones: Option<Vec<String>> = None;
        for (i, n) in wanted.iter().enumerate() {
            let here: Vec<String> =
                in_zone.clone().filter(|c| &c.name == n).map(|c| c.zone.clone()).collect();
            let both: Vec<String> = match &zones {
                None => here,
                Some(z) => here.into_iter().filter(|x| z.contains(x)).collect(),
            };
            if both.is_empty() {
                let where_ = zone.map(|z| format!("zone {z}")).unwrap_or_else(|| "any zone".to_owned());
                return Err(ApiError::invalid_field(
                    &format!("networks[{i}].network"),
                    format!(
                        "unknown network {} in {where_} (GET /api/hcp/common/v1/networks lists them)",
                        excerpt(n)
                    ),
                ));
            }
            zones = Some(both);
        }
        Ok(zones)
    }
}

#[cfg(test)]
mod tests {
    use hcp_proto::tenant::NetworkAttachment as Attach;

    use super::*;

    fn request() -> CreateVmRequest {
        CreateVmRequest {
            project_id: "p1".into(),
            name: "Web-1".into(),
            flavor: "small".into(),
            image: "debian-12".into(),
            networks: vec![Attach { network: "default".into(), ..Default::default() }],
            tags: vec!["b".into(), "a".into(), "b".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_request_becomes_a_typed_create() {
        let v = ValidCreate::parse(&request()).unwrap();
        assert_eq!(v.hostname, "web-1", "the name in lower case");
        assert_eq!(v.tags, ["a", "b"], "sorted, without duplicates");
        assert_eq!(v.networks, ["default"]);
        assert_eq!((v.zone, v.placement_group, v.restart_policy), (None, None, RestartPolicy::Never));
    }

    /// Each row: a change to a valid request, and the field the refusal
    /// names.
    #[test]
    fn each_wrong_field_is_named() {
        type Change = fn(&mut CreateVmRequest);
        let rows: &[(Change, &str)] = &[
            (|r| r.name = String::new(), "name"),
            (|r| r.flavor = "x".repeat(300), "flavor"),
            (|r| r.image = "no spaces".into(), "image"),
            (|r| r.zone = "bad zone".into(), "zone"),
            (|r| r.networks[0].network = String::new(), "networks[0].network"),
            (|r| r.networks[0].mac = "52:54:00:00:00:01".into(), "networks[0].mac"),
            (|r| r.networks[0].ipv4 = vec!["10.0.0.9".into()], "networks[0].ipv4"),
            (|r| r.hostname = "-bad".into(), "hostname"),
            (|r| r.restart_policy = 99, "restart_policy"),
            (|r| r.placement_group_id = "not-a-uuid".into(), "placement_group_id"),
        ];
        for (change, field) in rows {
            let mut req = request();
            change(&mut req);
            let err = ValidCreate::parse(&req).unwrap_err();
            assert_eq!(err.details.get("field").map(String::as_str), Some(*field), "{err:?}");
        }
    }
}
