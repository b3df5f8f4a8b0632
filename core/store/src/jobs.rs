//! Jobs: leasing (claim, renew), the per-step log that lets a job resume
//! after a crash, and finishing a job together with its VM's new state and
//! the audit event, in one transaction.
//!
//! A lease is a (worker, expiry) pair on the job row. Only the holder can
//! renew or finish it, and a lease that lapses (the worker died or hung)
//! makes the job claimable again; the next worker skips the recorded steps.

use chrono::{DateTime, Utc};
use hcp_proto::ids::{JobId, VmId};

use hcp_proto::error::ErrorCode;
use sqlx::types::Json;

use super::outbox::{SUBJECT_JOBS, insert_outbox, insert_vm_usage};
use super::{BackendKind, StoreError, StoreResult, col, on_pool, to_i32, to_u32};
use super::{Quoted, sql};
use hcp_domain::lifecycle::{JobParams, Outcome, Step, StepStatus, Transition};
use hcp_domain::model::{AuditEvent, Job, JobKind, JobStatus, NetworkAttachment, Scope, VmStatus};

/// How a job attempt ended, as the store writes it: the lifecycle's
/// transition plus the data that goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// What changes (from [`hcp_domain::lifecycle::transition`]).
    pub transition: Transition,
    /// The attempt's error (a failure, or the failure a retry follows).
    pub error: Option<(ErrorCode, String)>,
    /// When a requeued job may run again.
    pub run_after: Option<DateTime<Utc>>,
    /// The VM's attachments with the addresses the provider reported after
    /// the job, when it could tell.
    pub networks: Option<Vec<NetworkAttachment>>,
    /// The host the provider reported the VM on after a successful job,
    /// when it names one.
    pub host: Option<String>,
    /// The VM's size as the job found it, when the engine read it (the job
    /// holds the VM, so nothing else changes it meanwhile): the usage event
    /// is then written without reading the VM again.
    pub size: Option<hcp_domain::lifecycle::Size>,
    /// What the provider reported of the job's volume after a successful
    /// step that made or changed it: its native id (and size).
    pub volume: Option<VolumeReport>,
    /// The step a cancellation cut, recorded in the step log as
    /// interrupted.
    pub interrupted: Option<Step>,
}

/// One entry of a job's step log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// The step.
    pub step: Step,
    /// How it ended.
    pub status: StepStatus,
    /// What the provider returned for it (empty for an interrupted step).
    pub output: String,
    /// When it was recorded.
    pub finished_at: DateTime<Utc>,
}

/// A volume as the provider reported it at the end of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    /// The hypervisor's name for it.
    pub native_id: String,
    /// The host holding it, when the provider names one.
    pub host: String,
}

/// Filters and page position for [`super::Store::list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct ListJobsQuery {
    /// At most this many rows (1..=1000).
    pub page_size: u32,
    /// The last id of the previous page (jobs come newest first).
    pub before: Option<uuid::Uuid>,
    /// Only this VM's jobs.
    pub vm_id: Option<VmId>,
    /// Only this volume's jobs.
    pub volume_id: Option<hcp_proto::ids::VolumeId>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this kind.
    pub kind: Option<JobKind>,
}

pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, project_id, kind, vm_id, status, attempts, \
     max_attempts, run_after, lease_owner, lease_expires_at, error_code, error_message, actor, \
     traceparent, created_at, started_at, finished_at, updated_at, prior_status, snapshot_id, \
     params, request_id, volume_id, prior_volume_status, cancel_requested_at, cancel_requested_by, image_id";

macro_rules! insert_job {
    ($conn:expr, $job:expr) => {{
        let job: &hcp_domain::model::Job = $job;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, project_id, kind, vm_id, status, attempts, \
             max_attempts, run_after, lease_owner, lease_expires_at, error_code, error_message, \
             actor, traceparent, created_at, started_at, finished_at, updated_at, prior_status, snapshot_id, \
             params, request_id, volume_id, prior_volume_status, image_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, NULL, NULL, $10, $11, $12, NULL, NULL, \
             $13, $14, $15, $16, $17, $18, $19, $20)",
        )
        .bind(job.id.0)
        .bind(&job.tenant_id)
        .bind(&job.project_id)
        .bind(job.kind.as_str())
        .bind(job.vm_id.map(|v| v.0))
        .bind(job.status.as_str())
        .bind(job.attempts as i32)
        .bind(job.max_attempts as i32)
        .bind(job.run_after)
        .bind(&job.actor)
        .bind(&job.traceparent)
        .bind(job.created_at)
        .bind(job.updated_at)
        .bind(job.prior_status.map(|s| s.as_str()))
        .bind(job.snapshot_id.map(|s| s.0))
        .bind(sqlx::types::Json(&job.params))
        .bind(&job.request_id)
        .bind(job.volume_id.map(|v| v.0))
        .bind(job.prior_volume_status.map(|s| s.as_str()))
        .bind(job.image_id.map(|i| i.0))
        .execute($conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "job"))?;
    }};
}
pub(crate) use insert_job;

