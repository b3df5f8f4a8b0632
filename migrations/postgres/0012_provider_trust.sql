-- What core trusts on each provider's TLS channel, as the operator
-- registered it (what is NULL comes from core's [providers] settings), and
-- the operator's override for a plaintext endpoint that is not loopback.
-- The client key is sealed with core's secrets key, like the credentials.
-- Rows stored before this migration get allow_plaintext = FALSE: core sends
-- them no credentials over plaintext TCP to another host.
ALTER TABLE providers ADD COLUMN tls_ca_pem TEXT;
ALTER TABLE providers ADD COLUMN tls_client_cert_pem TEXT;
ALTER TABLE providers ADD COLUMN tls_client_key BYTEA;
ALTER TABLE providers ADD COLUMN tls_server_name TEXT;
ALTER TABLE providers ADD COLUMN allow_plaintext BOOLEAN NOT NULL DEFAULT FALSE;
