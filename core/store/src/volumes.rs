//! Volumes: accepting a create (quota checked in the transaction) and an
//! operation (the volume's and, for attach, detach and an extend of an
//! attached volume, its VM's compare-and-set in one transaction), reads,
//! tenant updates, what a finished job does to its volume, and the volume
//! usage events. The lifecycle decides (`hcp_domain::lifecycle::volume`);
//! this module writes what it decided.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hcp_domain::lifecycle::{JobParams, VolumeRefusal};
use hcp_domain::model::{Attachment, AuditEvent, Job, JobKind, Scope, Vm, Volume, VolumeStatus};
use hcp_proto::ids::{JobId, ProviderId, VmId, VolumeId};
use sqlx::types::Json;

use super::guards::{IdempotencyRecord, insert_idempotency};
use super::outbox::{SUBJECT_JOBS, insert_outbox};
use super::{StoreError, StoreResult, col, on_pool, sql, to_i32};

/// Filters and page position for [`super::Store::list_volumes`].
#[derive(Debug, Clone, Default)]
pub struct ListVolumesQuery {
    /// At most this many rows (1..=1000).
    pub page_size: u32,
    /// The last id of the previous page.
    pub after: Option<uuid::Uuid>,
    /// Only this status; DELETED volumes are listed only when asked for.
    pub status: Option<VolumeStatus>,
    /// Only volumes carrying all of these tags.
    pub tags: Vec<String>,
    /// Only volumes attached to this VM.
    pub vm_id: Option<VmId>,
}

/// The tenant-owned fields [`super::Store::update_volume`] sets; `None`
/// keeps a field.
#[derive(Debug, Clone, Default)]
pub struct VolumeUpdate {
    /// New name.
    pub name: Option<String>,
    /// New metadata, replacing the old.
    pub metadata: Option<BTreeMap<String, String>>,
    /// New tags, replacing the old.
    pub tags: Option<Vec<String>>,
}

/// A volume operation to accept (every kind but a create).
#[derive(Debug, Clone)]
pub struct VolumeOperation {
    /// Where the caller operates.
    pub scope: Scope,
    /// The volume.
    pub volume_id: VolumeId,
    /// What to do.
    pub kind: JobKind,
    /// For an attach: the VM to attach to and where its checks were made.
    pub attach: Option<AttachTarget>,
    /// For an extend: the new size (checked against the quota for the
    /// difference and applied now).
    pub extend_to: Option<u32>,
    /// The VM status the capability checks were made on (the volume's VM,
    /// or the attach target); the accept is refused if it changed.
    pub require_vm_status: Option<hcp_domain::model::VmStatus>,
}

/// The VM an attach goes to.
#[derive(Debug, Clone)]
pub struct AttachTarget {
    /// The VM.
    pub vm_id: VmId,
    /// The host the VM was on when checked; the volume is placed there if
    /// it has no host yet and its provider's volumes are host-local.
    pub host: String,
    /// Whether the volume's provider keeps volumes on one host.
    pub host_local: bool,
    /// The most data volumes the VM's provider allows on one VM.
    pub max_volumes: u32,
}

/// A volume usage event (`volume.created`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeUsageEvent {
    /// Event id.
    pub id: hcp_proto::ids::EventId,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Tenant billed.
    pub tenant_id: String,
    /// Project billed.
    pub project_id: String,
    /// The volume.
    pub volume_id: VolumeId,
    /// The event's name.
    pub event: String,
    /// Its size then.
    pub size_gib: u32,
    /// Its type.
    pub volume_type: String,
    /// The VM it was attached to or detached from.
    pub vm_id: Option<VmId>,
    /// The job that made the change.
    pub job_id: Option<JobId>,
}

pub(crate) const VOLUME_COLUMNS: &str = "id, tenant_id, project_id, name, size_gib, zone, volume_type, \
     provider_id, storage, host, native_id, status, vm_id, device_index, current_job_id, error_code, \
     error_message, metadata, tags, created_at, updated_at, delete_on_vm_delete";

