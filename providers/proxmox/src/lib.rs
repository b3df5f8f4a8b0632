//! # hcp-provider-proxmox
//!
//! The Proxmox VE provider: HCP's `hcp.provider.v1` served through the SDK,
//! mapped onto a PVE cluster's API (`client.rs`).
//!
//! - A VM is a **full clone** of the template for its image, with cores and
//!   memory from the flavor, `net0` on the bridge for its network, and
//!   cloud-init (`ciuser`, URL-encoded `sshkeys`, `ipconfig0`, user data as
//!   a `cicustom` snippet).
//! - Its HCP id travels in the description (`hcp-vm-id=<uuid>`, set by the
//!   clone itself) and in tags (`hcp` and `hcp-<uuid>`), so a create that is
//!   retried after any failure finds the VM instead of making a second one,
//!   and the reconciler can list every HCP VM from `/cluster/resources`.
//! - vmids come from `nextid` (which reserves nothing): a collision is
//!   answered by re-checking for our VM and trying another id.
//! - Calls for one VM are serialized; PVE's transient failures are retried
//!   in the client; everything else is mapped once, in [`map_error`].

pub mod cli;
pub mod client;
pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hcp_provider_sdk::support::{VmLocks, is_uuid};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};
use serde_json::Value;

use crate::client::{Credentials, Method, Params, Pve, PveError, Trust, encode_segment, lenient};
use crate::config::{Config, ConfigError};

/// The provider.
pub struct Proxmox {
    pve: Arc<Pve>,
    config: Arc<Config>,
    locks: VmLocks,
    version: tokio::sync::Mutex<Option<(u32, u32, String)>>,
}

/// A VM of ours as `/cluster/resources` shows it.
#[derive(Debug, Clone)]
struct Found {
    node: String,
    vmid: u64,
    status: String,
    vcpus: u32,
    memory_mib: u32,
    /// The root image's size (`maxdisk`), whole GiB rounded up; 0 unknown.
    disk_gib: u32,
    configured: bool,
}

impl Found {
    fn info(&self, vm_id: &str) -> pb::VmInfo {
        let power = match self.status.as_str() {
            "running" => pb::PowerState::Running,
            "paused" => pb::PowerState::Paused,
            "stopped" => pb::PowerState::Shutoff,
            _ => pb::PowerState::Unspecified,
        };
        pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: power as i32,
            native_id: format!("{}/{}", self.node, self.vmid),
            host: self.node.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            // NICs need the VM's config: GetVm adds them (`described`).
            ..Default::default()
        }
    }

    fn path(&self) -> String {
        format!("/nodes/{}/qemu/{}", encode_segment(&self.node), self.vmid)
    }
}

/// The NIC keys a VM of ours may have, in order.
const NICS: [&str; 8] = ["net0", "net1", "net2", "net3", "net4", "net5", "net6", "net7"];

