//! Checks that run inside the transaction that accepts a request, so that
//! no concurrent request can slip between the check and the write:
//! idempotency keys (the first successful answer per tenant and key) and
//! project quotas (instances, vCPUs, memory).

use chrono::{DateTime, Utc};

use super::sql;
use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::VmStatus;

/// An idempotency key to record with an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// Tenant the key belongs to.
    pub tenant_id: String,
    /// The client's key.
    pub key: String,
    /// Fingerprint of the request (method and canonical fields).
    pub request_hash: String,
    /// The answer given, as JSON.
    pub response: String,
    /// When recorded.
    pub created_at: DateTime<Utc>,
    /// When the key may be reused for another request.
    pub expires_at: DateTime<Utc>,
}

/// Limits of one project; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quota {
    /// VMs that are not deleted.
    pub max_instances: Option<u32>,
    /// Sum of their vCPUs.
    pub max_vcpus: Option<u32>,
    /// Sum of their memory.
    pub max_memory_mib: Option<u64>,
    /// Volumes that are not deleted.
    pub max_volumes: Option<u32>,
    /// Sum of their sizes.
    pub max_volume_gib: Option<u64>,
    /// Private images.
    pub max_images: Option<u32>,
    /// Sum of their sizes, each rounded up to a GiB.
    pub max_image_gib: Option<u64>,
}

/// A change to some limits of a project: `None` keeps a limit as it is,
/// `Some(None)` makes it unlimited, `Some(Some(n))` sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaUpdate {
    /// VMs that are not deleted.
    pub max_instances: Option<Option<u32>>,
    /// Sum of their vCPUs.
    pub max_vcpus: Option<Option<u32>>,
    /// Sum of their memory.
    pub max_memory_mib: Option<Option<u64>>,
    /// Volumes that are not deleted.
    pub max_volumes: Option<Option<u32>>,
    /// Sum of their sizes.
    pub max_volume_gib: Option<Option<u64>>,
    /// Private images.
    pub max_images: Option<Option<u32>>,
    /// Sum of their sizes.
    pub max_image_gib: Option<Option<u64>>,
}

/// Current use of a project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// VMs that are not deleted.
    pub instances: u64,
    /// Their vCPUs.
    pub vcpus: u64,
    /// Their memory.
    pub memory_mib: u64,
    /// Volumes that are not deleted.
    pub volumes: u64,
    /// Their GiB.
    pub volume_gib: u64,
    /// Private images.
    pub images: u64,
    /// Their GiB, each rounded up.
    pub image_gib: u64,
}

/// Records an idempotency key inside a transaction, in one statement: a new
/// key is inserted, an expired record for the same key is replaced, and a
/// live one makes this fail with [`StoreError::IdempotencyRace`] (another
/// request holds the key).
macro_rules! insert_idempotency {
    ($conn:expr, $rec:expr) => {{
        let rec: &$crate::IdempotencyRecord = $rec;
        let done = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, key) DO UPDATE SET \
             request_hash = excluded.request_hash, response = excluded.response, \
             created_at = excluded.created_at, expires_at = excluded.expires_at \
             WHERE idempotency_keys.expires_at <= excluded.created_at",
        )
        .bind(&rec.tenant_id)
        .bind(&rec.key)
        .bind(&rec.request_hash)
        .bind(&rec.response)
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .execute(&mut *$conn)
        .await
        .map_err(|e| match $crate::StoreError::from_sqlx(e, "idempotency key") {
            $crate::StoreError::AlreadyExists { .. } => $crate::StoreError::IdempotencyRace,
            other => other,
        })?;
        if done.rows_affected() == 0 {
            return Err($crate::StoreError::IdempotencyRace);
        }
    }};
}
pub(crate) use insert_idempotency;