/// Inserts a volume row as it is (its attachment included).
macro_rules! insert_volume {
    ($tx:expr, $volume:expr) => {{
        let volume: &hcp_domain::model::Volume = $volume;
        sqlx::query(
            "INSERT INTO volumes (id, tenant_id, project_id, name, size_gib, zone, volume_type, provider_id, \
             storage, host, native_id, status, vm_id, device_index, current_job_id, error_code, error_message, \
             metadata, tags, created_at, updated_at, delete_on_vm_delete) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             $8, $9, $10, $11, $12, $13, $14, $15, NULL, NULL, $16, $17, $18, $18, $19)",
        )
        .bind(volume.id.0)
        .bind(&volume.tenant_id)
        .bind(&volume.project_id)
        .bind(&volume.name)
        .bind($crate::to_i32(volume.size_gib))
        .bind(&volume.zone)
        .bind(&volume.volume_type)
        .bind(volume.provider_id.0)
        .bind(&volume.storage)
        .bind(&volume.host)
        .bind(volume.native_id.as_deref())
        .bind(volume.status.as_str())
        .bind(volume.attachment.map(|a| a.vm_id.0))
        .bind(volume.attachment.map(|a| to_i32(a.device_index)))
        .bind(volume.current_job_id.map(|j| j.0))
        .bind(sqlx::types::Json(&volume.metadata))
        .bind(sqlx::types::Json(&volume.tags))
        .bind(volume.created_at)
        .bind(volume.delete_on_vm_delete)
        .execute(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
    }};
}

/// What a VM's create does to volumes, in its accepting transaction.
#[derive(Debug, Clone, Default)]
pub struct CreateVolumes {
    /// A new boot volume: inserted CREATING, attached at place 0, held by
    /// the create job (the quota checked for it).
    pub new_boot: Option<Volume>,
    /// Existing volumes of the project attached at create: (volume, place
    /// (0: the boot volume), its `delete_on_vm_delete`). Each must be
    /// AVAILABLE with no job, on the VM's provider; it becomes ATTACHING,
    /// held by the create job.
    pub existing: Vec<(VolumeId, u32, bool)>,
}

impl CreateVolumes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.new_boot.is_none() && self.existing.is_empty()
    }
}

/// Takes a create's volumes inside its accepting transaction (after the
/// VM's row exists).
macro_rules! hold_create_volumes {
    ($tx:expr, $kind:expr, $vm:expr, $job:expr, $volumes:expr) => {{
        let vm: &hcp_domain::model::Vm = $vm;
        let job: &hcp_domain::model::Job = $job;
        let volumes: &$crate::volumes::CreateVolumes = $volumes;
        if let Some(boot) = &volumes.new_boot {
            let scope = hcp_domain::model::Scope { tenant: vm.tenant_id.clone(), project: vm.project_id.clone() };
            $crate::volumes::check_volume_quota!($tx, $kind, &scope, 1u32, boot.size_gib);
            let mut boot = boot.clone();
            boot.provider_id = vm.provider_id;
            boot.zone = vm.zone.clone();
            $crate::volumes::insert_volume!($tx, &boot);
        }
        for (id, place, delete) in &volumes.existing {
            let done = sqlx::query($crate::sql!(
                "UPDATE volumes SET status = {attaching}, current_job_id = $1, vm_id = $2, device_index = $3, \
                 delete_on_vm_delete = $4, updated_at = $5 \
                 WHERE id = $6 AND tenant_id = $7 AND project_id = $8 AND provider_id = $9 \
                 AND status = {available} AND current_job_id IS NULL AND vm_id IS NULL",
                attaching = hcp_domain::model::VolumeStatus::Attaching,
                available = hcp_domain::model::VolumeStatus::Available
            ))
            .bind(job.id.0)
            .bind(vm.id.0)
            .bind($crate::to_i32(*place))
            .bind(*delete)
            .bind(job.created_at)
            .bind(id.0)
            .bind(&vm.tenant_id)
            .bind(&vm.project_id)
            .bind(vm.provider_id.0)
            .execute(&mut *$tx)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
            if done.rows_affected() != 1 {
                return Err($crate::StoreError::Conflict(format!(
                    "volume {id} changed meanwhile (attached, deleted or busy); retry"
                )));
            }
        }
    }};
}
pub(crate) use hold_create_volumes;

