//! The operators' fleet: VMs across tenants with filters and keyset pages,
//! counts for dashboards, a VM's state set by hand (`reset_vm_state`), a VM
//! removed whose provider or host is gone (`force_delete_vm`), and the
//! leftovers such a removal records for the reconciler to clean.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hcp_proto::error::ErrorCode;
use hcp_proto::ids::{JobId, ProviderId, VmId};
use sqlx::types::Json;

use super::consoles::revoke_vm_consoles;
use super::jobs::{JOB_COLUMNS, job_from_row};
use super::outbox::insert_vm_usage;
use super::vms::{VM_COLUMNS, vm_from_row};
use super::webhooks::insert_webhook_events;
use super::{Quoted, StoreError, StoreResult, col, on_pool, sql, to_u32};
use hcp_domain::lifecycle::{JobParams, Metering};
use hcp_domain::model::{AuditEvent, Job, JobKind, JobStatus, LeftoverCleanup, Vm, VmStatus, VolumeStatus};

/// Filters and page position for [`super::Store::list_fleet`]; `None` (or
/// empty) filters nothing. DELETED VMs are listed only when `status` asks
/// for them.
#[derive(Debug, Clone, Default)]
pub struct FleetQuery {
    /// At most this many rows (1..=1000).
    pub page_size: u32,
    /// The last id of the previous page (keyset pagination).
    pub after: Option<uuid::Uuid>,
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// Only this project's (of any tenant unless `tenant` is given).
    pub project: Option<String>,
    /// Only on this provider.
    pub provider: Option<ProviderId>,
    /// Only on this host.
    pub host: Option<String>,
    /// Only in this zone.
    pub zone: Option<String>,
    /// Only in this status.
    pub status: Option<VmStatus>,
    /// Only of this image.
    pub image: Option<String>,
    /// Only of this flavor.
    pub flavor: Option<String>,
    /// Only those whose name starts with this.
    pub name_prefix: Option<String>,
    /// Only those created before this.
    pub created_before: Option<DateTime<Utc>>,
    /// Only those created at or after this.
    pub created_after: Option<DateTime<Utc>>,
    /// Only those in their status since this moment or earlier.
    pub status_since_before: Option<DateTime<Utc>>,
}

/// A VM of the fleet listing, with when it entered its status.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetVm {
    /// The VM.
    pub vm: Vm,
    /// When it entered `vm.status`.
    pub status_since: DateTime<Utc>,
}

/// How many VMs match a fleet query, by status, provider and host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCount {
    /// Status.
    pub status: VmStatus,
    /// Provider.
    pub provider: ProviderId,
    /// Host (empty when unknown).
    pub host: String,
    /// VMs.
    pub vms: i64,
}

/// What [`super::Store::force_delete_vm`] is asked to do.
#[derive(Debug, Clone)]
pub struct ForceDelete {
    /// The VM.
    pub vm: VmId,
    /// End a job in flight on it (FAILED) instead of refusing (Busy).
    pub end_job: bool,
    /// Record what it leaves on its provider for the reconciler to clean;
    /// false when the operator knows the provider-side VM is gone.
    pub leftover: bool,
    /// Why (the operator's reason), kept with the leftover.
    pub reason: String,
    /// The audit event (its time is the removal's).
    pub audit: AuditEvent,
}

/// What a force-delete did.
#[derive(Debug, Clone, PartialEq)]
pub struct ForceDeleted {
    /// The VM as it was before.
    pub vm: Vm,
    /// The job it ended, if one was in flight.
    pub ended_job: Option<JobId>,
    /// The volumes it detached (kept).
    pub detached_volumes: u64,
}

