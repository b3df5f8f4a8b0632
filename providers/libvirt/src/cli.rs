//! The provider process's names on the command line; the kit does the rest
//! (`--config`, `--listen`, runtime, telemetry, serving). JSON logs are
//! the file's `json_logs`.

use hcp_provider_sdk::kit::{self, KitError, Spec};

/// `hcp-provider-libvirt`'s command line.
pub const SPEC: Spec = Spec {
    binary: "hcp-provider-libvirt",
    ready: "provider-libvirt",
    about: "The KVM/QEMU provider, driving libvirt, speaking hcp.provider.v1",
    version: env!("CARGO_PKG_VERSION"),
    config_env: "HCP_LIBVIRT_CONFIG",
    listen_env: None,
    json_logs_flag: false,
};

/// Parses `args` (program name first) and runs until SIGTERM/ctrl-c.
pub fn main<I, T>(args: I) -> Result<(), KitError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    kit::cli::main(&SPEC, args, |config: crate::Config, shutdown, ready| crate::run(config, shutdown, ready))
}
