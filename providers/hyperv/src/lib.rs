//! # hcp-provider-hyperv
//!
//! The Microsoft Hyper-V provider: HCP's `hcp.provider.v1` served through
//! the SDK, mapped onto the documented WMI v2 classes of
//! `root/virtualization/v2`, invoked directly over WS-Management
//! ([`wsman`], [`cim`]); no PowerShell text is built or parsed.
//!
//! - A VM is defined (`DefineSystem`) with the name `hcp-<vm id>` and the id
//!   in its notes, so a create retried after any failure finds it
//!   (`ElementName`) instead of defining a second one.
//! - Each later step of a create (CPUs and memory, the SCSI controller,
//!   the disk drive, the differencing VHDX grown to the flavor, its
//!   attachment, one synthetic NIC and its switch connection per network)
//!   looks first and is skipped when done.
//! - Methods answering 4096 are followed through `Msvm_ConcreteJob` to
//!   their end; "in use" (32774) is retried with backoff; everything is
//!   mapped once, in [`map_error`].
//! - Calls for one VM are serialized.
//!
//! `../WIRE.md` fixes what is sent, against Microsoft's documentation.

pub mod cim;
pub mod cli;
pub mod config;
pub mod ntlm;
pub mod wsman;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hcp_provider_sdk::kit::{BackingError, Backoff};
use hcp_provider_sdk::support::{Failpoints, VmLocks, is_uuid};
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};

