//! `hcp-provider-vsphere`: runs the vSphere provider as a process.

fn main() -> std::process::ExitCode {
    hcp_provider_sdk::kit::cli::exit(hcp_provider_vsphere::cli::main(std::env::args_os()))
}
