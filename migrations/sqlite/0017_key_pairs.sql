-- SSH key pairs (issue 29). See the PostgreSQL migration of the same number
-- for what each table is.

CREATE TABLE key_pairs (
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    bits        INTEGER NOT NULL,
    comment     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, project_id, name)
);

ALTER TABLE vms ADD COLUMN ssh_keys TEXT NOT NULL DEFAULT '[]';
