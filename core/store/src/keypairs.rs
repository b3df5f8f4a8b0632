//! Tenants' SSH key pairs: public keys imported into a project, by name
//! (HCP never holds a private key). A create checks the project's limit and
//! inserts with its audit event in one transaction; a VM keeps the keys it
//! was created with in its own row (`vms.ssh_keys`), so a delete here
//! changes no VM.

use hcp_domain::model::{AuditEvent, KeyPair, Scope};

use super::{StoreError, StoreResult, col, on_pool};

const COLUMNS: &str =
    "tenant_id, project_id, name, public_key, fingerprint, key_type, bits, comment, created_at";

macro_rules! key_pair_from_row {
    ($row:expr) => {{
        let row = $row;
        let bits: i32 = col!(row, "bits");
        KeyPair {
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            name: col!(row, "name"),
            public_key: col!(row, "public_key"),
            fingerprint: col!(row, "fingerprint"),
            key_type: col!(row, "key_type"),
            bits: super::to_u32(bits, "bits")?,
            comment: col!(row, "comment"),
            created_at: col!(row, "created_at"),
        }
    }};
}

impl super::Store {
    /// Inserts a key pair with its audit event: AlreadyExists for a name
    /// the project has, QuotaExceeded when the project already holds `max`.
    /// On PostgreSQL the project's key pairs are locked first, so concurrent
    /// imports are counted one after the other.
    pub async fn create_key_pair(&self, k: &KeyPair, max: u32, audit: &AuditEvent) -> StoreResult<()> {
        let kind = self.kind();
        on_pool!(transaction self, |tx| {
            let lock = match kind {
                super::BackendKind::Postgres => " FOR UPDATE",
                super::BackendKind::Sqlite => "",
            };
            let held = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT name FROM key_pairs WHERE tenant_id = $1 AND project_id = $2{lock}"
            )))
            .bind(&k.tenant_id)
            .bind(&k.project_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "key pairs"))?;
            if held.len() >= max as usize {
                return Err(StoreError::QuotaExceeded(format!(
                    "project {} already holds the most key pairs a project may hold ({max})",
                    k.project_id
                )));
            }
            sqlx::query(
                "INSERT INTO key_pairs (tenant_id, project_id, name, public_key, fingerprint, key_type, \
                 bits, comment, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&k.tenant_id)
            .bind(&k.project_id)
            .bind(&k.name)
            .bind(&k.public_key)
            .bind(&k.fingerprint)
            .bind(&k.key_type)
            .bind(super::to_i32(k.bits))
            .bind(&k.comment)
            .bind(k.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, &format!("key pair {}", k.name)))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// The project's key pairs, by name.
    pub async fn list_key_pairs(&self, scope: &Scope) -> StoreResult<Vec<KeyPair>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM key_pairs WHERE tenant_id = $1 AND project_id = $2 ORDER BY name"
            )))
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "key pairs"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(key_pair_from_row!(row));
            }
            Ok(out)
        })
    }

    /// One key pair of the project (NotFound for another project's).
    pub async fn get_key_pair(&self, scope: &Scope, name: &str) -> StoreResult<KeyPair> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM key_pairs WHERE tenant_id = $1 AND project_id = $2 AND name = $3"
            )))
            .bind(&scope.tenant)
            .bind(&scope.project)
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "key pair"))?
            .ok_or(StoreError::NotFound)?;
            Ok(key_pair_from_row!(&row))
        })
    }

    /// Deletes a key pair with its audit event (NotFound when the project
    /// has none of that name). VMs created with it keep their keys.
    pub async fn delete_key_pair(&self, scope: &Scope, name: &str, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let done =
                sqlx::query("DELETE FROM key_pairs WHERE tenant_id = $1 AND project_id = $2 AND name = $3")
                    .bind(&scope.tenant)
                    .bind(&scope.project)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "key pair"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }
}
