//! Jobs: leasing (claim, renew), the per-step log that lets a job resume
//! after a crash, and finishing a job together with its VM's new state and
//! the audit event, in one transaction.
//!
//! A lease is a (worker, expiry) pair on the job row. Only the holder can
//! renew or finish it, and a lease that lapses (the worker died or hung)
//! makes the job claimable again; the next worker skips the recorded steps.

use chrono::{DateTime, Utc};
use hcp_proto::ids::{JobId, VmId};

use super::outbox::{SUBJECT_JOBS, insert_outbox, insert_vm_usage};
use super::{BackendKind, StoreError, StoreResult, col, on_pool, to_u32};
use crate::model::{AuditEvent, Job, JobKind, JobStatus, VmStatus};

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Done; the VM moves to `vm_status`.
    Succeeded {
        /// The VM's state after the job.
        vm_status: VmStatus,
    },
    /// Failed for good; the VM moves to ERROR with the error.
    Failed {
        /// Taxonomy code.
        code: String,
        /// Message for the tenant.
        message: String,
    },
    /// Failed in a way a later attempt may fix; queued again.
    Retry {
        /// Not before this time.
        run_after: DateTime<Utc>,
        /// Code of this attempt's failure.
        code: String,
        /// Message of this attempt's failure.
        message: String,
    },
}

const JOB_COLUMNS: &str = "id, tenant_id, project_id, kind, vm_id, status, attempts, \
     max_attempts, run_after, lease_owner, lease_expires_at, error_code, error_message, actor, \
     traceparent, created_at, started_at, finished_at, updated_at, prior_status, snapshot_id";

macro_rules! insert_job {
    ($conn:expr, $job:expr) => {{
        let job: &$crate::model::Job = $job;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, project_id, kind, vm_id, status, attempts, \
             max_attempts, run_after, lease_owner, lease_expires_at, error_code, error_message, \
             actor, traceparent, created_at, started_at, finished_at, updated_at, prior_status, snapshot_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, NULL, NULL, $10, $11, $12, NULL, NULL, \
             $13, $14, $15)",
        )
        .bind(job.id.0)
        .bind(&job.tenant_id)
        .bind(&job.project_id)
        .bind(job.kind.as_str())
        .bind(job.vm_id.0)
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
        .execute($conn)
        .await
        .map_err(|e| $crate::store::StoreError::from_sqlx(e, "job"))?;
    }};
}
pub(crate) use insert_job;

macro_rules! job_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let vm_id: uuid::Uuid = col!(row, "vm_id");
        let kind: String = col!(row, "kind");
        let status: String = col!(row, "status");
        Job {
            id: JobId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            kind: JobKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("job kind {kind:?}")))?,
            vm_id: VmId(vm_id),
            status: JobStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
            attempts: to_u32(col!(row, "attempts"), "attempts")?,
            max_attempts: to_u32(col!(row, "max_attempts"), "max_attempts")?,
            run_after: col!(row, "run_after"),
            lease_owner: col!(row, "lease_owner"),
            lease_expires_at: col!(row, "lease_expires_at"),
            error_code: col!(row, "error_code"),
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
            snapshot_id: {
                let s: Option<uuid::Uuid> = col!(row, "snapshot_id");
                s.map(hcp_proto::ids::SnapshotId)
            },
        }
    }};
}

