//! `hcp.tenant.v1`: VMs and jobs. Every read and write is scoped to the
//! caller's tenant and the project in the request; another tenant's VM or job
//! is NOT_FOUND, exactly like one that does not exist.

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{SnapshotId, VmId};
use hcp_proto::tenant::quota_service_server::QuotaService;
use hcp_proto::tenant::vm_service_server::VmService;
use hcp_proto::tenant::{
    ConsoleSession, CreateConsoleRequest, CreateVmRequest, GetVmByIdRequest, GetVmRequest, ListVmsRequest,
    ListVmsResponse, RebootVmRequest, ResizeVmRequest, StopVmRequest, UpdateVmRequest, Vm, VmActionRequest,
    VmOperationAccepted,
};

mod console;
mod create;
mod jobs;
mod volumes;

use super::idempotency::{self, Key, idempotency_key};
use super::page::Binding;
use super::{ApiContext, ApiResult, checked, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal, principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::{Capability, JobParams, Size, missing, required_capabilities};
use crate::model::{self, JobKind, Scope, VmStatus, now};
use crate::store::{AcceptOperation, ListVmsQuery, SnapshotAccept, StoreError};

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
            Some(vm),
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

    /// The checks every operation on an existing VM makes first, in this
    /// order: the caller may write in the project, the VM id parses, the
    /// Idempotency-Key is well formed. The caller then replays a live key
    /// ([`idempotency::replay`]) before anything that depends on the VM.
    /// `fingerprint` holds the request's own fields.
    fn target(
        &self,
        p: &Principal,
        key: Result<Option<String>, ApiError>,
        project_id: &str,
        vm_id: &str,
        method: &str,
        fingerprint: serde_json::Value,
    ) -> Result<Target, ApiError> {
        validate::project_id(project_id)?;
        let scope = p.scope(project_id, Access::Write)?;
        let vm_id: VmId = validate::id("vm_id", vm_id)?;
        let request = serde_json::json!({
            "method": method,
            "project_id": project_id,
            "vm_id": vm_id.to_string(),
            "extra": fingerprint,
        });
        let idem = Key::json(&scope.tenant, key?, &request);
        Ok(Target { scope, vm_id, idem })
    }

    /// The VM when no job is in flight on it: NOT_FOUND, or CONFLICT naming
    /// the job in `details.job_id`, whatever else is wrong with the request.
    async fn idle_vm(&self, t: &Target) -> Result<model::Vm, ApiError> {
        let what = format!("vm {}", t.vm_id);
        let vm = self.ctx.store.get_vm(&t.scope, t.vm_id).await.map_err(|e| from_store(e, &what))?;
        if let Some(job) = vm.current_job_id {
            let message = format!("vm {} is {}: job {job} is operating on it", vm.id, vm.status);
            return Err(from_store(StoreError::Busy { job, message }, &what));
        }
        Ok(vm)
    }

    /// Refuses `kind` on `vm` when its provider lacks a capability the
    /// operation needs in the VM's state (a 409 naming the first missing).
    async fn check_capability(&self, vm: &model::Vm, kind: JobKind) -> Result<(), ApiError> {
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
        Ok(())
    }

    /// An operation whose only checks of its own are the store's (the VM's
    /// state): start and delete.
    async fn plain_op(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        req: VmActionRequest,
        kind: JobKind,
        extra: Extra,
    ) -> Result<VmOperationAccepted, ApiError> {
        let t =
            self.target(&p, key, &req.project_id, &req.vm_id, kind.as_str(), extra.fingerprint.clone())?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        self.accept(&p, t, kind, extra).await
    }

    /// Accepts an operation on a VM: its job, the VM's in-flight state, the
    /// audit event and the idempotency key, in one transaction (the store
    /// checks the VM again there: found, no job in flight, its state).
    async fn accept(
        &self,
        p: &Principal,
        t: Target,
        kind: JobKind,
        extra: Extra,
    ) -> Result<VmOperationAccepted, ApiError> {
        let Target { scope, vm_id, idem } = t;
        let mut job = self.new_job(p, &scope, vm_id, kind, &extra.request_id);
        job.snapshot_id = extra.snapshot_id;
        job.image_id = extra.image.as_ref().map(|i| i.id);
        job.params = extra.params.clone();
        let mut audit =
            self.ctx.audit(p, AuditAction::Job(kind), Resource::Vm(vm_id), AuditOutcome::Accepted);
        audit.project_id = scope.project.clone();
        // An operator acting on the tenant's VM has no tenant of its own.
        audit.tenant_id.clone_from(&scope.tenant);
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
            image: extra.image.clone(),
            resize: extra.resize,
            host_change: None,
            capacity: extra.capacity,
        };
        let answer = VmOperationAccepted {
            vm_id: vm_id.to_string(),
            job_id: job.id.to_string(),
            snapshot_id: extra.snapshot_id.map(|s| s.to_string()),
            volume_id: None,
            image_id: extra.image.as_ref().map(|i| i.id.to_string()),
        };
        let record = idempotency::record(&self.ctx, idem.as_ref(), &answer);
        match self.ctx.store.accept_operation(&op, &job, &audit, record.as_ref()).await {
            Ok(_) => {}
            Err(StoreError::IdempotencyRace) => {
                return idempotency::replay_after_race(&self.ctx, idem.as_ref()).await;
            }
            Err(StoreError::NotFound) if extra.snapshot_id.is_some() => {
                return Err(ApiError::not_found(
                    "vm or snapshot",
                    format!("{vm_id}/{}", answer.snapshot_id.clone().unwrap_or_default()),
                ));
            }
            Err(StoreError::QuotaExceeded(msg)) => return Err(ApiError::new(ErrorCode::QuotaExceeded, msg)),
            Err(e) => return Err(from_store(e, &format!("vm {vm_id}"))),
        }
        if extra.image.is_some() {
            // A new image is in the catalog creates read.
            self.ctx.store.catalog_changed();
        }
        self.ctx.announce(job.id);
        tracing::info!(vm_id = %vm_id, job_id = %job.id, kind = %kind, "vm operation accepted");
        Ok(answer)
    }

    /// An operator's operation on a tenant's VM (`api::fleet`): the same
    /// accepting transaction as the tenant's own (the store checks the VM
    /// again there), in the VM's project, with the operator as the job's
    /// actor and the audit event's. The caller has found the VM and
    /// handles the Idempotency-Key.
    pub(super) async fn operate_as(
        &self,
        p: &Principal,
        vm: &model::Vm,
        kind: JobKind,
        params: JobParams,
        request_id: String,
    ) -> Result<VmOperationAccepted, ApiError> {
        let scope = Scope { tenant: vm.tenant_id.clone(), project: vm.project_id.clone() };
        let t = Target { scope, vm_id: vm.id, idem: None };
        self.accept(p, t, kind, Extra { params, request_id, ..Extra::default() }).await
    }

    /// Revert or delete of an existing snapshot.
    async fn snapshot_action(
        &self,
        req: tonic::Request<hcp_proto::tenant::SnapshotActionRequest>,
        kind: JobKind,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            let fingerprint = serde_json::json!({"snapshot_id": r.snapshot_id});
            let t = self.target(&p, key, &r.project_id, &r.vm_id, kind.as_str(), fingerprint)?;
            if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
                return Ok(answer);
            }
            let vm = self.idle_vm(&t).await?;
            hcp_proto::rules::check(&r)?;
            let id: SnapshotId = validate::id("snapshot_id", &r.snapshot_id)?;
            self.check_capability(&vm, kind).await?;
            let change = if kind == JobKind::SnapshotRevert {
                SnapshotAccept::Revert(id)
            } else {
                SnapshotAccept::Delete(id)
            };
            let extra = Extra {
                snapshot: Some(change),
                snapshot_id: Some(id),
                require_status: Some(vm.status),
                request_id,
                ..Extra::default()
            };
            self.accept(&p, t, kind, extra).await
        })
        .await
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

    /// Sets name, metadata or tags, as the mask says. No job; allowed while
    /// one is in flight.
    async fn update_vm(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        req: UpdateVmRequest,
    ) -> Result<Vm, ApiError> {
        let paths = req.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        let metadata: std::collections::BTreeMap<_, _> = req.metadata.iter().collect();
        let fingerprint = serde_json::json!({"name": req.name, "metadata": metadata, "tags": req.tags, "update_mask": paths});
        let t =
            self.target(&p, key, &req.project_id, &req.vm_id, AuditAction::VmUpdate.as_str(), fingerprint)?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let update = match hcp_proto::rules::check(&req).and_then(|()| vm_update(&req, &paths)) {
            Ok(update) => update,
            Err(e) => {
                // A VM that does not exist is named first.
                let what = format!("vm {}", t.vm_id);
                self.ctx.store.get_vm(&t.scope, t.vm_id).await.map_err(|e| from_store(e, &what))?;
                return Err(e);
            }
        };
        let vm_id = t.vm_id;
        let mut audit =
            self.ctx.audit(&p, AuditAction::VmUpdate, Resource::Vm(vm_id), AuditOutcome::Succeeded);
        audit.project_id = t.scope.project.clone();
        audit.detail = paths.join(",");
        let result = match self.ctx.store.update_vm(&t.scope, vm_id, &update, &audit).await {
            Ok(vm) => self.view(&vm).await,
            Err(e) => Err(from_store(e, &format!("vm {vm_id}"))),
        };
        idempotency::finish(&self.ctx, t.idem.as_ref(), result).await
    }

    /// Accepts a resize to another flavor.
    async fn resize_vm(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        request_id: String,
        req: ResizeVmRequest,
    ) -> Result<VmOperationAccepted, ApiError> {
        let kind = JobKind::ResizeVm;
        let fingerprint = serde_json::json!({"flavor": req.flavor});
        let t = self.target(&p, key, &req.project_id, &req.vm_id, kind.as_str(), fingerprint)?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let vm = self.idle_vm(&t).await?;
        hcp_proto::rules::check(&req)?;
        let flavor = self.ctx.store.get_flavor(&req.flavor).await.map_err(|e| match e {
            StoreError::NotFound => {
                ApiError::invalid_field("flavor", format!("unknown flavor {}", excerpt(&req.flavor)))
            }
            e => from_store(e, "flavor"),
        })?;
        self.check_capability(&vm, kind).await?;
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
        let extra = Extra {
            resize: Some(Size {
                flavor: flavor.name.clone(),
                vcpus: flavor.vcpus,
                memory_mib: flavor.memory_mib,
                disk_gib: flavor.disk_gib,
            }),
            capacity: crate::placement::room_of(&self.ctx.store, &vm).await?,
            require_status: Some(vm.status),
            request_id,
            ..Extra::default()
        };
        self.accept(&p, t, kind, extra).await
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
}

