-- Each tenant's rate limit as GCRA state (see PostgreSQL's 0013): the
-- theoretical arrival time of the next call, in microseconds since the
-- Unix epoch on the database's clock (`unixepoch('subsec')`). The embedded
-- store serves one process, which claims from it as API processes do on
-- PostgreSQL.
CREATE TABLE rate_buckets (
    tenant_id     TEXT PRIMARY KEY,
    tat_us        REAL NOT NULL,
    claimed_at_us REAL NOT NULL,
    granted       INTEGER NOT NULL
);
