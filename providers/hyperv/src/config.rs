//! The provider's typed, strict configuration (a TOML file): where the
//! Hyper-V host's WinRM listener is, how to trust it, where VM disks and
//! seed ISOs go on the host, and how HCP's images and networks map onto
//! parent VHDX files and virtual switches. Unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use hcp_provider_sdk::kit::config::check_range;
use hcp_provider_sdk::kit::{Backings, HttpsUrl, ProviderConfig, ServerConfig, UrlError, split_https_url};
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
    /// The image share as the provider sees it: a directory the provider
    /// writes imported and captured VHDX files to (an SMB share mounted on
    /// the provider's host). WS-Management carries no files, so image
    /// import and capture need it; without it they are not offered.
    #[serde(default)]
    pub image_share: Option<PathBuf>,
    /// The same share as the Hyper-V host sees it (`\\files\images`, or a
    /// local path of the host's own share); an image's `source` is a path
    /// under it.
    #[serde(default)]
    pub image_share_host_path: Option<String>,
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
    /// Volumes: VHDX files made, attached and deleted by volume id.
    #[serde(default)]
    pub volumes: VolumesConfig,
    /// Timing and retries.
    #[serde(default)]
    pub timing: TimingConfig,
    /// The provider's own gRPC server: unix socket, TLS.
    #[serde(default)]
    pub server: ServerConfig,
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

/// Where volumes live on the host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumesConfig {
    /// The directory for volumes of `VolumeSpec.storage` "" (the default).
    /// Default: `vm_dir\volumes`.
    #[serde(default)]
    pub dir: Option<String>,
    /// Named storages (`VolumeSpec.storage`) -> a directory on the host.
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
    /// The directories are shared storage (a Cluster Shared Volume or an
    /// SMB share every host reaches): `volumes_host_local` false. Default
    /// false: the host's own disks.
    #[serde(default)]
    pub shared: bool,
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

pub use hcp_provider_sdk::kit::ConfigError;

/// What `[timing]` accepts: zero and absurd values are refused at start.
const JOB_POLL_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
const JOB_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;
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

    /// The WinRM listener's URL in parts.
    pub fn url(&self) -> Result<HttpsUrl, UrlError> {
        split_https_url(&self.url, 5986, "/wsman")
    }

    /// HCP networks to virtual switches: the `[networks]` table, names
    /// missing from it refused, `default_switch` for a VM without networks.
    pub fn backings(&self) -> Backings<String> {
        Backings::new(self.networks.clone(), Some(self.default_switch.clone()))
    }

    fn check(&self) -> Result<(), ConfigError> {
        let field = |field, message: &str| Err(ConfigError::field(field, message));
        if let Err(e) = self.url() {
            return Err(ConfigError::field("url", e));
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
        match (&self.image_share, &self.image_share_host_path) {
            (Some(_), None) | (None, Some(_)) => {
                return field("image_share", "image_share and image_share_host_path go together");
            }
            (Some(local), Some(host)) => {
                if !local.is_absolute() {
                    return field("image_share", "must be an absolute path");
                }
                if host.trim_end_matches('\\').is_empty() || host.contains(['/', '"']) {
                    return field(
                        "image_share_host_path",
                        "must be a Windows path (\\\\server\\share or D:\\images)",
                    );
                }
            }
            (None, None) => {}
        }
        // Volume directories are named in WQL (`Drive`, `Path`): a drive
        // letter and a path below it.
        let dirs = self
            .volumes
            .dir
            .iter()
            .map(|d| ("volumes.dir".to_owned(), d))
            .chain(self.volumes.storage.iter().map(|(k, d)| (format!("volumes.storage.{k}"), d)));
        for (name, d) in dirs {
            if crate::volumes::split_dir(d).is_none() {
                return Err(ConfigError::field(
                    &name,
                    "must be a directory on a drive, like 'D:\\HCP\\volumes'",
                ));
            }
        }
        if self.volumes.storage.contains_key("") {
            return field("volumes.storage", "a storage name must not be empty (\"\" is volumes.dir)");
        }
        match self.tls.check() {
            Ok(()) => {}
            Err(e @ hcp_tls::TrustConfigError::BadFingerprint) => {
                return field("tls.fingerprint", &e.to_string());
            }
            Err(e) => return field("tls", &e.to_string()),
        }
        let t = &self.timing;
        check_range("timing.job_poll_ms", t.job_poll_ms, JOB_POLL_MS)?;
        check_range("timing.job_timeout_seconds", t.job_timeout_seconds, JOB_TIMEOUT_SECONDS)?;
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

    #[test]
    fn configs_are_checked_field_by_field() {
        let fp = ["AB"; 32].join(":");
        let base = "url = \"https://hv1:5986/wsman\"\nvm_dir = 'C:\\Hyper-V\\hcp'\n";
        let check = |t: &str| {
            Config::from_toml(t).map(|_| ()).map_err(|e| match e.field_name() {
                Some(field) => field.to_owned(),
                None => e.to_string(),
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
        let tls = format!("[tls]\nfingerprint = \"{fp}\"\n");
        assert_eq!(
            check(&format!("{base}{tls}[volumes]\ndir = 'D:\\vols'\n[volumes.storage]\ngold = 'E:\\g'\n")),
            Ok(())
        );
        assert_eq!(
            check(&format!("{base}{tls}[volumes]\ndir = '\\\\fs\\share'\n")),
            Err("volumes.dir".into())
        );
        assert_eq!(
            check(&format!("{base}{tls}[volumes.storage]\ngold = 'vols'\n")),
            Err("volumes.storage.gold".into())
        );
    }

    #[test]
    fn timing_values_out_of_range_are_refused_with_field_and_range() {
        let fp = ["AB"; 32].join(":");
        let base =
            format!("url = \"https://hv1:5986/wsman\"\nvm_dir = 'C:\\hcp'\n[tls]\nfingerprint = \"{fp}\"\n");
        let cases = [
            ("job_poll_ms = 0", "timing.job_poll_ms: 0 is out of range, allowed 1..=60000"),
            ("job_timeout_seconds = 0", "timing.job_timeout_seconds: 0 is out of range, allowed 1..=86400"),
            ("retry_attempts = 0", "timing.retry_attempts: 0 is out of range, allowed 1..=100"),
            ("retry_base_ms = 0", "timing.retry_base_ms: 0 is out of range, allowed 1..=60000"),
            ("retry_base_ms = 60001", "timing.retry_base_ms: 60001 is out of range, allowed 1..=60000"),
            (
                "request_timeout_seconds = 0",
                "timing.request_timeout_seconds: 0 is out of range, allowed 1..=3600",
            ),
        ];
        for (timing, want) in cases {
            let got = Config::from_toml(&format!("{base}[timing]\n{timing}\n"))
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_owned()), "{timing}");
        }
        let c = Config::from_toml(&format!("{base}[server]\nunix_socket = \"/run/hv.sock\"\n")).unwrap();
        assert_eq!((c.timing.job_poll_ms, c.url().unwrap().port), (250, 5986));
    }
}
