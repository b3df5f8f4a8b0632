//! `hcp-provider-hyperv`: runs the Hyper-V provider as a process.

fn main() -> std::process::ExitCode {
    hcp_provider_sdk::kit::cli::exit(hcp_provider_hyperv::cli::main(std::env::args_os()))
}
