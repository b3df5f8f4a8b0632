//! VMs: accepting a create or an operation together with its job and audit
//! event in one transaction, and tenant-scoped reads with keyset pagination.

use std::collections::BTreeMap;

use hcp_proto::ids::{ProviderId, VmId};
use sqlx::types::Json;

use super::guards::{check_quota, insert_idempotency};
use super::outbox::{SUBJECT_JOBS, insert_outbox};
use super::{IdempotencyRecord, StoreError, StoreResult, col, on_pool, to_i32};
use super::{Quoted, sql};
use hcp_proto::ids::SnapshotId;

use hcp_domain::lifecycle::{Refusal, Size, SnapshotRefusal};
use hcp_domain::model::{
    AuditEvent, Job, JobKind, NetworkAttachment, Scope, Snapshot, SnapshotStatus, Vm, VmStatus,
};

/// A VM to insert (status PENDING, with its create job).
pub type NewVm = Vm;

/// Filters and page position for [`super::Store::list_vms`].
#[derive(Debug, Clone, Default)]
pub struct ListVmsQuery {
    /// At most this many rows (1..=1000).
    pub page_size: u32,
    /// The last id of the previous page (keyset pagination).
    pub after: Option<uuid::Uuid>,
    /// Only this status; DELETED VMs are listed only when asked for.
    pub status: Option<VmStatus>,
    /// Only VMs carrying all of these tags.
    pub tags: Vec<String>,
}

/// What [`super::Store::accept_operation`] needs besides the job.
#[derive(Debug, Clone)]
pub struct AcceptOperation {
    /// Where the caller operates.
    pub scope: Scope,
    /// VM operated on.
    pub vm_id: VmId,
    /// Operation.
    pub kind: JobKind,
    /// Accept only if the VM is in this status (a decision was made on it).
    pub require_status: Option<VmStatus>,
    /// The snapshot change a snapshot operation makes.
    pub snapshot: Option<SnapshotAccept>,
    /// The private image a capture makes: inserted IMPORTING, held by the
    /// job, counted against the project's image quota (at its `size_bytes`
    /// as given: the VM's disk, the most a capture stores).
    pub image: Option<hcp_domain::model::Image>,
    /// The size a resize gives the VM: applied now, so the quota (checked
    /// for the difference) holds it while the job runs.
    pub resize: Option<Size>,
    /// The host a move (a migration, a recovery elsewhere) gives the VM:
    /// applied now, so placement counts the VM there while the job runs.
    pub host_change: Option<HostChange>,
    /// The room of the VM's host, checked under the host's lock when a
    /// resize grows the VM.
    pub capacity: Option<super::CapacityGuard>,
}

/// What a move does to the VM's host at accept time.
#[derive(Debug, Clone)]
pub struct HostChange {
    /// The host it moves to; `None` for a recovery where it is.
    pub to: Option<String>,
    /// The room of `to`, checked under its lock.
    pub capacity: Option<super::CapacityGuard>,
    /// A live move (migrations only).
    pub live: bool,
    /// The strict group rule the target must keep.
    pub group: Option<super::GroupGuard>,
}

/// The tenant-owned fields [`super::Store::update_vm`] sets; `None` keeps
/// a field.
#[derive(Debug, Clone, Default)]
pub struct VmUpdate {
    /// New name.
    pub name: Option<String>,
    /// New metadata, replacing the old.
    pub metadata: Option<BTreeMap<String, String>>,
    /// New tags (sorted, without duplicates), replacing the old.
    pub tags: Option<Vec<String>>,
}

/// What a snapshot operation does to its snapshot at accept time.
#[derive(Debug, Clone)]
pub enum SnapshotAccept {
    /// Insert it as CREATING.
    Create(Snapshot),
    /// It must be AVAILABLE.
    Revert(SnapshotId),
    /// It must be AVAILABLE or ERROR; it becomes REMOVING.
    Delete(SnapshotId),
}

pub(crate) const VM_COLUMNS: &str = "id, tenant_id, project_id, name, flavor, vcpus, memory_mib, disk_gib, \
     image, image_source, zone, provider_id, networks, metadata, tags, user_data, hostname, \
     status, current_job_id, error_code, error_message, created_at, updated_at, host, \
     restart_policy, placement_group_id, ssh_keys";

