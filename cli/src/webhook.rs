//! `hcp webhook`: a project's webhook endpoints. Core POSTs signed events
//! (a job finished, a VM's or a volume's status changed) to each; `create` prints the
//! signing secret, which is never shown again.

use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::human::{Common, T};
use crate::output;

const COLUMNS: &[&str] = &["id", "url", "event_types", "enabled", "disabled_reason", "consecutive_failures"];
const DELIVERY_COLUMNS: &[&str] = &[
    "event_id",
    "event_type",
    "vm_id",
    "volume_id",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "last_duration_ms",
    "last_attempt_at",
];

/// `hcp webhook`.
#[derive(Subcommand, Debug)]
pub enum Webhook {
    /// Register an endpoint; prints its signing secret once.
    Create {
        /// https://host[:port]/path (plain http only in `hcp up`'s development mode).
        url: String,
        /// Event types: job.finished, vm.status_changed, volume.status_changed (repeat or
        /// comma-separate).
        #[arg(long = "event", value_delimiter = ',', default_values_t = ["job.finished".to_owned()])]
        events: Vec<String>,
        /// A note.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// The project's endpoints.
    List,
    /// One endpoint.
    Show { id: String },
    /// Delete an endpoint (its pending deliveries are dropped).
    Delete { id: String },
    /// The endpoint's latest deliveries, newest first, with their last attempt.
    Deliveries {
        id: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Enable an endpoint core disabled after repeated failures; its pending
    /// deliveries are sent again, in order.
    Enable { id: String },
}

/// `hcp webhook ...`.
pub async fn webhook(common: Common, cmd: Webhook) -> anyhow::Result<()> {
    let c = Client::new(&common.connect)?;
    let out = common.output;
    let project = c.project()?.to_owned();
    let hooks = format!("{T}/projects/{project}/webhooks");
    match cmd {
        Webhook::Create { url, events, description } => {
            let body = json!({"url": url, "event_types": events, "description": description});
            let v = c.call("POST", &hooks, Some(&body)).await?;
            match out {
                output::Format::Table => {
                    output::print(out, &v["webhook"], None, COLUMNS);
                    println!("\nsecret: {}", v["secret"].as_str().unwrap_or_default());
                    eprintln!("keep the secret now: it is not shown again");
                }
                _ => output::print(out, &v, None, &[]),
            }
        }
        Webhook::List => {
            let v = c.call("GET", &hooks, None).await?;
            output::print(out, &v, Some("webhooks"), COLUMNS);
        }
        Webhook::Show { id } => {
            let v = c.call("GET", &format!("{hooks}/{id}"), None).await?;
            output::print(
                out,
                &v,
                None,
                &[
                    "id",
                    "url",
                    "event_types",
                    "description",
                    "enabled",
                    "disabled_reason",
                    "consecutive_failures",
                    "created_at",
                ],
            );
        }
        Webhook::Delete { id } => {
            c.call("DELETE", &format!("{hooks}/{id}"), None).await?;
            eprintln!("deleted webhook {id}");
        }
        Webhook::Deliveries { id, limit } => {
            let v = c.call("GET", &format!("{hooks}/{id}/deliveries?page_size={limit}"), None).await?;
            output::print(out, &v, Some("deliveries"), DELIVERY_COLUMNS);
        }
        Webhook::Enable { id } => {
            let v = c.call("POST", &format!("{hooks}/{id}:enable"), Some(&json!({}))).await?;
            output::print(out, &v, None, COLUMNS);
        }
    }
    Ok(())
}
