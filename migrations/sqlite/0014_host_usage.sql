-- What HCP has placed on each host, kept on the host's row (see PostgreSQL's
-- 0014): the accepting transaction checks a host's room against these
-- counts, and the triggers keep them equal to the VMs that are not DELETED.
-- SQLite has one writer at a time, so the check and the write cannot
-- interleave with another accept.
ALTER TABLE hosts ADD COLUMN placed_vms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN placed_vcpus INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN placed_memory_mib INTEGER NOT NULL DEFAULT 0;

UPDATE hosts SET
    placed_vms = (SELECT COUNT(*) FROM vms v WHERE v.provider_id = hosts.provider_id
                  AND v.host = hosts.name AND v.status <> 'DELETED'),
    placed_vcpus = (SELECT COALESCE(SUM(vcpus), 0) FROM vms v WHERE v.provider_id = hosts.provider_id
                    AND v.host = hosts.name AND v.status <> 'DELETED'),
    placed_memory_mib = (SELECT COALESCE(SUM(memory_mib), 0) FROM vms v
                         WHERE v.provider_id = hosts.provider_id AND v.host = hosts.name
                         AND v.status <> 'DELETED');

CREATE TRIGGER vms_host_usage_inserted AFTER INSERT ON vms WHEN NEW.status <> 'DELETED'
BEGIN
    UPDATE hosts SET placed_vms = placed_vms + 1, placed_vcpus = placed_vcpus + NEW.vcpus,
        placed_memory_mib = placed_memory_mib + NEW.memory_mib
    WHERE provider_id = NEW.provider_id AND name = NEW.host;
END;

CREATE TRIGGER vms_host_usage_deleted AFTER DELETE ON vms WHEN OLD.status <> 'DELETED'
BEGIN
    UPDATE hosts SET placed_vms = placed_vms - 1, placed_vcpus = placed_vcpus - OLD.vcpus,
        placed_memory_mib = placed_memory_mib - OLD.memory_mib
    WHERE provider_id = OLD.provider_id AND name = OLD.host;
END;

CREATE TRIGGER vms_host_usage_changed AFTER UPDATE OF status, vcpus, memory_mib, provider_id, host ON vms
    WHEN OLD.vcpus IS NOT NEW.vcpus OR OLD.memory_mib IS NOT NEW.memory_mib
        OR OLD.provider_id IS NOT NEW.provider_id OR OLD.host IS NOT NEW.host
        OR (OLD.status = 'DELETED') IS NOT (NEW.status = 'DELETED')
BEGIN
    UPDATE hosts SET placed_vms = placed_vms - 1, placed_vcpus = placed_vcpus - OLD.vcpus,
        placed_memory_mib = placed_memory_mib - OLD.memory_mib
    WHERE OLD.status <> 'DELETED' AND provider_id = OLD.provider_id AND name = OLD.host;
    UPDATE hosts SET placed_vms = placed_vms + 1, placed_vcpus = placed_vcpus + NEW.vcpus,
        placed_memory_mib = placed_memory_mib + NEW.memory_mib
    WHERE NEW.status <> 'DELETED' AND provider_id = NEW.provider_id AND name = NEW.host;
END;
