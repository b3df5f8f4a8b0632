//! The provider's typed, strict configuration (a TOML file): where vCenter
//! or ESXi is, how to trust it, where new VMs go (datacenter, resource
//! pool, datastore, folder), how HCP's images and networks map onto
//! templates and port groups, and cloud-init. Unknown keys are refused.
//! Credentials come from `Identity.Configure` (core keeps them sealed), or
//! from `[auth]` for standalone use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use hcp_provider_sdk::kit::config::check_range;
use hcp_provider_sdk::kit::{Backings, ProviderConfig, ServerConfig};
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address of the provider. Default `127.0.0.1:50081`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The SDK endpoint, `https://vcenter.example.com/sdk`.
    pub sdk_url: String,
    /// The datacenter's name; inventory paths below are relative to it.
    pub datacenter: String,
    /// Resource pool of new VMs, as an inventory path below the datacenter
    /// (`host/Cluster1/Resources`, `host/esx1/Resources/hcp`).
    pub resource_pool: String,
    /// Datastore of new VMs (`LocalDS_0`); the template's when unset.
    #[serde(default)]
    pub datastore: Option<String>,
    /// VM folder of new VMs, below the datacenter's `vm` folder; the
    /// folder itself when unset.
    #[serde(default)]
    pub folder: Option<String>,
    /// HCP image source -> template (a VM or template name, or an
    /// inventory path below the datacenter's `vm` folder). A source not
    /// listed is used as such a name.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// HCP network -> port group name (standard or distributed), for
    /// attachments without a backing in HCP's network catalog.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Port group for a VM created without networks.
    #[serde(default = "default_port_group")]
    pub default_port_group: String,
    /// Let new VMs take CPUs and memory while running (sets
    /// `cpuHotAddEnabled` and `memoryHotAddEnabled` at create, which the
    /// guest OS must support); the provider then declares hot resize.
    #[serde(default)]
    pub hot_add: bool,
    /// User data through `guestinfo.userdata` for cloud-init's VMware
    /// datasource (the templates must have cloud-init with it).
    #[serde(default)]
    pub cloud_init: bool,
    /// Credentials; when absent they arrive through `Identity.Configure`.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// How to trust the SDK endpoint's certificate (and the console's, when
    /// `[console_tls]` is absent).
    pub tls: TlsConfig,
    /// How to trust WebMKS console endpoints (ESXi hosts), when they are
    /// not the SDK endpoint.
    #[serde(default)]
    pub console_tls: Option<TlsConfig>,
    /// Timing and retries.
    #[serde(default)]
    pub timing: TimingConfig,
    /// The provider's own gRPC server: unix socket, TLS.
    #[serde(default)]
    pub server: ServerConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50081))
}

fn default_port_group() -> String {
    "VM Network".to_owned()
}

/// User and password (vSphere SSO or a local ESXi account).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// e.g. `hcp@vsphere.local`.
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

/// Exactly one of a CA file (vCenter's VMCA root) or the endpoint
/// certificate's fingerprint.
pub type TlsConfig = hcp_tls::TrustConfig;

fn check_trust(t: &TlsConfig, name: &'static str) -> Result<(), ConfigError> {
    t.check().map_err(|e| ConfigError::field(name, e))
}

/// Timing and retries; defaults suit a real vCenter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// Longest wait for one task (clones are slow). Default 1800 s.
    pub task_timeout_seconds: u64,
    /// Guest shutdown wait before a power-off. Default 60 s.
    pub shutdown_timeout_seconds: u64,
    /// Attempts for retryable failures. Default 6.
    pub retry_attempts: u32,
    /// First backoff; doubles per attempt, with jitter. Default 250 ms.
    pub retry_base_ms: u64,
    /// Deadline of one SOAP request. Default 60 s.
    pub request_timeout_seconds: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        Self {
            task_timeout_seconds: 1800,
            shutdown_timeout_seconds: 60,
            retry_attempts: 6,
            retry_base_ms: 250,
            request_timeout_seconds: 60,
        }
    }
}

pub use hcp_provider_sdk::kit::ConfigError;

/// What `[timing]` accepts: zero and absurd values are refused at start.
const RETRY_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=100;
const RETRY_BASE_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
const REQUEST_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=3_600;
const TASK_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;