macro_rules! vm_from_row {
    ($row:expr) => {{
        let row = $row;
        let status: String = col!(row, "status");
        let networks: Json<Vec<hcp_domain::model::NetworkAttachment>> = col!(row, "networks");
        let metadata: Json<BTreeMap<String, String>> = col!(row, "metadata");
        let tags: Json<Vec<String>> = col!(row, "tags");
        let ssh_keys: Json<Vec<hcp_domain::model::VmKey>> = col!(row, "ssh_keys");
        let current_job_id: Option<uuid::Uuid> = col!(row, "current_job_id");
        let provider_id: uuid::Uuid = col!(row, "provider_id");
        let id: uuid::Uuid = col!(row, "id");
        hcp_domain::model::Vm {
            id: hcp_proto::ids::VmId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            name: col!(row, "name"),
            flavor: col!(row, "flavor"),
            vcpus: super::to_u32(col!(row, "vcpus"), "vcpus")?,
            memory_mib: super::to_u32(col!(row, "memory_mib"), "memory_mib")?,
            disk_gib: super::to_u32(col!(row, "disk_gib"), "disk_gib")?,
            image: col!(row, "image"),
            image_source: col!(row, "image_source"),
            zone: col!(row, "zone"),
            provider_id: hcp_proto::ids::ProviderId(provider_id),
            host: col!(row, "host"),
            restart_policy: {
                let p: String = col!(row, "restart_policy");
                hcp_domain::model::RestartPolicy::parse(&p)
                    .ok_or_else(|| StoreError::Corrupt(format!("restart policy {p:?}")))?
            },
            placement_group_id: {
                let g: Option<uuid::Uuid> = col!(row, "placement_group_id");
                g.map(hcp_proto::ids::PlacementGroupId)
            },
            networks: networks.0,
            metadata: metadata.0,
            tags: tags.0,
            user_data: col!(row, "user_data"),
            ssh_keys: ssh_keys.0,
            hostname: col!(row, "hostname"),
            status: hcp_domain::model::VmStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("vm status {status:?}")))?,
            current_job_id: current_job_id.map(hcp_proto::ids::JobId),
            error_code: {
                let c: Option<String> = col!(row, "error_code");
                c.map(|c| {
                    hcp_proto::error::ErrorCode::from_name(&c)
                        .unwrap_or(hcp_proto::error::ErrorCode::Internal)
                })
            },
            error_message: col!(row, "error_message"),
            created_at: col!(row, "created_at"),
            updated_at: col!(row, "updated_at"),
        }
    }};
}
pub(crate) use vm_from_row;

