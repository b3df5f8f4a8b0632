//! Hosts and placement: the hosts each provider reports (with HCP's drain
//! state), what is placed on them, zones' placement settings and tenants'
//! placement groups.

use chrono::{DateTime, Utc};
use hcp_proto::ids::{PlacementGroupId, ProviderId, VmId};

use super::sql;
use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::{
    AuditEvent, Drain, GroupPolicy, Host, HostLoad, HostState, JobKind, JobStatus, PlacementGroup,
    PlacementPolicy, Scope, VmStatus, ZonePlacement,
};

/// A host as a provider reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// Name.
    pub name: String,
    /// Physical vCPUs.
    pub vcpus: u32,
    /// Physical memory.
    pub memory_mib: u64,
    /// State.
    pub state: HostState,
}

/// Where a member of a placement group is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The VM.
    pub vm_id: VmId,
    /// Its provider.
    pub provider_id: ProviderId,
    /// Its host.
    pub host: String,
}

/// A strict placement group's rule, checked inside the transaction that
/// places a VM (see [`check_group!`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGuard {
    /// The group.
    pub group_id: PlacementGroupId,
    /// Together or apart.
    pub policy: GroupPolicy,
}

macro_rules! host_from_row {
    ($row:expr) => {{
        let row = $row;
        let provider: uuid::Uuid = col!(row, "provider_id");
        let state: String = col!(row, "state");
        let drain: String = col!(row, "drain");
        let vcpus: i64 = col!(row, "vcpus");
        let memory: i64 = col!(row, "memory_mib");
        Host {
            provider_id: ProviderId(provider),
            name: col!(row, "name"),
            vcpus: u32::try_from(vcpus).map_err(|_| StoreError::Corrupt(format!("host vcpus {vcpus}")))?,
            memory_mib: u64::try_from(memory)
                .map_err(|_| StoreError::Corrupt(format!("host memory {memory}")))?,
            state: HostState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("host state {state:?}")))?,
            drain: Drain::parse(&drain)
                .ok_or_else(|| StoreError::Corrupt(format!("host drain {drain:?}")))?,
            drain_started_at: col!(row, "drain_started_at"),
            updated_at: col!(row, "updated_at"),
        }
    }};
}

macro_rules! group_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let policy: String = col!(row, "policy");
        PlacementGroup {
            id: PlacementGroupId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            name: col!(row, "name"),
            policy: GroupPolicy::parse(&policy)
                .ok_or_else(|| StoreError::Corrupt(format!("group policy {policy:?}")))?,
            strict: col!(row, "strict"),
            created_at: col!(row, "created_at"),
        }
    }};
}

/// Inside a transaction that puts `$vm` on (`$provider`, `$host`): locks
/// the strict group's row, so members are placed one at a time, then
/// refuses with [`StoreError::Conflict`] a host the group's rule forbids
/// given where the other members are now.
macro_rules! check_group {
    ($tx:expr, $guard:expr, $vm:expr, $provider:expr, $host:expr) => {{
        let guard: &$crate::GroupGuard = $guard;
        let vm: hcp_proto::ids::VmId = $vm;
        let provider: hcp_proto::ids::ProviderId = $provider;
        let host: &str = $host;
        let locked = sqlx::query("UPDATE placement_groups SET name = name WHERE id = $1")
            .bind(guard.group_id.0)
            .execute(&mut *$tx)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "placement group"))?;
        if locked.rows_affected() != 1 {
            return Err($crate::StoreError::Conflict(format!(
                "placement group {} was deleted",
                guard.group_id
            )));
        }
        let rows = sqlx::query(sql!(
            "SELECT provider_id, host FROM vms WHERE placement_group_id = $1 AND status <> {vm_deleted} \
             AND id <> $2",
            vm_deleted = VmStatus::Deleted
        ))
        .bind(guard.group_id.0)
        .bind(vm.0)
        .fetch_all(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "placement group"))?;
        for row in &rows {
            let p: uuid::Uuid = $crate::col!(row, "provider_id");
            let h: String = $crate::col!(row, "host");
            let same = p == provider.0 && h == host;
            match guard.policy {
                hcp_domain::model::GroupPolicy::AntiAffinity if same => {
                    return Err($crate::StoreError::Conflict(format!(
                        "placement group {} (strict anti-affinity) already has a member on that host",
                        guard.group_id
                    )));
                }
                hcp_domain::model::GroupPolicy::Affinity if !same => {
                    return Err($crate::StoreError::Conflict(format!(
                        "placement group {} (strict affinity) has its members on another host",
                        guard.group_id
                    )));
                }
                _ => {}
            }
        }
    }};
}
pub(crate) use check_group;

