-- HCP schema, PostgreSQL. The SQLite twin in ../sqlite/ has the same tables,
-- columns and meaning; only the column types differ. All timestamps are
-- written by HCP (never by database defaults) so both backends agree.

CREATE TABLE zones (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE flavors (
    name        TEXT PRIMARY KEY,
    vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
    disk_gib    INTEGER NOT NULL CHECK (disk_gib >= 0),
    description TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE images (
    name         TEXT PRIMARY KEY,
    os_type      TEXT NOT NULL,
    source       TEXT NOT NULL,
    min_disk_gib INTEGER NOT NULL,
    description  TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE providers (
    id               UUID PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    zone             TEXT NOT NULL REFERENCES zones (name),
    endpoint         TEXT NOT NULL,
    plugin_name      TEXT NOT NULL,
    plugin_version   TEXT NOT NULL,
    hypervisor       TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    capabilities     JSONB NOT NULL,
    healthy          BOOLEAN NOT NULL,
    health_message   TEXT NOT NULL,
    last_probe_at    TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL
);

CREATE TABLE vms (
    id             UUID PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    name           TEXT NOT NULL,
    flavor         TEXT NOT NULL,
    vcpus          INTEGER NOT NULL,
    memory_mib     INTEGER NOT NULL,
    disk_gib       INTEGER NOT NULL,
    image          TEXT NOT NULL,
    image_source   TEXT NOT NULL,
    zone           TEXT NOT NULL,
    provider_id    UUID NOT NULL REFERENCES providers (id),
    networks       JSONB NOT NULL,
    metadata       JSONB NOT NULL,
    tags           JSONB NOT NULL,
    user_data      TEXT,
    hostname       TEXT NOT NULL,
    status         TEXT NOT NULL,
    current_job_id UUID,
    error_code     TEXT,
    error_message  TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);
-- Keyset pagination per project, optionally by status.
CREATE INDEX vms_by_project ON vms (tenant_id, project_id, id);
CREATE INDEX vms_by_project_status ON vms (tenant_id, project_id, status, id);
CREATE INDEX vms_by_provider ON vms (provider_id) WHERE status <> 'DELETED';

-- One row per tag, for filtering; vms.tags keeps the list for reads.
CREATE TABLE vm_tags (
    vm_id UUID NOT NULL REFERENCES vms (id),
    tag   TEXT NOT NULL,
    PRIMARY KEY (vm_id, tag)
);
CREATE INDEX vm_tags_by_tag ON vm_tags (tag, vm_id);

CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    tenant_id        TEXT NOT NULL,
    project_id       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    vm_id            UUID NOT NULL REFERENCES vms (id),
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    run_after        TIMESTAMPTZ NOT NULL,
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ,
    error_code       TEXT,
    error_message    TEXT,
    actor            TEXT NOT NULL,
    traceparent      TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL
);
-- Workers look for runnable jobs: queued and due, or running with a lapsed lease.
CREATE INDEX jobs_runnable ON jobs (status, run_after);
CREATE INDEX jobs_by_vm ON jobs (vm_id);

-- The durable log of a job's completed steps; a job that is run again skips
-- what is recorded here.
CREATE TABLE job_steps (
    job_id      UUID NOT NULL REFERENCES jobs (id),
    step        TEXT NOT NULL,
    output      TEXT NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_id, step)
);

-- Append-only: HCP never updates or deletes rows here.
CREATE TABLE audit_events (
    id            UUID PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL,
    actor         TEXT NOT NULL,
    tenant_id     TEXT NOT NULL,
    project_id    TEXT NOT NULL,
    action        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    job_id        TEXT NOT NULL,
    trace_id      TEXT NOT NULL,
    detail        TEXT NOT NULL
);
CREATE INDEX audit_by_resource ON audit_events (resource_id, id);

-- Console sessions: only the SHA-256 of the token is stored.
CREATE TABLE console_sessions (
    token_hash TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    project_id TEXT NOT NULL,
    vm_id      UUID NOT NULL REFERENCES vms (id),
    protocol   TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at    TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX console_by_vm ON console_sessions (vm_id);
