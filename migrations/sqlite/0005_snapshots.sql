-- VM snapshots, and the snapshot a job operates on.
CREATE TABLE snapshots (
    id         BLOB PRIMARY KEY,
    vm_id      BLOB NOT NULL REFERENCES vms (id),
    tenant_id  TEXT NOT NULL,
    project_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, id);

ALTER TABLE jobs ADD COLUMN snapshot_id BLOB;
