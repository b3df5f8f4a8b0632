//! # hcp-provider-libvirt
//!
//! The KVM/QEMU provider: an HCP provider process (built on
//! `hcp-provider-sdk`) that drives libvirtd. A VM is a persistent libvirt
//! domain whose UUID is the HCP VM id, booting from a qcow2 overlay on the
//! image's base disk, with a NoCloud seed when the tenant gave user data or
//! a hostname, a logged serial port and a password-protected VNC server on
//! a local address that only core's console proxy is told about.
//!
//! Every call is idempotent by the VM id and serialized per VM; libvirt's
//! blocking API runs on the blocking pool; a lost connection is reopened on
//! the next call. Module map: [`config`] (the file), [`domain`] (the XML),
//! [`seed`] (cloud-init), [`errors`] (the error mapping).

pub mod cli;
pub mod config;
pub mod domain;
pub mod errors;
/// The NoCloud seed, shared with the Hyper-V provider.
pub use hcp_nocloud as seed;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcp_provider_sdk::kit::BackingError;
use hcp_provider_sdk::{ErrorKind, Provider, ProviderError, ProviderInfo, pb};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::domain_snapshot::DomainSnapshot;

pub use crate::config::{Accelerator, Config};
use crate::domain::{DomainPlan, METADATA_NS};

/// Environment variable naming failpoints, for crash tests only: a comma
/// separated list of `create:after-disk`, `create:after-seed`,
/// `create:after-define`, `create:after-start`; the process aborts there.
pub const FAILPOINTS_ENV: &str = "HCP_LIBVIRT_FAILPOINTS";

/// The provider.
#[derive(Clone)]
pub struct Libvirt {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    conn: Mutex<Option<Connect>>,
    domain_type: &'static str,
    capabilities: pb::Capabilities,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failpoints: hcp_provider_sdk::support::Failpoints,
}

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// libvirt did not answer.
    #[error("cannot connect to {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// The configured accelerator is not offered by the host.
    #[error("accelerator: {0}")]
    Accelerator(String),
    /// The state directory is unusable.
    #[error("state_dir {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable (its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

fn open(uri: &str) -> Result<Connect, virt::error::Error> {
    Connect::open(Some(uri))
}

/// The domain type the host offers for `accelerator` (from libvirt's
/// capabilities XML), and the accelerator's name as reported.
fn domain_type(
    conn: &Connect,
    uri: &str,
    accelerator: Accelerator,
) -> Result<(&'static str, &'static str), StartError> {
    if uri.starts_with("test:") {
        return Ok(("test", "test"));
    }
    let caps = conn
        .capabilities()
        .map_err(|e| StartError::Connect { uri: uri.into(), message: e.message().into() })?;
    let doc = roxmltree::Document::parse(&caps).map_err(|e| StartError::Accelerator(e.to_string()))?;
    let offered: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("guest"))
        .filter(|g| g.descendants().any(|a| a.has_tag_name("arch") && a.attribute("name") == Some("x86_64")))
        .flat_map(|g| {
            g.descendants().filter(|d| d.has_tag_name("domain")).filter_map(|d| d.attribute("type"))
        })
        .collect();
    let kvm = offered.contains(&"kvm");
    match accelerator {
        Accelerator::Kvm if !kvm => {
            Err(StartError::Accelerator("kvm requested but the host offers none".into()))
        }
        Accelerator::Kvm => Ok(("kvm", "kvm")),
        Accelerator::Auto if kvm => Ok(("kvm", "kvm")),
        Accelerator::Auto | Accelerator::Tcg if offered.contains(&"qemu") => Ok(("qemu", "tcg")),
        _ => {
            Err(StartError::Accelerator(format!("the host offers no x86_64 qemu domains (has {offered:?})")))
        }
    }
}

