-- Volume events for tenants' webhooks: a volume job's `job.finished` and
-- `volume.status_changed` are ordered per volume, as a VM's events are per
-- VM. webhook_deliveries.vm_id stays the ordering key the delivery worker
-- (this release's and the previous one's) groups by: it holds the VM's id
-- for a VM's events and the volume's id for a volume's. volume_id says
-- which: the volume the event concerns, NULL for a VM's events (and for
-- every row an earlier release wrote). Expand-only: one NULL-able column.
ALTER TABLE webhook_deliveries ADD COLUMN volume_id UUID;
