-- PostgreSQL's 0010 makes catalog changes notify every core process; the
-- embedded store serves one process, which invalidates its own copy. Both
-- get the index placement adds host loads up from.
CREATE INDEX vms_host_load ON vms (provider_id, host, vcpus, memory_mib) WHERE status <> 'DELETED';
