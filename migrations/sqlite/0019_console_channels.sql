-- SPICE opens one connection per channel with the same token: the client's
-- address, stored when the session opens, is the one its further channels
-- must come from, and a session that ended admits no more of them.
ALTER TABLE console_sessions ADD COLUMN client_address TEXT;
ALTER TABLE console_sessions ADD COLUMN ended_at TEXT;
