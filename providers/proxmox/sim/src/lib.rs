//! # hcp-proxmox-sim
//!
//! A Proxmox VE API simulator for HCP's tests: an HTTPS server (self-signed
//! certificate) answering `/api2/json/...` the way a PVE 9.1 node does on the
//! paths a VM lifecycle adapter uses. Every request is checked against the
//! official schema (`schema.rs`) before anything else, so an unknown or
//! mistyped parameter gets PVE's 400 with the `errors` map, and every request
//! is recorded with its violations so a test can assert that a whole suite
//! sent none.
//!
//! Behaviour modelled (`api.rs`): the `{"data": ...}` envelope and error
//! shapes (message in the reason phrase and the body), ticket + CSRF and API
//! token authentication with delayed 401s, UPID tasks that run for a while
//! and end `OK`, `WARNINGS: n` or with an error, config locks held by
//! running tasks and lock timeouts, vmid collisions (`nextid` reserves
//! nothing), numbers sent as strings, snapshots, VNC proxy tickets and the
//! `vncwebsocket` they open (a websocket upgrade to an RFB server with VNC
//! authentication, [`vnc`]), `termproxy` tickets and the serial terminal
//! their `vncwebsocket` opens (termproxy's framing, `qm terminal`'s
//! refusals, a small shell on the guest's serial line, [`term`]), and fault
//! injection for all of these ([`Faults`]).
//!
//! Tests run it in-process ([`start`]); the `hcp-proxmox-sim` binary serves
//! it for system tests with a small control API under `/_sim/`.

mod api;
pub mod cli;
pub mod schema;
pub mod term;
pub mod vnc;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use schema::{Schema, Violations};

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Listen address; port 0 picks one.
    pub listen: SocketAddr,
    /// The schema file.
    pub schema_path: PathBuf,
    /// Node names of the cluster.
    pub nodes: Vec<String>,
    /// API tokens accepted: (`user@realm!tokenid`, secret).
    pub tokens: Vec<(String, String)>,
    /// Users accepted for tickets: (`user@realm`, password).
    pub users: Vec<(String, String)>,
    /// How long a task runs before it stops.
    pub task_duration: Duration,
    /// Delay before a 401 (PVE waits 3 s).
    pub auth_failure_delay: Duration,
    /// Lifetime of a ticket (PVE: 2 h).
    pub ticket_lifetime: Duration,
    /// How long a request waits for a VM's config lock held by a running
    /// task before it fails with "got timeout" (PVE: 10 s).
    pub lock_wait: Duration,
    /// Templates: (vmid, name) on the first node.
    pub templates: Vec<(u32, String)>,
    /// Storages: (name, shared, content list).
    pub storages: Vec<(String, bool, String)>,
    /// Directory standing for the snippets storage (`cicustom` volumes must
    /// exist there).
    pub snippets_dir: Option<PathBuf>,
    /// Send integers in answers as JSON strings, as PVE often does.
    pub numbers_as_strings: bool,
    /// What `GET /version` reports.
    pub version: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            schema_path: schema::default_path(),
            nodes: vec!["pve1".to_owned()],
            tokens: vec![("hcp@pve!provider".to_owned(), "0b1d4c4e-7d9a-4a39-9c55-5d4f3c0e2a11".to_owned())],
            users: vec![("hcp@pve".to_owned(), "s3cret".to_owned())],
            task_duration: Duration::from_millis(40),
            auth_failure_delay: Duration::from_millis(300),
            ticket_lifetime: Duration::from_secs(7200),
            lock_wait: Duration::from_millis(300),
            templates: vec![(9000, "debian-12-genericcloud".to_owned())],
            storages: vec![
                ("local-lvm".to_owned(), false, "images,rootdir".to_owned()),
                ("local".to_owned(), false, "iso,vztmpl,backup,snippets,import".to_owned()),
            ],
            snippets_dir: None,
            numbers_as_strings: true,
            version: "9.1.3".to_owned(),
        }
    }
}

