-- Volumes: block storage that outlives VMs (issue 28).

-- The operator's catalog of volume types; `storage` maps a provider's name
-- to where volumes of the type live on it.
CREATE TABLE volume_types (
    name         TEXT PRIMARY KEY,
    description  TEXT NOT NULL,
    max_size_gib INTEGER NOT NULL,
    storage      JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);

-- A volume lives in one zone on one provider (and, for host-local storage,
-- on one host once first attached). `vm_id` and `device_index` say where it
-- is attached (an attach in flight included); one volume per place on a VM.
CREATE TABLE volumes (
    id             UUID PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    name           TEXT NOT NULL,
    size_gib       INTEGER NOT NULL,
    zone           TEXT NOT NULL,
    volume_type    TEXT NOT NULL,
    provider_id    UUID NOT NULL REFERENCES providers (id),
    storage        TEXT NOT NULL,
    host           TEXT NOT NULL DEFAULT '',
    native_id      TEXT,
    status         TEXT NOT NULL,
    vm_id          UUID REFERENCES vms (id),
    device_index   INTEGER,
    delete_on_vm_delete BOOLEAN NOT NULL DEFAULT FALSE,
    current_job_id UUID,
    error_code     TEXT,
    error_message  TEXT,
    metadata       JSONB NOT NULL,
    tags           JSONB NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    CHECK ((vm_id IS NULL) = (device_index IS NULL))
);
CREATE INDEX volumes_by_project ON volumes (tenant_id, project_id, id);
CREATE UNIQUE INDEX volumes_by_place ON volumes (vm_id, device_index) WHERE vm_id IS NOT NULL;
CREATE INDEX volumes_by_provider ON volumes (provider_id);

ALTER TABLE project_quotas ADD COLUMN max_volumes INTEGER;
ALTER TABLE project_quotas ADD COLUMN max_volume_gib BIGINT;

-- Usage of volumes, appended with the change they describe (like
-- usage_events for VMs).
CREATE TABLE volume_usage_events (
    id          UUID PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL,
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    volume_id   UUID NOT NULL,
    event       TEXT NOT NULL,
    size_gib    INTEGER NOT NULL,
    volume_type TEXT NOT NULL,
    vm_id       UUID,
    job_id      UUID
);
CREATE INDEX volume_usage_by_project ON volume_usage_events (tenant_id, project_id, at);
