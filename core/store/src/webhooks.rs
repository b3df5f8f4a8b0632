//! Tenants' webhook endpoints and the deliveries of events to them.
//!
//! Deliveries are written like outbox rows: [`insert_webhook_events!`] runs
//! in the transaction that finishes a job (`apply_transition!`, and the
//! one-statement finish on PostgreSQL) or corrects a VM's status, one row
//! per enabled endpoint of the project that takes the event. The delivery
//! worker asks for the due rows that are the oldest undelivered one of
//! their endpoint and subject ([`super::Store::due_webhook_deliveries`]),
//! so an endpoint hears of one VM's (or one volume's) events in the order
//! they happened. The subject's key is the `vm_id` column, which holds a
//! volume's id for a volume's events (migration 0024: `volume_id` says
//! which, NULL for a VM's).

use chrono::{DateTime, Utc};
use hcp_domain::model::{AuditEvent, DeliveryStatus, Scope, WebhookEvent};
use hcp_domain::webhook::{AttemptResult, EventTypes, Subject, WebhookDelivery, WebhookEndpoint};
use hcp_proto::ids::{EventId, VmId, VolumeId, WebhookId};

use super::{StoreError, StoreResult, col, on_pool, to_i32, to_u32};

const ENDPOINT_COLUMNS: &str = "id, tenant_id, project_id, url, event_mask, description, sealed_secret, \
     enabled, disabled_reason, consecutive_failures, failing_since, created_at";

const DELIVERY_COLUMNS: &str = "seq, event_id, endpoint_id, vm_id, event_type, payload, status, attempts, \
     next_attempt_at, last_attempt_at, last_status_code, last_error, last_duration_ms, created_at, \
     delivered_at, volume_id";

/// What the worker writes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx: the delivery is done and the endpoint's failures reset.
    Delivered,
    /// A failure: the delivery is due again at the time given, and the
    /// endpoint counts one more failure.
    Retry(DateTime<Utc>),
}

macro_rules! endpoint_from_row {
    ($row:expr) => {{
        let row = $row;
        let id: uuid::Uuid = col!(row, "id");
        let mask: i64 = col!(row, "event_mask");
        let failures: i32 = col!(row, "consecutive_failures");
        WebhookEndpoint {
            id: WebhookId(id),
            tenant_id: col!(row, "tenant_id"),
            project_id: col!(row, "project_id"),
            url: col!(row, "url"),
            events: EventTypes::from_bits(mask),
            description: col!(row, "description"),
            sealed_secret: col!(row, "sealed_secret"),
            enabled: col!(row, "enabled"),
            disabled_reason: col!(row, "disabled_reason"),
            consecutive_failures: to_u32(failures, "consecutive_failures")?,
            failing_since: col!(row, "failing_since"),
            created_at: col!(row, "created_at"),
        }
    }};
}

macro_rules! delivery_from_row {
    ($row:expr) => {{
        let row = $row;
        let event_id: uuid::Uuid = col!(row, "event_id");
        let endpoint_id: uuid::Uuid = col!(row, "endpoint_id");
        let key: uuid::Uuid = col!(row, "vm_id");
        let volume_id: Option<uuid::Uuid> = col!(row, "volume_id");
        let event: String = col!(row, "event_type");
        let status: String = col!(row, "status");
        let attempts: i32 = col!(row, "attempts");
        let code: Option<i32> = col!(row, "last_status_code");
        let duration: i32 = col!(row, "last_duration_ms");
        WebhookDelivery {
            seq: col!(row, "seq"),
            event_id: EventId(event_id),
            endpoint_id: WebhookId(endpoint_id),
            subject: match volume_id {
                Some(volume) => Subject::Volume(VolumeId(volume)),
                None => Subject::Vm(VmId(key)),
            },
            event: WebhookEvent::parse(&event)
                .ok_or_else(|| StoreError::Corrupt(format!("webhook event type {event:?}")))?,
            payload: col!(row, "payload"),
            status: DeliveryStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
            attempts: to_u32(attempts, "attempts")?,
            next_attempt_at: col!(row, "next_attempt_at"),
            last_attempt_at: col!(row, "last_attempt_at"),
            last_status_code: code.and_then(|c| u16::try_from(c).ok()),
            last_error: col!(row, "last_error"),
            last_duration_ms: to_u32(duration, "last_duration_ms")?,
            created_at: col!(row, "created_at"),
            delivered_at: col!(row, "delivered_at"),
        }
    }};
}

