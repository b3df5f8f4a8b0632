//! `hcp-provider-proxmox`: runs the Proxmox VE provider as a process.

fn main() -> anyhow::Result<()> {
    hcp_provider_proxmox::cli::main(std::env::args_os())
}
