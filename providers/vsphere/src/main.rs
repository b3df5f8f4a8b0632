//! `hcp-provider-vsphere`: runs the vSphere provider as a process.

fn main() -> anyhow::Result<()> {
    hcp_provider_vsphere::cli::main(std::env::args_os())
}