macro_rules! job_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let vm_id: Option<uuid::Uuid> = col!(row, "vm_id");
        let volume_id: Option<uuid::Uuid> = col!(row, "volume_id");
        let image_id: Option<uuid::Uuid> = col!(row, "image_id");
        let kind: String = col!(row, "kind");
        let status: String = col!(row, "status");
        Job {
            id: JobId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            kind: JobKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("job kind {kind:?}")))?,
            vm_id: vm_id.map(VmId),
            volume_id: volume_id.map(hcp_proto::ids::VolumeId),
            image_id: image_id.map(hcp_proto::ids::ImageId),
            status: JobStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
            attempts: to_u32(col!(row, "attempts"), "attempts")?,
            max_attempts: to_u32(col!(row, "max_attempts"), "max_attempts")?,
            run_after: col!(row, "run_after"),
            lease_owner: col!(row, "lease_owner"),
            lease_expires_at: col!(row, "lease_expires_at"),
            error_code: {
                let c: Option<String> = col!(row, "error_code");
                // A code this build does not know is shown as INTERNAL.
                c.map(|c| ErrorCode::from_name(&c).unwrap_or(ErrorCode::Internal))
            },
            error_message: col!(row, "error_message"),
            actor: col!(row, "actor"),
            traceparent: col!(row, "traceparent"),
            created_at: col!(row, "created_at"),
            started_at: col!(row, "started_at"),
            finished_at: col!(row, "finished_at"),
            updated_at: col!(row, "updated_at"),
            prior_status: {
                let p: Option<String> = col!(row, "prior_status");
                p.as_deref().and_then(VmStatus::parse)
            },
            prior_volume_status: {
                let p: Option<String> = col!(row, "prior_volume_status");
                p.as_deref().and_then(hcp_domain::model::VolumeStatus::parse)
            },
            snapshot_id: {
                let s: Option<uuid::Uuid> = col!(row, "snapshot_id");
                s.map(hcp_proto::ids::SnapshotId)
            },
            params: {
                let p: Json<JobParams> = col!(row, "params");
                p.0
            },
            request_id: col!(row, "request_id"),
            cancel_requested_at: col!(row, "cancel_requested_at"),
            cancel_requested_by: col!(row, "cancel_requested_by"),
        }
    }};
}
pub(crate) use job_from_row;

