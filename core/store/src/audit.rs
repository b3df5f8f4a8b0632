//! The append-only audit trail: inserted inside the transaction of the action
//! it records (so an action and its audit row commit together), read by ops.

use hcp_proto::ids::EventId;

use super::{StoreError, StoreResult, col, on_pool};
use hcp_domain::model::AuditEvent;

macro_rules! insert_audit {
    ($conn:expr, $event:expr) => {{
        let ev: &hcp_domain::model::AuditEvent = $event;
        sqlx::query(
            "INSERT INTO audit_events (id, at, actor, tenant_id, project_id, action, \
             resource_type, resource_id, outcome, job_id, trace_id, detail) VALUES ($1, $2, $3, \
             $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(ev.id.0)
        .bind(ev.at)
        .bind(&ev.actor)
        .bind(&ev.tenant_id)
        .bind(&ev.project_id)
        .bind(&ev.action)
        .bind(&ev.resource_type)
        .bind(&ev.resource_id)
        .bind(&ev.outcome)
        .bind(&ev.job_id)
        .bind(&ev.trace_id)
        .bind(&ev.detail)
        .execute($conn)
        .await
        .map_err(|e| $crate::StoreError::from_sqlx(e, "audit event"))?;
    }};
}
pub(crate) use insert_audit;

/// The event columns, in [`audit_from_row`]'s order.
const AUDIT_COLUMNS: &str = "id, at, actor, tenant_id, project_id, action, resource_type, resource_id, \
     outcome, job_id, trace_id, detail";

macro_rules! audit_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        AuditEvent {
            id: EventId(id),
            at: col!(row, "at"),
            actor: col!(row, "actor"),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            action: col!(row, "action"),
            resource_type: col!(row, "resource_type"),
            resource_id: col!(row, "resource_id"),
            outcome: col!(row, "outcome"),
            job_id: col!(row, "job_id"),
            trace_id: col!(row, "trace_id"),
            detail: col!(row, "detail"),
        }
    }};
}

/// A sealed event as stored: its place in the chain and the hashes.
#[derive(Debug, Clone)]
pub struct ChainedEvent {
    /// The event.
    pub event: AuditEvent,
    /// Its sequence number.
    pub seq: i64,
    /// The hash of the event before it ("" for the first).
    pub prev_hash: String,
    /// Its own hash.
    pub hash: String,
    /// The id of the key its hash was computed under; `None` when it was
    /// sealed without a key (before migration 0011, or by a core with no
    /// secrets key).
    pub key_id: Option<String>,
}

/// The last sealed event's place in the chain: what an anchor records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Its sequence number.
    pub seq: i64,
    /// Its hash.
    pub hash: String,
    /// The key its hash was computed under, if any.
    pub key_id: Option<String>,
}

/// Filters for [`super::Store::list_audit_events`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only events about this resource.
    pub resource_id: Option<String>,
    /// Only events in this project.
    pub project_id: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Page size (1..=1000).
    pub page_size: u32,
    /// The last id of the previous page (keyset pagination).
    pub after: Option<uuid::Uuid>,
}

impl super::Store {
    /// Appends one audit event on its own (for actions with no other write,
    /// such as a denied request).
    pub async fn append_audit(&self, event: &AuditEvent) -> StoreResult<()> {
        on_pool!(self, |pool| {
            insert_audit!(pool, event);
        });
        Ok(())
    }

