//! # hcp-hyperv-sim
//!
//! A Hyper-V host simulator for HCP's tests: an HTTPS WS-Management
//! endpoint (`POST /wsman`, Basic authentication, self-signed certificate)
//! serving the part of WMI's `root/virtualization/v2` that HCP's Hyper-V
//! provider uses, as `providers/hyperv/WIRE.md` fixes it and Microsoft's
//! documentation describes it. No Hyper-V host was used to write it; what
//! each behaviour rests on is in the README.
//!
//! Every request is checked against that contract before anything else:
//! the SOAP envelope and its headers (`wsman.rs`), resource URIs and
//! selectors against the class catalogue (`catalog.rs`), WQL queries
//! (`wql.rs`), method parameters by name and CIM type, embedded CIM-XML
//! instances (`cimxml.rs`) and references. What does not match is refused the
//! way WinRM or the WMI provider refuses it, and recorded as a violation so
//! a test can assert that a whole suite sent none ([`Sim::violations`]).
//!
//! Behaviour modelled (`state.rs`, `methods.rs`): VMs with their settings,
//! processor, memory, controllers, drives, disk images, network adapters
//! and switch connections; power transitions through jobs with transitional
//! states; guest shutdown through the shutdown component; KVP guest
//! addresses; checkpoints; VHD files in a directory standing for
//! `C:\Hyper-V\hcp\`; jobs that end after [`SimConfig::job_duration`] and
//! vanish [`SimConfig::job_retention`] later; and faults injected through
//! [`Sim::set_faults`]. Beside it, a stand-in for the VMConnect console
//! listener (TCP 2179) checks the preconnection PDU naming the VM
//! (`vmconnect.rs`).
//!
//! Tests run it in-process ([`start`]); the `hcp-hyperv-sim` binary serves
//! it for system tests, with a small JSON control API on a separate plain
//! HTTP port ([`control_router`]).

mod catalog;
mod cimxml;
pub mod cli;
mod methods;
mod model;
mod ntlm;
mod server;
mod state;
mod vmconnect;
mod wql;
mod wsman;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::State;
pub use crate::vmconnect::VmConnectSession;

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Listen address; port 0 picks one.
    pub listen: SocketAddr,
    /// Accepted Basic credentials: (user, password).
    pub users: Vec<(String, String)>,
    /// The host's computer name (the host `Msvm_ComputerSystem`'s `Name`,
    /// the services' `SystemName`, the `Machine` of faults).
    pub host_name: String,
    /// The virtual switches, by `ElementName`.
    pub switches: Vec<String>,
    /// The local directory standing for [`SimConfig::disk_prefix`]; `None`
    /// makes a fresh temporary one, removed with the simulator.
    pub disk_dir: Option<PathBuf>,
    /// The Windows directory mapped onto `disk_dir`
    /// (`C:\Hyper-V\hcp\<name>` is `<disk_dir>/<name>`, compared without
    /// case); paths elsewhere do not exist on the simulated host.
    pub disk_prefix: String,
    /// Shares the host sees besides its disk directory: (Windows prefix,
    /// local directory), e.g. (`\\files\images`, a directory the
    /// provider writes images to). Paths under a prefix map onto its
    /// directory like [`SimConfig::disk_prefix`]'s.
    pub shares: Vec<(String, PathBuf)>,
    /// How long a job runs.
    pub job_duration: Duration,
    /// How long an ended job stays visible (`TimeBeforeRemoval`, Hyper-V: 5
    /// minutes).
    pub job_retention: Duration,
    /// How long a guest takes to shut down after InitiateShutdown.
    pub shutdown_delay: Duration,
    /// How long an idle enumeration context stays valid (WinRM's
    /// `EnumerationTimeoutms`: 60 s).
    pub enumeration_timeout: Duration,
    /// The most virtual processors a VM may have.
    pub max_vcpus: u64,
    /// The least memory a VM may have, MB.
    pub memory_min_mb: u64,
    /// The most memory a VM may have, MB.
    pub memory_max_mb: u64,
    /// Where the VMConnect stand-in listens (Hyper-V: TCP 2179); `None`
    /// runs none.
    pub vmconnect_listen: Option<SocketAddr>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            users: vec![("hcp".to_owned(), "s3cret".to_owned())],
            host_name: "HVSIM01".to_owned(),
            switches: vec!["Default Switch".to_owned()],
            disk_dir: None,
            disk_prefix: "C:\\Hyper-V\\hcp\\".to_owned(),
            shares: Vec::new(),
            job_duration: Duration::from_millis(20),
            job_retention: Duration::from_secs(300),
            shutdown_delay: Duration::from_millis(50),
            enumeration_timeout: Duration::from_secs(60),
            max_vcpus: 16,
            memory_min_mb: 32,
            memory_max_mb: 1_048_576,
            vmconnect_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        }
    }
}

