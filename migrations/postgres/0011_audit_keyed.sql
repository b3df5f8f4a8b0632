-- Keyed audit links. From now on the sealer computes each event's hash as
-- an HMAC-SHA256 under the audit key (derived from the secrets key) and
-- records which key it used, so the key can rotate while older links stay
-- verifiable. NULL means the event was sealed without a key: every event
-- sealed before this migration, and those sealed by a core that has no
-- secrets key. Such events must form a prefix of the chain; the first keyed
-- event after them covers their head's hash and so pins all of them.
ALTER TABLE audit_events ADD COLUMN key_id TEXT;
