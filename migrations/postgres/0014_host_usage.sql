-- What HCP has placed on each host, kept on the host's row so that the
-- transaction accepting a VM onto a host can check its room under the row's
-- lock: a create, a resize or a move onto the host first locks the row
-- (SELECT ... FOR UPDATE sees the last committed counts), then the VM's own
-- write moves the counts through the triggers below, so concurrent accepts
-- onto one host queue on its row and never both take the last room.
--
-- The triggers count every VM that is not DELETED, on whichever path its
-- row changes (create, resize, move, recovery, deletion, a purge), so the
-- counts cannot drift from the rows they sum.
ALTER TABLE hosts
    ADD COLUMN placed_vms BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN placed_vcpus BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN placed_memory_mib BIGINT NOT NULL DEFAULT 0;

UPDATE hosts h SET placed_vms = u.n, placed_vcpus = u.vcpus, placed_memory_mib = u.memory_mib
FROM (SELECT provider_id, host, COUNT(*) AS n, COALESCE(SUM(vcpus), 0) AS vcpus,
             COALESCE(SUM(memory_mib), 0) AS memory_mib
      FROM vms WHERE status <> 'DELETED' GROUP BY provider_id, host) u
WHERE h.provider_id = u.provider_id AND h.name = u.host;

CREATE FUNCTION hcp_host_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status <> 'DELETED' THEN
        UPDATE hosts SET placed_vms = placed_vms - 1, placed_vcpus = placed_vcpus - OLD.vcpus,
            placed_memory_mib = placed_memory_mib - OLD.memory_mib
        WHERE provider_id = OLD.provider_id AND name = OLD.host;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status <> 'DELETED' THEN
        UPDATE hosts SET placed_vms = placed_vms + 1, placed_vcpus = placed_vcpus + NEW.vcpus,
            placed_memory_mib = placed_memory_mib + NEW.memory_mib
        WHERE provider_id = NEW.provider_id AND name = NEW.host;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER vms_host_usage_added AFTER INSERT OR DELETE ON vms
    FOR EACH ROW EXECUTE FUNCTION hcp_host_usage();
-- Only changes that move a count: not every step of a job.
CREATE TRIGGER vms_host_usage_changed AFTER UPDATE OF status, vcpus, memory_mib, provider_id, host ON vms
    FOR EACH ROW
    WHEN ((OLD.vcpus, OLD.memory_mib, OLD.provider_id, OLD.host, OLD.status = 'DELETED')
          IS DISTINCT FROM (NEW.vcpus, NEW.memory_mib, NEW.provider_id, NEW.host, NEW.status = 'DELETED'))
    EXECUTE FUNCTION hcp_host_usage();
