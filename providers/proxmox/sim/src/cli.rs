//! Command line of the simulator binary: where to listen, what the cluster
//! holds, and where to write the certificate so the provider can trust it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A Proxmox VE API simulator validating every request against the schema.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The PVE API schema (JSON); default `HCP_PROXMOX_SCHEMA` or the copy
    /// beside the repository.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Write the self-signed certificate (PEM) here.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// Accepted API token, `USER@REALM!TOKENID=SECRET`.
    #[arg(long)]
    token: Vec<String>,
    /// Accepted user for tickets, `USER@REALM=PASSWORD`.
    #[arg(long)]
    user: Vec<String>,
    /// Directory standing for the snippets storage `local`.
    #[arg(long)]
    snippets_dir: Option<PathBuf>,
    /// How long each task runs, milliseconds.
    #[arg(long, default_value_t = 40)]
    task_ms: u64,
    /// Also serve the control API (`/_sim/...`) over plain HTTP here, for
    /// tests without a TLS client.
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    /// Delay before a 401, milliseconds (PVE: 3000).
    #[arg(long, default_value_t = 300)]
    auth_failure_delay_ms: u64,
    /// The cluster's nodes, comma-separated (the first holds the templates).
    #[arg(long, default_value = "pve1")]
    nodes: String,
    /// A storage shared by every node (for images), e.g. `ceph`; PVE
    /// migrates running VMs whose disks are on it without copying them.
    #[arg(long)]
    shared_storage: Option<String>,
}

/// Why the simulator binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A repeatable `KEY=VALUE` argument is malformed.
    #[error("{arg} must be {form}")]
    Pair {
        /// The argument.
        arg: &'static str,
        /// The form it takes.
        form: &'static str,
    },
    /// The tokio runtime did not start.
    #[error("cannot start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// Telemetry did not start.
    #[error(transparent)]
    Telemetry(#[from] hcp_telemetry::TelemetryError),
    /// The simulator did not start.
    #[error("cannot start the simulator")]
    Start(#[source] crate::StartError),
    /// `--cert-out` cannot be written.
    #[error("--cert-out {}", path.display())]
    CertOut {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file beside `--cert-out` cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control API cannot listen.
    #[error("--control-listen {addr}")]
    ControlListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Parses `args` and serves until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let mut config = crate::SimConfig {
        listen: args.listen,
        snippets_dir: args.snippets_dir,
        task_duration: Duration::from_millis(args.task_ms),
        nodes: args.nodes.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect(),
        auth_failure_delay: Duration::from_millis(args.auth_failure_delay_ms),
        ..Default::default()
    };
    if let Some(s) = args.schema {
        config.schema_path = s;
    }
    if let Some(name) = args.shared_storage {
        config.storages.push((name, true, "images".to_owned()));
    }
    if !args.token.is_empty() {
        config.tokens = args
            .token
            .iter()
            .map(|t| t.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<_>>()
            .ok_or(CliError::Pair { arg: "--token", form: "USER@REALM!TOKENID=SECRET" })?;
    }
    if !args.user.is_empty() {
        config.users = args
            .user
            .iter()
            .map(|t| t.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<_>>()
            .ok_or(CliError::Pair { arg: "--user", form: "USER@REALM=PASSWORD" })?;
    }
    let telemetry = hcp_telemetry::TelemetryConfig::default();
    let runtime = tokio::runtime::Runtime::new().map_err(CliError::Runtime)?;
    runtime.block_on(async move {
        let _t = hcp_telemetry::init("hcp-proxmox-sim", &telemetry)?;
        let running = crate::start(config).await.map_err(CliError::Start)?;
        if let Some(out) = &args.cert_out {
            std::fs::write(out, &running.cert_pem)
                .map_err(|source| CliError::CertOut { path: out.clone(), source })?;
        }
        if let Some(addr) = args.control_listen {
            let listen = |source| CliError::ControlListen { addr, source };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
            let bound = listener.local_addr().map_err(listen)?;
            let path = args
                .cert_out
                .as_ref()
                .map(|c| c.with_extension("control"))
                .unwrap_or_else(|| "sim.control".into());
            std::fs::write(&path, bound.to_string()).map_err(|source| CliError::Write { path, source })?;
            let app = crate::control_router(running.sim.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        hcp_telemetry::announce_ready("proxmox-sim", running.addr);
        hcp_telemetry::shutdown_signal().await;
        drop(running);
        Ok(())
    })
}
