//! Secrets at rest: provider credentials and providers' TLS client keys are
//! sealed with XChaCha20-Poly1305 under a key that lives outside the
//! database (a file, or an environment variable naming one), with the
//! provider's id as associated data so a sealed value cannot be moved to
//! another provider's row. The key never
//! enters the database, logs or API answers.
//!
//! The key file holds one key (64 hex digits), or several, one a line: the
//! first is current and seals; the ones after it are older keys kept so
//! that what they sealed still opens (credentials) and still verifies (the
//! audit chain's links, whose key is derived from each of these, see
//! [`crate::audit_chain::KeyRing`]). Blank lines and lines starting with
//! `#` are skipped. A file of one key, as HCP has always written, reads
//! the same.
//!
//! A file holding a secret (this key file, the HS256 secret of `[auth]`)
//! is refused when its group or others may access it ([`read_owner_only`]):
//! a key anyone on the host can read seals nothing. systemd credentials are
//! exempt, because systemd grants the service's user read access with an
//! ACL, which `stat` shows as group bits.

use std::collections::HashMap;
use std::path::{Component, Path};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Nonce length of XChaCha20-Poly1305.
const NONCE_LEN: usize = 24;
/// Keys one file may hold (the current one and older ones).
const MAX_KEYS: usize = 16;

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
    /// A line of the key file is not 32 bytes (64 hex digits).
    #[error("line {line} of the secrets key file {path} must be 64 hex digits (32 bytes)")]
    BadKey {
        /// The file.
        path: String,
        /// The line, counted from 1.
        line: usize,
    },
    /// The key file holds no key, or more than it may.
    #[error(
        "the secrets key file {path} must hold between 1 and {MAX_KEYS} keys, one a line; it holds {found}"
    )]
    KeyCount {
        /// The file.
        path: String,
        /// How many keys it holds.
        found: usize,
    },
    /// The key file may be read by others than its owner.
    #[error(
        "the secrets key file {path} is open to its group or others (mode {mode:04o}): \
         make it readable by its owner alone (chmod 600), or pass it as a systemd credential"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The same key is in the file twice.
    #[error("line {line} of the secrets key file {path} repeats the key of an earlier line")]
    Repeated {
        /// The file.
        path: String,
        /// The line, counted from 1.
        line: usize,
    },
    /// A sealed value is corrupt or was sealed under another key or for
    /// another provider.
    #[error("a sealed secret cannot be opened (wrong key or corrupt value)")]
    Open,
}

/// The keys of a secrets key file: the current one first, older ones after.
#[derive(Clone)]
pub struct SecretKeys {
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKeys(<{} keys>)", self.keys.len())
    }
}

impl SecretKeys {
    /// Reads a key file: one key of 64 hex digits a line, current first.
    /// A file its group or others may access is refused
    /// ([`read_owner_only`]).
    pub fn from_file(path: &Path) -> Result<Self, SecretsError> {
        let named = path.display().to_string();
        let bytes = read_owner_only(path).map_err(|e| match e {
            OwnerOnlyError::Read(source) => SecretsError::Read { path: named.clone(), source },
            OwnerOnlyError::Exposed { mode } => SecretsError::Exposed { path: named.clone(), mode },
        })?;
        let text = String::from_utf8(bytes).map_err(|e| SecretsError::Read {
            path: named.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::parse(&text, &named)
    }

    /// Reads the text of a key file; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, SecretsError> {
        let mut keys: Vec<[u8; 32]> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key: [u8; 32] = hex::decode(line)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or(SecretsError::BadKey { path: path.to_owned(), line: line_no })?;
            if keys.contains(&key) {
                return Err(SecretsError::Repeated { path: path.to_owned(), line: line_no });
            }
            keys.push(key);
        }
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(SecretsError::KeyCount { path: path.to_owned(), found: keys.len() });
        }
        Ok(Self { keys })
    }

    /// One key of 32 bytes.
    pub fn from_bytes(key: &[u8]) -> Option<Self> {
        key.try_into().ok().map(|key| Self { keys: vec![key] })
    }

    /// Every key, the current one first.
    pub fn all(&self) -> &[[u8; 32]] {
        &self.keys
    }
}