/// Faults to inject; each counter is consumed by the requests it hits.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The next N mutating VM requests fail at once with PVE's 500
    /// "can't lock file ... got timeout".
    pub lock_timeouts: u32,
    /// The next N tasks end with a lock timeout as their exit status.
    pub task_lock_timeouts: u32,
    /// The next task of a type (`qmclone`, `qmstart`, ...) ends with this
    /// exit status (`WARNINGS: 2`, or an error text).
    pub task_exits: BTreeMap<String, String>,
    /// The next N clones find their new vmid taken by someone else.
    pub collisions: u32,
    /// The next N authenticated requests answer 595 (node proxy failure).
    pub proxy_errors: u32,
    /// Forget every ticket issued so far (one shot).
    pub expire_tickets: bool,
    /// Guests ignore ACPI: shutdown tasks fail unless forceStop.
    pub acpi_ignored: bool,
    /// The next N config updates fail with a 500 (not a lock).
    pub config_failures: u32,
    /// The cluster loses quorum for the next N writes: each answers PVE's
    /// 500 "cluster not ready - no quorum?" (reads still work, as on a node
    /// cut off from the others).
    pub quorum_loss: u32,
    /// Revoke every API token (one shot): token requests get 401 from then
    /// on, as after `pveum user token remove`.
    pub revoke_tokens: bool,
    /// The caller lacks VM.Config.Cloudinit: config updates that set
    /// cloud-init options (`cicustom`, `sshkeys`, `ciuser`, `ipconfig0`)
    /// get PVE's 403; others (tags, cores, memory) pass.
    pub cloudinit_denied: bool,
    /// The guest agent of running VMs does not answer: agent requests get
    /// PVE's 500 "QEMU guest agent is not running" (an agent not installed
    /// in the image, or not started yet).
    pub agent_down: bool,
}

/// One request the simulator received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path after `/api2/json`.
    pub path: String,
    /// The schema template it matched, if any.
    pub template: Option<String>,
    /// Query and body parameters (path variables not included).
    pub params: BTreeMap<String, String>,
    /// Schema violations (parameter -> message); empty when valid.
    pub violations: Violations,
    /// The status answered.
    pub status: u16,
}

/// A simulated VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vm {
    /// The vmid.
    pub vmid: u32,
    /// Its node.
    pub node: String,
    /// `running` or `stopped`.
    pub status: String,
    /// A template?
    pub template: bool,
    /// The config lock, if any.
    pub lock: Option<String>,
    /// The config (key -> value as PVE stores it).
    pub config: BTreeMap<String, String>,
    /// Snapshots: name -> (description, vmstate, snaptime).
    pub snapshots: BTreeMap<String, (String, bool, u64)>,
    /// How many times it was started, stopped, rebooted.
    pub starts: u32,
    /// Hard stops.
    pub stops: u32,
    /// ACPI shutdowns that succeeded.
    pub shutdowns: u32,
    /// Reboots.
    pub reboots: u32,
    /// Resets (hard reboots).
    pub resets: u32,
    /// Migrations that finished.
    #[serde(default)]
    pub migrations: u32,
}

/// A disk image on a storage (`images` content), as `pvesm alloc` or
/// `POST .../storage/{storage}/content` makes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    /// `storage:name`.
    pub volid: String,
    /// The storage id.
    pub storage: String,
    /// The node whose local storage holds it; `None` on shared storage.
    pub node: Option<String>,
    /// The owner vmid (the `vm-<vmid>-` of its name): destroying that VM
    /// frees it, nothing else does.
    pub owner: u32,
    /// `raw`, `qcow2`, ...
    pub format: String,
    /// Bytes.
    pub size: u64,
    /// Creation time (UNIX seconds).
    pub ctime: u64,
    /// The storage content type it is: `images`, or `import` for a file
    /// uploaded to be imported (`import/<name>.<ext>`, owner 0).
    #[serde(default = "images_content")]
    pub content: String,
}