use crate::cim::{Instance, object_path, wql_literal};
use crate::config::{Config, ConfigError};
use crate::wsman::{Credentials, Epr, Param, Wsman, WsmanError};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-define`, `create:after-controller`,
/// `create:after-drive`, `create:after-vhd`, `create:after-disk`,
/// `create:after-dvd`, `create:after-seed`,
/// `create:after-nic`, `create:after-connection`, `start:after-start`; the
/// process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_HYPERV_FAILPOINTS";

const VSMS: &str = "Msvm_VirtualSystemManagementService";
const IMS: &str = "Msvm_ImageManagementService";
const VSSS: &str = "Msvm_VirtualSystemSnapshotService";
const SCSI: &str = "Microsoft:Hyper-V:Synthetic SCSI Controller";
const DISK_DRIVE: &str = "Microsoft:Hyper-V:Synthetic Disk Drive";
const VHD: &str = "Microsoft:Hyper-V:Virtual Hard Disk";
const DVD_DRIVE: &str = "Microsoft:Hyper-V:Synthetic DVD Drive";
const ISO: &str = "Microsoft:Hyper-V:Virtual CD/DVD Disk";
const NIC: &str = "Microsoft:Hyper-V:Synthetic Ethernet Port";
const CONNECTION: &str = "Microsoft:Hyper-V:Ethernet Connection";

/// `RequestedState` values (Msvm_ComputerSystem.RequestStateChange).
mod state {
    pub(super) const RUNNING: u16 = 2;
    pub(super) const OFF: u16 = 3;
    pub(super) const SAVED: u16 = 6;
    pub(super) const PAUSED: u16 = 9;
    pub(super) const REBOOT: u16 = 10;
    pub(super) const RESET: u16 = 11;
}

/// Method return values.
mod rv {
    pub(super) const OK: u32 = 0;
    pub(super) const JOB: u32 = 4096;
    pub(super) const ACCESS_DENIED: u32 = 32769;
    pub(super) const NOT_SUPPORTED: u32 = 32770;
    pub(super) const INVALID_PARAMETER: u32 = 32773;
    pub(super) const IN_USE: u32 = 32774;
    pub(super) const INVALID_STATE: u32 = 32775;
    pub(super) const FILE_NOT_FOUND: u32 = 32779;
}

/// A VM's name on Hyper-V.
pub fn vm_name(vm_id: &str) -> String {
    format!("hcp-{vm_id}")
}

fn snapshot_name(snapshot_id: &str) -> String {
    format!("hcp-{snapshot_id}")
}

/// A failure below the protocol.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HvError {
    /// WS-Management itself failed.
    #[error(transparent)]
    Wsman(#[from] WsmanError),
    /// A method answered a non-zero `ReturnValue`.
    #[error("{method} returned {code}")]
    Method {
        /// The method.
        method: String,
        /// Its `ReturnValue`.
        code: u32,
    },
    /// A job ended in state 8, 9 or 10 (or 7 with an error code).
    #[error("{method} failed: {message} (job state {state}, error {code})")]
    Job {
        /// The method that started it.
        method: String,
        /// `JobState`.
        state: u64,
        /// `ErrorCode`.
        code: u64,
        /// `ErrorDescription`.
        message: String,
    },
    /// A job did not end in time.
    #[error("{0} did not finish in time")]
    JobTimeout(String),
    /// Something the host answered makes no sense here.
    #[error("{0}")]
    Unexpected(String),
}

/// Maps a Hyper-V failure onto the protocol's error kinds (the only place).
pub fn map_error(e: HvError) -> ProviderError {
    let message = e.to_string();
    let (kind, retryable) = match &e {
        HvError::Wsman(w) => match w {
            WsmanError::NoCredentials | WsmanError::Transport(_) | WsmanError::Timeout(_) => {
                (ErrorKind::Unavailable, None)
            }
            WsmanError::Unauthorized => (ErrorKind::PermissionDenied, Some(false)),
            _ if w.is_not_found() => (ErrorKind::NotFound, None),
            _ => (ErrorKind::Internal, Some(false)),
        },
        HvError::Method { code, .. } => match *code {
            rv::INVALID_STATE => (ErrorKind::InvalidState, None),
            rv::IN_USE => (ErrorKind::Busy, None),
            rv::INVALID_PARAMETER | 4 => (ErrorKind::InvalidArgument, None),
            rv::ACCESS_DENIED => (ErrorKind::PermissionDenied, Some(false)),
            rv::NOT_SUPPORTED | 1 => (ErrorKind::Unsupported, None),
            _ => (ErrorKind::Internal, None),
        },
        // A job that ended in an exception carries Hyper-V's reason; trying
        // again does the same.
        HvError::Job { .. } => (ErrorKind::Internal, Some(false)),
        HvError::JobTimeout(_) => (ErrorKind::Unavailable, None),
        HvError::Unexpected(_) => (ErrorKind::Internal, None),
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
    #[error("{0}")]
    Trust(String),
    /// The WS-Management client could not be built.
    #[error("cannot build the ws-management client")]
    Client(#[source] crate::wsman::ClientError),
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

/// A VM of ours, as `Msvm_ComputerSystem` describes it.
#[derive(Debug, Clone)]
struct Vm {
    /// The VM's GUID (`Name`).
    guid: String,
    enabled_state: u64,
}

impl Vm {
    fn of(i: &Instance) -> Self {
        Self {
            guid: i.get("Name").unwrap_or_default().to_owned(),
            enabled_state: i.num("EnabledState").unwrap_or(0),
        }
    }

    fn epr(&self) -> Epr {
        Epr::new("Msvm_ComputerSystem", &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", &self.guid)])
    }

    fn running(&self) -> bool {
        self.enabled_state == u64::from(state::RUNNING)
    }

    fn off(&self) -> bool {
        self.enabled_state == u64::from(state::OFF)
    }

    fn power(&self) -> pb::PowerState {
        match self.enabled_state as u16 {
            state::RUNNING => pb::PowerState::Running,
            state::OFF => pb::PowerState::Shutoff,
            state::SAVED | state::PAUSED => pb::PowerState::Paused,
            _ => pb::PowerState::Unspecified,
        }
    }
}

/// What a VM is made of.
#[derive(Debug, Default)]
struct Devices {
    processor: Option<Instance>,
    memory: Option<Instance>,
    /// Controllers and drives.
    rasds: Vec<Instance>,
    /// Attached disks and ISOs.
    storage: Vec<Instance>,
    ports: Vec<Instance>,
    connections: Vec<Instance>,
}

impl Devices {
    fn controller(&self) -> Option<&Instance> {
        self.rasds.iter().find(|r| r.get("ResourceSubType") == Some(SCSI))
    }

    fn drive_on(&self, controller_path: &str) -> Option<&Instance> {
        self.rasds.iter().find(|r| {
            r.get("ResourceSubType") == Some(DISK_DRIVE)
                && r.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(controller_path))
        })
    }
}

/// The provider.
pub struct Hyperv {
    host: Arc<Wsman>,
    config: Arc<Config>,
    host_name: tokio::sync::OnceCell<String>,
    locks: VmLocks,
    failpoints: Failpoints,
}

impl Hyperv {
    /// Builds the provider from its configuration.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustConfig::load` prefixes its messages with `tls: `.
        let trust = config.tls.load().map_err(StartError::Trust)?;
        // Validated with the configuration: at least 1 s.
        let timeout = Duration::from_secs(config.timing.request_timeout_seconds);
        let host =
            Wsman::new(&config.url, &trust, timeout, config.auth_scheme).map_err(StartError::Client)?;
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
            host.set_credentials(Credentials { username: auth.username.clone(), password });
        }
        let failpoints = Failpoints::from_env(FAILPOINTS_ENV);
        Ok(Self {
            host: Arc::new(host),
            config: Arc::new(config),
            host_name: tokio::sync::OnceCell::new(),
            locks: VmLocks::new(),
            failpoints,
        })
    }

    /// The WS-Management client (tests read its counters).
    pub fn client(&self) -> &Wsman {
        &self.host
    }

    async fn backoff(&self, attempt: u32) {
        Backoff::from_millis(self.config.timing.retry_base_ms).wait(attempt).await;
    }

    /// The host's computer name (object paths name it).
    async fn host_name(&self) -> Result<&str, HvError> {
        self.host_name
            .get_or_try_init(|| async {
                if let Some(h) = &self.config.host_name {
                    return Ok(h.clone());
                }
                let hosts = self
                    .host
                    .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'")
                    .await?;
                hosts
                    .first()
                    .and_then(|h| h.get("Name"))
                    .map(str::to_owned)
                    .ok_or_else(|| HvError::Unexpected("the host does not name itself".into()))
            })
            .await
            .map(String::as_str)
    }

    /// Invokes a method and follows its job; "in use" is retried.
    async fn call(
        &self,
        target: &Epr,
        method: &str,
        params: &[(&str, Param)],
    ) -> Result<wsman::Output, HvError> {
        let mut attempt = 0;
        loop {
            let out = self.host.invoke(target, method, params).await?;
            match out.return_value {
                rv::OK => return Ok(out),
                rv::JOB => {
                    let job = out
                        .reference("Job")
                        .ok_or_else(|| {
                            HvError::Unexpected(format!("{method} started a job without naming it"))
                        })?
                        .clone();
                    self.wait_job(method, &job).await?;
                    return Ok(out);
                }
                rv::IN_USE if attempt + 1 < self.config.timing.retry_attempts => {
                    tracing::warn!(method, attempt, "the host says the object is in use; retrying");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                code => return Err(HvError::Method { method: method.to_owned(), code }),
            }
        }
    }

    async fn wait_job(&self, method: &str, job: &Epr) -> Result<(), HvError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.timing.job_timeout_seconds);
        let poll = Duration::from_millis(self.config.timing.job_poll_ms);
        loop {
            let j = self.host.get(job).await?;
            let job_state = j.num("JobState").unwrap_or(0);
            let code = j.num("ErrorCode").unwrap_or(0);
            match job_state {
                7 if code == 0 => return Ok(()),
                7..=10 => {
                    let message = j
                        .get("ErrorDescription")
                        .or(j.get("ErrorSummaryDescription"))
                        .unwrap_or("no description")
                        .to_owned();
                    return Err(HvError::Job { method: method.to_owned(), state: job_state, code, message });
                }
                _ if Instant::now() >= deadline => return Err(HvError::JobTimeout(method.to_owned())),
                _ => tokio::time::sleep(poll).await,
            }
        }
    }

    fn service(class: &str) -> Epr {
        Epr::new(class, &[("CreationClassName", class)])
    }

    async fn find(&self, vm_id: &str) -> Result<Option<Vm>, HvError> {
        let wql =
            format!("SELECT * FROM Msvm_ComputerSystem WHERE ElementName = {}", wql_literal(&vm_name(vm_id)));
        let found = self.host.query(&wql).await?;
        if found.len() > 1 {
            return Err(HvError::Unexpected(format!("{} VMs are named {}", found.len(), vm_name(vm_id))));
        }
        Ok(found.first().map(Vm::of))
    }

    async fn require(&self, vm_id: &str) -> Result<Vm, ProviderError> {
        self.find(vm_id).await.map_err(map_error)?.ok_or_else(|| ProviderError::not_found(vm_id))
    }

    async fn reread(&self, vm: &Vm) -> Result<Vm, HvError> {
        Ok(Vm::of(&self.host.get(&vm.epr()).await?))
    }

    async fn settings(&self, vm: &Vm) -> Result<Instance, HvError> {
        let wql = format!(
            "ASSOCIATORS OF {{Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name={}}} \
             WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData",
            wql_literal(&vm.guid)
        );
        self.host
            .query(&wql)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| HvError::Unexpected(format!("VM {} has no settings", vm.guid)))
    }

    async fn components(&self, vssd: &Instance, class: &str) -> Result<Vec<Instance>, HvError> {
        let wql = format!(
            "ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID={}}} \
             WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = {class}",
            wql_literal(vssd.get("InstanceID").unwrap_or_default())
        );
        Ok(self.host.query(&wql).await?)
    }

    async fn devices(&self, vssd: &Instance) -> Result<Devices, HvError> {
        Ok(Devices {
            processor: self.components(vssd, "Msvm_ProcessorSettingData").await?.into_iter().next(),
            memory: self.components(vssd, "Msvm_MemorySettingData").await?.into_iter().next(),
            rasds: self.components(vssd, "Msvm_ResourceAllocationSettingData").await?,
            storage: self.components(vssd, "Msvm_StorageAllocationSettingData").await?,
            ports: self.components(vssd, "Msvm_SyntheticEthernetPortSettingData").await?,
            connections: self.components(vssd, "Msvm_EthernetPortAllocationSettingData").await?,
        })
    }

    async fn path_of(&self, i: &Instance) -> Result<String, HvError> {
        let id = i
            .get("InstanceID")
            .ok_or_else(|| HvError::Unexpected(format!("{} without InstanceID", i.class)))?;
        Ok(object_path(self.host_name().await?, &i.class, "InstanceID", id))
    }

    async fn info(&self, vm_id: &str, vm: &Vm) -> Result<pb::VmInfo, HvError> {
        let vssd = self.settings(vm).await?;
        let d = self.devices(&vssd).await?;
        let mut interfaces: Vec<pb::InterfaceInfo> = d
            .ports
            .iter()
            .map(|p| pb::InterfaceInfo {
                network: String::new(),
                mac: mac_of(p.get("Address").unwrap_or_default()),
                ipv4: Vec::new(),
                ipv6: Vec::new(),
            })
            .collect();
        // The guest's addresses (KVP, reported by its integration
        // services) are per VM, not per adapter: shown when it has one NIC.
        if interfaces.len() == 1 && vm.running() {
            let (v4, v6) = self.guest_addresses(vm).await?;
            interfaces[0].ipv4 = v4;
            interfaces[0].ipv6 = v6;
        }
        Ok(pb::VmInfo {
            vm_id: vm_id.to_owned(),
            power_state: vm.power() as i32,
            native_id: vm.guid.clone(),
            vcpus: d.processor.as_ref().and_then(|p| p.num("VirtualQuantity")).unwrap_or(0) as u32,
            memory_mib: d.memory.as_ref().and_then(|m| m.num("VirtualQuantity")).unwrap_or(0) as u32,
            interfaces,
            // The VHDX's size is not read back (GetVirtualHardDiskSettingData
            // is not used yet): unknown.
            disk_gib: 0,
            // One host per provider (ListHosts is not answered).
            host: String::new(),
        })
    }

    /// `NetworkAddressIPv4` and `NetworkAddressIPv6` from the VM's KVP
    /// exchange (empty without integration services).
    async fn guest_addresses(&self, vm: &Vm) -> Result<(Vec<String>, Vec<String>), HvError> {
        let wql =
            format!("SELECT * FROM Msvm_KvpExchangeComponent WHERE SystemName = {}", wql_literal(&vm.guid));
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for kvp in self.host.query(&wql).await? {
            for item in
                kvp.all("GuestIntrinsicExchangeItems").iter().filter_map(|t| Instance::from_cim_xml(t))
            {
                let list = match item.get("Name") {
                    Some("NetworkAddressIPv4") => &mut v4,
                    Some("NetworkAddressIPv6") => &mut v6,
                    _ => continue,
                };
                list.extend(
                    item.get("Data")
                        .unwrap_or_default()
                        .split(';')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned),
                );
            }
        }
        Ok((v4, v6))
    }

    fn vhd_path(&self, vm_id: &str) -> String {
        format!("{}\\{}.vhdx", self.config.vm_dir.trim_end_matches('\\'), vm_name(vm_id))
    }

    fn parent_vhd(&self, source: &str) -> Result<String, ProviderError> {
        if let Some(p) = self.config.images.get(source) {
            return Ok(p.clone());
        }
        match &self.config.image_dir {
            Some(dir)
                if !source.is_empty() && !source.contains(['\\', '/', ':']) && !source.contains("..") =>
            {
                Ok(format!("{}\\{source}.vhdx", dir.trim_end_matches('\\')))
            }
            _ => Err(invalid("spec.image.source", format!("no parent VHDX for image source {source:?}"))),
        }
    }

    async fn switch_path(&self, name: &str) -> Result<String, ProviderError> {
        let wql =
            format!("SELECT * FROM Msvm_VirtualEthernetSwitch WHERE ElementName = {}", wql_literal(name));
        let found = self.host.query(&wql).await.map_err(|e| map_error(e.into()))?;
        let sw =
            found.first().ok_or_else(|| invalid("spec.networks", format!("no virtual switch {name:?}")))?;
        let guid = sw.get("Name").unwrap_or_default();
        let host = self.host_name().await.map_err(map_error)?;
        Ok(format!(
            "\\\\{host}\\root\\virtualization\\v2:Msvm_VirtualEthernetSwitch.CreationClassName=\"Msvm_VirtualEthernetSwitch\",Name=\"{guid}\""
        ))
    }

    async fn switches(&self, spec: &pb::VmSpec) -> Result<Vec<String>, ProviderError> {
        if spec.networks.len() > 8 {
            return Err(invalid("spec.networks", "at most 8 networks"));
        }
        let names = self.config.backings().resolve_names(&spec.networks).map_err(|e| match e {
            BackingError::UnknownNetwork { network, .. } => {
                invalid("spec.networks", format!("network {network:?} has no switch on this provider"))
            }
            other => invalid("spec.networks", other),
        })?;
        let mut out = Vec::new();
        for n in names {
            out.push(self.switch_path(&n).await?);
        }
        Ok(out)
    }

    async fn add(&self, vssd: &Instance, setting: Instance) -> Result<Option<Epr>, HvError> {
        let target = Epr::new(
            "Msvm_VirtualSystemSettingData",
            &[("InstanceID", vssd.get("InstanceID").unwrap_or_default())],
        );
        let out = self
            .call(
                &Self::service(VSMS),
                "AddResourceSettings",
                &[
                    ("AffectedConfiguration", Param::Ref(target)),
                    ("ResourceSettings", Param::Instance(setting)),
                ],
            )
            .await?;
        Ok(out.reference("ResultingResourceSettings").cloned())
    }

    /// Sets vCPUs and memory (MB, rounded up to even as Hyper-V wants).
    async fn size(&self, d: &Devices, vcpus: u32, memory_mib: u32) -> Result<(), HvError> {
        let memory = u64::from(memory_mib.div_ceil(2) * 2);
        let mut changes = Vec::new();
        if let Some(p) = &d.processor
            && p.num("VirtualQuantity") != Some(u64::from(vcpus))
        {
            let mut i = Instance::new("Msvm_ProcessorSettingData");
            i.set("InstanceID", "string", p.get("InstanceID").unwrap_or_default());
            i.set("VirtualQuantity", "uint64", vcpus.to_string());
            changes.push(("ResourceSettings", Param::Instance(i)));
        }
        if let Some(m) = &d.memory
            && m.num("VirtualQuantity") != Some(memory)
        {
            let mut i = Instance::new("Msvm_MemorySettingData");
            i.set("InstanceID", "string", m.get("InstanceID").unwrap_or_default());
            i.set("VirtualQuantity", "uint64", memory.to_string());
            changes.push(("ResourceSettings", Param::Instance(i)));
        }
        if !changes.is_empty() {
            self.call(&Self::service(VSMS), "ModifyResourceSettings", &changes).await?;
        }
        Ok(())
    }

    async fn resize_vhd(&self, path: &str, gib: u32) -> Result<(), HvError> {
        let bytes = u64::from(gib) << 30;
        self.call(
            &Self::service(IMS),
            "ResizeVirtualHardDisk",
            &[("Path", Param::Text(path.to_owned())), ("MaxInternalSize", Param::Text(bytes.to_string()))],
        )
        .await
        .map(|_| ())
    }

    /// The VM's differencing VHDX on `parent`, grown to `disk_gib`: made,
    /// or found made by an attempt that died before attaching it.
    async fn ensure_vhd(&self, vhd: &str, parent: &str, disk_gib: u32) -> Result<(), ProviderError> {
        let mut settings = Instance::new("Msvm_VirtualHardDiskSettingData");
        settings
            .set("Type", "uint16", "4")
            .set("Format", "uint16", "3")
            .set("Path", "string", vhd.to_owned())
            .set("ParentPath", "string", parent.to_owned());
        let made = self
            .call(
                &Self::service(IMS),
                "CreateVirtualHardDisk",
                &[("VirtualDiskSettingData", Param::Instance(settings))],
            )
            .await;
        let refused = match made {
            Ok(_) => {
                self.failpoints.hit("create:after-vhd");
                None
            }
            // Made by an attempt that died before attaching it (the resize
            // below tells), or not makeable (the parent is missing).
            Err(e @ (HvError::Job { .. } | HvError::Method { .. })) => {
                tracing::info!(error = %e, vhd, "the VHDX was not made now; it may exist from an earlier attempt");
                Some(e)
            }
            Err(e) => return Err(map_error(e)),
        };
        // The resize is also the check that the VHDX exists.
        match self.resize_vhd(vhd, disk_gib.max(1)).await {
            Ok(()) => {}
            // The image is larger than the flavor: keep its size.
            Err(HvError::Method { code: rv::INVALID_PARAMETER, .. }) => {}
            Err(HvError::Method { code: rv::FILE_NOT_FOUND, .. }) if refused.is_some() => {
                let why = refused.map(|e| e.to_string()).unwrap_or_default();
                return Err(invalid(
                    "spec.image.source",
                    format!("no disk could be made on the image's parent VHDX {parent}: {why}"),
                ));
            }
            Err(e) => return Err(map_error(e)),
        }
        Ok(())
    }

    /// Everything after the define, each step skipped when done.
    async fn build(
        &self,
        vm: &Vm,
        vm_id: &str,
        spec: &pb::VmSpec,
        parent: &str,
        vhd_ready: bool,
    ) -> Result<(), ProviderError> {
        let err = |e: HvError| map_error(e);
        let vssd = self.settings(vm).await.map_err(err)?;
        let d = self.devices(&vssd).await.map_err(err)?;
        self.size(&d, spec.vcpus, spec.memory_mib).await.map_err(err)?;
        // The disk: a differencing VHDX on the image, grown to the flavor,
        // on drive 0 of a SCSI controller.
        let vhd = self.vhd_path(vm_id);
        let attached =
            d.storage.iter().any(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(&vhd)));
        if !attached {
            let controller = match d.controller() {
                Some(c) => c.clone(),
                None => {
                    let mut c = Instance::new("Msvm_ResourceAllocationSettingData");
                    c.set("ResourceType", "uint16", "6").set("ResourceSubType", "string", SCSI);
                    self.add(&vssd, c).await.map_err(err)?;
                    self.failpoints.hit("create:after-controller");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.controller().cloned().ok_or_else(|| {
                        err(HvError::Unexpected("the SCSI controller is missing after its add".into()))
                    })?
                }
            };
            let controller_path = self.path_of(&controller).await.map_err(err)?;
            let d = self.devices(&vssd).await.map_err(err)?;
            let drive = match d.drive_on(&controller_path) {
                Some(dr) => dr.clone(),
                None => {
                    let mut dr = Instance::new("Msvm_ResourceAllocationSettingData");
                    dr.set("ResourceType", "uint16", "17")
                        .set("ResourceSubType", "string", DISK_DRIVE)
                        .set("Parent", "string", controller_path.clone())
                        .set("AddressOnParent", "string", "0");
                    self.add(&vssd, dr).await.map_err(err)?;
                    self.failpoints.hit("create:after-drive");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.drive_on(&controller_path).cloned().ok_or_else(|| {
                        err(HvError::Unexpected("the disk drive is missing after its add".into()))
                    })?
                }
            };
            if !vhd_ready {
                self.ensure_vhd(&vhd, parent, spec.disk_gib).await?;
            }
            let mut sasd = Instance::new("Msvm_StorageAllocationSettingData");
            sasd.set("ResourceType", "uint16", "31")
                .set("ResourceSubType", "string", VHD)
                .set("Parent", "string", self.path_of(&drive).await.map_err(err)?)
                .set_array("HostResource", "string", vec![vhd.clone()]);
            self.add(&vssd, sasd).await.map_err(err)?;
            self.failpoints.hit("create:after-disk");
        }
        // User data: a NoCloud seed ISO on DVD drive 1 of the controller.
        if let (Some(user_data), Some(ci)) = (&spec.user_data, &self.config.cloud_init) {
            let iso_name = format!("{}-seed.iso", vm_name(vm_id));
            let host_iso = format!("{}\\{iso_name}", ci.host_dir.trim_end_matches('\\'));
            let d = self.devices(&vssd).await.map_err(err)?;
            if !d
                .storage
                .iter()
                .any(|s| s.all("HostResource").iter().any(|h| h.eq_ignore_ascii_case(&host_iso)))
            {
                let hostname = if spec.hostname.is_empty() { &spec.name } else { &spec.hostname };
                hcp_nocloud::build(&ci.local_dir.join(&iso_name), vm_id, hostname, user_data)
                    .await
                    .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("the seed ISO: {e}")))?;
                let controller = d
                    .controller()
                    .cloned()
                    .ok_or_else(|| err(HvError::Unexpected("no SCSI controller for the seed".into())))?;
                let controller_path = self.path_of(&controller).await.map_err(err)?;
                let dvd_of = |d: &Devices| {
                    d.rasds
                        .iter()
                        .find(|r| {
                            r.get("ResourceSubType") == Some(DVD_DRIVE)
                                && r.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(&controller_path))
                        })
                        .cloned()
                };
                let drive = match dvd_of(&d) {
                    Some(dr) => dr,
                    None => {
                        let mut dr = Instance::new("Msvm_ResourceAllocationSettingData");
                        dr.set("ResourceType", "uint16", "16")
                            .set("ResourceSubType", "string", DVD_DRIVE)
                            .set("Parent", "string", controller_path.clone())
                            .set("AddressOnParent", "string", "1");
                        self.add(&vssd, dr).await.map_err(err)?;
                        self.failpoints.hit("create:after-dvd");
                        dvd_of(&self.devices(&vssd).await.map_err(err)?).ok_or_else(|| {
                            err(HvError::Unexpected("the DVD drive is missing after its add".into()))
                        })?
                    }
                };
                let mut sasd = Instance::new("Msvm_StorageAllocationSettingData");
                sasd.set("ResourceType", "uint16", "31")
                    .set("ResourceSubType", "string", ISO)
                    .set("Parent", "string", self.path_of(&drive).await.map_err(err)?)
                    .set_array("HostResource", "string", vec![host_iso]);
                self.add(&vssd, sasd).await.map_err(err)?;
                self.failpoints.hit("create:after-seed");
            }
        }
        // NICs: port i named hcp-nic-i, connected to switch i.
        let switches = self.switches(spec).await?;
        for (i, switch) in switches.iter().enumerate() {
            let name = format!("hcp-nic-{i}");
            let d = self.devices(&vssd).await.map_err(err)?;
            let port = match d.ports.iter().find(|p| p.get("ElementName") == Some(name.as_str())) {
                Some(p) => p.clone(),
                None => {
                    let mut p = Instance::new("Msvm_SyntheticEthernetPortSettingData");
                    p.set("ResourceType", "uint16", "10")
                        .set("ResourceSubType", "string", NIC)
                        .set("ElementName", "string", name.clone())
                        .set_array(
                            "VirtualSystemIdentifiers",
                            "string",
                            vec![format!("{{{}}}", uuid::Uuid::new_v4())],
                        );
                    self.add(&vssd, p).await.map_err(err)?;
                    self.failpoints.hit("create:after-nic");
                    let d = self.devices(&vssd).await.map_err(err)?;
                    d.ports
                        .iter()
                        .find(|p| p.get("ElementName") == Some(name.as_str()))
                        .cloned()
                        .ok_or_else(|| err(HvError::Unexpected(format!("{name} is missing after its add"))))?
                }
            };
            let port_path = self.path_of(&port).await.map_err(err)?;
            if !d
                .connections
                .iter()
                .any(|c| c.get("Parent").is_some_and(|p| p.eq_ignore_ascii_case(&port_path)))
            {
                let mut c = Instance::new("Msvm_EthernetPortAllocationSettingData");
                c.set("ResourceType", "uint16", "33")
                    .set("ResourceSubType", "string", CONNECTION)
                    .set("Parent", "string", port_path)
                    .set_array("HostResource", "string", vec![switch.clone()]);
                self.add(&vssd, c).await.map_err(err)?;
                self.failpoints.hit("create:after-connection");
            }
        }
        Ok(())
    }

    async fn request_state(&self, vm: &Vm, requested: u16) -> Result<(), HvError> {
        match self
            .call(&vm.epr(), "RequestStateChange", &[("RequestedState", Param::Text(requested.to_string()))])
            .await
        {
            // 32775: the VM is already there (os-win reads it so too).
            Err(HvError::Method { code: rv::INVALID_STATE, .. })
                if self.reread(vm).await?.enabled_state == u64::from(requested) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    async fn wait_off(&self, vm: &Vm, timeout: Duration) -> Result<bool, HvError> {
        let deadline = Instant::now() + timeout;
        let poll = Duration::from_millis(self.config.timing.job_poll_ms);
        loop {
            if self.reread(vm).await?.off() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// DestroySystem keeps disks and ISOs: removes ours where the provider
    /// can reach them.
    async fn remove_files(&self, vm_id: &str) {
        let name = vm_name(vm_id);
        let files = [
            self.config.vm_dir_local.as_ref().map(|d| d.join(format!("{name}.vhdx"))),
            self.config.cloud_init.as_ref().map(|c| c.local_dir.join(format!("{name}-seed.iso"))),
        ];
        for f in files.into_iter().flatten() {
            match tokio::fs::remove_file(&f).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot remove a file of a deleted VM")
                }
            }
        }
    }

    async fn snapshots(&self, vm: &Vm) -> Result<Vec<Instance>, HvError> {
        let wql = format!(
            "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = {} \
             AND VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Realized'",
            wql_literal(&vm.guid)
        );
        Ok(self.host.query(&wql).await?)
    }

    async fn snapshot(&self, vm: &Vm, snapshot_id: &str) -> Result<Option<Instance>, HvError> {
        let name = snapshot_name(snapshot_id);
        Ok(self.snapshots(vm).await?.into_iter().find(|s| s.get("ElementName") == Some(name.as_str())))
    }

    fn snapshot_epr(s: &Instance) -> Epr {
        Epr::new("Msvm_VirtualSystemSettingData", &[("InstanceID", s.get("InstanceID").unwrap_or_default())])
    }
}

/// `Address` (12 hex digits) as `aa:bb:cc:dd:ee:ff`.
fn mac_of(address: &str) -> String {
    let hex: String =
        address.chars().filter(char::is_ascii_hexdigit).collect::<String>().to_ascii_lowercase();
    if hex.len() != 12 {
        return String::new();
    }
    hex.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(":")
}

#[hcp_provider_sdk::async_trait]
impl Provider for Hyperv {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("hyperv.hcp.dev", env!("CARGO_PKG_VERSION"), "hyperv")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        let mut attributes = HashMap::new();
        attributes.insert("host".to_owned(), self.host_name().await.map_err(map_error)?.to_owned());
        Ok(pb::Capabilities {
            supports_cloud_init: self.config.cloud_init.is_some() && hcp_nocloud::tool_available(),
            supports_snapshot: true,
            supports_snapshot_running: true,
            // CPUs, memory and the VHDX of a stopped VM.
            supports_resize: true,
            // VMConnect, relayed by the gateway.
            supports_console_rdp: true,
            attributes,
            ..Default::default()
        })
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        if !self.host.has_credentials() {
            return Ok((false, "waiting for credentials".to_owned()));
        }
        match self
            .host
            .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'")
            .await
        {
            Ok(h) => {
                Ok((true, format!("Hyper-V host {}", h.first().and_then(|h| h.get("Name")).unwrap_or("?"))))
            }
            Err(e) => Ok((false, e.to_string())),
        }
    }

    async fn configure(&self, credentials: HashMap<String, String>) -> Result<(), ProviderError> {
        let get = |k: &str| credentials.get(k).filter(|v| !v.is_empty()).cloned();
        match (get("username"), get("password")) {
            (Some(username), Some(password)) => {
                self.host.set_credentials(Credentials { username, password });
                Ok(())
            }
            _ => Err(invalid("credentials", "give username and password")),
        }
    }

    fn needs_configuration(&self) -> bool {
        !self.host.has_credentials()
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
        if spec.user_data.is_some() && self.config.cloud_init.is_none() {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "user data needs [cloud_init] in the Hyper-V provider's configuration",
            ));
        }
        let image = spec.image.as_ref().ok_or_else(|| invalid("spec.image", "required"))?;
        let parent = self.parent_vhd(&image.source)?;
        let _serial = self.locks.lock(&vm_id).await;
        let mut vhd_ready = false;
        let vm = match self.find(&vm_id).await.map_err(map_error)? {
            Some(vm) => vm,
            None => {
                // Checked before the VM is defined: the switches, and the
                // image (its differencing disk is made first).
                self.switches(&spec).await?;
                self.ensure_vhd(&self.vhd_path(&vm_id), &parent, spec.disk_gib).await?;
                vhd_ready = true;
                let mut vssd = Instance::new("Msvm_VirtualSystemSettingData");
                vssd.set("ElementName", "string", vm_name(&vm_id))
                    .set_array("Notes", "string", vec![format!("hcp-vm-id={vm_id}"), spec.name.clone()])
                    .set("VirtualSystemSubType", "string", "Microsoft:Hyper-V:SubType:2");
                self.call(&Self::service(VSMS), "DefineSystem", &[("SystemSettings", Param::Instance(vssd))])
                    .await
                    .map_err(map_error)?;
                self.failpoints.hit("create:after-define");
                self.find(&vm_id).await.map_err(map_error)?.ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::Internal,
                        "DefineSystem finished but the VM cannot be found",
                    )
                })?
            }
        };
        self.build(&vm, &vm_id, &spec, &parent, vhd_ready).await?;
        let mut vm = self.reread(&vm).await.map_err(map_error)?;
        if req.start && !vm.running() {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            vm = self.reread(&vm).await.map_err(map_error)?;
        }
        self.info(&vm_id, &vm).await.map_err(map_error)
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let vm = self.require(vm_id).await?;
        self.info(vm_id, &vm).await.map_err(map_error)
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let all = self
            .host
            .query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
            .await
            .map_err(|e| map_error(e.into()))?;
        let mut vms = Vec::new();
        for i in all {
            let Some(id) = i.get("ElementName").and_then(|n| n.strip_prefix("hcp-")).filter(|id| is_uuid(id))
            else {
                continue;
            };
            let id = id.to_owned();
            let vm = Vm::of(&i);
            vms.push(pb::VmInfo {
                vm_id: id,
                power_state: vm.power() as i32,
                native_id: vm.guid.clone(),
                ..Default::default()
            });
        }
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let vm = self.require(vm_id).await?;
        if !vm.running() {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            self.failpoints.hit("start:after-start");
        }
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(vm_id, &vm).await.map_err(map_error)
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.off() {
            let wql =
                format!("SELECT * FROM Msvm_ShutdownComponent WHERE SystemName = {}", wql_literal(&vm.guid));
            let component = if req.force || !vm.running() {
                None
            } else {
                self.host.query(&wql).await.map_err(|e| map_error(e.into()))?.into_iter().next()
            };
            let graceful = match component {
                Some(c) => {
                    let target = Epr::new(
                        "Msvm_ShutdownComponent",
                        &[
                            (
                                "CreationClassName",
                                c.get("CreationClassName").unwrap_or("Msvm_ShutdownComponent"),
                            ),
                            ("DeviceID", c.get("DeviceID").unwrap_or_default()),
                            ("SystemCreationClassName", "Msvm_ComputerSystem"),
                            ("SystemName", &vm.guid),
                        ],
                    );
                    let timeout = Duration::from_secs(if req.timeout_seconds > 0 {
                        u64::from(req.timeout_seconds)
                    } else {
                        self.config.timing.shutdown_timeout_seconds
                    });
                    match self
                        .call(
                            &target,
                            "InitiateShutdown",
                            &[
                                ("Force", Param::Text("false".into())),
                                ("Reason", Param::Text("HCP stop".into())),
                            ],
                        )
                        .await
                    {
                        Ok(_) => self.wait_off(&vm, timeout).await.map_err(map_error)?,
                        Err(e) => {
                            tracing::info!(vm_id = req.vm_id, error = %e, "the guest cannot be asked to shut down");
                            false
                        }
                    }
                }
                // No integration services: nobody in the guest to ask.
                None => false,
            };
            if !graceful {
                self.request_state(&vm, state::OFF).await.map_err(map_error)?;
            }
        }
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
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
        let requested = if req.hard { state::RESET } else { state::REBOOT };
        self.call(&vm.epr(), "RequestStateChange", &[("RequestedState", Param::Text(requested.to_string()))])
            .await
            .map_err(map_error)?;
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.vcpus == 0 || req.memory_mib == 0 {
            return Err(invalid("vcpus", "vcpus and memory_mib must be positive"));
        }
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        if !vm.off() {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!("vm {} is not off: Hyper-V resizes stopped VMs", req.vm_id),
            ));
        }
        // The disk first: a refused shrink changes nothing else.
        if req.disk_gib > 0 {
            match self.resize_vhd(&self.vhd_path(&req.vm_id), req.disk_gib).await {
                Ok(()) => {}
                Err(HvError::Method { code: rv::INVALID_PARAMETER, .. }) => {
                    return Err(invalid("disk_gib", "smaller than the disk; disks only grow"));
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        let vssd = self.settings(&vm).await.map_err(map_error)?;
        let d = self.devices(&vssd).await.map_err(map_error)?;
        self.size(&d, req.vcpus, req.memory_mib).await.map_err(map_error)?;
        let vm = self.reread(&vm).await.map_err(map_error)?;
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(vm_id).await;
        let Some(vm) = self.find(vm_id).await.map_err(map_error)? else {
            // A create that failed before its define may have left its disk.
            self.remove_files(vm_id).await;
            return Ok(false);
        };
        if !vm.off() {
            self.request_state(&vm, state::OFF).await.map_err(map_error)?;
        }
        match self
            .call(&Self::service(VSMS), "DestroySystem", &[("AffectedSystem", Param::Ref(vm.epr()))])
            .await
        {
            Ok(_) => {}
            Err(HvError::Wsman(e)) if e.is_not_found() => {}
            Err(e) => return Err(map_error(e)),
        }
        self.remove_files(vm_id).await;
        Ok(true)
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "rdp" {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!(
                    "{} consoles are not offered by Hyper-V; its console is VMConnect (rdp)",
                    req.protocol
                ),
            ));
        }
        let vm = self.require(&req.vm_id).await?;
        let host = match &self.config.vmconnect.host {
            Some(h) => h.clone(),
            None => self.config.url().map(|u| u.host).unwrap_or_default(),
        };
        // VMConnect does its own TLS and CredSSP with the client: the proxy
        // only names the VM (its GUID) in the preconnection PDU.
        Ok(pb::ConsoleEndpoint {
            protocol: "rdp".to_owned(),
            host,
            port: u32::from(self.config.vmconnect.port),
            transport: pb::ConsoleTransport::Tcp.into(),
            preconnection_blob: vm.guid,
            ..Default::default()
        })
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let info = |s: &Instance| pb::SnapshotInfo {
            snapshot_id: req.snapshot_id.clone(),
            vm_id: req.vm_id.clone(),
            name: req.name.clone(),
            native_id: s.get("InstanceID").unwrap_or_default().to_owned(),
        };
        if let Some(s) = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)? {
            return Ok(info(&s));
        }
        let before: Vec<String> = self
            .snapshots(&vm)
            .await
            .map_err(map_error)?
            .iter()
            .filter_map(|s| s.get("InstanceID").map(str::to_owned))
            .collect();
        let out = self
            .call(
                &Self::service(VSSS),
                "CreateSnapshot",
                &[
                    ("AffectedSystem", Param::Ref(vm.epr())),
                    ("SnapshotSettings", Param::Text(String::new())),
                    ("SnapshotType", Param::Text("2".into())),
                ],
            )
            .await
            .map_err(map_error)?;
        // The new snapshot: named by the method, or the one that was not
        // there before.
        let made = match out.reference("ResultingSnapshot").and_then(|e| e.selector("InstanceID")) {
            Some(id) => id.to_owned(),
            None => self
                .snapshots(&vm)
                .await
                .map_err(map_error)?
                .into_iter()
                .filter_map(|s| s.get("InstanceID").map(str::to_owned))
                .find(|id| !before.contains(id))
                .ok_or_else(|| ProviderError::new(ErrorKind::Internal, "CreateSnapshot made no snapshot"))?,
        };
        let mut rename = Instance::new("Msvm_VirtualSystemSettingData");
        rename.set("InstanceID", "string", made.clone()).set(
            "ElementName",
            "string",
            snapshot_name(&req.snapshot_id),
        );
        self.call(
            &Self::service(VSMS),
            "ModifySystemSettings",
            &[("SystemSettings", Param::Instance(rename))],
        )
        .await
        .map_err(map_error)?;
        let mut s = Instance::new("Msvm_VirtualSystemSettingData");
        s.set("InstanceID", "string", made);
        Ok(info(&s))
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let vm = self.require(vm_id).await?;
        Ok(self
            .snapshots(&vm)
            .await
            .map_err(map_error)?
            .into_iter()
            .filter_map(|s| {
                let name = s.get("ElementName")?.to_owned();
                let id = name.strip_prefix("hcp-").filter(|id| is_uuid(id))?.to_owned();
                Some(pb::SnapshotInfo {
                    snapshot_id: id,
                    vm_id: vm_id.to_owned(),
                    name,
                    native_id: s.get("InstanceID").unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let vm = self.require(&req.vm_id).await?;
        let snap = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)?.ok_or_else(|| {
            ProviderError::new(ErrorKind::NotFound, format!("snapshot {} not found", req.snapshot_id))
        })?;
        // Hyper-V applies a snapshot only to a VM that is off or saved.
        if !vm.off() && vm.enabled_state != u64::from(state::SAVED) {
            self.request_state(&vm, state::OFF).await.map_err(map_error)?;
        }
        self.call(
            &Self::service(VSSS),
            "ApplySnapshot",
            &[("Snapshot", Param::Ref(Self::snapshot_epr(&snap)))],
        )
        .await
        .map_err(map_error)?;
        // A snapshot of a running VM comes back saved: resume it, so the
        // VM is as it was when the snapshot was taken.
        let mut vm = self.reread(&vm).await.map_err(map_error)?;
        if vm.enabled_state == u64::from(state::SAVED) {
            self.request_state(&vm, state::RUNNING).await.map_err(map_error)?;
            vm = self.reread(&vm).await.map_err(map_error)?;
        }
        self.info(&req.vm_id, &vm).await.map_err(map_error)
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let _serial = self.locks.lock(&req.vm_id).await;
        let Some(vm) = self.find(&req.vm_id).await.map_err(map_error)? else { return Ok(false) };
        let Some(snap) = self.snapshot(&vm, &req.snapshot_id).await.map_err(map_error)? else {
            return Ok(false);
        };
        self.call(
            &Self::service(VSSS),
            "DestroySnapshot",
            &[("AffectedSnapshot", Param::Ref(Self::snapshot_epr(&snap)))],
        )
        .await
        .map_err(map_error)?;
        Ok(true)
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
    let provider = Hyperv::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_values_and_jobs_map_onto_the_protocol_once() {
        let m = |code| map_error(HvError::Method { method: "X".into(), code }).kind;
        assert_eq!(m(rv::INVALID_STATE), ErrorKind::InvalidState);
        assert_eq!(m(rv::IN_USE), ErrorKind::Busy);
        assert_eq!(m(rv::INVALID_PARAMETER), ErrorKind::InvalidArgument);
        assert_eq!(m(rv::ACCESS_DENIED), ErrorKind::PermissionDenied);
        assert_eq!(m(32768), ErrorKind::Internal);
        let job = map_error(HvError::Job {
            method: "X".into(),
            state: 10,
            code: 32768,
            message: "disk full".into(),
        });
        assert_eq!((job.kind, job.retryable), (ErrorKind::Internal, Some(false)));
        assert!(job.message.contains("disk full"));
        let denied = map_error(HvError::Wsman(WsmanError::Unauthorized));
        assert_eq!((denied.kind, denied.retryable), (ErrorKind::PermissionDenied, Some(false)));
    }

    #[test]
    fn macs_are_written_the_usual_way() {
        assert_eq!(mac_of("00155D0A0B0C"), "00:15:5d:0a:0b:0c");
        assert_eq!(mac_of(""), "");
    }
}
