//! `hcp-provider-sim`: runs the simulated hypervisor as a provider process.

fn main() -> anyhow::Result<()> {
    hcp_provider_sim::cli::main(std::env::args_os())
}
