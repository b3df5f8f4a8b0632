//! A project's volumes (`hcp.tenant.v1.VolumeService`) and attaching them
//! to VMs (`VmService.AttachVolume` / `DetachVolume`). Every check that
//! does not need the transaction is made here, in the documented order;
//! the store repeats the state checks inside it.

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{VmId, VolumeId};
use hcp_proto::tenant::volume_service_server::VolumeService;
use hcp_proto::tenant::{
    AttachVolumeRequest, CreateVolumeRequest, DetachVolumeRequest, ExtendVolumeRequest, GetVolumeRequest,
    ListVolumesRequest, ListVolumesResponse, UpdateVolumeRequest, VmOperationAccepted, Volume,
    VolumeActionRequest, VolumeOperationAccepted,
};

use super::{TenantApi, request_id};
use crate::api::idempotency::{self, Key, idempotency_key};
use crate::api::page::Binding;
use crate::api::{ApiResult, checked, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::lifecycle::{AttachedVm, Capability, volume_missing};
use crate::model::{self, JobKind, Scope, VmStatus, VolumeStatus, now};
use crate::store::{AttachTarget, ListVolumesQuery, StoreError, VolumeOperation, VolumeUpdate};

/// An operation on an existing volume past its first checks.
struct VolumeTarget {
    scope: Scope,
    volume_id: VolumeId,
    idem: Option<Key>,
}

impl TenantApi {
    fn volume_job(&self, p: &Principal, scope: &Scope, kind: JobKind, request_id: &str) -> model::Job {
        model::Job::queued(
            kind,
            scope,
            None,
            &p.subject,
            self.ctx.config.jobs.max_attempts,
            hcp_telemetry::current_traceparent(),
            request_id,
        )
    }

    /// The tenant view of a volume (reading the VM it is attached to and
    /// its provider's flags, for `allowed_actions`).
    async fn volume_view(&self, v: &model::Volume) -> Result<Volume, ApiError> {
        let caps = match self.ctx.store.provider_cached(v.provider_id).await {
            Ok(p) => Some(p.capabilities),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(from_store(e, "provider")),
        };
        let vm = match v.attachment {
            None => None,
            Some(a) => match self.ctx.store.get_vm_internal(a.vm_id).await {
                Ok(vm) => Some(AttachedVm { status: vm.status, job: vm.current_job_id }),
                Err(StoreError::NotFound) => None,
                Err(e) => return Err(from_store(e, "vm")),
            },
        };
        Ok(convert::volume_to_tenant(v, vm, caps.as_ref()))
    }

    async fn create_volume(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        request_id: String,
        req: CreateVolumeRequest,
    ) -> Result<VolumeOperationAccepted, ApiError> {
        let scope = p.scope(&req.project_id, Access::Write)?;
        let idem = Key::message(&scope.tenant, key?, "CreateVolume", &req);
        if let Some(answer) = idempotency::replay(&self.ctx, idem.as_ref()).await? {
            return Ok(answer);
        }
        let vtype = self.ctx.store.get_volume_type(&req.volume_type).await.map_err(|e| match e {
            StoreError::NotFound => ApiError::invalid_field(
                "volume_type",
                format!("unknown volume type {}", excerpt(&req.volume_type)),
            ),
            e => from_store(e, "volume type"),
        })?;
        if req.size_gib > vtype.max_size_gib {
            return Err(ApiError::invalid_field(
                "size_gib",
                format!("volumes of type {} are at most {} GiB", vtype.name, vtype.max_size_gib),
            ));
        }
        let provider = self.volume_provider(&req.zone).await?;
        let volume_id = VolumeId::new();
        let mut job = self.volume_job(&p, &scope, JobKind::CreateVolume, &request_id);
        job.volume_id = Some(volume_id);
        let t = now();
        let volume = model::Volume {
            id: volume_id,
            tenant_id: scope.tenant.clone(),
            project_id: scope.project.clone(),
            name: req.name.clone(),
            size_gib: req.size_gib,
            zone: provider.zone.clone(),
            volume_type: vtype.name.clone(),
            provider_id: provider.id,
            storage: vtype.storage_on(&provider.name).to_owned(),
            host: String::new(),
            native_id: None,
            status: VolumeStatus::Creating,
            attachment: None,
            delete_on_vm_delete: false,
            current_job_id: Some(job.id),
            error_code: None,
            error_message: None,
            metadata: req.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            tags: {
                let mut tags = req.tags.clone();
                tags.sort();
                tags.dedup();
                tags
            },
            created_at: t,
            updated_at: t,
        };
        let mut audit = self.ctx.audit(
            &p,
            AuditAction::Job(JobKind::CreateVolume),
            Resource::Volume(volume_id),
            AuditOutcome::Accepted,
        );
        audit.project_id = scope.project.clone();
        audit.job_id = job.id.to_string();
        audit.detail = format!("{} GiB {}", volume.size_gib, volume.volume_type);
        let answer = VolumeOperationAccepted { volume_id: volume_id.to_string(), job_id: job.id.to_string() };
        let record = idempotency::record(&self.ctx, idem.as_ref(), &answer);
        match self.ctx.store.accept_volume_create(&volume, &job, &audit, record.as_ref()).await {
            Ok(()) => {}
            Err(StoreError::IdempotencyRace) => {
                return idempotency::replay_after_race(&self.ctx, idem.as_ref()).await;
            }
            Err(e) => return Err(from_store(e, &format!("volume {volume_id}"))),
        }
        self.ctx.announce(job.id);
        tracing::info!(volume_id = %volume_id, job_id = %job.id, "volume create accepted");
        Ok(answer)
    }

    /// The provider a new volume goes to: of the zone (any zone when none
    /// is named), with volumes, healthy, the first by name (predictable;
    /// not balanced by load). No provider with volumes is 409 naming the
    /// flag; none of them healthy, 503.
    async fn volume_provider(&self, zone: &str) -> Result<model::Provider, ApiError> {
        let catalog = self.ctx.store.catalog().await.map_err(|e| from_store(e, "providers"))?;
        if !zone.is_empty() && !catalog.zones.iter().any(|z| z.name == zone) {
            let zones = self.ctx.store.list_zones().await.map_err(|e| from_store(e, "zones"))?;
            if !zones.iter().any(|z| z.name == zone) {
                return Err(ApiError::invalid_field("zone", format!("unknown zone {}", excerpt(zone))));
            }
        }
        let mut able: Vec<&model::Provider> = catalog
            .providers
            .iter()
            .filter(|p| (zone.is_empty() || p.zone == zone) && p.capabilities.supports_volumes)
            .collect();
        if able.is_empty() {
            let place = if zone.is_empty() { "any zone".to_owned() } else { format!("zone {zone}") };
            return Err(ApiError::feature_not_supported(
                Capability::Volumes.flag(),
                format!("no hypervisor in {place} has volumes ({})", Capability::Volumes),
            ));
        }
        able.sort_by(|a, b| (!a.healthy, &a.name).cmp(&(!b.healthy, &b.name)));
        match able.first() {
            Some(p) if p.healthy => Ok((*p).clone()),
            _ => Err(ApiError::new(
                ErrorCode::ProviderUnavailable,
                "no hypervisor with volumes is reachable now; retry later",
            )),
        }
    }

    /// The first checks of an operation on an existing volume: the caller
    /// may write in the project, the volume id parses, the key is well
    /// formed (`fingerprint` holds the request's own fields).
    fn volume_target(
        &self,
        p: &Principal,
        key: Result<Option<String>, ApiError>,
        project_id: &str,
        volume_id: &str,
        method: &str,
        fingerprint: serde_json::Value,
    ) -> Result<VolumeTarget, ApiError> {
        validate::project_id(project_id)?;
        let scope = p.scope(project_id, Access::Write)?;
        let volume_id: VolumeId = validate::id("volume_id", volume_id)?;
        let request = serde_json::json!({
            "method": method,
            "project_id": project_id,
            "volume_id": volume_id.to_string(),
            "extra": fingerprint,
        });
        let idem = Key::json(&scope.tenant, key?, &request);
        Ok(VolumeTarget { scope, volume_id, idem })
    }

    /// The volume (not deleted) when no job is in flight on it or on the VM
    /// it is attached to, with that VM: NOT_FOUND, or CONFLICT naming the
    /// job in `details.job_id`.
    async fn idle_volume(
        &self,
        scope: &Scope,
        volume_id: VolumeId,
    ) -> Result<(model::Volume, Option<model::Vm>), ApiError> {
        let what = format!("volume {volume_id}");
        let volume = match self.ctx.store.get_volume(scope, volume_id).await {
            Ok(v) if v.status != VolumeStatus::Deleted => v,
            Ok(_) => return Err(from_store(StoreError::NotFound, &what)),
            Err(e) => return Err(from_store(e, &what)),
        };
        if let Some(job) = volume.current_job_id {
            let message = format!("volume {} is {}: job {job} is operating on it", volume.id, volume.status);
            return Err(from_store(StoreError::Busy { job, message }, &what));
        }
        let vm = match volume.attachment {
            None => None,
            Some(a) => {
                let vm = self.ctx.store.get_vm_internal(a.vm_id).await.map_err(|e| from_store(e, "vm"))?;
                if let Some(job) = vm.current_job_id {
                    let message = format!(
                        "volume {} is attached to vm {}, which is {}: job {job} is operating on it",
                        volume.id, vm.id, vm.status
                    );
                    return Err(from_store(StoreError::Busy { job, message }, &what));
                }
                Some(vm)
            }
        };
        Ok((volume, vm))
    }

    /// Refuses `kind` when the volume's provider lacks what it needs with
    /// the VM in `vm_status` (409 naming the first flag missing).
    async fn check_volume_capability(
        &self,
        volume: &model::Volume,
        kind: JobKind,
        vm_status: Option<VmStatus>,
    ) -> Result<model::Provider, ApiError> {
        let provider =
            self.ctx.store.get_provider(volume.provider_id).await.map_err(|e| from_store(e, "provider"))?;
        if let Some(cap) = volume_missing(kind, vm_status, &provider.capabilities) {
            let hint = match cap {
                Capability::HotAttach | Capability::VolumeExtendInUse => "; stop the vm first",
                _ => "",
            };
            let on = vm_status.map(|s| format!(" with its vm {s}")).unwrap_or_default();
            return Err(ApiError::feature_not_supported(
                cap.flag(),
                format!("the volume's hypervisor does not support {kind}{on} ({cap}){hint}"),
            ));
        }
        Ok(provider)
    }

    /// Accepts a volume operation: the job, the volume's (and its VM's)
    /// in-flight state, the audit event and the key, in one transaction.
    async fn accept_volume<A: prost::Message + Clone + Default>(
        &self,
        p: &Principal,
        op: VolumeOperation,
        idem: Option<&Key>,
        request_id: &str,
        answer: impl FnOnce(&model::Job) -> A,
    ) -> Result<A, ApiError> {
        let mut job = self.volume_job(p, &op.scope, op.kind, request_id);
        job.volume_id = Some(op.volume_id);
        job.vm_id = op.attach.as_ref().map(|a| a.vm_id);
        let mut audit = self.ctx.audit(
            p,
            AuditAction::Job(op.kind),
            Resource::Volume(op.volume_id),
            AuditOutcome::Accepted,
        );
        audit.project_id = op.scope.project.clone();
        audit.job_id = job.id.to_string();
        if let Some(a) = &op.attach {
            audit.detail = format!("vm {}", a.vm_id);
        }
        if let Some(to) = op.extend_to {
            audit.detail = format!("{to} GiB");
        }
        let reply = answer(&job);
        let record = idempotency::record(&self.ctx, idem, &reply);
        match self.ctx.store.accept_volume_operation(&op, &job, &audit, record.as_ref()).await {
            Ok(_) => {}
            Err(StoreError::IdempotencyRace) => return idempotency::replay_after_race(&self.ctx, idem).await,
            Err(e) => return Err(from_store(e, &format!("volume {}", op.volume_id))),
        }
        self.ctx.announce(job.id);
        tracing::info!(volume_id = %op.volume_id, job_id = %job.id, kind = %op.kind, "volume operation accepted");
        Ok(reply)
    }

    async fn delete_or_extend(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        request_id: String,
        project_id: &str,
        volume_id: &str,
        extend: Option<&ExtendVolumeRequest>,
    ) -> Result<VolumeOperationAccepted, ApiError> {
        let kind = if extend.is_some() { JobKind::ExtendVolume } else { JobKind::DeleteVolume };
        let fingerprint = serde_json::json!({"size_gib": extend.map(|e| e.size_gib)});
        let t = self.volume_target(&p, key, project_id, volume_id, kind.as_str(), fingerprint)?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let (volume, vm) = self.idle_volume(&t.scope, t.volume_id).await?;
        if let Some(req) = extend {
            hcp_proto::rules::check(req)?;
            if let (Some(a), Some(vm)) = (volume.attachment, &vm)
                && a.device_index == 0
            {
                return Err(ApiError::conflict(format!(
                    "volume {} is vm {}'s boot volume: it grows with the vm's disk (resize the vm)",
                    volume.id, vm.id
                )));
            }
            if req.size_gib <= volume.size_gib {
                return Err(ApiError::invalid_field(
                    "size_gib",
                    format!("size_gib must be above the volume's {} GiB: volumes only grow", volume.size_gib),
                ));
            }
            let vtype = self
                .ctx
                .store
                .get_volume_type(&volume.volume_type)
                .await
                .map_err(|e| from_store(e, "volume type"))?;
            if req.size_gib > vtype.max_size_gib {
                return Err(ApiError::invalid_field(
                    "size_gib",
                    format!("volumes of type {} are at most {} GiB", vtype.name, vtype.max_size_gib),
                ));
            }
        }
        if kind == JobKind::DeleteVolume
            && let Some(a) = volume.attachment
        {
            return Err(ApiError::conflict(format!(
                "volume {} is attached to vm {}: detach it (or delete the vm) first",
                volume.id, a.vm_id
            )));
        }
        self.check_volume_capability(&volume, kind, vm.as_ref().map(|v| v.status)).await?;
        let op = VolumeOperation {
            scope: t.scope,
            volume_id: t.volume_id,
            kind,
            attach: None,
            extend_to: extend.map(|e| e.size_gib),
            require_vm_status: vm.as_ref().map(|v| v.status),
        };
        let id = t.volume_id.to_string();
        self.accept_volume(&p, op, t.idem.as_ref(), &request_id, |job| VolumeOperationAccepted {
            volume_id: id,
            job_id: job.id.to_string(),
        })
        .await
    }

    /// Attaches or detaches a volume (a VM operation: checked in the VM
    /// operations' order, then the volume's).
    pub(super) async fn attach_or_detach(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        request_id: String,
        (project_id, vm_id, volume_id): (&str, &str, &str),
        kind: JobKind,
    ) -> Result<VmOperationAccepted, ApiError> {
        let fingerprint = serde_json::json!({"volume_id": volume_id});
        let t = self.target(&p, key, project_id, vm_id, kind.as_str(), fingerprint)?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let vm = self.idle_vm(&t).await?;
        let volume_id: VolumeId = validate::id("volume_id", volume_id)?;
        let (volume, attached_vm) = self.idle_volume(&t.scope, volume_id).await?;
        let attach = if kind == JobKind::AttachVolume {
            if let Some(a) = volume.attachment {
                let whom = if a.vm_id == vm.id { "this vm".to_owned() } else { format!("vm {}", a.vm_id) };
                return Err(ApiError::conflict(format!(
                    "volume {} is attached to {whom} already",
                    volume.id
                )));
            }
            if volume.zone != vm.zone {
                return Err(ApiError::conflict(format!(
                    "volume {} is in zone {} and vm {} in zone {}: a volume attaches only in its zone",
                    volume.id, volume.zone, vm.id, vm.zone
                )));
            }
            if volume.provider_id != vm.provider_id {
                return Err(ApiError::conflict(format!(
                    "volume {} is on storage vm {} cannot reach (another hypervisor of zone {})",
                    volume.id, vm.id, vm.zone
                )));
            }
            let provider = self.check_volume_capability(&volume, kind, Some(vm.status)).await?;
            let caps = &provider.capabilities;
            if caps.volumes_host_local && !volume.host.is_empty() && volume.host != vm.host {
                return Err(ApiError::conflict(format!(
                    "volume {} is on the local storage of another host than vm {}'s",
                    volume.id, vm.id
                )));
            }
            let attached = self.ctx.store.volumes_of_vm(vm.id).await.map_err(|e| from_store(e, "volumes"))?;
            let max = caps.max_volumes_per_vm.max(1);
            if attached.len() >= max as usize {
                return Err(ApiError::invalid_field(
                    "volume_id",
                    format!(
                        "vm {} has {} volumes, the most its hypervisor allows ({max})",
                        vm.id,
                        attached.len()
                    ),
                ));
            }
            Some(AttachTarget {
                vm_id: vm.id,
                host: vm.host.clone(),
                host_local: caps.volumes_host_local,
                max_volumes: max,
            })
        } else {
            match (volume.attachment, attached_vm) {
                (Some(a), Some(_)) if a.vm_id == vm.id && a.device_index == 0 => {
                    return Err(ApiError::conflict(format!(
                        "volume {} is vm {}'s boot volume: it leaves the vm only when the vm is deleted",
                        volume.id, vm.id
                    )));
                }
                (Some(a), Some(_)) if a.vm_id == vm.id => {}
                _ => {
                    return Err(ApiError::conflict(format!(
                        "volume {} is not attached to vm {}",
                        volume.id, vm.id
                    )));
                }
            }
            self.check_volume_capability(&volume, kind, Some(vm.status)).await?;
            None
        };
        let op = VolumeOperation {
            scope: t.scope,
            volume_id,
            kind,
            attach,
            extend_to: None,
            require_vm_status: Some(vm.status),
        };
        let vm_id: VmId = vm.id;
        self.accept_volume(&p, op, t.idem.as_ref(), &request_id, |job| VmOperationAccepted {
            vm_id: vm_id.to_string(),
            job_id: job.id.to_string(),
            snapshot_id: None,
            volume_id: Some(volume_id.to_string()),
            image_id: None,
        })
        .await
    }

    async fn list_volumes(
        &self,
        p: Principal,
        req: ListVolumesRequest,
    ) -> Result<ListVolumesResponse, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let status = match hcp_proto::tenant::volume::Status::try_from(req.status) {
            Ok(s) => convert::volume_status_from_proto(s),
            Err(_) => {
                return Err(ApiError::invalid_field("status", format!("unknown status {}", req.status)));
            }
        };
        let vm_id: Option<VmId> =
            if req.vm_id.is_empty() { None } else { Some(validate::id("vm_id", &req.vm_id)?) };
        validate::tags("tag", &req.tag)?;
        let mut tags = req.tag.clone();
        tags.sort();
        tags.dedup();
        let mut binding = Binding::new("volumes");
        binding
            .push(&scope.tenant)
            .push(&req.project_id)
            .push(status.map(|s| s.as_str()).unwrap_or(""))
            .push(&req.vm_id);
        tags.iter().for_each(|t| {
            binding.push(t);
        });
        let query = ListVolumesQuery {
            page_size: validate::page_size(req.page_size, 100)?,
            after: self.ctx.pages.open(&binding, &req.page_token)?,
            status,
            tags,
            vm_id,
        };
        let (volumes, next) =
            self.ctx.store.list_volumes(&scope, &query).await.map_err(|e| from_store(e, "volumes"))?;
        let mut out = Vec::with_capacity(volumes.len());
        for v in &volumes {
            out.push(self.volume_view(v).await?);
        }
        Ok(ListVolumesResponse {
            volumes: out,
            next_page_token: next.map(|last| self.ctx.pages.seal(&binding, last)).unwrap_or_default(),
        })
    }

    async fn get_volume(&self, p: Principal, req: GetVolumeRequest) -> Result<Volume, ApiError> {
        validate::project_id(&req.project_id)?;
        let scope = p.scope(&req.project_id, Access::Read)?;
        let id: VolumeId = validate::id("volume_id", &req.volume_id)?;
        let v = self
            .ctx
            .store
            .get_volume(&scope, id)
            .await
            .map_err(|e| from_store(e, &format!("volume {id}")))?;
        self.volume_view(&v).await
    }

    async fn update_volume(
        &self,
        p: Principal,
        key: Result<Option<String>, ApiError>,
        req: UpdateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        let paths = req.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        let metadata: std::collections::BTreeMap<_, _> = req.metadata.iter().collect();
        let fingerprint = serde_json::json!({"name": req.name, "metadata": metadata, "tags": req.tags, "update_mask": paths});
        let t = self.volume_target(
            &p,
            key,
            &req.project_id,
            &req.volume_id,
            AuditAction::VolumeUpdate.as_str(),
            fingerprint,
        )?;
        if let Some(answer) = idempotency::replay(&self.ctx, t.idem.as_ref()).await? {
            return Ok(answer);
        }
        let fields =
            super::Fields { name: &req.name, metadata: &req.metadata, tags: &req.tags, what: "volume" };
        let update = match hcp_proto::rules::check(&req).and_then(|()| super::fields_update(&fields, &paths))
        {
            Ok((name, metadata, tags)) => VolumeUpdate { name, metadata, tags },
            Err(e) => {
                // A volume that does not exist is named first.
                let what = format!("volume {}", t.volume_id);
                self.ctx.store.get_volume(&t.scope, t.volume_id).await.map_err(|e| from_store(e, &what))?;
                return Err(e);
            }
        };
        let mut audit = self.ctx.audit(
            &p,
            AuditAction::VolumeUpdate,
            Resource::Volume(t.volume_id),
            AuditOutcome::Succeeded,
        );
        audit.project_id = t.scope.project.clone();
        audit.detail = paths.join(",");
        let result = match self.ctx.store.update_volume(&t.scope, t.volume_id, &update, &audit).await {
            Ok(v) => self.volume_view(&v).await,
            Err(e) => Err(from_store(e, &format!("volume {}", t.volume_id))),
        };
        idempotency::finish(&self.ctx, t.idem.as_ref(), result).await
    }
}