impl Config {
    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::from_toml(text)
    }

    /// Reads and checks a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::load(path)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if let Err(e) = hcp_provider_sdk::kit::split_https_url(&self.sdk_url, 443, "/sdk") {
            return Err(ConfigError::field("sdk_url", e));
        }
        if self.datacenter.is_empty() || self.datacenter.contains('/') {
            return Err(ConfigError::field("datacenter", "a datacenter name, without slashes"));
        }
        if self.resource_pool.is_empty() {
            return Err(ConfigError::field("resource_pool", "must not be empty"));
        }
        check_trust(&self.tls, "tls")?;
        if let Some(c) = &self.console_tls {
            check_trust(c, "console_tls")?;
        }
        let t = &self.timing;
        check_range("timing.retry_attempts", t.retry_attempts, RETRY_ATTEMPTS)?;
        check_range("timing.retry_base_ms", t.retry_base_ms, RETRY_BASE_MS)?;
        check_range("timing.request_timeout_seconds", t.request_timeout_seconds, REQUEST_TIMEOUT_SECONDS)?;
        check_range("timing.task_timeout_seconds", t.task_timeout_seconds, TASK_TIMEOUT_SECONDS)?;
        self.server.validate()
    }

    /// HCP networks to port groups: the `[networks]` table, names missing
    /// from it refused, `default_port_group` for a VM without networks.
    pub fn backings(&self) -> Backings<String> {
        Backings::new(self.networks.clone(), Some(self.default_port_group.clone()))
    }
}

impl ProviderConfig for Config {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn set_listen(&mut self, listen: SocketAddr) {
        self.listen = listen;
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    fn server(&self) -> Option<&ServerConfig> {
        Some(&self.server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "sdk_url = \"https://vc/sdk\"\ndatacenter = \"DC0\"\nresource_pool = \"host/C0/Resources\"\n";

    /// What the configuration is refused for: the field its error names, or
    /// its message when it names none; `None` when it is accepted.
    fn check(text: &str) -> Option<String> {
        Config::from_toml(text).err().map(|e| match e.field_name() {
            Some(field) => field.to_owned(),
            None => e.to_string(),
        })
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let fp = ["AB"; 32].join(":");
        let tls = format!("[tls]\nfingerprint = \"{fp}\"\n");
        let cases: Vec<(String, Option<&str>)> = vec![
            (format!("{BASE}{tls}"), None),
            (format!("{BASE}[tls]\nca_file = \"/ca.pem\"\n"), None),
            (format!("{BASE}[tls]\n"), Some("tls")),
            (format!("{BASE}[tls]\nfingerprint = \"AB\"\n"), Some("tls")),
            (format!("{BASE}{tls}[console_tls]\n"), Some("console_tls")),
            (format!("{}{tls}", BASE.replace("https://vc", "http://vc")), Some("sdk_url")),
            (format!("{}{tls}", BASE.replace("DC0", "a/b")), Some("datacenter")),
            (format!("colour = 1\n{BASE}{tls}"), Some("invalid configuration")),
            (format!("{BASE}{tls}[server]\ntls_cert_file = \"/c\"\n"), Some("server.tls_key_file")),
        ];
        for (text, want) in cases {
            assert_eq!(check(&text).as_deref(), want, "{text}");
        }
    }

    #[test]
    fn timing_values_out_of_range_are_refused_with_field_and_range() {
        let fp = ["AB"; 32].join(":");
        let cases = [
            ("retry_attempts = 0", "timing.retry_attempts: 0 is out of range, allowed 1..=100"),
            ("retry_base_ms = 0", "timing.retry_base_ms: 0 is out of range, allowed 1..=60000"),
            ("retry_base_ms = 60001", "timing.retry_base_ms: 60001 is out of range, allowed 1..=60000"),
            (
                "request_timeout_seconds = 0",
                "timing.request_timeout_seconds: 0 is out of range, allowed 1..=3600",
            ),
            ("task_timeout_seconds = 0", "timing.task_timeout_seconds: 0 is out of range, allowed 1..=86400"),
        ];
        for (timing, want) in cases {
            let text = format!("{BASE}[tls]\nfingerprint = \"{fp}\"\n[timing]\n{timing}\n");
            let got = Config::from_toml(&text).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_owned()), "{timing}");
        }
        let defaults = Config::from_toml(&format!("{BASE}[tls]\nfingerprint = \"{fp}\"\n")).unwrap();
        assert_eq!(defaults.timing.retry_base_ms, 250);
    }
}
