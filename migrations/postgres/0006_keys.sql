-- Keys every core process shares and none may hold alone (e.g. the key
-- that signs page tokens, so a token one API process issued is accepted by
-- another). Made once, by the first process that needs it, and never
-- changed by HCP.
CREATE TABLE core_keys (
    name       TEXT PRIMARY KEY,
    key        BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