/// Writes the end of a VM's create to the volumes it held
/// (`lifecycle::created_vm_volume`), with their usage events.
macro_rules! finish_create_volumes {
    ($tx:expr, $job:expr, $vm_id:expr, $status:expr, $now:expr, $outbox:expr) => {{
        let job: &hcp_domain::model::Job = $job;
        let vm_id: hcp_proto::ids::VmId = $vm_id;
        let outcome = match $status {
            hcp_domain::model::JobStatus::Succeeded => {
                Some(hcp_domain::lifecycle::Outcome::Succeeded { power: None })
            }
            hcp_domain::model::JobStatus::Failed => {
                Some(hcp_domain::lifecycle::Outcome::Failed(hcp_proto::error::ErrorCode::Internal))
            }
            hcp_domain::model::JobStatus::Cancelled => Some(hcp_domain::lifecycle::Outcome::Cancelled),
            _ => None,
        };
        if let Some(outcome) = outcome {
            let held: Vec<(uuid::Uuid, String)> =
                sqlx::query_as("SELECT id, status FROM volumes WHERE current_job_id = $1")
                    .bind(job.id.0)
                    .fetch_all(&mut *$tx)
                    .await
                    .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
            for (id, status) in held {
                let Some(accepted_as) = hcp_domain::model::VolumeStatus::parse(&status) else { continue };
                let Some((next, metering)) = hcp_domain::lifecycle::created_vm_volume(outcome, accepted_as)
                else {
                    continue;
                };
                let made = matches!(outcome, hcp_domain::lifecycle::Outcome::Succeeded { .. });
                sqlx::query(
                    "UPDATE volumes SET status = $1, current_job_id = NULL, updated_at = $2, \
                     native_id = CASE WHEN $3 THEN COALESCE(native_id, '') ELSE native_id END, \
                     error_code = CASE WHEN $1 = $5 THEN $6 ELSE error_code END, \
                     error_message = CASE WHEN $1 = $5 THEN $7 ELSE error_message END \
                     WHERE id = $4",
                )
                .bind(next.as_str())
                .bind($now)
                .bind(made)
                .bind(id)
                .bind(hcp_domain::model::VolumeStatus::Error.as_str())
                .bind(hcp_proto::error::ErrorCode::ProviderError.as_str())
                .bind("the vm's create did not finish")
                .execute(&mut *$tx)
                .await
                .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
                if let Some(event) = metering {
                    $crate::volumes::insert_volume_usage!(
                        $tx,
                        hcp_proto::ids::VolumeId(id),
                        event,
                        Some(vm_id),
                        $now,
                        Some(job.id),
                        $outbox
                    );
                }
            }
        }
    }};
}
pub(crate) use finish_create_volumes;

macro_rules! volume_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let provider_id: uuid::Uuid = col!(row, "provider_id");
        let status: String = col!(row, "status");
        let vm_id: Option<uuid::Uuid> = col!(row, "vm_id");
        let device_index: Option<i32> = col!(row, "device_index");
        let current_job_id: Option<uuid::Uuid> = col!(row, "current_job_id");
        let metadata: Json<BTreeMap<String, String>> = col!(row, "metadata");
        let tags: Json<Vec<String>> = col!(row, "tags");
        Volume {
            id: VolumeId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            name: col!(row, "name"),
            size_gib: super::to_u32(col!(row, "size_gib"), "size_gib")?,
            zone: col!(row, "zone"),
            volume_type: col!(row, "volume_type"),
            provider_id: ProviderId(provider_id),
            storage: col!(row, "storage"),
            host: col!(row, "host"),
            native_id: col!(row, "native_id"),
            status: VolumeStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("volume status {status:?}")))?,
            attachment: match (vm_id, device_index) {
                (Some(vm), Some(index)) => {
                    Some(Attachment { vm_id: VmId(vm), device_index: super::to_u32(index, "device_index")? })
                }
                _ => None,
            },
            current_job_id: current_job_id.map(JobId),
            delete_on_vm_delete: col!(row, "delete_on_vm_delete"),
            error_code: {
                let c: Option<String> = col!(row, "error_code");
                c.map(|c| {
                    hcp_proto::error::ErrorCode::from_name(&c)
                        .unwrap_or(hcp_proto::error::ErrorCode::Internal)
                })
            },
            error_message: col!(row, "error_message"),
            metadata: metadata.0,
            tags: tags.0,
            created_at: col!(row, "created_at"),
            updated_at: col!(row, "updated_at"),
        }
    }};
}

/// Appends a volume usage event (and its outbox row) inside a transaction,
/// sized from the volume's row as it is now.
macro_rules! insert_volume_usage {
    ($conn:expr, $volume:expr, $event:expr, $vm:expr, $at:expr, $job:expr, $outbox:expr) => {{
        let volume: hcp_proto::ids::VolumeId = $volume;
        let row =
            sqlx::query("SELECT tenant_id, project_id, size_gib, volume_type FROM volumes WHERE id = $1")
                .bind(volume.0)
                .fetch_one(&mut *$conn)
                .await
                .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
        let size: i32 = $crate::col!(&row, "size_gib");
        let ev = $crate::volumes::VolumeUsageEvent {
            id: hcp_proto::ids::EventId::new(),
            at: $at,
            tenant_id: $crate::col!(&row, "tenant_id"),
            project_id: $crate::col!(&row, "project_id"),
            volume_id: volume,
            event: $event.as_str().to_owned(),
            size_gib: size.max(0) as u32,
            volume_type: $crate::col!(&row, "volume_type"),
            vm_id: $vm,
            job_id: $job,
        };
        sqlx::query(
            "INSERT INTO volume_usage_events (id, at, tenant_id, project_id, volume_id, event, size_gib, \
             volume_type, vm_id, job_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(ev.id.0)
        .bind(ev.at)
        .bind(&ev.tenant_id)
        .bind(&ev.project_id)
        .bind(ev.volume_id.0)
        .bind(&ev.event)
        .bind(ev.size_gib as i32)
        .bind(&ev.volume_type)
        .bind(ev.vm_id.map(|v| v.0))
        .bind(ev.job_id.map(|j| j.0))
        .execute(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "usage event"))?;
        if $outbox {
            let payload = serde_json::to_string(&ev).unwrap_or_default();
            $crate::outbox::insert_outbox!(
                $conn,
                format!("{}{}", $crate::outbox::SUBJECT_USAGE_PREFIX, ev.event),
                payload,
                ev.at
            );
        }
    }};
}
pub(crate) use insert_volume_usage;