/// Checks a project's quota for `instances` more VMs and `vcpus` / `memory`
/// more (a create: 1 and its size; a resize: 0 and the difference), inside the
/// accepting transaction. On PostgreSQL the quota row is locked, which
/// orders concurrent creates of the project; SQLite has one writer.
macro_rules! check_quota {
    ($conn:expr, $kind:expr, $tenant:expr, $project:expr, $instances:expr, $vcpus:expr, $memory:expr) => {{
        let lock = match $kind {
            $crate::BackendKind::Postgres => " FOR UPDATE",
            $crate::BackendKind::Sqlite => "",
        };
        let quota = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT max_instances, max_vcpus, max_memory_mib FROM project_quotas \
             WHERE tenant_id = $1 AND project_id = $2{lock}"
        )))
        .bind($tenant)
        .bind($project)
        .fetch_optional(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
        if let Some(row) = quota {
            let max_instances: Option<i32> = col!(&row, "max_instances");
            let max_vcpus: Option<i32> = col!(&row, "max_vcpus");
            let max_memory: Option<i64> = col!(&row, "max_memory_mib");
            let used = sqlx::query(sql!(
                "SELECT COUNT(*) AS n, COALESCE(SUM(vcpus), 0) AS vcpus, \
                 COALESCE(SUM(memory_mib), 0) AS memory FROM vms \
                 WHERE tenant_id = $1 AND project_id = $2 AND status <> {vm_deleted}",
                vm_deleted = VmStatus::Deleted
            ))
            .bind($tenant)
            .bind($project)
            .fetch_one(&mut *$conn)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
            let n: i64 = col!(&used, "n");
            let vcpus: i64 = col!(&used, "vcpus");
            let memory: i64 = col!(&used, "memory");
            let checks = [
                ("instances", max_instances.map(i64::from), n, i64::from($instances)),
                ("vcpus", max_vcpus.map(i64::from), vcpus, i64::from($vcpus)),
                ("memory_mib", max_memory, memory, i64::from($memory)),
            ];
            for (what, max, used, more) in checks {
                // Only a growth is checked: shrinking is always allowed,
                // even in a project already over a lowered limit.
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
    }};
}
pub(crate) use check_quota;

