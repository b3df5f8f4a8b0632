//! Creating a VM: the request checked once into a [`ValidCreate`] (no I/O,
//! every field named), then resolved against the catalog (flavor, image,
//! zone, the zones that have every network, the placement group), then
//! placed and accepted in one transaction per candidate until one takes it.

use std::collections::BTreeMap;

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{PlacementGroupId, VmId, VolumeId};
use hcp_proto::tenant::{CreateVmRequest, VmOperationAccepted};

use super::TenantApi;
use crate::api::idempotency::{self, Key};
use crate::api::validate;
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::Capability;
use crate::lifecycle::image::{Unusable, usable};
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
    /// Existing volumes attached at create, in order.
    pub(super) volume_ids: Vec<VolumeId>,
    /// The root disk as a volume.
    pub(super) boot: Option<BootRequest>,
    /// Key pairs of the project whose public keys the guest authorizes, in
    /// order, without duplicates.
    pub(super) key_names: Vec<String>,
}

/// A create's boot volume as asked.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum BootRequest {
    /// A new volume of this type, made from the image.
    New { volume_type: String, delete_on_vm_delete: bool },
    /// An existing volume of the project.
    Existing { volume_id: VolumeId, delete_on_vm_delete: bool },
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
        let mut volume_ids: Vec<VolumeId> = Vec::with_capacity(req.volume_ids.len());
        for (i, id) in req.volume_ids.iter().enumerate() {
            let field = format!("volume_ids[{i}]");
            let id: VolumeId = validate::id(&field, id)?;
            if volume_ids.contains(&id) {
                return Err(ApiError::invalid_field(&field, format!("volume {id} is named twice")));
            }
            volume_ids.push(id);
        }
        let boot = match &req.boot_volume {
            None => None,
            Some(b) if b.volume_id.is_empty() => {
                if b.volume_type.is_empty() {
                    return Err(ApiError::invalid_field(
                        "boot_volume.volume_type",
                        "a new boot volume needs a volume_type (or name an existing one in boot_volume.volume_id)",
                    ));
                }
                validate::label("boot_volume.volume_type", &b.volume_type)?;
                Some(BootRequest::New {
                    volume_type: b.volume_type.clone(),
                    delete_on_vm_delete: b.delete_on_vm_delete.unwrap_or(true),
                })
            }
            Some(b) => {
                let volume_id: VolumeId = validate::id("boot_volume.volume_id", &b.volume_id)?;
                if !b.volume_type.is_empty() {
                    return Err(ApiError::invalid_field(
                        "boot_volume.volume_type",
                        "boot_volume.volume_type is for a new boot volume; boot_volume.volume_id names an existing one",
                    ));
                }
                if volume_ids.contains(&volume_id) {
                    return Err(ApiError::invalid_field(
                        "boot_volume.volume_id",
                        format!("volume {volume_id} is also in volume_ids"),
                    ));
                }
                Some(BootRequest::Existing {
                    volume_id,
                    delete_on_vm_delete: b.delete_on_vm_delete.unwrap_or(false),
                })
            }
        };
        validate::count("key_names", req.key_names.len(), validate::MAX_KEY_NAMES)?;
        let mut key_names: Vec<String> = Vec::with_capacity(req.key_names.len());
        for (i, name) in req.key_names.iter().enumerate() {
            let field = format!("key_names[{i}]");
            validate::label(&field, name)?;
            if key_names.contains(name) {
                return Err(ApiError::invalid_field(&field, format!("key pair {name} is named twice")));
            }
            key_names.push(name.clone());
        }
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
            volume_ids,
            boot,
            key_names,
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
        "volume_ids": req.volume_ids,
        "key_names": req.key_names,
        "boot_volume": req.boot_volume.as_ref().map(|b| serde_json::json!({
            "volume_id": b.volume_id,
            "volume_type": b.volume_type,
            "delete_on_vm_delete": b.delete_on_vm_delete,
        })),
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
        let (flavor, image) = self.flavor_and_image(&catalog, scope, &req).await?;
        let zone = req.zone.as_deref();
        if let Some(z) = zone {
            self.known_zone(&catalog, z).await?;
        }
        let zones = self.network_zones(&catalog, &req.networks, zone).await?;
        let ssh_keys = self.vm_keys(scope, &req.key_names).await?;
        let mut needs = Vec::new();
        if req.user_data.is_some() || !ssh_keys.is_empty() {
            needs.push(Capability::CloudInit);
        }
        let held = self.create_volumes(scope, &req, &flavor).await?;
        if held.is_some() {
            needs.push(Capability::Volumes);
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
        let mut candidates = placement::candidates(&self.ctx.store, &request).await?;
        // Only where the image is: providers with a backing for it.
        candidates.retain(|c| image.backing_on(&c.provider.name).is_some());
        if candidates.is_empty() {
            let where_ = zone.map(|z| format!("zone {z}")).unwrap_or_else(|| "any zone".to_owned());
            return Err(ApiError::invalid_field(
                "image",
                format!(
                    "image {} is not available in {where_} (on no provider that could take the vm)",
                    image.name
                ),
            ));
        }
        if let Some(h) = &held {
            // Existing volumes place the VM: their hypervisor, and for
            // host-local storage their host.
            if let Some(at) = &h.place {
                candidates.retain(|c| {
                    c.provider.id == at.provider
                        && (at.host.is_empty()
                            || !c.provider.capabilities.volumes_host_local
                            || c.host == at.host)
                });
                if candidates.is_empty() {
                    return Err(ApiError::conflict(format!(
                        "no host that can take the vm reaches volume {}'s storage (zone {})",
                        at.volume, at.zone
                    )));
                }
            }
            let most =
                candidates.iter().map(|c| c.provider.capabilities.max_volumes_per_vm).max().unwrap_or(0);
            if req.volume_ids.len() > most as usize {
                return Err(ApiError::invalid_field(
                    "volume_ids",
                    format!(
                        "{} volumes; the hypervisor takes at most {most} on one vm",
                        req.volume_ids.len()
                    ),
                ));
            }
        }
        let guard = request.guard();

        let vm_id = VmId::new();
        let mut job = self.new_job(p, scope, vm_id, JobKind::CreateVm, &request_id);
        let t = job.created_at;
        let mut vm = model::Vm {
            id: vm_id,
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            name: req.name,
            flavor: flavor.name.clone(),
            vcpus: flavor.vcpus,
            memory_mib: flavor.memory_mib,
            disk_gib: held.as_ref().and_then(|h| h.boot_size).unwrap_or(flavor.disk_gib),
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
            ssh_keys,
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
            image_id: None,
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
            vm.image_source = image.backing_on(&choice.provider.name).unwrap_or_default().to_owned();
            vm.host = choice.host.clone();
            let room = choice.capacity.as_ref();
            let volumes = match &held {
                Some(h) => {
                    let (volumes, params) = h.on(&vm, &choice.provider, &job);
                    job.params = params;
                    volumes
                }
                None => crate::store::CreateVolumes::default(),
            };
            match self
                .ctx
                .store
                .accept_create(&vm, &job, &audit, record.as_ref(), room, guard.as_ref(), &volumes)
                .await
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

    /// The key pairs a create names, read now: the VM keeps their public
    /// keys, so a key pair deleted or replaced later changes nothing a
    /// retried or recovered create sends. A name the project lacks (another
    /// project's or tenant's included) is INVALID_ARGUMENT naming it.
    async fn vm_keys(&self, scope: &Scope, names: &[String]) -> Result<Vec<model::VmKey>, ApiError> {
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let k = self.ctx.store.get_key_pair(scope, name).await.map_err(|e| match e {
                StoreError::NotFound => ApiError::invalid_field(
                    &format!("key_names[{i}]"),
                    format!("no key pair {name} in project {}", scope.project),
                ),
                e => from_store(e, "key pair"),
            })?;
            out.push(model::VmKey { name: k.name, public_key: k.public_key });
        }
        Ok(out)
    }

    /// The flavor and image named, from the catalog copy or the database;
    /// the image must fit the flavor's disk.
    async fn flavor_and_image(
        &self,
        catalog: &Catalog,
        scope: &Scope,
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
        // The copy's image when it is usable; else the database's (the
        // copy may predate the end of an import or a capture).
        let image = match catalog.image(scope, &req.image).filter(|i| usable(i).is_ok()) {
            Some(i) => i.clone(),
            None => self.ctx.store.get_image_by_name(&req.image, Some(scope)).await.map_err(|e| match e {
                StoreError::NotFound => {
                    ApiError::invalid_field("image", format!("unknown image {}", excerpt(&req.image)))
                }
                e => from_store(e, "image"),
            })?,
        };
        if let Err(Unusable::Status(status)) = usable(&image) {
            return Err(ApiError::invalid_field(
                "image",
                format!("image {} is {status}; only an AVAILABLE image makes VMs", image.name),
            ));
        }
        if image.min_memory_mib > flavor.memory_mib {
            return Err(ApiError::invalid_field(
                "flavor",
                format!(
                    "image {} needs {} MiB of memory; flavor {} has {} MiB",
                    image.name, image.min_memory_mib, flavor.name, flavor.memory_mib
                ),
            ));
        }
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
            (|r| r.key_names = vec!["ok".into(), "not a label".into()], "key_names[1]"),
            (|r| r.key_names = vec!["k".into(), "k".into()], "key_names[1]"),
            (|r| r.key_names = (0..9).map(|i| format!("k{i}")).collect(), "key_names"),
        ];
        for (change, field) in rows {
            let mut req = request();
            change(&mut req);
            let err = ValidCreate::parse(&req).unwrap_err();
            assert_eq!(err.details.get("field").map(String::as_str), Some(*field), "{err:?}");
        }
    }
}

