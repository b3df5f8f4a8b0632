//! # hcp-provider-vsphere
//!
//! The VMware vSphere provider: HCP's `hcp.provider.v1` served through the
//! SDK, mapped onto vim25 (SOAP) towards vCenter or a standalone ESXi
//! ([`soap`], [`vim`]).
//!
//! - A VM is a clone of the template for its image (`CloneVM_Task`) into
//!   the configured folder, resource pool and datastore, named
//!   `hcp-<vm id>`, whose **instance UUID is the HCP VM id** (set by the
//!   clone itself) and whose `extraConfig` carries `hcp.vm_id`. A create
//!   retried after any failure finds the VM with `FindByUuid` instead of
//!   making a second one, and the reconciler recognizes HCP's VMs by name
//!   and instance UUID.
//! - After the clone, one `ReconfigVM_Task` brings CPUs, memory, the disk
//!   (it only grows), the NICs (one VMXNET3 per HCP network, on the port
//!   group the network maps to) and cloud-init's `guestinfo` keys to what
//!   the spec says; it is skipped when they already are, so every step of
//!   a create can be repeated.
//! - Tasks are awaited through a private PropertyCollector
//!   (`WaitForUpdatesEx`); faults are mapped once, in [`map_error`].
//! - Calls for one VM are serialized.

