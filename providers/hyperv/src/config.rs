//! The provider's typed, strict configuration (a TOML file): where the
//! Hyper-V host's WinRM listener is, how to trust it, where VM disks and
//! seed ISOs go on the host, and how HCP's images and networks map onto
//! parent VHDX files and virtual switches. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address of the provider. Default `127.0.0.1:50091`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The WinRM HTTPS listener, `https://hv1.example.com:5986/wsman`.
    pub url: String,
    /// The host's computer name, for WMI object paths; the name the host
    /// reports when unset.
    #[serde(default)]
    pub host_name: Option<String>,
    /// Directory on the host for VM disks (`C:\Hyper-V\hcp`).
    pub vm_dir: String,
    /// The same directory as the provider sees it (an SMB mount of the
    /// host's share); when set, DeleteVm removes the VM's VHDX too, which
    /// WMI's `DestroySystem` keeps.
    #[serde(default)]
    pub vm_dir_local: Option<PathBuf>,
    /// HCP image source -> parent VHDX on the host
    /// (`C:\Hyper-V\images\debian-12.vhdx`); a source not listed is a file
    /// name in `image_dir`.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// Directory on the host holding parent VHDX files.
    #[serde(default)]
    pub image_dir: Option<String>,
    /// HCP network -> virtual switch, for attachments without a backing in
    /// HCP's network catalog.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Switch for a VM created without networks.
    #[serde(default = "default_switch")]
    pub default_switch: String,
    /// Cloud-init NoCloud seeds: written by the provider into `local_dir`,
    /// which is `host_dir` on the host (an SMB share, say).
    #[serde(default)]
    pub cloud_init: Option<CloudInitConfig>,
    /// `negotiate` (NTLM; WinRM's default) or `basic`.
    #[serde(default)]
    pub auth_scheme: crate::wsman::Scheme,
    /// Credentials; when absent they arrive through `Identity.Configure`.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// How to trust the listener's certificate.
    pub tls: TlsConfig,
    /// The host's VMConnect listener, where the gateway's console proxy
    /// relays RDP consoles.
    #[serde(default)]
    pub vmconnect: VmConnectConfig,
    /// Timing and retries.
    #[serde(default)]
    pub timing: TimingConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50091))
}

fn default_switch() -> String {
    "Default Switch".to_owned()
}

/// The VMConnect listener (RDP with a preconnection PDU naming the VM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConnectConfig {
    /// The host name as the gateway reaches it; `url`'s host when unset.
    #[serde(default)]
    pub host: Option<String>,
    /// The port. Default 2179, Hyper-V's.
    #[serde(default = "default_vmconnect_port")]
    pub port: u16,
}

impl Default for VmConnectConfig {
    fn default() -> Self {
        Self { host: None, port: default_vmconnect_port() }
    }
}

fn default_vmconnect_port() -> u16 {
    2179
}

/// Where seed ISOs go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    /// Where the provider writes (`/mnt/hyperv-seeds`).
    pub local_dir: PathBuf,
    /// The same directory as the host sees it (`\\fs\seeds` or `C:\seeds`).
    pub host_dir: String,
}

/// A local account or `DOMAIN\user` with its password (Basic over HTTPS).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The user.
    pub username: String,
    /// Its password.
    pub password: Option<String>,
    /// Read the password from this file instead.
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Exactly one of a CA file or the listener certificate's fingerprint.
pub type TlsConfig = hcp_tls::TrustConfig;

/// Timing and retries; defaults suit a real host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// Job polling interval. Default 250 ms.
    pub job_poll_ms: u64,
    /// Longest wait for one job. Default 900 s.
    pub job_timeout_seconds: u64,
    /// Guest shutdown wait before turning the VM off. Default 60 s.
    pub shutdown_timeout_seconds: u64,
    /// Attempts for "in use" (32774) and transport failures. Default 6.
    pub retry_attempts: u32,
    /// First backoff; doubles per attempt, with jitter. Default 250 ms.
    pub retry_base_ms: u64,
    /// Deadline of one request. Default 60 s.
    pub request_timeout_seconds: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        Self {
            job_poll_ms: 250,
            job_timeout_seconds: 900,
            shutdown_timeout_seconds: 60,
            retry_attempts: 6,
            retry_base_ms: 250,
            request_timeout_seconds: 60,
        }
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
        /// The field.
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
        if let Err(m) = crate::wsman::split_url(&self.url) {
            return field("url", &m);
        }
        if self.vmconnect.port == 0 {
            return field("vmconnect.port", "must not be 0");
        }
        if self.vmconnect.host.as_deref().is_some_and(|h| h.is_empty() || h.contains(['/', ' '])) {
            return field("vmconnect.host", "must be a host name or address");
        }
        if self.vm_dir.is_empty() {
            return field("vm_dir", "must not be empty");
        }
        match self.tls.check() {
            Ok(()) => {}
            Err(e @ hcp_tls::TrustConfigError::BadFingerprint) => {
                return field("tls.fingerprint", &e.to_string());
            }
            Err(e) => return field("tls", &e.to_string()),
        }
        if self.timing.retry_attempts == 0 {
            return field("timing.retry_attempts", "at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_field_by_field() {
        let fp = ["AB"; 32].join(":");
        let base = "url = \"https://hv1:5986/wsman\"\nvm_dir = 'C:\\Hyper-V\\hcp'\n";
        let check = |t: &str| {
            Config::from_toml(t).map(|_| ()).map_err(|e| match e {
                ConfigError::Field { field, .. } => field.to_owned(),
                other => other.to_string(),
            })
        };
        assert_eq!(check(&format!("{base}[tls]\nfingerprint = \"{fp}\"\n")), Ok(()));
        assert_eq!(check(&format!("{base}[tls]\n")), Err("tls".into()));
        assert_eq!(
            check(&format!("{base}[tls]\nfingerprint = \"{fp}\"\n[vmconnect]\nport = 0\n")),
            Err("vmconnect.port".into())
        );
        assert_eq!(
            check(&format!("{base}[tls]\nfingerprint = \"{fp}\"\n[vmconnect]\nhost = \"a/b\"\n")),
            Err("vmconnect.host".into())
        );
        assert_eq!(
            check(&format!("{}[tls]\nfingerprint = \"{fp}\"\n", base.replace("https", "http"))),
            Err("url".into())
        );
        assert_eq!(
            check(&format!("x = 1\n{base}[tls]\nfingerprint = \"{fp}\"\n")),
            Err("invalid configuration".into())
        );
    }
}