/// Where existing volumes put a VM.
#[derive(Debug, Clone)]
pub(super) struct VolumePlace {
    /// The volume that decided.
    volume: VolumeId,
    provider: hcp_proto::ids::ProviderId,
    zone: String,
    /// Its host, for host-local storage once placed; else empty.
    host: String,
}

/// The volumes a create holds, resolved: existing ones checked (the
/// project's, AVAILABLE, no job, on one hypervisor), a new boot volume's
/// type.
#[derive(Debug, Clone)]
pub(super) struct HeldVolumes {
    place: Option<VolumePlace>,
    /// The boot volume's size when it is an existing one (the VM's disk).
    boot_size: Option<u32>,
    boot: Option<BootRequest>,
    boot_type: Option<model::VolumeType>,
    data: Vec<VolumeId>,
}

impl HeldVolumes {
    /// The store's part and the job's parameters for the VM placed as
    /// `vm` on `provider`.
    fn on(
        &self,
        vm: &model::Vm,
        provider: &model::Provider,
        job: &model::Job,
    ) -> (crate::store::CreateVolumes, crate::lifecycle::JobParams) {
        let mut volumes = crate::store::CreateVolumes::default();
        let mut boot_id = None;
        let mut boot_storage = String::new();
        match (&self.boot, &self.boot_type) {
            (Some(BootRequest::New { delete_on_vm_delete, .. }), Some(t)) => {
                let id = VolumeId::new();
                boot_id = Some(id);
                boot_storage = t.storage_on(&provider.name).to_owned();
                volumes.new_boot = Some(model::Volume {
                    id,
                    tenant_id: vm.tenant_id.clone(),
                    project_id: vm.project_id.clone(),
                    name: format!("{}-boot", vm.name).chars().take(63).collect(),
                    size_gib: vm.disk_gib.max(1),
                    zone: vm.zone.clone(),
                    volume_type: t.name.clone(),
                    provider_id: provider.id,
                    storage: boot_storage.clone(),
                    host: if provider.capabilities.volumes_host_local {
                        vm.host.clone()
                    } else {
                        String::new()
                    },
                    native_id: None,
                    status: model::VolumeStatus::Creating,
                    attachment: Some(model::Attachment { vm_id: vm.id, device_index: 0 }),
                    delete_on_vm_delete: *delete_on_vm_delete,
                    current_job_id: Some(job.id),
                    error_code: None,
                    error_message: None,
                    metadata: Default::default(),
                    tags: Vec::new(),
                    created_at: job.created_at,
                    updated_at: job.created_at,
                });
            }
            (Some(BootRequest::Existing { volume_id, delete_on_vm_delete }), _) => {
                boot_id = Some(*volume_id);
                volumes.existing.push((*volume_id, 0, *delete_on_vm_delete));
            }
            _ => {}
        }
        let data: Vec<(VolumeId, u32)> =
            self.data.iter().zip(1u32..).map(|(id, place)| (*id, place)).collect();
        volumes.existing.extend(data.iter().map(|(id, place)| (*id, *place, false)));
        (volumes, crate::lifecycle::JobParams::CreateWithVolumes { boot: boot_id, boot_storage, data })
    }
}

