//! Command line of this process, shared by its own binary and by `hcp`.
//! The simulator has no configuration file: its flags are its own, and the
//! SDK's provider kit starts the runtime, telemetry and server.

use std::net::SocketAddr;

use clap::Parser;
use hcp_provider_sdk::kit::{self, KitError};
use hcp_provider_sdk::{ServerTls, TlsFiles, TlsPart};

/// The simulated hypervisor, speaking hcp.provider.v1.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Listen address; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:50061", env = "HCP_SIM_LISTEN")]
    listen: SocketAddr,
    /// Capabilities to report, comma-separated (cloud_init, snapshot,
    /// snapshot_running, live_migration, console_vnc, console_spice,
    /// console_rdp, console_serial, console_log, gpu_passthrough, resize, hot_resize,
    /// cold_migration, volumes, hot_attach, volume_extend_in_use,
    /// volumes_host_local, image_import, capture, max_volumes_per_vm=N).
    #[arg(
        long,
        default_value = "cloud_init,snapshot,snapshot_running,console_vnc,console_serial,console_log,resize,hot_resize,live_migration,cold_migration,volumes,hot_attach,volume_extend_in_use,image_import,capture"
    )]
    capabilities: String,
    /// Data volume slots per VM (max_volumes_per_vm) when volumes are on;
    /// overrides max_volumes_per_vm=N in --capabilities.
    #[arg(long)]
    max_volumes_per_vm: Option<u32>,
    /// Storages volumes can go to besides "default", comma-separated.
    #[arg(long, default_value = "")]
    storages: String,
    /// Simulated hosts (sim-host-1..N); 0 reports none.
    #[arg(long, default_value_t = 3)]
    hosts: u32,
    /// vCPUs of each host.
    #[arg(long, default_value_t = 4096)]
    host_vcpus: u32,
    /// Memory of each host, MiB.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    host_memory_mib: u64,
    /// Do not report hot resize, whatever --capabilities says: ResizeVm of
    /// a running VM then answers FAILED_PRECONDITION (and core refuses it
    /// first, with 409 naming supports_hot_resize).
    #[arg(long)]
    no_hot_resize: bool,
    /// Latency added to every compute call, milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Protocol revisions to announce, comma-separated (for tests of
    /// version negotiation).
    #[arg(long, default_value = "1")]
    protocol_versions: String,
    /// Serve on this unix socket instead of TCP.
    #[arg(long)]
    unix_socket: Option<std::path::PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. The
    /// TLS files are read again every 10 s, so a rotated set is served
    /// without a restart.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key for --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Say "needs configuration" until core sends credentials.
    #[arg(long)]
    require_credentials: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
}

/// Parses `args` (program name first) and runs the process until
/// SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), KitError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let config = config_of(&args)?;
    kit::cli::start("hcp-provider-sim", "provider-sim", args.json_logs, |shutdown, ready| {
        crate::run(config, shutdown, ready)
    })
}

/// The simulator's settings from its command line.
fn config_of(args: &Args) -> Result<crate::SimConfig, KitError> {
    let mut capabilities = crate::parse_capabilities(&args.capabilities)
        .map_err(|e| KitError::Arg { arg: "--capabilities".into(), source: e.into() })?;
    if args.no_hot_resize {
        capabilities.supports_hot_resize = false;
    }
    if let Some(n) = args.max_volumes_per_vm
        && capabilities.supports_volumes
    {
        capabilities.max_volumes_per_vm = n;
    }
    // The files are checked here and read again while serving, so a
    // rotated certificate is served without a restart.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
                reload_every: TlsFiles::DEFAULT_RELOAD,
            };
            files.check().map_err(|e| {
                let arg = match e.part() {
                    Some(TlsPart::Key) => "--tls-key",
                    Some(TlsPart::ClientCa) => "--tls-client-ca",
                    Some(TlsPart::Certificate) | None => "--tls-cert",
                };
                KitError::Arg { arg: arg.into(), source: e.into() }
            })?;
            Some(ServerTls::Files(files))
        }
        _ => None,
    };
    Ok(crate::SimConfig {
        listen: args.listen,
        capabilities,
        latency: std::time::Duration::from_millis(args.latency_ms),
        protocol_versions: args.protocol_versions.split(',').map(|v| v.trim().to_owned()).collect(),
        require_credentials: args.require_credentials,
        unix_socket: args.unix_socket.clone(),
        hosts: crate::hosts(args.hosts, args.host_vcpus, args.host_memory_mib),
        storages: args
            .storages
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> crate::SimConfig {
        let argv = std::iter::once("hcp-provider-sim").chain(args.iter().copied());
        config_of(&Args::parse_from(argv)).unwrap()
    }

    #[test]
    fn hot_resize_is_on_by_default_and_switched_off_by_a_flag() {
        let default = config(&[]).capabilities;
        assert!(default.supports_resize && default.supports_hot_resize);
        let cold = config(&["--no-hot-resize"]).capabilities;
        assert!(cold.supports_resize && !cold.supports_hot_resize);
        // The flag wins over a capability list that names hot_resize.
        let listed = config(&["--capabilities", "resize,hot_resize", "--no-hot-resize"]).capabilities;
        assert!(listed.supports_resize && !listed.supports_hot_resize);
    }

    #[test]
    fn volumes_are_on_by_default_and_each_flag_is_switchable() {
        let default = config(&[]).capabilities;
        assert!(
            default.supports_volumes && default.supports_hot_attach && default.supports_volume_extend_in_use
        );
        assert!(!default.volumes_host_local);
        assert_eq!(default.max_volumes_per_vm, crate::DEFAULT_MAX_VOLUMES_PER_VM);
        let local = config(&["--capabilities", "volumes,volumes_host_local", "--max-volumes-per-vm", "3"]);
        let c = &local.capabilities;
        assert!(c.supports_volumes && c.volumes_host_local && !c.supports_hot_attach);
        assert!(!c.supports_volume_extend_in_use);
        assert_eq!(c.max_volumes_per_vm, 3);
        let none = config(&["--capabilities", "resize", "--max-volumes-per-vm", "3"]).capabilities;
        assert!(!none.supports_volumes && none.max_volumes_per_vm == 0, "no slots without volumes");
        let listed = config(&["--capabilities", "volumes,max_volumes_per_vm=2"]).capabilities;
        assert_eq!(listed.max_volumes_per_vm, 2);
        assert_eq!(config(&["--storages", "fast, slow"]).storages, ["fast", "slow"]);
    }

    #[test]
    fn an_unknown_capability_is_named() {
        let args = Args::parse_from(["hcp-provider-sim", "--capabilities", "resize,warp"]);
        let err = config_of(&args).unwrap_err();
        assert_eq!(hcp_provider_sdk::kit::cli::chain(&err), "--capabilities: unknown capability \"warp\"");
    }
}
