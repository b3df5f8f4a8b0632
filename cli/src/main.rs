//! `hcp`: the HCP command line.

fn main() -> anyhow::Result<()> {
    hcp_cli::main(std::env::args_os())
}
