//! The provider's configuration file: which libvirt to drive, where images
//! and per-VM files live, how HCP network names map to libvirt networks,
//! and how consoles are reached. Parsed strictly: an unknown key or a bad
//! value is an error naming the key, at start, not at the first create.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hcp_provider_sdk::kit::config::check_range;
use hcp_provider_sdk::kit::{Backings, ProviderConfig, ServerConfig};
use serde::Deserialize;

/// Which accelerator domains use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM when the host offers it, otherwise TCG.
    Auto,
    /// Hardware virtualization (`<domain type='kvm'>`).
    Kvm,
    /// QEMU's software emulation (`<domain type='qemu'>`).
    Tcg,
}

/// One bootable image, keyed in the file by the catalog image's `source`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The base disk (qcow2); each VM gets a copy-on-write overlay on it.
    pub disk: PathBuf,
    /// Direct kernel boot: the kernel, when the image is not self-booting.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line.
    pub cmdline: Option<String>,
}

/// What an HCP network attachment becomes on this host; exactly one key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// A libvirt virtual network (`<interface type='network'>`).
    pub network: Option<String>,
    /// A host bridge (`<interface type='bridge'>`).
    pub bridge: Option<String>,
    /// QEMU user-mode networking, no host setup (`<interface type='user'>`).
    #[serde(default)]
    pub user: bool,
}

impl NetworkConfig {
    /// The NIC this entry makes (checked: exactly one key is set).
    fn nic(&self) -> Nic {
        match (&self.network, &self.bridge) {
            (Some(n), _) => Nic::Network(n.clone()),
            (None, Some(b)) => Nic::Bridge(b.clone()),
            (None, None) => Nic::User,
        }
    }
}

/// The NIC a network attachment resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// libvirt network.
    Network(String),
    /// Host bridge.
    Bridge(String),
    /// User-mode.
    User,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address; port 0 picks one.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// libvirt connection URI (`qemu:///system`, `test:///default`, ...).
    #[serde(default = "default_uri")]
    pub uri: String,
    /// Domain accelerator; `auto` picks KVM when the host has it.
    #[serde(default = "default_accelerator")]
    pub accelerator: Accelerator,
    /// Per-VM files (overlay disk, cloud-init seed, serial log). The QEMU
    /// user (libvirt-qemu on Debian) must be able to reach it.
    pub state_dir: PathBuf,
    /// Images by catalog `source`.
    #[serde(default)]
    pub images: BTreeMap<String, ImageConfig>,
    /// Fallback: `<image_dir>/<source>.qcow2` for sources not listed above.
    pub image_dir: Option<PathBuf>,
    /// HCP network name -> NIC.
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkConfig>,
    /// Address VNC servers listen on (the hypervisor side).
    #[serde(default = "default_vnc_listen")]
    pub vnc_listen: IpAddr,
    /// Address core's console proxy uses to reach VNC servers and the
    /// serial relay; defaults to `vnc_listen`.
    pub console_host: Option<String>,
    /// TCP port of the serial console relay on `vnc_listen`: core's console
    /// proxy connects there with a single-use ticket and gets the guest's
    /// serial line. 0 (the default) picks a free port at start.
    #[serde(default)]
    pub serial_port: u16,
    /// Seconds a graceful stop waits for the guest before powering it off,
    /// when the request gives none.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_seconds: u64,
    /// A peer libvirt host for live migration; without one the provider
    /// does not claim live migration.
    pub migration_peer: Option<String>,
    /// The libvirt storage pool volumes (boot volumes included) go to when
    /// `VolumeSpec.storage` is empty; created as a `dir` pool at start when
    /// missing.
    #[serde(default = "default_volume_pool")]
    pub volume_pool: String,
    /// The directory of `volume_pool` when the provider creates it;
    /// default `<state_dir>/volumes`. An existing pool keeps its own.
    pub volume_pool_dir: Option<PathBuf>,
    /// Further existing pools that `VolumeSpec.storage` may name; any other
    /// name is refused, so HCP never writes into a pool it was not given.
    #[serde(default)]
    pub extra_volume_pools: Vec<String>,
    /// Log JSON lines.
    #[serde(default)]
    pub json_logs: bool,
    /// The provider's own gRPC server: unix socket, TLS.
    #[serde(default)]
    pub server: ServerConfig,
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

    fn json_logs(&self) -> bool {
        self.json_logs
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50071))
}
fn default_uri() -> String {
    "qemu:///system".to_owned()
}
fn default_accelerator() -> Accelerator {
    Accelerator::Auto
}
fn default_vnc_listen() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_stop_timeout() -> u64 {
    60
}
fn default_volume_pool() -> String {
    "hcp".to_owned()
}