/// Writes what a finished volume job does to its volume: its state (only
/// while the job still holds it), error, restored size, attachment, the
/// native id the provider reported, and the usage event.
macro_rules! apply_volume_change {
    ($tx:expr, $job:expr, $volume_id:expr, $change:expr, $message:expr, $report:expr, $now:expr, $outbox:expr) => {{
        let job: &hcp_domain::model::Job = $job;
        let volume_id: hcp_proto::ids::VolumeId = $volume_id;
        let change: &hcp_domain::lifecycle::VolumeChange = $change;
        let report: Option<&$crate::VolumeReport> = $report;
        let message: Option<&str> = $message;
        let is_error = change.status == hcp_domain::model::VolumeStatus::Error;
        // The VM the volume was attached to, for the usage event.
        let attached: Option<uuid::Uuid> = sqlx::query_scalar("SELECT vm_id FROM volumes WHERE id = $1")
            .bind(volume_id.0)
            .fetch_optional(&mut *$tx)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?
            .flatten();
        let clear = change.attachment == hcp_domain::lifecycle::AttachmentChange::Clear;
        sqlx::query(
            "UPDATE volumes SET status = $1, current_job_id = NULL, updated_at = $2, \
             error_code = CASE WHEN $3::text IS NOT NULL THEN $3 WHEN $4 THEN error_code ELSE NULL END, \
             error_message = CASE WHEN $3::text IS NOT NULL THEN $5 WHEN $4 THEN error_message ELSE NULL END, \
             size_gib = COALESCE($6, size_gib), \
             vm_id = CASE WHEN $7 THEN NULL ELSE vm_id END, \
             device_index = CASE WHEN $7 THEN NULL ELSE device_index END, \
             native_id = COALESCE($8, native_id), \
             host = CASE WHEN $9::text IS NOT NULL AND $9 <> '' THEN $9 ELSE host END \
             WHERE id = $10 AND current_job_id = $11",
        )
        .bind(change.status.as_str())
        .bind($now)
        .bind(change.error.map(|c| c.as_str()))
        .bind(is_error)
        .bind(change.error.map(|_| message.unwrap_or_default()))
        .bind(change.size.map($crate::to_i32))
        .bind(clear)
        .bind(report.map(|r| r.native_id.as_str()))
        .bind(report.map(|r| r.host.as_str()))
        .bind(volume_id.0)
        .bind(job.id.0)
        .execute(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
        if let Some(event) = change.metering {
            $crate::volumes::insert_volume_usage!(
                $tx,
                volume_id,
                event,
                attached.map(hcp_proto::ids::VmId),
                $now,
                Some(job.id),
                $outbox
            );
        }
    }};
}
pub(crate) use apply_volume_change;
pub(crate) use insert_volume;

/// Detaches every volume of a deleted VM in HCP's records (the provider
/// left them behind, detached), with a `volume.detached` usage event each;
/// a boot volume that goes with its VM (the job's last step deleted it) is
/// DELETED, with `volume.deleted`.
macro_rules! release_volumes {
    ($tx:expr, $job:expr, $vm_id:expr, $now:expr, $outbox:expr) => {{
        let job: &hcp_domain::model::Job = $job;
        let vm_id: hcp_proto::ids::VmId = $vm_id;
        let held: Vec<(uuid::Uuid, bool)> = sqlx::query_as(
            "SELECT id, (device_index = 0 AND delete_on_vm_delete) AS gone FROM volumes WHERE vm_id = $1",
        )
        .bind(vm_id.0)
        .fetch_all(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
        if !held.is_empty() {
            sqlx::query($crate::sql!(
                "UPDATE volumes SET vm_id = NULL, device_index = NULL, updated_at = $1, \
                 status = CASE WHEN device_index = 0 AND delete_on_vm_delete THEN {deleted} \
                 WHEN status = {in_use} THEN {available} ELSE status END WHERE vm_id = $2",
                deleted = hcp_domain::model::VolumeStatus::Deleted,
                in_use = hcp_domain::model::VolumeStatus::InUse,
                available = hcp_domain::model::VolumeStatus::Available
            ))
            .bind($now)
            .bind(vm_id.0)
            .execute(&mut *$tx)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "volume"))?;
            for (id, gone) in held {
                let event = if gone {
                    hcp_domain::lifecycle::VolumeMetering::Deleted
                } else {
                    hcp_domain::lifecycle::VolumeMetering::Detached
                };
                $crate::volumes::insert_volume_usage!(
                    $tx,
                    hcp_proto::ids::VolumeId(id),
                    event,
                    Some(vm_id),
                    $now,
                    Some(job.id),
                    $outbox
                );
            }
        }
    }};
}
pub(crate) use release_volumes;

