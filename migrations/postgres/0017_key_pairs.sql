-- SSH key pairs (issue 29): the public keys a tenant imported into a
-- project, by name. HCP never holds a private key. A VM keeps the keys it
-- was created with (vms.ssh_keys: [{name, public_key}]), read when the
-- create was accepted, so deleting a key pair never changes what a
-- retried or recovered create sends.

CREATE TABLE key_pairs (
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    bits        INTEGER NOT NULL,
    comment     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, project_id, name)
);

ALTER TABLE vms ADD COLUMN ssh_keys JSONB NOT NULL DEFAULT '[]';
