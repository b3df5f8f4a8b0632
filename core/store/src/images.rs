//! Images: the public catalog entries operators make, the private images
//! captures make, what each provider resolves an image to (its backings),
//! accepting an import or a deletion with its job, and what a job records
//! as it goes (a provider's backing as it is stored, the stored size). The
//! lifecycle decides (`hcp_domain::lifecycle::image`); this module writes
//! what it decided.

use std::collections::{BTreeMap, HashMap};

use hcp_domain::lifecycle::JobParams;
use hcp_domain::lifecycle::image::{ImageRefusal, accept_image_delete};
use hcp_domain::model::{
    Architecture, AuditEvent, Image, ImageBacking, ImageStatus, ImageVisibility, Job, Scope, VmStatus,
};
use hcp_proto::ids::{ImageId, JobId, VmId};

use super::guards::{IdempotencyRecord, insert_idempotency};
use super::outbox::{SUBJECT_JOBS, insert_outbox};
use super::{StoreError, StoreResult, col, on_pool, sql, to_i32, to_u32};

pub(crate) const IMAGE_COLUMNS: &str = "id, name, visibility, tenant_id, project_id, status, os_type, os_version, \
     architecture, source, min_disk_gib, min_memory_mib, description, size_bytes, sha256, error_message, job_id, \
     captured_from, created_at, updated_at";

/// [`IMAGE_COLUMNS`] as read: a row the previous release inserted has no
/// `updated_at` (migration 0023 keeps the column nullable for it), which
/// reads as its `created_at`.
pub(crate) const IMAGE_SELECT: &str = "id, name, visibility, tenant_id, project_id, status, os_type, os_version, \
     architecture, source, min_disk_gib, min_memory_mib, description, size_bytes, sha256, error_message, job_id, \
     captured_from, created_at, COALESCE(updated_at, created_at) AS updated_at";

/// Which images [`super::Store::list_images`] answers.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    /// The public images and this project's private ones; `None` with
    /// `every_project` unset: the public ones only.
    pub scope: Option<Scope>,
    /// Every project's private images too (operators).
    pub every_project: bool,
    /// Only this OS family.
    pub os_type: Option<String>,
    /// Only this architecture.
    pub architecture: Option<Architecture>,
    /// Only this state.
    pub status: Option<ImageStatus>,
}

/// What [`super::Store::delete_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageDeletion {
    /// Nothing was stored on a provider: the image is gone.
    Removed,
    /// The image is DELETING; the job removes it from its providers.
    Job(JobId),
}

macro_rules! image_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let visibility: String = col!(row, "visibility");
        let status: String = col!(row, "status");
        let architecture: String = col!(row, "architecture");
        let job_id: Option<uuid::Uuid> = col!(row, "job_id");
        let captured_from: Option<uuid::Uuid> = col!(row, "captured_from");
        let size: i64 = col!(row, "size_bytes");
        Image {
            id: ImageId(id),
            name: col!(row, "name"),
            visibility: ImageVisibility::parse(&visibility)
                .ok_or_else(|| StoreError::Corrupt(format!("image visibility {visibility:?}")))?,
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            status: ImageStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("image status {status:?}")))?,
            os_type: col!(row, "os_type"),
            os_version: col!(row, "os_version"),
            architecture: Architecture::parse(&architecture)
                .ok_or_else(|| StoreError::Corrupt(format!("image architecture {architecture:?}")))?,
            source: col!(row, "source"),
            backings: BTreeMap::new(),
            min_disk_gib: to_u32(col!(row, "min_disk_gib"), "min_disk_gib")?,
            min_memory_mib: to_u32(col!(row, "min_memory_mib"), "min_memory_mib")?,
            description: col!(row, "description"),
            size_bytes: u64::try_from(size).unwrap_or(0),
            sha256: col!(row, "sha256"),
            error_message: col!(row, "error_message"),
            job_id: job_id.map(JobId),
            captured_from: captured_from.map(VmId),
            created_at: col!(row, "created_at"),
            updated_at: col!(row, "updated_at"),
        }
    }};
}

