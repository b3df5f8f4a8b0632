//! `hcp usage` (a project's usage, tenant tokens) and `hcp ops usage` (any
//! tenant's, operator tokens): VM, vCPU, memory, disk and volume hours over
//! a window, grouped as asked, as a table, JSON, YAML or the gateway's CSV.

use crate::client::Client;
use crate::human::enc;
use crate::output::{self, Format};

/// The window, the grouping and the format of a usage report.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageArgs {
    /// The window's start, RFC 3339 (`2026-01-01T00:00:00Z`).
    #[arg(long)]
    pub from: String,
    /// The window's end (excluded), RFC 3339; at most 366 days after --from.
    #[arg(long)]
    pub to: String,
    /// Group rows by tenant, project, flavor, resource and/or day
    /// (comma-separated); none gives one row of totals.
    #[arg(long, value_delimiter = ',')]
    pub group_by: Vec<String>,
    /// Print CSV (a header row of field names, as the API sends it).
    #[arg(long)]
    pub csv: bool,
}

/// `hcp ops usage`: the filters an operator may add.
#[derive(clap::Args, Debug, Clone)]
pub struct OpsUsageArgs {
    #[command(flatten)]
    pub usage: UsageArgs,
    /// Only this tenant's usage.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this project of --tenant.
    #[arg(long = "tenant-project", requires = "tenant")]
    pub tenant_project: Option<String>,
}

const COLUMNS: &[&str] = &[
    "tenant_id",
    "project_id",
    "flavor",
    "resource_id",
    "day",
    "vm_hours",
    "vcpu_hours",
    "memory_gib_hours",
    "disk_gib_hours",
    "volume_gib_hours",
];

/// The query string of a report.
fn query(args: &UsageArgs, extra: &[(&str, &Option<String>)]) -> String {
    let mut q = vec![format!("from={}", enc(&args.from)), format!("to={}", enc(&args.to))];
    q.extend(args.group_by.iter().map(|g| format!("group_by={}", enc(g))));
    for (name, value) in extra {
        q.extend(value.as_ref().map(|v| format!("{name}={}", enc(v))));
    }
    q.join("&")
}

/// Fetches and prints a report from `path` (without its query).
#[allow(clippy::print_stdout)]
async fn show(c: &Client, out: Format, path: &str, args: &UsageArgs, q: String) -> anyhow::Result<()> {
    if args.csv {
        print!("{}", c.call_text("GET", &format!("{path}?{q}"), "text/csv").await?);
        return Ok(());
    }
    let v = c.call("GET", &format!("{path}?{q}"), None).await?;
    output::print(out, &v, Some("rows"), COLUMNS);
    Ok(())
}

/// `hcp usage`: the project's usage.
pub async fn tenant(c: &Client, out: Format, args: UsageArgs) -> anyhow::Result<()> {
    let path = format!("/api/hcp/tenant/v1/projects/{}/usage", c.project()?);
    let q = query(&args, &[]);
    show(c, out, &path, &args, q).await
}

/// `hcp ops usage`: every tenant's usage, or one tenant's (project's).
pub async fn ops(c: &Client, out: Format, args: OpsUsageArgs) -> anyhow::Result<()> {
    let q = query(&args.usage, &[("tenant_id", &args.tenant), ("project_id", &args.tenant_project)]);
    show(c, out, "/api/hcp/ops/v1/usage", &args.usage, q).await
}
