//! Command line of the provider process: the configuration file, with the
//! listen address overridable for tests and containers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The Hyper-V provider, speaking hcp.provider.v1.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The configuration file (TOML; see providers/hyperv/README.md).
    #[arg(long, env = "HCP_HYPERV_CONFIG")]
    config: PathBuf,
    /// Listen address, overriding the file's `listen`; port 0 picks one.
    #[arg(long, env = "HCP_HYPERV_LISTEN")]
    listen: Option<SocketAddr>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
}

/// Parses `args` (program name first) and runs until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let mut config = crate::config::Config::load(&args.config)
        .with_context(|| format!("--config {}", args.config.display()))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let telemetry = hcp_telemetry::TelemetryConfig { json_logs: args.json_logs, ..Default::default() };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let _t = hcp_telemetry::init("hcp-provider-hyperv", &telemetry)?;
        crate::run(config, hcp_telemetry::shutdown_signal(), |addr| {
            hcp_telemetry::announce_ready("provider-hyperv", addr)
        })
        .await
        .context("hyperv provider failed")
    })
}