/// The room of the host a VM is put on or grows on, which the accepting
/// transaction checks under the host's lock (see [`check_room!`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityGuard {
    /// The host's provider.
    pub provider_id: ProviderId,
    /// The host.
    pub host: String,
    /// What it may hold in all.
    pub room: hcp_domain::model::Room,
}

/// Inside a transaction that adds `$vcpus` and `$memory` (MiB) to the
/// guard's host: locks the host's row, which orders every accept onto the
/// host, and refuses with [`StoreError::NoRoom`] when what is placed there
/// (the row's counts, kept by the triggers of migration 0014 and read
/// after the lock, so committed accepts are all counted) leaves too little.
/// A host no longer known has no room.
macro_rules! check_room {
    ($tx:expr, $kind:expr, $guard:expr, $vcpus:expr, $memory:expr) => {{
        let guard: &$crate::CapacityGuard = $guard;
        let (vcpus, memory): (u64, u64) = ($vcpus, $memory);
        let lock = match $kind {
            $crate::BackendKind::Postgres => " FOR UPDATE",
            $crate::BackendKind::Sqlite => "",
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT placed_vcpus, placed_memory_mib FROM hosts WHERE provider_id = $1 AND name = $2{lock}"
        )))
        .bind(guard.provider_id.0)
        .bind(&guard.host)
        .fetch_optional(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "host"))?;
        let Some(row) = row else {
            return Err($crate::StoreError::NoRoom(format!("host {} is no longer known", guard.host)));
        };
        let placed_vcpus: i64 = $crate::col!(&row, "placed_vcpus");
        let placed_memory: i64 = $crate::col!(&row, "placed_memory_mib");
        let load = (u64::try_from(placed_vcpus).unwrap_or(0), u64::try_from(placed_memory).unwrap_or(0));
        if !guard.room.admits(load, vcpus, memory) {
            return Err($crate::StoreError::NoRoom(format!(
                "host {} holds {} of {} vCPUs and {} of {} MiB; {} vCPUs and {} MiB more do not fit",
                guard.host, load.0, guard.room.vcpus, load.1, guard.room.memory_mib, vcpus, memory
            )));
        }
    }};
}
pub(crate) use check_room;

/// A zone's placement settings from a row of `zones`.
macro_rules! zone_placement_from_row {
    ($row:expr) => {{
        let policy: String = col!($row, "placement_policy");
        ZonePlacement {
            zone: col!($row, "name"),
            policy: PlacementPolicy::parse(&policy)
                .ok_or_else(|| StoreError::Corrupt(format!("placement policy {policy:?}")))?,
            cpu_overcommit: col!($row, "cpu_overcommit"),
            memory_overcommit: col!($row, "memory_overcommit"),
        }
    }};
}

