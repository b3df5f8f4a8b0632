//! `hcp-provider-hyperv`: runs the Hyper-V provider as a process.

fn main() -> anyhow::Result<()> {
    hcp_provider_hyperv::cli::main(std::env::args_os())
}