pub use hcp_provider_sdk::kit::ConfigError;

/// What `stop_timeout_seconds` accepts.
const STOP_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=86_400;

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::load(path)
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        hcp_provider_sdk::kit::config::from_toml(text)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, message: &str| ConfigError::field(field, message);
        if self.uri.trim().is_empty() {
            return Err(invalid("uri".into(), "must not be empty"));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir".into(), "must be an absolute path"));
        }
        for (name, image) in &self.images {
            if !image.disk.is_absolute() {
                return Err(invalid(format!("images.{name}.disk"), "must be an absolute path"));
            }
            if image.initrd.is_some() && image.kernel.is_none() {
                return Err(invalid(format!("images.{name}.initrd"), "needs images.{name}.kernel"));
            }
            if image.cmdline.is_some() && image.kernel.is_none() {
                return Err(invalid(format!("images.{name}.cmdline"), "needs images.{name}.kernel"));
            }
        }
        for (name, net) in &self.networks {
            let set = usize::from(net.network.is_some())
                + usize::from(net.bridge.is_some())
                + usize::from(net.user);
            if set != 1 {
                return Err(invalid(
                    format!("networks.{name}"),
                    "needs exactly one of network = \"...\", bridge = \"...\" or user = true",
                ));
            }
        }
        for (i, pool) in std::iter::once(&self.volume_pool).chain(&self.extra_volume_pools).enumerate() {
            // libvirt takes almost any name, but these end up on command
            // lines (virsh) and in logs: keep them plain.
            let plain = !pool.is_empty()
                && pool.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !pool.starts_with(['.', '-']);
            if !plain {
                let key =
                    if i == 0 { "volume_pool".to_owned() } else { format!("extra_volume_pools[{}]", i - 1) };
                return Err(invalid(key, "must be a plain name (letters, digits, '-', '_', '.')"));
            }
        }
        if let Some(dir) = &self.volume_pool_dir
            && !dir.is_absolute()
        {
            return Err(invalid("volume_pool_dir".into(), "must be an absolute path"));
        }
        check_range("stop_timeout_seconds", self.stop_timeout_seconds, STOP_TIMEOUT_SECONDS)?;
        self.server.validate()
    }

    /// HCP networks (or the operator's backings, which name keys of the
    /// same table) to NICs; no default: a VM without networks has no NIC.
    pub fn backings(&self) -> Backings<Nic> {
        let table = self.networks.iter().map(|(name, net)| (name.clone(), net.nic())).collect();
        Backings::new(table, None)
    }

    /// The image for a catalog source, if this host has it.
    pub fn image(&self, source: &str) -> Option<ImageConfig> {
        if let Some(image) = self.images.get(source) {
            return Some(image.clone());
        }
        let dir = self.image_dir.as_ref()?;
        let ok = !source.is_empty()
            && source.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !source.starts_with('.');
        let disk = dir.join(format!("{source}.qcow2"));
        (ok && disk.is_file()).then_some(ImageConfig { disk, kernel: None, initrd: None, cmdline: None })
    }

    /// The NIC for an HCP network name, if configured.
    pub fn nic(&self, network: &str) -> Option<Nic> {
        self.networks.get(network).map(NetworkConfig::nic)
    }

    /// Where core connects for consoles.
    pub fn console_host(&self) -> String {
        self.console_host.clone().unwrap_or_else(|| self.vnc_listen.to_string())
    }

    /// The directory of the default volume pool when the provider creates it.
    pub fn volume_pool_dir(&self) -> PathBuf {
        self.volume_pool_dir.clone().unwrap_or_else(|| self.state_dir.join("volumes"))
    }

    /// The pool a `VolumeSpec.storage` names: empty is `volume_pool`; else
    /// one of the pools volumes may use, or `None`.
    pub fn volume_pool_for(&self, storage: &str) -> Option<&str> {
        if storage.is_empty() {
            return Some(&self.volume_pool);
        }
        self.volume_pools().find(|p| *p == storage)
    }

    /// Every pool HCP's volumes may be in: the default one first.
    pub fn volume_pools(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.volume_pool.as_str()).chain(self.extra_volume_pools.iter().map(String::as_str))
    }

    /// The default graceful-stop timeout.
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text)
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let c = check("state_dir = \"/var/lib/hcp\"").unwrap();
        assert_eq!(c.uri, "qemu:///system");
        assert_eq!(c.accelerator, Accelerator::Auto);
        assert_eq!(c.console_host(), "127.0.0.1");
        assert_eq!(c.stop_timeout(), Duration::from_secs(60));
        assert_eq!(c.volume_pool, "hcp");
        assert_eq!(c.volume_pool_dir(), PathBuf::from("/var/lib/hcp/volumes"));
    }

    #[test]
    fn volume_storage_names_only_the_pools_given() {
        let c = check("state_dir = \"/s\"\nvolume_pool = \"main\"\nextra_volume_pools = [\"fast\"]").unwrap();
        assert_eq!(c.volume_pool_for(""), Some("main"));
        assert_eq!(c.volume_pool_for("main"), Some("main"));
        assert_eq!(c.volume_pool_for("fast"), Some("fast"));
        assert_eq!(c.volume_pool_for("default"), None);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, want) in [
            ("state_dir = \"rel\"", "state_dir: must be an absolute path"),
            ("state_dir = \"/s\"\nbogus = 1", "unknown field `bogus`"),
            (
                "state_dir = \"/s\"\n[networks.a]\nuser = true\nbridge = \"br0\"",
                "networks.a: needs exactly one",
            ),
            ("state_dir = \"/s\"\n[networks.a]\n", "networks.a: needs exactly one"),
            ("state_dir = \"/s\"\n[images.x]\ndisk = \"/d\"\ninitrd = \"/i\"", "images.x.initrd: needs"),
            ("state_dir = \"/s\"\n[images.x]\ndisk = \"d\"", "images.x.disk: must be an absolute path"),
            ("state_dir = \"/s\"\naccelerator = \"hvf\"", "unknown variant `hvf`"),
            (
                "state_dir = \"/s\"\nstop_timeout_seconds = 0",
                "stop_timeout_seconds: 0 is out of range, allowed 1..=86400",
            ),
            ("state_dir = \"/s\"\nvolume_pool = \"a b\"", "volume_pool: must be a plain name"),
            ("state_dir = \"/s\"\nextra_volume_pools = [\"-x\"]", "extra_volume_pools[0]: must be a plain"),
            ("state_dir = \"/s\"\nvolume_pool_dir = \"v\"", "volume_pool_dir: must be an absolute path"),
            ("state_dir = \"/s\"\n[server]\ntls_key_file = \"/k\"", "server.tls_cert_file: needed with"),
        ] {
            // The error with its causes (TOML's own message).
            let err = hcp_provider_sdk::kit::cli::chain(&check(text).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn networks_resolve_to_nics() {
        let c = check(
            "state_dir = \"/s\"\n[networks.a]\nnetwork = \"default\"\n[networks.b]\nbridge = \"br0\"\n\
             [networks.c]\nuser = true",
        )
        .unwrap();
        assert_eq!(c.nic("a"), Some(Nic::Network("default".into())));
        assert_eq!(c.nic("b"), Some(Nic::Bridge("br0".into())));
        assert_eq!(c.nic("c"), Some(Nic::User));
        assert_eq!(c.nic("d"), None);
    }

    #[test]
    fn image_dir_never_escapes() {
        let c = check("state_dir = \"/s\"\nimage_dir = \"/etc\"").unwrap();
        assert_eq!(c.image("../etc/passwd"), None);
        assert_eq!(c.image(".hidden"), None);
        assert_eq!(c.image(""), None);
    }
}
