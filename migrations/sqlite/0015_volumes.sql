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
    delete_on_vm_delete BOOLEAN NOT NULL DEFAULT FALSE,
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