/// Faults to inject; each is consumed by the requests it hits or stays
/// until replaced.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The next job of a method (`DefineSystem`, `RequestStateChange`, ...)
    /// ends in state 10 (Exception) with ErrorCode 32768 and this
    /// ErrorDescription; what it changed is undone.
    pub job_failures: BTreeMap<String, String>,
    /// The next N invocations of a method return 32774 (in use).
    pub in_use: BTreeMap<String, u32>,
    /// Guests ignore InitiateShutdown: it returns 0 and nothing happens.
    pub guest_ignores_shutdown: bool,
    /// VMs defined while this is set have no integration services: no
    /// `Msvm_ShutdownComponent` and no KVP data.
    pub no_shutdown_component: bool,
    /// Every request waits this long before it is handled.
    pub delay_ms: u64,
}

/// Request counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// HTTP requests received.
    pub requests: u64,
    /// Of these, answered 401.
    pub unauthorized: u64,
}

/// One request the simulator answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestRecord {
    /// The `a:Action`.
    pub action: String,
    /// The `w:ResourceURI`.
    pub resource_uri: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened: `get Msvm_ComputerSystem`, `DefineSystem -> 4096`,
    /// `fault w:InvalidSelectors 2150858813`, ...
    pub outcome: String,
}

/// How often a VM changed power state.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PowerCounters {
    /// Turned on (from off or saved).
    pub starts: u32,
    /// Turned off hard (RequestStateChange 3) while running.
    pub stops: u32,
    /// Guest shutdowns that completed.
    pub shutdowns: u32,
    /// Resets.
    pub resets: u32,
}

/// A device as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceView {
    /// Its class.
    pub class: String,
    /// Its InstanceID.
    pub instance_id: String,
    /// `ResourceType`.
    pub resource_type: u16,
    /// `ResourceSubType`.
    pub subtype: String,
    /// `ElementName`.
    pub element_name: String,
    /// The parent's InstanceID.
    pub parent: Option<String>,
    /// `AddressOnParent`.
    pub address_on_parent: Option<String>,
    /// `HostResource` (files, switch paths).
    pub host_resource: Vec<String>,
    /// The MAC of a network adapter.
    pub address: Option<String>,
}

/// A checkpoint as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotView {
    /// Its settings' InstanceID.
    pub instance_id: String,
    /// `ElementName`.
    pub name: String,
    /// The VM's power state when it was taken.
    pub power_state: u16,
    /// Processor count then.
    pub cpus: u64,
    /// Memory then, MB.
    pub memory_mb: u64,
}

/// A VM as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmView {
    /// `Name`: the GUID, upper case.
    pub guid: String,
    /// `ElementName`.
    pub name: String,
    /// `Notes`.
    pub notes: Vec<String>,
    /// 1 or 2.
    pub generation: u8,
    /// `EnabledState`.
    pub state: u16,
    /// `RequestedState`.
    pub requested_state: u16,
    /// Virtual processors.
    pub cpus: u64,
    /// Memory, MB.
    pub memory_mb: u64,
    /// Controllers, drives, images, adapters, connections.
    pub devices: Vec<DeviceView>,
    /// Checkpoints, oldest first.
    pub snapshots: Vec<SnapshotView>,
    /// Whether it has integration services (shutdown component, KVP).
    pub integration_services: bool,
    /// The address the guest reports through KVP while running.
    pub guest_ip: String,
    /// Power history.
    pub counters: PowerCounters,
}

/// A job as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    /// Its InstanceID.
    pub instance_id: String,
    /// The method that started it.
    pub method: String,
    /// `JobState`: 4 running, 7 completed, 10 exception.
    pub state: u16,
    /// `ErrorCode`.
    pub error_code: u16,
    /// `ErrorDescription`.
    pub error_description: Option<String>,
}

/// A file in the simulated disk directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileView {
    /// The Windows path (`C:\Hyper-V\hcp\...`).
    pub path: String,
    /// The virtual size, bytes.
    pub size: u64,
    /// `Type`: 2 fixed, 3 dynamic, 4 differencing.
    pub kind: u16,
    /// The parent of a differencing disk.
    pub parent: Option<String>,
}

/// Removes a temporary disk directory with the last handle.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A handle on a simulator; clones share its state.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    _temp: Option<Arc<TempDir>>,
}

