//! `hcp.tenant.v1`: VMs and jobs. Every read and write is scoped to the
//! caller's tenant and the project in the request; another tenant's VM or job
//! is NOT_FOUND, exactly like one that does not exist.

use std::collections::BTreeMap;

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{JobId, PlacementGroupId, SnapshotId, VmId};
use hcp_proto::tenant::job_service_server::JobService;
use hcp_proto::tenant::quota_service_server::QuotaService;
use hcp_proto::tenant::vm_service_server::VmService;
use hcp_proto::tenant::{
    CancelJobRequest, ConsoleSession, CreateConsoleRequest, CreateVmRequest, GetJobRequest, GetVmByIdRequest,
    GetVmRequest, Job, ListJobsRequest, ListJobsResponse, ListVmsRequest, ListVmsResponse, RebootVmRequest,
    ResizeVmRequest, StopVmRequest, UpdateVmRequest, Vm, VmActionRequest, VmOperationAccepted,
};

use super::page::Binding;
use super::{ApiContext, ApiResult, handle, validate};
use crate::auth::{Access, Principal, principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::{Capability, ConsoleProtocol, JobParams, Size, missing, required_capabilities};
use crate::model::{self, JobKind, NetworkAttachment, Scope, VmStatus, now};
use crate::placement;
use crate::store::{
    AcceptOperation, IdempotencyRecord, ListJobsQuery, ListVmsQuery, SnapshotAccept, StoreError,
};

/// Implements `VmService` and `JobService`.
#[derive(Clone)]
pub struct TenantApi {
    ctx: ApiContext,
}

impl TenantApi {
    /// Creates the service.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    fn new_job(&self, p: &Principal, scope: &Scope, vm: VmId, kind: JobKind, request_id: &str) -> model::Job {
        model::Job::queued(
            kind,
            scope,
            vm,
            &p.subject,
            self.ctx.config.jobs.max_attempts,
            hcp_telemetry::current_traceparent(),
            request_id,
        )
    }

    /// The capabilities of every provider, by id, for `allowed_actions`.
    async fn capabilities(
        &self,
    ) -> Result<std::collections::HashMap<hcp_proto::ids::ProviderId, model::Capabilities>, ApiError> {
        // From the in-memory catalog (store::cache): a provider is never
        // removed while VMs are on it, so the copy has every VM's provider.
        let catalog = self.ctx.store.catalog().await.map_err(|e| from_store(e, "providers"))?;
        Ok(catalog.providers.iter().map(|p| (p.id, p.capabilities.clone())).collect())
    }

    /// The tenant view of one VM.
    async fn view(&self, vm: &model::Vm) -> Result<Vm, ApiError> {
        let caps = match self.ctx.store.provider_cached(vm.provider_id).await {
            Ok(p) => Some(p.capabilities),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(from_store(e, "provider")),
        };
        Ok(convert::vm_to_tenant(vm, caps.as_ref()))
    }

    async fn create_vm(
        &self,
        p: Principal,
        key: Option<String>,
        request_id: String,
        req: CreateVmRequest,
    ) -> Result<VmOperationAccepted, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Write)?;
        let tenant = scope.tenant.clone();
        let idem = key.map(|k| (k, fingerprint_create(&req)));
        // The key is not read first: the accepting transaction inserts it
        // before anything else, so a key already used fails there (and is
        // answered from its record), and a create that fails before that is
        // answered from the record when there is one. A fresh key, the
        // common case, costs no extra round trip.
        match self.create_new(&p, &scope, idem.as_ref(), request_id, req).await {
            Err(e) if idem.is_some() => match self.replay(&tenant, idem.as_ref()).await? {
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
        scope: &crate::model::Scope,
        idem: Option<&(String, String)>,
        request_id: String,
        req: CreateVmRequest,
    ) -> Result<VmOperationAccepted, ApiError> {
        let tenant = scope.tenant.clone();
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
        let group = if req.placement_group_id.is_empty() {
            None
        } else {
            let id: PlacementGroupId = validate::id("placement_group_id", &req.placement_group_id)?;
            let g = self.ctx.store.get_placement_group(scope, id).await.map_err(|e| match e {
                StoreError::NotFound => ApiError::invalid_field(
                    "placement_group_id",
                    format!("unknown placement group {id} in project {}", req.project_id),
                ),
                e => from_store(e, "placement group"),
            })?;
            let members =
                self.ctx.store.group_members(id).await.map_err(|e| from_store(e, "placement group"))?;
            Some((g, members))
        };

        // The catalog from memory (store::cache); a name it lacks may be
        // newer than the copy, so the database has the last word.
        let catalog = self.ctx.store.catalog().await.map_err(|e| from_store(e, "catalog"))?;
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
        let zone = if req.zone.is_empty() { None } else { Some(req.zone.as_str()) };
        if let Some(z) = zone
            && !catalog.zones.iter().any(|x| x.name == z)
            && !self
                .ctx
                .store
                .list_zones()
                .await
                .map_err(|e| from_store(e, "zone"))?
                .iter()
                .any(|x| x.name == z)
        {
            return Err(ApiError::invalid_field("zone", format!("unknown zone {}", excerpt(z))));
        }
        // Every network must exist in the zone the VM lands in: in the
        // requested zone, or placement keeps to zones that have them all.
        let zones = if req.networks.is_empty() {
            None
        } else {
            let known = |list: &[crate::model::Network]| {
                req.networks.iter().all(|n| list.iter().any(|c| c.name == n.network))
            };
            let fresh;
            let networks: &[crate::model::Network] = if known(&catalog.networks) {
                &catalog.networks
            } else {
                fresh = self.ctx.store.list_networks(None).await.map_err(|e| from_store(e, "networks"))?;
                &fresh
            };
            let catalog = networks.iter().filter(|c| zone.is_none_or(|z| c.zone == z));
            let mut zones: Option<Vec<String>> = None;
            for (i, n) in req.networks.iter().enumerate() {
                let here: Vec<String> =
                    catalog.clone().filter(|c| c.name == n.network).map(|c| c.zone.clone()).collect();
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
                            excerpt(&n.network)
                        ),
                    ));
                }
                zones = Some(both);
            }
            zones
        };
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
        let mut tags = req.tags.clone();
        tags.sort();
        tags.dedup();
        let vm = model::Vm {
            id: vm_id,
            tenant_id: tenant.clone(),
            project_id: req.project_id.clone(),
            name: req.name.clone(),
            flavor: flavor.name.clone(),
            vcpus: flavor.vcpus,
            memory_mib: flavor.memory_mib,
            disk_gib: flavor.disk_gib,
            image: image.name.clone(),
            image_source: image.source.clone(),
            zone: String::new(),
            provider_id: hcp_proto::ids::ProviderId(uuid::Uuid::nil()),
            host: String::new(),
            restart_policy,
            placement_group_id: group.as_ref().map(|(g, _)| g.id),
            networks: req
                .networks
                .iter()
                .map(|n| NetworkAttachment { network: n.network.clone(), ..Default::default() })
                .collect(),
            metadata: req.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
            tags,
            user_data: req.user_data.clone(),
            hostname,
            status: VmStatus::Pending,
            current_job_id: Some(job.id),
            error_code: None,
            error_message: None,
            created_at: t,
            updated_at: t,
        };
        let mut audit = self.ctx.audit(p, JobKind::CreateVm.as_str(), "vm", &vm_id.to_string(), "accepted");
        audit.project_id = req.project_id.clone();
        audit.job_id = job.id.to_string();
        let answer =
            VmOperationAccepted { vm_id: vm_id.to_string(), job_id: job.id.to_string(), snapshot_id: None };
        let record = self.record(&tenant, idem, &answer);
        // A strict group's rule is checked again in the transaction: a
        // concurrent create that took a host first sends this one on to the
        // next candidate.
        let mut vm = vm;
        let mut refused = None;
        for choice in candidates.iter().take(MAX_PLACEMENT_TRIES) {
            vm.zone = choice.provider.zone.clone();
            vm.provider_id = choice.provider.id;
            vm.host = choice.host.clone();
            match self.ctx.store.accept_create(&vm, &job, &audit, record.as_ref(), guard.as_ref()).await {
                Ok(()) => {
                    self.ctx.store.note_placed(vm.provider_id, &vm.host, vm.vcpus, vm.memory_mib);
                    self.ctx.announce(job.id);
                    tracing::info!(vm_id = %vm_id, job_id = %job.id, provider = %choice.provider.name,
                        host = %choice.host, "vm create accepted");
                    return Ok(answer);
                }
                Err(StoreError::Conflict(msg)) if guard.is_some() => refused = Some(msg),
                Err(StoreError::IdempotencyRace) => {
                    return self.replay_after_race(&tenant, idem).await;
                }
                Err(StoreError::QuotaExceeded(msg)) => {
                    return Err(ApiError::new(ErrorCode::QuotaExceeded, msg));
                }
                Err(e) => return Err(from_store(e, "vm")),
            }
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

    /// Accepts an operation on a VM: its job, the VM's in-flight state and
    /// the audit event, in one transaction.
    async fn operate(
        &self,
        p: Principal,
        key: Option<String>,
        req: VmActionRequest,
        kind: JobKind,
        extra: Extra,
    ) -> Result<VmOperationAccepted, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Write)?;
        let tenant = scope.tenant.clone();
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let idem = key.map(|k| {
            let h = fingerprint(&serde_json::json!({
                "method": kind.as_str(),
                "project_id": req.project_id,
                "vm_id": vm_id.to_string(),
                "extra": extra.fingerprint,
            }));
            (k, h)
        });
        if let Some(answer) = self.replay(&tenant, idem.as_ref()).await? {
            return Ok(answer);
        }
        let mut job = self.new_job(&p, &scope, vm_id, kind, &extra.request_id);
        job.snapshot_id = extra.snapshot_id;
        job.params = extra.params.clone();
        let mut audit = self.ctx.audit(&p, kind.as_str(), "vm", &vm_id.to_string(), "accepted");
        audit.project_id = req.project_id.clone();
        audit.job_id = job.id.to_string();
        if let Some(s) = extra.snapshot_id {
            audit.detail = format!("snapshot {s}");
        }
        if let Some(size) = &extra.resize {
            audit.detail = format!("flavor {}", size.flavor);
        }
        let op = AcceptOperation {
            scope,
            vm_id,
            kind,
            require_status: extra.require_status,
            snapshot: extra.snapshot,
            resize: extra.resize,
            host_change: None,
        };
        let answer = VmOperationAccepted {
            vm_id: vm_id.to_string(),
            job_id: job.id.to_string(),
            snapshot_id: extra.snapshot_id.map(|s| s.to_string()),
        };
        let record = self.record(&tenant, idem.as_ref(), &answer);
        match self.ctx.store.accept_operation(&op, &job, &audit, record.as_ref()).await {
            Ok(_) => {}
            Err(StoreError::IdempotencyRace) => return self.replay_after_race(&tenant, idem.as_ref()).await,
            Err(StoreError::NotFound) if extra.snapshot_id.is_some() => {
                return Err(ApiError::not_found(
                    "vm or snapshot",
                    format!("{vm_id}/{}", answer.snapshot_id.clone().unwrap_or_default()),
                ));
            }
            Err(StoreError::QuotaExceeded(msg)) => return Err(ApiError::new(ErrorCode::QuotaExceeded, msg)),
            Err(e) => return Err(from_store(e, &format!("vm {vm_id}"))),
        }
        self.ctx.announce(job.id);
        tracing::info!(vm_id = %vm_id, job_id = %job.id, kind = %kind, "vm operation accepted");
        Ok(answer)
    }

    /// Checks the capabilities `kind` needs on the VM as it is now (a 409
    /// names the first one missing), then accepts the operation on the
    /// condition that the VM is still in the state the check was made on.
    /// `prepare` adds what depends on the VM (a resize's sizes).
    async fn capability_op(
        &self,
        p: Principal,
        key: Option<String>,
        target: VmActionRequest,
        kind: JobKind,
        mut extra: Extra,
        prepare: impl FnOnce(&model::Vm, &mut Extra) -> Result<(), ApiError>,
    ) -> Result<VmOperationAccepted, ApiError> {
        let VmActionRequest { project_id, vm_id } = target;
        validate::project_id(&project_id)?;
        let scope = p.scope(&project_id, Access::Write)?;
        let id: VmId = validate::id("vm_id", &vm_id)?;
        let vm = self.ctx.store.get_vm(&scope, id).await.map_err(|e| from_store(e, &format!("vm {id}")))?;
        let provider =
            self.ctx.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        if let Some(cap) = missing(required_capabilities(kind, vm.status), &provider.capabilities) {
            let hint = match (cap, vm.status) {
                (Capability::SnapshotRunning | Capability::HotResize, VmStatus::Active) => {
                    "; stop the vm first"
                }
                _ => "",
            };
            return Err(ApiError::feature_not_supported(
                cap.flag(),
                format!("the vm's provider does not support {kind} of a {} vm ({cap}){hint}", vm.status),
            ));
        }
        prepare(&vm, &mut extra)?;
        extra.require_status = Some(vm.status);
        self.operate(p, key, VmActionRequest { project_id, vm_id }, kind, extra).await
    }

    /// Revert or delete of an existing snapshot.
    async fn snapshot_action(
        &self,
        req: tonic::Request<hcp_proto::tenant::SnapshotActionRequest>,
        kind: JobKind,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            let id: SnapshotId = validate::id("snapshot_id", &r.snapshot_id)?;
            let change = if kind == JobKind::SnapshotRevert {
                SnapshotAccept::Revert(id)
            } else {
                SnapshotAccept::Delete(id)
            };
            let extra = Extra {
                snapshot: Some(change),
                snapshot_id: Some(id),
                fingerprint: serde_json::json!({"snapshot_id": r.snapshot_id}),
                request_id,
                ..Extra::default()
            };
            let target = VmActionRequest { project_id: r.project_id, vm_id: r.vm_id };
            self.capability_op(p, key, target, kind, extra, |_, _| Ok(())).await
        })
        .await
    }

    /// Returns the recorded answer for an idempotency key, if the key is
    /// live: the original answer for the same request, 422 for another.
    async fn replay(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
    ) -> Result<Option<VmOperationAccepted>, ApiError> {
        let Some((key, hash)) = idem else { return Ok(None) };
        let record = self
            .ctx
            .store
            .get_idempotency(tenant, key, now())
            .await
            .map_err(|e| from_store(e, "idempotency key"))?;
        let Some(record) = record else { return Ok(None) };
        if record.request_hash != *hash {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request",
            )
            .with_detail("field", "Idempotency-Key"));
        }
        let answer: serde_json::Value =
            serde_json::from_str(&record.response).map_err(|_| ApiError::internal())?;
        let field = |k: &str| answer.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        tracing::info!(key = %key, "idempotent replay");
        Ok(Some(VmOperationAccepted {
            vm_id: field("vm_id"),
            job_id: field("job_id"),
            snapshot_id: Some(field("snapshot_id")).filter(|s| !s.is_empty()),
        }))
    }

    /// A concurrent request with the same key committed first: answer as it did.
    async fn replay_after_race(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
    ) -> Result<VmOperationAccepted, ApiError> {
        self.replay(tenant, idem).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                "a concurrent request with this Idempotency-Key is in progress; retry",
            )
        })
    }

    fn record(
        &self,
        tenant: &str,
        idem: Option<&(String, String)>,
        answer: &VmOperationAccepted,
    ) -> Option<IdempotencyRecord> {
        let (key, hash) = idem?;
        let t = now();
        Some(IdempotencyRecord {
            tenant_id: tenant.to_owned(),
            key: key.clone(),
            request_hash: hash.clone(),
            response: serde_json::json!({
                "vm_id": answer.vm_id,
                "job_id": answer.job_id,
                "snapshot_id": answer.snapshot_id,
            })
            .to_string(),
            created_at: t,
            expires_at: t + chrono::Duration::seconds(self.ctx.config.idempotency_key_ttl_seconds as i64),
        })
    }

    async fn get_vm(&self, p: Principal, req: GetVmRequest) -> Result<Vm, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let vm =
            self.ctx.store.get_vm(&scope, vm_id).await.map_err(|e| from_store(e, &format!("vm {vm_id}")))?;
        self.view(&vm).await
    }

    /// A VM by id alone: found in the tenant, then shown only if the token
    /// may read its project (NOT_FOUND otherwise, like another tenant's).
    async fn get_vm_by_id(&self, p: Principal, req: GetVmByIdRequest) -> Result<Vm, ApiError> {
        let tenant = p.tenant()?;
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let not_found = || ApiError::new(ErrorCode::NotFound, format!("vm {vm_id} not found"));
        let vm = match self.ctx.store.get_vm_of_tenant(tenant, vm_id).await {
            Ok(vm) => vm,
            Err(StoreError::NotFound) => return Err(not_found()),
            Err(e) => return Err(from_store(e, &format!("vm {vm_id}"))),
        };
        if p.scope(&vm.project_id, Access::Read).is_err() {
            return Err(not_found());
        }
        self.view(&vm).await
    }

    /// Sets name, metadata or tags, as the mask says. No job.
    async fn update_vm(&self, p: Principal, req: UpdateVmRequest) -> Result<Vm, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Write)?;
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let paths = req.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid_field(
                "update_mask",
                "update_mask must name what to change: name, metadata and/or tags",
            ));
        }
        let mut update = crate::store::VmUpdate::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    validate::label("name", &req.name)?;
                    update.name = Some(req.name.clone());
                }
                "metadata" => {
                    validate::metadata(req.metadata.iter())?;
                    update.metadata =
                        Some(req.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
                "tags" => {
                    validate::tags("tags", &req.tags)?;
                    let mut tags = req.tags.clone();
                    tags.sort();
                    tags.dedup();
                    update.tags = Some(tags);
                }
                other => {
                    return Err(ApiError::invalid_field(
                        "update_mask",
                        format!("update_mask may name name, metadata and tags, not {}", excerpt(other)),
                    ));
                }
            }
        }
        let mut audit = self.ctx.audit(&p, "vm.update", "vm", &vm_id.to_string(), "succeeded");
        audit.project_id = scope.project.clone();
        audit.detail = paths.join(",");
        let vm = self
            .ctx
            .store
            .update_vm(&scope, vm_id, &update, &audit)
            .await
            .map_err(|e| from_store(e, &format!("vm {vm_id}")))?;
        self.view(&vm).await
    }

    /// Accepts a resize to another flavor.
    async fn resize_vm(
        &self,
        p: Principal,
        key: Option<String>,
        request_id: String,
        req: ResizeVmRequest,
    ) -> Result<VmOperationAccepted, ApiError> {
        validate::label("flavor", &req.flavor)?;
        let flavor = self.ctx.store.get_flavor(&req.flavor).await.map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::invalid_field("flavor", format!("unknown flavor {}", excerpt(&req.flavor)))
            }
            e => from_store(e, "flavor"),
        })?;
        let extra =
            Extra { fingerprint: serde_json::json!({"flavor": req.flavor}), request_id, ..Extra::default() };
        let target = VmActionRequest { project_id: req.project_id, vm_id: req.vm_id };
        self.capability_op(p, key, target, JobKind::ResizeVm, extra, |vm, extra| {
            if vm.flavor == flavor.name {
                return Err(ApiError::conflict(format!("vm {} already has flavor {}", vm.id, flavor.name)));
            }
            if flavor.disk_gib < vm.disk_gib {
                return Err(ApiError::invalid_field(
                    "flavor",
                    format!(
                        "flavor {} has a {} GiB disk; the vm has {} GiB and disks only grow",
                        flavor.name, flavor.disk_gib, vm.disk_gib
                    ),
                ));
            }
            extra.resize = Some(Size {
                flavor: flavor.name.clone(),
                vcpus: flavor.vcpus,
                memory_mib: flavor.memory_mib,
                disk_gib: flavor.disk_gib,
            });
            Ok(())
        })
        .await
    }

    async fn list_jobs(&self, p: Principal, req: ListJobsRequest) -> Result<ListJobsResponse, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let vm_id: Option<VmId> =
            if req.vm_id.is_empty() { None } else { Some(validate::id("vm_id", &req.vm_id)?) };
        let status = match hcp_proto::tenant::JobStatus::try_from(req.status) {
            Ok(s) => convert::job_status_from_proto(s),
            Err(_) => {
                return Err(ApiError::invalid_field("status", format!("unknown status {}", req.status)));
            }
        };
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(JobKind::parse(&req.kind).ok_or_else(|| {
                let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                ApiError::invalid_field(
                    "kind",
                    format!("unknown kind {}; one of {}", excerpt(&req.kind), kinds.join(", ")),
                )
            })?)
        };
        if let Some(vm) = vm_id {
            // A VM outside the project is NOT_FOUND, not an empty history.
            self.ctx.store.get_vm(&scope, vm).await.map_err(|e| from_store(e, &format!("vm {vm}")))?;
        }
        let mut binding = Binding::new("jobs");
        binding
            .push(&scope.tenant)
            .push(&scope.project)
            .push(&req.vm_id)
            .push(status.map(|s| s.as_str()).unwrap_or(""))
            .push(kind.map(|k| k.as_str()).unwrap_or(""));
        let query = ListJobsQuery {
            page_size: validate::page_size(req.page_size, 100)?,
            before: self.ctx.pages.open(&binding, &req.page_token)?,
            vm_id,
            status,
            kind,
        };
        let (jobs, next) =
            self.ctx.store.list_jobs(&scope, &query).await.map_err(|e| from_store(e, "jobs"))?;
        Ok(ListJobsResponse {
            jobs: jobs.iter().map(convert::job_to_tenant).collect(),
            next_page_token: next.map(|last| self.ctx.pages.seal(&binding, last)).unwrap_or_default(),
        })
    }

    async fn list_vms(&self, p: Principal, req: ListVmsRequest) -> Result<ListVmsResponse, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let tenant = &scope.tenant;
        let status = match hcp_proto::tenant::VmStatus::try_from(req.status) {
            Ok(s) => convert::vm_status_from_proto(s),
            Err(_) => {
                return Err(ApiError::invalid_field("status", format!("unknown status {}", req.status)));
            }
        };
        validate::tags("tag", &req.tag)?;
        let mut tags = req.tag.clone();
        tags.sort();
        tags.dedup();
        let mut binding = Binding::new("vms");
        binding.push(tenant).push(&req.project_id).push(status.map(|s| s.as_str()).unwrap_or(""));
        tags.iter().for_each(|t| {
            binding.push(t);
        });
        let query = ListVmsQuery {
            page_size: validate::page_size(req.page_size, 100)?,
            after: self.ctx.pages.open(&binding, &req.page_token)?,
            status,
            tags,
        };
        let (vms, next) = self.ctx.store.list_vms(&scope, &query).await.map_err(|e| from_store(e, "vms"))?;
        let mut caps = self.capabilities().await?;
        if vms.iter().any(|vm| !caps.contains_key(&vm.provider_id)) {
            // A provider newer than this process's copy.
            let providers = self.ctx.store.list_providers().await.map_err(|e| from_store(e, "providers"))?;
            caps = providers.into_iter().map(|p| (p.id, p.capabilities)).collect();
        }
        Ok(ListVmsResponse {
            vms: vms.iter().map(|vm| convert::vm_to_tenant(vm, caps.get(&vm.provider_id))).collect(),
            next_page_token: next.map(|last| self.ctx.pages.seal(&binding, last)).unwrap_or_default(),
        })
    }

    async fn create_console(
        &self,
        p: Principal,
        req: CreateConsoleRequest,
    ) -> Result<ConsoleSession, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Write)?;
        let vm_id: VmId = validate::id("vm_id", &req.vm_id)?;
        let kind = if req.r#type.is_empty() {
            ConsoleProtocol::Vnc
        } else {
            ConsoleProtocol::parse(&req.r#type).ok_or_else(|| {
                ApiError::invalid_field(
                    "type",
                    format!("console type must be vnc, spice, rdp or serial, got {}", excerpt(&req.r#type)),
                )
            })?
        };
        let protocol = kind.as_str().to_owned();
        let vm =
            self.ctx.store.get_vm(&scope, vm_id).await.map_err(|e| from_store(e, &format!("vm {vm_id}")))?;
        let provider =
            self.ctx.store.get_provider(vm.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        let capability = kind.capability();
        if !capability.of(&provider.capabilities) {
            return Err(ApiError::feature_not_supported(
                capability.flag(),
                format!("the vm's provider does not offer {protocol} consoles ({capability})"),
            ));
        }
        if vm.status != VmStatus::Active {
            return Err(ApiError::conflict(format!(
                "vm {vm_id} is {}; a console needs it ACTIVE",
                vm.status
            )));
        }
        // Ask the provider now, so a console that cannot work fails here
        // rather than when the tenant connects. The endpoint itself is not
        // stored: the console proxy asks again when the token is redeemed.
        let mut compute = self.ctx.clients.compute(&provider)?;
        let mut call = tonic::Request::new(hcp_proto::provider::GetConsoleRequest {
            vm_id: vm_id.to_string(),
            protocol: protocol.clone(),
        });
        hcp_telemetry::inject_request(&mut call);
        compute.get_console(call).await.map_err(|s| {
            let e = crate::providers::ProviderCallError::from_status(&s);
            ApiError::new(e.code, format!("the provider cannot open a console: {}", e.message))
        })?;

        let token = random_token();
        let t = now();
        let expires_at = t + chrono::Duration::seconds(self.ctx.config.console.token_ttl_seconds as i64);
        let session = model::ConsoleSession {
            token_hash: hash_token(&token),
            tenant_id: scope.tenant.clone(),
            project_id: req.project_id.clone(),
            vm_id,
            protocol: protocol.clone(),
            expires_at,
            used_at: None,
            revoked_at: None,
            created_at: t,
        };
        let mut audit = self.ctx.audit(&p, "vm.console", "vm", &vm_id.to_string(), "issued");
        audit.project_id = req.project_id.clone();
        audit.detail = protocol.clone();
        self.ctx
            .store
            .insert_console_session(&session, &audit)
            .await
            .map_err(|e| from_store(e, "console"))?;
        let base = self.ctx.config.console.public_base_url.trim_end_matches('/');
        let web_base = match base.split_once("://") {
            Some(("wss", rest)) => format!("https://{rest}"),
            Some(("ws", rest)) => format!("http://{rest}"),
            _ => base.to_owned(),
        };
        // Only VNC has a page in the browser; RDP has a relay for native
        // clients when the operator runs one.
        let web_url = match kind {
            ConsoleProtocol::Vnc => format!("{web_base}/console/{protocol}.html?token={token}"),
            _ => String::new(),
        };
        let address = match kind {
            ConsoleProtocol::Rdp => self.ctx.config.console.rdp_address.clone(),
            _ => String::new(),
        };
        Ok(ConsoleSession {
            r#type: protocol.clone(),
            url: format!("{base}/console/{protocol}?token={token}"),
            expires_at: Some(convert::ts(expires_at)),
            web_url,
            address,
            token,
        })
    }

    async fn get_job(&self, p: Principal, req: GetJobRequest) -> Result<Job, ApiError> {
        let tenant = p.tenant()?;
        let job_id: JobId = validate::id("job_id", &req.job_id)?;
        let job = self
            .ctx
            .store
            .get_job(tenant, job_id)
            .await
            .map_err(|e| from_store(e, &format!("job {job_id}")))?;
        // A job in a project the token does not grant is hidden like one of
        // another tenant.
        if !p.projects.contains(&job.project_id) {
            return Err(ApiError::new(ErrorCode::NotFound, format!("job {job_id} not found")));
        }
        Ok(convert::job_to_tenant(&job))
    }
}

