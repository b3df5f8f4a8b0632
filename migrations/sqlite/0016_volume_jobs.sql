-- no-transaction
-- A volume job holds no VM unless its volume is (or is being) attached, so
-- jobs.vm_id may be NULL. SQLite cannot drop a NOT NULL: the table is
-- rebuilt as SQLite's documentation prescribes (foreign keys off, which
-- only works outside a transaction, then one transaction for the rebuild).
-- job_steps keeps naming "jobs", which the new table answers with the same
-- ids. Run again after a crash between the commit and sqlx's bookkeeping,
-- it rebuilds the new table once more; nothing has written the new
-- columns by then (core migrates before it serves).
PRAGMA foreign_keys = OFF;
BEGIN;
CREATE TABLE jobs_rebuilt (
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
INSERT INTO jobs_rebuilt (id, tenant_id, project_id, kind, vm_id, status, attempts, max_attempts, run_after,
    lease_owner, lease_expires_at, error_code, error_message, actor, traceparent, created_at,
    started_at, finished_at, updated_at, prior_status, snapshot_id, params, request_id)
SELECT id, tenant_id, project_id, kind, vm_id, status, attempts, max_attempts, run_after,
    lease_owner, lease_expires_at, error_code, error_message, actor, traceparent, created_at,
    started_at, finished_at, updated_at, prior_status, snapshot_id, params, request_id
FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_rebuilt RENAME TO jobs;
CREATE INDEX jobs_runnable ON jobs (status, run_after);
CREATE INDEX jobs_by_vm ON jobs (vm_id, id);
CREATE INDEX jobs_by_project ON jobs (tenant_id, project_id, id);
CREATE INDEX jobs_by_volume ON jobs (volume_id, id) WHERE volume_id IS NOT NULL;

COMMIT;
PRAGMA foreign_keys = ON;