/// The ordering key of a subject's deliveries (the `vm_id` column) and
/// the volume it names (the `volume_id` column).
pub(crate) fn subject_columns(subject: Subject) -> (uuid::Uuid, Option<uuid::Uuid>) {
    match subject {
        Subject::Vm(vm) => (vm.0, None),
        Subject::Volume(volume) => (volume.0, Some(volume.0)),
    }
}

/// Writes one delivery per enabled endpoint of the project that takes the
/// event, for each of `$payloads` in order (each under its subject),
/// inside a transaction.
macro_rules! insert_webhook_events {
    ($conn:expr, $tenant:expr, $project:expr, $payloads:expr, $at:expr) => {{
        let payloads: &[hcp_domain::webhook::Payload] = $payloads;
        for p in payloads {
            let (key, volume) = $crate::webhooks::subject_columns(p.subject);
            sqlx::query($crate::sql!(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, vm_id, event_type, payload, status, \
                 attempts, next_attempt_at, last_error, last_duration_ms, created_at, volume_id) \
                 SELECT $1, id, $2, $3, $4, {pending}, 0, $5, '', 0, $5, $9 FROM webhook_endpoints \
                 WHERE tenant_id = $6 AND project_id = $7 AND enabled AND (event_mask & $8) <> 0 ORDER BY id",
                pending = hcp_domain::model::DeliveryStatus::Pending
            ))
            .bind(p.id.0)
            .bind(key)
            .bind(p.event)
            .bind(serde_json::to_string(p).unwrap_or_default())
            .bind($at)
            .bind($tenant)
            .bind($project)
            .bind(p.event_type().bit())
            .bind(volume)
            .execute(&mut *$conn)
            .await
            .map_err(|e| $crate::StoreError::from_sqlx(e, "webhook delivery"))?;
        }
    }};
}
pub(crate) use insert_webhook_events;

/// Writes the `vm.status_changed` deliveries of a VM whose status was set
/// from `$from` to `$to` outside a job (a reconciler's correction, an
/// operator's reset), inside a transaction; nothing when they are equal.
macro_rules! insert_status_change {
    ($conn:expr, $vm:expr, $from:expr, $to:expr, $at:expr) => {{
        let (vm, from, to): (hcp_proto::ids::VmId, hcp_domain::model::VmStatus, hcp_domain::model::VmStatus) =
            ($vm, $from, $to);
        if from != to {
            let owner = sqlx::query("SELECT tenant_id, project_id FROM vms WHERE id = $1")
                .bind(vm.0)
                .fetch_one(&mut *$conn)
                .await
                .map_err(|e| $crate::StoreError::from_sqlx(e, "vm"))?;
            let (tenant, project): (String, String) =
                ($crate::col!(&owner, "tenant_id"), $crate::col!(&owner, "project_id"));
            let events = [hcp_domain::webhook::correction_event(&project, vm, from, to, $at)];
            $crate::webhooks::insert_webhook_events!($conn, &tenant, &project, &events, $at);
        }
    }};
}
pub(crate) use insert_status_change;