/// An operation on an existing VM past its first checks ([`TenantApi::target`]).
struct Target {
    scope: Scope,
    vm_id: VmId,
    idem: Option<Key>,
}

/// The change an UpdateVm's mask asks for, each field checked.
fn vm_update(req: &UpdateVmRequest, paths: &[String]) -> Result<crate::store::VmUpdate, ApiError> {
    let fields = Fields { name: &req.name, metadata: &req.metadata, tags: &req.tags, what: "VM" };
    let (name, metadata, tags) = fields_update(&fields, paths)?;
    Ok(crate::store::VmUpdate { name, metadata, tags })
}

/// The tenant-owned fields of an update request (a VM's, a volume's).
struct Fields<'a> {
    name: &'a str,
    metadata: &'a std::collections::HashMap<String, String>,
    tags: &'a [String],
    /// What has them, for messages ("VM").
    what: &'a str,
}

/// The new name, metadata and tags an update's mask asks for (`None`:
/// kept), each field checked.
#[allow(clippy::type_complexity)]
fn fields_update(
    req: &Fields<'_>,
    paths: &[String],
) -> Result<(Option<String>, Option<std::collections::BTreeMap<String, String>>, Option<Vec<String>>), ApiError>
{
    if paths.is_empty() {
        return Err(ApiError::invalid_field(
            "update_mask",
            "update_mask must name what to change: name, metadata and/or tags",
        ));
    }
    let mut update = crate::store::VmUpdate::default();
    for path in paths {
        match path.as_str() {
            "name" => {
                // A name is never removed: naming it in the mask needs one
                // (a rule between two fields, which the document says in
                // words; its grammar is the field's rule).
                if req.name.is_empty() {
                    return Err(ApiError::invalid_field(
                        "name",
                        format!(
                            "update_mask names name, so name must be given: a {} always has a name",
                            req.what
                        ),
                    ));
                }
                validate::label("name", req.name)?;
                update.name = Some(req.name.to_owned());
            }
            "metadata" => {
                validate::metadata(req.metadata.iter())?;
                update.metadata = Some(req.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            }
            "tags" => {
                validate::tags("tags", req.tags)?;
                let mut tags = req.tags.to_vec();
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
    Ok((update.name, update.metadata, update.tags))
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
    /// The room of the VM's host, for a resize that grows it.
    capacity: Option<crate::store::CapacityGuard>,
    request_id: String,
    /// The private image a capture makes.
    image: Option<model::Image>,
}

/// The request's `x-request-id` (visible ASCII, at most 255 bytes), or the
/// id of the trace it belongs to.
pub fn request_id<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| hcp_proto::rules::key_header_ok(v.as_bytes()))
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
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "CreatePlacementGroup", &r);
            idempotency::once(&self.ctx, idem, super::groups::create(&self.ctx, &p, r)).await
        })
        .await
    }

    async fn list_placement_groups(
        &self,
        req: tonic::Request<hcp_proto::tenant::ListPlacementGroupsRequest>,
    ) -> ApiResult<hcp_proto::tenant::ListPlacementGroupsResponse> {
        let p = checked(&req)?;
        handle(super::groups::list(&self.ctx, &p, &req.get_ref().project_id)).await
    }

    async fn get_placement_group(
        &self,
        req: tonic::Request<hcp_proto::tenant::PlacementGroupRequest>,
    ) -> ApiResult<hcp_proto::tenant::PlacementGroup> {
        let p = checked(&req)?;
        let r = req.get_ref();
        handle(super::groups::get(&self.ctx, &p, &r.project_id, &r.placement_group_id)).await
    }

    async fn delete_placement_group(
        &self,
        req: tonic::Request<hcp_proto::tenant::PlacementGroupRequest>,
    ) -> ApiResult<hcp_proto::tenant::DeletePlacementGroupResponse> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let r = req.get_ref();
        handle(async {
            let (scope, _) = super::groups::target(&p, &r.project_id, &r.placement_group_id, Access::Write)?;
            let idem = Key::message(&scope.tenant, key?, "DeletePlacementGroup", r);
            let delete = async {
                super::groups::delete(&self.ctx, &p, &r.project_id, &r.placement_group_id).await?;
                Ok(hcp_proto::tenant::DeletePlacementGroupResponse {})
            };
            idempotency::once(&self.ctx, idem, delete).await
        })
        .await
    }

    async fn attach_volume(
        &self,
        req: tonic::Request<hcp_proto::tenant::AttachVolumeRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        let r = req.into_inner();
        handle(self.attach_or_detach(p, key, rid, volumes::ids_of_attach(&r), JobKind::AttachVolume)).await
    }

    async fn detach_volume(
        &self,
        req: tonic::Request<hcp_proto::tenant::DetachVolumeRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        let r = req.into_inner();
        handle(self.attach_or_detach(p, key, rid, volumes::ids_of_detach(&r), JobKind::DetachVolume)).await
    }

    async fn create_vm(&self, req: tonic::Request<CreateVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        handle(self.create_vm(p, key, rid, req.into_inner())).await
    }

    async fn get_vm_by_id(&self, req: tonic::Request<GetVmByIdRequest>) -> ApiResult<Vm> {
        let p = checked(&req)?;
        handle(self.get_vm_by_id(p, req.into_inner())).await
    }

    async fn update_vm(&self, req: tonic::Request<UpdateVmRequest>) -> ApiResult<Vm> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        handle(self.update_vm(p, key, req.into_inner())).await
    }

    async fn resize_vm(&self, req: tonic::Request<ResizeVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        handle(self.resize_vm(p, key, rid, req.into_inner())).await
    }

    async fn list_vms(&self, req: tonic::Request<ListVmsRequest>) -> ApiResult<ListVmsResponse> {
        let p = checked(&req)?;
        handle(self.list_vms(p, req.into_inner())).await
    }

    async fn get_vm(&self, req: tonic::Request<GetVmRequest>) -> ApiResult<Vm> {
        let p = checked(&req)?;
        handle(self.get_vm(p, req.into_inner())).await
    }

    async fn start_vm(&self, req: tonic::Request<VmActionRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let extra = Extra { request_id: request_id(&req), ..Extra::default() };
        handle(self.plain_op(p, key, req.into_inner(), JobKind::StartVm, extra)).await
    }

    async fn stop_vm(&self, req: tonic::Request<StopVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            let kind = JobKind::StopVm;
            let fingerprint = serde_json::json!({"force": r.force, "timeout_seconds": r.timeout_seconds});
            let t = self.target(&p, key, &r.project_id, &r.vm_id, kind.as_str(), fingerprint)?;
            if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
                return Ok(answer);
            }
            // The store names a job in flight; a request that breaks a rule
            // reads the VM first so that the job is named all the same.
            if let Err(e) = hcp_proto::rules::check(&r) {
                self.idle_vm(&t).await?;
                return Err(e);
            }
            let extra = Extra {
                params: JobParams::Stop { force: r.force, timeout_seconds: r.timeout_seconds },
                request_id,
                ..Extra::default()
            };
            self.accept(&p, t, kind, extra).await
        })
        .await
    }

    async fn reboot_vm(&self, req: tonic::Request<RebootVmRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            use hcp_proto::tenant::RebootType;
            let kind = JobKind::RebootVm;
            let hard = match RebootType::try_from(r.r#type) {
                Ok(RebootType::Hard) => Ok(true),
                Ok(RebootType::Soft | RebootType::Unspecified) => Ok(false),
                Err(_) => Err(ApiError::invalid_field("type", format!("unknown reboot type {}", r.r#type))),
            };
            let fingerprint = match &hard {
                Ok(hard) => serde_json::json!({"hard": hard}),
                Err(_) => serde_json::json!({"type": r.r#type}),
            };
            let t = self.target(&p, key, &r.project_id, &r.vm_id, kind.as_str(), fingerprint)?;
            if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
                return Ok(answer);
            }
            let hard = match hcp_proto::rules::check(&r).and(hard) {
                Ok(hard) => hard,
                Err(e) => {
                    self.idle_vm(&t).await?;
                    return Err(e);
                }
            };
            let extra = Extra { params: JobParams::Reboot { hard }, request_id, ..Extra::default() };
            self.accept(&p, t, kind, extra).await
        })
        .await
    }

    async fn delete_vm(&self, req: tonic::Request<VmActionRequest>) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let extra = Extra { request_id: request_id(&req), ..Extra::default() };
        handle(self.plain_op(p, key, req.into_inner(), JobKind::DeleteVm, extra)).await
    }

    async fn create_snapshot(
        &self,
        req: tonic::Request<hcp_proto::tenant::CreateSnapshotRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            let kind = JobKind::SnapshotCreate;
            let fingerprint = serde_json::json!({"name": r.name});
            let t = self.target(&p, key, &r.project_id, &r.vm_id, kind.as_str(), fingerprint)?;
            if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
                return Ok(answer);
            }
            let vm = self.idle_vm(&t).await?;
            hcp_proto::rules::check(&r)?;
            self.check_capability(&vm, kind).await?;
            let id = SnapshotId::new();
            let snap = model::Snapshot {
                id,
                vm_id: t.vm_id,
                name: r.name.clone(),
                status: model::SnapshotStatus::Creating,
                created_at: now(),
                updated_at: now(),
            };
            let extra = Extra {
                snapshot: Some(SnapshotAccept::Create(snap)),
                snapshot_id: Some(id),
                require_status: Some(vm.status),
                request_id,
                ..Extra::default()
            };
            self.accept(&p, t, kind, extra).await
        })
        .await
    }

    async fn capture_vm(
        &self,
        req: tonic::Request<hcp_proto::tenant::CaptureVmRequest>,
    ) -> ApiResult<VmOperationAccepted> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            let kind = JobKind::CaptureVm;
            let fingerprint = serde_json::json!({"image_name": r.image_name, "description": r.description});
            let t = self.target(&p, key, &r.project_id, &r.vm_id, kind.as_str(), fingerprint)?;
            if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
                return Ok(answer);
            }
            let vm = self.idle_vm(&t).await?;
            hcp_proto::rules::check(&r)?;
            super::images::capturable(&vm)?;
            self.check_capability(&vm, kind).await?;
            let image =
                super::images::capture_image(&self.ctx, &t.scope, &vm, &r.image_name, &r.description).await?;
            let extra =
                Extra { require_status: Some(vm.status), image: Some(image), request_id, ..Extra::default() };
            self.accept(&p, t, kind, extra).await
        })
        .await
    }

    async fn delete_image(
        &self,
        req: tonic::Request<hcp_proto::tenant::DeleteProjectImageRequest>,
    ) -> ApiResult<hcp_proto::tenant::ImageDeletion> {
        let p = principal(&req)?;
        let key = idempotency_key(&req);
        let request_id = request_id(&req);
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Write)?;
            let idem = Key::json(
                &scope.tenant,
                key?,
                &serde_json::json!({"method": "DeleteImage", "project_id": r.project_id, "name": r.name}),
            );
            if let Some(answer) = idempotency::replay(&self.ctx, idem.as_ref()).await? {
                return Ok(answer);
            }
            hcp_proto::rules::check(&r)?;
            let what = format!("image {} in project {}", excerpt(&r.name), r.project_id);
            let image = self
                .ctx
                .store
                .get_image_by_name(&r.name, Some(&scope))
                .await
                .map_err(|e| from_store(e, &what))?;
            // A public image is the operators' to delete.
            if image.visibility != model::ImageVisibility::Private {
                return Err(ApiError::not_found("private image", &what));
            }
            let result = super::images::delete(&self.ctx, &p, &image, request_id).await.map(|job| {
                hcp_proto::tenant::ImageDeletion {
                    image_id: image.id.to_string(),
                    job_id: job.map(|j| j.to_string()).unwrap_or_default(),
                }
            });
            idempotency::finish(&self.ctx, idem.as_ref(), result).await
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: tonic::Request<hcp_proto::tenant::ListSnapshotsRequest>,
    ) -> ApiResult<hcp_proto::tenant::ListSnapshotsResponse> {
        let p = checked(&req)?;
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
        let key = idempotency_key(&req);
        handle(self.create_console(p, key, req.into_inner())).await
    }

    async fn get_console_log(
        &self,
        req: tonic::Request<hcp_proto::tenant::GetConsoleLogRequest>,
    ) -> ApiResult<hcp_proto::tenant::ConsoleLog> {
        let p = checked(&req)?;
        handle(self.console_log(p, req.into_inner())).await
    }
}