impl super::Store {
    /// Inserts a new VM with its create job and the audit event of the
    /// request, atomically: either all three exist or none.
    ///
    /// With `idem`, the idempotency key is recorded first (a concurrent
    /// request holding the key fails this one with IdempotencyRace), then the
    /// project's quota is checked (QuotaExceeded), all in the same
    /// transaction as the inserts. With `capacity`, the host's room is
    /// checked under its lock (NoRoom when the VM no longer fits). With
    /// `group`, the strict placement group's rule is checked against where
    /// its members are now (Conflict when the VM's host breaks it).
    // Each argument is one thing the accepting transaction checks or
    // writes; a struct of them would only move the list.
    #[allow(clippy::too_many_arguments)]
    pub async fn accept_create(
        &self,
        vm: &NewVm,
        job: &Job,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
        capacity: Option<&super::CapacityGuard>,
        group: Option<&super::GroupGuard>,
        volumes: &super::CreateVolumes,
    ) -> StoreResult<()> {
        let kind = self.kind();
        let outbox = self.outbox;
        if let (super::Backend::Postgres(pool), None, true) = (&self.backend, group, volumes.is_empty())
            && accept_create_in_one(pool, vm, job, audit, idem, capacity, outbox).await?
        {
            return Ok(());
        }
        on_pool!(transaction self, |tx| {
            if let Some(rec) = idem {
                insert_idempotency!(tx, rec);
            }
            check_quota!(tx, kind, &vm.tenant_id, &vm.project_id, 1, to_i32(vm.vcpus), to_i32(vm.memory_mib));
            if let Some(guard) = capacity {
                super::hosts::check_room!(tx, kind, guard, u64::from(vm.vcpus), u64::from(vm.memory_mib));
            }
            if let Some(guard) = group {
                super::hosts::check_group!(tx, guard, vm.id, vm.provider_id, &vm.host);
            }
            sqlx::query(
                "INSERT INTO vms (id, tenant_id, project_id, name, flavor, vcpus, memory_mib, \
                 disk_gib, image, image_source, zone, provider_id, networks, metadata, tags, \
                 user_data, hostname, status, current_job_id, error_code, error_message, \
                 created_at, updated_at, host, restart_policy, placement_group_id, ssh_keys) VALUES ($1, \
                 $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, NULL, \
                 NULL, $20, $21, $22, $23, $24, $25)",
            )
            .bind(vm.id.0)
            .bind(&vm.tenant_id)
            .bind(&vm.project_id)
            .bind(&vm.name)
            .bind(&vm.flavor)
            .bind(to_i32(vm.vcpus))
            .bind(to_i32(vm.memory_mib))
            .bind(to_i32(vm.disk_gib))
            .bind(&vm.image)
            .bind(&vm.image_source)
            .bind(&vm.zone)
            .bind(vm.provider_id.0)
            .bind(Json(&vm.networks))
            .bind(Json(&vm.metadata))
            .bind(Json(&vm.tags))
            .bind(&vm.user_data)
            .bind(&vm.hostname)
            .bind(vm.status.as_str())
            .bind(vm.current_job_id.map(|j| j.0))
            .bind(vm.created_at)
            .bind(vm.updated_at)
            .bind(&vm.host)
            .bind(vm.restart_policy.as_str())
            .bind(vm.placement_group_id.map(|g| g.0))
            .bind(Json(&vm.ssh_keys))
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            for tag in &vm.tags {
                sqlx::query("INSERT INTO vm_tags (vm_id, tag) VALUES ($1, $2)")
                    .bind(vm.id.0)
                    .bind(tag)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm tag"))?;
            }
            super::volumes::hold_create_volumes!(tx, kind, vm, job, volumes);
            super::jobs::insert_job!(&mut *tx, job);
            if outbox {
                insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Moves a VM into the transitional state of `op.kind` and inserts the
    /// job and audit event, atomically. Fails with NotFound when the VM is
    /// not in the tenant's project, and with Conflict when its state does
    /// not allow the operation or another job is operating on it.
    pub async fn accept_operation(
        &self,
        op: &AcceptOperation,
        job: &Job,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<Vm> {
        let outbox = self.outbox;
        let backend = self.kind();
        on_pool!(transaction self, |tx| {
            if let Some(rec) = idem {
                insert_idempotency!(tx, rec);
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
            )))
            .bind(op.vm_id.0)
            .bind(&op.scope.tenant)
            .bind(&op.scope.project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?
            .ok_or(StoreError::NotFound)?;
            let mut vm = vm_from_row!(&row);
            if op.require_status.is_some_and(|s| s != vm.status) && vm.current_job_id.is_none() {
                return Err(StoreError::Conflict(format!("vm {} changed state concurrently; retry", vm.id)));
            }
            let next = match hcp_domain::lifecycle::accept(op.kind, vm.status, vm.current_job_id) {
                Ok(next) => next,
                Err(Refusal::Busy(job)) => {
                    return Err(StoreError::Busy {
                        job,
                        message: format!("vm {} is {}: job {job} is operating on it", vm.id, vm.status),
                    });
                }
                Err(Refusal::WrongState { allowed }) => {
                    let wanted: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
                    return Err(StoreError::Conflict(format!(
                        "vm {} is {}; {} needs it to be {}",
                        vm.id,
                        vm.status,
                        op.kind,
                        wanted.join(" or ")
                    )));
                }
            };
            let mut job = job.clone();
            job.prior_status = Some(vm.status);
            if let Some(to) = &op.resize {
                let from = Size {
                    flavor: vm.flavor.clone(),
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                    disk_gib: vm.disk_gib,
                };
                if to.disk_gib < from.disk_gib {
                    return Err(StoreError::Conflict(format!(
                        "flavor {} has a {} GiB disk; vm {} has {} GiB and disks only grow",
                        to.flavor, to.disk_gib, vm.id, from.disk_gib
                    )));
                }
                let dv = i64::from(to.vcpus) - i64::from(from.vcpus);
                let dm = i64::from(to.memory_mib) - i64::from(from.memory_mib);
                check_quota!(tx, backend, &op.scope.tenant, &op.scope.project, 0, dv, dm);
                if let Some(guard) = op.capacity.as_ref().filter(|_| dv > 0 || dm > 0) {
                    let grow = |d: i64| u64::try_from(d).unwrap_or(0);
                    super::hosts::check_room!(tx, backend, guard, grow(dv), grow(dm));
                }
                sqlx::query(
                    "UPDATE vms SET flavor = $1, vcpus = $2, memory_mib = $3, disk_gib = $4 WHERE id = $5",
                )
                .bind(&to.flavor)
                .bind(to_i32(to.vcpus))
                .bind(to_i32(to.memory_mib))
                .bind(to_i32(to.disk_gib))
                .bind(vm.id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                job.params = hcp_domain::lifecycle::JobParams::Resize { from, to: to.clone() };
                vm.flavor = to.flavor.clone();
                vm.vcpus = to.vcpus;
                vm.memory_mib = to.memory_mib;
                vm.disk_gib = to.disk_gib;
            }
            if let Some(change) = &op.host_change {
                let from = vm.host.clone();
                if let Some(to) = &change.to {
                    if let Some(guard) = &change.capacity {
                        super::hosts::check_room!(
                            tx,
                            backend,
                            guard,
                            u64::from(vm.vcpus),
                            u64::from(vm.memory_mib)
                        );
                    }
                    if let Some(guard) = &change.group {
                        super::hosts::check_group!(tx, guard, vm.id, vm.provider_id, to);
                    }
                    sqlx::query("UPDATE vms SET host = $1 WHERE id = $2")
                        .bind(to)
                        .bind(vm.id.0)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
                    vm.host = to.clone();
                }
                job.params = match op.kind {
                    JobKind::MigrateVm => hcp_domain::lifecycle::JobParams::Migrate {
                        from,
                        to: change.to.clone().unwrap_or_default(),
                        live: change.live,
                    },
                    _ => hcp_domain::lifecycle::JobParams::Recover { from, to: change.to.clone() },
                };
            }
            let job = &job;
            // Compare-and-set on the state just read: a concurrent accept
            // that won the race makes this update match no row.
            let done = sqlx::query(
                "UPDATE vms SET status = $1, current_job_id = $2, updated_at = $3 \
                 WHERE id = $4 AND status = $5 AND current_job_id IS NULL",
            )
            .bind(next.as_str())
            .bind(job.id.0)
            .bind(job.created_at)
            .bind(vm.id.0)
            .bind(vm.status.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!("vm {} changed state concurrently; retry", vm.id)));
            }
            match &op.snapshot {
                None => {}
                Some(SnapshotAccept::Create(snap)) => {
                    sqlx::query(
                        sql!("INSERT INTO snapshots (id, vm_id, tenant_id, project_id, name, status, created_at, \
                         updated_at) VALUES ($1, $2, $3, $4, $5, {snap_creating}, $6, $6)", snap_creating = SnapshotStatus::Creating),
                    )
                    .bind(snap.id.0)
                    .bind(vm.id.0)
                    .bind(&op.scope.tenant)
                    .bind(&op.scope.project)
                    .bind(&snap.name)
                    .bind(snap.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?;
                }
                Some(SnapshotAccept::Revert(id) | SnapshotAccept::Delete(id)) => {
                    let status: Option<String> =
                        sqlx::query_scalar("SELECT status FROM snapshots WHERE id = $1 AND vm_id = $2")
                            .bind(id.0)
                            .bind(vm.id.0)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?;
                    let status = status.ok_or(StoreError::NotFound)?;
                    let status = SnapshotStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("snapshot status {status:?}")))?;
                    let taken = hcp_domain::lifecycle::accept_snapshot(job.kind, status).map_err(|r| match r {
                        SnapshotRefusal::Gone => StoreError::NotFound,
                        SnapshotRefusal::WrongState(status) => {
                            StoreError::Conflict(format!("snapshot {id} is {status}"))
                        }
                    })?;
                    if let Some(taken) = taken {
                        sqlx::query("UPDATE snapshots SET status = $2, updated_at = $1 WHERE id = $3")
                            .bind(job.created_at)
                            .bind(taken.as_str())
                            .bind(id.0)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?;
                    }
                }
            }
            if let Some(image) = &op.image {
                super::images::check_image_quota!(tx, backend, &op.scope, image.quota_gib());
                let mut image = image.clone();
                image.job_id = Some(job.id);
                super::images::insert_image!(tx, &image);
            }
            super::jobs::insert_job!(&mut *tx, job);
            if outbox {
                insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            vm.status = next;
            vm.current_job_id = Some(job.id);
            vm.updated_at = job.created_at;
            Ok(vm)
        })
    }

    /// Returns a VM if it belongs to the scope's project.
    pub async fn get_vm(&self, scope: &Scope, id: VmId) -> StoreResult<Vm> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
            )))
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?
            .ok_or(StoreError::NotFound)?;
            Ok(vm_from_row!(&row))
        })
    }

    /// Returns a VM of the tenant by its id alone (any project; the caller
    /// checks the project against the token's grants).
    pub async fn get_vm_of_tenant(&self, tenant_id: &str, id: VmId) -> StoreResult<Vm> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND tenant_id = $2"
            )))
            .bind(id.0)
            .bind(tenant_id)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?
            .ok_or(StoreError::NotFound)?;
            Ok(vm_from_row!(&row))
        })
    }

    /// Sets a VM's tenant-owned fields (no job: nothing on the hypervisor
    /// changes) with the audit event; returns the VM as it is now. NotFound
    /// outside the scope; Conflict for a deleted VM.
    pub async fn update_vm(
        &self,
        scope: &Scope,
        id: VmId,
        update: &VmUpdate,
        audit: &AuditEvent,
    ) -> StoreResult<Vm> {
        let now = audit.at;
        on_pool!(transaction self, |tx| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND tenant_id = $2 AND project_id = $3"
            )))
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?
            .ok_or(StoreError::NotFound)?;
            let mut vm = vm_from_row!(&row);
            if vm.status == VmStatus::Deleted {
                return Err(StoreError::Conflict(format!("vm {id} is DELETED")));
            }
            if let Some(name) = &update.name {
                vm.name = name.clone();
            }
            if let Some(metadata) = &update.metadata {
                vm.metadata = metadata.clone();
            }
            if let Some(tags) = &update.tags {
                vm.tags = tags.clone();
                sqlx::query("DELETE FROM vm_tags WHERE vm_id = $1")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm tag"))?;
                for tag in tags {
                    sqlx::query("INSERT INTO vm_tags (vm_id, tag) VALUES ($1, $2)")
                        .bind(id.0)
                        .bind(tag)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| StoreError::from_sqlx(e, "vm tag"))?;
                }
            }
            vm.updated_at = now;
            sqlx::query("UPDATE vms SET name = $1, metadata = $2, tags = $3, updated_at = $4 WHERE id = $5")
                .bind(&vm.name)
                .bind(Json(&vm.metadata))
                .bind(Json(&vm.tags))
                .bind(now)
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(vm)
        })
    }

    /// Records the addresses a provider reported for a VM no job holds
    /// (the reconciler's refresh). Returns false when a job took the VM
    /// meanwhile (the job refreshes them itself when it ends).
    pub async fn set_vm_networks(&self, id: VmId, networks: &[NetworkAttachment]) -> StoreResult<bool> {
        on_pool!(self, |pool| {
            let done = sqlx::query(
                sql!("UPDATE vms SET networks = $1 WHERE id = $2 AND current_job_id IS NULL AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted),
            )
            .bind(Json(networks))
            .bind(id.0)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Records the host a provider reports for a VM no job holds (a move
    /// HCP did not make). Returns false when a job took the VM meanwhile.
    pub async fn set_vm_host(&self, id: VmId, host: &str) -> StoreResult<bool> {
        on_pool!(self, |pool| {
            let done = sqlx::query(
                sql!("UPDATE vms SET host = $1 WHERE id = $2 AND current_job_id IS NULL AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted),
            )
            .bind(host)
            .bind(id.0)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Records the hosts of VMs whose host HCP did not know (empty), in bulk:
    /// one statement per 10,000 on PostgreSQL, one transaction on SQLite.
    /// A VM a job holds, or that got a host meanwhile, is left alone.
    /// Returns how many were recorded.
    pub async fn set_first_hosts(&self, hosts: &[(VmId, String)]) -> StoreResult<u64> {
        let mut done = 0;
        match &self.backend {
            super::Backend::Postgres(pool) => {
                for chunk in hosts.chunks(10_000) {
                    let ids: Vec<uuid::Uuid> = chunk.iter().map(|(id, _)| id.0).collect();
                    let names: Vec<&str> = chunk.iter().map(|(_, h)| h.as_str()).collect();
                    done += sqlx::query(sql!(
                        "UPDATE vms SET host = r.host FROM unnest($1::uuid[], $2::text[]) AS r(id, host) \
                         WHERE vms.id = r.id AND vms.host = '' AND vms.current_job_id IS NULL \
                         AND vms.status <> {vm_deleted}",
                        vm_deleted = VmStatus::Deleted
                    ))
                    .bind(&ids)
                    .bind(&names)
                    .execute(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                    .rows_affected();
                }
            }
            super::Backend::Sqlite(pool) => {
                // SQLite has one connection: no conflict to run again for.
                let mut tx = crate::begin(pool).await?;
                for (id, host) in hosts {
                    done += sqlx::query(sql!(
                        "UPDATE vms SET host = $1 WHERE id = $2 AND host = '' AND current_job_id IS NULL \
                         AND status <> {vm_deleted}",
                        vm_deleted = VmStatus::Deleted
                    ))
                    .bind(host)
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                    .rows_affected();
                }
                tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            }
        }
        Ok(done)
    }

    /// The VMs on a host that are not deleted, oldest first.
    pub async fn vms_on_host(&self, provider: ProviderId, host: &str) -> StoreResult<Vec<Vm>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE provider_id = $1 AND host = $2 \
                 AND status <> {vm_deleted} ORDER BY id",
                vm_deleted = Quoted(VmStatus::Deleted.as_str())
            )))
            .bind(provider.0)
            .bind(host)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(vm_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Returns a VM by id alone, for HCP's own use (jobs, reconciler).
    pub async fn get_vm_internal(&self, id: VmId) -> StoreResult<Vm> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1")))
                .bind(id.0)
                .fetch_optional(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "vm"))?
                .ok_or(StoreError::NotFound)?;
            Ok(vm_from_row!(&row))
        })
    }

    /// Lists a project's VMs in id (creation) order, one page at a time.
    /// Returns the page and, when another follows, the last id of this one.
    pub async fn list_vms(
        &self,
        scope: &Scope,
        query: &ListVmsQuery,
    ) -> StoreResult<(Vec<Vm>, Option<uuid::Uuid>)> {
        let after = query.after;
        let limit = i64::from(query.page_size.clamp(1, 1000));
        let mut sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE tenant_id = $1 AND project_id = $2");
        let mut n = 2;
        let mut next_param = || {
            n += 1;
            n
        };
        if after.is_some() {
            sql.push_str(&format!(" AND id > ${}", next_param()));
        }
        match query.status {
            Some(_) => sql.push_str(&format!(" AND status = ${}", next_param())),
            None => sql.push_str(&format!(
                " AND status <> {vm_deleted}",
                vm_deleted = Quoted(VmStatus::Deleted.as_str())
            )),
        }
        for _ in &query.tags {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM vm_tags t WHERE t.vm_id = vms.id AND t.tag = ${})",
                next_param()
            ));
        }
        // One row more than asked tells whether another page follows.
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", next_param()));
        let mut vms = on_pool!(self, |pool| {
            let mut q =
                sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&scope.tenant).bind(&scope.project);
            if let Some(after) = after {
                q = q.bind(after);
            }
            if let Some(status) = query.status {
                q = q.bind(status.as_str());
            }
            for tag in &query.tags {
                q = q.bind(tag);
            }
            let rows =
                q.bind(limit + 1).fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(vm_from_row!(row));
            }
            out
        });
        let next = if vms.len() as i64 > limit {
            vms.truncate(limit as usize);
            vms.last().map(|vm| vm.id.0)
        } else {
            None
        };
        Ok((vms, next))
    }

    /// Counts VMs placed on each provider that are not deleted, for placement.
    pub async fn count_live_vms_by_provider(&self) -> StoreResult<Vec<(ProviderId, i64)>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sql!(
                "SELECT provider_id, COUNT(*) AS n FROM vms WHERE status <> {vm_deleted} \
                 GROUP BY provider_id",
                vm_deleted = VmStatus::Deleted
            ))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: uuid::Uuid = col!(row, "provider_id");
                let n: i64 = col!(row, "n");
                out.push((ProviderId(id), n));
            }
            Ok(out)
        })
    }
}

