-- Images (issue 31): an id, per-provider backings, the properties tenants
-- filter on, public or private to a project, and a lifecycle (an import or
-- a capture runs as a job; so does the removal of what providers stored).

ALTER TABLE images ADD COLUMN id UUID;
UPDATE images SET id = gen_random_uuid();
ALTER TABLE images ALTER COLUMN id SET NOT NULL;
ALTER TABLE images DROP CONSTRAINT images_pkey;
ALTER TABLE images ADD PRIMARY KEY (id);
ALTER TABLE images ADD COLUMN visibility TEXT NOT NULL DEFAULT 'PUBLIC';
ALTER TABLE images ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN project_id TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN status TEXT NOT NULL DEFAULT 'AVAILABLE';
ALTER TABLE images ADD COLUMN os_version TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN architecture TEXT NOT NULL DEFAULT 'x86_64';
ALTER TABLE images ADD COLUMN min_memory_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN size_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN error_message TEXT;
ALTER TABLE images ADD COLUMN job_id UUID;
ALTER TABLE images ADD COLUMN captured_from UUID;
ALTER TABLE images ADD COLUMN updated_at TIMESTAMPTZ;
UPDATE images SET updated_at = created_at;
ALTER TABLE images ALTER COLUMN updated_at SET NOT NULL;
-- Public names are unique (project ''), private ones within their project.
CREATE UNIQUE INDEX images_name ON images (tenant_id, project_id, name);

-- What each provider resolves an image to. `stored`: the provider holds it
-- for HCP (an import, a capture) and deleting the image removes it there.
CREATE TABLE image_backings (
    image_id UUID NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    source   TEXT NOT NULL,
    stored   BOOLEAN NOT NULL,
    PRIMARY KEY (image_id, provider)
);

-- Nothing recorded which providers used an image's one source: it becomes
-- a backing on every provider registered now.
INSERT INTO image_backings (image_id, provider, source, stored)
SELECT i.id, p.name, i.source, FALSE FROM images i CROSS JOIN providers p WHERE i.source <> '';
UPDATE images SET source = '';

CREATE TRIGGER image_backings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON image_backings
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();

-- Image jobs and captures name their image (no foreign key: a deleted
-- image's row goes, its jobs stay).
ALTER TABLE jobs ADD COLUMN image_id UUID;

ALTER TABLE project_quotas ADD COLUMN max_images INTEGER;
ALTER TABLE project_quotas ADD COLUMN max_image_gib BIGINT;