pub mod cli;
pub mod config;
pub mod soap;
pub mod vim;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::support::{Failpoints, VmLocks, is_uuid};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::config::{Config, ConfigError};
use crate::soap::{Soap, VIM25, VimError};
use crate::vim::{Device, MoRef, ObjectContent, OptionValue};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-clone-submit`, `create:after-clone`,
/// `create:after-reconfigure`, `create:after-power-on` (a create with
/// `start`) and `start:after-power-on` (core's start step after a create);
/// the process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_VSPHERE_FAILPOINTS";

/// The `extraConfig` key naming the HCP VM.
pub const ID_KEY: &str = "hcp.vm_id";

/// The properties read of a VM.
const VM_PROPS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.cpuHotAddEnabled",
    "config.memoryHotAddEnabled",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
];

/// A VM's name on vSphere.
pub fn vm_name(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

/// A snapshot's name on vSphere.
fn snapshot_name(snapshot_id: &str) -> String {
    format!("hcp-{snapshot_id}")
}

/// A VM of ours as vSphere describes it.
#[derive(Debug, Clone)]
struct Vm {
    moref: MoRef,
    name: String,
    instance_uuid: String,
    vcpus: u32,
    memory_mib: u32,
    devices: Vec<Device>,
    cpu_hot_add: bool,
    memory_hot_add: bool,
    power: String,
    /// The moid of the HostSystem it runs on.
    host_ref: String,
    guest: Vec<vim::GuestNic>,
    extra_config: Vec<(String, String)>,
}

impl Vm {
    fn of(o: &ObjectContent) -> Self {
        let text = |p: &str| o.prop(p).map(|v| v.text.trim().to_owned()).unwrap_or_default();
        let num = |p: &str| text(p).parse::<u32>().unwrap_or_default();
        let mut devices: Vec<Device> = o
            .prop("config.hardware.device")
            .map(|d| d.children.iter().map(Device::from_xml).collect())
            .unwrap_or_default();
        devices.sort_by_key(|d| d.key);
        Self {
            moref: o.obj.clone(),
            name: text("name"),
            instance_uuid: text("config.instanceUuid"),
            vcpus: num("config.hardware.numCPU"),
            memory_mib: num("config.hardware.memoryMB"),
            devices,
            cpu_hot_add: text("config.cpuHotAddEnabled") == "true",
            memory_hot_add: text("config.memoryHotAddEnabled") == "true",
            power: text("runtime.powerState"),
            host_ref: o
                .prop("runtime.host")
                .and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok())
                .map(|m| m.value)
                .unwrap_or_default(),
            guest: o.prop("guest.net").map(vim::guest_nics).unwrap_or_default(),
            extra_config: o
                .prop("config.extraConfig")
                .map(|x| {
                    x.children
                        .iter()
                        .map(|c| (c.text_of("key").to_owned(), c.text_of("value").to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn running(&self) -> bool {
        self.power == "poweredOn"
    }

    fn disk(&self) -> Option<&Device> {
        self.devices.iter().find(|d| d.is_disk())
    }

    fn nics(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.is_nic())
    }

    /// What the protocol says of it; `host` is the moid of its host
    /// ([`Vsphere::info`] puts the host's name there).
    fn info_raw(&self, vm_id: &str) -> pb::VmInfo {
        let power = match self.power.as_str() {
            "poweredOn" => pb::PowerState::Running,
            "poweredOff" => pb::PowerState::Shutoff,
            "suspended" => pb::PowerState::Paused,
            _ => pb::PowerState::Unspecified,
        };
        let interfaces = self
            .nics()
            .map(|nic| {
                let mac = nic.mac_address.clone().unwrap_or_default();
                let addresses: Vec<String> = self
                    .guest
                    .iter()
                    .filter(|g| !mac.is_empty() && g.mac == mac)
                    .flat_map(|g| g.addresses.iter().cloned())
                    .collect();
                pb::InterfaceInfo {
                    network: String::new(),
                    mac,
                    ipv4: addresses.iter().filter(|a| !a.contains(':')).cloned().collect(),
                    ipv6: addresses.iter().filter(|a| a.contains(':')).cloned().collect(),
                }
            })
            .collect();
        let disk_gib =
            self.disk().map_or(0, |d| u32::try_from((d.disk_bytes() as u64).div_ceil(1 << 30)).unwrap_or(0));
        pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: power as i32,
            native_id: self.moref.value.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            interfaces,
            disk_gib,
            host: self.host_ref.clone(),
        }
    }
}

/// Where new VMs go, resolved once from the configuration.
#[derive(Debug, Clone)]
struct Places {
    datacenter: MoRef,
    folder: MoRef,
    pool: MoRef,
    datastore: Option<MoRef>,
}

/// The provider.
pub struct Vsphere {
    soap: Arc<Soap>,
    config: Arc<Config>,
    console_trust: hcp_tls::Trust,
    places: tokio::sync::OnceCell<Places>,
    locks: VmLocks,
    /// Clones sent whose answer never came (by HCP VM id): vCenter may
    /// still be making them, invisibly until they end, so a retried create
    /// waits for them instead of cloning again.
    lost_clones: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    failpoints: Failpoints,
    /// HostSystem moid -> name, as the last ListHosts saw them.
    host_names: std::sync::Mutex<HashMap<String, String>>,
}

/// Maps a vSphere failure onto the protocol's error kinds (the only place).
pub fn map_error(e: VimError) -> ProviderError {
    let message = chain(&e);
    let (kind, retryable) =
        match &e {
            VimError::NoCredentials | VimError::Transport(_) | VimError::Timeout(_) => {
                (ErrorKind::Unavailable, None)
            }
            VimError::Encode { .. } | VimError::Decode(_) => (ErrorKind::Internal, None),
            VimError::Fault { fault, .. } => match fault.as_str() {
                "ManagedObjectNotFound" => (ErrorKind::NotFound, None),
                "InvalidPowerState" | "InvalidState" | "ToolsUnavailable" | "InvalidHostState" => {
                    (ErrorKind::InvalidState, None)
                }
                "InvalidArgument" | "InvalidRequest" | "InvalidName" | "InvalidType"
                | "InvalidDeviceSpec" => (ErrorKind::InvalidArgument, None),
                "NotAuthenticated" | "InvalidLogin" | "NoPermission" => {
                    (ErrorKind::PermissionDenied, Some(false))
                }
                "NotSupported" | "MethodNotFound" | "NotImplemented" => (ErrorKind::Unsupported, None),
                // Another task holds the VM, or a second create's clone of the
                // same name is running: it passes.
                "TaskInProgress" | "ResourceInUse" | "ConcurrentAccess" | "DuplicateName"
                | "RequestCanceled" => (ErrorKind::Busy, None),
                "HostCommunication" | "HostNotConnected" | "InsufficientResourcesFault" | "NoDiskSpace" => {
                    (ErrorKind::Unavailable, None)
                }
                _ => (ErrorKind::Internal, None),
            },
        };
    let mut err = ProviderError::new(kind, message);
    err.retryable = retryable;
    err
}

/// `e` and its sources joined by `: `, as a client reads them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable (including its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The trust of `tls` or `console_tls` could not be loaded.
    #[error("{field}: {message}")]
    Trust {
        /// `tls` or `console_tls`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The SOAP client could not be built.
    #[error("cannot build the soap client")]
    Client(#[source] crate::soap::ClientError),
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
    /// The server failed.
    #[error("cannot serve")]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

fn invalid(field: &str, message: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, format!("{field}: {message}"))
}

/// What a NIC's backing should be.
#[derive(Debug, Clone)]
struct PortGroup {
    /// What [`Device::nic_target`] reads back: the name of a standard port
    /// group, the key of a distributed one.
    target: String,
    backing: vim::Backing,
}

impl Vsphere {
    /// Builds the provider from its configuration (credentials from the
    /// config file, if any, are installed at once).
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustConfig::load` prefixes its messages with `tls: `.
        let trust = config.tls.load().map_err(|message| StartError::Trust { field: "tls", message })?;
        let console_trust = match &config.console_tls {
            Some(t) => t.load().map_err(|message| StartError::Trust { field: "console_tls", message })?,
            None => trust.clone(),
        };
        let soap = Soap::new(&config.sdk_url, &trust, config.timing.clone()).map_err(StartError::Client)?;
        if let Some(auth) = &config.auth {
            let password = match (&auth.password, &auth.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|source| StartError::Secret {
                        field: "auth.password_file",
                        path: f.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
                (None, None) => {
                    return Err(StartError::Missing { field: "auth.password", with: "auth.username" });
                }
            };
            soap.set_credentials(auth.username.clone(), password).await;
        }
        let failpoints = Failpoints::from_env(FAILPOINTS_ENV);
        Ok(Self {
            soap: Arc::new(soap),
            config: Arc::new(config),
            console_trust,
            places: tokio::sync::OnceCell::new(),
            locks: VmLocks::new(),
            lost_clones: std::sync::Mutex::new(HashMap::new()),
            host_names: std::sync::Mutex::new(HashMap::new()),
            failpoints,
        })
    }

    /// The SOAP client (tests read its counters).
    pub fn client(&self) -> &Soap {
        &self.soap
    }

    async fn find_path(&self, path: &str) -> Result<Option<MoRef>, VimError> {
        let si = self.soap.content().await?.search_index.clone();
        let req = vim::FindByInventoryPath { xmlns: VIM25, this: &si, inventory_path: path };
        self.soap.invoke("FindByInventoryPath", &req, true).await
    }

    async fn places(&self) -> Result<&Places, ProviderError> {
        self.places
            .get_or_try_init(|| async {
                let dc = &self.config.datacenter;
                let need = |what: &'static str, path: String| async move {
                    self.find_path(&path).await.map_err(map_error)?.ok_or_else(|| {
                        ProviderError::new(
                            ErrorKind::Unavailable,
                            format!("{what} {path:?} is not in the vSphere inventory (check the provider's configuration)"),
                        )
                    })
                };
                let datacenter = need("datacenter", dc.clone()).await?;
                let folder = match &self.config.folder {
                    Some(f) => need("folder", format!("{dc}/vm/{}", f.trim_matches('/'))).await?,
                    None => need("folder", format!("{dc}/vm")).await?,
                };
                let pool = need("resource_pool", format!("{dc}/{}", self.config.resource_pool.trim_matches('/'))).await?;
                let datastore = match &self.config.datastore {
                    Some(d) => Some(need("datastore", format!("{dc}/datastore/{d}")).await?),
                    None => None,
                };
                Ok(Places { datacenter, folder, pool, datastore })
            })
            .await
    }

    async fn properties(&self, obj: &MoRef, paths: &[&str]) -> Result<Option<ObjectContent>, VimError> {
        let pc = self.soap.content().await?.property_collector.clone();
        let req = vim::RetrievePropertiesEx {
            xmlns: VIM25,
            this: &pc,
            spec_set: vec![vim::PropertyFilterSpec::one(obj, paths)],
            options: vim::RetrieveOptions { max_objects: 1 },
        };
        match self.soap.invoke::<_, vim::RetrieveResult>("RetrievePropertiesEx", &req, true).await {
            Ok(r) => Ok(r.objects.into_iter().next()),
            // Deleted between the lookup and the read.
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Our VM, found by its instance UUID (the HCP VM id).
    async fn find(&self, vm_id: &str, extra: &[&str]) -> Result<Option<Vm>, ProviderError> {
        let places = self.places().await?;
        let si = self.soap.content().await.map_err(map_error)?.search_index.clone();
        let req = vim::FindByUuid {
            xmlns: VIM25,
            this: &si,
            datacenter: Some(&places.datacenter),
            uuid: vm_id,
            vm_search: true,
            instance_uuid: true,
        };
        let Some(moref) =
            self.soap.invoke::<_, Option<MoRef>>("FindByUuid", &req, true).await.map_err(map_error)?
        else {
            return Ok(None);
        };
        let paths: Vec<&str> = VM_PROPS.iter().chain(extra).copied().collect();
        let Some(o) = self.properties(&moref, &paths).await.map_err(map_error)? else { return Ok(None) };
        let vm = Vm::of(&o);
        // The instance UUID is ours; the name says it is HCP's.
        if !vm.instance_uuid.eq_ignore_ascii_case(vm_id) || vm.name != vm_name(vm_id) {
            tracing::warn!(vm = %vm.name, moref = %moref.value, "a VM carries an HCP VM id as instance UUID but not HCP's name");
            return Ok(None);
        }
        Ok(Some(vm))
    }

    async fn require(&self, vm_id: &str) -> Result<Vm, ProviderError> {
        self.find(vm_id, &[]).await?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    async fn reread(&self, vm: &Vm) -> Result<Vm, ProviderError> {
        let o = self.properties(&vm.moref, VM_PROPS).await.map_err(map_error)?;
        o.map(|o| Vm::of(&o)).ok_or_else(|| ProviderError::not_found(&vm.instance_uuid))
    }

    /// Every HCP VM in the datacenter, through a container view, paged.
    async fn inventory(&self) -> Result<Vec<Vm>, ProviderError> {
        let places = self.places().await?;
        let content = self.soap.content().await.map_err(map_error)?;
        let (vm_mgr, pc) = (content.view_manager.clone(), content.property_collector.clone());
        let create = vim::CreateContainerView {
            xmlns: VIM25,
            this: &vm_mgr,
            container: &places.datacenter,
            kinds: vec!["VirtualMachine"],
            recursive: true,
        };
        let view: MoRef = self.soap.invoke("CreateContainerView", &create, false).await.map_err(map_error)?;
        let result = async {
            let req = vim::RetrievePropertiesEx {
                xmlns: VIM25,
                this: &pc,
                spec_set: vec![vim::PropertyFilterSpec::view(&view, "VirtualMachine", VM_PROPS)],
                options: vim::RetrieveOptions { max_objects: 200 },
            };
            let mut page: vim::RetrieveResult = self.soap.invoke("RetrievePropertiesEx", &req, true).await?;
            let mut vms = Vec::new();
            loop {
                vms.extend(page.objects.iter().map(Vm::of).filter(|vm| {
                    vm.name
                        .strip_prefix("hcp-")
                        .is_some_and(|id| is_uuid(id) && vm.instance_uuid.eq_ignore_ascii_case(id))
                }));
                let Some(token) = page.token.take() else { break };
                let next = vim::ContinueRetrievePropertiesEx { xmlns: VIM25, this: &pc, token: &token };
                page = self.soap.invoke("ContinueRetrievePropertiesEx", &next, true).await?;
            }
            Ok::<_, VimError>(vms)
        }
        .await;
        if let Err(e) = self.soap.invoke_this::<vim::Nothing>("DestroyView", &view, false).await {
            tracing::debug!(error = %e, "could not destroy a container view");
        }
        result.map_err(map_error)
    }

    /// Resolves an image source to a template.
    async fn template(&self, source: &str) -> Result<MoRef, ProviderError> {
        let name = self.config.templates.get(source).map_or(source, String::as_str);
        if name.is_empty() || name.contains("..") {
            return Err(invalid("spec.image.source", "empty or invalid"));
        }
        let path = format!("{}/vm/{}", self.config.datacenter, name.trim_matches('/'));
        match self.find_path(&path).await.map_err(map_error)? {
            Some(t) if t.kind == "VirtualMachine" => Ok(t),
            _ => {
                Err(invalid("spec.image.source", format!("no vSphere template for image source {source:?}")))
            }
        }
    }

    /// The port group for one network: its backing in HCP's catalog, this
    /// provider's own table, or (without networks) the default.
    async fn port_group(&self, name: &str) -> Result<PortGroup, ProviderError> {
        let path = format!("{}/network/{name}", self.config.datacenter);
        let net = self
            .find_path(&path)
            .await
            .map_err(map_error)?
            .ok_or_else(|| invalid("spec.networks", format!("no port group {name:?} on vSphere")))?;
        let backing = |xsi: &str| vim::Backing {
            xsi_type: xsi.to_owned(),
            file_name: None,
            datastore: None,
            device_name: None,
            network: None,
            port: None,
            disk_mode: None,
            thin_provisioned: None,
        };
        if net.kind == "DistributedVirtualPortgroup" {
            let o = self
                .properties(&net, &["key", "config.distributedVirtualSwitch"])
                .await
                .map_err(map_error)?
                .ok_or_else(|| invalid("spec.networks", format!("port group {name:?} vanished")))?;
            let key = o.prop("key").map(|k| k.text.clone()).unwrap_or_else(|| net.value.clone());
            let dvs = o
                .prop("config.distributedVirtualSwitch")
                .and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok())
                .ok_or_else(|| invalid("spec.networks", format!("port group {name:?} has no switch")))?;
            let uuid = self
                .properties(&dvs, &["uuid"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("uuid").map(|u| u.text.clone()))
                .unwrap_or_default();
            let mut b = backing("VirtualEthernetCardDistributedVirtualPortBackingInfo");
            b.port = Some(vim::PortConnection { switch_uuid: uuid, portgroup_key: key.clone() });
            Ok(PortGroup { target: key, backing: b })
        } else {
            let mut b = backing("VirtualEthernetCardNetworkBackingInfo");
            b.device_name = Some(name.to_owned());
            b.network = Some(net);
            Ok(PortGroup { target: name.to_owned(), backing: b })
        }
    }

    async fn port_groups(&self, spec: &pb::VmSpec) -> Result<Vec<PortGroup>, ProviderError> {
        if spec.networks.len() > 10 {
            return Err(invalid("spec.networks", "at most 10 networks"));
        }
        let names = self.config.backings().resolve_names(&spec.networks).map_err(|e| match e {
            BackingError::UnknownNetwork { network, .. } => {
                invalid("spec.networks", format!("network {network:?} has no port group on this provider"))
            }
            other => invalid("spec.networks", other),
        })?;
        let mut out = Vec::new();
        for name in names {
            out.push(self.port_group(&name).await?);
        }
        Ok(out)
    }

    /// The reconfiguration that brings `vm` to `spec` (empty when it is
    /// there already).
    async fn desired(
        &self,
        vm: &Vm,
        vm_id: &str,
        spec: &pb::VmSpec,
    ) -> Result<vim::ConfigSpec, ProviderError> {
        let mut change = vim::ConfigSpec::default();
        if vm.vcpus != spec.vcpus {
            change.num_cpus = Some(spec.vcpus as i32);
        }
        if vm.memory_mib != spec.memory_mib {
            change.memory_mb = Some(i64::from(spec.memory_mib));
        }
        if self.config.hot_add && !(vm.cpu_hot_add && vm.memory_hot_add) {
            change.cpu_hot_add = Some(true);
            change.memory_hot_add = Some(true);
        }
        if let Some(grow) = grow_disk(vm, spec.disk_gib)? {
            change.device_change.push(grow);
        }
        let wanted = self.port_groups(spec).await?;
        let have: Vec<&str> = vm.nics().map(|n| n.nic_target().unwrap_or_default()).collect();
        if have != wanted.iter().map(|w| w.target.as_str()).collect::<Vec<_>>() {
            for nic in vm.nics() {
                change.device_change.push(vim::DeviceChange { operation: "remove", device: nic.clone() });
            }
            for (i, pg) in wanted.into_iter().enumerate() {
                change.device_change.push(vim::DeviceChange {
                    operation: "add",
                    device: Device {
                        xsi_type: "VirtualVmxnet3".to_owned(),
                        key: -100 - i as i32,
                        device_info: None,
                        backing: Some(pg.backing),
                        connectable: Some(vim::Connectable {
                            start_connected: true,
                            allow_guest_control: true,
                            connected: false,
                        }),
                        controller_key: None,
                        unit_number: None,
                        address_type: Some("generated".to_owned()),
                        mac_address: None,
                        capacity_kb: None,
                        capacity_bytes: None,
                    },
                });
            }
        }
        let mut extra = vec![(ID_KEY.to_owned(), vm_id.to_owned())];
        if let Some(user_data) = &spec.user_data {
            if !self.config.cloud_init {
                return Err(ProviderError::new(
                    ErrorKind::Unsupported,
                    "user data needs cloud_init = true in the vSphere provider's configuration",
                ));
            }
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            let hostname = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
            let metadata = format!("instance-id: {vm_id}\nlocal-hostname: {hostname}\n");
            extra.extend([
                ("guestinfo.userdata".to_owned(), b64(user_data)),
                ("guestinfo.userdata.encoding".to_owned(), "base64".to_owned()),
                ("guestinfo.metadata".to_owned(), b64(&metadata)),
                ("guestinfo.metadata.encoding".to_owned(), "base64".to_owned()),
            ]);
        }
        for (k, v) in extra {
            if !vm.extra_config.iter().any(|(ek, ev)| *ek == k && *ev == v) {
                change.extra_config.push(OptionValue::new(&k, &v));
            }
        }
        Ok(change)
    }

    /// The protocol's view of a VM, its host named as ListHosts names it.
    fn info(&self, vm: &Vm, vm_id: &str) -> pb::VmInfo {
        let mut info = vm.info_raw(vm_id);
        if let Some(name) = self.host_names.lock().unwrap_or_else(|e| e.into_inner()).get(&info.host) {
            info.host = name.clone();
        }
        info
    }

    /// The hosts of the compute resource that owns the resource pool (a
    /// cluster's hosts, or a standalone host): moid, name, capacity, state.
    async fn hosts(&self) -> Result<Vec<(MoRef, pb::HostInfo)>, ProviderError> {
        let places = self.places().await?.clone();
        let owner = self
            .properties(&places.pool, &["owner"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("owner").and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok()))
            .ok_or_else(|| ProviderError::new(ErrorKind::Unavailable, "the resource pool has no owner"))?;
        let refs: Vec<MoRef> = self
            .properties(&owner, &["host"])
            .await
            .map_err(map_error)?
            .and_then(|o| {
                o.prop("host").map(|h| {
                    h.children.iter().filter_map(|c| <MoRef as vim::FromXml>::from_xml(c).ok()).collect()
                })
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let props = [
                "name",
                "summary.hardware.numCpuThreads",
                "summary.hardware.memorySize",
                "runtime.connectionState",
                "runtime.inMaintenanceMode",
            ];
            let Some(o) = self.properties(&r, &props).await.map_err(map_error)? else { continue };
            let text = |p: &str| o.prop(p).map(|v| v.text.trim().to_owned()).unwrap_or_default();
            let state = match (
                text("runtime.connectionState").as_str(),
                text("runtime.inMaintenanceMode").as_str(),
            ) {
                ("connected", "true") => pb::HostState::HostMaintenance,
                ("connected", _) => pb::HostState::HostUp,
                _ => pb::HostState::HostDown,
            };
            let info = pb::HostInfo {
                name: text("name"),
                vcpus: text("summary.hardware.numCpuThreads").parse().unwrap_or(0),
                memory_mib: text("summary.hardware.memorySize").parse::<u64>().unwrap_or(0) / (1024 * 1024),
                state: state as i32,
            };
            out.push((r, info));
        }
        let mut names = self.host_names.lock().unwrap_or_else(|e| e.into_inner());
        names.clear();
        names.extend(out.iter().map(|(r, h)| (r.value.clone(), h.name.clone())));
        Ok(out)
    }

    /// The HostSystem named `name`; INVALID_ARGUMENT when there is none.
    async fn host_ref(&self, name: &str) -> Result<MoRef, ProviderError> {
        self.hosts()
            .await?
            .into_iter()
            .find(|(_, h)| h.name == name)
            .map(|(r, _)| r)
            .ok_or_else(|| invalid("host", format!("no host {name} in the resource pool's cluster")))
    }

    async fn reconfigure(&self, vm: &Vm, change: vim::ConfigSpec) -> Result<(), ProviderError> {
        let req = vim::ReconfigVm { xmlns: VIM25, this: &vm.moref, spec: change };
        self.soap.task("ReconfigVM_Task", &req).await.map_err(map_error)?;
        Ok(())
    }

    async fn power_on(&self, vm: &Vm) -> Result<(), ProviderError> {
        match self.soap.task_this("PowerOnVM_Task", &vm.moref).await {
            Ok(_) => Ok(()),
            // Someone powered it on meanwhile.
            Err(e) if e.fault() == Some("InvalidPowerState") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    async fn power_off(&self, vm: &Vm) -> Result<(), ProviderError> {
        match self.soap.task_this("PowerOffVM_Task", &vm.moref).await {
            Ok(_) => Ok(()),
            Err(e) if e.fault() == Some("InvalidPowerState") => Ok(()),
            Err(e) => Err(map_error(e)),
        }
    }

    /// Waits until the VM is powered off, at most `timeout`.
    async fn off_within(&self, vm: &Vm, timeout: Duration) -> Result<bool, ProviderError> {
        let off = self
            .soap
            .watch(&vm.moref, &["runtime.powerState"], timeout, |c| {
                c.val.as_ref().filter(|v| v.text.trim() == "poweredOff").map(|_| ())
            })
            .await
            .map_err(map_error)?;
        Ok(off.is_some())
    }

    async fn snapshots(&self, vm: &Vm) -> Result<Vec<vim::SnapshotNode>, ProviderError> {
        let o = self.properties(&vm.moref, &["snapshot"]).await.map_err(map_error)?;
        Ok(o.and_then(|o| o.prop("snapshot").map(vim::snapshots_of)).unwrap_or_default())
    }

    async fn snapshot(&self, vm: &Vm, snapshot_id: &str) -> Result<Option<vim::SnapshotNode>, ProviderError> {
        let name = snapshot_name(snapshot_id);
        Ok(self.snapshots(vm).await?.into_iter().find(|s| s.name == name))
    }
}

/// The disk edit that grows the first disk to `gib` (None when it is that
/// size already, or `gib` is 0); shrinking is refused.
fn grow_disk(vm: &Vm, gib: u32) -> Result<Option<vim::DeviceChange>, ProviderError> {
    if gib == 0 {
        return Ok(None);
    }
    let Some(disk) = vm.disk() else {
        return Err(invalid("spec.disk_gib", "the template has no disk to grow"));
    };
    let want = i64::from(gib) << 30;
    let have = disk.disk_bytes();
    if want < have {
        return Err(invalid(
            "disk_gib",
            format!("{gib} GiB is smaller than the disk ({} GiB); disks only grow", have >> 30),
        ));
    }
    if want == have {
        return Ok(None);
    }
    let mut grown = disk.clone();
    grown.capacity_kb = Some(want / 1024);
    grown.capacity_bytes = Some(want);
    if grown.device_info.is_none() {
        grown.device_info = Some(vim::Description { label: "Hard disk 1".into(), summary: String::new() });
    }
    Ok(Some(vim::DeviceChange { operation: "edit", device: grown }))
}

#[hcp_provider_sdk::async_trait]
impl Provider for Vsphere {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("vsphere.hcp.dev", env!("CARGO_PKG_VERSION"), "vsphere")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let content = self.soap.content().await.map_err(map_error)?.clone();
        let places = self.places().await?.clone();
        // Live migration needs a cluster of more than one host and storage
        // they all reach.
        let owner = self
            .properties(&places.pool, &["owner"])
            .await
            .map_err(map_error)?
            .and_then(|o| o.prop("owner").and_then(|x| <MoRef as vim::FromXml>::from_xml(x).ok()));
        let hosts = match &owner {
            Some(c) if c.kind == "ClusterComputeResource" => self
                .properties(c, &["host"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("host").map(|h| h.children.len()))
                .unwrap_or(0),
            _ => 1,
        };
        let shared = match &places.datastore {
            Some(ds) => self
                .properties(ds, &["summary.multipleHostAccess"])
                .await
                .map_err(map_error)?
                .and_then(|o| o.prop("summary.multipleHostAccess").map(|v| v.text.trim() == "true"))
                .unwrap_or(false),
            None => false,
        };
        let mut attributes = HashMap::new();
        attributes.insert("api_type".to_owned(), content.api_type.clone());
        attributes.insert("api_version".to_owned(), content.api_version.clone());
        attributes.insert("product".to_owned(), content.full_name.clone());
        attributes.insert("cluster_hosts".to_owned(), hosts.to_string());
        Ok(pb::Capabilities {
            supports_cloud_init: self.config.cloud_init,
            supports_snapshot: true,
            // With memory: the snapshot of a running VM keeps it running.
            supports_snapshot_running: true,
            supports_live_migration: hosts > 1 && shared,
            // A powered-off VM moves with its disks (RelocateVM_Task).
            supports_cold_migration: hosts > 1,
            // WebMKS (RFB over a websocket) through the console proxy.
            supports_console_vnc: true,
            supports_resize: true,
            supports_hot_resize: self.config.hot_add,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.soap.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        // A call in the session, so that revoked credentials or an
        // unreachable vCenter make the provider not ready.
        let content = match self.soap.content().await {
            Ok(c) => c.clone(),
            Err(e) => return Ok((false, e.to_string())),
        };
        if let Err(e) = self.places().await {
            return Ok((false, e.message));
        }
        match self.properties(&content.root_folder, &["name"]).await {
            Ok(_) => Ok((true, content.full_name)),
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        match (get("username"), get("password")) {
            (Some(u), Some(p)) => {
                self.soap.set_credentials(u, p).await;
                Ok(())
            }
            _ => Err(invalid("credentials", "give username and password")),
        }
    }

    fn needs_configuration(&self) -> bool {
        !self.soap.has_credentials()
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        if !is_uuid(&vm_id) {
            return Err(invalid("vm_id", "must be a UUID"));
        }
        let spec = req.spec.ok_or_else(|| invalid("spec", "required"))?;
        if spec.vcpus == 0 || spec.memory_mib == 0 {
            return Err(invalid("spec", "vcpus and memory_mib must be positive"));
        }
        let image = spec.image.as_ref().ok_or_else(|| invalid("spec.image", "required"))?;
        let _serial = self.locks.lock(&vm_id).await;
        let places = self.places().await?.clone();
        let vm = match self.find(&vm_id, &["config.extraConfig"]).await? {
            Some(vm) => {
                self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm_id);
                vm
            }
            None => {
                let lost = self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).get(&vm_id).copied();
                let patience = Duration::from_secs(self.config.timing.task_timeout_seconds);
                if let Some(sent) = lost.filter(|t| t.elapsed() < patience) {
                    return Err(ProviderError::new(
                        ErrorKind::Busy,
                        format!(
                            "the clone sent {:?} ago got no answer; waiting for vCenter to finish it before cloning again",
                            sent.elapsed()
                        ),
                    ));
                }
                let template = self.template(&image.source).await?;
                let target_host = match spec.host.as_str() {
                    "" => None,
                    name => Some(self.host_ref(name).await?),
                };
                // Checked before anything is made.
                self.port_groups(&spec).await?;
                let name = vm_name(&vm_id);
                let clone = vim::CloneVm {
                    xmlns: VIM25,
                    this: &template,
                    folder: &places.folder,
                    name: &name,
                    spec: vim::CloneSpec {
                        location: vim::RelocateSpec {
                            datastore: places.datastore.clone(),
                            pool: Some(places.pool.clone()),
                            host: target_host.clone(),
                        },
                        template: false,
                        config: vim::ConfigSpec {
                            instance_uuid: Some(vm_id.clone()),
                            annotation: Some(format!("HCP VM {vm_id} ({})", spec.name)),
                            extra_config: vec![OptionValue::new(ID_KEY, &vm_id)],
                            ..Default::default()
                        },
                        power_on: false,
                    },
                };
                let task = match self.soap.submit("CloneVM_Task", &clone).await {
                    Ok(task) => task,
                    Err(e @ (VimError::Transport(_) | VimError::Timeout(_))) => {
                        self.lost_clones
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(vm_id.clone(), std::time::Instant::now());
                        return Err(map_error(e));
                    }
                    Err(e) => return Err(map_error(e)),
                };
                self.lost_clones.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm_id);
                self.failpoints.hit("create:after-clone-submit");
                self.soap.wait(&task, Duration::ZERO).await.map_err(map_error)?;
                self.failpoints.hit("create:after-clone");
                tracing::info!(vm_id, "cloned");
                self.find(&vm_id, &["config.extraConfig"]).await?.ok_or_else(|| {
                    ProviderError::new(ErrorKind::Internal, "the clone finished but its VM cannot be found")
                })?
            }
        };
        let change = self.desired(&vm, &vm_id, &spec).await?;
        let mut vm = vm;
        if !change.is_empty() {
            if vm.running() && !change.device_change.is_empty() {
                // A retried create of a VM that is already running and
                // configured never gets here; a running VM whose devices
                // differ is not HCP's doing.
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!("vm {vm_id} is running with a configuration HCP did not give it"),
                ));
            }
            self.reconfigure(&vm, change).await?;
            self.failpoints.hit("create:after-reconfigure");
            vm = self.reread(&vm).await?;
        }
        if req.start && !vm.running() {
            self.power_on(&vm).await?;
            self.failpoints.hit("create:after-power-on");
            vm = self.reread(&vm).await?;
        }
        Ok(self.info(&vm, &vm_id))
    }

    async fn list_hosts(&self) -> Result<Vec<pb::HostInfo>, ProviderError> {
        Ok(self.hosts().await?.into_iter().map(|(_, h)| h).collect())
    }

    async fn migrate_vm(&self, req: pb::MigrateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let target = self.host_ref(&req.target_host).await?;
        if vm.host_ref == target.value {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if req.live != vm.running() {
            let why = if vm.running() {
                "the vm is powered on; migrate it live"
            } else {
                "a live migration needs a powered-on vm"
            };
            return Err(ProviderError::new(ErrorKind::InvalidState, why));
        }
        let places = self.places().await?.clone();
        let relocate = vim::RelocateVm {
            xmlns: VIM25,
            this: &vm.moref,
            spec: vim::RelocateSpec { datastore: None, pool: Some(places.pool.clone()), host: Some(target) },
        };
        self.soap.task("RelocateVM_Task", &relocate).await.map_err(map_error)?;
        tracing::info!(vm = %vm.name, to = %req.target_host, live = req.live, "relocated");
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        Ok(self.info(&self.require(vm_id).await?, vm_id))
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let vms = self
            .inventory()
            .await?
            .into_iter()
            .map(|vm| {
                let id = vm.instance_uuid.to_ascii_lowercase();
                self.info(&vm, &id)
            })
            .collect();
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let vm = self.require(vm_id).await?;
        if vm.running() {
            return Ok(self.info(&vm, vm_id));
        }
        self.power_on(&vm).await?;
        self.failpoints.hit("start:after-power-on");
        Ok(self.info(&self.reread(&vm).await?, vm_id))
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if vm.power == "poweredOff" {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if req.force || !vm.running() {
            self.power_off(&vm).await?;
        } else {
            let timeout = Duration::from_secs(if req.timeout_seconds > 0 {
                u64::from(req.timeout_seconds)
            } else {
                self.config.timing.shutdown_timeout_seconds
            });
            match self.soap.invoke_this::<vim::Nothing>("ShutdownGuest", &vm.moref, false).await {
                Ok(_) => {
                    if !self.off_within(&vm, timeout).await? {
                        tracing::info!(
                            vm_id = req.vm_id,
                            ?timeout,
                            "the guest did not shut down in time; powering off"
                        );
                        self.power_off(&vm).await?;
                    }
                }
                // Off meanwhile.
                Err(e) if e.fault() == Some("InvalidPowerState") => {}
                // Nobody in the guest to ask (no VMware Tools): power off.
                Err(e) if matches!(e.fault(), Some("ToolsUnavailable" | "NotSupported")) => {
                    tracing::info!(vm_id = req.vm_id, error = %e, "cannot ask the guest to shut down; powering off");
                    self.power_off(&vm).await?;
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.running() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        if req.hard {
            self.soap.task_this("ResetVM_Task", &vm.moref).await.map_err(map_error)?;
        } else {
            self.soap
                .invoke_this::<vim::Nothing>("RebootGuest", &vm.moref, false)
                .await
                .map_err(map_error)?;
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.vcpus == 0 || req.memory_mib == 0 {
            return Err(invalid("vcpus", "vcpus and memory_mib must be positive"));
        }
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let mut change = vim::ConfigSpec::default();
        if vm.vcpus != req.vcpus {
            change.num_cpus = Some(req.vcpus as i32);
        }
        if vm.memory_mib != req.memory_mib {
            change.memory_mb = Some(i64::from(req.memory_mib));
        }
        if let Some(grow) = grow_disk(&vm, req.disk_gib)? {
            change.device_change.push(grow);
        }
        if change.is_empty() {
            return Ok(self.info(&vm, &req.vm_id));
        }
        if vm.running() {
            let cpu_ok = change.num_cpus.is_none_or(|n| vm.cpu_hot_add && n as u32 > vm.vcpus);
            let mem_ok = change.memory_mb.is_none_or(|m| vm.memory_hot_add && m as u32 > vm.memory_mib);
            if !(cpu_ok && mem_ok) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidState,
                    format!(
                        "vm {} is running: CPUs and memory only grow while running, and only with hot-add enabled",
                        req.vm_id
                    ),
                ));
            }
        }
        self.reconfigure(&vm, change).await?;
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let Some(vm) = self.find(vm_id, &[]).await? else { return Ok(false) };
        if vm.power != "poweredOff" {
            self.power_off(&vm).await?;
        }
        match self.soap.task_this("Destroy_Task", &vm.moref).await {
            Ok(_) => Ok(true),
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(true),
            Err(e) => Err(map_error(e)),
        }
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "vnc" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("{} consoles are not supported (vSphere offers WebMKS, served as vnc)", req.protocol),
            ));
        }
        let vm = self.require(&req.vm_id).await?;
        if !vm.running() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not running", req.vm_id),
            ));
        }
        let acquire = vim::AcquireTicket { xmlns: VIM25, this: &vm.moref, ticket_type: "webmks" };
        let ticket: vim::Ticket =
            self.soap.invoke("AcquireTicket", &acquire, false).await.map_err(map_error)?;
        // wss://host:port/ticket/<ticket>; older servers give only host,
        // port and ticket.
        let (host, port, path) = match ticket.url.strip_prefix("wss://").and_then(|rest| {
            let (authority, path) = rest.split_at(rest.find('/')?);
            let (h, p) = authority.rsplit_once(':')?;
            Some((h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().ok()?, path.to_owned()))
        }) {
            Some(parts) => parts,
            None if !ticket.host.is_empty() => {
                (ticket.host.clone(), ticket.port, format!("/ticket/{}", ticket.ticket))
            }
            None => {
                return Err(ProviderError::new(ErrorKind::Internal, "AcquireTicket gave no WebMKS address"));
            }
        };
        let (tls_ca_pem, tls_fingerprint_sha256) = match &self.console_trust {
            hcp_tls::Trust::Ca(pem) => (String::from_utf8_lossy(pem).into_owned(), String::new()),
            hcp_tls::Trust::Fingerprint(f) => (String::new(), hcp_tls::format_fingerprint(f)),
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".to_owned(),
            host,
            port: u32::from(port),
            // The ticket in the path is the credential; RFB asks for none.
            password: String::new(),
            tls: true,
            path,
            transport: pb::ConsoleTransport::Websocket as i32,
            headers: Vec::new(),
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
        let vm = self.require(&req.vm_id).await?;
        let info = |s: &vim::SnapshotNode| pb::SnapshotInfo {
            snapshot_id: req.snapshot_id.clone(),
            vm_id: req.vm_id.clone(),
            name: req.name.clone(),
            native_id: s.snapshot.value.clone(),
        };
        if let Some(existing) = self.snapshot(&vm, &req.snapshot_id).await? {
            return Ok(info(&existing));
        }
        let name = snapshot_name(&req.snapshot_id);
        let create = vim::CreateSnapshot {
            xmlns: VIM25,
            this: &vm.moref,
            name: &name,
            description: &req.name,
            // A running VM's memory too, so a revert returns it running.
            memory: vm.running(),
            quiesce: false,
        };
        let made = self.soap.task("CreateSnapshot_Task", &create).await.map_err(map_error)?;
        let node = match made {
            Some(snapshot) => vim::SnapshotNode { snapshot, name, state: vm.power.clone() },
            None => self.snapshot(&vm, &req.snapshot_id).await?.ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Internal,
                    "the snapshot task finished but the snapshot is missing",
                )
            })?,
        };
        Ok(info(&node))
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let vm = self.require(vm_id).await?;
        Ok(self
            .snapshots(&vm)
            .await?
            .into_iter()
            .filter_map(|s| {
                let id = s.name.strip_prefix("hcp-").filter(|id| is_uuid(id))?.to_owned();
                Some(pb::SnapshotInfo {
                    snapshot_id: id,
                    vm_id: vm_id.to_owned(),
                    name: s.name.clone(),
                    native_id: s.snapshot.value.clone(),
                })
            })
            .collect())
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let snap = self.snapshot(&vm, &req.snapshot_id).await?.ok_or_else(|| {
            ProviderError::new(ErrorKind::NotFound, format!("snapshot {} not found", req.snapshot_id))
        })?;
        self.soap.task_this("RevertToSnapshot_Task", &snap.snapshot).await.map_err(map_error)?;
        // The VM is as it was when the snapshot was taken, running or not.
        // vSphere does this itself; vcsim 0.24.2 leaves the power state
        // alone, so the provider makes sure.
        let vm = self.reread(&vm).await?;
        match (snap.state.as_str(), vm.running()) {
            ("poweredOff", true) => self.power_off(&vm).await?,
            ("poweredOn", false) => self.power_on(&vm).await?,
            _ => return Ok(self.info(&vm, &req.vm_id)),
        }
        Ok(self.info(&self.reread(&vm).await?, &req.vm_id))
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(vm) = self.find(&req.vm_id, &[]).await? else { return Ok(false) };
        let Some(snap) = self.snapshot(&vm, &req.snapshot_id).await? else { return Ok(false) };
        let remove = vim::RemoveSnapshot { xmlns: VIM25, this: &snap.snapshot, remove_children: false };
        match self.soap.task("RemoveSnapshot_Task", &remove).await {
            Ok(_) => Ok(true),
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => Ok(false),
            Err(e) => Err(map_error(e)),
        }
    }
}