fn images_content() -> String {
    "images".to_owned()
}

impl Volume {
    /// Whether a VM or request on `node` sees it.
    pub fn visible_on(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }
}

#[derive(Debug, Clone)]
enum Effect {
    None,
    /// Clone or create finished: unlock; on failure remove the VM.
    Cloned(u32),
    Power(u32, &'static str),
    Reboot(u32),
    Reset(u32),
    Shutdown(u32, bool),
    /// Destroyed: the VM and the disks it owns (also the ones its config
    /// no longer names, with `destroy-unreferenced-disks`).
    Destroy(u32, bool),
    /// `imgdel` finished: the volume (`volid`, node) is freed.
    FreeVolume(String, String),
    /// `imgcopy` finished: the copy exists.
    CopyVolume(Volume),
    /// An upload's `imgcopy` finished: the file exists (replacing one of
    /// the same name).
    Uploaded(Volume),
    /// `qmtemplate` finished: the VM is a template.
    Template(u32),
    Snapshot(u32, String, String, bool),
    Rollback(u32, String, bool),
    DeleteSnapshot(u32, String),
    /// Migration finished: unlock; on success the VM is on the target.
    Migrate(u32, String),
}

#[derive(Debug, Clone)]
struct Task {
    upid: String,
    node: String,
    kind: String,
    id: String,
    user: String,
    pid: u32,
    pstart: u32,
    starttime: u64,
    ends_at: Instant,
    exit: Option<String>,
    planned_exit: String,
    effect: Effect,
    vmid: Option<u32>,
}

/// How long a `vncproxy` listener waits for its one connection (PVE: 10 s).
pub const VNC_LISTEN_WAIT: Duration = Duration::from_secs(10);
/// How long a `PVEVNC` ticket verifies (PVE: about 40 s).
pub const VNC_TICKET_LIFETIME: Duration = Duration::from_secs(40);

/// A `vncproxy` or `termproxy` call's listener, waiting for its
/// `vncwebsocket`.
#[derive(Debug, Clone)]
struct VncProxy {
    vmid: u32,
    port: u16,
    /// Who asked: the ticket is bound to this user (or token).
    user: String,
    /// What listens.
    listener: Listener,
    issued: Instant,
    /// The listener took its one connection.
    connected: bool,
}

/// What a proxy listener serves.
#[derive(Debug, Clone)]
enum Listener {
    /// VNC, with this password (the one vncproxy returned, else the ticket).
    Vnc { password: String },
    /// `termproxy` running `qm terminal` on this serial interface (the
    /// first `socket` one when `None`).
    Term { iface: Option<String> },
}

#[derive(Debug, Clone)]
struct Ticket {
    user: String,
    csrf: String,
    issued: Instant,
}

struct State {
    config: SimConfig,
    vms: BTreeMap<u32, Vm>,
    volumes: Vec<Volume>,
    tasks: HashMap<String, Task>,
    tickets: HashMap<String, Ticket>,
    vnc_tickets: HashMap<String, VncProxy>,
    faults: Faults,
    requests: Vec<RequestRecord>,
    next_pid: u32,
    /// Nodes the cluster sees offline.
    offline_nodes: Vec<String>,
}

/// A handle on a simulator; clones share its state.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    schema: Arc<Schema>,
}