/// Checks a project's volume quota for `volumes` more volumes and `gib`
/// more GiB inside the accepting transaction (the quota row locked on
/// PostgreSQL, as for VMs).
macro_rules! check_volume_quota {
    ($conn:expr, $kind:expr, $scope:expr, $volumes:expr, $gib:expr) => {{
        let lock = match $kind {
            $crate::BackendKind::Postgres => " FOR UPDATE",
            $crate::BackendKind::Sqlite => "",
        };
        let scope: &hcp_domain::model::Scope = $scope;
        let quota = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT max_volumes, max_volume_gib FROM project_quotas \
             WHERE tenant_id = $1 AND project_id = $2{lock}"
        )))
        .bind(&scope.tenant)
        .bind(&scope.project)
        .fetch_optional(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
        if let Some(row) = quota {
            let max_volumes: Option<i32> = col!(&row, "max_volumes");
            let max_gib: Option<i64> = col!(&row, "max_volume_gib");
            if max_volumes.is_some() || max_gib.is_some() {
                let (n, gib) = $crate::volumes::volume_usage!(&mut *$conn, scope);
                let checks = [
                    ("volumes", max_volumes.map(i64::from), n, i64::from($volumes)),
                    ("volume GiB", max_gib, gib, i64::from($gib)),
                ];
                for (what, max, used, more) in checks {
                    if let Some(max) = max
                        && more > 0
                        && used + more > max
                    {
                        return Err($crate::StoreError::QuotaExceeded(format!(
                            "project quota of {max} {what} reached ({used} in use, {more} requested)"
                        )));
                    }
                }
            }
        }
    }};
}
pub(crate) use check_volume_quota;

/// The project's volumes that are not deleted, and their GiB.
macro_rules! volume_usage {
    ($conn:expr, $scope:expr) => {{
        let scope: &hcp_domain::model::Scope = $scope;
        let used = sqlx::query($crate::sql!(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size_gib), 0) AS gib FROM volumes \
             WHERE tenant_id = $1 AND project_id = $2 AND status <> {deleted}",
            deleted = hcp_domain::model::VolumeStatus::Deleted
        ))
        .bind(&scope.tenant)
        .bind(&scope.project)
        .fetch_one($conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
        let n: i64 = col!(&used, "n");
        let gib: i64 = col!(&used, "gib");
        (n, gib)
    }};
}
pub(crate) use volume_usage;

fn refusal(volume: &Volume, kind: JobKind, refusal: VolumeRefusal) -> StoreError {
    match refusal {
        VolumeRefusal::Busy(job) => StoreError::Busy {
            job,
            message: format!("volume {} is {}: job {job} is operating on it", volume.id, volume.status),
        },
        VolumeRefusal::Attached => match volume.attachment {
            Some(a) => StoreError::Conflict(format!("volume {} is attached to vm {}", volume.id, a.vm_id)),
            None => StoreError::Conflict(format!("volume {} is attached", volume.id)),
        },
        VolumeRefusal::NotAttached => {
            StoreError::Conflict(format!("volume {} is attached to no vm", volume.id))
        }
        VolumeRefusal::WrongState { allowed } => {
            let wanted: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
            StoreError::Conflict(format!(
                "volume {} is {}; {kind} needs it to be {}",
                volume.id,
                volume.status,
                wanted.join(" or ")
            ))
        }
    }
}

