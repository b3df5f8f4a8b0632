//! What core's `/metrics` reads from the database at each scrape: counts
//! that are state, not events, so every core process reports the same.

use chrono::{DateTime, Utc};

use super::sql;
use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::{JobStatus, VmStatus};

/// The state-derived gauges.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// VMs by status (DELETED included: they are kept).
    pub vms_by_status: Vec<(String, i64)>,
    /// Volumes by status, with their GiB (DELETED included).
    pub volumes_by_status: Vec<(String, i64, i64)>,
    /// Jobs not finished, by kind and status (QUEUED, RUNNING).
    pub open_jobs: Vec<(String, String, i64)>,
    /// Outbox rows not yet published.
    pub outbox_pending: i64,
    /// When the oldest unpublished outbox row was written.
    pub outbox_oldest: Option<DateTime<Utc>>,
    /// Providers by name, with whether the last probe found them healthy.
    pub providers: Vec<(String, bool)>,
    /// Use by project of what quotas limit: (tenant, project, vms, vcpus,
    /// memory MiB), of VMs not deleted.
    pub project_use: Vec<(String, String, i64, i64, i64)>,
}

impl super::Store {
    /// Reads the gauges, one statement each.
    pub async fn metric_gauges(&self) -> StoreResult<Gauges> {
        let mut g = Gauges::default();
        on_pool!(self, |pool| {
            let err = |e| StoreError::from_sqlx(e, "metrics");
            for row in &sqlx::query("SELECT status, COUNT(*) AS n FROM vms GROUP BY status")
                .fetch_all(pool)
                .await
                .map_err(err)?
            {
                g.vms_by_status.push((col!(row, "status"), col!(row, "n")));
            }
            for row in &sqlx::query(
                "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(size_gib), 0) AS BIGINT) AS gib \
                 FROM volumes GROUP BY status",
            )
            .fetch_all(pool)
            .await
            .map_err(err)?
            {
                g.volumes_by_status.push((col!(row, "status"), col!(row, "n"), col!(row, "gib")));
            }
            for row in &sqlx::query(sql!(
                "SELECT kind, status, COUNT(*) AS n FROM jobs WHERE status IN ({job_queued}, {job_running}) \
                 GROUP BY kind, status",
                job_queued = JobStatus::Queued,
                job_running = JobStatus::Running
            ))
            .fetch_all(pool)
            .await
            .map_err(err)?
            {
                g.open_jobs.push((col!(row, "kind"), col!(row, "status"), col!(row, "n")));
            }
            g.outbox_pending = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(pool)
                .await
                .map_err(err)?;
            g.outbox_oldest = sqlx::query_scalar(
                "SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1",
            )
            .fetch_optional(pool)
            .await
            .map_err(err)?;
            for row in
                &sqlx::query("SELECT name, healthy FROM providers").fetch_all(pool).await.map_err(err)?
            {
                g.providers.push((col!(row, "name"), col!(row, "healthy")));
            }
            for row in &sqlx::query(sql!(
                "SELECT tenant_id, project_id, COUNT(*) AS n, SUM(vcpus) AS vcpus, SUM(memory_mib) AS memory \
                 FROM vms WHERE status <> {vm_deleted} GROUP BY tenant_id, project_id",
                vm_deleted = VmStatus::Deleted
            ))
            .fetch_all(pool)
            .await
            .map_err(err)?
            {
                let vcpus: Option<i64> = col!(row, "vcpus");
                let memory: Option<i64> = col!(row, "memory");
                g.project_use.push((
                    col!(row, "tenant_id"),
                    col!(row, "project_id"),
                    col!(row, "n"),
                    vcpus.unwrap_or(0),
                    memory.unwrap_or(0),
                ));
            }
            Ok::<_, StoreError>(())
        })?;
        Ok(g)
    }
}
