//! The provider process: its command line and its `main`. A provider names
//! itself in a [`Spec`] (binary, readiness name, environment variables) and
//! hands [`main`] its `run`; the kit parses `--config`, `--listen` and
//! `--json-logs`, loads and validates the file, starts the runtime and
//! telemetry, and serves until SIGTERM or ctrl-c.

use std::error::Error;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use clap::{Arg, ArgAction, ArgMatches, Command};

use super::config::{self, ConfigError, ProviderConfig};

// A provider's `main` ends with `exit` (success, or the error's whole chain
// on stderr and a failure status); `chain` joins an error and its sources
// with `: `. Both are hcp-telemetry's, so every HCP process words its errors
// alike.
pub use hcp_telemetry::{error_chain as chain, exit_with as exit};

/// Resolves when the process is asked to stop (SIGTERM or ctrl-c).
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Prints the readiness line for the bound address.
pub type Ready = Box<dyn FnOnce(String) + Send + 'static>;

/// Any error of a provider's `run`, its source chain kept.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// How one provider process is named on the command line and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The binary and telemetry service, `hcp-provider-vsphere`.
    pub binary: &'static str,
    /// The service of the readiness line, `provider-vsphere`.
    pub ready: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    pub version: &'static str,
    /// Where `--config` is also read from, `HCP_VSPHERE_CONFIG`.
    pub config_env: &'static str,
    /// Where `--listen` is also read from, if anywhere.
    pub listen_env: Option<&'static str>,
    /// Whether the process takes `--json-logs` (else only the file's
    /// [`ProviderConfig::json_logs`] asks for JSON logs).
    pub json_logs_flag: bool,
}

/// The common command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The configuration file.
    pub config: PathBuf,
    /// The listen address overriding the file's.
    pub listen: Option<SocketAddr>,
    /// `--json-logs`.
    pub json_logs: bool,
}

/// A provider process could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The configuration file is unusable.
    #[error("--config {}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// A command-line argument is unusable.
    #[error("{arg}")]
    Arg {
        /// The argument, `--capabilities`.
        arg: String,
        /// What is wrong.
        #[source]
        source: BoxError,
    },
    /// The tokio runtime did not start.
    #[error("cannot start the tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// Logging or tracing did not start.
    #[error("cannot start telemetry")]
    Telemetry(#[source] hcp_telemetry::TelemetryError),
    /// The provider failed.
    #[error("{binary} failed")]
    Run {
        /// The provider's binary.
        binary: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

impl Spec {
    /// The command: `--config`, `--listen` and (per the spec)
    /// `--json-logs`.
    pub fn command(&self) -> Command {
        let config = Arg::new("config")
            .long("config")
            .value_name("CONFIG")
            .required(true)
            .value_parser(clap::value_parser!(PathBuf))
            .env(self.config_env)
            .help("The configuration file (TOML; see the provider's README)");
        let mut listen = Arg::new("listen")
            .long("listen")
            .value_name("LISTEN")
            .value_parser(clap::value_parser!(SocketAddr))
            .help("Listen address, overriding the file's `listen`; port 0 picks one");
        if let Some(env) = self.listen_env {
            listen = listen.env(env);
        }
        let mut command =
            Command::new(self.binary).about(self.about).version(self.version).arg(config).arg(listen);
        if self.json_logs_flag {
            command = command.arg(
                Arg::new("json_logs")
                    .long("json-logs")
                    .action(ArgAction::SetTrue)
                    .help("Log JSON lines instead of text"),
            );
        }
        command
    }

    /// Parses `args` (program name first); like clap's `parse_from`, prints
    /// usage and exits on a bad command line.
    pub fn parse_from<I, T>(&self, args: I) -> Args
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        match self.try_parse_from(args) {
            Ok(args) => args,
            Err(e) => e.exit(),
        }
    }

    /// Parses `args` (program name first).
    pub fn try_parse_from<I, T>(&self, args: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = self.command().try_get_matches_from(args)?;
        Ok(Self::args_of(&matches))
    }

    fn args_of(matches: &ArgMatches) -> Args {
        Args {
            config: matches.get_one::<PathBuf>("config").cloned().unwrap_or_default(),
            listen: matches.get_one::<SocketAddr>("listen").copied(),
            json_logs: matches.try_get_one::<bool>("json_logs").ok().flatten().copied().unwrap_or(false),
        }
    }
}

/// Runs a provider process: parses `args` (program name first), loads and
/// validates the configuration file with `--listen` applied, then
/// [`start`]s `run` with it.
pub fn main<C, I, T, F, Fut, E>(spec: &Spec, args: I, run: F) -> Result<(), KitError>
where
    C: ProviderConfig + Send + 'static,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
    F: FnOnce(C, Shutdown, Ready) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let args = spec.parse_from(args);
    let config = load::<C>(&args)?;
    let json_logs = args.json_logs || config.json_logs();
    start(spec.binary, spec.ready, json_logs, |shutdown, ready| run(config, shutdown, ready))
}

