//! The transactional outbox and usage (metering) events.
//!
//! Messages for the queue (a job to run, a usage event) are written as
//! outbox rows in the same transaction as the change they announce; a
//! publisher sends pending rows and marks them sent. A queue outage delays
//! messages and loses none; a row sent twice (two publishers, a crash
//! before marking) carries the same message id, which the queue dedupes.
//!
//! Usage events are derived from the job that changes a VM's power state,
//! in the transaction that records the new state.

use chrono::{DateTime, Utc};
use hcp_proto::ids::{EventId, JobId, VmId};

use hcp_domain::lifecycle::{Metering, VolumeMetering};
use hcp_domain::usage::{VmEvent, VolumeEvent};

use super::{StoreError, StoreResult, col, on_pool};

/// Subject of "a job is ready to run" messages (payload: the job id).
pub const SUBJECT_JOBS: &str = "hcp.jobs.dispatch";
/// Prefix of usage event subjects (`hcp.usage.started`, ...).
pub const SUBJECT_USAGE_PREFIX: &str = "hcp.usage.";

/// A pending outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Row id, also the message's dedupe id.
    pub id: i64,
    /// Queue subject.
    pub subject: String,
    /// Payload.
    pub payload: String,
}

/// A usage event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageEvent {
    /// Event id.
    pub id: EventId,
    /// When the transition happened.
    pub at: DateTime<Utc>,
    /// Tenant billed.
    pub tenant_id: String,
    /// Project billed.
    pub project_id: String,
    /// The VM.
    pub vm_id: VmId,
    /// `started`, `stopped`, `resized` or `deleted`.
    pub event: String,
    /// Flavor name.
    pub flavor: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// The VM's disk (0 in events recorded before the disk was metered).
    pub disk_gib: u32,
    /// The job that made the transition.
    pub job_id: Option<JobId>,
}

macro_rules! insert_outbox {
    ($conn:expr, $subject:expr, $payload:expr, $at:expr) => {{
        sqlx::query(
            "INSERT INTO outbox (subject, payload, created_at, published_at) VALUES ($1, $2, $3, NULL)",
        )
        .bind($subject)
        .bind($payload)
        .bind($at)
        .execute(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "outbox"))?;
    }};
}
pub(crate) use insert_outbox;

macro_rules! insert_usage {
    ($conn:expr, $ev:expr, $outbox:expr) => {{
        let ev: &$crate::UsageEvent = $ev;
        sqlx::query(
            "INSERT INTO usage_events (id, at, tenant_id, project_id, vm_id, event, flavor, vcpus, memory_mib, \
             job_id, disk_gib) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(ev.id.0)
        .bind(ev.at)
        .bind(&ev.tenant_id)
        .bind(&ev.project_id)
        .bind(ev.vm_id.0)
        .bind(&ev.event)
        .bind(&ev.flavor)
        .bind(ev.vcpus as i32)
        .bind(ev.memory_mib as i32)
        .bind(ev.job_id.map(|j| j.0))
        .bind(ev.disk_gib as i32)
        .execute(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "usage event"))?;
        if $outbox {
            let payload = serde_json::to_string(ev).unwrap_or_default();
            $crate::outbox::insert_outbox!(
                $conn,
                format!("{}{}", $crate::outbox::SUBJECT_USAGE_PREFIX, ev.event),
                payload,
                ev.at
            );
        }
    }};
}
pub(crate) use insert_usage;

/// Records usage event `$event` (`"created"`, `"stopped"`, ...) for a VM
/// inside a transaction, sized from the VM's row as it is now.
macro_rules! insert_vm_usage {
    ($conn:expr, $vm:expr, $event:expr, $at:expr, $job:expr, $outbox:expr) => {{
        let vm: hcp_proto::ids::VmId = $vm;
        let row = sqlx::query(
            "SELECT tenant_id, project_id, flavor, vcpus, memory_mib, disk_gib FROM vms WHERE id = $1",
        )
        .bind(vm.0)
        .fetch_one(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "vm"))?;
        let vcpus: i32 = $crate::col!(&row, "vcpus");
        let memory: i32 = $crate::col!(&row, "memory_mib");
        let disk: i32 = $crate::col!(&row, "disk_gib");
        let ev = $crate::UsageEvent {
            id: hcp_proto::ids::EventId::new(),
            at: $at,
            tenant_id: $crate::col!(&row, "tenant_id"),
            project_id: $crate::col!(&row, "project_id"),
            vm_id: vm,
            event: $event.to_owned(),
            flavor: $crate::col!(&row, "flavor"),
            vcpus: vcpus.max(0) as u32,
            memory_mib: memory.max(0) as u32,
            disk_gib: disk.max(0) as u32,
            job_id: $job,
        };
        $crate::outbox::insert_usage!($conn, &ev, $outbox);
    }};
}
pub(crate) use insert_vm_usage;

