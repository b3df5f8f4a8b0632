//! `hcp-proxmox-sim`: runs the Proxmox VE API simulator as a process (for
//! system tests).

fn main() -> std::process::ExitCode {
    hcp_telemetry::exit_with(hcp_proxmox_sim::cli::main(std::env::args_os()))
}
