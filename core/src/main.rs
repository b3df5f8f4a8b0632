//! `hcp-core`: loads the configuration and runs core until SIGTERM/ctrl-c.

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => hcp_core::Config::from_file(path)?,
        None => hcp_core::Config::default(),
    };
    config.apply_env(std::env::vars())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let _telemetry = hcp_telemetry::init("hcp-core", &config.telemetry)?;
        hcp_core::run(config, hcp_telemetry::shutdown_signal(), |addr| {
            hcp_telemetry::announce_ready("core", addr)
        })
        .await
        .context("core failed")
    })
}