/// What a force-deleted VM left on its provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The VM (HCP's id, the provider's key).
    pub vm_id: VmId,
    /// Its provider.
    pub provider_id: ProviderId,
    /// The host it was on.
    pub host: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Its project.
    pub project_id: String,
    /// When it was force-deleted.
    pub recorded_at: DateTime<Utc>,
    /// Who force-deleted it.
    pub recorded_by: String,
    /// Why.
    pub reason: String,
    /// When the reconciler cleaned it; `None` while open.
    pub cleaned_at: Option<DateTime<Utc>>,
    /// How: deleted on the provider, or found gone there.
    pub cleaned_how: Option<LeftoverCleanup>,
}

const LEFTOVER_COLUMNS: &str = "vm_id, provider_id, host, tenant_id, project_id, recorded_at, recorded_by, \
     reason, cleaned_at, cleaned_how";

macro_rules! leftover_from_row {
    ($row:expr) => {{
        let row = $row;
        let vm: uuid::Uuid = col!(row, "vm_id");
        let provider: uuid::Uuid = col!(row, "provider_id");
        Leftover {
            vm_id: VmId(vm),
            provider_id: ProviderId(provider),
            host: col!(row, "host"),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            recorded_at: col!(row, "recorded_at"),
            recorded_by: col!(row, "recorded_by"),
            reason: col!(row, "reason"),
            cleaned_at: col!(row, "cleaned_at"),
            cleaned_how: {
                let how: Option<String> = col!(row, "cleaned_how");
                match how {
                    Some(h) => Some(
                        LeftoverCleanup::parse(&h)
                            .ok_or_else(|| StoreError::Corrupt(format!("leftover cleanup {h:?}")))?,
                    ),
                    None => None,
                }
            },
        }
    }};
}

/// A bound value of a fleet filter.
enum Param {
    Text(String),
    Id(uuid::Uuid),
    Time(DateTime<Utc>),
}

/// The WHERE clause of a fleet query (without the keyset) and its values,
/// numbered from `$1`.
fn fleet_filter(q: &FleetQuery) -> (String, Vec<Param>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    // Each `?` of `clause` is the value's number.
    let mut add = |clause: &str, p: Option<Param>| {
        if let Some(p) = p {
            params.push(p);
        }
        clauses.push(clause.replace('?', &format!("${}", params.len())));
    };
    let text = |s: &String| Some(Param::Text(s.clone()));
    if let Some(t) = &q.tenant {
        add("tenant_id = ?", text(t));
    }
    if let Some(p) = &q.project {
        add("project_id = ?", text(p));
    }
    if let Some(p) = q.provider {
        add("provider_id = ?", Some(Param::Id(p.0)));
    }
    if let Some(h) = &q.host {
        add("host = ?", text(h));
    }
    if let Some(z) = &q.zone {
        add("zone = ?", text(z));
    }
    match q.status {
        Some(s) => add("status = ?", Some(Param::Text(s.as_str().to_owned()))),
        None => add(&format!("status <> {}", Quoted(VmStatus::Deleted.as_str())), None),
    }
    if let Some(i) = &q.image {
        add("image = ?", text(i));
    }
    if let Some(f) = &q.flavor {
        add("flavor = ?", text(f));
    }
    if let Some(n) = &q.name_prefix {
        // An exact prefix on both backends (LIKE folds case on SQLite and
        // would need escaping).
        add("substr(name, 1, length(?)) = ?", text(n));
    }
    if let Some(t) = q.created_before {
        add("created_at < ?", Some(Param::Time(t)));
    }
    if let Some(t) = q.created_after {
        add("created_at >= ?", Some(Param::Time(t)));
    }
    if let Some(t) = q.status_since_before {
        add("status_since <= ?", Some(Param::Time(t)));
    }
    (clauses.join(" AND "), params)
}

macro_rules! bind_all {
    ($q:expr, $params:expr) => {{
        let mut q = $q;
        for p in $params {
            q = match p {
                Param::Text(s) => q.bind(s.clone()),
                Param::Id(u) => q.bind(*u),
                Param::Time(t) => q.bind(*t),
            };
        }
        q
    }};
}

