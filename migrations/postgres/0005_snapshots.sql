-- VM snapshots, and the snapshot a job operates on.
CREATE TABLE snapshots (
    id         UUID PRIMARY KEY,
    vm_id      UUID NOT NULL REFERENCES vms (id),
    tenant_id  TEXT NOT NULL,
    project_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, id);

ALTER TABLE jobs ADD COLUMN snapshot_id UUID;
