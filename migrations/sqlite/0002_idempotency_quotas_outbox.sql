-- Idempotency keys, project quotas, the transactional outbox and usage
-- (metering) events.

-- The first successful answer to a mutating request, per tenant and key.
CREATE TABLE idempotency_keys (
    tenant_id    TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response     TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);

-- Limits per project; no row means no limit. Creates lock the row, so
-- concurrent creates in one project are checked one after the other.
CREATE TABLE project_quotas (
    tenant_id      TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    max_instances  INTEGER,
    max_vcpus      INTEGER,
    max_memory_mib INTEGER,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, project_id)
);

-- Messages to publish, written in the transaction of the change they
-- announce; a publisher sends them and marks them sent.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    published_at TEXT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Usage events, appended in the transaction of the state transition they
-- describe, so metering cannot drift from state.
CREATE TABLE usage_events (
    id         BLOB PRIMARY KEY,
    at         TEXT NOT NULL,
    tenant_id  TEXT NOT NULL,
    project_id TEXT NOT NULL,
    vm_id      BLOB NOT NULL,
    event      TEXT NOT NULL,
    flavor     TEXT NOT NULL,
    vcpus      INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    job_id     BLOB
);
CREATE INDEX usage_by_project ON usage_events (tenant_id, project_id, at);