#[tonic::async_trait]
impl VolumeService for TenantApi {
    async fn create_volume(
        &self,
        req: tonic::Request<CreateVolumeRequest>,
    ) -> ApiResult<VolumeOperationAccepted> {
        let p = checked(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        handle(self.create_volume(p, key, rid, req.into_inner())).await
    }

    async fn list_volumes(&self, req: tonic::Request<ListVolumesRequest>) -> ApiResult<ListVolumesResponse> {
        let p = checked(&req)?;
        handle(self.list_volumes(p, req.into_inner())).await
    }

    async fn get_volume(&self, req: tonic::Request<GetVolumeRequest>) -> ApiResult<Volume> {
        let p = checked(&req)?;
        handle(self.get_volume(p, req.into_inner())).await
    }

    async fn update_volume(&self, req: tonic::Request<UpdateVolumeRequest>) -> ApiResult<Volume> {
        let p = crate::auth::principal(&req)?;
        let key = idempotency_key(&req);
        handle(self.update_volume(p, key, req.into_inner())).await
    }

    async fn delete_volume(
        &self,
        req: tonic::Request<VolumeActionRequest>,
    ) -> ApiResult<VolumeOperationAccepted> {
        let p = crate::auth::principal(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        let r = req.into_inner();
        // Its two fields are the target's, checked in order there.
        handle(self.delete_or_extend(p, key, rid, &r.project_id, &r.volume_id, None)).await
    }

    async fn extend_volume(
        &self,
        req: tonic::Request<ExtendVolumeRequest>,
    ) -> ApiResult<VolumeOperationAccepted> {
        let p = crate::auth::principal(&req)?;
        let key = idempotency_key(&req);
        let rid = request_id(&req);
        let r = req.into_inner();
        handle(self.delete_or_extend(p, key, rid, &r.project_id.clone(), &r.volume_id.clone(), Some(&r)))
            .await
    }
}

/// `AttachVolumeRequest` and `DetachVolumeRequest` carry the same three ids.
pub(super) fn ids_of_attach(r: &AttachVolumeRequest) -> (&str, &str, &str) {
    (&r.project_id, &r.vm_id, &r.volume_id)
}

/// See [`ids_of_attach`].
pub(super) fn ids_of_detach(r: &DetachVolumeRequest) -> (&str, &str, &str) {
    (&r.project_id, &r.vm_id, &r.volume_id)
}