impl super::Store {
    /// Returns up to `limit` unsent outbox rows, oldest first.
    pub async fn pending_outbox(&self, limit: u32) -> StoreResult<Vec<OutboxMessage>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, subject, payload FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "outbox"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(OutboxMessage {
                    id: col!(row, "id"),
                    subject: col!(row, "subject"),
                    payload: col!(row, "payload"),
                });
            }
            Ok(out)
        })
    }

    /// Marks outbox rows sent.
    pub async fn mark_outbox_published(&self, ids: &[i64], at: DateTime<Utc>) -> StoreResult<()> {
        on_pool!(engine self, |pool| {
            for id in ids {
                sqlx::query("UPDATE outbox SET published_at = $1 WHERE id = $2")
                    .bind(at)
                    .bind(*id)
                    .execute(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "outbox"))?;
            }
        });
        Ok(())
    }

    /// Counts unsent outbox rows.
    pub async fn count_pending_outbox(&self) -> StoreResult<i64> {
        on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "outbox"))
        })
    }

    /// Appends a VM usage event as given, at its own time (for imports of
    /// usage recorded elsewhere, and tests that need a known sequence):
    /// jobs append theirs in the transaction of the change they describe.
    pub async fn append_usage_event(&self, ev: &UsageEvent) -> StoreResult<()> {
        let outbox = self.outbox;
        on_pool!(transaction self, |tx| {
            insert_usage!(tx, ev, outbox);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Returns a project's usage events, oldest first.
    pub async fn list_usage_events(&self, scope: &hcp_domain::model::Scope) -> StoreResult<Vec<UsageEvent>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, at, tenant_id, project_id, vm_id, event, flavor, vcpus, memory_mib, job_id, \
                 disk_gib FROM usage_events WHERE tenant_id = $1 AND project_id = $2 ORDER BY at, id",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "usage events"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: uuid::Uuid = col!(row, "id");
                let vm: uuid::Uuid = col!(row, "vm_id");
                let job: Option<uuid::Uuid> = col!(row, "job_id");
                let vcpus: i32 = col!(row, "vcpus");
                let mem: i32 = col!(row, "memory_mib");
                let disk: i32 = col!(row, "disk_gib");
                out.push(UsageEvent {
                    id: EventId(id),
                    at: col!(row, "at"),
                    tenant_id: col!(row, "tenant_id"),
                    project_id: col!(row, "project_id"),
                    vm_id: VmId(vm),
                    event: col!(row, "event"),
                    flavor: col!(row, "flavor"),
                    vcpus: vcpus.max(0) as u32,
                    memory_mib: mem.max(0) as u32,
                    disk_gib: disk.max(0) as u32,
                    job_id: job.map(JobId),
                });
            }
            Ok(out)
        })
    }

    /// The usage events a report over `[from, to)` needs: every VM and
    /// volume event in the window and, for each VM and volume, its last
    /// event before `from` (the state the window starts in), for one tenant
    /// and project or all of them.
    pub async fn usage_report_events(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        tenant: Option<&str>,
        project: Option<&str>,
    ) -> StoreResult<(Vec<VmEvent>, Vec<VolumeEvent>)> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT at, tenant_id, project_id, vm_id, event, flavor, vcpus, memory_mib, disk_gib \
                 FROM usage_events e WHERE at < $2 AND ($3 IS NULL OR tenant_id = $3) \
                 AND ($4 IS NULL OR project_id = $4) AND (at >= $1 OR id = (SELECT p.id FROM usage_events p \
                 WHERE p.vm_id = e.vm_id AND p.at < $1 ORDER BY p.at DESC, p.id DESC LIMIT 1)) ORDER BY at, id",
            )
            .bind(from)
            .bind(to)
            .bind(tenant)
            .bind(project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "usage events"))?;
            let mut vms = Vec::with_capacity(rows.len());
            for row in &rows {
                let vm: uuid::Uuid = col!(row, "vm_id");
                let event: String = col!(row, "event");
                let (vcpus, memory, disk): (i32, i32, i32) =
                    (col!(row, "vcpus"), col!(row, "memory_mib"), col!(row, "disk_gib"));
                vms.push(VmEvent {
                    at: col!(row, "at"),
                    tenant: col!(row, "tenant_id"),
                    project: col!(row, "project_id"),
                    vm: vm.to_string(),
                    event: Metering::parse(&event)
                        .ok_or_else(|| StoreError::Corrupt(format!("usage event {event:?}")))?,
                    flavor: col!(row, "flavor"),
                    vcpus: vcpus.max(0) as u32,
                    memory_mib: memory.max(0) as u32,
                    disk_gib: disk.max(0) as u32,
                });
            }
            let rows = sqlx::query(
                "SELECT at, tenant_id, project_id, volume_id, event, size_gib FROM volume_usage_events e \
                 WHERE at < $2 AND ($3 IS NULL OR tenant_id = $3) AND ($4 IS NULL OR project_id = $4) \
                 AND (at >= $1 OR id = (SELECT p.id FROM volume_usage_events p WHERE p.volume_id = e.volume_id \
                 AND p.at < $1 ORDER BY p.at DESC, p.id DESC LIMIT 1)) ORDER BY at, id",
            )
            .bind(from)
            .bind(to)
            .bind(tenant)
            .bind(project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume usage events"))?;
            let mut volumes = Vec::with_capacity(rows.len());
            for row in &rows {
                let volume: uuid::Uuid = col!(row, "volume_id");
                let event: String = col!(row, "event");
                let size: i32 = col!(row, "size_gib");
                volumes.push(VolumeEvent {
                    at: col!(row, "at"),
                    tenant: col!(row, "tenant_id"),
                    project: col!(row, "project_id"),
                    volume: volume.to_string(),
                    event: VolumeMetering::parse(&event)
                        .ok_or_else(|| StoreError::Corrupt(format!("volume usage event {event:?}")))?,
                    size_gib: size.max(0) as u32,
                });
            }
            Ok((vms, volumes))
        })
    }
}