impl super::Store {
    /// Returns the live record of an idempotency key, if any.
    pub async fn get_idempotency(
        &self,
        tenant_id: &str,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<IdempotencyRecord>> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT tenant_id, key, request_hash, response, created_at, expires_at FROM idempotency_keys \
                 WHERE tenant_id = $1 AND key = $2 AND expires_at > $3",
            )
            .bind(tenant_id)
            .bind(key)
            .bind(now)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "idempotency key"))?;
            match row {
                None => Ok(None),
                Some(row) => Ok(Some(IdempotencyRecord {
                    tenant_id: col!(&row, "tenant_id"),
                    key: col!(&row, "key"),
                    request_hash: col!(&row, "request_hash"),
                    response: col!(&row, "response"),
                    created_at: col!(&row, "created_at"),
                    expires_at: col!(&row, "expires_at"),
                })),
            }
        })
    }

    /// Records an idempotency key after the change it answers committed
    /// (for a request whose change has no transaction to record it in):
    /// [`StoreError::IdempotencyRace`] when a live record holds the key.
    pub async fn put_idempotency(&self, rec: &IdempotencyRecord) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            insert_idempotency!(tx, rec);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Deletes expired idempotency records; returns how many.
    pub async fn purge_idempotency(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        on_pool!(self, |pool| {
            let done = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
                .bind(now)
                .execute(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "idempotency key"))?;
            Ok(done.rows_affected())
        })
    }

    /// Sets a project's quota (all limits `None` means unlimited) and
    /// appends its audit event, in one transaction.
    pub async fn set_quota(
        &self,
        scope: &hcp_domain::model::Scope,
        quota: &Quota,
        audit: &hcp_domain::model::AuditEvent,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO project_quotas (tenant_id, project_id, max_instances, max_vcpus, max_memory_mib, \
                 updated_at, max_volumes, max_volume_gib, max_images, max_image_gib) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (tenant_id, project_id) DO UPDATE \
                 SET max_instances = $3, max_vcpus = $4, max_memory_mib = $5, updated_at = $6, \
                 max_volumes = $7, max_volume_gib = $8, max_images = $9, max_image_gib = $10",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .bind(quota.max_instances.map(|v| v as i32))
            .bind(quota.max_vcpus.map(|v| v as i32))
            .bind(quota.max_memory_mib.map(|v| v as i64))
            .bind(audit.at)
            .bind(quota.max_volumes.map(|v| v as i32))
            .bind(quota.max_volume_gib.map(|v| v as i64))
            .bind(quota.max_images.map(|v| v as i32))
            .bind(quota.max_image_gib.map(|v| v as i64))
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "quota"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Changes the limits `update` names and keeps the others, with its
    /// audit event, in one transaction; a project without a quota row gets
    /// one (unnamed limits unlimited).
    pub async fn update_quota(
        &self,
        scope: &hcp_domain::model::Scope,
        update: &QuotaUpdate,
        audit: &hcp_domain::model::AuditEvent,
    ) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO project_quotas (tenant_id, project_id, max_instances, max_vcpus, max_memory_mib, \
                 updated_at, max_volumes, max_volume_gib, max_images, max_image_gib) \
                 VALUES ($1, $2, $3, $4, $5, $6, $10, $11, $14, $15) \
                 ON CONFLICT (tenant_id, project_id) DO UPDATE \
                 SET max_instances = CASE WHEN $7 THEN $3 ELSE project_quotas.max_instances END, \
                 max_vcpus = CASE WHEN $8 THEN $4 ELSE project_quotas.max_vcpus END, \
                 max_memory_mib = CASE WHEN $9 THEN $5 ELSE project_quotas.max_memory_mib END, \
                 max_volumes = CASE WHEN $12 THEN $10 ELSE project_quotas.max_volumes END, \
                 max_volume_gib = CASE WHEN $13 THEN $11 ELSE project_quotas.max_volume_gib END, \
                 max_images = CASE WHEN $16 THEN $14 ELSE project_quotas.max_images END, \
                 max_image_gib = CASE WHEN $17 THEN $15 ELSE project_quotas.max_image_gib END, \
                 updated_at = $6",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .bind(update.max_instances.flatten().map(|v| v as i32))
            .bind(update.max_vcpus.flatten().map(|v| v as i32))
            .bind(update.max_memory_mib.flatten().map(|v| v as i64))
            .bind(audit.at)
            .bind(update.max_instances.is_some())
            .bind(update.max_vcpus.is_some())
            .bind(update.max_memory_mib.is_some())
            .bind(update.max_volumes.flatten().map(|v| v as i32))
            .bind(update.max_volume_gib.flatten().map(|v| v as i64))
            .bind(update.max_volumes.is_some())
            .bind(update.max_volume_gib.is_some())
            .bind(update.max_images.flatten().map(|v| v as i32))
            .bind(update.max_image_gib.flatten().map(|v| v as i64))
            .bind(update.max_images.is_some())
            .bind(update.max_image_gib.is_some())
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "quota"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Returns a project's quota (all `None` when unset) and usage.
    pub async fn get_quota(&self, scope: &hcp_domain::model::Scope) -> StoreResult<(Quota, Usage)> {
        let (tenant_id, project_id) = (&scope.tenant, &scope.project);
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT max_instances, max_vcpus, max_memory_mib, max_volumes, max_volume_gib, max_images, \
                 max_image_gib FROM project_quotas \
                 WHERE tenant_id = $1 AND project_id = $2",
            )
            .bind(tenant_id)
            .bind(project_id)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "quota"))?;
            let quota = match row {
                None => Quota::default(),
                Some(row) => {
                    let i: Option<i32> = col!(&row, "max_instances");
                    let v: Option<i32> = col!(&row, "max_vcpus");
                    let m: Option<i64> = col!(&row, "max_memory_mib");
                    let vn: Option<i32> = col!(&row, "max_volumes");
                    let vg: Option<i64> = col!(&row, "max_volume_gib");
                    let im: Option<i32> = col!(&row, "max_images");
                    let ig: Option<i64> = col!(&row, "max_image_gib");
                    Quota {
                        max_images: im.map(|x| x.max(0) as u32),
                        max_image_gib: ig.map(|x| x.max(0) as u64),
                        max_instances: i.map(|x| x.max(0) as u32),
                        max_vcpus: v.map(|x| x.max(0) as u32),
                        max_memory_mib: m.map(|x| x.max(0) as u64),
                        max_volumes: vn.map(|x| x.max(0) as u32),
                        max_volume_gib: vg.map(|x| x.max(0) as u64),
                    }
                }
            };
            let used = sqlx::query(sql!(
                "SELECT COUNT(*) AS n, COALESCE(SUM(vcpus), 0) AS vcpus, \
                 COALESCE(SUM(memory_mib), 0) AS memory FROM vms \
                 WHERE tenant_id = $1 AND project_id = $2 AND status <> {vm_deleted}",
                vm_deleted = VmStatus::Deleted
            ))
            .bind(tenant_id)
            .bind(project_id)
            .fetch_one(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "quota"))?;
            let n: i64 = col!(&used, "n");
            let v: i64 = col!(&used, "vcpus");
            let m: i64 = col!(&used, "memory");
            let (volumes, gib) = super::volumes::volume_usage!(pool, scope);
            let (images, image_gib) = super::images::image_usage!(pool, scope);
            Ok((
                quota,
                Usage {
                    instances: n as u64,
                    vcpus: v as u64,
                    memory_mib: m as u64,
                    volumes: volumes.max(0) as u64,
                    volume_gib: gib.max(0) as u64,
                    images: images.max(0) as u64,
                    image_gib: image_gib.max(0) as u64,
                },
            ))
        })
    }
}
