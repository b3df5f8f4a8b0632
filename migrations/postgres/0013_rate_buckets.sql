-- Each tenant's rate limit (`limits.rate_per_second`, `limits.burst`) is
-- one bucket shared by every API process, kept as GCRA state: the
-- theoretical arrival time (TAT) of the next call, in microseconds since
-- the Unix epoch on the database's clock (`clock_timestamp()`), so the API
-- hosts' clocks do not matter. A process claims a few tokens at once
-- (`hcp_store::Store::claim_rate_tokens`): one statement that grants what
-- the bucket holds, up to what was asked, and moves the TAT on by that many
-- intervals. `claimed_at_us` and `granted` are the last claim's clock
-- reading and grant, kept so the statement can return them.
--
-- UNLOGGED: the state is worth nothing after a crash (a lost bucket starts
-- full again, one burst more for its tenant), so its writes skip the WAL
-- and a claim's commit does not wait for a flush.
CREATE UNLOGGED TABLE rate_buckets (
    tenant_id     TEXT PRIMARY KEY,
    tat_us        DOUBLE PRECISION NOT NULL,
    claimed_at_us DOUBLE PRECISION NOT NULL,
    granted       BIGINT NOT NULL
);