impl super::Store {
    /// Records what a provider reports: hosts are inserted or updated
    /// (keeping HCP's drain state); hosts it no longer reports become DOWN.
    pub async fn record_hosts(
        &self,
        provider: ProviderId,
        hosts: &[HostReport],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            for h in hosts {
                // A host seen for the first time starts with what is
                // already placed on it; afterwards the triggers of
                // migration 0014 keep the counts.
                sqlx::query(sql!(
                    "INSERT INTO hosts (provider_id, name, vcpus, memory_mib, state, drain, updated_at, \
                     placed_vms, placed_vcpus, placed_memory_mib) \
                     SELECT $1, $2, $3, $4, $5, '', $6, COUNT(*), COALESCE(SUM(vcpus), 0), \
                     COALESCE(SUM(memory_mib), 0) FROM vms \
                     WHERE provider_id = $1 AND host = $2 AND status <> {vm_deleted} \
                     ON CONFLICT (provider_id, name) DO UPDATE SET \
                     vcpus = excluded.vcpus, memory_mib = excluded.memory_mib, state = excluded.state, \
                     updated_at = excluded.updated_at",
                    vm_deleted = VmStatus::Deleted
                ))
                .bind(provider.0)
                .bind(&h.name)
                .bind(i64::from(h.vcpus))
                .bind(i64::try_from(h.memory_mib).unwrap_or(i64::MAX))
                .bind(h.state.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "host"))?;
            }
            // Hosts not in this report are gone from the provider's view.
            sqlx::query(
                sql!("UPDATE hosts SET state = {host_down}, updated_at = $2 WHERE provider_id = $1 \
                 AND updated_at < $2 AND state <> {host_down}", host_down = HostState::Down),
            )
            .bind(provider.0)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "host"))?;
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// Every host, of one provider or of all.
    pub async fn list_hosts(&self, provider: Option<ProviderId>) -> StoreResult<Vec<Host>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT provider_id, name, vcpus, memory_mib, state, drain, drain_started_at, updated_at \
                 FROM hosts WHERE ($1 IS NULL OR provider_id = $1) ORDER BY provider_id, name",
            )
            .bind(provider.map(|p| p.0))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "hosts"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(host_from_row!(row));
            }
            Ok(out)
        })
    }

    /// What HCP has placed on each host (VMs not deleted), keyed by
    /// provider and host.
    pub async fn host_loads(&self) -> StoreResult<Vec<((ProviderId, String), HostLoad)>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sql!(
                "SELECT provider_id, host, CAST(COUNT(*) AS BIGINT) AS n, \
                 CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
                 CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS memory_mib \
                 FROM vms WHERE status <> {vm_deleted} GROUP BY provider_id, host",
                vm_deleted = VmStatus::Deleted
            ))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "hosts"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let p: uuid::Uuid = col!(row, "provider_id");
                let n: i64 = col!(row, "n");
                let v: i64 = col!(row, "vcpus");
                let m: i64 = col!(row, "memory_mib");
                out.push((
                    (ProviderId(p), col!(row, "host")),
                    HostLoad {
                        vms: u32::try_from(n).unwrap_or(u32::MAX),
                        vcpus: u64::try_from(v).unwrap_or(0),
                        memory_mib: u64::try_from(m).unwrap_or(0),
                    },
                ));
            }
            Ok(out)
        })
    }

    /// Sets HCP's drain state of a host; a new drain records when it began.
    pub async fn set_drain(
        &self,
        provider: ProviderId,
        host: &str,
        drain: Drain,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        on_pool!(self, |pool| {
            let done = sqlx::query(
                "UPDATE hosts SET drain = $3, drain_started_at = CASE \
                 WHEN $3 = '' THEN NULL WHEN drain = '' THEN $4 ELSE drain_started_at END \
                 WHERE provider_id = $1 AND name = $2",
            )
            .bind(provider.0)
            .bind(host)
            .bind(drain.as_str())
            .bind(now)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "host"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
        });
        self.catalog_changed();
        Ok(())
    }

    /// Moves of VMs off `host` that have not finished.
    pub async fn moves_in_flight(&self, provider: ProviderId, host: &str) -> StoreResult<u32> {
        on_pool!(self, |pool| {
            let n: i64 = sqlx::query_scalar(sql!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs j JOIN vms v ON v.id = j.vm_id \
                 WHERE j.kind = {migrate} AND j.status IN ({job_queued}, {job_running}) \
                 AND v.provider_id = $1 AND j.params ->> 'from' = $2",
                migrate = JobKind::MigrateVm,
                job_queued = JobStatus::Queued,
                job_running = JobStatus::Running
            ))
            .bind(provider.0)
            .bind(host)
            .fetch_one(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "jobs"))?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    /// VMs still on `host` whose move off it failed since `since`.
    pub async fn failed_moves(
        &self,
        provider: ProviderId,
        host: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<VmId>> {
        on_pool!(self, |pool| {
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(sql!(
                "SELECT DISTINCT j.vm_id FROM jobs j JOIN vms v ON v.id = j.vm_id \
                 WHERE j.kind = {migrate} AND j.status IN ({job_failed}, {job_cancelled}) \
                 AND j.created_at >= $3 AND v.provider_id = $1 AND v.host = $2 \
                 AND j.params ->> 'from' = $2",
                migrate = JobKind::MigrateVm,
                job_failed = JobStatus::Failed,
                job_cancelled = JobStatus::Cancelled
            ))
            .bind(provider.0)
            .bind(host)
            .bind(since)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "jobs"))?;
            Ok(ids.into_iter().map(VmId).collect())
        })
    }

    /// A zone's placement settings (defaults for a zone never set).
    pub async fn zone_placement(&self, zone: &str) -> StoreResult<ZonePlacement> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT name, placement_policy, cpu_overcommit, memory_overcommit FROM zones WHERE name = $1",
            )
            .bind(zone)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "zone"))?
            .ok_or(StoreError::NotFound)?;
            Ok(zone_placement_from_row!(&row))
        })
    }

    /// Sets a zone's placement settings.
    pub async fn set_zone_placement(&self, p: &ZonePlacement) -> StoreResult<()> {
        on_pool!(self, |pool| {
            let done = sqlx::query(
                "UPDATE zones SET placement_policy = $2, cpu_overcommit = $3, memory_overcommit = $4 \
                 WHERE name = $1",
            )
            .bind(&p.zone)
            .bind(p.policy.as_str())
            .bind(p.cpu_overcommit)
            .bind(p.memory_overcommit)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "zone"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
        });
        self.catalog_changed();
        Ok(())
    }

    /// Every zone's placement settings.
    pub async fn zone_placements(&self) -> StoreResult<Vec<ZonePlacement>> {
        on_pool!(self, |pool| {
            let rows =
                sqlx::query("SELECT name, placement_policy, cpu_overcommit, memory_overcommit FROM zones")
                    .fetch_all(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "zone"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(zone_placement_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Inserts a placement group (AlreadyExists for a taken name) with its
    /// audit event.
    pub async fn create_placement_group(&self, g: &PlacementGroup, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO placement_groups (id, tenant_id, project_id, name, policy, strict, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(g.id.0)
            .bind(&g.tenant_id)
            .bind(&g.project_id)
            .bind(&g.name)
            .bind(g.policy.as_str())
            .bind(g.strict)
            .bind(g.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("placement group {}", g.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// The project's placement groups, by name.
    pub async fn list_placement_groups(&self, scope: &Scope) -> StoreResult<Vec<PlacementGroup>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(
                "SELECT id, tenant_id, project_id, name, policy, strict, created_at FROM placement_groups \
                 WHERE tenant_id = $1 AND project_id = $2 ORDER BY name",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement groups"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(group_from_row!(row));
            }
            Ok(out)
        })
    }

    /// One placement group of the project.
    pub async fn get_placement_group(
        &self,
        scope: &Scope,
        id: PlacementGroupId,
    ) -> StoreResult<PlacementGroup> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT id, tenant_id, project_id, name, policy, strict, created_at FROM placement_groups \
                 WHERE id = $1 AND tenant_id = $2 AND project_id = $3",
            )
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement group"))?
            .ok_or(StoreError::NotFound)?;
            Ok(group_from_row!(&row))
        })
    }

    /// A placement group by id alone (for operators' moves).
    pub async fn get_placement_group_internal(&self, id: PlacementGroupId) -> StoreResult<PlacementGroup> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT id, tenant_id, project_id, name, policy, strict, created_at FROM placement_groups \
                 WHERE id = $1",
            )
            .bind(id.0)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement group"))?
            .ok_or(StoreError::NotFound)?;
            Ok(group_from_row!(&row))
        })
    }

    /// Where the group's members that are not deleted are.
    pub async fn group_members(&self, id: PlacementGroupId) -> StoreResult<Vec<Member>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sql!(
                "SELECT id, provider_id, host FROM vms WHERE placement_group_id = $1 \
                 AND status <> {vm_deleted} ORDER BY id",
                vm_deleted = VmStatus::Deleted
            ))
            .bind(id.0)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement group"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let vm: uuid::Uuid = col!(row, "id");
                let p: uuid::Uuid = col!(row, "provider_id");
                out.push(Member { vm_id: VmId(vm), provider_id: ProviderId(p), host: col!(row, "host") });
            }
            Ok(out)
        })
    }

    /// Deletes an empty placement group with its audit event; Conflict
    /// while it has members.
    pub async fn delete_placement_group(
        &self,
        scope: &Scope,
        id: PlacementGroupId,
        audit: &AuditEvent,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(
                "UPDATE placement_groups SET name = name WHERE id = $1 AND tenant_id = $2 AND project_id = $3",
            )
            .bind(id.0)
            .bind(&scope.tenant)
            .bind(&scope.project)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement group"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            let members: i64 = sqlx::query_scalar(
                sql!("SELECT CAST(COUNT(*) AS BIGINT) FROM vms WHERE placement_group_id = $1 AND status <> {vm_deleted}", vm_deleted = VmStatus::Deleted),
            )
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "placement group"))?;
            if members > 0 {
                return Err(StoreError::Conflict(format!(
                    "placement group {id} has {members} members; delete them first"
                )));
            }
            sqlx::query("DELETE FROM placement_groups WHERE id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "placement group"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }
}