impl super::Store {
    /// Lists VMs across tenants in id (creation) order, one page at a time.
    /// Returns the page and, when another follows, the last id of this one.
    pub async fn list_fleet(&self, query: &FleetQuery) -> StoreResult<(Vec<FleetVm>, Option<uuid::Uuid>)> {
        let limit = i64::from(query.page_size.clamp(1, 1000));
        let (filter, mut params) = fleet_filter(query);
        let mut sql = format!("SELECT {VM_COLUMNS}, status_since FROM vms WHERE {filter}");
        if let Some(after) = query.after {
            params.push(Param::Id(after));
            sql.push_str(&format!(" AND id > ${}", params.len()));
        }
        // One row more than asked tells whether another page follows.
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", params.len() + 1));
        let mut vms = on_pool!(self, |pool| {
            let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())), &params);
            let rows =
                q.bind(limit + 1).fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let vm = vm_from_row!(row);
                let since: Option<DateTime<Utc>> = col!(row, "status_since");
                let status_since = since.unwrap_or(vm.updated_at);
                out.push(FleetVm { vm, status_since });
            }
            out
        });
        let next = if vms.len() as i64 > limit {
            vms.truncate(limit as usize);
            vms.last().map(|v| v.vm.id.0)
        } else {
            None
        };
        Ok((vms, next))
    }

    /// Counts the VMs a fleet query matches (all pages), by status,
    /// provider and host.
    pub async fn count_fleet(&self, query: &FleetQuery) -> StoreResult<Vec<FleetCount>> {
        let (filter, params) = fleet_filter(query);
        let sql = format!(
            "SELECT status, provider_id, host, COUNT(*) AS n FROM vms WHERE {filter} \
             GROUP BY status, provider_id, host ORDER BY status, provider_id, host"
        );
        on_pool!(self, |pool| {
            let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())), &params);
            let rows = q.fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let status: String = col!(row, "status");
                let provider: uuid::Uuid = col!(row, "provider_id");
                out.push(FleetCount {
                    status: VmStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("vm status {status:?}")))?,
                    provider: ProviderId(provider),
                    host: col!(row, "host"),
                    vms: col!(row, "n"),
                });
            }
            Ok(out)
        })
    }

    /// Sets a VM's status by hand if it is still `expected` with no job in
    /// flight, with its usage event (`metering`), its consoles revoked
    /// (`revoke`, the reason) and the audit event, in one transaction.
    /// Busy names a job that took the VM meanwhile; Conflict says the VM
    /// changed state; NotFound a VM that does not exist or is deleted.
    /// Setting ERROR keeps the VM's error code (INTERNAL when it had none)
    /// and records `message`; another state clears the error.
    #[allow(clippy::too_many_arguments)]
    pub async fn reset_vm_state(
        &self,
        vm: VmId,
        expected: VmStatus,
        to: VmStatus,
        message: &str,
        metering: Option<Metering>,
        revoke: Option<&str>,
        audit: &AuditEvent,
    ) -> StoreResult<()> {
        let outbox = self.outbox;
        let (code, message) = if to == VmStatus::Error {
            (Some(ErrorCode::Internal.as_str()), Some(message))
        } else {
            (None, None)
        };
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(
                "UPDATE vms SET status = $1, error_code = CASE WHEN $2 IS NULL THEN NULL \
                 ELSE COALESCE(error_code, $2) END, error_message = $3, updated_at = $4 \
                 WHERE id = $5 AND status = $6 AND current_job_id IS NULL",
            )
            .bind(to.as_str())
            .bind(code)
            .bind(message)
            .bind(audit.at)
            .bind(vm.0)
            .bind(expected.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            if done.rows_affected() != 1 {
                let row = sqlx::query("SELECT status, current_job_id FROM vms WHERE id = $1")
                    .bind(vm.0)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                    .ok_or(StoreError::NotFound)?;
                let status: String = col!(&row, "status");
                let job: Option<uuid::Uuid> = col!(&row, "current_job_id");
                return Err(match job {
                    Some(job) => StoreError::Busy {
                        job: JobId(job),
                        message: format!("vm {vm} is {status}: job {job} is operating on it"),
                    },
                    None if VmStatus::parse(&status) == Some(VmStatus::Deleted) => StoreError::NotFound,
                    None => StoreError::Conflict(format!("vm {vm} changed to {status} meanwhile")),
                });
            }
            if let Some(event) = metering {
                insert_vm_usage!(tx, vm, event.as_str(), audit.at, None, outbox);
            }
            // Tenants' webhooks hear of the status an operator set.
            super::webhooks::insert_status_change!(tx, vm, expected, to, audit.at);
            if let Some(reason) = revoke {
                revoke_vm_consoles!(tx, Some(vm), reason, audit.at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Removes a VM whose provider or host is gone, in one transaction:
    /// a job in flight is ended FAILED (or the call is Busy naming it,
    /// unless `end_job`; the job's worker then cannot finish it, its
    /// lease and status being compare-and-set), the VM becomes DELETED
    /// (its quota released), its volumes are detached and kept (AVAILABLE),
    /// its console sessions revoked, the usage event `deleted` written,
    /// the leftover recorded (unless the operator said there is none) and
    /// the audit event appended. NotFound for a VM that does not exist or
    /// is deleted already.
    pub async fn force_delete_vm(&self, fd: &ForceDelete) -> StoreResult<ForceDeleted> {
        let outbox = self.outbox;
        let at = fd.audit.at;
        on_pool!(transaction self, |tx| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1")))
                .bind(fd.vm.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                .ok_or(StoreError::NotFound)?;
            let vm = vm_from_row!(&row);
            if vm.status == VmStatus::Deleted {
                return Err(StoreError::NotFound);
            }
            let ended_job = vm.current_job_id;
            if let Some(job) = ended_job {
                if !fd.end_job {
                    return Err(StoreError::Busy {
                        job,
                        message: format!("vm {} is {}: job {job} is operating on it", vm.id, vm.status),
                    });
                }
                // Ended, and its cancellation requested too: a worker still
                // running it drops its provider call at once (and then cannot
                // finish the job, its status and lease being compare-and-set).
                let row = sqlx::query(sqlx::AssertSqlSafe(sql!(
                    "UPDATE jobs SET status = {job_failed}, finished_at = $1, updated_at = $1, \
                     lease_owner = NULL, lease_expires_at = NULL, error_code = $2, error_message = $3, \
                     cancel_requested_at = COALESCE(cancel_requested_at, $1), \
                     cancel_requested_by = COALESCE(cancel_requested_by, $5) \
                     WHERE id = $4 AND status IN ({job_queued}, {job_running}) RETURNING {JOB_COLUMNS}",
                    job_failed = JobStatus::Failed,
                    job_queued = JobStatus::Queued,
                    job_running = JobStatus::Running
                )))
                .bind(at)
                .bind(ErrorCode::Conflict.as_str())
                .bind(format!("ended: its vm was force-deleted by {}", fd.audit.actor))
                .bind(job.0)
                .bind(&fd.audit.actor)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "job"))?;
                if let Some(row) = row {
                    let ended = job_from_row!(&row);
                    let events = hcp_domain::webhook::job_events(
                        &ended,
                        JobStatus::Failed,
                        Some(ErrorCode::Conflict.as_str()),
                        None,
                        None,
                        at,
                    );
                    insert_webhook_events!(tx, &vm.tenant_id, &vm.project_id, &events, at);
                }
            }
            // Tenants' webhooks hear that an operator removed the VM.
            let events = [hcp_domain::webhook::correction_event(&vm.project_id, vm.id, vm.status, VmStatus::Deleted, at)];
            insert_webhook_events!(tx, &vm.tenant_id, &vm.project_id, &events, at);
            // The VM's usage is closed at its size now, before it is gone.
            insert_vm_usage!(tx, vm.id, Metering::Deleted.as_str(), at, None, outbox);
            sqlx::query(
                "UPDATE vms SET status = $1, current_job_id = NULL, error_code = NULL, error_message = NULL, \
                 updated_at = $2 WHERE id = $3",
            )
            .bind(VmStatus::Deleted.as_str())
            .bind(at)
            .bind(vm.id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            // Its volumes outlive it: detached in HCP's records, kept (the
            // provider-side disks go with the leftover, or stay where they
            // are, never deleted by this).
            let held: Vec<uuid::Uuid> = sqlx::query_scalar(sql!(
                "SELECT id FROM volumes WHERE vm_id = $1 AND status <> {deleted}",
                deleted = VolumeStatus::Deleted
            ))
            .bind(vm.id.0)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            sqlx::query(sql!(
                "UPDATE volumes SET vm_id = NULL, device_index = NULL, updated_at = $1, \
                 status = CASE WHEN status = {error} THEN status ELSE {available} END \
                 WHERE vm_id = $2 AND status <> {deleted}",
                error = VolumeStatus::Error,
                available = VolumeStatus::Available,
                deleted = VolumeStatus::Deleted
            ))
            .bind(at)
            .bind(vm.id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            for id in &held {
                super::volumes::insert_volume_usage!(
                    tx,
                    hcp_proto::ids::VolumeId(*id),
                    hcp_domain::lifecycle::VolumeMetering::Detached,
                    Some(vm.id),
                    at,
                    ended_job,
                    outbox
                );
            }
            revoke_vm_consoles!(tx, Some(vm.id), "the vm was force-deleted by an operator", at);
            if fd.leftover {
                sqlx::query(
                    "INSERT INTO vm_leftovers (vm_id, provider_id, host, tenant_id, project_id, recorded_at, \
                     recorded_by, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(vm.id.0)
                .bind(vm.provider_id.0)
                .bind(&vm.host)
                .bind(&vm.tenant_id)
                .bind(&vm.project_id)
                .bind(at)
                .bind(&fd.audit.actor)
                .bind(&fd.reason)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "leftover"))?;
            }
            super::audit::insert_audit!(&mut *tx, &fd.audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(ForceDeleted { vm, ended_job, detached_volumes: held.len() as u64 })
        })
    }

    /// The leftovers of force-deleted VMs, oldest first: of one provider,
    /// and only those not cleaned yet when `open_only`.
    pub async fn list_leftovers(
        &self,
        provider: Option<ProviderId>,
        open_only: bool,
    ) -> StoreResult<Vec<Leftover>> {
        let mut sql = format!("SELECT {LEFTOVER_COLUMNS} FROM vm_leftovers WHERE 1 = 1");
        if provider.is_some() {
            sql.push_str(" AND provider_id = $1");
        }
        if open_only {
            sql.push_str(" AND cleaned_at IS NULL");
        }
        sql.push_str(" ORDER BY recorded_at, vm_id");
        on_pool!(self, |pool| {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
            if let Some(p) = provider {
                q = q.bind(p.0);
            }
            let rows = q.fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "leftovers"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(leftover_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Marks a leftover cleaned (`how`: what the reconciler did), with the
    /// audit event. False when it was cleaned already.
    pub async fn mark_leftover_cleaned(
        &self,
        vm: VmId,
        how: LeftoverCleanup,
        audit: &AuditEvent,
    ) -> StoreResult<bool> {
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(
                "UPDATE vm_leftovers SET cleaned_at = $1, cleaned_how = $2 WHERE vm_id = $3 \
                 AND cleaned_at IS NULL",
            )
            .bind(audit.at)
            .bind(how.as_str())
            .bind(vm.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "leftover"))?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(true)
        })
    }
}
