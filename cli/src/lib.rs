//! The `hcp` command: what people drive HCP with (`hcp vm`, `hcp job`,
//! `hcp catalog`, `hcp ops`, over the REST API: [`human`]), the
//! one-command development stack (`hcp up`), dev tokens (`hcp token`), and every HCP process by name (`hcp core`,
//! `hcp gateway`, `hcp provider-sim`), so a single build gives all of them,
//! and `hcp audit verify`, which checks the audit trail's hash chain.
//!
//! `hcp up` starts core, the gateway and a simulated provider as separate
//! OS processes (this same binary, re-executed), waits for each to announce
//! its address, seeds a zone, flavors and an image, registers the provider
//! through the ops API, and prints tokens and a curl walkthrough.

pub mod audit;
pub mod client;
pub mod dev;
pub mod human;
pub mod image;
pub mod keypair;
pub mod output;
pub mod serial;
pub mod usage;
pub mod volume;
pub mod webhook;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

/// HCP: the Hypervisor Control Plane.
#[derive(Parser, Debug)]
#[command(version, name = "hcp")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// VMs of a project: list, show, create, update, start, stop, reboot,
    /// resize, delete, console, snapshot.
    Vm {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: human::Vm,
    },
    /// Volumes of a project: list, show, create, update, extend, delete,
    /// attach, detach.
    Volume {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: volume::Volume,
    },
    /// Images a project creates VMs from: list, show, delete its private ones
    /// (made with `hcp vm capture`).
    Image {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: image::Image,
    },
    /// SSH key pairs of a project (public keys): create, list, show, delete.
    Keypair {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: keypair::KeyPair,
    },
    /// Webhook endpoints of a project: create, list, show, delete,
    /// deliveries, enable.
    Webhook {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: webhook::Webhook,
    },
    /// Jobs: list, show, watch, cancel.
    Job {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: human::Job,
    },
    /// The project's usage over a window: VM, vCPU, memory, disk and
    /// volume hours (`--csv` for CSV).
    Usage {
        #[command(flatten)]
        common: human::Common,
        #[command(flatten)]
        args: usage::UsageArgs,
    },
    /// What tenants may pick: flavors, images, zones, networks.
    Catalog {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: human::Catalog,
    },
    /// Operator commands: providers, quotas, the audit trail, any job.
    Ops {
        #[command(flatten)]
        common: human::Common,
        #[command(subcommand)]
        cmd: human::Ops,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Start core, gateway and a simulated provider on the embedded store.
    Up(dev::UpArgs),
    /// Mint a development token signed with the dev key.
    Token(dev::TokenArgs),
    /// The audit trail: `hcp audit verify` checks its hash chain.
    Audit(audit::AuditArgs),
    /// Run core (same flags as hcp-core).
    #[command(disable_help_flag = true)]
    Core {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the gateway (same flags as hcp-gateway).
    #[command(disable_help_flag = true)]
    Gateway {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the simulated provider (same flags as hcp-provider-sim).
    #[command(name = "provider-sim", disable_help_flag = true)]
    ProviderSim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Runs the command line.
pub fn main<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let with_name = |name: &str, args: Vec<OsString>| {
        std::iter::once(OsString::from(name)).chain(args).collect::<Vec<_>>()
    };
    match cli.command {
        Command::Vm { common, cmd } => human::run(|| human::vm(common, cmd)),
        Command::Volume { common, cmd } => human::run(|| volume::volume(common, cmd)),
        Command::Keypair { common, cmd } => human::run(|| keypair::keypair(common, cmd)),
        Command::Image { common, cmd } => human::run(|| image::image(common, cmd)),
        Command::Webhook { common, cmd } => human::run(|| webhook::webhook(common, cmd)),
        Command::Job { common, cmd } => human::run(|| human::job(common, cmd)),
        Command::Usage { common, args } => human::run(|| async move {
            let c = client::Client::new(&common.connect)?;
            usage::tenant(&c, common.output, args).await
        }),
        Command::Catalog { common, cmd } => human::run(|| human::catalog(common, cmd)),
        Command::Ops { common, cmd } => human::run(|| human::ops(common, cmd)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "hcp", &mut std::io::stdout());
            Ok(())
        }
        Command::Up(args) => dev::up(args),
        Command::Token(args) => dev::token(args),
        Command::Audit(args) => {
            if !audit::run(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Core { args } => Ok(hcp_core::cli::main(with_name("hcp-core", args))?),
        Command::Gateway { args } => Ok(hcp_gateway::cli::main(with_name("hcp-gateway", args))?),
        Command::ProviderSim { args } => {
            Ok(hcp_provider_sim::cli::main(with_name("hcp-provider-sim", args))?)
        }
    }
}
