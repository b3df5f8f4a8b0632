//! Command line of this process, shared by its own binary and by `hcp`.

use std::net::SocketAddr;

use std::num::NonZeroUsize;

use clap::Parser;

/// HCP gateway: REST and gRPC-web in front of core.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// HTTP listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:8080", env = "HCP_GATEWAY_LISTEN")]
    listen: SocketAddr,
    /// Core's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "HCP_CORE_ENDPOINT")]
    core: String,
    /// Deadline of one call to core, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_seconds: u64,
    /// Requests handled at once; more are answered 503 with Retry-After at
    /// once instead of queueing.
    #[arg(long, default_value = "1024")]
    max_concurrent_requests: NonZeroUsize,
    /// HTTP/2 connections to core; calls take them in turn. One was
    /// measured best on two cores (README, Performance); more may help where
    /// one connection's framing task saturates a core.
    #[arg(long, default_value = "1", env = "HCP_GATEWAY_CORE_CONNECTIONS")]
    core_connections: NonZeroUsize,
    /// JWT of the gateway's service account (role console.proxy), for the
    /// console proxy; without it consoles are refused.
    #[arg(long, env = "HCP_GATEWAY_SERVICE_TOKEN_FILE")]
    service_token_file: Option<std::path::PathBuf>,
    /// An origin allowed to open consoles (repeatable); none means the
    /// gateway's own origin only.
    #[arg(long = "console-allowed-origin")]
    console_allowed_origins: Vec<String>,
    /// Directory of the console page (www/) and noVNC (node_modules/).
    #[arg(long, default_value = "gateway/console", env = "HCP_CONSOLE_ASSETS_DIR")]
    console_assets_dir: std::path::PathBuf,
    /// Directory of spice-html5, the SPICE console page's client (Debian's
    /// `spice-html5` package).
    #[arg(long, default_value = crate::console::SPICE_HTML5_DIR, env = "HCP_CONSOLE_SPICE_HTML5_DIR")]
    console_spice_html5_dir: std::path::PathBuf,
    /// Where the RDP relay for native clients listens (e.g.
    /// `0.0.0.0:3390`); none without it. Core's `console.rdp_address` is
    /// this address as tenants reach it.
    #[arg(long, env = "HCP_CONSOLE_RDP_LISTEN")]
    console_rdp_listen: Option<SocketAddr>,
    /// Where `/metrics` (Prometheus) is served; none without it.
    #[arg(long, env = "HCP_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
    /// OTLP/gRPC collector for traces.
    #[arg(long, env = "HCP_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// The tokio runtime could not start.
    #[error("cannot start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// Logs and traces could not be set up.
    #[error(transparent)]
    Telemetry(#[from] hcp_telemetry::TelemetryError),
    /// The gateway failed to start or while running.
    #[error("gateway failed")]
    Gateway(#[source] crate::StartError),
}

/// Parses `args` (program name first; a value out of range is refused
/// with the flag's name) and runs the process until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), MainError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let config = crate::Config {
        listen: args.listen,
        core_endpoint: args.core,
        timeout: std::time::Duration::from_secs(args.timeout_seconds),
        max_concurrent_requests: args.max_concurrent_requests,
        core_connections: args.core_connections,
        console: crate::console::ConsoleConfig {
            service_token_file: args.service_token_file,
            allowed_origins: args.console_allowed_origins,
            assets_dir: args.console_assets_dir,
            spice_html5_dir: args.console_spice_html5_dir,
            rdp_listen: args.console_rdp_listen,
        },
        metrics_listen: args.metrics_listen,
    };
    let telemetry = hcp_telemetry::TelemetryConfig {
        json_logs: args.json_logs,
        otlp_endpoint: args.otlp_endpoint,
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().map_err(MainError::Runtime)?;
    runtime.block_on(async move {
        let _t = hcp_telemetry::init("hcp-gateway", &telemetry)?;
        crate::run(config, hcp_telemetry::shutdown_signal(), |at| {
            let more: Vec<_> = [("rdp_addr", at.rdp), ("metrics_addr", at.metrics)]
                .into_iter()
                .filter_map(|(k, a)| a.map(|a| (k, a.to_string())))
                .collect();
            hcp_telemetry::announce_ready_with("gateway", at.http, &more)
        })
        .await
        .map_err(MainError::Gateway)
    })
}
