-- The operators' fleet view and force-delete (SRS-FLT).
--
-- When a VM entered its current status ("in ERROR for more than N
-- minutes"): set by triggers wherever the status is written, so no writer
-- of vms.status has to remember it. A change takes the row's updated_at
-- (every status write sets it on the store's clock).
ALTER TABLE vms ADD COLUMN status_since TEXT;
UPDATE vms SET status_since = updated_at;

CREATE TRIGGER vms_status_since_inserted AFTER INSERT ON vms
BEGIN
    UPDATE vms SET status_since = NEW.created_at WHERE id = NEW.id;
END;

CREATE TRIGGER vms_status_since_changed AFTER UPDATE OF status ON vms
    WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE vms SET status_since = NEW.updated_at WHERE id = NEW.id;
END;

-- The fleet listing: keyset pages over all tenants, by status.
CREATE INDEX vms_fleet_by_status ON vms (status, id);
CREATE INDEX vms_fleet_by_provider ON vms (provider_id, id);

-- What a force-deleted VM left on its provider: the reconciler deletes it
-- there when the provider answers again, then sets cleaned_at.
CREATE TABLE vm_leftovers (
    vm_id       BLOB PRIMARY KEY REFERENCES vms (id),
    provider_id BLOB NOT NULL,
    host        TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    reason      TEXT NOT NULL,
    cleaned_at  TEXT,
    cleaned_how TEXT
);
CREATE INDEX vm_leftovers_open ON vm_leftovers (provider_id) WHERE cleaned_at IS NULL;