impl Libvirt {
    /// Connects to libvirt (retrying for up to ten seconds) and reads what
    /// the host offers.
    pub async fn connect(config: Config) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.state_dir)
            .and_then(|()| set_mode(&config.state_dir, 0o755))
            .map_err(|source| StartError::StateDir { path: config.state_dir.clone(), source })?;
        virt::error::clear_error_callback();
        let uri = config.uri.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            let target = uri.clone();
            match tokio::task::spawn_blocking(move || open(&target)).await {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if Instant::now() < deadline => {
                    tracing::warn!(uri = %config.uri, error = %e.message(), "libvirt not answering yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(Err(e)) => return Err(StartError::Connect { uri, message: e.message().into() }),
                Err(e) => return Err(StartError::Connect { uri, message: e.to_string() }),
            }
        };
        let (domain_type, accelerator) = domain_type(&conn, &uri, config.accelerator)?;
        let lib_version = conn.lib_version().unwrap_or_default();
        let cloud_init = seed::tool_available();
        if !cloud_init {
            tracing::warn!("genisoimage is missing: cloud-init is not offered");
        }
        let mut attributes = HashMap::new();
        attributes.insert("accelerator".to_owned(), accelerator.to_owned());
        attributes.insert(
            "libvirt_version".to_owned(),
            format!("{}.{}.{}", lib_version / 1_000_000, lib_version / 1000 % 1000, lib_version % 1000),
        );
        attributes.insert("uri".to_owned(), uri.clone());
        let capabilities = pb::Capabilities {
            supports_cloud_init: cloud_init,
            supports_snapshot: true,
            supports_snapshot_running: true,
            // Migration between libvirt hosts is not implemented (see the
            // README): the flags stay off until it is, whatever
            // `migration_peer` says.
            supports_live_migration: false,
            supports_cold_migration: false,
            // The test driver runs no VNC servers.
            supports_console_vnc: domain_type != "test",
            supports_console_spice: false,
            supports_console_rdp: false,
            supports_console_serial: false,
            supports_gpu_passthrough: false,
            // vCPUs, memory and disk of a stopped domain. Not of a running
            // one: hotplug needs domains defined with spare vCPU and memory
            // slots (and a guest that onlines them), which HCP's domains
            // are not.
            supports_resize: true,
            supports_hot_resize: false,
            attributes,
        };
        tracing::info!(%uri, domain_type, accelerator, cloud_init, "connected to libvirt");
        let failpoints = hcp_provider_sdk::support::Failpoints::from_env(FAILPOINTS_ENV);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                conn: Mutex::new(Some(conn)),
                domain_type,
                capabilities,
                locks: Mutex::new(HashMap::new()),
                failpoints,
            }),
        })
    }

    /// The directory of a VM's files.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.inner.config.state_dir.join(vm_id)
    }

    fn failpoint(&self, name: &str) {
        self.inner.failpoints.hit(name);
    }

    /// Runs `f` with the connection on the blocking pool, reconnecting
    /// first when the last call lost it; errors are mapped for `what`.
    async fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = {
                let mut guard = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
                if guard.is_none() {
                    *guard = Some(open(&inner.config.uri).map_err(CallError::Virt)?);
                }
                guard.clone()
            };
            let Some(conn) = conn else { return Err(CallError::Virt(virt::error::Error::last_error())) };
            let r = f(&conn);
            if let Err(CallError::Virt(e)) = &r
                && errors::connection_lost(e)
            {
                tracing::warn!(error = %e.message(), "libvirt connection lost; reconnecting on the next call");
                *inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            r
        })
        .await
        .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("libvirt call panicked: {e}")))?;
        result.map_err(|e| match e {
            CallError::Virt(e) => errors::classify(&e, what),
            CallError::Hcp(e) => e,
        })
    }

    fn lock(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm_id.to_owned()).or_default().clone()
    }

    async fn info(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    /// Whether the domain exists (and is active).
    async fn presence(&self, vm_id: &str) -> Result<Option<bool>, ProviderError> {
        let id = vm_id.to_owned();
        match self
            .call(&format!("vm {vm_id}"), move |c| Ok(c.lookup_domain_by_uuid_string(&id)?.is_active()?))
            .await
        {
            Ok(active) => Ok(Some(active)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let spec = req.spec.ok_or_else(|| invalid("spec: required"))?;
        if spec.user_data.is_some() && !self.inner.capabilities.supports_cloud_init {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                "cloud-init is not supported on this host",
            ));
        }
        if let Some(active) = self.presence(&vm_id).await? {
            if req.start && !active {
                self.start(&vm_id).await?;
            }
            return self.info(&vm_id).await;
        }
        let config = &self.inner.config;
        let source = spec.image.as_ref().map(|i| i.source.clone()).unwrap_or_default();
        let image = config.image(&source).ok_or_else(|| {
            invalid(format!("image.source: image {source:?} is not available on this host"))
        })?;
        if spec.vcpus == 0 {
            return Err(invalid("vcpus: must be at least 1"));
        }
        if spec.memory_mib < 32 {
            return Err(invalid("memory_mib: must be at least 32"));
        }
        // The operator's mapping names a key of this host's [networks]
        // table; without one the HCP name is the key.
        let backings = config.backings();
        let nics = backings.resolve(&spec.networks, |key| backings.get(key).cloned()).map_err(|e| {
            let (index, field, key) = match e {
                BackingError::UnknownNetwork { index, network } => (index, "network", network),
                BackingError::UnknownBacking { index, backing } => (index, "backing", backing),
            };
            invalid(format!("networks[{index}].{field}: network {key:?} is not available on this host"))
        })?;
        if !image.disk.is_file() {
            return Err(ProviderError::new(
                ErrorKind::Internal,
                format!("image {source:?}: base disk {} is missing on this host", image.disk.display()),
            ));
        }

        let dir = self.vm_dir(&vm_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("create the vm directory", e))?;
        set_mode(&dir, 0o755).map_err(|e| io_error("open the vm directory", e))?;
        let disk = dir.join("disk.qcow2");
        if !disk.exists() {
            make_overlay(&image.disk, &disk, spec.disk_gib).await?;
        }
        self.failpoint("create:after-disk");
        let user_data = spec.user_data.clone().unwrap_or_default();
        let seed = if spec.user_data.is_some() || !spec.hostname.is_empty() {
            let path = dir.join("seed.iso");
            seed::build(&path, &vm_id, &spec.hostname, &user_data)
                .await
                .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("cloud-init seed: {e}")))?;
            Some(path)
        } else {
            None
        };
        self.failpoint("create:after-seed");
        let plan = DomainPlan {
            vm_id: vm_id.clone(),
            vm_name: spec.name.clone(),
            domain_type: self.inner.domain_type,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk,
            seed,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            nics,
            serial_log: dir.join("serial.log"),
            vnc_listen: config.vnc_listen,
            vnc_password: vnc_password(),
            image: source,
            labels: spec.labels.into_iter().collect(),
        };
        let xml = plan.to_xml();
        let id = vm_id.clone();
        self.call(&format!("define vm {vm_id}"), move |c| match c.define_domain_xml(&xml) {
            Ok(_) => Ok(()),
            // Someone defined it meanwhile (a retry racing a slow first try).
            Err(e) if c.lookup_domain_by_uuid_string(&id).is_ok() => {
                tracing::info!(error = %e.message(), "domain appeared while defining it");
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
        .await?;
        self.failpoint("create:after-define");
        if req.start {
            self.start(&vm_id).await?;
        }
        self.failpoint("create:after-start");
        self.info(&vm_id).await
    }

    async fn start(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("start vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            // Started meanwhile by someone else: fine.
            if !d.is_active()?
                && let Err(e) = d.create()
                && !d.is_active().unwrap_or(false)
            {
                return Err(e.into());
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    async fn stop(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let vm_id = req.vm_id.clone();
        let what = format!("stop vm {vm_id}");
        if !req.force {
            let timeout = if req.timeout_seconds > 0 {
                Duration::from_secs(u64::from(req.timeout_seconds))
            } else {
                self.inner.config.stop_timeout()
            };
            let deadline = Instant::now() + timeout;
            // The power button is pressed again every few seconds: a guest
            // still booting may not be listening for it yet.
            loop {
                let id = vm_id.clone();
                let active = self
                    .call(&what, move |c| {
                        let d = c.lookup_domain_by_uuid_string(&id)?;
                        if !d.is_active()? {
                            return Ok(false);
                        }
                        match d.shutdown() {
                            Ok(()) => Ok(true),
                            Err(_) if !d.is_active()? => Ok(false),
                            Err(e) => Err(e.into()),
                        }
                    })
                    .await?;
                if !active {
                    return self.info(&vm_id).await;
                }
                let press = Instant::now() + Duration::from_secs(3);
                while Instant::now() < press.min(deadline) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if self.presence(&vm_id).await? == Some(false) {
                        return self.info(&vm_id).await;
                    }
                }
                if Instant::now() >= deadline {
                    tracing::info!(vm_id, ?timeout, "guest did not power off in time; powering off");
                    break;
                }
            }
        }
        let id = vm_id.clone();
        self.call(&what, move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            if d.is_active()?
                && let Err(e) = d.destroy()
                && d.is_active()?
            {
                return Err(e.into());
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    async fn reboot(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        let id = req.vm_id.clone();
        self.call(&format!("reboot vm {}", req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            if !d.is_active()? {
                return Err(not_running());
            }
            if req.hard {
                // The reset button: the guest is not asked.
                d.reset()?;
            } else {
                d.reboot(0)?;
            }
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    /// Sets vCPUs and memory of a stopped domain's definition, and grows its
    /// overlay disk. Everything that can refuse the request (the state, the
    /// sizes, a disk that would shrink or holds snapshots) is checked before
    /// anything changes; each change is idempotent, so a retry after a
    /// partial resize completes it.
    async fn resize(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        if req.memory_mib < 32 {
            return Err(invalid("memory_mib: must be at least 32"));
        }
        let vm_id = req.vm_id.clone();
        let disk = self.vm_dir(&vm_id).join("disk.qcow2");
        let id = vm_id.clone();
        let has_snapshots = self
            .call(&format!("resize vm {vm_id}"), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if d.is_active()? {
                    return Err(CallError::Hcp(ProviderError::new(
                        ErrorKind::InvalidState,
                        "a running domain cannot be resized on this host (no hot resize); stop it first",
                    )));
                }
                Ok(d.num_snapshots(0)? > 0)
            })
            .await?;
        let grow_to = if req.disk_gib > 0 && disk.is_file() {
            disk_growth(&disk, req.disk_gib, has_snapshots).await?
        } else {
            None
        };
        let id = vm_id.clone();
        let (vcpus, memory_mib) = (req.vcpus, req.memory_mib);
        self.call(&format!("resize vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let config = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            let now = d.info()?;
            // The maximum and the current value move in an order that
            // never puts the current above the maximum.
            let max_vcpus = config | virt::sys::VIR_DOMAIN_VCPU_MAXIMUM;
            if vcpus >= now.nr_virt_cpu {
                d.set_vcpus_flags(vcpus, max_vcpus)?;
                d.set_vcpus_flags(vcpus, config)?;
            } else {
                d.set_vcpus_flags(vcpus, config)?;
                d.set_vcpus_flags(vcpus, max_vcpus)?;
            }
            let kib = u64::from(memory_mib) * 1024;
            let max_mem = config | virt::sys::VIR_DOMAIN_MEM_MAXIMUM;
            if kib >= now.max_mem {
                d.set_memory_flags(kib, max_mem)?;
                d.set_memory_flags(kib, config)?;
            } else {
                d.set_memory_flags(kib, config)?;
                d.set_memory_flags(kib, max_mem)?;
            }
            Ok(())
        })
        .await?;
        if let Some(bytes) = grow_to {
            resize_image(&disk, bytes).await?;
        }
        self.info(&vm_id).await
    }

    async fn delete(&self, vm_id: &str) -> Result<bool, ProviderError> {
        let id = vm_id.to_owned();
        let existed = self
            .call(&format!("delete vm {vm_id}"), move |c| {
                let d = match c.lookup_domain_by_uuid_string(&id) {
                    Ok(d) => d,
                    Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                if d.is_active()?
                    && let Err(e) = d.destroy()
                    && d.is_active()?
                {
                    return Err(e.into());
                }
                let flags =
                    virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
                if let Err(e) = d.undefine_flags(flags) {
                    // Drivers without NVRAM support refuse the flag.
                    if d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA).is_err() {
                        return Err(e.into());
                    }
                }
                Ok(true)
            })
            .await?;
        let dir = self.vm_dir(vm_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove the vm's files", e)),
        }
        Ok(existed)
    }

    async fn console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        if req.protocol != "vnc" || !self.inner.capabilities.supports_console_vnc {
            return Err(ProviderError::new(
                ErrorKind::Unsupported,
                format!("protocol: {:?} consoles are not supported; use \"vnc\"", req.protocol),
            ));
        }
        let id = req.vm_id.clone();
        let vnc = self
            .call(&format!("console of vm {}", req.vm_id), move |c| {
                let d = c.lookup_domain_by_uuid_string(&id)?;
                if !d.is_active()? {
                    return Err(not_running());
                }
                Ok(domain::vnc_of(&d.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE)?))
            })
            .await?;
        let Some(domain::Vnc { port: Some(port), password }) = vnc else {
            return Err(ProviderError::new(ErrorKind::InvalidState, "the vm has no vnc server"));
        };
        Ok(pb::ConsoleEndpoint {
            protocol: "vnc".into(),
            host: self.inner.config.console_host(),
            port: u32::from(port),
            password,
            tls: false,
            path: String::new(),
            ..Default::default()
        })
    }
}

impl Libvirt {
    async fn list(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        let vms = self
            .call("list vms", |c| {
                let mut out = Vec::new();
                for d in c.list_all_domains(0)? {
                    let meta =
                        match d.metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(METADATA_NS), 0)
                        {
                            Ok(m) => m,
                            // Not ours, or gone since the listing.
                            Err(_) => continue,
                        };
                    let Some(id) = domain::vm_id_of_metadata(&meta) else { continue };
                    match info_of(&id, &d) {
                        Ok(info) => out.push(info),
                        Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(hcp_provider_sdk::page_of(vms, &req))
    }

    async fn snapshot_create(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        check_uuid("snapshot_id", &req.snapshot_id)?;
        let (id, snap, name) = (req.vm_id.clone(), req.snapshot_id.clone(), req.name.clone());
        self.call(&format!("snapshot of vm {}", req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let s = match Domain::lookup_snapshot_by_name(&d, &snap, 0) {
                Ok(s) => s,
                Err(_) => d.create_snapshot_xml(&domain::snapshot_xml(&snap, &name), 0)?,
            };
            Ok(snapshot_info(&id, &s)?)
        })
        .await
    }

    async fn snapshot_list(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        let id = vm_id.to_owned();
        self.call(&format!("snapshots of vm {vm_id}"), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let mut out = Vec::new();
            for s in d.list_all_snapshots(0)? {
                if uuid::Uuid::parse_str(&s.name()?).is_ok() {
                    out.push(snapshot_info(&id, &s)?);
                }
            }
            out.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
            Ok(out)
        })
        .await
    }

    async fn snapshot_revert(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        let (id, snap) = (req.vm_id.clone(), req.snapshot_id.clone());
        self.call(&format!("snapshot {} of vm {}", req.snapshot_id, req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            let s = Domain::lookup_snapshot_by_name(&d, &snap, 0)?;
            s.revert(0)?;
            Ok(info_of(&id, &d)?)
        })
        .await
    }

    async fn snapshot_delete(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        let (id, snap) = (req.vm_id.clone(), req.snapshot_id.clone());
        self.call(&format!("snapshot {} of vm {}", req.snapshot_id, req.vm_id), move |c| {
            let d = c.lookup_domain_by_uuid_string(&id)?;
            match Domain::lookup_snapshot_by_name(&d, &snap, 0) {
                Ok(s) => {
                    s.delete(0)?;
                    Ok(true)
                }
                Err(e) if e.code().is(virt::error::ErrorNumber::NoDomainSnapshot) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

fn snapshot_info(vm_id: &str, s: &DomainSnapshot) -> Result<pb::SnapshotInfo, virt::error::Error> {
    let name = s.name()?;
    Ok(pb::SnapshotInfo {
        snapshot_id: name.clone(),
        vm_id: vm_id.to_owned(),
        name: domain::snapshot_description(&s.xml_desc(0)?),
        native_id: name,
    })
}

fn check_uuid(field: &str, value: &str) -> Result<(), ProviderError> {
    uuid::Uuid::parse_str(value).map(|_| ()).map_err(|_| invalid(format!("{field}: {value:?} is not a UUID")))
}

#[hcp_provider_sdk::async_trait]
impl Provider for Libvirt {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("hcp.libvirt", env!("CARGO_PKG_VERSION"), "kvm")
    }

    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(self.inner.capabilities.clone())
    }

    async fn probe(&self) -> Result<(bool, String), ProviderError> {
        match self.call("probe", |c| Ok(c.is_alive()?)).await {
            Ok(true) => Ok((true, format!("connected to {}", self.inner.config.uri))),
            Ok(false) => Ok((false, "the libvirt connection is not alive".to_owned())),
            Err(e) => Ok((false, e.message)),
        }
    }

    async fn create_vm(&self, req: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.create(req).await
    }

    async fn get_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.info(vm_id).await
    }

    async fn list_vms(&self, req: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        self.list(req).await
    }

    async fn start_vm(&self, vm_id: &str) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let _held = lock.lock().await;
        self.start(vm_id).await
    }

    async fn stop_vm(&self, req: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.stop(req).await
    }

    async fn reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.reboot(req).await
    }

    async fn resize_vm(&self, req: pb::ResizeVmRequest) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.resize(req).await
    }

    async fn delete_vm(&self, vm_id: &str) -> Result<bool, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        let lock = self.lock(vm_id);
        let existed = {
            let _held = lock.lock().await;
            self.delete(vm_id).await?
        };
        self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(vm_id);
        Ok(existed)
    }

    async fn get_console(&self, req: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        self.console(req).await
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::SnapshotInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_create(req).await
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<pb::SnapshotInfo>, ProviderError> {
        check_uuid("vm_id", vm_id)?;
        self.snapshot_list(vm_id).await
    }

    async fn revert_snapshot(&self, req: pb::SnapshotRef) -> Result<pb::VmInfo, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_revert(req).await
    }

    async fn delete_snapshot(&self, req: pb::SnapshotRef) -> Result<bool, ProviderError> {
        check_uuid("vm_id", &req.vm_id)?;
        let lock = self.lock(&req.vm_id);
        let _held = lock.lock().await;
        self.snapshot_delete(req).await
    }
}

/// Connects and serves until `shutdown`; `ready` gets the bound address.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Libvirt::connect(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}

/// What a call on the blocking pool can fail with: libvirt's own error
/// (mapped by [`errors::classify`]) or one of ours.
enum CallError {
    Virt(virt::error::Error),
    Hcp(ProviderError),
}

impl From<virt::error::Error> for CallError {
    fn from(e: virt::error::Error) -> Self {
        Self::Virt(e)
    }
}

fn not_running() -> CallError {
    CallError::Hcp(ProviderError::new(ErrorKind::InvalidState, "the vm is not running"))
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidArgument, message)
}

fn io_error(what: &str, e: std::io::Error) -> ProviderError {
    ProviderError::new(ErrorKind::Internal, format!("cannot {what}: {e}"))
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A random 8-character VNC password (RFB's DES auth uses 8 bytes).
fn vnc_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..8).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// Creates `dest` as a qcow2 overlay on `base`, at least `disk_gib` large.
async fn make_overlay(base: &Path, dest: &Path, disk_gib: u32) -> Result<(), ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let size = image_size(base).await?.max(u64::from(disk_gib) << 30);
    let tmp = dest.with_extension("qcow2.tmp");
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(&tmp)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    tokio::fs::rename(&tmp, dest).await.map_err(|e| io_error("place the overlay disk", e))
}

fn power_of(state: DomainState) -> pb::PowerState {
    match state {
        DomainState::Running | DomainState::Blocked | DomainState::Shutdown => pb::PowerState::Running,
        DomainState::Paused | DomainState::PMSuspended => pb::PowerState::Paused,
        DomainState::Crashed => pb::PowerState::Crashed,
        DomainState::Shutoff | DomainState::NoState => pb::PowerState::Shutoff,
    }
}

fn info_of(vm_id: &str, d: &Domain) -> Result<pb::VmInfo, virt::error::Error> {
    let info = d.info()?;
    let power = power_of(info.state.unwrap_or(DomainState::NoState));
    let xml = d.xml_desc(0)?;
    Ok(pb::VmInfo {
        vm_id: vm_id.to_owned(),
        power_state: power as i32,
        native_id: d.name()?,
        vcpus: info.nr_virt_cpu,
        memory_mib: u32::try_from(info.max_mem / 1024).unwrap_or(u32::MAX),
        interfaces: interfaces_of(d, &xml, power == pb::PowerState::Running),
        disk_gib: if domain::type_of(&xml).as_deref() == Some("test") { 0 } else { disk_gib_of(d) },
        host: String::new(),
    })
}

/// The size of the root disk (`vda`) in whole GiB, rounded up; 0 when
/// libvirt cannot tell. (The test driver answers a made-up terabyte, so it
/// is not asked.)
fn disk_gib_of(d: &Domain) -> u32 {
    d.block_info("vda", 0)
        .map(|b| u32::try_from(b.capacity.div_ceil(1 << 30)).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// The domain's NICs in definition order (the order of the spec's
/// networks), with the addresses libvirt can tell for a running domain:
/// from its network's DHCP leases, else from the guest agent. Addresses are
/// best effort: a NIC whose address is unknown is listed without one.
fn interfaces_of(d: &Domain, xml: &str, running: bool) -> Vec<pb::InterfaceInfo> {
    let mut nics = domain::interfaces_of_xml(xml);
    if running && !nics.is_empty() {
        for source in [
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        ] {
            let Ok(found) = d.interface_addresses(source, 0) else { continue };
            let mut any = false;
            for iface in found {
                let Some(mac) = iface.hwaddr.map(|m| m.to_ascii_lowercase()) else { continue };
                let Some(nic) = nics.iter_mut().find(|n| n.mac == mac) else { continue };
                for a in iface.addrs {
                    any = true;
                    if a.typed == i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV6) {
                        nic.ipv6.push(a.addr);
                    } else {
                        nic.ipv4.push(a.addr);
                    }
                }
            }
            if any {
                break;
            }
        }
    }
    nics
}

/// The virtual size, in bytes, of a disk image.
async fn image_size(disk: &Path) -> Result<u64, ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let info = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(disk)
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !info.status.success() {
        return Err(tool(String::from_utf8_lossy(&info.stderr).trim().to_owned()));
    }
    serde_json::from_slice::<serde_json::Value>(&info.stdout)
        .ok()
        .and_then(|v| v["virtual-size"].as_u64())
        .ok_or_else(|| tool(format!("no virtual-size in the info of {}", disk.display())))
}

/// What growing a stopped domain's overlay to `disk_gib` takes: `None`
/// when it has that size already, else the new size in bytes. Refuses a
/// smaller size (disks only grow), and a disk holding internal snapshots
/// (qcow2 cannot resize those). Changes nothing.
async fn disk_growth(disk: &Path, disk_gib: u32, has_snapshots: bool) -> Result<Option<u64>, ProviderError> {
    let size = image_size(disk).await?;
    let want = u64::from(disk_gib) << 30;
    if want < size {
        return Err(invalid(format!(
            "disk_gib: {disk_gib} GiB is below the disk's {} GiB; disks only grow",
            size.div_ceil(1 << 30)
        )));
    }
    if want == size {
        return Ok(None);
    }
    if has_snapshots {
        return Err(ProviderError::new(
            ErrorKind::InvalidState,
            "the disk holds snapshots and cannot grow; delete them first",
        ));
    }
    Ok(Some(want))
}

/// Sets a (stopped domain's) disk image to `bytes`, with `qemu-img resize`.
async fn resize_image(disk: &Path, bytes: u64) -> Result<(), ProviderError> {
    let tool = |e: String| ProviderError::new(ErrorKind::Internal, format!("qemu-img: {e}"));
    let out = tokio::process::Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(disk)
        .arg(bytes.to_string())
        .output()
        .await
        .map_err(|e| tool(e.to_string()))?;
    if !out.status.success() {
        return Err(tool(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}