    /// Lists audit events, oldest first.
    pub async fn list_audit_events(
        &self,
        query: &AuditQuery,
    ) -> StoreResult<(Vec<AuditEvent>, Option<uuid::Uuid>)> {
        let after = query.after;
        let limit = i64::from(query.page_size.clamp(1, 1000));
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE 1 = 1");
        let mut n = 0;
        let mut p = || {
            n += 1;
            n
        };
        if after.is_some() {
            sql.push_str(&format!(" AND id > ${}", p()));
        }
        if query.resource_id.is_some() {
            sql.push_str(&format!(" AND resource_id = ${}", p()));
        }
        if query.project_id.is_some() {
            sql.push_str(&format!(" AND project_id = ${}", p()));
        }
        if query.action.is_some() {
            sql.push_str(&format!(" AND action = ${}", p()));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", p()));
        let mut events = on_pool!(self, |pool| {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
            if let Some(a) = after {
                q = q.bind(a);
            }
            if let Some(v) = &query.resource_id {
                q = q.bind(v);
            }
            if let Some(v) = &query.project_id {
                q = q.bind(v);
            }
            if let Some(v) = &query.action {
                q = q.bind(v);
            }
            let rows = q
                .bind(limit + 1)
                .fetch_all(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "audit events"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(audit_from_row!(row));
            }
            out
        });
        let next = if events.len() as i64 > limit {
            events.truncate(limit as usize);
            events.last().map(|e| e.id.0)
        } else {
            None
        };
        Ok((events, next))
    }

    /// Seals up to `limit` unsealed events, oldest first, in one
    /// transaction: each gets the next sequence number after the chain's
    /// head, the head's hash as `prev_hash`, `hash(prev_hash, seq, event)`
    /// as computed by the caller and `key_id`, the key the caller computed
    /// it under. Returns how many were sealed. Two sealers at once cannot
    /// both extend the chain: sequence numbers are unique, so the second
    /// one's transaction fails.
    pub async fn seal_audit_events(
        &self,
        limit: u32,
        key_id: Option<&str>,
        hash: impl Fn(&str, i64, &AuditEvent) -> String,
    ) -> StoreResult<usize> {
        on_pool!(transaction self, |tx| {
            let head = sqlx::query(
                "SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
            let (mut seq, mut prev): (i64, String) = match &head {
                Some(row) => {
                    let hash: Option<String> = col!(row, "hash");
                    (col!(row, "seq"), hash.unwrap_or_default())
                }
                None => (0, String::new()),
            };
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq IS NULL ORDER BY at, id LIMIT $1"
            )))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
            for row in &rows {
                let event = audit_from_row!(row);
                seq += 1;
                let h = hash(&prev, seq, &event);
                sqlx::query(
                    "UPDATE audit_events SET seq = $1, prev_hash = $2, hash = $3, key_id = $4 \
                     WHERE id = $5 AND seq IS NULL",
                )
                .bind(seq)
                .bind(&prev)
                .bind(&h)
                .bind(key_id)
                .bind(event.id.0)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
                prev = h;
            }
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
            Ok(rows.len())
        })
    }

    /// Sealed events in chain order, after sequence number `after`.
    pub async fn chained_audit_events(&self, after: i64, limit: u32) -> StoreResult<Vec<ChainedEvent>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {AUDIT_COLUMNS}, seq, prev_hash, hash, key_id FROM audit_events \
                 WHERE seq > $1 ORDER BY seq LIMIT $2"
            )))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                // A hash someone set to NULL reads as empty, so the check
                // names the event instead of the read failing.
                let prev_hash: Option<String> = col!(row, "prev_hash");
                let hash: Option<String> = col!(row, "hash");
                out.push(ChainedEvent {
                    event: audit_from_row!(row),
                    seq: col!(row, "seq"),
                    prev_hash: prev_hash.unwrap_or_default(),
                    hash: hash.unwrap_or_default(),
                    key_id: col!(row, "key_id"),
                });
            }
            Ok(out)
        })
    }

    /// The chain's head: the sealed event with the highest sequence
    /// number, if any.
    pub async fn audit_chain_head(&self) -> StoreResult<Option<ChainHead>> {
        on_pool!(self, |pool| {
            let row = sqlx::query(
                "SELECT seq, hash, key_id FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "audit chain"))?;
            let Some(row) = row else { return Ok(None) };
            let hash: Option<String> = col!(&row, "hash");
            Ok(Some(ChainHead {
                seq: col!(&row, "seq"),
                hash: hash.unwrap_or_default(),
                key_id: col!(&row, "key_id"),
            }))
        })
    }

    /// How many events are not sealed yet.
    pub async fn unsealed_audit_events(&self) -> StoreResult<i64> {
        on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE seq IS NULL")
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "audit chain"))
        })
    }
}
