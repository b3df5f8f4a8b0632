-- Tenants' webhooks (issue 30): endpoints per project and the deliveries
-- of events to them. A delivery row is written in the transaction that
-- finishes a job or corrects a VM's status (the outbox pattern), one per
-- enabled endpoint of the project that takes the event; the delivery
-- worker sends, per endpoint and VM, the oldest undelivered row first.

CREATE TABLE webhook_endpoints (
    id                   UUID PRIMARY KEY,
    tenant_id            TEXT NOT NULL,
    project_id           TEXT NOT NULL,
    url                  TEXT NOT NULL,
    -- EventTypes as a bit mask (hcp_domain::webhook).
    event_mask           BIGINT NOT NULL,
    description          TEXT NOT NULL,
    -- The signing secret sealed with core's secrets key.
    sealed_secret        BYTEA NOT NULL,
    enabled              BOOLEAN NOT NULL,
    disabled_reason      TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    failing_since        TIMESTAMPTZ,
    created_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhook_endpoints_project ON webhook_endpoints (tenant_id, project_id);

CREATE TABLE webhook_deliveries (
    seq              BIGSERIAL PRIMARY KEY,
    event_id         UUID NOT NULL,
    endpoint_id      UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    vm_id            UUID NOT NULL,
    event_type       TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    last_attempt_at  TIMESTAMPTZ,
    last_status_code INTEGER,
    last_error       TEXT NOT NULL,
    last_duration_ms INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    delivered_at     TIMESTAMPTZ,
    UNIQUE (endpoint_id, event_id)
);
-- The worker's question: the oldest undelivered row per endpoint and VM.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, vm_id, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (endpoint_id, seq);

-- Every attempt, for the tenant's view of what happened.
CREATE TABLE webhook_attempts (
    delivery_seq BIGINT NOT NULL REFERENCES webhook_deliveries (seq) ON DELETE CASCADE,
    at           TIMESTAMPTZ NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL,
    duration_ms  INTEGER NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_seq, at);
