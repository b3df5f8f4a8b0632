-- Named leases for work that one process at a time should do (the
-- reconciler): the holder renews before `expires_at`; anyone may take a
-- lapsed lease.
CREATE TABLE singleton_leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

-- The VM status an operation started from, so a cancelled job can put the
-- VM back where it was.
ALTER TABLE jobs ADD COLUMN prior_status TEXT;