/// Inserts an image and its backings.
macro_rules! insert_image {
    ($tx:expr, $image:expr) => {{
        let i: &hcp_domain::model::Image = $image;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO images ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
             $14, $15, $16, $17, $18, $19, $20)",
            $crate::images::IMAGE_COLUMNS
        )))
        .bind(i.id.0)
        .bind(&i.name)
        .bind(i.visibility.as_str())
        .bind(&i.tenant_id)
        .bind(&i.project_id)
        .bind(i.status.as_str())
        .bind(&i.os_type)
        .bind(&i.os_version)
        .bind(i.architecture.as_str())
        .bind(&i.source)
        .bind($crate::to_i32(i.min_disk_gib))
        .bind($crate::to_i32(i.min_memory_mib))
        .bind(&i.description)
        .bind(i64::try_from(i.size_bytes).unwrap_or(i64::MAX))
        .bind(&i.sha256)
        .bind(&i.error_message)
        .bind(i.job_id.map(|j| j.0))
        .bind(i.captured_from.map(|v| v.0))
        .bind(i.created_at)
        .bind(i.updated_at)
        .execute(&mut *$tx)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, &format!("image {}", i.name)))?;
        for (provider, b) in &i.backings {
            sqlx::query(
                "INSERT INTO image_backings (image_id, provider, source, stored) VALUES ($1, $2, $3, $4)",
            )
            .bind(i.id.0)
            .bind(provider)
            .bind(&b.source)
            .bind(b.stored)
            .execute(&mut *$tx)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "image backing"))?;
        }
    }};
}
pub(crate) use insert_image;