/// Why [`read_owner_only`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum OwnerOnlyError {
    /// The file could not be opened or read.
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    /// Its group or others may access it.
    #[error("it is open to its group or others (mode {mode:04o})")]
    Exposed {
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads a file holding a secret, refusing it when its permission bits let
/// its group or others access it (anything in `0o077`), unless it is a
/// systemd credential (under `$CREDENTIALS_DIRECTORY`, see
/// [`exposed_mode`]). The mode is taken from the opened file, so the file
/// checked is the file read.
pub fn read_owner_only(path: &Path) -> Result<Vec<u8>, OwnerOnlyError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(OwnerOnlyError::Read)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(OwnerOnlyError::Read)?.permissions().mode();
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY");
        let credential = credentials.is_some_and(|dir| within(path, Path::new(&dir)));
        if let Some(mode) = exposed_mode(mode, credential) {
            return Err(OwnerOnlyError::Exposed { mode });
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(OwnerOnlyError::Read)?;
    Ok(bytes)
}

/// The permission bits of a secret file when they are too open: any bit
/// for its group or others. A systemd credential is never too open: systemd
/// writes it 0400, owned by root, and grants the service's user read access
/// with an ACL entry, whose mask `stat` reports as the group bits (0440);
/// the credentials directory is the unit's alone.
pub fn exposed_mode(mode: u32, systemd_credential: bool) -> Option<u32> {
    let mode = mode & 0o7777;
    (mode & 0o077 != 0 && !systemd_credential).then_some(mode)
}

/// Whether `path` names a file inside `dir` (an absolute directory), by
/// its components: a `..` anywhere makes it not count.
fn within(path: &Path, dir: &Path) -> bool {
    dir.is_absolute()
        && path.starts_with(dir)
        && path.components().all(|c| c != Component::ParentDir)
        && path != dir
}

/// Seals and opens secrets.
#[derive(Clone)]
pub struct SecretBox {
    /// The current key's cipher first: it seals; every one may open.
    ciphers: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    /// Seals under the first of `keys` and opens under any of them.
    pub fn new(keys: &SecretKeys) -> Self {
        Self { ciphers: keys.all().iter().map(|k| XChaCha20Poly1305::new(k.into())).collect() }
    }

    /// Loads the keys from a key file ([`SecretKeys::from_file`]).
    pub fn from_file(path: &Path) -> Result<Self, SecretsError> {
        SecretKeys::from_file(path).map(|keys| Self::new(&keys))
    }

    /// Uses 32 key bytes.
    pub fn from_bytes(key: &[u8]) -> Option<Self> {
        SecretKeys::from_bytes(key).map(|keys| Self::new(&keys))
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
        // Encryption of an in-memory buffer cannot fail for this AEAD, and
        // there is always a first key (a key file holds at least one).
        let sealed = self.ciphers[0].encrypt(&nonce, Payload { msg: plain, aad }).unwrap_or_default();
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
        self.ciphers
            .iter()
            .find_map(|c| c.decrypt(&nonce, Payload { msg: body, aad }).ok())
            .ok_or(SecretsError::Open)
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

    #[test]
    fn older_keys_after_the_first_still_open_what_they_sealed() {
        let (old, new) = (SecretBox::generate_key_hex(), SecretBox::generate_key_hex());
        let creds: HashMap<String, String> = [("token".to_owned(), "t".to_owned())].into();
        let before = SecretBox::new(&SecretKeys::parse(&format!("{old}\n"), "k").unwrap());
        let sealed_before = before.seal(b"p", &creds);
        let text = format!("# rotated\n{new}\n\n{old}\n");
        let after = SecretBox::new(&SecretKeys::parse(&text, "k").unwrap());
        assert_eq!(after.open(b"p", &sealed_before).unwrap(), creds, "an older key still opens");
        let sealed_after = after.seal(b"p", &creds);
        assert!(before.open(b"p", &sealed_after).is_err(), "the first key seals");
        assert_eq!(
            SecretBox::new(&SecretKeys::parse(&new, "k").unwrap()).open(b"p", &sealed_after).unwrap(),
            creds
        );
    }

    /// Each row: a file's permission bits, whether it is a systemd
    /// credential, and whether it is refused.
    #[test]
    fn secret_files_open_to_group_or_others_are_refused() {
        let rows: &[(u32, bool, bool)] = &[
            (0o100600, false, false),
            (0o100400, false, false),
            (0o100700, false, false),
            (0o100640, false, true),
            (0o100644, false, true),
            (0o100604, false, true),
            (0o100620, false, true),
            (0o100602, false, true),
            (0o100666, false, true),
            // A credential systemd granted to the unit's user by ACL.
            (0o100440, true, false),
            (0o100400, true, false),
        ];
        for &(mode, credential, refused) in rows {
            let got = exposed_mode(mode, credential);
            assert_eq!(got.is_some(), refused, "{mode:o} credential={credential}");
            if let Some(bits) = got {
                assert_eq!(bits, mode & 0o7777, "the refusal names the permission bits alone");
            }
        }
        let dir = Path::new("/run/credentials/hcp-core-api.service");
        for (path, inside) in [
            ("/run/credentials/hcp-core-api.service/secrets-key", true),
            ("/run/credentials/hcp-core-api.service/../../../etc/hcp/key", false),
            ("/run/credentials/hcp-core-api.service", false),
            ("/run/credentials/hcp-core-api.serviceX/key", false),
            ("/etc/hcp/secrets-key", false),
            ("secrets-key", false),
        ] {
            assert_eq!(within(Path::new(path), dir), inside, "{path}");
        }
        assert!(
            !within(Path::new("x/key"), Path::new("x")),
            "a relative credentials directory counts for nothing"
        );
    }

    /// Each row: a key file's text and what its refusal says.
    #[test]
    fn malformed_key_files_are_refused_naming_the_line() {
        let key = SecretBox::generate_key_hex();
        let rows: &[(String, &str)] = &[
            (String::new(), "between 1 and 16 keys"),
            ("# only a comment\n".into(), "holds 0"),
            ("abc\n".into(), "line 1 of the secrets key file k must be 64 hex digits"),
            (format!("{key}\n{}\n", &key[..62]), "line 2 of"),
            (format!("{key}\nzz{}\n", &key[2..]), "line 2 of"),
            (format!("{key}\n\n{key}\n"), "line 3 of the secrets key file k repeats"),
            ((0..17).map(|_| SecretBox::generate_key_hex() + "\n").collect(), "holds 17"),
        ];
        for (text, says) in rows {
            let err = SecretKeys::parse(text, "k").unwrap_err();
            assert!(err.to_string().contains(says), "{text:?}: {err}");
        }
        // Today's files: one key, with or without a newline or spaces.
        for text in [key.clone(), format!("{key}\n"), format!("  {key}  \r\n")] {
            assert_eq!(SecretKeys::parse(&text, "k").unwrap().all().len(), 1, "{text:?}");
        }
    }
}
