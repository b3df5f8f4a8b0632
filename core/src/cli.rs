//! Command line of this process, shared by its own binary and by `hcp`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// HCP core: the control plane's gRPC API and job workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file; defaults apply when absent.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// Parses `args` (program name first) and runs the process until
/// SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let mut config = match &args.config {
        Some(path) => crate::Config::from_file(path)?,
        None => crate::Config::default(),
    };
    config.apply_env(std::env::vars())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let _telemetry = hcp_telemetry::init("hcp-core", &config.telemetry)?;
        crate::run(config, hcp_telemetry::shutdown_signal(), |at| {
            let more: Vec<_> = at.metrics.map(|a| ("metrics_addr", a.to_string())).into_iter().collect();
            hcp_telemetry::announce_ready_with("core", at.grpc, &more)
        })
        .await
        .context("core failed")
    })
}