/// One `key=value` option of a `netN` value.
fn net_option<'a>(net: &'a str, key: &str) -> Option<&'a str> {
    net.split(',').find_map(|p| p.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

/// The MAC of a `netN` value (`virtio=BC:24:11:AA:BB:CC,bridge=vmbr0`, or
/// `macaddr=` in the long form), lower case; empty when PVE assigned none.
fn mac_of(net: &str) -> String {
    let is_mac = |v: &str| v.len() == 17 && v.split(':').count() == 6;
    net.split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(k, v)| *k != "bridge" && is_mac(v))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The tag naming one HCP VM.
fn id_tag(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// The tag a clone carries from the moment it exists until its
/// configuration is complete: HCP's inventory, delete and a retried create
/// all see it, so a create that fails half-way leaks nothing.
const PENDING_TAG: &str = "hcp-pending";

/// The tags of a clone whose configuration is not complete.
fn pending_tags(vm_id: &str) -> String {
    format!("hcp;{};{PENDING_TAG}", id_tag(vm_id))
}

/// The description line naming one HCP VM.
fn id_line(vm_id: &str) -> String {
    format!("hcp-vm-id={vm_id}")
}

/// PVE snapshot names are config ids (letter first, at most 40): `hcp` and
/// the UUID's 32 hex digits.
fn snapname(snapshot_id: &str) -> String {
    format!("hcp{}", snapshot_id.replace('-', ""))
}

fn snapshot_id_of(snapname: &str) -> Option<String> {
    let hex = snapname.strip_prefix("hcp")?;
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

/// A VM name PVE accepts (dns-name): letters, digits and dashes.
fn dns_name(spec: &pb::VmSpec, vm_id: &str) -> String {
    let raw = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
    let cleaned: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() { format!("hcp-{}", &vm_id[..8]) } else { trimmed.chars().take(63).collect() }
}

/// GiB in a PVE size (`32G`, `512M`, `1T`).
fn gib_of(size: &str) -> Option<f64> {
    let (num, unit) = size.split_at(size.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(size.len()));
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "T" => n * 1024.0,
        "G" => n,
        "M" => n / 1024.0,
        "K" => n / (1024.0 * 1024.0),
        "" => n / (1024.0 * 1024.0 * 1024.0),
        _ => return None,
    })
}

fn tags_of(item: &Value) -> Vec<String> {
    item["tags"].as_str().unwrap_or_default().split([';', ',', ' ']).map(str::to_owned).collect()
}

/// Maps a PVE failure onto the protocol's error kinds (the only place).
pub fn map_error(e: PveError) -> ProviderError {
    let message = e.to_string();
    let (kind, retryable) = match &e {
        PveError::NoCredentials => (ErrorKind::Unavailable, None),
        PveError::Auth(_) => (ErrorKind::PermissionDenied, Some(false)),
        PveError::Transport(_) | PveError::Timeout(_) => (ErrorKind::Unavailable, None),
        PveError::Decode(_) => (ErrorKind::Internal, None),
        // A cluster that lost quorum refuses writes until it has it back:
        // a passing condition, retried with backoff like 595.
        _ if e.message().contains("no quorum") || e.message().contains("cluster not ready") => {
            (ErrorKind::Unavailable, None)
        }
        PveError::Task { .. } if e.is_lock() => (ErrorKind::Busy, None),
        PveError::Task { .. } => (ErrorKind::Internal, Some(false)),
        PveError::Status { status, .. } => match status {
            400 => (ErrorKind::InvalidArgument, None),
            403 => (ErrorKind::PermissionDenied, Some(false)),
            501 => (ErrorKind::Unsupported, None),
            502 | 503 | 595 | 596 => (ErrorKind::Unavailable, None),
            _ if e.is_not_found() => (ErrorKind::NotFound, None),
            _ if e.is_lock() => (ErrorKind::Busy, None),
            _ if e.already_exists() => (ErrorKind::Busy, None),
            _ if e.message().contains("not running") || e.message().contains("is running") => {
                (ErrorKind::InvalidState, None)
            }
            _ => (ErrorKind::Internal, None),
        },
    };
    let mut err = ProviderError::new(kind, message);
    err.retryable = retryable;
    err
}

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable (including its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The trust of `tls` could not be loaded.
    #[error(transparent)]
    Trust(hcp_tls::TrustError),
    /// The API client could not be built.
    #[error("cannot build the api client")]
    Client(#[source] crate::client::ClientError),
    /// A secret file could not be read.
    #[error("{field} {}", path.display())]
    Secret {
        /// The field naming the file.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A credential is incomplete.
    #[error("{field}: required with {with}")]
    Missing {
        /// The missing field.
        field: &'static str,
        /// The field that needs it.
        with: &'static str,
    },
    /// `[auth]` names neither a token nor a user.
    #[error("auth: set token_id or username")]
    NoCredential,
    /// The server failed.
    #[error("cannot serve")]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, format!("{field}: {message}"))
}

impl Proxmox {
    /// Builds the provider from its configuration (credentials from the
    /// config file, if any, are installed at once).
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustError` names the `tls` table itself.
        let trust = config.tls.load().map_err(StartError::Trust)?;
        let pve = Pve::new(&config.api_url, trust, config.timing.clone()).map_err(StartError::Client)?;
        if let Some(auth) = &config.auth {
            let read = |v: &Option<String>,
                        f: &Option<std::path::PathBuf>,
                        field: &'static str|
             -> Result<Option<String>, StartError> {
                match (v, f) {
                    (Some(v), _) => Ok(Some(v.clone())),
                    (None, Some(f)) => Ok(Some(
                        std::fs::read_to_string(f)
                            .map_err(|source| StartError::Secret { field, path: f.clone(), source })?
                            .trim()
                            .to_owned(),
                    )),
                    (None, None) => Ok(None),
                }
            };
            let missing = |field, with| StartError::Missing { field, with };
            let creds = match (&auth.token_id, &auth.username) {
                (Some(id), _) => Credentials::Token {
                    id: id.clone(),
                    secret: read(&auth.token_secret, &auth.token_secret_file, "auth.token_secret_file")?
                        .ok_or_else(|| missing("auth.token_secret", "auth.token_id"))?,
                },
                (None, Some(user)) => Credentials::Password {
                    username: user.clone(),
                    password: read(&auth.password, &auth.password_file, "auth.password_file")?
                        .ok_or_else(|| missing("auth.password", "auth.username"))?,
                },
                (None, None) => return Err(StartError::NoCredential),
            };
            pve.set_credentials(creds).await;
        }
        Ok(Self {
            pve: Arc::new(pve),
            config: Arc::new(config),
            locks: VmLocks::new(),
            version: tokio::sync::Mutex::new(None),
        })
    }

    /// The API client (tests read its request counter).
    pub fn client(&self) -> &Pve {
        &self.pve
    }

    /// The server's version, probed once: `(major, minor, text)`.
    async fn version(&self) -> Result<(u32, u32, String), PveError> {
        let mut cached = self.version.lock().await;
        if let Some(v) = cached.as_ref() {
            return Ok(v.clone());
        }
        let data = self.pve.call(Method::Get, "/version", Vec::new()).await?;
        let text = data["version"].as_str().unwrap_or_default().to_owned();
        let mut parts = text.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), text);
        tracing::info!(version = %v.2, "proxmox VE version");
        *cached = Some(v.clone());
        Ok(v)
    }

    async fn resources(&self, kind: &str) -> Result<Vec<Value>, ProviderError> {
        let data = self
            .pve
            .call(Method::Get, "/cluster/resources", vec![("type", kind.to_owned())])
            .await
            .map_err(map_error)?;
        Ok(data.as_array().cloned().unwrap_or_default())
    }

    fn found(item: &Value, configured: bool) -> Found {
        Found {
            node: item["node"].as_str().unwrap_or_default().to_owned(),
            vmid: lenient::u64(&item["vmid"]).unwrap_or_default(),
            status: item["status"].as_str().unwrap_or_default().to_owned(),
            vcpus: lenient::u64(&item["maxcpu"]).unwrap_or_default() as u32,
            memory_mib: (lenient::u64(&item["maxmem"]).unwrap_or_default() / (1024 * 1024)) as u32,
            disk_gib: u32::try_from(lenient::u64(&item["maxdisk"]).unwrap_or_default().div_ceil(1 << 30))
                .unwrap_or(u32::MAX),
            configured,
        }
    }

    /// Finds our VM by its tag (a clone still being configured carries
    /// [`PENDING_TAG`] too); with `name`, also a clone the tags never
    /// reached (the description names it).
    async fn find(&self, vm_id: &str, name: Option<&str>) -> Result<Option<Found>, ProviderError> {
        let items = self.resources("vm").await?;
        let tag = id_tag(vm_id);
        let qemu =
            items.iter().filter(|i| i["type"].as_str() == Some("qemu") && !lenient::flag(&i["template"]));
        if let Some(item) = qemu.clone().find(|i| tags_of(i).contains(&tag)) {
            let configured = !tags_of(item).iter().any(|t| t == PENDING_TAG);
            return Ok(Some(Self::found(item, configured)));
        }
        let Some(name) = name else { return Ok(None) };
        for item in qemu.filter(|i| i["name"].as_str() == Some(name)) {
            let f = Self::found(item, false);
            let config = match self.pve.call(Method::Get, &format!("{}/config", f.path()), Vec::new()).await {
                Ok(c) => c,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(map_error(e)),
            };
            let description = config["description"].as_str().unwrap_or_default();
            if description.lines().any(|l| l.trim() == id_line(vm_id)) {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    async fn require(&self, vm_id: &str) -> Result<Found, ProviderError> {
        self.find(vm_id, None).await?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    /// Moves a VM to another node (`online` for a running VM) and waits
    /// for the `qmigrate` task.
    async fn migrate(&self, f: &Found, target: &str, online: bool) -> Result<(), ProviderError> {
        let mut params: Params = vec![("target", target.to_owned())];
        if online {
            params.push(("online", "1".to_owned()));
        }
        let path = format!("{}/migrate", f.path());
        self.pve.task(Method::Post, &path, params).await.map_err(map_error)?;
        tracing::info!(vmid = f.vmid, from = %f.node, to = target, online, "migrated");
        Ok(())
    }

    /// Resolves an image source to a template `(node, vmid)`.
    async fn template(&self, source: &str) -> Result<(String, u64), ProviderError> {
        let items = self.resources("vm").await?;
        let wanted = self.config.templates.get(source).map(|v| u64::from(*v)).or_else(|| source.parse().ok());
        let hit = items.iter().find(|i| {
            lenient::flag(&i["template"])
                && match wanted {
                    Some(id) => lenient::u64(&i["vmid"]) == Some(id),
                    None => i["name"].as_str() == Some(source),
                }
        });
        match hit {
            Some(i) => {
                Ok((i["node"].as_str().unwrap_or_default().to_owned(), lenient::u64(&i["vmid"]).unwrap_or(0)))
            }
            None => {
                Err(invalid("spec.image.source", format!("no proxmox template for image source {source:?}")))
            }
        }
    }

    async fn next_vmid(&self) -> Result<u64, ProviderError> {
        let params: Params = match self.config.vmid_range {
            Some((lo, hi)) => {
                vec![("vmid", (u64::from(lo) + rand::random::<u64>() % u64::from(hi - lo + 1)).to_string())]
            }
            None => Vec::new(),
        };
        match self.pve.call(Method::Get, "/cluster/nextid", params.clone()).await {
            Ok(v) => {
                lenient::u64(&v).ok_or_else(|| map_error(PveError::Decode(format!("nextid answered {v}"))))
            }
            // A random pick that is taken: the caller tries another.
            Err(PveError::Status { status: 400, .. }) if !params.is_empty() => Ok(0),
            Err(e) => Err(map_error(e)),
        }
    }

    fn snippet_name(vm_id: &str) -> String {
        format!("hcp-{vm_id}-user.yaml")
    }

    /// Cores, memory, network, cloud-init and the identifying tags, in one
    /// config update (the tags last to land mark the VM configured).
    async fn configure_vm(&self, f: &Found, vm_id: &str, spec: &pb::VmSpec) -> Result<(), ProviderError> {
        let ci = &self.config.cloud_init;
        // One NIC per network, in order: the operator's mapping (backing)
        // names the bridge; else this provider's own table; else its
        // default bridge. No network: one NIC on the default bridge.
        let bridges =
            self.config.backings().resolve_names(&spec.networks).map_err(|e| invalid("spec.networks", e))?;
        if bridges.len() > NICS.len() {
            return Err(invalid("spec.networks", format!("at most {} networks", NICS.len())));
        }
        let mut params: Params = vec![
            ("cores", spec.vcpus.to_string()),
            ("memory", spec.memory_mib.to_string()),
            ("ipconfig0", ci.ipconfig0.clone().unwrap_or_else(|| "ip=dhcp".to_owned())),
            // Addresses come from the guest agent.
            ("agent", "1".to_owned()),
            // Last of all, the clone is no longer pending.
            ("tags", format!("hcp;{}", id_tag(vm_id))),
        ];
        for (key, bridge) in NICS.iter().zip(&bridges) {
            params.push((key, format!("virtio,bridge={bridge}")));
        }
        if let Some(user) = &ci.user {
            params.push(("ciuser", user.clone()));
        }
        if !ci.ssh_keys.is_empty() {
            params.push(("sshkeys", client::urlencode(&ci.ssh_keys.join("\n"))));
        }
        if let (Some(user_data), Some(storage), Some(dir)) =
            (&spec.user_data, &ci.snippets_storage, &ci.snippets_dir)
        {
            let name = Self::snippet_name(vm_id);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, user_data).and_then(|()| std::fs::rename(&tmp, dir.join(&name))).map_err(
                |e| {
                    ProviderError::new(
                        ErrorKind::Unavailable,
                        format!("cannot write the user data snippet: {e}"),
                    )
                },
            )?;
            params.push(("cicustom", format!("user={storage}:snippets/{name}")));
        }
        // The disk first: the configuration update that follows drops the
        // pending tag, so it must be the last step.
        self.grow_disk(f, spec.disk_gib).await?;
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }

    /// The NICs in order (MAC and bridge from `netN`), with the addresses
    /// the guest agent reports for a running VM. No agent, or one that
    /// does not answer: NICs without addresses.
    async fn interfaces(&self, f: &Found) -> Result<Vec<pb::InterfaceInfo>, ProviderError> {
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        let mut nics: Vec<pb::InterfaceInfo> = NICS
            .iter()
            .filter_map(|key| config[*key].as_str())
            .map(|net| pb::InterfaceInfo {
                network: net_option(net, "bridge").unwrap_or_default().to_owned(),
                mac: mac_of(net),
                ..Default::default()
            })
            .collect();
        if f.status != "running" || nics.is_empty() {
            return Ok(nics);
        }
        let path = format!("{}/agent/network-get-interfaces", f.path());
        let reported = match self.pve.call(Method::Get, &path, Vec::new()).await {
            Ok(v) => v,
            // No agent configured, or not running (yet): no addresses.
            Err(PveError::Status { status: 500, .. }) => return Ok(nics),
            Err(e) => return Err(map_error(e)),
        };
        for iface in reported["result"].as_array().into_iter().flatten() {
            let mac = iface["hardware-address"].as_str().unwrap_or_default().to_ascii_lowercase();
            let Some(nic) = nics.iter_mut().find(|n| !mac.is_empty() && n.mac == mac) else { continue };
            for a in iface["ip-addresses"].as_array().into_iter().flatten() {
                let Some(addr) = a["ip-address"].as_str() else { continue };
                match a["ip-address-type"].as_str() {
                    Some("ipv4") => nic.ipv4.push(addr.to_owned()),
                    Some("ipv6") => nic.ipv6.push(addr.to_owned()),
                    _ => {}
                }
            }
        }
        Ok(nics)
    }

    /// The VM as GetVm answers it: power and size, NICs and addresses.
    async fn described(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let f = self.require(vm_id).await?;
        let mut info = f.info(vm_id);
        info.interfaces = self.interfaces(&f).await?;
        Ok(info)
    }

    /// The boot disk's key and its size in GiB.
    async fn boot_disk(&self, f: &Found) -> Result<(String, f64), ProviderError> {
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        let boot_order = config["boot"].as_str().and_then(|b| b.strip_prefix("order=")).unwrap_or_default();
        let disk = boot_order
            .split(';')
            .chain(["scsi0", "virtio0", "sata0", "ide0"])
            .find(|d| config[*d].as_str().is_some_and(|v| !v.contains("media=cdrom")))
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::new(ErrorKind::Internal, "the vm has no boot disk"))?;
        let size = config[disk.as_str()]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .find_map(|p| p.strip_prefix("size="))
            .and_then(gib_of)
            .unwrap_or(0.0);
        Ok((disk, size))
    }

    /// Grows the boot disk to `gib` (never shrinks it; a template disk that
    /// is already larger stays as it is).
    async fn grow_disk(&self, f: &Found, gib: u32) -> Result<(), ProviderError> {
        if gib == 0 {
            return Ok(());
        }
        let (disk, current) = self.boot_disk(f).await?;
        if current >= f64::from(gib) {
            return Ok(());
        }
        let params: Params = vec![("disk", disk), ("size", format!("{gib}G"))];
        self.pve.task(Method::Put, &format!("{}/resize", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }

    async fn start(&self, f: &Found) -> Result<(), ProviderError> {
        match self.pve.task(Method::Post, &format!("{}/status/start", f.path()), Vec::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.message().contains("already running") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    async fn hard_stop(&self, f: &Found) -> Result<(), ProviderError> {
        let mut params: Params = Vec::new();
        // `overrule-shutdown` (abort a pending shutdown task) is in the 9.x
        // schema; older servers refuse unknown parameters.
        if self.version().await.map_err(map_error)?.0 >= 9 {
            params.push(("overrule-shutdown", "1".to_owned()));
        }
        self.pve.task(Method::Post, &format!("{}/status/stop", f.path()), params).await.map_err(map_error)?;
        Ok(())
    }

    async fn refreshed(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        Ok(self.require(vm_id).await?.info(vm_id))
    }

    async fn snapshots_of(&self, f: &Found) -> Result<Vec<(String, String)>, ProviderError> {
        let list = self
            .pve
            .call(Method::Get, &format!("{}/snapshot", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        Ok(list
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let name = s["name"].as_str()?;
                Some((name.to_owned(), s["description"].as_str().unwrap_or_default().trim().to_owned()))
            })
            .collect())
    }
}

#[hcp_provider_sdk::async_trait]
impl Provider for Proxmox {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("proxmox.hcp.dev", env!("CARGO_PKG_VERSION"), "proxmox")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let version = self.version().await.map_err(map_error)?;
        let storages = self.resources("storage").await?;
        let nodes = self.resources("node").await?;
        let ci = &self.config.cloud_init;
        let snippets = match &ci.snippets_storage {
            Some(name) => storages.iter().any(|s| {
                s["storage"].as_str() == Some(name)
                    && s["content"].as_str().unwrap_or_default().split(',').any(|c| c == "snippets")
            }),
            None => false,
        };
        let online = nodes.iter().filter(|n| n["status"].as_str() == Some("online")).count();
        let shared = storages.iter().any(|s| {
            lenient::flag(&s["shared"])
                && self.config.storage.as_deref().is_none_or(|want| s["storage"].as_str() == Some(want))
        });
        let mut attributes = HashMap::new();
        attributes.insert("pve_version".to_owned(), version.2.clone());
        attributes.insert("node".to_owned(), self.config.node.clone());
        Ok(pb::Capabilities {
            supports_cloud_init: snippets,
            supports_snapshot: true,
            supports_snapshot_running: true,
            supports_live_migration: shared && online > 1,
            // Offline migration copies local disks too.
            supports_cold_migration: online > 1,
            supports_console_vnc: true,
            // Cores, memory and disk of a stopped VM. Not of a running one:
            // PVE hot-plugs CPUs and memory only with `hotplug` including
            // them and NUMA enabled, which HCP's clones do not set up.
            supports_resize: true,
            supports_hot_resize: false,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.pve.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        // Every probe asks the cluster with the credentials in use, so a
        // revoked or expired token (or an unreachable cluster) makes the
        // provider not ready at the next probe, not never.
        match self.pve.call(Method::Get, "/version", Vec::new()).await {
            Ok(data) => Ok((true, format!("proxmox VE {}", data["version"].as_str().unwrap_or("?")))),
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        let creds = match (get("token_id"), get("token_secret"), get("username"), get("password")) {
            (Some(id), Some(secret), _, _) => Credentials::Token { id, secret },
            (_, _, Some(username), Some(password)) => Credentials::Password { username, password },
            _ => {
                return Err(invalid(
                    "credentials",
                    "give token_id and token_secret, or username and password",
                ));
            }
        };
        self.pve.set_credentials(creds).await;
        Ok(())
    }

    fn needs_configuration(&self) -> bool {
        !self.pve.has_credentials()
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let spec = req.spec.unwrap_or_default();
        if spec.vcpus == 0 {
            return Err(invalid("spec.vcpus", "must be at least 1"));
        }
        if spec.memory_mib < 16 {
            return Err(invalid("spec.memory_mib", "must be at least 16"));
        }
        let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
        if source.is_empty() {
            return Err(invalid("spec.image.source", "is required"));
        }
        if spec.user_data.is_some() && self.config.cloud_init.snippets_dir.is_none() {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "user data needs cloud_init.snippets_storage and snippets_dir",
            ));
        }
        let _serial = self.locks.lock(&vm_id).await;
        let name = dns_name(&spec, &vm_id);
        let mut found = self.find(&vm_id, Some(&name)).await?;
        if found.is_none() {
            let (tnode, tvmid) = self.template(&source).await?;
            for attempt in 0..10u32 {
                let newid = self.next_vmid().await?;
                if newid == 0 {
                    continue;
                }
                let mut params: Params = vec![
                    ("newid", newid.to_string()),
                    ("name", name.clone()),
                    ("full", "1".to_owned()),
                    ("description", format!("{}\nmanaged by HCP; do not edit this line", id_line(&vm_id))),
                ];
                if let Some(storage) = &self.config.storage {
                    params.push(("storage", storage.clone()));
                }
                let path = format!("/nodes/{}/qemu/{tvmid}/clone", encode_segment(&tnode));
                match self.pve.task(Method::Post, &path, params).await {
                    Ok(_) => {}
                    Err(e) if e.already_exists() => {
                        tracing::info!(vm_id, newid, attempt, "vmid collision; trying another");
                        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 50)).await;
                    }
                    Err(e) => return Err(map_error(e)),
                }
                found = self.find(&vm_id, Some(&name)).await?;
                if let Some(f) = &found {
                    if !f.configured {
                        // Ours from now on, whatever happens next.
                        let tags: Params = vec![("tags", pending_tags(&vm_id))];
                        self.pve
                            .call(Method::Put, &format!("{}/config", f.path()), tags)
                            .await
                            .map_err(map_error)?;
                    }
                    break;
                }
            }
        }
        let mut f = found.ok_or_else(|| {
            ProviderError::new(ErrorKind::Busy, "no free vmid after 10 attempts (collisions)")
        })?;
        // Clones start on the template's node; a VM placed on another node
        // moves there before its first start (an offline migration, which
        // PVE makes with local disks as well as shared ones).
        if !spec.host.is_empty() && f.node != spec.host && f.status != "running" {
            self.migrate(&f, &spec.host, false).await?;
            f = self.require(&vm_id).await?;
        }
        if !f.configured {
            self.configure_vm(&f, &vm_id, &spec).await?;
        }
        if req.start && f.status != "running" {
            self.start(&f).await?;
        }
        self.refreshed(&vm_id).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        self.described(vm_id).await
    }

    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        let nodes = self.resources("node").await?;
        Ok(nodes
            .iter()
            .filter_map(|n| {
                let name = n["node"].as_str()?.to_owned();
                let state = match n["status"].as_str() {
                    Some("online") => pb::HostState::HostUp,
                    _ => pb::HostState::HostDown,
                };
                Some(pb::HostInfo {
                    name,
                    vcpus: u32::try_from(lenient::u64(&n["maxcpu"]).unwrap_or_default()).unwrap_or(u32::MAX),
                    memory_mib: lenient::u64(&n["maxmem"]).unwrap_or_default() / (1024 * 1024),
                    state: state as i32,
                })
            })
            .collect())
    }

    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        if f.node == req.target_host {
            return self.described(&req.vm_id).await;
        }
        let running = f.status == "running";
        if req.live != running {
            let why = if running {
                "the vm is running; migrate it live"
            } else {
                "a live migration needs a running vm"
            };
            return Err(ProviderError::new(ErrorKind::InvalidState, why));
        }
        let nodes = self.resources("node").await?;
        let online = |name: &str| {
            nodes.iter().any(|n| n["node"].as_str() == Some(name) && n["status"].as_str() == Some("online"))
        };
        if !nodes.iter().any(|n| n["node"].as_str() == Some(req.target_host.as_str())) {
            return Err(invalid("target_host", format!("the cluster has no node {}", req.target_host)));
        }
        if !online(&req.target_host) {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("node {} is offline", req.target_host),
            ));
        }
        if !online(&f.node) {
            // PVE moves a dead node's VMs only through its HA manager.
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("node {} is offline; its VMs are recovered by the cluster's HA manager", f.node),
            ));
        }
        self.migrate(&f, &req.target_host, req.live).await?;
        self.described(&req.vm_id).await
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let items = self.resources("vm").await?;
        let vms: Vec<pb::VmInfo> = items
            .iter()
            .filter(|i| i["type"].as_str() == Some("qemu") && tags_of(i).iter().any(|t| t == "hcp"))
            .filter_map(|i| {
                let id = tags_of(i)
                    .into_iter()
                    .find_map(|t| t.strip_prefix("hcp-").filter(|id| is_uuid(id)).map(str::to_owned))?;
                Some(Self::found(i, true).info(&id))
            })
            .collect();
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "running" {
            self.start(&f).await?;
        }
        self.refreshed(vm_id).await
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        if f.status == "stopped" {
            return Ok(f.info(&req.vm_id));
        }
        if req.force {
            self.hard_stop(&f).await?;
        } else {
            let timeout = if req.timeout_seconds == 0 {
                self.config.timing.shutdown_timeout_seconds
            } else {
                u64::from(req.timeout_seconds)
            };
            let path = format!("{}/status/shutdown", f.path());
            let params = vec![("timeout", timeout.to_string())];
            // The task runs as long as the guest takes, up to the timeout.
            let runs_up_to = Duration::from_secs(timeout);
            match self.pve.task_within(Method::Post, &path, params, runs_up_to).await {
                Ok(_) => {}
                Err(PveError::Task { message, .. }) => {
                    tracing::info!(vm_id = %req.vm_id, %message, "ACPI shutdown failed; stopping hard");
                    self.hard_stop(&f).await?;
                }
                Err(e) if e.message().contains("not running") => {}
                Err(e) => return Err(map_error(e)),
            }
        }
        self.refreshed(&req.vm_id).await
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.as_str();
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "running" {
            return Err(ProviderError::new(ErrorKind::InvalidState, format!("vm {vm_id} is not running")));
        }
        // `reset` is the reset button; `reboot` asks the guest (ACPI).
        let action = if req.hard { "reset" } else { "reboot" };
        self.pve
            .task(Method::Post, &format!("{}/status/{action}", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        self.refreshed(vm_id).await
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.as_str();
        let _serial = self.locks.lock(vm_id).await;
        let f = self.require(vm_id).await?;
        if f.status != "stopped" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {vm_id} is {}; it is resized only when stopped", f.status),
            ));
        }
        if req.disk_gib > 0 {
            let (_, current) = self.boot_disk(&f).await?;
            if f64::from(req.disk_gib) < current {
                return Err(invalid(
                    "disk_gib",
                    format!("{} GiB is below the disk's {current} GiB; disks only grow", req.disk_gib),
                ));
            }
        }
        // Setting what is already set is a no-op, so a retry is safe.
        let params: Params = vec![("cores", req.vcpus.to_string()), ("memory", req.memory_mib.to_string())];
        self.pve.call(Method::Put, &format!("{}/config", f.path()), params).await.map_err(map_error)?;
        self.grow_disk(&f, req.disk_gib).await?;
        self.refreshed(vm_id).await
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let Some(f) = self.find(vm_id, None).await? else {
            return Ok(false);
        };
        if f.status == "running" {
            self.hard_stop(&f).await?;
        }
        let params: Params = vec![("purge", "1".to_owned()), ("destroy-unreferenced-disks", "1".to_owned())];
        match self.pve.task(Method::Delete, &f.path(), params).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(map_error(e)),
        }
        if let Some(dir) = &self.config.cloud_init.snippets_dir {
            let _ = std::fs::remove_file(dir.join(Self::snippet_name(vm_id)));
        }
        Ok(true)
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "vnc" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("{} consoles are not supported", req.protocol),
            ));
        }
        let f = self.require(&req.vm_id).await?;
        if f.status != "running" {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        let params: Params = vec![("websocket", "1".to_owned()), ("generate-password", "1".to_owned())];
        let data = self
            .pve
            .call(Method::Post, &format!("{}/vncproxy", f.path()), params)
            .await
            .map_err(map_error)?;
        let port = lenient::u64(&data["port"])
            .ok_or_else(|| map_error(PveError::Decode("vncproxy without port".into())))?;
        let ticket = data["ticket"]
            .as_str()
            .ok_or_else(|| map_error(PveError::Decode("vncproxy without ticket".into())))?;
        let (host, api_port) = self.pve.endpoint();
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("port", &port.to_string())
            .append_pair("vncticket", ticket)
            .finish();
        // The websocket is opened by the console proxy, as this provider:
        // same credentials, same trust in the API's certificate.
        let headers = self
            .pve
            .delegated_auth_headers()
            .await
            .map_err(map_error)?
            .into_iter()
            .map(|(name, value)| pb::ConsoleHeader { name: name.to_owned(), value })
            .collect();
        let (tls_ca_pem, tls_fingerprint_sha256) = match self.pve.trust() {
            Trust::Ca(pem) => (String::from_utf8_lossy(pem).into_owned(), String::new()),
            Trust::Fingerprint(f) => (String::new(), hcp_tls::format_fingerprint(f)),
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".to_owned(),
            host: host.to_owned(),
            port: u32::from(api_port),
            // PVE's VNC authentication takes the password vncproxy
            // generated, or the ticket when it generated none.
            password: data["password"].as_str().unwrap_or(ticket).to_owned(),
            tls: true,
            path: format!("/api2/json{}/vncwebsocket?{query}", f.path()),
            transport: pb::ConsoleTransport::Websocket.into(),
            headers,
            tls_ca_pem,
            tls_fingerprint_sha256,
            websocket_subprotocol: "binary".to_owned(),
            preconnection_blob: String::new(),
        })
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        let name = snapname(&req.snapshot_id);
        let existing = self.snapshots_of(&f).await?.into_iter().find(|(n, _)| *n == name);
        let description = match existing {
            Some((_, d)) => d,
            None => {
                let mut params: Params = vec![("snapname", name.clone()), ("description", req.name.clone())];
                if f.status == "running" {
                    params.push(("vmstate", "1".to_owned()));
                }
                self.pve
                    .task(Method::Post, &format!("{}/snapshot", f.path()), params)
                    .await
                    .map_err(map_error)?;
                req.name.clone()
            }
        };
        Ok(pb::SnapshotInfo {
            snapshot_id: req.snapshot_id,
            vm_id: req.vm_id,
            name: description,
            native_id: name,
        })
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let f = self.require(vm_id).await?;
        Ok(self
            .snapshots_of(&f)
            .await?
            .into_iter()
            .filter_map(|(n, d)| {
                Some(pb::SnapshotInfo {
                    snapshot_id: snapshot_id_of(&n)?,
                    vm_id: vm_id.to_owned(),
                    name: d,
                    native_id: n,
                })
            })
            .collect())
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let f = self.require(&req.vm_id).await?;
        let name = snapname(&req.snapshot_id);
        if !self.snapshots_of(&f).await?.iter().any(|(n, _)| *n == name) {
            return Err(ProviderError::new(
                ErrorKind::NotFound,
                format!("snapshot {} not found", req.snapshot_id),
            ));
        }
        let path = format!("{}/snapshot/{}/rollback", f.path(), encode_segment(&name));
        self.pve.task(Method::Post, &path, Vec::new()).await.map_err(map_error)?;
        self.refreshed(&req.vm_id).await
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(f) = self.find(&req.vm_id, None).await? else {
            return Ok(false);
        };
        let name = snapname(&req.snapshot_id);
        if !self.snapshots_of(&f).await?.iter().any(|(n, _)| *n == name) {
            return Ok(false);
        }
        let path = format!("{}/snapshot/{}", f.path(), encode_segment(&name));
        self.pve.task(Method::Delete, &path, Vec::new()).await.map_err(map_error)?;
        Ok(true)
    }
}

/// Runs the provider until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Proxmox::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_round_trip() {
        let id = "0190b5f2-0000-7000-8000-000000000001";
        let name = snapname(id);
        assert!(name.len() <= 40 && name.starts_with("hcp"));
        assert_eq!(snapshot_id_of(&name).as_deref(), Some(id));
        assert_eq!(snapshot_id_of("before-upgrade"), None);
    }

    #[test]
    fn vm_names_are_dns_names() {
        let id = "0190b5f2-0000-7000-8000-000000000001";
        let spec = |name: &str, host: &str| pb::VmSpec {
            name: name.into(),
            hostname: host.into(),
            ..Default::default()
        };
        for (s, want) in [
            (spec("web-1", ""), "web-1"),
            (spec("Web_1", "db.prod"), "db-prod"),
            (spec("__", ""), "hcp-0190b5f2"),
        ] {
            assert_eq!(dns_name(&s, id), want);
        }
    }

    #[test]
    fn errors_map_to_the_protocol() {
        let status = |status, message: &str| PveError::Status {
            status,
            message: message.into(),
            errors: Default::default(),
        };
        let cases = [
            (status(400, "Parameter verification failed."), ErrorKind::InvalidArgument),
            (status(403, "Permission check failed"), ErrorKind::PermissionDenied),
            (
                status(500, "Configuration file 'nodes/pve/qemu-server/9.conf' does not exist"),
                ErrorKind::NotFound,
            ),
            (
                status(500, "can't lock file '/var/lock/qemu-server/lock-9.conf' - got timeout"),
                ErrorKind::Busy,
            ),
            (status(500, "VM 9 not running"), ErrorKind::InvalidState),
            (status(595, "Connection timed out"), ErrorKind::Unavailable),
            (status(501, "Method not implemented"), ErrorKind::Unsupported),
            (PveError::Auth("authentication failure".into()), ErrorKind::PermissionDenied),
            (PveError::Task { kind: "qmclone".into(), message: "storage full".into() }, ErrorKind::Internal),
        ];
        for (e, want) in cases {
            assert_eq!(map_error(e.clone()).kind, want, "{e}");
        }
        assert_eq!(map_error(PveError::Auth("x".into())).retryable, Some(false));
    }
}
