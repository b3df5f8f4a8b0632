-- Every core process keeps the catalog that each create reads (flavors,
-- images, zones, networks, providers, hosts) in memory. A change made by any
-- process, or by hand in psql, tells them all on the channel hcp_catalog,
-- when its transaction commits. Changes that placement does not read (a
-- provider's health probe time and message, a host report that changes
-- nothing) do not.
CREATE FUNCTION hcp_catalog_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hcp_catalog', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER flavors_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON flavors
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER images_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON images
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER zones_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON zones
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER networks_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON networks
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();

CREATE TRIGGER providers_added AFTER INSERT OR DELETE OR TRUNCATE ON providers
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER providers_changed AFTER UPDATE ON providers FOR EACH ROW
    WHEN ((OLD.name, OLD.zone, OLD.endpoint, OLD.hypervisor, OLD.protocol_version, OLD.capabilities,
           OLD.healthy)
          IS DISTINCT FROM
          (NEW.name, NEW.zone, NEW.endpoint, NEW.hypervisor, NEW.protocol_version, NEW.capabilities,
           NEW.healthy))
    EXECUTE FUNCTION hcp_catalog_changed();

-- Row triggers for inserts: an INSERT ... ON CONFLICT DO UPDATE (each host
-- report) fires statement INSERT triggers even when it inserts nothing.
CREATE TRIGGER hosts_added AFTER INSERT ON hosts FOR EACH ROW EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER hosts_removed AFTER DELETE OR TRUNCATE ON hosts
    FOR EACH STATEMENT EXECUTE FUNCTION hcp_catalog_changed();
CREATE TRIGGER hosts_changed AFTER UPDATE ON hosts FOR EACH ROW
    WHEN ((OLD.vcpus, OLD.memory_mib, OLD.state, OLD.drain)
          IS DISTINCT FROM (NEW.vcpus, NEW.memory_mib, NEW.state, NEW.drain))
    EXECUTE FUNCTION hcp_catalog_changed();

-- What placement adds up per host, read from the index alone.
CREATE INDEX vms_host_load ON vms (provider_id, host, vcpus, memory_mib) WHERE status <> 'DELETED';
