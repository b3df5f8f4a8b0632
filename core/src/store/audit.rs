//! The append-only audit trail: inserted inside the transaction of the action
//! it records (so an action and its audit row commit together), read by ops.

use hcp_proto::ids::EventId;

use super::{StoreError, StoreResult, col, on_pool};
use crate::model::AuditEvent;

macro_rules! insert_audit {
    ($conn:expr, $event:expr) => {{
        let ev: &$crate::model::AuditEvent = $event;
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
        .map_err(|e| $crate::store::StoreError::from_sqlx(e, "audit event"))?;
    }};
}
pub(crate) use insert_audit;

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
        let mut sql = String::from(
            "SELECT id, at, actor, tenant_id, project_id, action, resource_type, resource_id, \
             outcome, job_id, trace_id, detail FROM audit_events WHERE 1 = 1",
        );
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
                let id: uuid::Uuid = col!(row, "id");
                out.push(AuditEvent {
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
                });
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
}
