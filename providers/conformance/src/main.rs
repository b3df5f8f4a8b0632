//! `hcp-provider-conformance`: runs the conformance kit against a provider
//! endpoint, prints every check, and exits non-zero when one fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Checks a provider endpoint against the hcp.provider.v1 contract.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The provider's gRPC endpoint.
    #[arg(long)]
    endpoint: String,
    /// Image source the provider can boot.
    #[arg(long, default_value = "test")]
    image_source: String,
    /// Network to attach to test VMs.
    #[arg(long, default_value = "")]
    network: String,
    /// Memory of test VMs, MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u32,
    /// Deadline of one call, seconds.
    #[arg(long, default_value_t = 300)]
    call_timeout_seconds: u64,
}

/// Why the command could not check the provider.
#[derive(Debug, thiserror::Error)]
enum MainError {
    /// The tokio runtime did not start.
    #[error("cannot start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// The kit could not run.
    #[error(transparent)]
    Run(#[from] hcp_provider_conformance::RunError),
}

fn main() -> ExitCode {
    hcp_telemetry::exit_with(check(Args::parse()))
}

#[allow(clippy::print_stdout)]
fn check(args: Args) -> Result<(), MainError> {
    let mut options = hcp_provider_conformance::Options::new(&args.endpoint);
    options.image_source = args.image_source;
    options.network = args.network;
    options.memory_mib = args.memory_mib;
    options.call_timeout = Duration::from_secs(args.call_timeout_seconds);
    let runtime = tokio::runtime::Runtime::new().map_err(MainError::Runtime)?;
    let report = runtime.block_on(hcp_provider_conformance::run(options))?;
    println!("{report}");
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
