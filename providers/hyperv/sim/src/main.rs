//! `hcp-hyperv-sim`: runs the Hyper-V WS-Management simulator as a process
//! (for system tests).

fn main() -> std::process::ExitCode {
    hcp_telemetry::exit_with(hcp_hyperv_sim::cli::main(std::env::args_os()))
}
