//! The commands people use every day: `hcp vm`, `hcp job`, `hcp catalog`
//! and `hcp ops`, over the REST API as any client would use it. Every
//! asynchronous command takes `--wait`: it follows the job to its end, with
//! a live line on a terminal and plain lines otherwise (both on stderr, so
//! stdout carries only the result), and a failed job exits non-zero with
//! the job's error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crate::client::{Client, ConnectArgs};
use crate::output::{self, Format};

pub(crate) const T: &str = "/api/hcp/tenant/v1";
const VM_COLUMNS: &[&str] = &["vm_id", "name", "status", "flavor", "image", "zone", "networks.0.ipv4"];
/// What operators see of an image.
const OPS_IMAGE_COLUMNS: &[&str] = &[
    "name",
    "status",
    "visibility",
    "project_id",
    "os_type",
    "source",
    "backings",
    "size_bytes",
    "error_message",
];
const JOB_COLUMNS: &[&str] = &["job_id", "kind", "status", "vm_id", "attempts", "created_at", "error.code"];

/// Flags every API command shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table, env = "HCP_OUTPUT")]
    pub output: Format,
}

/// `--wait`.
#[derive(Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Follow the job to its end; a failed job exits non-zero.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (the job goes on).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// `hcp vm`.
#[derive(Subcommand, Debug)]
pub enum Vm {
    /// The project's VMs.
    List {
        /// Only VMs in this status (ACTIVE, STOPPED, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only VMs carrying this tag (repeatable).
        #[arg(long)]
        tag: Vec<String>,
    },
    /// One VM (by id, or by name: the one VM of that name).
    Show { vm: String },
    /// Create a VM.
    Create {
        name: String,
        #[arg(long)]
        flavor: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        zone: Option<String>,
        /// A network to attach (repeatable).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Metadata `KEY=VALUE` (repeatable).
        #[arg(long = "meta")]
        metadata: Vec<String>,
        /// cloud-init user data from this file.
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        /// A placement group of the project (its id).
        #[arg(long)]
        placement_group: Option<String>,
        /// What HCP does when the VM is found down: never, on-failure, always.
        #[arg(long, value_parser = ["never", "on-failure", "always"])]
        restart_policy: Option<String>,
        /// A key pair of the project whose public key the guest authorizes
        /// for SSH (repeatable; `hcp keypair list`).
        #[arg(long = "key")]
        keys: Vec<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Rename, retag or set metadata (no job).
    Update {
        vm: String,
        #[arg(long)]
        name: Option<String>,
        /// Replace the tags with these (repeatable).
        #[arg(long = "tag")]
        tags: Option<Vec<String>>,
        /// Replace the metadata with these `KEY=VALUE` (repeatable).
        #[arg(long = "meta")]
        metadata: Option<Vec<String>>,
    },
    /// Start a stopped VM.
    Start {
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop a VM (graceful unless --force).
    Stop {
        vm: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Reboot a VM (soft unless --hard).
    Reboot {
        vm: String,
        #[arg(long)]
        hard: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Give a VM another flavor.
    Resize {
        vm: String,
        #[arg(long)]
        flavor: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a VM.
    Delete {
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// A single-use console session. For serial (with the table output),
    /// the console opens in this terminal; leave it with Ctrl-].
    Console {
        vm: String,
        /// vnc (default), spice, rdp, serial, or web (a page in the browser).
        #[arg(long = "type", default_value = "vnc")]
        kind: String,
    },
    /// The end of what the guest wrote on its serial port (its boot log).
    ConsoleLog {
        vm: String,
        /// How many lines, from the end (1 to 10000).
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Snapshots of a VM.
    #[command(subcommand)]
    Snapshot(Snapshot),
    /// Make a private image of the project from a stopped VM's disk
    /// (`hcp image list` shows it; `hcp vm create --image NAME` uses it).
    Capture {
        vm: String,
        /// The image's name.
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `hcp vm snapshot`.
#[derive(Subcommand, Debug)]
pub enum Snapshot {
    /// A VM's snapshots.
    List { vm: String },
    /// Take a snapshot.
    Create {
        vm: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Revert a VM to a snapshot.
    Revert {
        vm: String,
        snapshot: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a snapshot.
    Delete {
        vm: String,
        snapshot: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `hcp job`.
#[derive(Subcommand, Debug)]
pub enum Job {
    /// The project's jobs, newest first.
    List {
        /// Only this VM's jobs.
        #[arg(long)]
        vm: Option<String>,
    },
    /// One job.
    Show { job: String },
    /// Follow a job to its end.
    Watch {
        job: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Cancel a job: a queued one at once, a running one by its worker
    /// (the answer shows cancel_requested; watch it end CANCELLED).
    Cancel { job: String },
}

/// `hcp catalog`.
#[derive(Subcommand, Debug)]
pub enum Catalog {
    /// Flavors.
    Flavors,
    /// Images.
    Images,
    /// Zones.
    Zones,
    /// Networks.
    Networks,
    /// Volume types.
    VolumeTypes,
}

/// `hcp ops` (operator tokens).
#[derive(Subcommand, Debug)]
pub enum Ops {
    /// Providers.
    #[command(subcommand)]
    Provider(OpsProvider),
    /// A project's quota.
    #[command(subcommand)]
    Quota(OpsQuota),
    /// Flavors (list with `hcp catalog flavors`).
    #[command(subcommand)]
    Flavor(OpsFlavor),
    /// Volume types (list with `hcp catalog volume-types`, which hides their storage from tenants).
    #[command(subcommand)]
    VolumeType(OpsVolumeType),
    /// Images (list with `hcp catalog images`, which hides their source from tenants).
    #[command(subcommand)]
    Image(OpsImage),
    /// Zones.
    #[command(subcommand)]
    Zone(OpsZone),
    /// Networks of a zone and their backings on each provider.
    #[command(subcommand)]
    Network(OpsNetwork),
    /// The audit trail, newest first.
    Audit {
        /// Only events about this resource (a VM id, ...).
        #[arg(long)]
        resource: Option<String>,
        /// Only events of this action (vm.create, ...).
        #[arg(long)]
        action: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Any job, of any tenant, with its step log.
    Job { job: String },
    /// Cancel any tenant's job (a running one is stopped by its worker).
    CancelJob { job: String },
    /// Usage of every tenant, or one: VM, vCPU, memory, disk and volume
    /// hours over a window (`--csv` for CSV).
    Usage(crate::usage::OpsUsageArgs),
    /// Hosts of a provider, and their drains.
    #[command(subcommand)]
    Host(OpsHost),
    /// Where a VM runs, and moving it.
    #[command(subcommand)]
    Vm(OpsVm),
}

/// `hcp ops host`.
#[derive(Subcommand, Debug)]
pub enum OpsHost {
    /// The provider's hosts, with what is placed on each.
    List { provider: String },
    /// No new placements; move every VM off as jobs.
    Drain { provider: String, host: String },
    /// Back in service.
    Undrain { provider: String, host: String },
}

/// `hcp ops vm`.
#[derive(Subcommand, Debug)]
pub enum OpsVm {
    /// A VM with its provider and host.
    Show { vm: String },
    /// Move a VM to another host (a job; placement picks the host unless named).
    Migrate {
        vm: String,
        /// The target host.
        #[arg(long)]
        to: Option<String>,
        /// A cold move (the VM must be stopped); default: live for a running VM.
        #[arg(long)]
        cold: bool,
    },
    /// VMs of every tenant, filtered; `-o json` adds the counts.
    List(Box<FleetFilters>),
    /// Start a tenant's VM (a job; its history names you).
    Start { vm: String },
    /// Stop a tenant's VM (a job).
    Stop {
        vm: String,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets before power-off (0: the provider's default).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
    },
    /// Reboot a tenant's VM (a job).
    Reboot {
        vm: String,
        /// Reset instead of asking the guest.
        #[arg(long)]
        hard: bool,
    },
    /// Delete a tenant's VM (a job).
    Delete { vm: String },
    /// Set a VM's state by hand (ACTIVE, STOPPED or ERROR), after asking its provider.
    ResetState {
        vm: String,
        status: String,
        /// Why (recorded in the audit trail).
        #[arg(long)]
        reason: String,
        /// Even when the provider reports otherwise or cannot be asked.
        #[arg(long)]
        force: bool,
    },
    /// Remove a VM whose provider or host is gone for good (quota released, volumes kept).
    ForceDelete {
        vm: String,
        /// Why (recorded in the audit trail and with the leftover).
        #[arg(long)]
        reason: String,
        /// End a job in flight on it instead of refusing.
        #[arg(long)]
        force: bool,
        /// The provider-side VM is known gone: record no leftover.
        #[arg(long)]
        no_leftover: bool,
    },
    /// What force-deleted VMs left on providers, and whether the reconciler cleaned it.
    Leftovers {
        /// Only of this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only those not cleaned yet.
        #[arg(long)]
        open: bool,
    },
}

/// The filters of `hcp ops vm list`.
#[derive(Args, Debug)]
pub struct FleetFilters {
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    zone: Option<String>,
    /// ACTIVE, STOPPED, ERROR, DELETED, ...
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    flavor: Option<String>,
    /// Names starting with this.
    #[arg(long)]
    name_prefix: Option<String>,
    /// RFC 3339.
    #[arg(long)]
    created_before: Option<String>,
    /// RFC 3339.
    #[arg(long)]
    created_after: Option<String>,
    /// In ERROR for at least this many minutes.
    #[arg(long)]
    error_for_minutes: Option<u32>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

/// `hcp ops provider`.
#[derive(Subcommand, Debug)]
pub enum OpsProvider {
    /// Registered providers and their health.
    List,
    /// One provider, with its capabilities.
    Show { provider: String },
}

/// `hcp ops flavor`.
#[derive(Subcommand, Debug)]
pub enum OpsFlavor {
    /// Add a flavor.
    Create {
        name: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u32,
        #[arg(long)]
        disk_gib: u32,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove a flavor no VM uses.
    Delete { name: String },
}

/// `hcp ops volume-type`.
#[derive(Subcommand, Debug)]
pub enum OpsVolumeType {
    /// Add a volume type.
    Create {
        name: String,
        /// The largest volume of the type, in GiB.
        #[arg(long)]
        max_size_gib: u32,
        /// Where its volumes live on a provider: `PROVIDER=STORAGE` (a libvirt
        /// pool, a Proxmox storage, a datastore, a directory; repeatable).
        #[arg(long = "storage")]
        storage: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove a volume type no volume uses.
    Delete { name: String },
}

/// `hcp ops image`.
#[derive(Subcommand, Debug)]
pub enum OpsImage {
    /// Add an image that providers already have (a template, a base file).
    Create {
        name: String,
        /// What every provider without its own --backing resolves.
        #[arg(long, default_value = "")]
        source: String,
        /// What one provider resolves: `PROVIDER=SOURCE` (repeatable).
        #[arg(long = "backing")]
        backings: Vec<String>,
        #[arg(long, default_value = "linux")]
        os_type: String,
        #[arg(long, default_value = "")]
        os_version: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Fetch an image from a URL (under core's egress policy), verify its
    /// SHA-256, convert it, and store it on providers.
    Import {
        name: String,
        /// http(s) URL of the file.
        #[arg(long)]
        url: String,
        /// SHA-256 of the file, hex.
        #[arg(long)]
        sha256: String,
        /// qcow2, raw, vmdk, vhdx or ova.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// A provider to store it on (repeatable).
        #[arg(long = "provider", required = true)]
        providers: Vec<String>,
        #[arg(long, default_value = "linux")]
        os_type: String,
        #[arg(long, default_value = "")]
        os_version: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Set what one provider resolves an image to (an empty --source removes it).
    Backing {
        name: String,
        #[arg(long)]
        provider: String,
        #[arg(long, default_value = "")]
        source: String,
    },
    /// Remove an image (a job removes what providers stored).
    Delete {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Images with their backings (the operator's view, every project's).
    List,
}

/// `hcp ops zone`.
#[derive(Subcommand, Debug)]
pub enum OpsZone {
    /// Add a zone.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove an empty zone.
    Delete { name: String },
}

/// `hcp ops quota`.
#[derive(Subcommand, Debug)]
pub enum OpsQuota {
    /// A project's limits and use.
    Show { tenant: String, project: String },
    /// Set a project's limits (omitted ones are unlimited).
    Set {
        tenant: String,
        project: String,
        #[arg(long)]
        max_instances: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
    },
    /// Change some limits and keep the others.
    Update {
        tenant: String,
        project: String,
        #[arg(long)]
        max_instances: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// Make a limit unlimited: max_instances, max_vcpus or max_memory_mib (repeatable).
        #[arg(long)]
        unlimited: Vec<String>,
    },
}

/// `hcp ops network` (list with `hcp catalog networks`).
#[derive(Subcommand, Debug)]
pub enum OpsNetwork {
    /// Add a network to a zone (refused if the zone has one of that name).
    Create {
        zone: String,
        name: String,
        /// PROVIDER=BACKING: what the network is on that provider (repeatable).
        #[arg(long = "backing")]
        backings: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Replace an existing network's description and backings, for VMs
    /// created from now on (VMs attached keep theirs).
    Replace {
        zone: String,
        name: String,
        /// PROVIDER=BACKING (repeatable); the backings are replaced whole.
        #[arg(long = "backing")]
        backings: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove a network no VM uses.
    Delete { zone: String, name: String },
}

/// `max_vcpus` as JSON spells it in a field mask: `maxVcpus`.
fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        match (c, up) {
            ('_', _) => up = true,
            (c, true) => {
                out.push(c.to_ascii_uppercase());
                up = false;
            }
            (c, false) => out.push(c),
        }
    }
    out
}

pub(crate) fn pairs(items: &[String], flag: &str) -> anyhow::Result<Map<String, Value>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .with_context(|| format!("{flag} wants KEY=VALUE, got {kv:?}"))
        })
        .collect()
}

/// `--wait` gave up; the job goes on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WaitTimeout(String);

/// Runs `f` on a fresh runtime and turns its error into the exit status:
/// the API's code, message and field on stderr, exit 1 (3 when `--wait`
/// gave up while the job goes on).
#[allow(clippy::print_stderr)]
pub fn run<F: Future<Output = anyhow::Result<()>>>(f: impl FnOnce() -> F) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    if let Err(e) = runtime.block_on(f()) {
        let mut text = format!("error: {e}");
        for cause in e.chain().skip(1) {
            text.push_str(&format!(": {cause}"));
        }
        eprintln!("{text}");
        std::process::exit(if e.downcast_ref::<WaitTimeout>().is_some() { EXIT_WAIT_TIMEOUT } else { 1 });
    }
    Ok(())
}

/// A serial console in this terminal. The process ends here: the terminal's
/// reader is a blocking read that nothing can cancel, so waiting for the
/// runtime to wind down would wait for a key press.
#[allow(clippy::print_stderr)]
async fn serial_terminal(url: &str) -> anyhow::Result<()> {
    match crate::serial::session(url).await? {
        crate::serial::Ended::ByUser => {
            eprint!("\r\nLeft the serial console.\r\n");
            std::process::exit(0)
        }
        crate::serial::Ended::ByServer(1000, _) => {
            eprint!("\r\nThe serial console ended.\r\n");
            std::process::exit(0)
        }
        crate::serial::Ended::ByServer(code, reason) => {
            eprint!("\r\nerror: the serial console ended: {reason} (close code {code})\r\n");
            std::process::exit(1)
        }
    }
}

/// Writes text as it is (a console log keeps its own line ends).
#[allow(clippy::print_stdout)]
fn print_raw(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(text.as_bytes());
    if !text.is_empty() && !text.ends_with('\n') {
        let _ = stdout.write_all(b"\n");
    }
    let _ = stdout.flush();
}

/// `hcp vm ...`.
pub async fn vm(common: Common, cmd: Vm) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    let vms = format!("{T}/projects/{}/vms", c.project()?);
    let accepted = |v: Value, wait: Wait, vm_path: Option<String>| {
        let c = &c;
        async move { finish(c, out, v, wait, vm_path).await }
    };
    let cmd = match cmd {
        Vm::Show { vm } => Vm::Show { vm: resolve(&c, &vms, &vm).await? },
        Vm::Update { vm, name, tags, metadata } => {
            Vm::Update { vm: resolve(&c, &vms, &vm).await?, name, tags, metadata }
        }
        Vm::Start { vm, wait } => Vm::Start { vm: resolve(&c, &vms, &vm).await?, wait },
        Vm::Stop { vm, force, wait } => Vm::Stop { vm: resolve(&c, &vms, &vm).await?, force, wait },
        Vm::Reboot { vm, hard, wait } => Vm::Reboot { vm: resolve(&c, &vms, &vm).await?, hard, wait },
        Vm::Resize { vm, flavor, wait } => Vm::Resize { vm: resolve(&c, &vms, &vm).await?, flavor, wait },
        Vm::Delete { vm, wait } => Vm::Delete { vm: resolve(&c, &vms, &vm).await?, wait },
        Vm::Console { vm, kind } => Vm::Console { vm: resolve(&c, &vms, &vm).await?, kind },
        Vm::ConsoleLog { vm, tail } => Vm::ConsoleLog { vm: resolve(&c, &vms, &vm).await?, tail },
        Vm::Capture { vm, image, description, wait } => {
            Vm::Capture { vm: resolve(&c, &vms, &vm).await?, image, description, wait }
        }
        Vm::Snapshot(Snapshot::List { vm }) => {
            Vm::Snapshot(Snapshot::List { vm: resolve(&c, &vms, &vm).await? })
        }
        Vm::Snapshot(Snapshot::Create { vm, name, wait }) => {
            Vm::Snapshot(Snapshot::Create { vm: resolve(&c, &vms, &vm).await?, name, wait })
        }
        Vm::Snapshot(Snapshot::Revert { vm, snapshot, wait }) => {
            Vm::Snapshot(Snapshot::Revert { vm: resolve(&c, &vms, &vm).await?, snapshot, wait })
        }
        Vm::Snapshot(Snapshot::Delete { vm, snapshot, wait }) => {
            Vm::Snapshot(Snapshot::Delete { vm: resolve(&c, &vms, &vm).await?, snapshot, wait })
        }
        other => other,
    };
    match cmd {
        Vm::List { status, tag } => {
            let mut query: Vec<String> = status.map(|s| format!("status={}", enc(&s))).into_iter().collect();
            query.extend(tag.iter().map(|t| format!("tag={}", enc(t))));
            let mut all: Vec<Value> = Vec::new();
            let mut page = String::new();
            loop {
                let mut q = query.clone();
                if !page.is_empty() {
                    q.push(format!("page_token={}", enc(&page)));
                }
                let path = if q.is_empty() { vms.clone() } else { format!("{vms}?{}", q.join("&")) };
                let v = c.call("GET", &path, None).await?;
                all.extend(v["vms"].as_array().cloned().unwrap_or_default());
                page = v["next_page_token"].as_str().unwrap_or_default().to_owned();
                if page.is_empty() {
                    break;
                }
            }
            output::print(out, &json!({"vms": all}), Some("vms"), VM_COLUMNS);
        }
        Vm::Show { vm } => {
            output::print(out, &c.call("GET", &format!("{vms}/{vm}"), None).await?, None, VM_COLUMNS)
        }
        Vm::Create {
            name,
            flavor,
            image,
            zone,
            networks,
            tags,
            metadata,
            user_data_file,
            placement_group,
            restart_policy,
            keys,
            wait,
        } => {
            let mut body = json!({"name": name, "flavor": flavor, "image": image, "tags": tags,
                                  "metadata": pairs(&metadata, "--meta")?});
            if !keys.is_empty() {
                body["key_names"] = json!(keys);
            }
            if let Some(g) = placement_group {
                body["placement_group_id"] = json!(g);
            }
            if let Some(p) = restart_policy {
                body["restart_policy"] = json!(p.replace('-', "_").to_ascii_uppercase());
            }
            if let Some(z) = zone {
                body["zone"] = json!(z);
            }
            if !networks.is_empty() {
                body["networks"] = json!(networks.iter().map(|n| json!({"network": n})).collect::<Vec<_>>());
            }
            if let Some(f) = user_data_file {
                body["user_data"] = json!(
                    std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?
                );
            }
            let v = c.call("POST", &vms, Some(&body)).await?;
            let path = v["vm_id"].as_str().map(|id| format!("{vms}/{id}"));
            accepted(v, wait, path).await?;
        }
        Vm::Update { vm, name, tags, metadata } => {
            let mut body = Map::new();
            let mut mask = Vec::new();
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
                mask.push("name");
            }
            if let Some(t) = tags {
                body.insert("tags".into(), json!(t));
                mask.push("tags");
            }
            if let Some(m) = metadata {
                body.insert("metadata".into(), Value::Object(pairs(&m, "--meta")?));
                mask.push("metadata");
            }
            anyhow::ensure!(!mask.is_empty(), "nothing to update: give --name, --tag or --meta");
            body.insert("update_mask".into(), json!(mask.join(",")));
            let v = c.call("PATCH", &format!("{vms}/{vm}"), Some(&Value::Object(body))).await?;
            output::print(out, &v, None, VM_COLUMNS);
        }
        Vm::Start { vm, wait } => {
            let v = c.call("POST", &format!("{vms}/{vm}:start"), Some(&json!({}))).await?;
            accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
        }
        Vm::Stop { vm, force, wait } => {
            let v = c.call("POST", &format!("{vms}/{vm}:stop"), Some(&json!({"force": force}))).await?;
            accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
        }
        Vm::Reboot { vm, hard, wait } => {
            let kind = if hard { "HARD" } else { "SOFT" };
            let v = c.call("POST", &format!("{vms}/{vm}:reboot"), Some(&json!({"type": kind}))).await?;
            accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
        }
        Vm::Resize { vm, flavor, wait } => {
            let v = c.call("POST", &format!("{vms}/{vm}:resize"), Some(&json!({"flavor": flavor}))).await?;
            accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
        }
        Vm::Delete { vm, wait } => {
            let v = c.call("DELETE", &format!("{vms}/{vm}"), None).await?;
            accepted(v, wait, None).await?;
        }
        Vm::Console { vm, kind } => {
            let v = c.call("POST", &format!("{vms}/{vm}:console"), Some(&json!({"type": kind}))).await?;
            if kind == "serial" && out == output::Format::Table {
                let url = v["url"].as_str().unwrap_or_default().to_owned();
                return serial_terminal(&url).await;
            }
            output::print(out, &v, None, &["type", "expires_at", "web_url", "address", "url"]);
        }
        Vm::ConsoleLog { vm, tail } => {
            let v = c.call("GET", &format!("{vms}/{vm}/console-log?tail_lines={tail}"), None).await?;
            if out == output::Format::Table {
                print_raw(v["output"].as_str().unwrap_or_default());
            } else {
                output::print(out, &v, None, &["lines", "truncated"]);
            }
        }
        Vm::Capture { vm, image, description, wait } => {
            let body = json!({"image_name": image, "description": description});
            let v = c.call("POST", &format!("{vms}/{vm}:capture"), Some(&body)).await?;
            let project = c.project()?;
            let show =
                (format!("/api/hcp/common/v1/images/{image}?project_id={project}"), crate::image::COLUMNS);
            finish_showing(&c, out, v, wait, &["vm_id", "job_id", "image_id"], Some(show)).await?;
        }
        Vm::Snapshot(s) => {
            let cols = &["snapshot_id", "name", "status", "created_at"];
            match s {
                Snapshot::List { vm } => {
                    let v = c.call("GET", &format!("{vms}/{vm}/snapshots"), None).await?;
                    output::print(out, &v, Some("snapshots"), cols);
                }
                Snapshot::Create { vm, name, wait } => {
                    let v = c
                        .call("POST", &format!("{vms}/{vm}/snapshots"), Some(&json!({"name": name})))
                        .await?;
                    accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
                }
                Snapshot::Revert { vm, snapshot, wait } => {
                    let path = format!("{vms}/{vm}/snapshots/{snapshot}:revert");
                    let v = c.call("POST", &path, Some(&json!({}))).await?;
                    accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
                }
                Snapshot::Delete { vm, snapshot, wait } => {
                    let v = c.call("DELETE", &format!("{vms}/{vm}/snapshots/{snapshot}"), None).await?;
                    accepted(v, wait, Some(format!("{vms}/{vm}"))).await?;
                }
            }
        }
    }
    Ok(())
}

/// Percent-encodes a query value.
pub fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether an error is worth another try while following a job: the
/// gateway or core is busy or briefly unreachable.
fn transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<crate::client::ApiFailure>() {
        Some(f) => matches!(f.status, 429 | 502 | 503 | 504),
        None => true,
    }
}

/// Exit status of a `--wait` that gave up while the job goes on.
pub const EXIT_WAIT_TIMEOUT: i32 = 3;

/// A VM by id, or by name when the argument is not a UUID (the one VM of
/// that name in the project that is not deleted).
async fn resolve(c: &Client, vms: &str, vm: &str) -> anyhow::Result<String> {
    resolve_named(c, vms, vm, Named::VM).await
}

/// What [`resolve_named`] looks for: the list's key, the id's key and
/// the resource's name for messages.
pub(crate) struct Named {
    pub list: &'static str,
    pub id: &'static str,
    pub what: &'static str,
}

impl Named {
    const VM: Named = Named { list: "vms", id: "vm_id", what: "VM" };
}

/// An id given as it is, or the one resource of `path`'s list named so.
pub(crate) async fn resolve_named(c: &Client, path: &str, name: &str, n: Named) -> anyhow::Result<String> {
    let (vms, vm) = (path, name);
    if uuid::Uuid::parse_str(vm).is_ok() {
        return Ok(vm.to_owned());
    }
    let mut found = Vec::new();
    let mut page = String::new();
    loop {
        let path = if page.is_empty() { vms.to_owned() } else { format!("{vms}?page_token={}", enc(&page)) };
        let v = c.call("GET", &path, None).await?;
        for item in v[n.list].as_array().into_iter().flatten() {
            if item["name"] == vm && item["status"] != "DELETED" {
                found.push(item[n.id].as_str().unwrap_or_default().to_owned());
            }
        }
        page = v["next_page_token"].as_str().unwrap_or_default().to_owned();
        if page.is_empty() {
            break;
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("no {} named {vm:?} in project {}", n.what, c.project),
        many => anyhow::bail!("{} {}s are named {vm:?}; use an id: {}", many.len(), n.what, many.join(", ")),
    }
}

/// After an accepted operation: print what was accepted, or follow the job
/// and print the VM as it ended.
async fn finish(
    c: &Client,
    out: Format,
    accepted: Value,
    wait: Wait,
    vm_path: Option<String>,
) -> anyhow::Result<()> {
    let show = vm_path.map(|p| (p, VM_COLUMNS));
    finish_showing(c, out, accepted, wait, &["vm_id", "job_id", "snapshot_id"], show).await
}

/// Prints an accepted operation (its `columns`), or with `--wait` follows
/// its job and prints what `show` names (a path and its columns), else the
/// job.
pub(crate) async fn finish_showing(
    c: &Client,
    out: Format,
    accepted: Value,
    wait: Wait,
    columns: &[&str],
    show: Option<(String, &[&str])>,
) -> anyhow::Result<()> {
    if !wait.wait {
        output::print(out, &accepted, None, columns);
        return Ok(());
    }
    let job = accepted["job_id"].as_str().context("the answer names no job")?.to_owned();
    let done = follow(c, &job, Duration::from_secs(wait.timeout)).await?;
    match show {
        Some((path, cols)) => output::print(out, &c.call("GET", &path, None).await?, None, cols),
        None => output::print(out, &done, None, JOB_COLUMNS),
    }
    Ok(())
}

/// Follows a tenant's job to its end; an error when it failed or was
/// cancelled.
async fn follow(c: &Client, job: &str, timeout: Duration) -> anyhow::Result<Value> {
    follow_path(c, &format!("{T}/jobs/{job}"), timeout).await
}

/// Follows the job at `path` (a tenant's or, for operators' own jobs,
/// `/api/hcp/ops/v1/jobs/{id}`) to its end.
pub(crate) async fn follow_path(c: &Client, path: &str, timeout: Duration) -> anyhow::Result<Value> {
    let job = path.rsplit('/').next().unwrap_or(path).to_owned();
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut last = String::new();
    let mut tick = 0usize;
    loop {
        let j = match c.call("GET", path, None).await {
            Ok(j) => j,
            Err(e) if transient(&e) && started.elapsed() < timeout => {
                tracing::debug!(error = %e, "following the job: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let status = j["status"].as_str().unwrap_or("?").to_owned();
        let kind = j["kind"].as_str().unwrap_or("job");
        let attempts = format!("attempt {}/{}", j["attempts"], j["max_attempts"]);
        let elapsed = started.elapsed().as_secs_f64();
        let finished = matches!(status.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED");
        let mut err = std::io::stderr().lock();
        if tty {
            if finished {
                let mark = if status == "SUCCEEDED" { '✓' } else { '✗' };
                let _ = writeln!(err, "\r\x1b[2K{mark} {kind} {status} in {elapsed:.1}s");
            } else {
                tick += 1;
                let _ = write!(
                    err,
                    "\r\x1b[2K{} {kind} {status} {attempts} {elapsed:.1}s",
                    spinner[tick % spinner.len()]
                );
            }
            let _ = err.flush();
        } else if status != last || finished {
            let _ = writeln!(
                err,
                "job {job} {kind} {status}{}",
                if finished { format!(" ({elapsed:.1}s)") } else { String::new() }
            );
        }
        drop(err);
        last = status.clone();
        match status.as_str() {
            "SUCCEEDED" => return Ok(j),
            "FAILED" | "CANCELLED" => {
                anyhow::bail!(
                    "job {job} {status}: {}: {}",
                    j["error"]["code"].as_str().or(j["error_code"].as_str()).unwrap_or("-"),
                    j["error"]["message"].as_str().or(j["error_message"].as_str()).unwrap_or("-")
                )
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            return Err(
                WaitTimeout(format!("job {job} is still {status} after {timeout:?}; it goes on")).into()
            );
        }
        tokio::time::sleep(Duration::from_millis(if tty { 100 } else { 250 })).await;
    }
}

/// `hcp job ...`.
pub async fn job(common: Common, cmd: Job) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    match cmd {
        Job::List { vm } => {
            let p = c.project()?;
            let path = match vm {
                Some(vm) => {
                    let vm = resolve(&c, &format!("{T}/projects/{p}/vms"), &vm).await?;
                    format!("{T}/projects/{p}/vms/{vm}/jobs")
                }
                None => format!("{T}/projects/{p}/jobs"),
            };
            output::print(out, &c.call("GET", &path, None).await?, Some("jobs"), JOB_COLUMNS);
        }
        Job::Show { job } => {
            output::print(out, &c.call("GET", &format!("{T}/jobs/{job}"), None).await?, None, JOB_COLUMNS)
        }
        Job::Watch { job, timeout } => {
            let j = follow(&c, &job, Duration::from_secs(timeout)).await?;
            output::print(out, &j, None, JOB_COLUMNS);
        }
        Job::Cancel { job } => output::print(
            out,
            &c.call("POST", &format!("{T}/jobs/{job}:cancel"), Some(&json!({}))).await?,
            None,
            JOB_COLUMNS,
        ),
    }
    Ok(())
}

/// `hcp catalog ...`.
pub async fn catalog(common: Common, cmd: Catalog) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let (what, cols): (&str, &[&str]) = match cmd {
        Catalog::Flavors => ("flavors", &["name", "vcpus", "memory_mib", "disk_gib", "description"]),
        Catalog::Images => ("images", &["name", "os_type", "description"]),
        Catalog::Zones => ("zones", &["name", "description"]),
        Catalog::Networks => ("networks", &["name", "zone", "description"]),
        Catalog::VolumeTypes => ("volume-types", &["name", "max_size_gib", "description"]),
    };
    let v = c.call("GET", &format!("/api/hcp/common/v1/{what}"), None).await?;
    output::print(common.output, &v, Some(&what.replace('-', "_")), cols);
    Ok(())
}

/// `hcp ops ...`.
pub async fn ops(common: Common, cmd: Ops) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    const O: &str = "/api/hcp/ops/v1";
    let provider_cols: &[&str] = &["provider_id", "name", "zone", "hypervisor", "health", "health_message"];
    let quota_cols: &[&str] = &[
        "tenant_id",
        "project_id",
        "max_instances",
        "usage.instances",
        "max_vcpus",
        "usage.vcpus",
        "max_memory_mib",
        "usage.memory_mib",
    ];
    match cmd {
        Ops::Provider(OpsProvider::List) => output::print(
            out,
            &c.call("GET", &format!("{O}/providers"), None).await?,
            Some("providers"),
            provider_cols,
        ),
        Ops::Provider(OpsProvider::Show { provider }) => output::print(
            out,
            &c.call("GET", &format!("{O}/providers/{provider}"), None).await?,
            None,
            provider_cols,
        ),
        Ops::Quota(OpsQuota::Show { tenant, project }) => {
            let v = c.call("GET", &format!("{O}/tenants/{tenant}/projects/{project}/quota"), None).await?;
            output::print(out, &v, None, quota_cols);
        }
        Ops::Quota(OpsQuota::Set { tenant, project, max_instances, max_vcpus, max_memory_mib }) => {
            let mut body = Map::new();
            if let Some(n) = max_instances {
                body.insert("max_instances".into(), json!(n));
            }
            if let Some(n) = max_vcpus {
                body.insert("max_vcpus".into(), json!(n));
            }
            if let Some(n) = max_memory_mib {
                body.insert("max_memory_mib".into(), json!(n));
            }
            let path = format!("{O}/tenants/{tenant}/projects/{project}/quota");
            output::print(out, &c.call("PUT", &path, Some(&Value::Object(body))).await?, None, quota_cols);
        }
        Ops::Quota(OpsQuota::Update {
            tenant,
            project,
            max_instances,
            max_vcpus,
            max_memory_mib,
            unlimited,
        }) => {
            let mut body = Map::new();
            let mut mask = Vec::new();
            for (name, value) in [
                ("max_instances", max_instances.map(u64::from)),
                ("max_vcpus", max_vcpus.map(u64::from)),
                ("max_memory_mib", max_memory_mib),
            ] {
                if let Some(n) = value {
                    body.insert(name.into(), json!(n));
                    mask.push(name.to_owned());
                }
            }
            mask.extend(unlimited);
            // A FieldMask in JSON names fields in lowerCamelCase.
            let mask: Vec<String> = mask.iter().map(|m| camel(m)).collect();
            body.insert("update_mask".into(), json!(mask.join(",")));
            let path = format!("{O}/tenants/{tenant}/projects/{project}/quota");
            output::print(out, &c.call("PATCH", &path, Some(&Value::Object(body))).await?, None, quota_cols);
        }
        Ops::Network(cmd) => {
            let cols: &[&str] = &["zone", "name", "description", "backings"];
            match cmd {
                OpsNetwork::Create { zone, name, backings, description } => {
                    let body = json!({"zone": zone, "name": name, "description": description,
                        "backings": pairs(&backings, "--backing")?});
                    output::print(
                        out,
                        &c.call("POST", &format!("{O}/networks"), Some(&body)).await?,
                        None,
                        cols,
                    );
                }
                OpsNetwork::Replace { zone, name, backings, description } => {
                    let body =
                        json!({"description": description, "backings": pairs(&backings, "--backing")?});
                    let path = format!("{O}/zones/{}/networks/{}", enc(&zone), enc(&name));
                    let v = c.call("PUT", &path, Some(&body)).await?;
                    output::print(
                        out,
                        &v,
                        None,
                        &["network.name", "network.zone", "attached_vms", "applies_to"],
                    );
                }
                OpsNetwork::Delete { zone, name } => {
                    let path = format!("{O}/zones/{}/networks/{}", enc(&zone), enc(&name));
                    c.call("DELETE", &path, None).await?;
                }
            }
        }
        Ops::Audit { resource, action, limit } => {
            let mut q = vec![format!("page_size={limit}")];
            q.extend(resource.map(|r| format!("resource_id={}", enc(&r))));
            q.extend(action.map(|a| format!("action={}", enc(&a))));
            let v = c.call("GET", &format!("{O}/audit-events?{}", q.join("&")), None).await?;
            output::print(
                out,
                &v,
                Some("events"),
                &["at", "actor", "tenant_id", "action", "resource_id", "outcome"],
            );
        }
        Ops::Flavor(OpsFlavor::Create { name, vcpus, memory_mib, disk_gib, description }) => {
            let body = json!({"name": name, "vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib,
                              "description": description});
            let v = c.call("POST", &format!("{O}/flavors"), Some(&body)).await?;
            output::print(out, &v, None, &["name", "vcpus", "memory_mib", "disk_gib", "description"]);
        }
        Ops::Flavor(OpsFlavor::Delete { name }) => {
            c.call("DELETE", &format!("{O}/flavors/{name}"), None).await?;
        }
        Ops::VolumeType(OpsVolumeType::Create { name, max_size_gib, storage, description }) => {
            let body = json!({"name": name, "max_size_gib": max_size_gib, "description": description,
                              "storage": pairs(&storage, "--storage")?});
            let v = c.call("POST", &format!("{O}/volume-types"), Some(&body)).await?;
            output::print(out, &v, None, &["name", "max_size_gib", "storage", "description"]);
        }
        Ops::VolumeType(OpsVolumeType::Delete { name }) => {
            c.call("DELETE", &format!("{O}/volume-types/{name}"), None).await?;
        }
        Ops::Image(OpsImage::Create { name, source, backings, os_type, os_version, description }) => {
            let body = json!({"name": name, "source": source, "backings": pairs(&backings, "--backing")?,
                              "os_type": os_type, "os_version": os_version, "description": description});
            let v = c.call("POST", &format!("{O}/images"), Some(&body)).await?;
            output::print(out, &v, None, OPS_IMAGE_COLUMNS);
        }
        Ops::Image(OpsImage::Import {
            name,
            url,
            sha256,
            format,
            providers,
            os_type,
            os_version,
            description,
            wait,
        }) => {
            let body = json!({"name": name, "url": url, "sha256": sha256, "format": format,
                              "providers": providers, "os_type": os_type, "os_version": os_version,
                              "description": description});
            let v = c.call("POST", &format!("{O}/images:import"), Some(&body)).await?;
            if wait.wait {
                let job = v["job_id"].as_str().unwrap_or_default();
                follow_path(&c, &format!("{O}/jobs/{job}"), Duration::from_secs(wait.timeout)).await?;
                let image = c.call("GET", &format!("/api/hcp/common/v1/images/{name}"), None).await?;
                output::print(out, &image, None, OPS_IMAGE_COLUMNS);
            } else {
                output::print(out, &v, None, &["image_id", "job_id", "name"]);
            }
        }
        Ops::Image(OpsImage::Backing { name, provider, source }) => {
            let body = json!({"source": source});
            let v = c.call("PUT", &format!("{O}/images/{name}/backings/{provider}"), Some(&body)).await?;
            output::print(out, &v, None, OPS_IMAGE_COLUMNS);
        }
        Ops::Image(OpsImage::Delete { name, wait }) => {
            let v = c.call("DELETE", &format!("{O}/images/{name}"), None).await?;
            match v["job_id"].as_str().filter(|j| !j.is_empty()) {
                Some(job) if wait.wait => {
                    follow_path(&c, &format!("{O}/jobs/{job}"), Duration::from_secs(wait.timeout)).await?;
                }
                Some(_) => output::print(out, &v, None, &["job_id"]),
                None => {}
            }
        }
        Ops::Image(OpsImage::List) => {
            let v = c.call("GET", "/api/hcp/common/v1/images", None).await?;
            output::print(out, &v, Some("images"), OPS_IMAGE_COLUMNS);
        }
        Ops::Zone(OpsZone::Create { name, description }) => {
            let v = c
                .call("POST", &format!("{O}/zones"), Some(&json!({"name": name, "description": description})))
                .await?;
            output::print(out, &v, None, &["name", "description"]);
        }
        Ops::Zone(OpsZone::Delete { name }) => {
            c.call("DELETE", &format!("{O}/zones/{name}"), None).await?;
        }
        Ops::Host(cmd) => {
            let cols =
                &["name", "state", "drain", "vms", "used_vcpus", "vcpus", "used_memory_mib", "memory_mib"];
            let (method, path) = match &cmd {
                OpsHost::List { provider } => ("GET", format!("{O}/providers/{provider}/hosts")),
                OpsHost::Drain { provider, host } => {
                    ("POST", format!("{O}/providers/{provider}/hosts/{}:drain", enc(host)))
                }
                OpsHost::Undrain { provider, host } => {
                    ("POST", format!("{O}/providers/{provider}/hosts/{}:undrain", enc(host)))
                }
            };
            let body = (method == "POST").then(|| json!({}));
            let v = c.call(method, &path, body.as_ref()).await?;
            let items = matches!(cmd, OpsHost::List { .. }).then_some("hosts");
            output::print(out, &v, items, cols);
        }
        Ops::Vm(OpsVm::Show { vm }) => {
            let v = c.call("GET", &format!("{O}/vms/{vm}"), None).await?;
            let cols =
                &["vm_id", "tenant_id", "name", "status", "provider_id", "host", "restart_policy", "job_id"];
            output::print(out, &v, None, cols);
        }
        Ops::Vm(OpsVm::Migrate { vm, to, cold }) => {
            let mut body = json!({});
            if let Some(h) = to {
                body["target_host"] = json!(h);
            }
            if cold {
                body["live"] = json!(false);
            }
            let v = c.call("POST", &format!("{O}/vms/{vm}:migrate"), Some(&body)).await?;
            output::print(out, &v, None, &["vm_id", "job_id"]);
        }
        Ops::Usage(args) => crate::usage::ops(&c, out, args).await?,
        Ops::CancelJob { job } => {
            let v = c.call("POST", &format!("{O}/jobs/{job}:cancel"), Some(&json!({}))).await?;
            output::print(out, &v, None, &["job_id", "tenant_id", "kind", "status", "cancel_requested"]);
        }
        Ops::Vm(OpsVm::List(f)) => {
            let f = *f;
            let mut q = vec![format!("page_size={}", f.limit)];
            for (name, value) in [
                ("tenant_id", f.tenant),
                ("project_id", f.project),
                ("provider_id", f.provider),
                ("host", f.host),
                ("zone", f.zone),
                ("status", f.status),
                ("image", f.image),
                ("flavor", f.flavor),
                ("name_prefix", f.name_prefix),
                ("created_before", f.created_before),
                ("created_after", f.created_after),
                ("error_for_minutes", f.error_for_minutes.map(|n| n.to_string())),
            ] {
                q.extend(value.map(|v| format!("{name}={}", enc(&v))));
            }
            let v = c.call("GET", &format!("{O}/vms?{}", q.join("&")), None).await?;
            let cols =
                &["vm_id", "tenant_id", "project_id", "name", "status", "provider_id", "host", "job_id"];
            output::print(out, &v, Some("vms"), cols);
        }
        Ops::Vm(
            cmd @ (OpsVm::Start { .. } | OpsVm::Stop { .. } | OpsVm::Reboot { .. } | OpsVm::Delete { .. }),
        ) => {
            let (method, path, body) = match cmd {
                OpsVm::Start { vm } => ("POST", format!("{O}/vms/{vm}:start"), Some(json!({}))),
                OpsVm::Stop { vm, force, timeout } => (
                    "POST",
                    format!("{O}/vms/{vm}:stop"),
                    Some(json!({"force": force, "timeout_seconds": timeout})),
                ),
                OpsVm::Reboot { vm, hard } => {
                    ("POST", format!("{O}/vms/{vm}:reboot"), Some(json!({"hard": hard})))
                }
                OpsVm::Delete { vm } => ("DELETE", format!("{O}/vms/{vm}"), None),
                _ => unreachable!("matched above"),
            };
            let v = c.call(method, &path, body.as_ref()).await?;
            output::print(out, &v, None, &["vm_id", "job_id"]);
        }
        Ops::Vm(OpsVm::ResetState { vm, status, reason, force }) => {
            let body = json!({"status": status.to_uppercase(), "reason": reason, "force": force});
            let v = c.call("POST", &format!("{O}/vms/{vm}:reset-state"), Some(&body)).await?;
            output::print(out, &v, None, &["vm.vm_id", "vm.status", "provider_state", "forced"]);
        }
        Ops::Vm(OpsVm::ForceDelete { vm, reason, force, no_leftover }) => {
            let body = json!({"reason": reason, "force": force, "leftover": !no_leftover});
            let v = c.call("POST", &format!("{O}/vms/{vm}:force-delete"), Some(&body)).await?;
            let cols = &["vm.vm_id", "vm.status", "ended_job_id", "detached_volumes", "leftover_recorded"];
            output::print(out, &v, None, cols);
        }
        Ops::Vm(OpsVm::Leftovers { provider, open }) => {
            let mut q = vec![format!("open_only={open}")];
            q.extend(provider.map(|p| format!("provider_id={}", enc(&p))));
            let v = c.call("GET", &format!("{O}/vm-leftovers?{}", q.join("&")), None).await?;
            let cols = &[
                "vm_id",
                "provider_id",
                "host",
                "tenant_id",
                "recorded_by",
                "recorded_at",
                "cleaned_at",
                "cleaned_how",
            ];
            output::print(out, &v, Some("leftovers"), cols);
        }
        Ops::Job { job } => {
            let v = c.call("GET", &format!("{O}/jobs/{job}"), None).await?;
            let cols = &[
                "job_id",
                "tenant_id",
                "kind",
                "status",
                "vm_id",
                "attempts",
                "error_code",
                "error_message",
            ];
            output::print(out, &v, None, cols);
        }
    }
    Ok(())
}
