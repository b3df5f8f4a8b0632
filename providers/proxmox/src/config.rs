//! The provider's typed, strict configuration (a TOML file): where the
//! cluster is, how to trust it, how to authenticate (or wait for
//! credentials from `Identity.Configure`), and how HCP's images, networks
//! and cloud-init map onto the cluster. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hcp_provider_sdk::kit::config::check_range;
use hcp_provider_sdk::kit::{Backings, HttpsUrl, ProviderConfig, ServerConfig, UrlError, split_https_url};
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
    /// Storage that takes imported images (an `upload` with content
    /// `import`: it must have `import` in its content types, which PVE
    /// allows on file-based storages); default `storage`. Without either,
    /// image import is not offered.
    #[serde(default)]
    pub image_storage: Option<String>,
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
    /// The provider's own gRPC server: unix socket, TLS.
    #[serde(default)]
    pub server: ServerConfig,
    /// Volumes (block storage that outlives VMs).
    #[serde(default)]
    pub volumes: VolumesConfig,
    /// Address the serial console relay listens on: core's console proxy
    /// connects there with a single-use ticket and gets a VM's serial line
    /// (PVE's termproxy, relayed). Default `127.0.0.1`.
    #[serde(default = "default_serial_listen")]
    pub serial_listen: IpAddr,
    /// TCP port of the serial console relay; 0 (the default) picks a free
    /// port at start.
    #[serde(default)]
    pub serial_port: u16,
    /// Address core's console proxy uses to reach the relay; default
    /// `serial_listen`.
    #[serde(default)]
    pub console_host: Option<String>,
}

fn default_serial_listen() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// Where volumes go and who owns them on PVE.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// Storage of a volume whose spec names none; default `storage`.
    /// Without either, volumes are not offered.
    pub storage: Option<String>,
    /// The vmid every HCP volume is allocated under (`vm-<owner>-hcp-<id>`).
    /// No VM may ever have it: PVE destroys the disks a VM's vmid owns with
    /// the VM, and only those, so volumes owned by a vmid that is never a VM
    /// survive every VM they were attached to. Default 999999999, above the
    /// ids `nextid` hands out (PVE's `next-id` range ends at 1000000 unless
    /// the datacenter changes it).
    pub owner_vmid: u32,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self { storage: None, owner_vmid: 999_999_999 }
    }
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
    /// The polling interval (validated with the configuration: at least
    /// 1 ms).
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.task_poll_ms)
    }
}

pub use hcp_provider_sdk::kit::ConfigError;

/// What `[timing]` accepts: zero and absurd values are refused at start.
const TASK_POLL_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
const TASK_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;
const RETRY_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=100;
const RETRY_BASE_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
const REQUEST_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=3_600;