impl super::Store {
    /// Registers an endpoint with its audit event: QuotaExceeded when the
    /// project already holds `max` (counted with their rows locked on
    /// PostgreSQL, so concurrent creates are counted one after the other).
    pub async fn create_webhook(&self, e: &WebhookEndpoint, max: u32, audit: &AuditEvent) -> StoreResult<()> {
        let kind = self.kind();
        on_pool!(transaction self, |tx| {
            let lock = match kind {
                super::BackendKind::Postgres => " FOR UPDATE",
                super::BackendKind::Sqlite => "",
            };
            let held = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM webhook_endpoints WHERE tenant_id = $1 AND project_id = $2{lock}"
            )))
            .bind(&e.tenant_id)
            .bind(&e.project_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|err| StoreError::from_sqlx(err, "webhooks"))?;
            if held.len() >= max as usize {
                return Err(StoreError::QuotaExceeded(format!(
                    "project {} already holds the most webhook endpoints a project may hold ({max})",
                    e.project_id
                )));
            }
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, tenant_id, project_id, url, event_mask, description, \
                 sealed_secret, enabled, disabled_reason, consecutive_failures, failing_since, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(e.id.0)
            .bind(&e.tenant_id)
            .bind(&e.project_id)
            .bind(&e.url)
            .bind(e.events.bits())
            .bind(&e.description)
            .bind(&e.sealed_secret)
            .bind(e.enabled)
            .bind(&e.disabled_reason)
            .bind(to_i32(e.consecutive_failures))
            .bind(e.failing_since)
            .bind(e.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|err| StoreError::from_sqlx(err, "webhook"))?;
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|err| StoreError::from_sqlx(err, "commit"))?;
            Ok(())
        })
    }

    /// The project's endpoints, oldest first.
    pub async fn list_webhooks(&self, scope: &Scope) -> StoreResult<Vec<WebhookEndpoint>> {
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND project_id = $2 \
                 ORDER BY id"
            )))
            .bind(&scope.tenant)
            .bind(&scope.project)
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhooks"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(endpoint_from_row!(row));
            }
            Ok(out)
        })
    }

    /// One endpoint of the project (NotFound for another project's).
    pub async fn get_webhook(&self, scope: &Scope, id: WebhookId) -> StoreResult<WebhookEndpoint> {
        on_pool!(self, |pool| {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND project_id = $2 \
                 AND id = $3"
            )))
            .bind(&scope.tenant)
            .bind(&scope.project)
            .bind(id.0)
            .fetch_optional(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook"))?
            .ok_or(StoreError::NotFound)?;
            Ok(endpoint_from_row!(&row))
        })
    }

    /// Deletes an endpoint, its deliveries and their attempts, with the
    /// audit event (NotFound when the project has no such endpoint).
    pub async fn delete_webhook(&self, scope: &Scope, id: WebhookId, audit: &AuditEvent) -> StoreResult<()> {
        on_pool!(transaction self, |tx| {
            let done =
                sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND project_id = $2 AND id = $3")
                    .bind(&scope.tenant)
                    .bind(&scope.project)
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(())
        })
    }

    /// Enables an endpoint again: its failures are forgotten and its
    /// pending deliveries are due at once (NotFound when the project has
    /// no such endpoint). Returns the endpoint as it now is.
    pub async fn enable_webhook(
        &self,
        scope: &Scope,
        id: WebhookId,
        now: DateTime<Utc>,
        audit: &AuditEvent,
    ) -> StoreResult<WebhookEndpoint> {
        on_pool!(transaction self, |tx| {
            let done = sqlx::query(
                "UPDATE webhook_endpoints SET enabled = TRUE, disabled_reason = '', consecutive_failures = 0, \
                 failing_since = NULL WHERE tenant_id = $1 AND project_id = $2 AND id = $3",
            )
            .bind(&scope.tenant)
            .bind(&scope.project)
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE endpoint_id = $2 \
                 AND delivered_at IS NULL",
            )
            .bind(now)
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook deliveries"))?;
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"
            )))
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
            let endpoint = endpoint_from_row!(&row);
            super::audit::insert_audit!(&mut *tx, audit);
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(endpoint)
        })
    }

    /// The endpoint's latest deliveries, newest first, at most `limit`.
    pub async fn list_webhook_deliveries(
        &self,
        scope: &Scope,
        id: WebhookId,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        // The endpoint must be the project's; its deliveries follow.
        self.get_webhook(scope, id).await?;
        on_pool!(self, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 \
                 ORDER BY seq DESC LIMIT $2"
            )))
            .bind(id.0)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook deliveries"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(delivery_from_row!(row));
            }
            Ok(out)
        })
    }

    /// Up to `limit` deliveries due at `now` to enabled endpoints, each the
    /// oldest undelivered one of its endpoint and subject (VM or volume),
    /// oldest first, with their endpoints.
    pub async fn due_webhook_deliveries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(WebhookDelivery, WebhookEndpoint)>> {
        on_pool!(self, |pool| {
            // vm_id is the subject's key: a VM's id, or a volume's.
            let rows = sqlx::query(
                "SELECT d.seq FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
                 WHERE d.delivered_at IS NULL AND e.enabled AND d.next_attempt_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries o WHERE o.endpoint_id = d.endpoint_id \
                 AND o.vm_id = d.vm_id AND o.delivered_at IS NULL AND o.seq < d.seq) \
                 ORDER BY d.seq LIMIT $2",
            )
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook deliveries"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let seq: i64 = col!(row, "seq");
                let d = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE seq = $1"
                )))
                .bind(seq)
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "webhook delivery"))?;
                let delivery = delivery_from_row!(&d);
                let e = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"
                )))
                .bind(delivery.endpoint_id.0)
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
                out.push((delivery, endpoint_from_row!(&e)));
            }
            Ok(out)
        })
    }

    /// Records an attempt of delivery `seq` to `endpoint` and what it leads
    /// to, in one transaction. A delivery already delivered stays so.
    /// Returns the endpoint's failures in a row and since when, as they now
    /// are.
    pub async fn record_webhook_attempt(
        &self,
        seq: i64,
        endpoint: WebhookId,
        attempt: &AttemptResult,
        outcome: AttemptOutcome,
    ) -> StoreResult<(u32, Option<DateTime<Utc>>)> {
        on_pool!(transaction self, |tx| {
            sqlx::query(
                "INSERT INTO webhook_attempts (delivery_seq, at, status_code, error, duration_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(seq)
            .bind(attempt.at)
            .bind(attempt.status_code.map(i32::from))
            .bind(&attempt.error)
            .bind(to_i32(attempt.duration_ms))
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook attempt"))?;
            let (status, next, delivered_at) = match outcome {
                AttemptOutcome::Delivered => (DeliveryStatus::Delivered, attempt.at, Some(attempt.at)),
                AttemptOutcome::Retry(next) => (DeliveryStatus::Pending, next, None),
            };
            sqlx::query(
                "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, next_attempt_at = $2, \
                 last_attempt_at = $3, last_status_code = $4, last_error = $5, last_duration_ms = $6, \
                 delivered_at = $7 WHERE seq = $8 AND delivered_at IS NULL",
            )
            .bind(status.as_str())
            .bind(next)
            .bind(attempt.at)
            .bind(attempt.status_code.map(i32::from))
            .bind(&attempt.error)
            .bind(to_i32(attempt.duration_ms))
            .bind(delivered_at)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook delivery"))?;
            let failed = matches!(outcome, AttemptOutcome::Retry(_));
            let row = sqlx::query(
                "UPDATE webhook_endpoints SET \
                 consecutive_failures = CASE WHEN $1 THEN consecutive_failures + 1 ELSE 0 END, \
                 failing_since = CASE WHEN $1 THEN COALESCE(failing_since, $2) ELSE NULL END \
                 WHERE id = $3 RETURNING consecutive_failures, failing_since",
            )
            .bind(failed)
            .bind(attempt.at)
            .bind(endpoint.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
            let state = match row {
                Some(row) => {
                    let failures: i32 = col!(&row, "consecutive_failures");
                    (to_u32(failures, "consecutive_failures")?, col!(&row, "failing_since"))
                }
                // Deleted meanwhile.
                None => (0, None),
            };
            tx.commit().await.map_err(|e| StoreError::from_sqlx(e, "commit"))?;
            Ok(state)
        })
    }

    /// Removes deliveries delivered before `before`, with their attempts;
    /// returns how many.
    pub async fn purge_webhook_deliveries(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        on_pool!(self, |pool| {
            let done = sqlx::query("DELETE FROM webhook_deliveries WHERE delivered_at < $1")
                .bind(before)
                .execute(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "webhook deliveries"))?;
            Ok(done.rows_affected())
        })
    }

    /// Disables an endpoint with the reason its tenant sees; its pending
    /// deliveries wait until it is enabled again.
    pub async fn disable_webhook(&self, endpoint: WebhookId, reason: &str) -> StoreResult<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = $1 WHERE id = $2 AND enabled",
            )
            .bind(reason)
            .bind(endpoint.0)
            .execute(pool)
            .await
            .map_err(|e| StoreError::from_sqlx(e, "webhook"))?;
            Ok(())
        })
    }
}

/// The parts of [`insert_webhook_events!`] the one-statement finish binds
/// itself: per event, its id, type, JSON and bit. That finish takes only
/// jobs without a volume, whose events are all their VM's.
pub(crate) fn event_columns(
    payloads: &[hcp_domain::webhook::Payload],
) -> Vec<(uuid::Uuid, &'static str, String, i64)> {
    payloads
        .iter()
        .map(|p| (p.id.0, p.event, serde_json::to_string(p).unwrap_or_default(), p.event_type().bit()))
        .collect()
}