impl super::Store {
    /// Lists a VM's snapshots (not removed) if the VM is in the tenant's project.
    pub async fn list_snapshots(&self, scope: &Scope, vm: VmId) -> StoreResult<Vec<Snapshot>> {
        self.get_vm(scope, vm).await?;
        on_pool!(self, |pool| {
            let rows = sqlx::query(sql!(
                "SELECT id, vm_id, name, status, created_at, updated_at FROM snapshots \
                 WHERE vm_id = $1 AND status <> {snap_removed} ORDER BY id",
                snap_removed = SnapshotStatus::Removed
            ))
            .bind(vm.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "snapshots"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(snapshot_from_row(row)?);
            }
            Ok(out)
        })
    }

    /// Returns a snapshot by id, for HCP's own use.
    pub async fn get_snapshot_internal(&self, id: SnapshotId) -> StoreResult<Snapshot> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT id, vm_id, name, status, created_at, updated_at FROM snapshots WHERE id = $1",
            )
            .bind(id.0)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "snapshot"))?
            .ok_or(StoreError::NotFound)?;
            snapshot_from_row(&row)
        })
    }
}

fn snapshot_from_row<R: sqlx::Row>(row: &R) -> StoreResult<Snapshot>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    uuid::Uuid: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
    String: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
    chrono::DateTime<chrono::Utc>: sqlx::Type<R::Database> + for<'r> sqlx::Decode<'r, R::Database>,
{
    let id: uuid::Uuid = col!(row, "id");
    let vm: uuid::Uuid = col!(row, "vm_id");
    let status: String = col!(row, "status");
    Ok(Snapshot {
        id: SnapshotId(id),
        vm_id: VmId(vm),
        name: col!(row, "name"),
        status: SnapshotStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot status {status:?}")))?,
        created_at: col!(row, "created_at"),
        updated_at: col!(row, "updated_at"),
    })
}

