-- A running job can be cancelled: the request is recorded on the job (when
-- and by whom) and the worker holding its lease stops the running step.
ALTER TABLE jobs ADD COLUMN cancel_requested_at TIMESTAMPTZ;
ALTER TABLE jobs ADD COLUMN cancel_requested_by TEXT;
-- The step log says which step a cancellation interrupted: 'done' for a
-- completed step (the only ones a resumed job skips), 'interrupted'.
ALTER TABLE job_steps ADD COLUMN status TEXT NOT NULL DEFAULT 'done';
-- Usage export: the VM's disk size at each usage event, for disk GiB-hours.
ALTER TABLE usage_events ADD COLUMN disk_gib INTEGER NOT NULL DEFAULT 0;
-- Earlier events take the VM's disk as it is now (a disk only grows, so
-- this may overstate a resized VM's disk before its resize).
UPDATE usage_events SET disk_gib = COALESCE((SELECT v.disk_gib FROM vms v WHERE v.id = usage_events.vm_id), 0);
-- A usage report reads each VM's and volume's last event before its window.
CREATE INDEX usage_by_vm ON usage_events (vm_id, at);
CREATE INDEX volume_usage_by_volume ON volume_usage_events (volume_id, at);