/// Reads the `idempotency-key` metadata (the REST `Idempotency-Key`
/// header): 1 to 255 visible ASCII characters.
pub fn idempotency_key<T>(req: &tonic::Request<T>) -> Result<Option<String>, ApiError> {
    let Some(value) = req.metadata().get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::invalid_field(
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// SHA-256 of a canonical JSON value (serde_json maps are sorted).
fn fingerprint(v: &serde_json::Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

fn fingerprint_create(req: &CreateVmRequest) -> String {
    let metadata: BTreeMap<_, _> = req.metadata.iter().collect();
    fingerprint(&serde_json::json!({
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
    }))
}

/// What an operation adds to the VM and job it names.
#[derive(Default)]
struct Extra {
    snapshot: Option<SnapshotAccept>,
    snapshot_id: Option<SnapshotId>,
    require_status: Option<VmStatus>,
    /// The request's parameters, for the idempotency fingerprint.
    fingerprint: serde_json::Value,
    params: JobParams,
    resize: Option<Size>,
    request_id: String,
}

/// Candidates a create tries when a strict group's rule refuses the first.
const MAX_PLACEMENT_TRIES: usize = 32;

/// Longest X-Request-Id kept with a job.
const MAX_REQUEST_ID: usize = 255;

/// The request's `x-request-id` (visible ASCII, at most 255 bytes), or the
/// id of the trace it belongs to.
pub fn request_id<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .or_else(hcp_telemetry::current_trace_id)
        .unwrap_or_default()
}

/// Returns 32 random bytes, base64url: the console token given to the tenant.
pub fn random_token() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Returns the stored form of a console token.
pub fn hash_token(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[tonic::async_trait]
impl VmService for TenantApi {
    async fn create_placement_group(
        &self,
        req: tonic::Request<hcp_proto::tenant::CreatePlacementGroupRequest>,
    ) -> ApiResult<hcp_proto::tenant::PlacementGroup> {
        let p = principal(&req)?;
        handle(super::groups::create(&self.ctx, &p, req.into_inner())).await
    }

    async fn list_placement_groups(
        &self,
        req: tonic::Request<hcp_proto::tenant::ListPlacementGroupsRequest>,
    ) -> ApiResult<hcp_proto::tenant::ListPlacementGroupsResponse> {
        let p = principal(&req)?;
        handle(super::groups::list(&self.ctx, &p, &req.get_ref().project_id)).await
    }

    async fn get_placement_group(
        &self,
        req: tonic::Request<hcp_proto::tenant::PlacementGroupRequest>,
    ) -> ApiResult<hcp_proto::tenant::PlacementGroup> {
        let p = principal(&req)?;
        let r = req.get_ref();
        handle(super::groups::get(&self.ctx, &p, &r.project_id, &r.placement_group_id)).await
    }

    async fn delete_placement_group(
        &self,
        req: tonic::Request<hcp_proto::tenant::PlacementGroupRequest>,
    ) -> ApiResult<hcp_proto::tenant::DeletePlacementGroupResponse> {
        let p = principal(&req)?;
        let r = req.get_ref();
        handle(async {
            super::groups::delete(&self.ctx, &p, &r.project_id, &r.placement_group_id).await?;
            Ok(hcp_proto::tenant::DeletePlacementGroupResponse {})
        })
        .await
    }

    async fn create_vm(&self, req: tonic::Request<CreateVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let rid = request_id(&req);
        handle(self.create_vm(p, key, rid, req.into_inner())).await
    }

    async fn get_vm_by_id(&self, req: tonic::Request<GetVmByIdRequest>) -> ApiResult<Vm> {
        let p = principal(&req)?;
        handle(self.get_vm_by_id(p, req.into_inner())).await
    }

    async fn update_vm(&self, req: tonic::Request<UpdateVmRequest>) -> ApiResult<Vm> {
        let p = principal(&req)?;
        handle(self.update_vm(p, req.into_inner())).await
    }

    async fn resize_vm(&self, req: tonic::Request<ResizeVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let rid = request_id(&req);
        handle(self.resize_vm(p, key, rid, req.into_inner())).await
    }

    async fn list_vms(&self, req: tonic::Request<ListVmsRequest>) -> ApiResult<ListVmsResponse> {
        let p = principal(&req)?;
        handle(self.list_vms(p, req.into_inner())).await
    }

    async fn get_vm(&self, req: tonic::Request<GetVmRequest>) -> ApiResult<Vm> {
        let p = principal(&req)?;
        handle(self.get_vm(p, req.into_inner())).await
    }

    async fn start_vm(&self, req: tonic::Request<VmActionRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let extra = Extra { request_id: request_id(&req), ..Extra::default() };
        handle(self.operate(p, key, req.into_inner(), JobKind::StartVm, extra)).await
    }

    async fn stop_vm(&self, req: tonic::Request<StopVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            if r.timeout_seconds > MAX_STOP_TIMEOUT {
                return Err(ApiError::invalid_field(
                    "timeout_seconds",
                    format!("timeout_seconds is at most {MAX_STOP_TIMEOUT}"),
                ));
            }
            let extra = Extra {
                fingerprint: serde_json::json!({"force": r.force, "timeout_seconds": r.timeout_seconds}),
                params: JobParams::Stop { force: r.force, timeout_seconds: r.timeout_seconds },
                request_id,
                ..Extra::default()
            };
            let target = VmActionRequest { project_id: r.project_id, vm_id: r.vm_id };
            self.operate(p, key, target, JobKind::StopVm, extra).await
        })
        .await
    }

    async fn reboot_vm(&self, req: tonic::Request<RebootVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            use hcp_proto::tenant::RebootType;
            let hard = match RebootType::try_from(r.r#type) {
                Ok(RebootType::Hard) => true,
                Ok(RebootType::Soft | RebootType::Unspecified) => false,
                Err(_) => {
                    return Err(ApiError::invalid_field("type", format!("unknown reboot type {}", r.r#type)));
                }
            };
            let extra = Extra {
                fingerprint: serde_json::json!({"hard": hard}),
                params: JobParams::Reboot { hard },
                request_id,
                ..Extra::default()
            };
            let target = VmActionRequest { project_id: r.project_id, vm_id: r.vm_id };
            self.operate(p, key, target, JobKind::RebootVm, extra).await
        })
        .await
    }

    async fn delete_vm(&self, req: tonic::Request<VmActionRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let extra = Extra { request_id: request_id(&req), ..Extra::default() };
        handle(self.operate(p, key, req.into_inner(), JobKind::DeleteVm, extra)).await
    }

    async fn create_snapshot(
        &self,
        req: tonic::Request<hcp_proto::tenant::CreateSnapshotRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req).map_err(crate::error::status)?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            validate::label("name", &r.name)?;
            let id = SnapshotId::new();
            let snap = model::Snapshot {
                id,
                vm_id: validate::id("vm_id", &r.vm_id)?,
                name: r.name.clone(),
                status: model::SnapshotStatus::Creating,
                created_at: now(),
                updated_at: now(),
            };
            let extra = Extra {
                snapshot: Some(SnapshotAccept::Create(snap)),
                snapshot_id: Some(id),
                fingerprint: serde_json::json!({"name": r.name}),
                request_id,
                ..Extra::default()
            };
            let target = VmActionRequest { project_id: r.project_id, vm_id: r.vm_id };
            self.capability_op(p, key, target, JobKind::SnapshotCreate, extra, |_, _| Ok(())).await
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: tonic::Request<hcp_proto::tenant::ListSnapshotsRequest>,
    ) -> ApiResult<hcp_proto::tenant::ListSnapshotsResponse> {
        let p = principal(&req)?;
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Read)?;
            let vm: VmId = validate::id("vm_id", &r.vm_id)?;
            let snaps = self
                .ctx
                .store
                .list_snapshots(&scope, vm)
                .await
                .map_err(|e| from_store(e, &format!("vm {vm}")))?;
            Ok(hcp_proto::tenant::ListSnapshotsResponse {
                snapshots: snaps.iter().map(convert::snapshot_to_proto).collect(),
            })
        })
        .await
    }

    async fn revert_snapshot(
        &self,
        req: tonic::Request<hcp_proto::tenant::SnapshotActionRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        self.snapshot_action(req, JobKind::SnapshotRevert).await
    }

    async fn delete_snapshot(
        &self,
        req: tonic::Request<hcp_proto::tenant::SnapshotActionRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        self.snapshot_action(req, JobKind::SnapshotDelete).await
    }

    async fn create_console(&self, req: tonic::Request<CreateConsoleRequest>) -> ApiResult<ConsoleSession> {
        let p = principal(&req)?;
        handle(self.create_console(p, req.into_inner())).await
    }
}

