//! Console sessions: a hash of a single-use token bound to a tenant, project,
//! VM and protocol, with an expiry. Issued by the API, redeemed by the
//! console proxy (once; a SPICE session's further channels join it from the
//! same client address while it is open), ended when its connection (a
//! SPICE session's main channel) closes, revoked when the VM stops or goes
//! away.

use chrono::{DateTime, Utc};

use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::{AuditEvent, ConsoleSession};

/// Revokes the console sessions open on a VM, with why, inside a
/// transaction: no token opens it any more, and the console proxy ends the
/// sessions open on it (it asks which: `revoked_consoles`).
macro_rules! revoke_vm_consoles {
    ($conn:expr, $vm:expr, $reason:expr, $at:expr) => {{
        let vm: Option<hcp_proto::ids::VmId> = $vm;
        sqlx::query(
            "UPDATE console_sessions SET revoked_at = $1, revoked_reason = $2 WHERE vm_id = $3 \
             AND revoked_at IS NULL",
        )
        .bind($at)
        .bind($reason)
        .bind(vm.map(|v| v.0))
        .execute(&mut *$conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "console session"))?;
    }};
}
pub(crate) use revoke_vm_consoles;

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
            client_address: col!(&row, "client_address"),
            ended_at: col!(&row, "ended_at"),
        }
    }};
}

/// The columns [`session_from_row`] reads.
const COLUMNS: &str = "token_hash, tenant_id, project_id, vm_id, protocol, expires_at, used_at, revoked_at, \
                       created_at, client_address, ended_at";

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

    /// Marks a session used (by a client at `client_address`) if it is
    /// unused, unrevoked and unexpired at `now`, and returns it; NotFound
    /// otherwise. At most one caller ever redeems a token.
    pub async fn redeem_console_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
        client_address: &str,
    ) -> StoreResult<ConsoleSession> {
        let sql = format!(
            "UPDATE console_sessions SET used_at = $1, client_address = $3 WHERE token_hash = $2 \
             AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1 RETURNING {COLUMNS}"
        );
        on_pool!(self, |pool| {
            // Only the column list is formatted in; the values are bound.
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(now)
                .bind(token_hash)
                .bind(client_address)
                .fetch_optional(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "console session"))?
                .ok_or(StoreError::NotFound)?;
            Ok(session_from_row!(row))
        })
    }

    /// The session `token_hash` opened, for one more of its channels: it
    /// must have been redeemed by `client_address` after `opened_after`
    /// (its maximum time not passed) and be neither revoked nor ended.
    /// NotFound otherwise. Nothing changes: the token was used once.
    pub async fn join_console_session(
        &self,
        token_hash: &str,
        client_address: &str,
        opened_after: DateTime<Utc>,
    ) -> StoreResult<ConsoleSession> {
        let sql = format!(
            "SELECT {COLUMNS} FROM console_sessions WHERE token_hash = $1 AND used_at > $2 \
             AND client_address = $3 AND revoked_at IS NULL AND ended_at IS NULL"
        );
        on_pool!(self, |pool| {
            // Only the column list is formatted in; the values are bound.
            let row = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(token_hash)
                .bind(opened_after)
                .bind(client_address)
                .fetch_optional(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "console session"))?
                .ok_or(StoreError::NotFound)?;
            Ok(session_from_row!(row))
        })
    }

    /// Marks a session ended at `now` (once: a later end keeps the first
    /// time). Its SPICE channels still open are then among
    /// [`Self::revoked_consoles`].
    pub async fn end_console_session(&self, token_hash: &str, now: DateTime<Utc>) -> StoreResult<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE console_sessions SET ended_at = $1 WHERE token_hash = $2 AND ended_at IS NULL",
            )
            .bind(now)
            .bind(token_hash)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "console session"))?;
            Ok(())
        })
    }

    /// Of `token_hashes`, the sessions revoked, with why, and those ended
    /// (whose SPICE channels end with their main channel).
    pub async fn revoked_consoles(&self, token_hashes: &[String]) -> StoreResult<Vec<(String, String)>> {
        let mut revoked = Vec::new();
        // Bound the statement's parameters (SQLite allows 32766).
        for chunk in token_hashes.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT token_hash, CASE WHEN revoked_at IS NOT NULL THEN revoked_reason \
                 ELSE 'the console session ended' END FROM console_sessions \
                 WHERE (revoked_at IS NOT NULL OR ended_at IS NOT NULL) AND token_hash IN ({})",
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
        let sql = format!("SELECT {COLUMNS} FROM console_sessions WHERE token_hash = $1");
        on_pool!(self, |pool| {
            // Only the column list is formatted in; the value is bound.
            let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
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
