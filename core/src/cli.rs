//! Command line of this process, shared by its own binary and by `hcp`.

use std::path::PathBuf;

use clap::Parser;

use crate::config::ConfigError;
use crate::server::StartError;

/// HCP core: the control plane's gRPC API and job workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file; defaults apply when absent.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// The configuration could not be loaded, or a value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tokio runtime could not start.
    #[error("cannot start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// Logs and traces could not be set up.
    #[error(transparent)]
    Telemetry(#[from] hcp_telemetry::TelemetryError),
    /// Core failed to start or while running.
    #[error("core failed")]
    Core(#[source] StartError),
}

/// Parses `args` (program name first) and runs the process until
/// SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), MainError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let mut config = match &args.config {
        Some(path) => crate::Config::from_file(path)?,
        None => crate::Config::default(),
    };
    // The file was checked when read (naming it); no environment override
    // touches a bounded setting, and `run` checks again for library callers.
    config.apply_env(std::env::vars())?;
    let runtime = tokio::runtime::Runtime::new().map_err(MainError::Runtime)?;
    runtime.block_on(async move {
        let _telemetry = hcp_telemetry::init("hcp-core", &config.telemetry)?;
        crate::run(config, hcp_telemetry::shutdown_signal(), |at| {
            let more: Vec<_> = at.metrics.map(|a| ("metrics_addr", a.to_string())).into_iter().collect();
            hcp_telemetry::announce_ready_with("core", at.grpc, &more)
        })
        .await
        .map_err(MainError::Core)
    })
}
