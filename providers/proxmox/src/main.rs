//! `hcp-provider-proxmox`: runs the Proxmox VE provider as a process.

fn main() -> std::process::ExitCode {
    hcp_provider_sdk::kit::cli::exit(hcp_provider_proxmox::cli::main(std::env::args_os()))
}