/// Longest a single watch stays open; clients reconnect after it.
const WATCH_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

#[tonic::async_trait]
impl JobService for TenantApi {
    async fn get_job(&self, req: tonic::Request<GetJobRequest>) -> ApiResult<Job> {
        let p = principal(&req)?;
        handle(self.get_job(p, req.into_inner())).await
    }

    async fn list_jobs(&self, req: tonic::Request<ListJobsRequest>) -> ApiResult<ListJobsResponse> {
        let p = principal(&req)?;
        handle(self.list_jobs(p, req.into_inner())).await
    }

    type WatchJobStream = tokio_stream::wrappers::ReceiverStream<Result<Job, tonic::Status>>;

    async fn watch_job(&self, req: tonic::Request<GetJobRequest>) -> ApiResult<Self::WatchJobStream> {
        let p = principal(&req)?;
        let req = req.into_inner();
        let events = self.ctx.events.clone();
        let slot = events.admit().ok_or_else(|| {
            crate::error::status(
                ApiError::new(ErrorCode::Unavailable, "too many job watchers are open; retry later")
                    .with_detail(crate::error::DETAIL_RETRY_AFTER, "1"),
            )
        })?;
        // Subscribed before the first read, so no change falls in between.
        let mut changes = events.subscribe();
        // The first read checks access and existence before the stream opens.
        let first = self.get_job(p.clone(), req.clone()).await.map_err(crate::error::status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = self.ctx.store.clone();
        let tenant = p.tenant().map_err(crate::error::status)?.to_owned();
        let id: JobId = validate::id("job_id", &req.job_id).map_err(crate::error::status)?;
        let mut shutdown = events.shutdown();
        let fallback = events.fallback();
        tokio::spawn(async move {
            let _slot = slot;
            let deadline = tokio::time::Instant::now() + WATCH_MAX;
            let mut last = first.updated_at;
            let terminal = |j: &Job| {
                j.status == hcp_proto::tenant::JobStatus::Succeeded as i32
                    || j.status == hcp_proto::tenant::JobStatus::Failed as i32
                    || j.status == hcp_proto::tenant::JobStatus::Cancelled as i32
            };
            let done = terminal(&first);
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                // Woken by a notification about this job (or a lost one),
                // or by the fallback timer; ended by shutdown, the deadline
                // or a caller who went away.
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tokio::time::sleep(fallback) => {}
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tx.closed() => return,
                }
                let job = match store.get_job(&tenant, id).await {
                    Ok(j) => convert::job_to_tenant(&j),
                    Err(e) => {
                        let _ = tx.send(Err(crate::error::status(from_store(e, &format!("job {id}"))))).await;
                        return;
                    }
                };
                if job.updated_at != last {
                    last = job.updated_at;
                    let done = terminal(&job);
                    if tx.send(Ok(job)).await.is_err() || done {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn cancel_job(&self, req: tonic::Request<CancelJobRequest>) -> ApiResult<Job> {
        let p = principal(&req)?;
        let req = req.into_inner();
        handle(async {
            let id: JobId = validate::id("job_id", &req.job_id)?;
            // Access as for reading, plus the write role in the job's project.
            let job = self.get_job(p.clone(), GetJobRequest { job_id: req.job_id.clone() }).await?;
            let tenant = p.tenant_project(&job.project_id, Access::Write)?.to_owned();
            let mut audit = self.ctx.audit(&p, "job.cancel", "job", &id.to_string(), "succeeded");
            audit.project_id = job.project_id.clone();
            audit.job_id = id.to_string();
            self.ctx
                .store
                .cancel_job(&tenant, id, &audit)
                .await
                .map_err(|e| from_store(e, &format!("job {id}")))?;
            self.ctx.events.changed(id);
            let job =
                self.ctx.store.get_job(&tenant, id).await.map_err(|e| from_store(e, &format!("job {id}")))?;
            Ok(convert::job_to_tenant(&job))
        })
        .await
    }
}

/// Longest graceful stop a tenant may ask for.
const MAX_STOP_TIMEOUT: u32 = 3600;

#[tonic::async_trait]
impl QuotaService for TenantApi {
    async fn get_project_quota(
        &self,
        req: tonic::Request<hcp_proto::tenant::GetProjectQuotaRequest>,
    ) -> ApiResult<hcp_proto::tenant::ProjectQuota> {
        let p = principal(&req)?;
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Read)?;
            let (quota, usage) =
                self.ctx.store.get_quota(&scope).await.map_err(|e| from_store(e, "quota"))?;
            Ok(hcp_proto::tenant::ProjectQuota {
                project_id: scope.project.clone(),
                max_instances: quota.max_instances,
                max_vcpus: quota.max_vcpus,
                max_memory_mib: quota.max_memory_mib,
                instances: u32::try_from(usage.instances).unwrap_or(u32::MAX),
                vcpus: u32::try_from(usage.vcpus).unwrap_or(u32::MAX),
                memory_mib: usage.memory_mib,
            })
        })
        .await
    }
}
