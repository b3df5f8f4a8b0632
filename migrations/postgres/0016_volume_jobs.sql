-- A volume job holds no VM unless the volume is (or is being) attached.
ALTER TABLE jobs ALTER COLUMN vm_id DROP NOT NULL;
ALTER TABLE jobs ADD COLUMN volume_id UUID REFERENCES volumes (id);
ALTER TABLE jobs ADD COLUMN prior_volume_status TEXT;
CREATE INDEX jobs_by_volume ON jobs (volume_id, id) WHERE volume_id IS NOT NULL;