/// The configuration `args` name, with `--listen` applied, validated.
pub fn load<C: ProviderConfig>(args: &Args) -> Result<C, KitError> {
    let wrap = |source| KitError::Config { path: args.config.clone(), source };
    let mut config: C = config::load(&args.config).map_err(wrap)?;
    if let Some(listen) = args.listen {
        config.set_listen(listen);
        config.validate().map_err(wrap)?;
    }
    Ok(config)
}

/// Starts the runtime and telemetry (as service `binary`), then runs `run`
/// until it returns; `run` gets the shutdown signal and the readiness line
/// (naming `ready`) to print once it listens. For a process whose command
/// line is all its own (the simulator's); [`main`] calls it for the rest.
pub fn start<F, Fut, E>(
    binary: &'static str,
    ready: &'static str,
    json_logs: bool,
    run: F,
) -> Result<(), KitError>
where
    F: FnOnce(Shutdown, Ready) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let telemetry = hcp_telemetry::TelemetryConfig { json_logs, ..Default::default() };
    let runtime = tokio::runtime::Runtime::new().map_err(KitError::Runtime)?;
    let service = ready;
    runtime.block_on(async move {
        let _telemetry = hcp_telemetry::init(binary, &telemetry).map_err(KitError::Telemetry)?;
        let shutdown: Shutdown = Box::pin(hcp_telemetry::shutdown_signal());
        let ready: Ready = Box::new(move |addr| hcp_telemetry::announce_ready(service, addr));
        run(shutdown, ready).await.map_err(|e| KitError::Run { binary, source: e.into() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        binary: "hcp-provider-test",
        ready: "provider-test",
        about: "A test provider.",
        version: "0.0.0",
        config_env: "HCP_KIT_TEST_CONFIG_UNSET",
        listen_env: Some("HCP_KIT_TEST_LISTEN_UNSET"),
        json_logs_flag: true,
    };

    #[test]
    fn the_common_flags_parse() {
        let parse = |argv: &[&str]| SPEC.try_parse_from(std::iter::once("p").chain(argv.iter().copied()));
        let args = parse(&["--config", "/etc/p.toml"]).unwrap();
        assert_eq!(args, Args { config: "/etc/p.toml".into(), listen: None, json_logs: false });
        let args = parse(&["--config", "c", "--listen", "127.0.0.1:0", "--json-logs"]).unwrap();
        assert_eq!((args.listen, args.json_logs), (Some("127.0.0.1:0".parse().unwrap()), true));
        assert!(parse(&[]).is_err(), "--config is required");
        assert!(parse(&["--config", "c", "--listen", "nowhere"]).is_err());
        let quiet = Spec { json_logs_flag: false, listen_env: None, ..SPEC };
        assert!(quiet.try_parse_from(["p", "--config", "c", "--json-logs"]).is_err());
        assert!(quiet.command().get_arguments().all(|a| a.get_env().is_none() || a.get_id() == "config"));
    }

    #[test]
    fn chains_name_every_cause() {
        let e = KitError::Config {
            path: "/p.toml".into(),
            source: ConfigError::OutOfRange { field: "f".into(), value: "0".into(), range: "1..=2".into() },
        };
        assert_eq!(chain(&e), "--config /p.toml: f: 0 is out of range, allowed 1..=2");
    }
}