impl Sim {
    /// Builds a simulator (loads the schema).
    pub fn new(config: SimConfig) -> Result<Self, schema::SchemaError> {
        let schema = Schema::load(&config.schema_path)?;
        let mut vms = BTreeMap::new();
        let node = config.nodes.first().cloned().unwrap_or_else(|| "pve1".to_owned());
        for (vmid, name) in &config.templates {
            let config: BTreeMap<String, String> = [
                ("name", name.as_str()),
                ("cores", "1"),
                ("memory", "512"),
                ("scsi0", "local-lvm:base-disk-0,size=2G"),
                ("ide2", "local-lvm:cloudinit,media=cdrom"),
                ("scsihw", "virtio-scsi-pci"),
                ("template", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            vms.insert(
                *vmid,
                Vm {
                    vmid: *vmid,
                    node: node.clone(),
                    status: "stopped".to_owned(),
                    template: true,
                    lock: None,
                    config,
                    snapshots: BTreeMap::new(),
                    starts: 0,
                    stops: 0,
                    shutdowns: 0,
                    reboots: 0,
                    resets: 0,
                    migrations: 0,
                },
            );
        }
        Ok(Self {
            state: Arc::new(Mutex::new(State {
                config,
                vms,
                volumes: Vec::new(),
                tasks: HashMap::new(),
                tickets: HashMap::new(),
                vnc_tickets: HashMap::new(),
                faults: Faults::default(),
                requests: Vec::new(),
                next_pid: 1000,
                offline_nodes: Vec::new(),
            })),
            schema: Arc::new(schema),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The faults not yet consumed.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// The requests that broke the schema.
    pub fn violations(&self) -> Vec<RequestRecord> {
        self.lock().requests.iter().filter(|r| !r.violations.is_empty()).cloned().collect()
    }

    /// The VMs (templates included).
    pub fn vms(&self) -> Vec<Vm> {
        self.lock().vms.values().cloned().collect()
    }

    /// The disk images allocated through the storage API.
    pub fn volumes(&self) -> Vec<Volume> {
        self.lock().volumes.clone()
    }

    /// Takes a node offline (its VMs stop) or brings it back.
    pub fn set_node_online(&self, node: &str, online: bool) {
        let mut s = self.lock();
        s.offline_nodes.retain(|n| n != node);
        if !online {
            s.offline_nodes.push(node.to_owned());
            for vm in s.vms.values_mut().filter(|v| v.node == node) {
                vm.status = "stopped".to_owned();
            }
        }
    }

    /// Changes a VM's power state behind the provider's back.
    pub fn set_status(&self, vmid: u32, status: &str) {
        if let Some(vm) = self.lock().vms.get_mut(&vmid) {
            vm.status = status.to_owned();
        }
    }

    /// Sets (or, with `None`, removes) one key of a VM's config behind the
    /// provider's back, as an operator editing it would.
    pub fn edit_config(&self, vmid: u32, key: &str, value: Option<&str>) {
        if let Some(vm) = self.lock().vms.get_mut(&vmid) {
            match value {
                Some(v) => vm.config.insert(key.to_owned(), v.to_owned()),
                None => vm.config.remove(key),
            };
        }
    }

    /// The schema in use.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }
}

/// A simulator serving HTTPS.
pub struct Running {
    /// Its address.
    pub addr: SocketAddr,
    /// The self-signed certificate (PEM) clients can trust as their CA.
    pub cert_pem: String,
    /// SHA-256 fingerprint of the certificate, `AA:BB:...` as PVE shows it.
    pub fingerprint: String,
    /// The state.
    pub sim: Sim,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The schema could not be loaded.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
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
    let sim = Sim::new(config)?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert_pem = cert.cert.pem();
    let der = cert.cert.der().to_vec();
    let fingerprint = fingerprint_of(&der);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![rustls::pki_types::CertificateDer::from(der)], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind { addr: listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(sim.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = &mut rx => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                // Upgrades: vncwebsocket becomes a websocket.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(Running { addr, cert_pem, fingerprint, sim, shutdown: Some(tx) })
}

/// The control API alone (`/_sim/...`), for a plain HTTP listener.
pub fn control_router(sim: Sim) -> axum::Router {
    api::router(sim)
}

/// SHA-256 of a DER certificate as `AA:BB:...`.
pub fn fingerprint_of(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
