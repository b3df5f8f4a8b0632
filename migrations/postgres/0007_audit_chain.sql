-- A hash chain over the audit trail. Events are inserted unsealed in the
-- transaction of the action they record; one sealer (a singleton lease)
-- then gives each, in the order it finds them, the next sequence number,
-- its predecessor's hash and its own hash over both and every column. An
-- edited, deleted or reordered sealed event breaks the chain at a named
-- place.
ALTER TABLE audit_events ADD COLUMN seq BIGINT;
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX audit_by_seq ON audit_events (seq);
CREATE INDEX audit_unsealed ON audit_events (at, id) WHERE seq IS NULL;
