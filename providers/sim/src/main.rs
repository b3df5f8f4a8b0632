//! `hcp-provider-sim`: runs the simulated hypervisor as a provider process.

fn main() -> std::process::ExitCode {
    hcp_provider_sdk::kit::cli::exit(hcp_provider_sim::cli::main(std::env::args_os()))
}
