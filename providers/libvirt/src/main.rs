//! The `hcp-provider-libvirt` binary.

fn main() -> anyhow::Result<()> {
    hcp_provider_libvirt::cli::main(std::env::args_os())
}
