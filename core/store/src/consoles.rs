//! Console sessions: a hash of a single-use token bound to a tenant, project,
//! VM and protocol, with an expiry. Issued by the API, redeemed by the
//! console proxy, revoked when the VM stops or goes away.

use chrono::{DateTime, Utc};

use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::{AuditEvent, ConsoleSession};

/// A console session from a row of either backend.
macro_rules! session_from_row {
    ($row:expr) => {{
        let row = $row;
        let vm_id: uuid::Uuid = col!(&row, "vm_id");
        ConsoleSession {
            token_hash: col!(&row, "token_hash"),
            tenant_id: col!(&row, "tenant_id"),
            project_id: col!(&row, "project_id"),
            vm_id: hcp_proto::ids::VmId(vm_id),
            protocol: col!(&row, "protocol"),
            expires_at: col!(&row, "expires_at"),
            used_at: col!(&row, "used_at"),
            revoked_at: col!(&row, "revoked_at"),
            created_at: col!(&row, "created_at"),
        }
    }};
}

impl super::Store {
    /// Stores a new session and the audit event of its issue.
    pub async fn insert_console_session(&self, s: &ConsoleSession, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO console_sessions (token_hash, tenant_id, project_id, vm_id, protocol, \
                 expires_at, used_at, revoked_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, \
                 NULL, NULL, $7)",
            )
            .bind(&s.token_hash)
            .bind(&s.tenant_id)
            .bind(&s.project_id)
            .bind(s.vm_id.0)
            .bind(&s.protocol)
            .bind(s.expires_at)
            .bind(s.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "console session"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Marks a session used if it is unused, unrevoked and unexpired at
    /// `now`, and returns it; NotFound otherwise. At most one caller ever
    /// redeems a token.
    pub async fn redeem_console_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<ConsoleSession> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "UPDATE console_sessions SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL \
                 AND revoked_at IS NULL AND expires_at > $1 RETURNING token_hash, tenant_id, \
                 project_id, vm_id, protocol, expires_at, used_at, revoked_at, created_at",
            )
            .bind(now)
            .bind(token_hash)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "console session"))?
            .ok_or(StoreError::NotFound)?;
            Ok(session_from_row!(row))
        })
    }

    /// Of `token_hashes`, the sessions revoked, with why.
    pub async fn revoked_consoles(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, String)>> {
        let mut revoked = Vec::new();
        // Bound the statement's parameters (SQLite allows 32766).
        for chunk in token_hashes.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT token_hash, revoked_reason FROM console_sessions WHERE revoked_at IS NOT NULL \
                 AND token_hash IN ({})",
                marks.join(", ")
            );
            let rows: Vec<(String, Option<String>)> = on_pool!(self, |pool| {
                // Only `$n` placeholders are formatted in; the hashes are bound.
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for h in chunk {
                    q = q.bind(h);
                }
                q.fetch_all(pool).await.map_err(|e| StoreError::from_sqlx(e, "console session"))
            })?;
            revoked.extend(rows.into_iter().map(|(h, r)| (h, r.unwrap_or_default())));
        }
        Ok(revoked)
    }

    /// What became of a session that could not be redeemed: `None` when
    /// the token is unknown.
    pub async fn console_session(&self, token_hash: &str) -> StoreResult<Option<ConsoleSession>> {
        on_pool!(self, |pool| {
            let Some(row) = sqlx::query(
                "SELECT token_hash, tenant_id, project_id, vm_id, protocol, expires_at, used_at, revoked_at, \
                 created_at FROM console_sessions WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "console session"))?
            else {
                return Ok(None);
            };
            Ok(Some(session_from_row!(row)))
        })
    }
}
