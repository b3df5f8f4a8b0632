-- Images (issue 31): an id, per-provider backings, the properties tenants
-- filter on, public or private to a project, and a lifecycle. SQLite cannot
-- change a primary key: the table is rebuilt, with every column it had
-- (same names, types and values).
--
-- Expand only, as the PostgreSQL twin (README "Upgrades"): every new column
-- has a default or may be NULL, and `source` keeps what it held (the
-- backing of every provider without its own in image_backings).

CREATE TABLE images_new (
    id             BLOB PRIMARY KEY DEFAULT (randomblob(16)),
    name           TEXT NOT NULL,
    visibility     TEXT NOT NULL DEFAULT 'PUBLIC',
    tenant_id      TEXT NOT NULL DEFAULT '',
    project_id     TEXT NOT NULL DEFAULT '',
    status         TEXT NOT NULL DEFAULT 'AVAILABLE',
    os_type        TEXT NOT NULL,
    os_version     TEXT NOT NULL DEFAULT '',
    architecture   TEXT NOT NULL DEFAULT 'x86_64',
    source         TEXT NOT NULL,
    min_disk_gib   INTEGER NOT NULL,
    min_memory_mib INTEGER NOT NULL DEFAULT 0,
    description    TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL DEFAULT 0,
    sha256         TEXT NOT NULL DEFAULT '',
    error_message  TEXT,
    job_id         BLOB,
    captured_from  BLOB,
    created_at     TEXT NOT NULL,
    -- NULL: never changed since created; readers take created_at.
    updated_at     TEXT
);
INSERT INTO images_new (id, name, os_type, source, min_disk_gib, description, created_at)
SELECT randomblob(16), name, os_type, source, min_disk_gib, description, created_at FROM images;
DROP TABLE images;
ALTER TABLE images_new RENAME TO images;
CREATE UNIQUE INDEX images_name ON images (tenant_id, project_id, name);

CREATE TABLE image_backings (
    image_id BLOB NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    source   TEXT NOT NULL,
    stored   BOOLEAN NOT NULL,
    PRIMARY KEY (image_id, provider)
);

ALTER TABLE jobs ADD COLUMN image_id BLOB;

ALTER TABLE project_quotas ADD COLUMN max_images INTEGER;
ALTER TABLE project_quotas ADD COLUMN max_image_gib INTEGER;
