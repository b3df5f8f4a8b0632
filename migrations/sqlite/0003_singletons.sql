-- Named leases for work that one process at a time should do (the
-- reconciler): the holder renews before `expires_at`; anyone may take a
-- lapsed lease.
CREATE TABLE singleton_leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
