-- Volumes: block storage that outlives VMs (issue 28). See the PostgreSQL
-- migration of the same number for what each table is.

CREATE TABLE volume_types (
    name         TEXT PRIMARY KEY,
    description  TEXT NOT NULL,
    max_size_gib INTEGER NOT NULL,
    storage      TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE TABLE volumes (
    id             BLOB PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    name           TEXT NOT NULL,
    size_gib       INTEGER NOT NULL,
    zone           TEXT NOT NULL,
    volume_type    TEXT NOT NULL,
    provider_id    BLOB NOT NULL REFERENCES providers (id),
    storage        TEXT NOT NULL,
    host           TEXT NOT NULL DEFAULT '',
    native_id      TEXT,
    status         TEXT NOT NULL,
    vm_id          BLOB REFERENCES vms (id),
    device_index   INTEGER,
    current_job_id BLOB,
    error_code     TEXT,
    error_message  TEXT,
    metadata       TEXT NOT NULL,
    tags           TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    CHECK ((vm_id IS NULL) = (device_index IS NULL))
);
CREATE INDEX volumes_by_project ON volumes (tenant_id, project_id, id);
CREATE UNIQUE INDEX volumes_by_place ON volumes (vm_id, device_index) WHERE vm_id IS NOT NULL;
CREATE INDEX volumes_by_provider ON volumes (provider_id);

-- A volume job holds no VM unless the volume is (or is being) attached.
-- SQLite cannot drop a NOT NULL, so the jobs table is rebuilt. With
-- legacy_alter_table the rename leaves job_steps' reference naming "jobs",
-- which the new table then answers (same ids), so no reference dangles
-- and foreign keys stay on throughout.
PRAGMA legacy_alter_table = ON;
ALTER TABLE jobs RENAME TO jobs_before_volumes;
CREATE TABLE jobs (
    id                  BLOB PRIMARY KEY,
    tenant_id           TEXT NOT NULL,
    project_id          TEXT NOT NULL,
    kind                TEXT NOT NULL,
    vm_id               BLOB REFERENCES vms (id),
    status              TEXT NOT NULL,
    attempts            INTEGER NOT NULL,
    max_attempts        INTEGER NOT NULL,
    run_after           TEXT NOT NULL,
    lease_owner         TEXT,
    lease_expires_at    TEXT,
    error_code          TEXT,
    error_message       TEXT,
    actor               TEXT NOT NULL,
    traceparent         TEXT,
    created_at          TEXT NOT NULL,
    started_at          TEXT,
    finished_at         TEXT,
    updated_at          TEXT NOT NULL,
    prior_status        TEXT,
    snapshot_id         BLOB,
    params              TEXT NOT NULL DEFAULT '{"op":"none"}',
    request_id          TEXT NOT NULL DEFAULT '',
    volume_id           BLOB REFERENCES volumes (id),
    prior_volume_status TEXT
);
INSERT INTO jobs (id, tenant_id, project_id, kind, vm_id, status, attempts, max_attempts, run_after,
    lease_owner, lease_expires_at, error_code, error_message, actor, traceparent, created_at,
    started_at, finished_at, updated_at, prior_status, snapshot_id, params, request_id)
SELECT id, tenant_id, project_id, kind, vm_id, status, attempts, max_attempts, run_after,
    lease_owner, lease_expires_at, error_code, error_message, actor, traceparent, created_at,
    started_at, finished_at, updated_at, prior_status, snapshot_id, params, request_id
FROM jobs_before_volumes;
DROP TABLE jobs_before_volumes;
PRAGMA legacy_alter_table = OFF;
CREATE INDEX jobs_runnable ON jobs (status, run_after);
CREATE INDEX jobs_by_vm ON jobs (vm_id, id);
CREATE INDEX jobs_by_project ON jobs (tenant_id, project_id, id);
CREATE INDEX jobs_by_volume ON jobs (volume_id, id) WHERE volume_id IS NOT NULL;

ALTER TABLE project_quotas ADD COLUMN max_volumes INTEGER;
ALTER TABLE project_quotas ADD COLUMN max_volume_gib INTEGER;

CREATE TABLE volume_usage_events (
    id          BLOB PRIMARY KEY,
    at          TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    volume_id   BLOB NOT NULL,
    event       TEXT NOT NULL,
    size_gib    INTEGER NOT NULL,
    volume_type TEXT NOT NULL,
    vm_id       BLOB,
    job_id      BLOB
);
CREATE INDEX volume_usage_by_project ON volume_usage_events (tenant_id, project_id, at);
