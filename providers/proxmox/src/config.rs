//! The provider's typed, strict configuration (a TOML file): where the
//! cluster is, how to trust it, how to authenticate (or wait for
//! credentials from `Identity.Configure`), and how HCP's images, networks
//! and cloud-init map onto the cluster. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address of the provider. Default `127.0.0.1:50071`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The cluster's API, `https://HOST:8006` (`/api2/json` is appended).
    pub api_url: String,
    /// Node on which VMs are created (templates must live there, or on
    /// shared storage).
    pub node: String,
    /// Bridge for network attachments not listed in `networks`.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// HCP network name -> bridge.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Target storage of full clones; the template's storage when unset.
    #[serde(default)]
    pub storage: Option<String>,
    /// HCP image source -> template vmid. A source missing here is looked
    /// up as a template of that name, or used as a vmid when numeric.
    #[serde(default)]
    pub templates: BTreeMap<String, u32>,
    /// Credentials; when absent they arrive through `Identity.Configure`.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// How to trust the cluster's certificate.
    pub tls: TlsConfig,
    /// Cloud-init settings.
    #[serde(default)]
    pub cloud_init: CloudInitConfig,
    /// Timing and retries.
    #[serde(default)]
    pub timing: TimingConfig,
    /// New vmids are taken from this range (inclusive); default: the
    /// cluster's `nextid`.
    #[serde(default)]
    pub vmid_range: Option<(u32, u32)>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50071))
}

fn default_bridge() -> String {
    "vmbr0".to_owned()
}

/// API token or user + password (tickets).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `USER@REALM!TOKENID`.
    pub token_id: Option<String>,
    /// The token's secret (UUID).
    pub token_secret: Option<String>,
    /// Read the token secret from this file instead.
    pub token_secret_file: Option<PathBuf>,
    /// `USER@REALM` for ticket authentication.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// Read the password from this file instead.
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token_id", &self.token_id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Exactly one of a CA file (the CA that signed the node certificates,
/// e.g. `/etc/pve/pve-root-ca.pem`) or the node certificate's SHA-256
/// fingerprint (as `pvenode cert info` shows it).
pub type TlsConfig = hcp_tls::TrustConfig;

/// Cloud-init mapping.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    /// `ciuser` of new VMs.
    pub user: Option<String>,
    /// SSH public keys installed for that user (`sshkeys`).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// `ipconfig0`; default `ip=dhcp`.
    pub ipconfig0: Option<String>,
    /// Storage with `snippets` content where user data goes.
    pub snippets_storage: Option<String>,
    /// The directory of that storage's `snippets/` as mounted where the
    /// provider runs (shared storage, e.g. NFS).
    pub snippets_dir: Option<PathBuf>,
}

/// Timing and retries; defaults suit a real cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// Task status polling interval. Default 500 ms.
    pub task_poll_ms: u64,
    /// Longest wait for one task (clones are slow). Default 900 s.
    pub task_timeout_seconds: u64,
    /// ACPI shutdown wait before a hard stop. Default 60 s.
    pub shutdown_timeout_seconds: u64,
    /// Attempts for retryable failures (locks, 595/596). Default 6.
    pub retry_attempts: u32,
    /// First backoff; doubles per attempt, with jitter. Default 250 ms.
    pub retry_base_ms: u64,
    /// Renew a ticket after this long (tickets live 2 h). Default 5400 s.
    pub ticket_renew_seconds: u64,
    /// Deadline of one HTTP request. Default 30 s.
    pub request_timeout_seconds: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        Self {
            task_poll_ms: 500,
            task_timeout_seconds: 900,
            shutdown_timeout_seconds: 60,
            retry_attempts: 6,
            retry_base_ms: 250,
            ticket_renew_seconds: 5400,
            request_timeout_seconds: 30,
        }
    }
}

impl TimingConfig {
    /// The polling interval.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.task_poll_ms.max(1))
    }
}

/// The configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid configuration")]
    Parse(#[source] toml::de::Error),
    /// A field is wrong.
    #[error("{field}: {message}")]
    Field {
        /// The field, e.g. `tls.fingerprint`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(ConfigError::Parse)?;
        config.check()?;
        Ok(config)
    }

    /// Reads and checks a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let field = |field, message: &str| Err(ConfigError::Field { field, message: message.to_owned() });
        if !self.api_url.starts_with("https://") {
            return field("api_url", "must start with https://");
        }
        if self.node.is_empty() {
            return field("node", "must not be empty");
        }
        match self.tls.check() {
            Ok(()) => {}
            Err(e @ hcp_tls::TrustConfigError::BadFingerprint) => {
                return field("tls.fingerprint", &e.to_string());
            }
            Err(e) => return field("tls", &e.to_string()),
        }
        if let Some((lo, hi)) = self.vmid_range
            && (lo < 100 || hi < lo || hi > 999_999_999)
        {
            return field("vmid_range", "must be [min, max] within 100..=999999999");
        }
        if self.cloud_init.snippets_dir.is_some() != self.cloud_init.snippets_storage.is_some() {
            return field("cloud_init", "snippets_storage and snippets_dir go together");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "api_url = \"https://pve:8006\"\nnode = \"pve1\"\n";

    fn check(extra: &str) -> Result<(), String> {
        Config::from_toml(&format!("{BASE}{extra}")).map(|_| ()).map_err(|e| match e {
            ConfigError::Field { field, .. } => field.to_owned(),
            other => other.to_string(),
        })
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let fp = ["AB"; 32].join(":");
        let cases: Vec<(String, Result<(), String>)> = vec![
            (format!("[tls]\nfingerprint = \"{fp}\"\n"), Ok(())),
            ("[tls]\nca_file = \"/ca.pem\"\n".into(), Ok(())),
            ("[tls]\n".into(), Err("tls".into())),
            ("[tls]\nfingerprint = \"AB:CD\"\n".into(), Err("tls.fingerprint".into())),
            (format!("vmid_range = [50, 60]\n[tls]\nfingerprint = \"{fp}\"\n"), Err("vmid_range".into())),
            (
                format!("[tls]\nfingerprint = \"{fp}\"\n[cloud_init]\nsnippets_dir = \"/x\"\n"),
                Err("cloud_init".into()),
            ),
            (format!("colour = 1\n[tls]\nfingerprint = \"{fp}\"\n"), Err("invalid configuration".into())),
        ];
        for (extra, want) in cases {
            assert_eq!(check(&extra), want, "{extra}");
        }
    }
}
