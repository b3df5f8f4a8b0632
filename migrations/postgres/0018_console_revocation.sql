-- Why a console session was revoked (its VM stopped, moved or was
-- deleted): the console proxy ends an open session with this reason, and
-- revocation now reaches sessions already opened, not only unused tokens.
ALTER TABLE console_sessions ADD COLUMN revoked_reason TEXT;
