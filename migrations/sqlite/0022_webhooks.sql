-- Tenants' webhooks (issue 30). See the PostgreSQL migration of the same number.

CREATE TABLE webhook_endpoints (
    id                   BLOB PRIMARY KEY,
    tenant_id            TEXT NOT NULL,
    project_id           TEXT NOT NULL,
    url                  TEXT NOT NULL,
    -- EventTypes as a bit mask (hcp_domain::webhook).
    event_mask           INTEGER NOT NULL,
    description          TEXT NOT NULL,
    -- The signing secret sealed with core's secrets key.
    sealed_secret        BLOB NOT NULL,
    enabled              BOOLEAN NOT NULL,
    disabled_reason      TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    failing_since        TEXT,
    created_at           TEXT NOT NULL
);
CREATE INDEX webhook_endpoints_project ON webhook_endpoints (tenant_id, project_id);

CREATE TABLE webhook_deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         BLOB NOT NULL,
    endpoint_id      BLOB NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    vm_id            BLOB NOT NULL,
    event_type       TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    next_attempt_at  TEXT NOT NULL,
    last_attempt_at  TEXT,
    last_status_code INTEGER,
    last_error       TEXT NOT NULL,
    last_duration_ms INTEGER NOT NULL,
    created_at       TEXT NOT NULL,
    delivered_at     TEXT,
    UNIQUE (endpoint_id, event_id)
);
-- The worker's question: the oldest undelivered row per endpoint and VM.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, vm_id, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (endpoint_id, seq);

-- Every attempt, for the tenant's view of what happened.
CREATE TABLE webhook_attempts (
    delivery_seq INTEGER NOT NULL REFERENCES webhook_deliveries (seq) ON DELETE CASCADE,
    at           TEXT NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL,
    duration_ms  INTEGER NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_seq, at);
