//! `hcp-core`: loads the configuration and runs core until SIGTERM/ctrl-c.

fn main() -> anyhow::Result<()> {
    hcp_core::cli::main(std::env::args_os())
}