impl Config {
    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::from_toml(text)
    }

    /// Reads and checks a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::load(path)
    }

    /// The API's host and port (8006 when the URL names none); its path is
    /// not used, `/api2/json` is.
    pub fn api(&self) -> Result<HttpsUrl, UrlError> {
        split_https_url(&self.api_url, 8006, "")
    }

    /// HCP networks to bridges: the `[networks]` table, and `bridge` both
    /// for names missing from it and for a VM without networks.
    pub fn backings(&self) -> Backings<String> {
        Backings::new(self.networks.clone(), Some(self.bridge.clone())).unknown_take_default()
    }

    fn check(&self) -> Result<(), ConfigError> {
        let field = |field, message: &str| Err(ConfigError::field(field, message));
        if let Err(e) = self.api() {
            return Err(ConfigError::field("api_url", e));
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
        let owner = self.volumes.owner_vmid;
        if !(100..=999_999_999).contains(&owner)
            || self.vmid_range.is_some_and(|(lo, hi)| (lo..=hi).contains(&owner))
        {
            return field("volumes.owner_vmid", "must be within 100..=999999999 and outside vmid_range");
        }
        if self.cloud_init.snippets_dir.is_some() != self.cloud_init.snippets_storage.is_some() {
            return field("cloud_init", "snippets_storage and snippets_dir go together");
        }
        let t = &self.timing;
        check_range("timing.task_poll_ms", t.task_poll_ms, TASK_POLL_MS)?;
        check_range("timing.task_timeout_seconds", t.task_timeout_seconds, TASK_TIMEOUT_SECONDS)?;
        check_range("timing.retry_attempts", t.retry_attempts, RETRY_ATTEMPTS)?;
        check_range("timing.retry_base_ms", t.retry_base_ms, RETRY_BASE_MS)?;
        check_range("timing.request_timeout_seconds", t.request_timeout_seconds, REQUEST_TIMEOUT_SECONDS)?;
        self.server.validate()
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

    const BASE: &str = "api_url = \"https://pve:8006\"\nnode = \"pve1\"\n";

    /// What the configuration is refused for: the field its error names, or
    /// its message when it names none; `None` when it is accepted.
    fn check(extra: &str) -> Option<String> {
        Config::from_toml(&format!("{BASE}{extra}")).err().map(|e| match e.field_name() {
            Some(field) => field.to_owned(),
            None => e.to_string(),
        })
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let fp = ["AB"; 32].join(":");
        let cases: Vec<(String, Option<&str>)> = vec![
            (format!("[tls]\nfingerprint = \"{fp}\"\n"), None),
            ("[tls]\nca_file = \"/ca.pem\"\n".into(), None),
            ("[tls]\n".into(), Some("tls")),
            ("[tls]\nfingerprint = \"AB:CD\"\n".into(), Some("tls.fingerprint")),
            (format!("vmid_range = [50, 60]\n[tls]\nfingerprint = \"{fp}\"\n"), Some("vmid_range")),
            (
                format!("[tls]\nfingerprint = \"{fp}\"\n[cloud_init]\nsnippets_dir = \"/x\"\n"),
                Some("cloud_init"),
            ),
            (format!("colour = 1\n[tls]\nfingerprint = \"{fp}\"\n"), Some("invalid configuration")),
            (
                format!(
                    "vmid_range = [1000, 2000]\n[tls]\nfingerprint = \"{fp}\"\n[volumes]\nowner_vmid = 1500\n"
                ),
                Some("volumes.owner_vmid"),
            ),
            (
                format!("[tls]\nfingerprint = \"{fp}\"\n[volumes]\nowner_vmid = 99\n"),
                Some("volumes.owner_vmid"),
            ),
            (format!("[tls]\nfingerprint = \"{fp}\"\n[volumes]\nstorage = \"ceph\"\n"), None),
            (
                format!(
                    "serial_listen = \"0.0.0.0\"\nserial_port = 50072\nconsole_host = \"10.0.0.5\"\n\
                     [tls]\nfingerprint = \"{fp}\"\n"
                ),
                None,
            ),
            (format!("serial_port = 70000\n[tls]\nfingerprint = \"{fp}\"\n"), Some("invalid configuration")),
            (
                format!("serial_listen = \"pve\"\n[tls]\nfingerprint = \"{fp}\"\n"),
                Some("invalid configuration"),
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(check(&extra).as_deref(), want, "{extra}");
        }
    }

    #[test]
    fn timing_values_out_of_range_are_refused_with_field_and_range() {
        let fp = ["AB"; 32].join(":");
        let cases = [
            ("task_poll_ms = 0", "timing.task_poll_ms: 0 is out of range, allowed 1..=60000"),
            ("task_timeout_seconds = 0", "timing.task_timeout_seconds: 0 is out of range, allowed 1..=86400"),
            ("retry_attempts = 0", "timing.retry_attempts: 0 is out of range, allowed 1..=100"),
            ("retry_base_ms = 0", "timing.retry_base_ms: 0 is out of range, allowed 1..=60000"),
            ("retry_base_ms = 60001", "timing.retry_base_ms: 60001 is out of range, allowed 1..=60000"),
            (
                "request_timeout_seconds = 0",
                "timing.request_timeout_seconds: 0 is out of range, allowed 1..=3600",
            ),
        ];
        for (timing, want) in cases {
            let text = format!("{BASE}[tls]\nfingerprint = \"{fp}\"\n[timing]\n{timing}\n");
            let got = Config::from_toml(&text).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_owned()), "{timing}");
        }
        let c = Config::from_toml(&format!("{BASE}[tls]\nfingerprint = \"{fp}\"\n")).unwrap();
        assert_eq!((c.timing.poll(), c.api().unwrap().port), (Duration::from_millis(500), 8006));
        for url in ["http://pve:8006", "https://:8006", "https://pve:port"] {
            let text = format!("{}[tls]\nfingerprint = \"{fp}\"\n", BASE.replace("https://pve:8006", url));
            assert_eq!(Config::from_toml(&text).unwrap_err().field_name(), Some("api_url"), "{url}");
        }
    }
}