impl super::Store {
    /// Cancels a QUEUED job of the tenant: the job ends CANCELLED, the VM
    /// returns to the job's prior status (ERROR for a create), and the audit
    /// event is appended, atomically. Conflict when the job is not QUEUED.
    pub async fn cancel_job(&self, tenant_id: &str, id: JobId, audit: &AuditEvent) -> StoreResult<Job> {
        let t = audit.at;
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(|e| StoreError::from_sqlx(e, "transaction"))?;
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE jobs SET status = 'CANCELLED', finished_at = $1, updated_at = $1 \
                 WHERE id = $2 AND tenant_id = $3 AND status = 'QUEUED' RETURNING {JOB_COLUMNS}"
            )))
            .bind(t)
            .bind(id.0)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            let Some(row) = row else {
                let status: Option<String> =
                    sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND tenant_id = $2")
                        .bind(id.0)
                        .bind(tenant_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(|e| StoreError::from_sqlx(e, "job"))?;
                return match status {
                    None => Err(StoreError::NotFound),
                    Some(s) => Err(StoreError::Conflict(format!(
                        "job {id} is {s}; only a QUEUED job can be cancelled"
                    ))),
                };
            };
            let job = job_from_row!(&row);
            let (status, error) = match (job.kind, job.prior_status) {
                (JobKind::CreateVm, _) | (_, None) => {
                    (VmStatus::Error, Some(("CANCELLED", "the operation was cancelled")))
                }
                (_, Some(prior)) => (prior, None),
            };
            sqlx::query(
                "UPDATE vms SET status = $1, current_job_id = NULL, error_code = $2, error_message = $3, \
                 updated_at = $4 WHERE id = $5 AND current_job_id = $6",
            )
            .bind(status.as_str())
            .bind(error.map(|e| e.0))
            .bind(error.map(|e| e.1))
            .bind(t)
            .bind(job.vm_id.0)
            .bind(job.id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(job)
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
            "WITH picked AS MATERIALIZED (SELECT id FROM jobs WHERE (status = 'QUEUED' AND run_after <= $3) \
             OR (status = 'RUNNING' AND lease_expires_at < $3) ORDER BY run_after, id LIMIT $4{lock}) \
             UPDATE jobs SET status = 'RUNNING', lease_owner = $1, lease_expires_at = $2, \
             attempts = attempts + 1, started_at = COALESCE(started_at, $3), updated_at = $3 \
             WHERE id IN (SELECT id FROM picked) \
             AND ((status = 'QUEUED' AND run_after <= $3) OR (status = 'RUNNING' AND lease_expires_at < $3)) \
             RETURNING {JOB_COLUMNS}"
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
            "UPDATE jobs SET status = 'RUNNING', lease_owner = $1, lease_expires_at = $2, \
             attempts = attempts + 1, started_at = COALESCE(started_at, $3), updated_at = $3 \
             WHERE id = $4 AND ((status = 'QUEUED' AND run_after <= $3) \
             OR (status = 'RUNNING' AND lease_expires_at < $3)) RETURNING {JOB_COLUMNS}"
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
                "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 \
                 AND status = 'RUNNING'",
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
                "UPDATE jobs SET lease_expires_at = $2 WHERE lease_owner = $1 AND status = 'RUNNING' \
                 AND lease_expires_at > $2",
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
    pub async fn completed_steps(&self, id: JobId) -> StoreResult<Vec<(String, String)>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT step, output FROM job_steps WHERE job_id = $1 ORDER BY finished_at, step",
            )
            .bind(id.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job step"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push((col!(row, "step"), col!(row, "output")));
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
        step: &str,
        output: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_pool!(engine self, |pool| {
            let done = sqlx::query(
                "INSERT INTO job_steps (job_id, step, output, finished_at) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1 \
                 AND lease_owner = $5 AND status = 'RUNNING') \
                 ON CONFLICT (job_id, step) DO NOTHING",
            )
            .bind(id.0)
            .bind(step)
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

    /// Ends an attempt: updates the job, the VM and appends the audit event
    /// (when given) in one transaction. Fails with Conflict when `worker` no
    /// longer holds the lease, in which case nothing changes.
    pub async fn finish_job(
        &self,
        job: &Job,
        worker: &str,
        outcome: &JobOutcome,
        now: DateTime<Utc>,
        audit: Option<&AuditEvent>,
    ) -> StoreResult<()> {
        let outbox = self.outbox;
        on_pool!(engine self, |pool| {
            let mut tx = pool.begin().await.map_err(|e| StoreError::from_sqlx(e, "transaction"))?;
            let updated = match outcome {
                JobOutcome::Succeeded { .. } => sqlx::query(
                    "UPDATE jobs SET status = 'SUCCEEDED', finished_at = $1, updated_at = $1, \
                     lease_owner = NULL, lease_expires_at = NULL, error_code = NULL, \
                     error_message = NULL WHERE id = $2 AND lease_owner = $3 AND status = 'RUNNING'",
                )
                .bind(now)
                .bind(job.id.0)
                .bind(worker),
                JobOutcome::Failed { code, message } => sqlx::query(
                    "UPDATE jobs SET status = 'FAILED', finished_at = $1, updated_at = $1, \
                     lease_owner = NULL, lease_expires_at = NULL, error_code = $4, \
                     error_message = $5 WHERE id = $2 AND lease_owner = $3 AND status = 'RUNNING'",
                )
                .bind(now)
                .bind(job.id.0)
                .bind(worker)
                .bind(code)
                .bind(message),
                JobOutcome::Retry { run_after, code, message } => sqlx::query(
                    "UPDATE jobs SET status = 'QUEUED', run_after = $6, updated_at = $1, \
                     lease_owner = NULL, lease_expires_at = NULL, error_code = $4, \
                     error_message = $5 WHERE id = $2 AND lease_owner = $3 AND status = 'RUNNING'",
                )
                .bind(now)
                .bind(job.id.0)
                .bind(worker)
                .bind(code)
                .bind(message)
                .bind(*run_after),
            }
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "job"))?;
            if updated.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!("lease on job {} lost", job.id)));
            }
            match outcome {
                JobOutcome::Succeeded { vm_status } => {
                    sqlx::query(
                        "UPDATE vms SET status = $1, current_job_id = NULL, error_code = NULL, \
                         error_message = NULL, updated_at = $2 WHERE id = $3 AND current_job_id = $4",
                    )
                    .bind(vm_status.as_str())
                    .bind(now)
                    .bind(job.vm_id.0)
                    .bind(job.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                }
                JobOutcome::Failed { code, message } => {
                    sqlx::query(
                        "UPDATE vms SET status = 'ERROR', current_job_id = NULL, error_code = $1, \
                         error_message = $2, updated_at = $3 WHERE id = $4 AND current_job_id = $5",
                    )
                    .bind(code)
                    .bind(message)
                    .bind(now)
                    .bind(job.vm_id.0)
                    .bind(job.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                }
                JobOutcome::Retry { .. } => {
                    // Announce the job again; a consumer that gets it before
                    // `run_after` puts it back with a delay.
                    if outbox {
                        insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), now);
                    }
                }
            }
            // A snapshot job moves its snapshot along.
            if let Some(snapshot) = job.snapshot_id {
                let next = match (outcome, job.kind) {
                    (JobOutcome::Succeeded { .. }, JobKind::SnapshotCreate) => Some("AVAILABLE"),
                    (JobOutcome::Succeeded { .. }, JobKind::SnapshotDelete) => Some("REMOVED"),
                    (JobOutcome::Failed { .. }, JobKind::SnapshotCreate | JobKind::SnapshotDelete) => {
                        Some("ERROR")
                    }
                    _ => None,
                };
                if let Some(status) = next {
                    sqlx::query("UPDATE snapshots SET status = $1, updated_at = $2 WHERE id = $3")
                        .bind(status)
                        .bind(now)
                        .bind(snapshot.0)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?;
                }
            }
            // Metering follows the power transitions the job made.
            let usage = match (outcome, job.kind) {
                (JobOutcome::Succeeded { .. }, JobKind::CreateVm | JobKind::StartVm) => Some("started"),
                (JobOutcome::Succeeded { .. }, JobKind::StopVm) => Some("stopped"),
                (JobOutcome::Succeeded { .. }, JobKind::DeleteVm) => Some("deleted"),
                (JobOutcome::Succeeded { vm_status }, JobKind::SnapshotRevert)
                    if Some(*vm_status) != job.prior_status =>
                {
                    Some(if *vm_status == VmStatus::Active { "started" } else { "stopped" })
                }
                _ => None,
            };
            if let Some(event) = usage {
                insert_vm_usage!(tx, job.vm_id, event, now, Some(job.id), outbox);
            }
            if matches!(outcome, JobOutcome::Succeeded { .. } | JobOutcome::Failed { .. }) {
                // A finished job's console tokens for a VM that stopped or
                // went away must not open anything any more.
                sqlx::query(
                    "UPDATE console_sessions SET revoked_at = $1 WHERE vm_id = $2 \
                     AND revoked_at IS NULL AND used_at IS NULL AND $3 IN ('vm.stop', 'vm.delete')",
                )
                .bind(now)
                .bind(job.vm_id.0)
                .bind(job.kind.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "console session"))?;
            }
            if let Some(audit) = audit {
                super::audit::insert_audit!(&mut *tx, audit);
            }
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }
}
