//! `hcp-core`: loads the configuration and runs core until SIGTERM/ctrl-c.

fn main() -> std::process::ExitCode {
    hcp_telemetry::exit_with(hcp_core::cli::main(std::env::args_os()))
}