/// Checks a project's image quota for one more image of `gib` GiB inside
/// the accepting transaction (the quota row locked on PostgreSQL).
macro_rules! check_image_quota {
    ($conn:expr, $kind:expr, $scope:expr, $gib:expr) => {{
        let lock = match $kind {
            $crate::BackendKind::Postgres => " FOR UPDATE",
            $crate::BackendKind::Sqlite => "",
        };
        let scope: &hcp_domain::model::Scope = $scope;
        let quota = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT max_images, max_image_gib FROM project_quotas WHERE tenant_id = $1 AND project_id = $2{lock}"
        )))
        .bind(&scope.tenant)
        .bind(&scope.project)
        .fetch_optional(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
        if let Some(row) = quota {
            let max_images: Option<i32> = col!(&row, "max_images");
            let max_gib: Option<i64> = col!(&row, "max_image_gib");
            if max_images.is_some() || max_gib.is_some() {
                let (n, gib) = $crate::images::image_usage!(&mut *$conn, scope);
                let more: i64 = i64::try_from($gib).unwrap_or(i64::MAX);
                let checks =
                    [("images", max_images.map(i64::from), n, 1i64), ("image GiB", max_gib, gib, more)];
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
pub(crate) use check_image_quota;

/// The project's private images and their GiB (each rounded up).
macro_rules! image_usage {
    ($conn:expr, $scope:expr) => {{
        let scope: &hcp_domain::model::Scope = $scope;
        let sizes: Vec<i64> =
            sqlx::query_scalar("SELECT size_bytes FROM images WHERE tenant_id = $1 AND project_id = $2")
                .bind(&scope.tenant)
                .bind(&scope.project)
                .fetch_all($conn)
                .await
                .map_err(|e| $crate::StoreError::from_sqlx(e, "quota"))?;
        let gib: i64 = sizes.iter().map(|b| (b.max(&0) + (1 << 30) - 1) >> 30).sum();
        (sizes.len() as i64, gib)
    }};
}
pub(crate) use image_usage;

/// Fills in the backings of `images` (one query: by id for one image, every
/// backing for a list, which is the catalog's size).
macro_rules! fill_backings {
    ($conn:expr, $images:expr) => {{
        let images: &mut [Image] = $images;
        let rows = match images {
            [] => Vec::new(),
            [one] => sqlx::query(
                "SELECT image_id, provider, source, stored FROM image_backings WHERE image_id = $1",
            )
            .bind(one.id.0)
            .fetch_all($conn)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "image backings"))?,
            _ => sqlx::query("SELECT image_id, provider, source, stored FROM image_backings")
                .fetch_all($conn)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backings"))?,
        };
        let mut by_id: HashMap<uuid::Uuid, BTreeMap<String, ImageBacking>> = HashMap::new();
        for row in &rows {
            let id: uuid::Uuid = col!(row, "image_id");
            by_id.entry(id).or_default().insert(
                col!(row, "provider"),
                ImageBacking { source: col!(row, "source"), stored: col!(row, "stored") },
            );
        }
        for image in images.iter_mut() {
            image.backings = by_id.remove(&image.id.0).unwrap_or_default();
        }
    }};
}

impl super::Store {
    /// Inserts a public image, its backings and its audit event.
    pub async fn create_image(&self, i: &Image, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            insert_image!(tx, i);
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// The images `q` asks for, public ones first, each by name.
    pub async fn list_images(&self, q: &ImageQuery) -> StoreResult<Vec<Image>> {
        let (tenant, project) = match &q.scope {
            Some(s) => (Some(s.tenant.clone()), Some(s.project.clone())),
            None => (None, None),
        };
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {IMAGE_SELECT} FROM images \
                 WHERE (project_id = '' OR $1 OR (tenant_id = $2 AND project_id = $3)) \
                 AND ($4 IS NULL OR os_type = $4) AND ($5 IS NULL OR architecture = $5) \
                 AND ($6 IS NULL OR status = $6) \
                 ORDER BY project_id, name"
            )))
            .bind(q.every_project)
            .bind(&tenant)
            .bind(&project)
            .bind(&q.os_type)
            .bind(q.architecture.map(|a| a.as_str()))
            .bind(q.status.map(|s| s.as_str()))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "images"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(image_from_row!(row));
            }
            fill_backings!(pool, &mut out);
            Ok(out)
        })
    }

    /// The image `name` as `scope` sees it: the project's private one, else
    /// the public one. `None`: public images only.
    pub async fn get_image_by_name(&self, name: &str, scope: Option<&Scope>) -> StoreResult<Image> {
        let (tenant, project) = match scope {
            Some(s) => (s.tenant.clone(), s.project.clone()),
            None => (String::new(), String::new()),
        };
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {IMAGE_SELECT} FROM images WHERE name = $1 \
                 AND ((tenant_id = $2 AND project_id = $3) OR project_id = '') \
                 ORDER BY project_id DESC LIMIT 1"
            )))
            .bind(name)
            .bind(&tenant)
            .bind(&project)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "image"))?
            .ok_or(StoreError::NotFound)?;
            let mut one = [image_from_row!(&row)];
            fill_backings!(pool, &mut one);
            let [image] = one;
            Ok(image)
        })
    }

    /// One image by id.
    pub async fn get_image(&self, id: ImageId) -> StoreResult<Image> {
        on_pool!(self, |pool| {
            let row =
                sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {IMAGE_SELECT} FROM images WHERE id = $1")))
                    .bind(id.0)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image"))?
                    .ok_or(StoreError::NotFound)?;
            let mut one = [image_from_row!(&row)];
            fill_backings!(pool, &mut one);
            let [image] = one;
            Ok(image)
        })
    }

    /// Sets (or, with an empty source, removes) what `provider` resolves a
    /// public image to. A backing a provider stored is not the operator's
    /// to change: Conflict.
    pub async fn set_image_backing(
        &self,
        name: &str,
        provider: &str,
        source: &str,
        audit: &AuditEvent,
    ) -> StoreResult<Image> {
        on_pool!(transaction self, |tx| {
            let id: Option<uuid::Uuid> =
                sqlx::query_scalar("SELECT id FROM images WHERE name = $1 AND project_id = ''")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image"))?;
            let id = id.ok_or(StoreError::NotFound)?;
            let stored: Option<bool> =
                sqlx::query_scalar("SELECT stored FROM image_backings WHERE image_id = $1 AND provider = $2")
                    .bind(id)
                    .bind(provider)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            if stored == Some(true) {
                return Err(StoreError::Conflict(format!(
                    "image {name} is stored on provider {provider}; that backing is the provider's own"
                )));
            }
            sqlx::query("DELETE FROM image_backings WHERE image_id = $1 AND provider = $2")
                .bind(id)
                .bind(provider)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            if !source.is_empty() {
                sqlx::query(
                    "INSERT INTO image_backings (image_id, provider, source, stored) VALUES ($1, $2, $3, $4)",
                )
                .bind(id)
                .bind(provider)
                .bind(source)
                .bind(false)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            }
            sqlx::query("UPDATE images SET updated_at = $1 WHERE id = $2")
                .bind(audit.at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        self.get_image_by_name(name, None).await
    }

    /// Accepts an import: the image (IMPORTING, held by `job`), the job,
    /// its outbox row, the audit event and the idempotency key, in one
    /// transaction.
    pub async fn accept_image_job(
        &self,
        image: &Image,
        job: &Job,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()> {
        let outbox = self.outbox;
        on_pool!(transaction self, |tx| {
            if let Some(rec) = idem {
                insert_idempotency!(tx, rec);
            }
            insert_image!(tx, image);
            super::jobs::insert_job!(&mut *tx, job);
            if outbox {
                insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        self.catalog_changed();
        Ok(())
    }

    /// Deletes an image: refused while a job holds it (Busy) or a VM that
    /// is not deleted uses it (Conflict); removed at once when no provider
    /// stored it, else DELETING under `job` (built for it by the caller,
    /// its params filled in here).
    pub async fn delete_image(
        &self,
        id: ImageId,
        job: &Job,
        audit: &AuditEvent,
    ) -> StoreResult<ImageDeletion> {
        let outbox = self.outbox;
        let backend = self.kind();
        let done = on_pool!(transaction self, |tx| {
            let lock = match backend {
                super::BackendKind::Postgres => " FOR UPDATE",
                super::BackendKind::Sqlite => "",
            };
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {IMAGE_SELECT} FROM images WHERE id = $1{lock}"
            )))
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "image"))?
            .ok_or(StoreError::NotFound)?;
            let image = image_from_row!(&row);
            let was_available = accept_image_delete(image.status, image.job_id).map_err(|r| match r {
                ImageRefusal::Busy(job) => StoreError::Busy {
                    job,
                    message: format!("image {} is {}: job {job} is operating on it", image.name, image.status),
                },
            })?;
            // VMs name their image; a public image's name in a project
            // with a private image of that name is the private one's.
            let in_use: i64 = sqlx::query_scalar(sql!(
                "SELECT COUNT(*) FROM vms v WHERE v.image = $1 AND v.status <> {vm_deleted} \
                 AND ((v.tenant_id = $2 AND v.project_id = $3) OR ($3 = '' AND NOT EXISTS \
                 (SELECT 1 FROM images p WHERE p.name = v.image AND p.tenant_id = v.tenant_id \
                  AND p.project_id = v.project_id)))",
                vm_deleted = VmStatus::Deleted
            ))
            .bind(&image.name)
            .bind(&image.tenant_id)
            .bind(&image.project_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "vms"))?;
            if in_use > 0 {
                return Err(StoreError::Conflict(format!("image {} is used by {in_use} vm(s)", image.name)));
            }
            let stored: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM image_backings WHERE image_id = $1 AND stored")
                    .bind(id.0)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image backings"))?;
            let done = if stored == 0 {
                sqlx::query("DELETE FROM images WHERE id = $1")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image"))?;
                ImageDeletion::Removed
            } else {
                let mut job = job.clone();
                job.image_id = Some(id);
                job.params = JobParams::DeleteImage { was_available };
                sqlx::query(sql!(
                    "UPDATE images SET status = {deleting}, job_id = $1, error_message = NULL, updated_at = $2 \
                     WHERE id = $3",
                    deleting = ImageStatus::Deleting
                ))
                .bind(job.id.0)
                .bind(job.created_at)
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image"))?;
                super::jobs::insert_job!(&mut *tx, &job);
                if outbox {
                    insert_outbox!(tx, SUBJECT_JOBS, job.id.to_string(), job.created_at);
                }
                ImageDeletion::Job(job.id)
            };
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(done)
        })?;
        self.catalog_changed();
        Ok(done)
    }

    /// Records what `provider` answered for an image it stored (an import
    /// or a capture step, as each provider finishes): its backing.
    pub async fn record_image_backing(&self, id: ImageId, provider: &str, source: &str) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query("DELETE FROM image_backings WHERE image_id = $1 AND provider = $2")
                .bind(id.0)
                .bind(provider)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            sqlx::query("INSERT INTO image_backings (image_id, provider, source, stored) VALUES ($1, $2, $3, $4)")
                .bind(id.0)
                .bind(provider)
                .bind(source)
                .bind(true)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Forgets `provider`'s backing of an image (the provider removed it).
    pub async fn remove_image_backing(&self, id: ImageId, provider: &str) -> StoreResult<()> {
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM image_backings WHERE image_id = $1 AND provider = $2")
                .bind(id.0)
                .bind(provider)
                .execute(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image backing"))?;
            Ok(())
        })
    }

    /// Records an image's stored size and smallest disk, once known (after
    /// the conversion, or from a capture).
    pub async fn set_image_size(&self, id: ImageId, size_bytes: u64, min_disk_gib: u32) -> StoreResult<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE images SET size_bytes = $1, min_disk_gib = CASE WHEN min_disk_gib < $2 THEN $2 \
                 ELSE min_disk_gib END WHERE id = $3",
            )
            .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
            .bind(to_i32(min_disk_gib))
            .bind(id.0)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "image"))?;
            Ok(())
        })
    }
}