/// [`super::Store::accept_create`] on PostgreSQL in one statement, one round
/// trip, for the common case: a project without a quota row and a VM in no
/// strict placement group. A single statement is atomic without a
/// transaction around it. The idempotency key goes first and everything
/// else hangs off its insert: a live key inserts nothing (IdempotencyRace,
/// as in the transaction). Returns false, having written nothing, when the
/// project has a quota: a quota is checked under its row's lock and a fresh
/// count, which takes the transaction (a statement sees one snapshot).
///
/// The host's room is checked here too: `room` locks the host's row, and a
/// row locked after a concurrent accept changed it is read again at its
/// newest version with the condition evaluated again (PostgreSQL's
/// EvalPlanQual under READ COMMITTED), so the counts compared are those of
/// every accept committed before; the VM's insert then moves them through
/// the trigger of migration 0014, under the same lock.
async fn accept_create_in_one(
    pool: &sqlx::PgPool,
    vm: &NewVm,
    job: &Job,
    audit: &AuditEvent,
    idem: Option<&IdempotencyRecord>,
    capacity: Option<&super::CapacityGuard>,
    outbox: bool,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "WITH quota AS (SELECT 1 FROM project_quotas WHERE tenant_id = $2 AND project_id = $3), \
         room AS (SELECT 1 FROM hosts WHERE $65 AND provider_id = $12 AND name = $22 \
             AND placed_vcpus + $6 <= $66 AND placed_memory_mib + $7 <= $67 FOR UPDATE), \
         roomy AS (SELECT NOT $65 OR EXISTS (SELECT 1 FROM room) AS yes), \
         gate AS (SELECT 1 AS go FROM roomy WHERE roomy.yes AND NOT EXISTS (SELECT 1 FROM quota)), \
         idem AS (INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at, expires_at) \
             SELECT $63, $46, $47, $48, $64, $49 FROM gate WHERE $45 \
             ON CONFLICT (tenant_id, key) DO UPDATE SET request_hash = excluded.request_hash, \
             response = excluded.response, created_at = excluded.created_at, expires_at = excluded.expires_at \
             WHERE idempotency_keys.expires_at <= excluded.created_at RETURNING 1 AS go), \
         ok AS (SELECT 1 AS go FROM gate WHERE NOT $45 OR EXISTS (SELECT 1 FROM idem)), \
         vm AS (INSERT INTO vms (id, tenant_id, project_id, name, flavor, vcpus, memory_mib, disk_gib, image, \
             image_source, zone, provider_id, networks, metadata, tags, user_data, hostname, status, \
             current_job_id, error_code, error_message, created_at, updated_at, host, restart_policy, \
             placement_group_id, ssh_keys) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $54, \
             NULL, NULL, $20, $21, $22, $23, $24, $68 FROM ok RETURNING id), \
         tags AS (INSERT INTO vm_tags (vm_id, tag) SELECT vm.id, t FROM vm, unnest($25::text[]) AS t), \
         job AS (INSERT INTO jobs (id, tenant_id, project_id, kind, vm_id, status, attempts, max_attempts, \
             run_after, lease_owner, lease_expires_at, error_code, error_message, actor, traceparent, \
             created_at, started_at, finished_at, updated_at, prior_status, snapshot_id, params, request_id) \
             SELECT $19, $55, $56, $26, $57, $27, $28, $29, $30, NULL, NULL, NULL, NULL, $31, $32, $33, NULL, \
             NULL, $34, $35, $58, $36, $37 FROM vm RETURNING id), \
         sent AS (INSERT INTO outbox (subject, payload, created_at, published_at) \
             SELECT $50, $51, $33, NULL FROM job WHERE $52), \
         audited AS (INSERT INTO audit_events (id, at, actor, tenant_id, project_id, action, resource_type, \
             resource_id, outcome, job_id, trace_id, detail) \
             SELECT $38, $39, $40, $59, $60, $41, $61, $62, $42, $43, $44, $53 FROM job) \
         SELECT EXISTS (SELECT 1 FROM quota) AS quota, EXISTS (SELECT 1 FROM vm) AS created, \
         (SELECT yes FROM roomy) AS roomy",
    )
    .bind(vm.id.0) // $1
    .bind(&vm.tenant_id)
    .bind(&vm.project_id)
    .bind(&vm.name)
    .bind(&vm.flavor) // $5
    .bind(to_i32(vm.vcpus))
    .bind(to_i32(vm.memory_mib))
    .bind(to_i32(vm.disk_gib))
    .bind(&vm.image)
    .bind(&vm.image_source) // $10
    .bind(&vm.zone)
    .bind(vm.provider_id.0)
    .bind(Json(&vm.networks))
    .bind(Json(&vm.metadata))
    .bind(Json(&vm.tags)) // $15
    .bind(&vm.user_data)
    .bind(&vm.hostname)
    .bind(vm.status.as_str())
    .bind(job.id.0)
    .bind(vm.created_at) // $20
    .bind(vm.updated_at)
    .bind(&vm.host)
    .bind(vm.restart_policy.as_str())
    .bind(vm.placement_group_id.map(|g| g.0))
    .bind(&vm.tags) // $25
    .bind(job.kind.as_str())
    .bind(job.status.as_str())
    .bind(job.attempts as i32)
    .bind(job.max_attempts as i32)
    .bind(job.run_after) // $30
    .bind(&job.actor)
    .bind(&job.traceparent)
    .bind(job.created_at)
    .bind(job.updated_at)
    .bind(job.prior_status.map(|s| s.as_str())) // $35
    .bind(Json(&job.params))
    .bind(&job.request_id)
    .bind(audit.id.0)
    .bind(audit.at)
    .bind(&audit.actor) // $40
    .bind(&audit.action)
    .bind(&audit.outcome)
    .bind(&audit.job_id)
    .bind(&audit.trace_id)
    .bind(idem.is_some()) // $45
    .bind(idem.map(|r| r.key.as_str()))
    .bind(idem.map(|r| r.request_hash.as_str()))
    .bind(idem.map(|r| r.response.as_str()))
    .bind(idem.map(|r| r.expires_at))
    .bind(SUBJECT_JOBS) // $50
    .bind(job.id.to_string())
    .bind(outbox)
    .bind(&audit.detail)
    .bind(vm.current_job_id.map(|j| j.0))
    .bind(&job.tenant_id) // $55
    .bind(&job.project_id)
    .bind(job.vm_id.map(|v| v.0))
    .bind(job.snapshot_id.map(|s| s.0))
    .bind(&audit.tenant_id)
    .bind(&audit.project_id) // $60
    .bind(&audit.resource_type)
    .bind(&audit.resource_id)
    .bind(idem.map(|r| r.tenant_id.as_str()))
    .bind(idem.map(|r| r.created_at))
    .bind(capacity.is_some()) // $65
    .bind(capacity.map(|c| i64::try_from(c.room.vcpus).unwrap_or(i64::MAX)))
    .bind(capacity.map(|c| i64::try_from(c.room.memory_mib).unwrap_or(i64::MAX)))
    .bind(Json(&vm.ssh_keys)) // $68
    .fetch_one(pool)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "vm"))?;
    let quota: bool = col!(&row, "quota");
    let created: bool = col!(&row, "created");
    let roomy: bool = col!(&row, "roomy");
    match (quota, roomy, created) {
        (true, _, _) => Ok(false),
        (false, false, _) => Err(StoreError::NoRoom(format!(
            "host {} has no room left for {} vCPUs and {} MiB",
            vm.host, vm.vcpus, vm.memory_mib
        ))),
        (false, true, true) => Ok(true),
        (false, true, false) => Err(StoreError::IdempotencyRace),
    }
}
