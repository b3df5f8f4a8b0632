//! `hcp-gateway`: runs the REST / gRPC-web edge until SIGTERM/ctrl-c.

fn main() -> std::process::ExitCode {
    hcp_telemetry::exit_with(hcp_gateway::cli::main(std::env::args_os()))
}
