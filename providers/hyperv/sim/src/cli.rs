//! Command line of the simulator binary: where to listen, who may log in,
//! what the host holds, and where to write the certificate so the provider
//! can trust it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A Hyper-V host simulator speaking WS-Management (root/virtualization/v2).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the self-signed certificate (PEM) here; the control address
    /// goes beside it with the extension `.control`.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// Accepted Basic credentials, `USER=PASSWORD` (repeatable).
    #[arg(long)]
    user: Vec<String>,
    /// The host's computer name.
    #[arg(long, default_value = "HVSIM01")]
    host_name: String,
    /// A virtual switch name (repeatable; default "Default Switch").
    #[arg(long)]
    switch: Vec<String>,
    /// The local directory standing for `--disk-prefix` (default: a fresh
    /// temporary directory).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// The Windows directory mapped onto `--disk-dir`.
    #[arg(long, default_value = "C:\\Hyper-V\\hcp\\")]
    disk_prefix: String,
    /// A share the host sees, `PREFIX=DIR` (repeatable): the Windows path
    /// (`\\files\images`) and the local directory standing for it.
    #[arg(long)]
    share: Vec<String>,
    /// How long each job runs, milliseconds.
    #[arg(long, default_value_t = 20)]
    job_ms: u64,
    /// How long an ended job stays visible, seconds (Hyper-V: 300).
    #[arg(long, default_value_t = 300)]
    job_retention_s: u64,
    /// How long a guest takes to shut down, milliseconds.
    #[arg(long, default_value_t = 50)]
    shutdown_ms: u64,
    /// Where the VMConnect stand-in listens (Hyper-V: 2179); its address
    /// goes beside `--cert-out` with the extension `.vmconnect`.
    #[arg(long, default_value = "127.0.0.1:0")]
    vmconnect_listen: SocketAddr,
    /// Also serve the control API (`/_sim/...`, JSON) over plain HTTP here.
    #[arg(long)]
    control_listen: Option<SocketAddr>,
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
        host_name: args.host_name,
        disk_dir: args.disk_dir,
        disk_prefix: args.disk_prefix,
        shares: args
            .share
            .iter()
            .map(|s| match s.split_once('=') {
                Some((prefix, dir)) if !prefix.is_empty() && !dir.is_empty() => {
                    Ok((prefix.to_owned(), PathBuf::from(dir)))
                }
                _ => Err(CliError::Pair { arg: "--share", form: "PREFIX=DIR" }),
            })
            .collect::<Result<_, _>>()?,
        job_duration: Duration::from_millis(args.job_ms),
        job_retention: Duration::from_secs(args.job_retention_s),
        shutdown_delay: Duration::from_millis(args.shutdown_ms),
        vmconnect_listen: Some(args.vmconnect_listen),
        ..Default::default()
    };
    if !args.user.is_empty() {
        config.users = args
            .user
            .iter()
            .map(|t| t.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<_>>()
            .ok_or(CliError::Pair { arg: "--user", form: "USER=PASSWORD" })?;
    }
    if !args.switch.is_empty() {
        config.switches = args.switch;
    }
    let telemetry = hcp_telemetry::TelemetryConfig::default();
    let runtime = tokio::runtime::Runtime::new().map_err(CliError::Runtime)?;
    runtime.block_on(async move {
        let _t = hcp_telemetry::init("hcp-hyperv-sim", &telemetry)?;
        let running = crate::start(config).await.map_err(CliError::Start)?;
        if let Some(out) = &args.cert_out {
            std::fs::write(out, &running.cert_pem)
                .map_err(|source| CliError::CertOut { path: out.clone(), source })?;
            if let Some(vmconnect) = running.vmconnect_addr {
                let path = out.with_extension("vmconnect");
                std::fs::write(&path, vmconnect.to_string())
                    .map_err(|source| CliError::Write { path, source })?;
            }
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
        hcp_telemetry::announce_ready("hyperv-sim", running.addr);
        hcp_telemetry::shutdown_signal().await;
        drop(running);
        Ok(())
    })
}