impl super::Store {
    /// Inserts a new volume (CREATING) with its create job and the audit
    /// event, the idempotency key and the quota checked in the same
    /// transaction.
    pub async fn accept_volume_create(
        &self,
        volume: &Volume,
        job: &Job,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()> {
        let outbox = self.outbox;
        let backend = self.kind();
        let scope = Scope { tenant: volume.tenant_id.clone(), project: volume.project_id.clone() };
        on_pool!(transaction self, |tx| {
            if let Some(rec) = idem {
                insert_idempotency!(tx, rec);
            }
            check_volume_quota!(tx, backend, &scope, 1u32, volume.size_gib);
            insert_volume!(tx, volume);
            super::jobs::insert_job!(&mut *tx, job);
            if outbox {
                insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Moves a volume (and, for an attach, a detach or an extend of an
    /// attached volume, its VM) under a new job, atomically: both
    /// compare-and-sets, the attachment's place (the lowest free one, at
    /// most `max_volumes`), an extend's size and quota, the job, its outbox
    /// row and the audit event. NotFound when the volume (or the VM) is not
    /// in the project; Busy naming the job in flight on either; Conflict
    /// when a state does not allow it.
    pub async fn accept_volume_operation(
        &self,
        op: &VolumeOperation,
        job: &Job,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<(Volume, Job)> {
        let outbox = self.outbox;
        let backend = self.kind();
        on_pool!(transaction self, |tx| {
            if let Some(rec) = idem {
                insert_idempotency!(tx, rec);
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
            )))
            .bind(op.volume_id.0)
            .bind(&op.scope.tenant)
            .bind(&op.scope.project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?
            .ok_or(StoreError::NotFound)?;
            let mut volume: Volume = volume_from_row!(&row);
            if volume.status == VolumeStatus::Deleted {
                return Err(StoreError::NotFound);
            }
            // The VM the job holds: the attach target, or the VM the
            // volume is attached to (a detach, an extend in use).
            let vm_id = match &op.attach {
                Some(target) => Some(target.vm_id),
                None => volume.attachment.map(|a| a.vm_id),
            };
            let vm: Option<Vm> = match vm_id {
                None => None,
                Some(id) => {
                    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM vms WHERE id = $1 AND tenant_id = $2 AND project_id = $3",
                        super::vms::VM_COLUMNS
                    )))
                    .bind(id.0)
                    .bind(&op.scope.tenant)
                    .bind(&op.scope.project)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                    .ok_or(StoreError::NotFound)?;
                    Some(super::vms::vm_from_row!(&row))
                }
            };
            // The VM's job first: a volume of a VM with a job in flight
            // waits for that job, whatever the volume's state.
            if let Some(vm) = &vm
                && let Some(job) = vm.current_job_id
            {
                return Err(StoreError::Busy {
                    job,
                    message: format!("vm {} is {}: job {job} is operating on it", vm.id, vm.status),
                });
            }
            let next = hcp_domain::lifecycle::accept_volume(
                op.kind,
                volume.status,
                volume.attachment.is_some(),
                volume.current_job_id,
            )
            .map_err(|r| refusal(&volume, op.kind, r))?;
            let mut job = job.clone();
            job.volume_id = Some(volume.id);
            job.prior_volume_status = Some(volume.status);
            if let Some(vm) = &vm {
                if op.require_vm_status.is_some_and(|s| s != vm.status) {
                    return Err(StoreError::Conflict(format!("vm {} changed state concurrently; retry", vm.id)));
                }
                hcp_domain::lifecycle::accept(op.kind, vm.status, None).map_err(|_| {
                    let wanted: Vec<&str> = op.kind.allowed_from().iter().map(|s| s.as_str()).collect();
                    StoreError::Conflict(format!(
                        "vm {} is {}; {} needs it to be {}",
                        vm.id,
                        vm.status,
                        op.kind,
                        wanted.join(" or ")
                    ))
                })?;
                job.vm_id = Some(vm.id);
                job.prior_status = Some(vm.status);
                let done = sqlx::query(
                    "UPDATE vms SET current_job_id = $1 WHERE id = $2 AND status = $3 AND current_job_id IS NULL",
                )
                .bind(job.id.0)
                .bind(vm.id.0)
                .bind(vm.status.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict(format!("vm {} changed state concurrently; retry", vm.id)));
                }
            }
            if let (Some(target), Some(vm)) = (&op.attach, &vm) {
                if volume.provider_id != vm.provider_id || volume.zone != vm.zone {
                    return Err(StoreError::Conflict(format!(
                        "volume {} is in zone {} on storage vm {} cannot reach",
                        volume.id, volume.zone, vm.id
                    )));
                }
                if target.host_local && !volume.host.is_empty() && volume.host != vm.host {
                    return Err(StoreError::Conflict(format!(
                        "volume {} is on storage of another host than vm {}",
                        volume.id, vm.id
                    )));
                }
                let taken: Vec<i32> = sqlx::query_scalar("SELECT device_index FROM volumes WHERE vm_id = $1")
                    .bind(vm.id.0)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
                // The API checked the count; only a concurrent attach fills
                // the last place in between.
                let Some(index) = (1..=target.max_volumes).find(|i| !taken.contains(&to_i32(*i))) else {
                    return Err(StoreError::Conflict(format!(
                        "vm {} has {} volumes, the most its hypervisor allows",
                        vm.id, target.max_volumes
                    )));
                };
                let host = if target.host_local && volume.host.is_empty() { vm.host.clone() } else { volume.host.clone() };
                sqlx::query("UPDATE volumes SET vm_id = $1, device_index = $2, host = $3 WHERE id = $4")
                    .bind(vm.id.0)
                    .bind(to_i32(index))
                    .bind(&host)
                    .bind(volume.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
                volume.attachment = Some(Attachment { vm_id: vm.id, device_index: index });
                volume.host = host;
            }
            if let Some(to) = op.extend_to {
                if to <= volume.size_gib {
                    return Err(StoreError::Conflict(format!(
                        "volume {} has {} GiB already; volumes only grow",
                        volume.id, volume.size_gib
                    )));
                }
                check_volume_quota!(tx, backend, &op.scope, 0u32, to - volume.size_gib);
                sqlx::query("UPDATE volumes SET size_gib = $1 WHERE id = $2")
                    .bind(to_i32(to))
                    .bind(volume.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
                job.params = JobParams::Extend { from: volume.size_gib, to };
                volume.size_gib = to;
            }
            let done = sqlx::query(
                "UPDATE volumes SET status = $1, current_job_id = $2, updated_at = $3 \
                 WHERE id = $4 AND status = $5 AND current_job_id IS NULL",
            )
            .bind(next.as_str())
            .bind(job.id.0)
            .bind(job.created_at)
            .bind(volume.id.0)
            .bind(volume.status.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!("volume {} changed state concurrently; retry", volume.id)));
            }
            super::jobs::insert_job!(&mut *tx, &job);
            if outbox {
                insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            volume.status = next;
            volume.current_job_id = Some(job.id);
            volume.updated_at = job.created_at;
            Ok((volume, job))
        })
    }

    /// Returns a volume of the scope's project (DELETED ones too).
    pub async fn get_volume(&self, scope: &Scope, id: VolumeId) -> StoreResult<Volume> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
            )))
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?
            .ok_or(StoreError::NotFound)?;
            Ok(volume_from_row!(&row))
        })
    }

    /// Returns a volume by id alone (workers, the reconciler).
    pub async fn get_volume_internal(&self, id: VolumeId) -> StoreResult<Volume> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1"
            )))
            .bind(id.0)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?
            .ok_or(StoreError::NotFound)?;
            Ok(volume_from_row!(&row))
        })
    }

    /// The volumes attached to a VM (attaches in flight included), by place.
    pub async fn volumes_of_vm(&self, vm: VmId) -> StoreResult<Vec<Volume>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE vm_id = $1 ORDER BY device_index"
            )))
            .bind(vm.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(volume_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Lists a project's volumes by id, one page at a time; returns the page
    /// and, when another follows, the last id of this one.
    pub async fn list_volumes(
        &self,
        scope: &Scope,
        query: &ListVolumesQuery,
    ) -> StoreResult<(Vec<Volume>, Option<uuid::Uuid>)> {
        let limit = i64::from(query.page_size.clamp(1, 1000));
        let mut sql =
            format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE tenant_id = $1 AND project_id = $2");
        let mut n = 2;
        let mut next_param = || {
            n += 1;
            n
        };
        if query.after.is_some() {
            sql.push_str(&format!(" AND id > ${}", next_param()));
        }
        match query.status {
            Some(_) => sql.push_str(&format!(" AND status = ${}", next_param())),
            None => sql.push_str(&format!(" AND status <> '{}'", VolumeStatus::Deleted.as_str())),
        }
        if query.vm_id.is_some() {
            sql.push_str(&format!(" AND vm_id = ${}", next_param()));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", next_param()));
        // Tags are filtered after the read (a page may come back short; the
        // token still moves on), as JSON containment differs per backend.
        let mut volumes = on_pool!(self, |pool| {
            let mut q =
                sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&scope.tenant).bind(&scope.project);
            if let Some(after) = query.after {
                q = q.bind(after);
            }
            if let Some(status) = query.status {
                q = q.bind(status.as_str());
            }
            if let Some(vm) = query.vm_id {
                q = q.bind(vm.0);
            }
            let rows =
                q.bind(limit + 1).fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "volumes"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(volume_from_row!(row));
            }
            out
        });
        let next = if volumes.len() as i64 > limit {
            volumes.truncate(limit as usize);
            volumes.last().map(|v| v.id.0)
        } else {
            None
        };
        volumes.retain(|v| query.tags.iter().all(|t| v.tags.contains(t)));
        Ok((volumes, next))
    }

    /// Sets the tenant-owned fields `update` names, with the audit event,
    /// in one transaction; returns the volume as it is now. A deleted
    /// volume is NotFound.
    pub async fn update_volume(
        &self,
        scope: &Scope,
        id: VolumeId,
        update: &VolumeUpdate,
        audit: &AuditEvent,
    ) -> StoreResult<Volume> {
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(sql!(
                "UPDATE volumes SET name = COALESCE($1, name), metadata = COALESCE($2, metadata), \
                 tags = COALESCE($3, tags), updated_at = $4 \
                 WHERE id = $5 AND tenant_id = $6 AND project_id = $7 AND status <> {deleted}",
                deleted = VolumeStatus::Deleted
            ))
            .bind(update.name.as_deref())
            .bind(update.metadata.as_ref().map(Json))
            .bind(update.tags.as_ref().map(Json))
            .bind(audit.at)
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = $1")))
                .bind(id.0)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            let volume = volume_from_row!(&row);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(volume)
        })
    }

    /// The project's volume usage: volumes not deleted, and their GiB.
    pub async fn volume_usage(&self, scope: &Scope) -> StoreResult<(u64, u64)> {
        on_pool!(self, |pool| {
            let (n, gib) = volume_usage!(pool, scope);
            Ok((n.max(0) as u64, gib.max(0) as u64))
        })
    }

    /// A project's volume usage events, oldest first.
    pub async fn list_volume_usage_events(&self, scope: &Scope) -> StoreResult<Vec<VolumeUsageEvent>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, at, tenant_id, project_id, volume_id, event, size_gib, volume_type, vm_id, job_id \
                 FROM volume_usage_events WHERE tenant_id = $1 AND project_id = $2 ORDER BY at, id",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "usage events"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: uuid::Uuid = col!(row, "id");
                let volume: uuid::Uuid = col!(row, "volume_id");
                let vm: Option<uuid::Uuid> = col!(row, "vm_id");
                let job: Option<uuid::Uuid> = col!(row, "job_id");
                out.push(VolumeUsageEvent {
                    id: hcp_proto::ids::EventId(id),
                    at: col!(row, "at"),
                    tenant_id: col!(row, "tenant_id"),
                    project_id: col!(row, "project_id"),
                    volume_id: VolumeId(volume),
                    event: col!(row, "event"),
                    size_gib: super::to_u32(col!(row, "size_gib"), "size_gib")?,
                    volume_type: col!(row, "volume_type"),
                    vm_id: vm.map(VmId),
                    job_id: job.map(JobId),
                });
            }
            Ok(out)
        })
    }
}

