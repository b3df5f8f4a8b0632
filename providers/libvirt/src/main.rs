//! The `hcp-provider-libvirt` binary.

fn main() -> std::process::ExitCode {
    hcp_provider_sdk::kit::cli::exit(hcp_provider_libvirt::cli::main(std::env::args_os()))
}
