-- Volume events for tenants' webhooks. See the PostgreSQL migration of the
-- same number: vm_id stays the ordering key (a volume's id for a volume's
-- events); volume_id names the volume, NULL for a VM's events.
ALTER TABLE webhook_deliveries ADD COLUMN volume_id BLOB;