/// Writes what a finished job does to its image (inside the finishing
/// transaction).
macro_rules! apply_image_change {
    ($tx:expr, $job:expr, $image:expr, $change:expr, $message:expr, $now:expr) => {{
        let job: &hcp_domain::model::Job = $job;
        let image: hcp_proto::ids::ImageId = $image;
        let now: chrono::DateTime<chrono::Utc> = $now;
        match $change {
            hcp_domain::lifecycle::image::ImageChange::Removed => {
                sqlx::query("DELETE FROM images WHERE id = $1 AND job_id = $2")
                    .bind(image.0)
                    .bind(job.id.0)
                    .execute(&mut *$tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "image"))?;
            }
            hcp_domain::lifecycle::image::ImageChange::Status(status) => {
                let message: Option<&str> =
                    (status == hcp_domain::model::ImageStatus::Error).then(|| $message.unwrap_or_default());
                sqlx::query(
                    "UPDATE images SET status = $1, job_id = NULL, error_message = $2, updated_at = $3 \
                     WHERE id = $4 AND job_id = $5",
                )
                .bind(status.as_str())
                .bind(message)
                .bind(now)
                .bind(image.0)
                .bind(job.id.0)
                .execute(&mut *$tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "image"))?;
            }
        }
    }};
}
pub(crate) use apply_image_change;
