-- Hosts, placement and restart policies: the hosts each provider reports
-- (with HCP's own drain state), the host of each VM, tenants' placement
-- groups, zones' placement policies and VMs' restart policies.
CREATE TABLE hosts (
    provider_id      UUID NOT NULL,
    name             TEXT NOT NULL,
    vcpus            BIGINT NOT NULL,
    memory_mib       BIGINT NOT NULL,
    state            TEXT NOT NULL,
    drain            TEXT NOT NULL DEFAULT '',
    drain_started_at TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider_id, name)
);

ALTER TABLE vms ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never';
ALTER TABLE vms ADD COLUMN placement_group_id UUID;
CREATE INDEX vms_by_host ON vms (provider_id, host) WHERE status <> 'DELETED';

ALTER TABLE zones ADD COLUMN placement_policy TEXT NOT NULL DEFAULT 'spread';
ALTER TABLE zones ADD COLUMN cpu_overcommit DOUBLE PRECISION NOT NULL DEFAULT 4;
ALTER TABLE zones ADD COLUMN memory_overcommit DOUBLE PRECISION NOT NULL DEFAULT 1;

CREATE TABLE placement_groups (
    id          UUID PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    strict      BOOLEAN NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (tenant_id, project_id, name)
);

