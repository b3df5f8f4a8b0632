-- Day-2 operations: job parameters (stop, reboot, resize), the request id
-- in the action history, and the network catalog.
ALTER TABLE jobs ADD COLUMN params JSONB NOT NULL DEFAULT '{"op":"none"}';
ALTER TABLE jobs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_by_project ON jobs (tenant_id, project_id, id);
DROP INDEX jobs_by_vm;
CREATE INDEX jobs_by_vm ON jobs (vm_id, id);

CREATE TABLE networks (
    zone        TEXT NOT NULL REFERENCES zones (name),
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    backings    JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (zone, name)
);

-- Networks VMs already use stay valid: they enter the catalog unmapped.
INSERT INTO networks (zone, name, description, backings, created_at)
SELECT DISTINCT v.zone, n.value ->> 'network', '', '{}'::jsonb, now()
FROM vms v, jsonb_array_elements(v.networks) AS n
ON CONFLICT DO NOTHING;