/// Runs the provider until `shutdown` resolves; `ready` gets the bound
/// address.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Vsphere::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_onto_the_protocol_once() {
        let f = |fault: &str| map_error(VimError::Fault { fault: fault.into(), message: "m".into() }).kind;
        assert_eq!(f("ManagedObjectNotFound"), ErrorKind::NotFound);
        assert_eq!(f("InvalidPowerState"), ErrorKind::InvalidState);
        assert_eq!(f("TaskInProgress"), ErrorKind::Busy);
        assert_eq!(f("DuplicateName"), ErrorKind::Busy);
        assert_eq!(f("MethodNotFound"), ErrorKind::Unsupported);
        assert_eq!(f("InvalidArgument"), ErrorKind::InvalidArgument);
        assert_eq!(f("Whatever"), ErrorKind::Internal);
        let denied = map_error(VimError::Fault { fault: "InvalidLogin".into(), message: "m".into() });
        assert_eq!((denied.kind, denied.retryable), (ErrorKind::PermissionDenied, Some(false)));
        assert_eq!(map_error(VimError::Transport("x".into())).kind, ErrorKind::Unavailable);
    }

    #[test]
    fn undecodable_answers_are_internal_and_say_why() {
        let e = map_error(VimError::Decode(vim::DecodeError::Missing { parent: "objects", child: "obj" }));
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Internal, "unexpected answer from vSphere: objects without obj")
        );
        let xml = roxmltree::Document::parse("<a>").unwrap_err();
        let e = map_error(VimError::Decode(xml.clone().into()));
        assert_eq!(e.message, format!("unexpected answer from vSphere: {xml}"));
    }

    #[test]
    fn disks_only_grow() {
        let disk = Device {
            xsi_type: "VirtualDisk".into(),
            key: 2000,
            device_info: None,
            backing: None,
            connectable: None,
            controller_key: Some(1000),
            unit_number: Some(0),
            address_type: None,
            mac_address: None,
            capacity_kb: Some(10 << 20),
            capacity_bytes: None,
        };
        let vm = Vm {
            moref: MoRef::new("VirtualMachine", "vm-1"),
            name: String::new(),
            instance_uuid: String::new(),
            vcpus: 1,
            memory_mib: 1,
            devices: vec![disk],
            cpu_hot_add: false,
            memory_hot_add: false,
            power: "poweredOff".into(),
            host_ref: String::new(),
            guest: Vec::new(),
            extra_config: Vec::new(),
        };
        assert!(grow_disk(&vm, 0).unwrap().is_none());
        assert!(grow_disk(&vm, 10).unwrap().is_none());
        let grown = grow_disk(&vm, 20).unwrap().unwrap();
        assert_eq!((grown.operation, grown.device.capacity_bytes), ("edit", Some(20 << 30)));
        assert!(grown.device.device_info.is_some(), "vSphere needs the device's description on an edit");
        assert_eq!(grow_disk(&vm, 5).unwrap_err().kind, ErrorKind::InvalidArgument);
    }
}
