//! A project's jobs: read, listed, watched to their end, cancelled
//! (`hcp.tenant.v1.JobService`).

use hcp_proto::error::{ApiError, ErrorCode, excerpt};
use hcp_proto::ids::{JobId, VmId};
use hcp_proto::tenant::job_service_server::JobService;
use hcp_proto::tenant::{CancelJobRequest, GetJobRequest, Job, ListJobsRequest, ListJobsResponse};

use super::TenantApi;
use crate::api::checked;
use crate::api::idempotency::{self, Key};
use crate::api::page::Binding;
use crate::api::{ApiResult, handle, validate};
use crate::audit::{AuditAction, AuditOutcome, Resource};
use crate::auth::{Access, Principal};
use crate::convert;
use crate::error::from_store;
use crate::model::JobKind;
use crate::store::ListJobsQuery;

impl TenantApi {
    pub(super) async fn list_jobs(
        &self,
        p: Principal,
        req: ListJobsRequest,
    ) -> Result<ListJobsResponse, ApiError> {
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
        let volume_id: Option<hcp_proto::ids::VolumeId> =
            if req.volume_id.is_empty() { None } else { Some(validate::id("volume_id", &req.volume_id)?) };
        if let Some(volume) = volume_id {
            // A volume outside the project is NOT_FOUND, not an empty history.
            self.ctx
                .store
                .get_volume(&scope, volume)
                .await
                .map_err(|e| from_store(e, &format!("volume {volume}")))?;
        }
        if let Some(vm) = vm_id {
            // A VM outside the project is NOT_FOUND, not an empty history.
            self.ctx.store.get_vm(&scope, vm).await.map_err(|e| from_store(e, &format!("vm {vm}")))?;
        }
        let mut binding = Binding::new("jobs");
        binding
            .push(&scope.tenant)
            .push(&scope.project)
            .push(&req.vm_id)
            .push(&req.volume_id)
            .push(status.map(|s| s.as_str()).unwrap_or(""))
            .push(kind.map(|k| k.as_str()).unwrap_or(""));
        let query = ListJobsQuery {
            page_size: validate::page_size(req.page_size, 100)?,
            before: self.ctx.pages.open(&binding, &req.page_token)?,
            vm_id,
            volume_id,
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

    pub(super) async fn get_job(&self, p: Principal, req: GetJobRequest) -> Result<Job, ApiError> {
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

/// Longest a single watch stays open; clients reconnect after it.
const WATCH_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

#[tonic::async_trait]
impl JobService for TenantApi {
    async fn get_job(&self, req: tonic::Request<GetJobRequest>) -> ApiResult<Job> {
        let p = checked(&req)?;
        handle(self.get_job(p, req.into_inner())).await
    }

    async fn list_jobs(&self, req: tonic::Request<ListJobsRequest>) -> ApiResult<ListJobsResponse> {
        let p = checked(&req)?;
        handle(self.list_jobs(p, req.into_inner())).await
    }

    type WatchJobStream = tokio_stream::wrappers::ReceiverStream<Result<Job, tonic::Status>>;

    async fn watch_job(&self, req: tonic::Request<GetJobRequest>) -> ApiResult<Self::WatchJobStream> {
        let p = checked(&req)?;
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
        let p = checked(&req)?;
        let key = crate::api::idempotency::idempotency_key(&req);
        let req = req.into_inner();
        handle(async {
            let id: JobId = validate::id("job_id", &req.job_id)?;
            let idem = match key? {
                Some(k) => Key::message(p.tenant()?, Some(k), "CancelJob", &req),
                None => None,
            };
            idempotency::once(&self.ctx, idem, self.cancel(&p, id, req)).await
        })
        .await
    }
}

impl TenantApi {
    /// Cancels a job of the caller's tenant that has not finished.
    async fn cancel(&self, p: &Principal, id: JobId, req: CancelJobRequest) -> Result<Job, ApiError> {
        {
            // Access as for reading, plus the write role in the job's project.
            let job = self.get_job(p.clone(), GetJobRequest { job_id: req.job_id.clone() }).await?;
            let tenant = p.tenant_project(&job.project_id, Access::Write)?.to_owned();
            let mut audit =
                self.ctx.audit(p, AuditAction::JobCancel, Resource::Job(id), AuditOutcome::Succeeded);
            audit.project_id = job.project_id.clone();
            audit.job_id = id.to_string();
            // The job as the cancellation left it: a running one may end
            // any moment after, once its worker hears of it.
            let job = self
                .ctx
                .store
                .cancel_job(Some(&tenant), id, &audit)
                .await
                .map_err(|e| from_store(e, &format!("job {id}")))?;
            self.ctx.events.changed(id);
            Ok(convert::job_to_tenant(&job))
        }
    }
}
