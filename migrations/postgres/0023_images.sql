-- Images (issue 31): an id, per-provider backings, the properties tenants
-- filter on, public or private to a project, and a lifecycle (an import or
-- a capture runs as a job; so does the removal of what providers stored).
--
-- Expand only (README "Upgrades"): the previous release's processes keep
-- running on this schema during a rolling upgrade. They insert images as
-- (name, os_type, source, min_disk_gib, description, created_at) and read
-- `source` as the image's one backing, so every new column has a default
-- or may be NULL, and `source` keeps what it held: it is the backing of
-- every provider without its own in image_backings, exactly what it meant
-- before.

-- The default stays: the previous release inserts images without an id.
ALTER TABLE images ADD COLUMN id UUID NOT NULL DEFAULT gen_random_uuid();
-- Public names stay unique (tenant and project ''), as the old primary key
-- kept them; private ones are unique within their project.
ALTER TABLE images ADD COLUMN visibility TEXT NOT NULL DEFAULT 'PUBLIC';
ALTER TABLE images ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN project_id TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX images_name ON images (tenant_id, project_id, name);
ALTER TABLE images DROP CONSTRAINT images_pkey;
ALTER TABLE images ADD PRIMARY KEY (id);
ALTER TABLE images ADD COLUMN status TEXT NOT NULL DEFAULT 'AVAILABLE';
ALTER TABLE images ADD COLUMN os_version TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN architecture TEXT NOT NULL DEFAULT 'x86_64';
ALTER TABLE images ADD COLUMN min_memory_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN size_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN error_message TEXT;
ALTER TABLE images ADD COLUMN job_id UUID;
ALTER TABLE images ADD COLUMN captured_from UUID;
-- NULL: never changed since created (a row the previous release inserted);
-- readers take created_at.
ALTER TABLE images ADD COLUMN updated_at TIMESTAMPTZ;

-- What a provider resolves an image to when it is not `source`.
-- `stored`: the provider holds it for HCP (an import, a capture) and
-- deleting the image removes it there.
CREATE TABLE image_backings (
    image_id UUID NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    source   TEXT NOT NULL,
    stored   BOOLEAN NOT NULL,
    PRIMARY KEY (image_id, provider)
);

CREATE TRIGGER image_backings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON image_backings
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();

-- Image jobs and captures name their image (no foreign key: a deleted
-- image's row goes, its jobs stay).
ALTER TABLE jobs ADD COLUMN image_id UUID;

ALTER TABLE project_quotas ADD COLUMN max_images INTEGER;
ALTER TABLE project_quotas ADD COLUMN max_image_gib BIGINT;
