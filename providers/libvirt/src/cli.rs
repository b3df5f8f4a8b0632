//! Command line of this process: a config file, and the listen address
//! that tests and operators most often override.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The KVM/QEMU provider, driving libvirt, speaking hcp.provider.v1.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The configuration file (TOML; see providers/libvirt/README.md).
    #[arg(long, env = "HCP_LIBVIRT_CONFIG")]
    config: PathBuf,
    /// Listen address, overriding the file's; port 0 picks one.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// Parses `args` (program name first) and runs until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let mut config =
        crate::Config::load(&args.config).with_context(|| format!("--config {}", args.config.display()))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let telemetry = hcp_telemetry::TelemetryConfig { json_logs: config.json_logs, ..Default::default() };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let _t = hcp_telemetry::init("hcp-provider-libvirt", &telemetry)?;
        crate::run(config, hcp_telemetry::shutdown_signal(), |addr| {
            hcp_telemetry::announce_ready("provider-libvirt", addr)
        })
        .await
        .context("libvirt provider failed")
    })
}
