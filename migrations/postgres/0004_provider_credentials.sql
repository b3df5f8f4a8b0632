-- Provider credentials, sealed with core's secrets key (never plaintext).
ALTER TABLE providers ADD COLUMN credentials BYTEA;