/// Writes what a transition does besides the job row: the VM's state,
/// error, restored size and reported addresses, the snapshot's state, the
/// usage event, console revocation and the announcement of a requeued job.
macro_rules! apply_transition {
    ($tx:expr, $job:expr, $t:expr, $message:expr, $networks:expr, $volume:expr, $now:expr, $outbox:expr) => {{
        let job: &Job = $job;
        let t: &Transition = $t;
        let now: DateTime<Utc> = $now;
        if let Some(status) = t.vm {
            let error_message: Option<&str> = t.vm_error.map(|_| $message.unwrap_or_default());
            sqlx::query(
                "UPDATE vms SET status = $1, current_job_id = NULL, error_code = $2, \
                 error_message = $3, updated_at = $4 WHERE id = $5 AND current_job_id = $6",
            )
            .bind(status.as_str())
            .bind(t.vm_error.map(|c| c.as_str()))
            .bind(error_message)
            .bind(now)
            .bind(job.vm_id.map(|v| v.0))
            .bind(job.id.0)
            .execute(&mut *$tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
        }
        if let Some(size) = &t.vm_size {
            sqlx::query(
                "UPDATE vms SET flavor = $1, vcpus = $2, memory_mib = $3, disk_gib = $4 WHERE id = $5",
            )
            .bind(&size.flavor)
            .bind(to_i32(size.vcpus))
            .bind(to_i32(size.memory_mib))
            .bind(to_i32(size.disk_gib))
            .bind(job.vm_id.map(|v| v.0))
            .execute(&mut *$tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
        }
        if let Some(host) = &t.vm_host {
            sqlx::query("UPDATE vms SET host = $1 WHERE id = $2")
                .bind(host)
                .bind(job.vm_id.map(|v| v.0))
                .execute(&mut *$tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
        }
        let networks: Option<&Vec<NetworkAttachment>> = $networks;
        if let Some(networks) = networks {
            sqlx::query("UPDATE vms SET networks = $1 WHERE id = $2")
                .bind(Json(networks))
                .bind(job.vm_id.map(|v| v.0))
                .execute(&mut *$tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
        }
        if let (Some(snapshot), Some(status)) = (job.snapshot_id, t.snapshot) {
            sqlx::query("UPDATE snapshots SET status = $1, updated_at = $2 WHERE id = $3")
                .bind(status.as_str())
                .bind(now)
                .bind(snapshot.0)
                .execute(&mut *$tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?;
        }
        if let (Some(event), Some(vm_id)) = (t.metering, job.vm_id) {
            insert_vm_usage!($tx, vm_id, event.as_str(), now, Some(job.id), $outbox);
        }
        if let (Some(change), Some(volume_id)) = (&t.volume, job.volume_id) {
            super::volumes::apply_volume_change!(
                $tx, job, volume_id, change, $message, $volume, now, $outbox
            );
        }
        if let (true, Some(vm_id)) = (t.release_volumes, job.vm_id) {
            super::volumes::release_volumes!($tx, job, vm_id, now, $outbox);
        }
        if let (Some(change), Some(image)) = (t.image, job.image_id) {
            super::images::apply_image_change!($tx, job, image, change, $message, now);
        }
        if let (true, Some(vm_id)) = (t.sync_boot_volume, job.vm_id) {
            // The boot volume is the VM's disk: a resize that grew one grew
            // the other.
            sqlx::query(
                "UPDATE volumes SET size_gib = (SELECT disk_gib FROM vms WHERE id = $1), updated_at = $2 \
                 WHERE vm_id = $1 AND device_index = 0",
            )
            .bind(vm_id.0)
            .bind(now)
            .execute(&mut *$tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
        }
        if let (JobParams::CreateWithVolumes { .. }, Some(vm_id)) = (&job.params, job.vm_id) {
            super::volumes::finish_create_volumes!($tx, job, vm_id, t.job, now, $outbox);
        }
        if t.revoke_consoles {
            // Console tokens for a VM that stopped, moved or went away must
            // not open anything any more, and the sessions open on it end
            // (the console proxy asks which: `revoked_consoles`).
            let reason = hcp_domain::lifecycle::console_revocation(job.kind, t.job);
            $crate::consoles::revoke_vm_consoles!($tx, job.vm_id, reason, now);
        }
        // A requeued job is announced again; a consumer that gets it before
        // `run_after` puts it back with a delay.
        if t.requeue && $outbox {
            insert_outbox!($tx, SUBJECT_JOBS, job.id.to_string(), now);
        }
        // Tenants' webhooks hear of the job's end (and the VM's or the
        // volume's new status) through rows written here, with the change.
        if (job.vm_id.is_some() || job.volume_id.is_some()) && t.job != JobStatus::Queued {
            let code: Option<String> = sqlx::query_scalar("SELECT error_code FROM jobs WHERE id = $1")
                .bind(job.id.0)
                .fetch_one(&mut *$tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            let code = code.map(|c| ErrorCode::from_name(&c).unwrap_or(ErrorCode::Internal).as_str());
            let volume = t.volume.as_ref().map(|c| c.status);
            let events = hcp_domain::webhook::job_events(job, t.job, code, t.vm, volume, now);
            super::webhooks::insert_webhook_events!($tx, &job.tenant_id, &job.project_id, &events, now);
        }
    }};
}

/// A step of a job that completed, and what the provider returned for it
/// (a native id, or what a delete found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedStep {
    /// The step.
    pub step: Step,
    /// Its recorded output.
    pub output: String,
}

impl super::Store {
    /// Cancels a job of the tenant (any tenant's for `None`, the operators'
    /// call): a QUEUED job ends CANCELLED at once, the VM returning to the
    /// job's prior status (ERROR for a create); for a RUNNING job the
    /// request is recorded (when, and by `audit.actor`; a repeated request
    /// keeps the first) and the worker holding it finishes it. The audit
    /// event is appended in the same transaction. Conflict when the job is
    /// finished.
    pub async fn cancel_job(
        &self,
        tenant_id: Option<&str>,
        id: JobId,
        audit: &AuditEvent,
    ) -> StoreResult<Job> {
        let t = audit.at;
        let t_now = t;
        let outbox = self.outbox;
        let actor = audit.actor.clone();
        on_pool!(transaction self, |tx| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET status = {job_cancelled}, finished_at = $1, updated_at = $1 \
                 WHERE id = $2 AND ($3 IS NULL OR tenant_id = $3) AND status = {job_queued} RETURNING {JOB_COLUMNS}",
                job_cancelled = Quoted(JobStatus::Cancelled.as_str()),
                job_queued = Quoted(JobStatus::Queued.as_str())
            )))
            .bind(t)
            .bind(id.0)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            if let Some(row) = row {
                let job = job_from_row!(&row);
                let t = job.transition(Outcome::Cancelled);
                apply_transition!(tx, &job, &t, Some("the operation was cancelled"), None, None, t_now, outbox);
                super::audit::insert_audit!(&mut *tx, audit);
                tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
                return Ok(job);
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, $1), \
                 cancel_requested_by = COALESCE(cancel_requested_by, $4), updated_at = $1 \
                 WHERE id = $2 AND ($3 IS NULL OR tenant_id = $3) AND status = {job_running} RETURNING {JOB_COLUMNS}",
                job_running = Quoted(JobStatus::Running.as_str())
            )))
            .bind(t)
            .bind(id.0)
            .bind(tenant_id)
            .bind(&actor)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            if let Some(row) = row {
                let job = job_from_row!(&row);
                super::audit::insert_audit!(&mut *tx, audit);
                tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
                return Ok(job);
            }
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND ($2 IS NULL OR tenant_id = $2)")
                    .bind(id.0)
                    .bind(tenant_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            match status {
                None => Err(StoreError::NotFound),
                Some(s) => Err(StoreError::Conflict(format!("job {id} is {s}; a finished job cannot be cancelled"))),
            }
        })
    }

    /// Whether a cancellation of the job was asked for (the worker holding
    /// it asks while the job runs).
    pub async fn cancel_requested(&self, id: JobId) -> StoreResult<bool> {
        on_pool!(engine self, |pool| {
            let at: Option<Option<DateTime<Utc>>> =
                sqlx::query_scalar("SELECT cancel_requested_at FROM jobs WHERE id = $1")
                    .bind(id.0)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            Ok(at.flatten().is_some())
        })
    }

    /// Returns a job's step log: the steps recorded so far, completed or
    /// interrupted, in the order they ended.
    pub async fn job_steps(&self, id: JobId) -> StoreResult<Vec<StepRecord>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT step, status, output, finished_at FROM job_steps WHERE job_id = $1 ORDER BY finished_at, step",
            )
            .bind(id.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job step"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let step: String = col!(row, "step");
                let status: String = col!(row, "status");
                out.push(StepRecord {
                    step: Step::parse(&step)
                        .ok_or_else(|| StoreError::Corrupt(format!("job step {step:?}")))?,
                    status: StepStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("job step status {status:?}")))?,
                    output: col!(row, "output"),
                    finished_at: col!(row, "finished_at"),
                });
            }
            Ok(out)
        })
    }

    /// Returns a job if it belongs to the tenant.
    pub async fn get_job(&self, tenant_id: &str, id: JobId) -> StoreResult<Job> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"
            )))
            .bind(id.0)
            .bind(tenant_id)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?
            .ok_or(StoreError::NotFound)?;
            Ok(job_from_row!(&row))
        })
    }

    /// Returns a job by id alone, for HCP's own use.
    pub async fn get_job_internal(&self, id: JobId) -> StoreResult<Job> {
        on_pool!(self, |pool| {
            let row =
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")))
                    .bind(id.0)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "job"))?
                    .ok_or(StoreError::NotFound)?;
            Ok(job_from_row!(&row))
        })
    }

    /// Leases up to `limit` runnable jobs (queued and due, or with a lapsed
    /// lease), oldest first, in one statement: a burst of jobs costs one
    /// round trip, not one each.
    pub async fn claim_next_jobs(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> StoreResult<Vec<Job>> {
        // PostgreSQL: concurrent claimers skip rows another claimer holds,
        // instead of queueing behind it. SQLite has one writer at a time.
        let lock = match self.kind() {
            BackendKind::Postgres => " FOR UPDATE SKIP LOCKED",
            BackendKind::Sqlite => "",
        };
        // The picked ids are materialized once: as a plain `IN (SELECT ...
        // LIMIT n)` PostgreSQL may run the subquery again and take more
        // than n rows.
        let sql = format!(
            "WITH picked AS MATERIALIZED (SELECT id FROM jobs WHERE (status = {job_queued} AND run_after <= $3) \
             OR (status = {job_running} AND lease_expires_at < $3) ORDER BY run_after, id LIMIT $4{lock}) \
             UPDATE jobs SET status = {job_running}, lease_owner = $1, lease_expires_at = $2, \
             attempts = attempts + 1, started_at = COALESCE(started_at, $3), updated_at = $3 \
             WHERE id IN (SELECT id FROM picked) \
             AND ((status = {job_queued} AND run_after <= $3) OR (status = {job_running} AND lease_expires_at < $3)) \
             RETURNING {JOB_COLUMNS}",
            job_queued = Quoted(JobStatus::Queued.as_str()),
            job_running = Quoted(JobStatus::Running.as_str())
        );
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        on_pool!(engine self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(worker)
                .bind(lease_until)
                .bind(now)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            let mut jobs: Vec<Job> = Vec::with_capacity(rows.len());
            for row in &rows {
                jobs.push(job_from_row!(row));
            }
            // RETURNING gives no order; run the oldest first.
            jobs.sort_by_key(|j| (j.run_after, j.id.0));
            Ok(jobs)
        })
    }

    /// Leases one given job if it is runnable (used when a queue message
    /// names the job).
    pub async fn claim_job(
        &self,
        id: JobId,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let sql = format!(
            "UPDATE jobs SET status = {job_running}, lease_owner = $1, lease_expires_at = $2, \
             attempts = attempts + 1, started_at = COALESCE(started_at, $3), updated_at = $3 \
             WHERE id = $4 AND ((status = {job_queued} AND run_after <= $3) \
             OR (status = {job_running} AND lease_expires_at < $3)) RETURNING {JOB_COLUMNS}",
            job_running = Quoted(JobStatus::Running.as_str()),
            job_queued = Quoted(JobStatus::Queued.as_str())
        );
        on_pool!(engine self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(worker)
                .bind(lease_until)
                .bind(now)
                .bind(id.0)
                .fetch_optional(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            match row {
                Some(row) => Ok(Some(job_from_row!(&row))),
                None => Ok(None),
            }
        })
    }

    /// Extends `worker`'s lease on a job. Returns false when the worker no
    /// longer holds it (it lapsed and another worker took the job).
    pub async fn renew_lease(
        &self,
        id: JobId,
        worker: &str,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        on_pool!(engine self, |pool| {
            let done = sqlx::query(
                sql!("UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 \
                 AND status = {job_running}", job_running = JobStatus::Running),
            )
            .bind(lease_until)
            .bind(id.0)
            .bind(worker)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Hands back every lease `worker` holds: the jobs become claimable by
    /// any worker at once (their recorded steps are kept). Returns how many.
    pub async fn release_leases(&self, worker: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        on_pool!(engine self, |pool| {
            let done = sqlx::query(
                sql!("UPDATE jobs SET lease_expires_at = $2 WHERE lease_owner = $1 AND status = {job_running} \
                 AND lease_expires_at > $2", job_running = JobStatus::Running),
            )
            .bind(worker)
            .bind(now)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            Ok(done.rows_affected())
        })
    }

    /// Returns the steps of a job already completed, with their outputs.
    pub async fn completed_steps(&self, id: JobId) -> StoreResult<Vec<RecordedStep>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sql!(
                "SELECT step, output FROM job_steps WHERE job_id = $1 AND status = {step_done} \
                 ORDER BY finished_at, step",
                step_done = StepStatus::Done
            ))
            .bind(id.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job step"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let step: String = col!(row, "step");
                let step =
                    Step::parse(&step).ok_or_else(|| StoreError::Corrupt(format!("job step {step:?}")))?;
                out.push(RecordedStep { step, output: col!(row, "output") });
            }
            Ok(out)
        })
    }

    /// Records a completed step, if `worker` still holds the job's lease.
    /// Recording the same step twice keeps the first record.
    pub async fn record_step(
        &self,
        id: JobId,
        worker: &str,
        step: Step,
        output: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_pool!(engine self, |pool| {
            let done = sqlx::query(
                sql!("INSERT INTO job_steps (job_id, step, output, finished_at) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1 \
                 AND lease_owner = $5 AND status = {job_running}) \
                 ON CONFLICT (job_id, step) DO NOTHING", job_running = JobStatus::Running),
            )
            .bind(id.0)
            .bind(step.as_str())
            .bind(output)
            .bind(at)
            .bind(worker)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job step"))?;
            let _ = done;
            Ok(())
        })
    }

    /// Ends an attempt: writes the job's, the VM's and the snapshot's new
    /// states as `finish` says, and appends the audit event (when given),
    /// in one transaction. Fails with Conflict when `worker` no longer holds
    /// the lease, in which case nothing changes.
    pub async fn finish_job(
        &self,
        job: &Job,
        worker: &str,
        finish: &Finish,
        now: DateTime<Utc>,
        audit: Option<&AuditEvent>,
    ) -> StoreResult<()> {
        let outbox = self.outbox;
        let t = &finish.transition;
        let (code, message) = match &finish.error {
            Some((c, m)) => (Some(c.as_str()), Some(m.as_str())),
            None => (None, None),
        };
        let finished_at = (t.job != JobStatus::Queued).then_some(now);
        let run_after = finish.run_after.unwrap_or(job.run_after);
        if let super::Backend::Postgres(pool) = &self.engine
            && let Some(done) = finish_in_one(pool, job, worker, finish, now, audit, outbox).await?
        {
            return if done {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!("lease on job {} lost", job.id)))
            };
        }
        on_pool!(engine transaction self, |tx| {
            let updated = sqlx::query(
                sql!("UPDATE jobs SET status = $4, finished_at = $1, updated_at = $5, run_after = $6, \
                 lease_owner = NULL, lease_expires_at = NULL, error_code = $7, error_message = $8 \
                 WHERE id = $2 AND lease_owner = $3 AND status = {job_running}", job_running = JobStatus::Running),
            )
            .bind(finished_at)
            .bind(job.id.0)
            .bind(worker)
            .bind(t.job.as_str())
            .bind(now)
            .bind(run_after)
            .bind(code)
            .bind(message)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            if updated.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!("lease on job {} lost", job.id)));
            }
            apply_transition!(tx, job, t, message, finish.networks.as_ref(), finish.volume.as_ref(), now, outbox);
            if let Some(step) = finish.interrupted {
                sqlx::query(
                    "INSERT INTO job_steps (job_id, step, output, finished_at, status) \
                     VALUES ($1, $2, '', $3, $4) ON CONFLICT (job_id, step) DO NOTHING",
                )
                .bind(job.id.0)
                .bind(step.as_str())
                .bind(now)
                .bind(StepStatus::Interrupted.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "job step"))?;
            }
            if let Some(host) = finish.host.as_deref().filter(|h| !h.is_empty()) {
                sqlx::query(sql!("UPDATE vms SET host = $1 WHERE id = $2 AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted))
                    .bind(host)
                    .bind(job.vm_id.map(|v| v.0))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            }
            if let Some(audit) = audit {
                super::audit::insert_audit!(&mut *tx, audit);
            }
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        if job.image_id.is_some() {
            // An image's state is in the catalog creates read.
            self.catalog_changed();
        }
        Ok(())
    }

    /// Lists a project's jobs, newest first, one page at a time. Returns the
    /// page and, when another follows, the last id of this one.
    pub async fn list_jobs(
        &self,
        scope: &Scope,
        query: &ListJobsQuery,
    ) -> StoreResult<(Vec<Job>, Option<uuid::Uuid>)> {
        let limit = i64::from(query.page_size.clamp(1, 1000));
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND project_id = $2");
        let mut n = 2;
        let mut next_param = || {
            n += 1;
            n
        };
        if query.before.is_some() {
            sql.push_str(&format!(" AND id < ${}", next_param()));
        }
        if query.vm_id.is_some() {
            sql.push_str(&format!(" AND vm_id = ${}", next_param()));
        }
        if query.volume_id.is_some() {
            sql.push_str(&format!(" AND volume_id = ${}", next_param()));
        }
        if query.status.is_some() {
            sql.push_str(&format!(" AND status = ${}", next_param()));
        }
        if query.kind.is_some() {
            sql.push_str(&format!(" AND kind = ${}", next_param()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", next_param()));
        let mut jobs = on_pool!(self, |pool| {
            let mut q =
                sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&scope.tenant).bind(&scope.project);
            if let Some(before) = query.before {
                q = q.bind(before);
            }
            if let Some(vm) = query.vm_id {
                q = q.bind(vm.0);
            }
            if let Some(volume) = query.volume_id {
                q = q.bind(volume.0);
            }
            if let Some(status) = query.status {
                q = q.bind(status.as_str());
            }
            if let Some(kind) = query.kind {
                q = q.bind(kind.as_str());
            }
            let rows =
                q.bind(limit + 1).fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "jobs"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(job_from_row!(row));
            }
            out
        });
        let next = if jobs.len() as i64 > limit {
            jobs.truncate(limit as usize);
            jobs.last().map(|j| j.id.0)
        } else {
            None
        };
        Ok((jobs, next))
    }
}

/// [`super::Store::finish_job`] on PostgreSQL in one statement, one round
/// trip, for what most jobs end with: the job's row, the VM's state, host
/// and addresses, a usage event sized from [`Finish::size`] (and its outbox
/// row) and the audit event. `None`, having written nothing, for a finish
/// that puts a size back, changes a snapshot, revokes consoles or requeues
/// with an outbox row, or meters without a known size: those take the
/// transaction. `Some(false)` when the lease was lost (nothing written).
async fn finish_in_one(
    pool: &sqlx::PgPool,
    job: &Job,
    worker: &str,
    finish: &Finish,
    now: DateTime<Utc>,
    audit: Option<&AuditEvent>,
    outbox: bool,
) -> StoreResult<Option<bool>> {
    let t = &finish.transition;
    // Volume jobs, and a VM's deletion (which releases its volumes and, as
    // before volumes, revokes its consoles), take the transaction.
    // A create that holds volumes, and a resize that may grow a boot
    // volume, take the transaction.
    let holds_volumes = matches!(job.params, JobParams::CreateWithVolumes { .. }) || t.sync_boot_volume;
    // A capture's image changes with its VM: the transaction too. So does
    // any job with a volume, even a retry: its webhook events are the
    // volume's, which this statement does not write.
    let Some(vm_id) = job.vm_id.filter(|_| {
        job.volume_id.is_none()
            && t.volume.is_none()
            && t.image.is_none()
            && !t.release_volumes
            && !holds_volumes
    }) else {
        return Ok(None);
    };
    let usage = match (t.metering, &finish.size) {
        (None, _) => None,
        (Some(event), Some(size)) => Some(super::UsageEvent {
            id: hcp_proto::ids::EventId::new(),
            at: now,
            tenant_id: job.tenant_id.clone(),
            project_id: job.project_id.clone(),
            vm_id,
            event: event.as_str().to_owned(),
            flavor: size.flavor.clone(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            disk_gib: size.disk_gib,
            job_id: Some(job.id),
        }),
        (Some(_), None) => return Ok(None),
    };
    if t.vm_size.is_some()
        || finish.interrupted.is_some()
        || (job.snapshot_id.is_some() && t.snapshot.is_some())
        || t.revoke_consoles
        || (t.requeue && outbox)
    {
        return Ok(None);
    }
    let (code, message) = match &finish.error {
        Some((c, m)) => (Some(c.as_str()), Some(m.as_str())),
        None => (None, None),
    };
    let vm_error_message: Option<&str> = t.vm_error.map(|_| message.unwrap_or_default());
    // Tenants' webhooks: at most two events (the job's end, the VM's new
    // status), written by the statement's last part.
    let code_name = finish.error.as_ref().map(|(c, _)| c.as_str());
    let events = super::webhooks::event_columns(&hcp_domain::webhook::job_events(
        job, t.job, code_name, t.vm, None, now,
    ));
    let (first, second) = (events.first(), events.get(1));
    let host = finish.host.as_deref().filter(|h| !h.is_empty());
    let touches_vm = t.vm.is_some() || host.is_some() || t.vm_host.is_some() || finish.networks.is_some();
    // The VM's new state applies only while the job still holds it, as in
    // the transaction; the reported host only to a VM that is not deleted.
    let row = sqlx::query(
        sql!("WITH j AS (UPDATE jobs SET status = $4, finished_at = $1, updated_at = $5, run_after = $6, \
             lease_owner = NULL, lease_expires_at = NULL, error_code = $7, error_message = $8 \
             WHERE id = $2 AND lease_owner = $3 AND status = {job_running} RETURNING id), \
         v AS (UPDATE vms SET \
             status = CASE WHEN $9 AND current_job_id = $2 THEN $10 ELSE status END, \
             error_code = CASE WHEN $9 AND current_job_id = $2 THEN $11 ELSE error_code END, \
             error_message = CASE WHEN $9 AND current_job_id = $2 THEN $12 ELSE error_message END, \
             updated_at = CASE WHEN $9 AND current_job_id = $2 THEN $5 ELSE updated_at END, \
             host = CASE WHEN $13::text IS NOT NULL \
                 AND (CASE WHEN $9 AND current_job_id = $2 THEN $10 ELSE status END) <> {vm_deleted} THEN $13 \
                 WHEN $14::text IS NOT NULL THEN $14 ELSE host END, \
             networks = COALESCE($15, networks), \
             current_job_id = CASE WHEN $9 AND current_job_id = $2 THEN NULL ELSE current_job_id END \
             FROM j WHERE vms.id = $16 AND $17 RETURNING vms.id), \
         u AS (INSERT INTO usage_events (id, at, tenant_id, project_id, vm_id, event, flavor, vcpus, \
             memory_mib, job_id, disk_gib) SELECT $18, $5, $19, $20, $16, $21, $22, $23, $24, $2, $42 FROM j WHERE $25), \
         o AS (INSERT INTO outbox (subject, payload, created_at, published_at) \
             SELECT $26, $27, $5, NULL FROM j WHERE $25 AND $28), \
         a AS (INSERT INTO audit_events (id, at, actor, tenant_id, project_id, action, resource_type, \
             resource_id, outcome, job_id, trace_id, detail) \
             SELECT $30, $31, $32, $33, $34, $35, $36, $37, $38, $39, $40, $41 FROM j WHERE $29), \
         w AS (INSERT INTO webhook_deliveries (event_id, endpoint_id, vm_id, event_type, payload, status, \
             attempts, next_attempt_at, last_error, last_duration_ms, created_at) \
             SELECT ev.event_id, e.id, $16, ev.event_type, ev.payload, {delivery_pending}, 0, $5, '', 0, $5 \
             FROM j, webhook_endpoints e, (VALUES (1, $43::uuid, $44::text, $45::text, $46::bigint), \
                 (2, $47::uuid, $48::text, $49::text, $50::bigint)) AS ev(n, event_id, event_type, payload, bit) \
             WHERE ev.event_id IS NOT NULL AND e.tenant_id = $19 AND e.project_id = $20 AND e.enabled \
             AND (e.event_mask & ev.bit) <> 0 ORDER BY ev.n, e.id) \
         SELECT EXISTS (SELECT 1 FROM j) AS finished", job_running = JobStatus::Running, vm_deleted = VmStatus::Deleted,
         delivery_pending = hcp_domain::model::DeliveryStatus::Pending),
    )
    .bind(t.job.ne(&JobStatus::Queued).then_some(now)) // $1
    .bind(job.id.0)
    .bind(worker)
    .bind(t.job.as_str())
    .bind(now) // $5
    .bind(finish.run_after.unwrap_or(job.run_after))
    .bind(code)
    .bind(message)
    .bind(t.vm.is_some())
    .bind(t.vm.map(|s| s.as_str())) // $10
    .bind(t.vm_error.map(|c| c.as_str()))
    .bind(vm_error_message)
    .bind(host)
    .bind(t.vm_host.as_deref())
    .bind(finish.networks.as_ref().map(Json)) // $15
    .bind(vm_id.0)
    .bind(touches_vm)
    .bind(usage.as_ref().map(|u| u.id.0))
    .bind(&job.tenant_id)
    .bind(&job.project_id) // $20
    .bind(usage.as_ref().map(|u| u.event.as_str()))
    .bind(usage.as_ref().map(|u| u.flavor.as_str()))
    .bind(usage.as_ref().map(|u| u.vcpus as i32))
    .bind(usage.as_ref().map(|u| u.memory_mib as i32))
    .bind(usage.is_some()) // $25
    .bind(usage.as_ref().map(|u| format!("{}{}", super::outbox::SUBJECT_USAGE_PREFIX, u.event)))
    .bind(usage.as_ref().map(|u| serde_json::to_string(u).unwrap_or_default()))
    .bind(outbox)
    .bind(audit.is_some())
    .bind(audit.map(|a| a.id.0)) // $30
    .bind(audit.map(|a| a.at))
    .bind(audit.map(|a| a.actor.as_str()))
    .bind(audit.map(|a| a.tenant_id.as_str()))
    .bind(audit.map(|a| a.project_id.as_str()))
    .bind(audit.map(|a| a.action.as_str())) // $35
    .bind(audit.map(|a| a.resource_type.as_str()))
    .bind(audit.map(|a| a.resource_id.as_str()))
    .bind(audit.map(|a| a.outcome.as_str()))
    .bind(audit.map(|a| a.job_id.as_str()))
    .bind(audit.map(|a| a.trace_id.as_str())) // $40
    .bind(audit.map(|a| a.detail.as_str()))
    .bind(usage.as_ref().map(|u| u.disk_gib as i32)) // $42
    .bind(first.map(|e| e.0)) // $43
    .bind(first.map(|e| e.1))
    .bind(first.map(|e| e.2.as_str()))
    .bind(first.map(|e| e.3))
    .bind(second.map(|e| e.0)) // $47
    .bind(second.map(|e| e.1))
    .bind(second.map(|e| e.2.as_str()))
    .bind(second.map(|e| e.3))
    .fetch_one(pool)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "job"))?;
    let finished: bool = col!(&row, "finished");
    Ok(Some(finished))
}
