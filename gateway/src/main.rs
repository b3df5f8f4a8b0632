//! `hcp-gateway`: runs the REST / gRPC-web edge until SIGTERM/ctrl-c.

fn main() -> anyhow::Result<()> {
    hcp_gateway::cli::main(std::env::args_os())
}