impl super::Store {
    /// The volumes on a provider that are not deleted (the reconciler's
    /// view), with the time each last changed.
    pub async fn volumes_on_provider(&self, provider: ProviderId) -> StoreResult<Vec<Volume>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE provider_id = $1 AND status <> '{}'",
                VolumeStatus::Deleted.as_str()
            )))
            .bind(provider.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volumes"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(volume_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Records what the reconciler found of a volume, only if the volume is
    /// still as `seen` (same state, no job, unchanged since), with the
    /// audit event, in one transaction. An attachment is recorded only to
    /// a VM of the volume's project that is not deleted, at a free place.
    /// Returns whether it was written.
    pub async fn correct_volume(
        &self,
        seen: &Volume,
        drift: hcp_domain::lifecycle::VolumeDrift,
        audit: &AuditEvent,
    ) -> StoreResult<bool> {
        use hcp_domain::lifecycle::VolumeDrift;
        on_pool!(transaction self, |tx| {
            let (vm, index, error) = match drift {
                VolumeDrift::Missing => (seen.attachment.map(|a| a.vm_id), seen.attachment.map(|a| a.device_index), Some(hcp_proto::error::ErrorCode::NotFound)),
                VolumeDrift::Detached => (None, None, None),
                VolumeDrift::Attached(vm, slot) => {
                    let ours: Option<i64> = sqlx::query_scalar(sql!(
                        "SELECT 1 FROM vms WHERE id = $1 AND tenant_id = $2 AND project_id = $3 \
                         AND status <> {vm_deleted} AND NOT EXISTS (SELECT 1 FROM volumes \
                         WHERE vm_id = $1 AND device_index = $4 AND id <> $5)",
                        vm_deleted = hcp_domain::model::VmStatus::Deleted
                    ))
                    .bind(vm.0)
                    .bind(&seen.tenant_id)
                    .bind(&seen.project_id)
                    .bind(to_i32(slot))
                    .bind(seen.id.0)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                    if ours.is_none() {
                        return Ok(false);
                    }
                    (Some(vm), Some(slot), None)
                }
            };
            let done = sqlx::query(
                "UPDATE volumes SET status = $1, vm_id = $2, device_index = $3, error_code = $4, \
                 error_message = $5, updated_at = $6 \
                 WHERE id = $7 AND status = $8 AND current_job_id IS NULL AND updated_at = $9",
            )
            .bind(drift.status().as_str())
            .bind(vm.map(|v| v.0))
            .bind(index.map(to_i32))
            .bind(error.map(|c| c.as_str()))
            .bind(error.map(|_| "the volume is gone from its hypervisor"))
            .bind(audit.at)
            .bind(seen.id.0)
            .bind(seen.status.as_str())
            .bind(seen.updated_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "volume"))?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(true)
        })
    }
}