impl TenantApi {
    /// Resolves a create's volumes: `None` when it asks for none.
    async fn create_volumes(
        &self,
        scope: &Scope,
        req: &ValidCreate,
        flavor: &Flavor,
    ) -> Result<Option<HeldVolumes>, ApiError> {
        if req.boot.is_none() && req.volume_ids.is_empty() {
            return Ok(None);
        }
        let mut held = HeldVolumes {
            place: None,
            boot_size: None,
            boot: req.boot.clone(),
            boot_type: None,
            data: req.volume_ids.clone(),
        };
        let mut existing: Vec<(String, VolumeId)> =
            req.volume_ids.iter().enumerate().map(|(i, id)| (format!("volume_ids[{i}]"), *id)).collect();
        match &req.boot {
            Some(BootRequest::Existing { volume_id, .. }) => {
                existing.insert(0, ("boot_volume.volume_id".to_owned(), *volume_id));
            }
            Some(BootRequest::New { volume_type, .. }) => {
                let t = self.ctx.store.get_volume_type(volume_type).await.map_err(|e| match e {
                    StoreError::NotFound => ApiError::invalid_field(
                        "boot_volume.volume_type",
                        format!("unknown volume type {}", excerpt(volume_type)),
                    ),
                    e => from_store(e, "volume type"),
                })?;
                if flavor.disk_gib > t.max_size_gib {
                    return Err(ApiError::invalid_field(
                        "boot_volume.volume_type",
                        format!(
                            "volumes of type {} are at most {} GiB; flavor {} has a {} GiB disk",
                            t.name, t.max_size_gib, flavor.name, flavor.disk_gib
                        ),
                    ));
                }
                held.boot_type = Some(t);
            }
            None => {}
        }
        for (field, id) in existing {
            let v = match self.ctx.store.get_volume(scope, id).await {
                Ok(v) if v.status != model::VolumeStatus::Deleted => v,
                Ok(_) | Err(StoreError::NotFound) => {
                    return Err(ApiError::invalid_field(
                        &field,
                        format!("no volume {id} in project {}", scope.project),
                    ));
                }
                Err(e) => return Err(from_store(e, "volume")),
            };
            if let Some(job) = v.current_job_id {
                let message = format!("volume {} is {}: job {job} is operating on it", v.id, v.status);
                return Err(from_store(StoreError::Busy { job, message }, &format!("volume {id}")));
            }
            if let Some(a) = v.attachment {
                return Err(ApiError::conflict(format!("volume {} is attached to vm {}", v.id, a.vm_id)));
            }
            if v.status != model::VolumeStatus::Available {
                return Err(ApiError::conflict(format!(
                    "volume {} is {}; it must be AVAILABLE",
                    v.id, v.status
                )));
            }
            if field == "boot_volume.volume_id" {
                held.boot_size = Some(v.size_gib.max(flavor.disk_gib));
                if v.size_gib < flavor.disk_gib {
                    return Err(ApiError::invalid_field(
                        &field,
                        format!(
                            "volume {} has {} GiB; flavor {} boots from at least {} GiB",
                            v.id, v.size_gib, flavor.name, flavor.disk_gib
                        ),
                    ));
                }
            }
            if let Some(zone) = &req.zone
                && *zone != v.zone
            {
                return Err(ApiError::conflict(format!("volume {} is in zone {}, not {zone}", v.id, v.zone)));
            }
            match &held.place {
                Some(at)
                    if at.provider != v.provider_id
                        || (!v.host.is_empty() && !at.host.is_empty() && v.host != at.host) =>
                {
                    return Err(ApiError::conflict(format!(
                        "volumes {} and {} are on storage no one vm reaches",
                        at.volume, v.id
                    )));
                }
                Some(at) if at.host.is_empty() && !v.host.is_empty() => {
                    held.place = Some(VolumePlace { host: v.host.clone(), ..at.clone() });
                }
                Some(_) => {}
                None => {
                    held.place = Some(VolumePlace {
                        volume: v.id,
                        provider: v.provider_id,
                        zone: v.zone.clone(),
                        host: v.host.clone(),
                    })
                }
            }
        }
        Ok(Some(held))
    }
}
