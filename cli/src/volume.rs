//! `hcp volume`: a project's volumes, attached to and detached from its
//! VMs, over the REST API like the rest of the everyday commands.

use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::client::Client;
use crate::human::{Common, Named, T, Wait, finish_showing, pairs, resolve_named};
use crate::output;

const COLUMNS: &[&str] =
    &["volume_id", "name", "status", "size_gib", "volume_type", "zone", "attachments.0.vm_id"];
const ACCEPTED: &[&str] = &["volume_id", "vm_id", "job_id"];
const VOLUME: Named = Named { list: "volumes", id: "volume_id", what: "volume" };
const VM: Named = Named { list: "vms", id: "vm_id", what: "VM" };

/// `hcp volume`.
#[derive(Subcommand, Debug)]
pub enum Volume {
    /// The project's volumes.
    List {
        /// Only volumes in this status (AVAILABLE, IN_USE, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only the volumes attached to this VM (id or name).
        #[arg(long)]
        vm: Option<String>,
    },
    /// One volume (by id, or by name: the one volume of that name).
    Show { volume: String },
    /// Create a volume.
    Create {
        name: String,
        /// Size in GiB.
        #[arg(long)]
        size: u32,
        /// A volume type of the catalog (`hcp catalog volume-types`).
        #[arg(long = "type")]
        volume_type: String,
        #[arg(long)]
        zone: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Metadata `KEY=VALUE` (repeatable).
        #[arg(long = "meta")]
        metadata: Vec<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Rename, retag or set metadata (no job).
    Update {
        volume: String,
        #[arg(long)]
        name: Option<String>,
        /// Replace the tags with these (repeatable).
        #[arg(long = "tag")]
        tags: Option<Vec<String>>,
        /// Replace the metadata with these `KEY=VALUE` (repeatable).
        #[arg(long = "meta")]
        metadata: Option<Vec<String>>,
    },
    /// Grow a volume to a new size.
    Extend {
        volume: String,
        /// The new size in GiB (larger than now).
        #[arg(long)]
        size: u32,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a volume (detach it first).
    Delete {
        volume: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Attach a volume to a VM.
    Attach {
        volume: String,
        /// The VM (id or name).
        #[arg(long)]
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Detach a volume from its VM.
    Detach {
        volume: String,
        /// The VM (id or name).
        #[arg(long)]
        vm: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// `hcp volume ...`.
pub async fn volume(common: Common, cmd: Volume) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    let project = c.project()?.to_owned();
    let volumes = format!("{T}/projects/{project}/volumes");
    let vms = format!("{T}/projects/{project}/vms");
    let id = |name: String| {
        let (c, volumes) = (&c, &volumes);
        async move { resolve_named(c, volumes, &name, VOLUME).await }
    };
    let done = |v: Value, wait: Wait, volume: Option<String>| {
        let (c, volumes) = (&c, &volumes);
        async move {
            let show = volume.map(|id| (format!("{volumes}/{id}"), COLUMNS));
            finish_showing(c, out, v, wait, ACCEPTED, show).await
        }
    };
    match cmd {
        Volume::List { status, vm } => {
            let mut query = Vec::new();
            if let Some(s) = status {
                query.push(format!("status={s}"));
            }
            if let Some(vm) = vm {
                query.push(format!("vm_id={}", resolve_named(&c, &vms, &vm, VM).await?));
            }
            let path =
                if query.is_empty() { volumes.clone() } else { format!("{volumes}?{}", query.join("&")) };
            let v = c.call("GET", &path, None).await?;
            output::print(out, &v, Some("volumes"), COLUMNS);
        }
        Volume::Show { volume } => {
            let v = c.call("GET", &format!("{volumes}/{}", id(volume).await?), None).await?;
            output::print(out, &v, None, COLUMNS);
        }
        Volume::Create { name, size, volume_type, zone, tags, metadata, wait } => {
            let mut body = json!({"name": name, "size_gib": size, "volume_type": volume_type, "tags": tags,
                                  "metadata": pairs(&metadata, "--meta")?});
            if let Some(z) = zone {
                body["zone"] = json!(z);
            }
            let v = c.call("POST", &volumes, Some(&body)).await?;
            let created = v["volume_id"].as_str().map(str::to_owned);
            done(v, wait, created).await?;
        }
        Volume::Update { volume, name, tags, metadata } => {
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
            let path = format!("{volumes}/{}", id(volume).await?);
            let v = c.call("PATCH", &path, Some(&Value::Object(body))).await?;
            output::print(out, &v, None, COLUMNS);
        }
        Volume::Extend { volume, size, wait } => {
            let volume = id(volume).await?;
            let v = c
                .call("POST", &format!("{volumes}/{volume}:extend"), Some(&json!({"size_gib": size})))
                .await?;
            done(v, wait, Some(volume)).await?;
        }
        Volume::Delete { volume, wait } => {
            let v = c.call("DELETE", &format!("{volumes}/{}", id(volume).await?), None).await?;
            done(v, wait, None).await?;
        }
        Volume::Attach { volume, vm, wait } => {
            attach(&c, &vms, volume, vm, "attach", wait, &done, &id).await?
        }
        Volume::Detach { volume, vm, wait } => {
            attach(&c, &vms, volume, vm, "detach", wait, &done, &id).await?
        }
    }
    Ok(())
}

/// `hcp volume attach|detach`: `POST .../vms/{vm}:{verb}`.
#[allow(clippy::too_many_arguments)]
async fn attach<D, DF, I, IF>(
    c: &Client,
    vms: &str,
    volume: String,
    vm: String,
    verb: &str,
    wait: Wait,
    done: &D,
    id: &I,
) -> anyhow::Result<()>
where
    D: Fn(Value, Wait, Option<String>) -> DF,
    DF: Future<Output = anyhow::Result<()>>,
    I: Fn(String) -> IF,
    IF: Future<Output = anyhow::Result<String>>,
{
    let volume = id(volume).await?;
    let vm = resolve_named(c, vms, &vm, VM).await?;
    let v = c.call("POST", &format!("{vms}/{vm}:{verb}"), Some(&json!({"volume_id": volume}))).await?;
    done(v, wait, Some(volume)).await
}
