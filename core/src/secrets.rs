//! Secrets at rest: provider credentials and providers' TLS client keys are
//! sealed with XChaCha20-Poly1305 under a key that lives outside the
//! database (a file, or an environment variable naming one), with the
//! provider's id as associated data so a sealed value cannot be moved to
//! another provider's row. The key never
//! enters the database, logs or API answers.

use std::collections::HashMap;
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Nonce length of XChaCha20-Poly1305.
const NONCE_LEN: usize = 24;

/// A secrets key could not be loaded, or a value could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file could not be read.
    #[error("cannot read the secrets key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold 32 bytes (64 hex digits).
    #[error("the secrets key in {path} must be 64 hex digits (32 bytes)")]
    BadKey {
        /// The file.
        path: String,
    },
    /// A sealed value is corrupt or was sealed under another key or for
    /// another provider.
    #[error("a sealed secret cannot be opened (wrong key or corrupt value)")]
    Open,
}

/// Seals and opens secrets.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    /// Loads the key from a file of 64 hex digits.
    pub fn from_file(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SecretsError::Read { path: path.display().to_string(), source })?;
        let bytes = hex::decode(text.trim())
            .map_err(|_| SecretsError::BadKey { path: path.display().to_string() })?;
        Self::from_bytes(&bytes).ok_or(SecretsError::BadKey { path: path.display().to_string() })
    }

    /// Uses 32 key bytes.
    pub fn from_bytes(key: &[u8]) -> Option<Self> {
        (key.len() == 32).then(|| Self { cipher: XChaCha20Poly1305::new(key.into()) })
    }

    /// Returns a new random key as 64 hex digits, for key files.
    pub fn generate_key_hex() -> String {
        hex::encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// Seals credentials, bound to `aad` (the provider id).
    pub fn seal(&self, aad: &[u8], credentials: &HashMap<String, String>) -> Vec<u8> {
        self.seal_bytes(aad, &serde_json::to_vec(credentials).unwrap_or_default())
    }

    /// Opens what [`SecretBox::seal`] produced for the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<HashMap<String, String>, SecretsError> {
        serde_json::from_slice(&self.open_bytes(aad, sealed)?).map_err(|_| SecretsError::Open)
    }

    /// Seals a secret value (a provider's TLS client key), bound to `aad`
    /// (the provider id).
    pub fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption of an in-memory buffer cannot fail for this AEAD.
        let sealed = self.cipher.encrypt(&nonce, Payload { msg: plain, aad }).unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`SecretBox::seal_bytes`] produced for the same `aad`.
    pub fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretsError::Open);
        }
        let (nonce_bytes, body) = sealed.split_at(NONCE_LEN);
        let mut nonce = XNonce::default();
        nonce.copy_from_slice(nonce_bytes);
        self.cipher.decrypt(&nonce, Payload { msg: body, aad }).map_err(|_| SecretsError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_binds_to_the_provider() {
        let key = hex::decode(SecretBox::generate_key_hex()).unwrap();
        let b = SecretBox::from_bytes(&key).unwrap();
        let creds: HashMap<String, String> = [("token".to_owned(), "hunter2".to_owned())].into();
        let sealed = b.seal(b"provider-a", &creds);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "plaintext in the sealed value");
        assert_eq!(b.open(b"provider-a", &sealed).unwrap(), creds);
        assert!(b.open(b"provider-b", &sealed).is_err(), "bound to its provider");
        let other = SecretBox::from_bytes(&[7u8; 32]).unwrap();
        assert!(other.open(b"provider-a", &sealed).is_err(), "bound to its key");
        assert!(SecretBox::from_bytes(&[0u8; 31]).is_none());
        let key_pem = b"-----BEGIN PRIVATE KEY-----\nhunter2\n-----END PRIVATE KEY-----\n";
        let sealed = b.seal_bytes(b"provider-a", key_pem);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "plaintext in the sealed key");
        assert_eq!(b.open_bytes(b"provider-a", &sealed).unwrap(), key_pem);
        assert!(b.open_bytes(b"provider-b", &sealed).is_err(), "bound to its provider");
    }
}