impl Sim {
    /// Builds a simulator (makes the disk directory when none is given).
    pub fn new(config: SimConfig) -> std::io::Result<Self> {
        let (dir, temp) = match &config.disk_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let d = std::env::temp_dir().join(format!("hcp-hyperv-sim-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&d)?;
                (d.clone(), Some(Arc::new(TempDir(d))))
            }
        };
        Ok(Self { state: Arc::new(Mutex::new(State::new(config, dir))), _temp: temp })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks and moves time forward.
    fn current(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.lock();
        s.advance();
        s
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The faults not yet consumed.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Every contract violation seen so far, one line each.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Every SOAP request answered so far (401s and HTTP-level refusals
    /// included).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().log.clone()
    }

    /// Every connection to the VMConnect stand-in, first first.
    pub fn vmconnect_sessions(&self) -> Vec<VmConnectSession> {
        self.lock().vmconnect.clone()
    }

    /// Request counters.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// The directory standing for [`SimConfig::disk_prefix`].
    pub fn disk_dir(&self) -> PathBuf {
        self.lock().disk_dir.clone()
    }

    /// The shares the host sees: (Windows prefix, local directory).
    pub fn shares(&self) -> Vec<(String, PathBuf)> {
        self.lock().config.shares.clone()
    }

    /// Where a Windows path under the disk prefix lives locally.
    pub fn host_path(&self, windows: &str) -> Option<PathBuf> {
        self.lock().host_path(windows)
    }

    /// The VMs.
    pub fn vms(&self) -> Vec<VmView> {
        let s = self.current();
        s.vms.values().map(view).collect()
    }

    /// A VM by name (`ElementName`) or GUID.
    pub fn vm(&self, name_or_guid: &str) -> Option<VmView> {
        self.vms().into_iter().find(|v| v.name == name_or_guid || v.guid.eq_ignore_ascii_case(name_or_guid))
    }

    /// The jobs still visible.
    pub fn jobs(&self) -> Vec<JobView> {
        let s = self.current();
        s.jobs
            .values()
            .map(|j| JobView {
                instance_id: j.id.clone(),
                method: j.method.clone(),
                state: match (&j.ended, &j.outcome) {
                    (None, _) => 4,
                    (Some(_), Ok(())) => 7,
                    (Some(_), Err(_)) => 10,
                },
                error_code: match (&j.ended, &j.outcome) {
                    (Some(_), Err((c, _))) => *c,
                    _ => 0,
                },
                error_description: match (&j.ended, &j.outcome) {
                    (Some(_), Err((_, m))) => Some(m.clone()),
                    _ => None,
                },
            })
            .collect()
    }

    /// The files in the disk directory (recursively), with their virtual
    /// sizes.
    pub fn files(&self) -> Vec<FileView> {
        let (dir, prefix) = {
            let s = self.lock();
            (s.disk_dir.clone(), s.config.disk_prefix.clone())
        };
        let mut out = Vec::new();
        collect_files(&dir, &dir, &prefix, &mut out);
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Waits until no job is running (or the deadline passes); true when
    /// idle.
    pub async fn settle(&self, deadline: Duration) -> bool {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            {
                let s = self.current();
                if s.jobs.values().all(|j| j.ended.is_some())
                    && s.vms.values().all(|v| v.shutdown_at.is_none())
                {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sets a VM's power state behind the provider's back (as a guest
    /// powering itself off would).
    pub fn set_power_state(&self, guid: &str, state: u16) -> bool {
        let mut s = self.current();
        let Some(vm) = s.vm_mut(guid) else { return false };
        vm.state = state;
        vm.requested = state::power::NOT_APPLICABLE;
        vm.busy = None;
        vm.shutdown_at = None;
        vm.started = (state == state::power::RUNNING).then(std::time::Instant::now);
        vm.state_changed = chrono::Utc::now();
        true
    }

    /// Changes how long the jobs started from now on run (to watch
    /// transitional states without racing them).
    pub fn set_job_duration(&self, d: Duration) {
        self.lock().config.job_duration = d;
    }

    /// Turns a VM's integration services on or off.
    pub fn set_integration_services(&self, guid: &str, on: bool) -> bool {
        let mut s = self.lock();
        let Some(vm) = s.vm_mut(guid) else { return false };
        vm.integration = on;
        true
    }

    /// Sets the IPv4 address a VM's guest reports (empty: none).
    pub fn set_guest_ip(&self, guid: &str, ip: &str) -> bool {
        let mut s = self.lock();
        let Some(vm) = s.vm_mut(guid) else { return false };
        vm.guest_ip = ip.to_owned();
        true
    }
}

fn view(vm: &state::Vm) -> VmView {
    VmView {
        guid: vm.guid.clone(),
        name: vm.name.clone(),
        notes: vm.notes.clone(),
        generation: if vm.subtype.ends_with(":2") { 2 } else { 1 },
        state: vm.state,
        requested_state: vm.requested,
        cpus: vm.cpus,
        memory_mb: vm.memory_mb,
        devices: vm
            .devices
            .iter()
            .map(|d| DeviceView {
                class: d.kind.class().to_owned(),
                instance_id: d.instance_id.clone(),
                resource_type: d.resource_type,
                subtype: d.subtype.clone(),
                element_name: d.element_name.clone(),
                parent: d.parent.clone(),
                address_on_parent: d.address_on_parent.clone(),
                host_resource: d.host_resource.clone(),
                address: d.address.clone(),
            })
            .collect(),
        snapshots: vm
            .snapshots
            .iter()
            .map(|s| SnapshotView {
                instance_id: format!("Microsoft:{}", s.guid),
                name: s.name.clone(),
                power_state: s.power,
                cpus: s.cpus,
                memory_mb: s.memory_mb,
            })
            .collect(),
        integration_services: vm.integration,
        guest_ip: vm.guest_ip.clone(),
        counters: vm.counters,
    }
}

fn collect_files(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<FileView>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, prefix, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            let rel: Vec<String> =
                rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let meta = state::read_disk(&p);
            out.push(FileView {
                path: format!("{}\\{}", prefix.trim_end_matches('\\'), rel.join("\\")),
                size: meta.as_ref().map(|m| m.size).unwrap_or(0),
                kind: meta.as_ref().map(|m| m.kind).unwrap_or(2),
                parent: meta.and_then(|m| m.parent),
            });
        }
    }
}

/// A simulator serving HTTPS.
pub struct Running {
    /// Its address.
    pub addr: SocketAddr,
    /// The self-signed certificate (PEM) clients can trust as their CA.
    pub cert_pem: String,
    /// The same certificate, DER.
    pub cert_der: Vec<u8>,
    /// SHA-256 fingerprint of the certificate, `AA:BB:...`.
    pub fingerprint: String,
    /// The VMConnect stand-in's address.
    pub vmconnect_addr: Option<SocketAddr>,
    /// The state.
    pub sim: Sim,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    vmconnect: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// `https://127.0.0.1:PORT/wsman`.
    pub fn endpoint(&self) -> String {
        format!("https://{}/wsman", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.vmconnect.take() {
            task.abort();
        }
    }
}

/// The simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The disk directory could not be made.
    #[error("cannot make the disk directory")]
    Disk(#[source] std::io::Error),
    /// No certificate could be made.
    #[error("cannot make a certificate")]
    Cert(#[from] rcgen::Error),
    /// TLS setup failed.
    #[error("invalid TLS setup")]
    Tls(#[from] rustls::Error),
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts a simulator on `config.listen`; it serves until the returned
/// handle is dropped.
pub async fn start(config: SimConfig) -> Result<Running, StartError> {
    let listen = config.listen;
    let sim = Sim::new(config).map_err(StartError::Disk)?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert_pem = cert.cert.pem();
    let der = cert.cert.der().to_vec();
    let fingerprint = fingerprint_of(&der);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![rustls::pki_types::CertificateDer::from(der.clone())], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
    let vmconnect_listen = sim.lock().config.vmconnect_listen;
    let (vmconnect_addr, vmconnect) = match vmconnect_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| StartError::Bind { addr: at, source })?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { addr: at, source })?;
            (Some(bound), Some(tokio::spawn(vmconnect::serve(l, sim.clone()))))
        }
        None => (None, None),
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let app = server::router(sim.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut rx => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let acceptor = acceptor.clone();
            // Each connection proves itself once under NTLM.
            let app = app.clone().layer(axum::Extension(ntlm::ConnAuth::default()));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(Running {
        addr,
        cert_pem,
        cert_der: der,
        fingerprint,
        vmconnect_addr,
        sim,
        shutdown: Some(tx),
        vmconnect,
    })
}

/// The control API (`/_sim/...`, JSON) for a plain HTTP listener: `GET
/// vms`, `jobs`, `files`, `violations`, `requests`, `stats`, `faults`, `vmconnect`;
/// `POST faults` (a [`Faults`] object); `POST vms/<guid>/state` (`{"state":
/// 3}`).
pub fn control_router(sim: Sim) -> axum::Router {
    server::control_router(sim)
}

/// SHA-256 of a DER certificate as `AA:BB:...`.
pub fn fingerprint_of(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
