//! The provider process's names on the command line; the kit does the rest
//! (`--config`, `--listen`, `--json-logs`, runtime, telemetry, serving).

use hcp_provider_sdk::kit::{self, KitError, Spec};

/// `hcp-provider-proxmox`'s command line.
pub const SPEC: Spec = Spec {
    binary: "hcp-provider-proxmox",
    ready: "provider-proxmox",
    about: "The Proxmox VE provider, speaking hcp.provider.v1",
    version: env!("CARGO_PKG_VERSION"),
    config_env: "HCP_PROXMOX_CONFIG",
    listen_env: Some("HCP_PROXMOX_LISTEN"),
    json_logs_flag: true,
};

/// Parses `args` (program name first) and runs until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), KitError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    kit::cli::main(&SPEC, args, |config: crate::config::Config, shutdown, ready| {
        crate::run(config, shutdown, ready)
    })
}