#[tonic::async_trait]
impl QuotaService for TenantApi {
    async fn get_project_usage(
        &self,
        req: tonic::Request<hcp_proto::tenant::GetProjectUsageRequest>,
    ) -> ApiResult<hcp_proto::tenant::UsageReport> {
        let p = checked(&req)?;
        let r = req.into_inner();
        handle(async {
            validate::project_id(&r.project_id)?;
            let scope = p.scope(&r.project_id, Access::Read)?;
            hcp_proto::rules::check(&r)?;
            let query = super::usage::Query::new(
                &r.from,
                &r.to,
                &r.group_by,
                Some(&scope.tenant),
                Some(&scope.project),
            )?;
            super::usage::report(&self.ctx, &query).await
        })
        .await
    }

    async fn get_project_quota(
        &self,
        req: tonic::Request<hcp_proto::tenant::GetProjectQuotaRequest>,
    ) -> ApiResult<hcp_proto::tenant::ProjectQuota> {
        let p = checked(&req)?;
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
                max_volumes: quota.max_volumes,
                max_volume_gib: quota.max_volume_gib,
                volumes: u32::try_from(usage.volumes).unwrap_or(u32::MAX),
                volume_gib: usage.volume_gib,
                max_images: quota.max_images,
                max_image_gib: quota.max_image_gib,
                images: u32::try_from(usage.images).unwrap_or(u32::MAX),
                image_gib: usage.image_gib,
            })
        })
        .await
    }
}
