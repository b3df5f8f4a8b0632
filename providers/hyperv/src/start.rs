//! Start-up: the provider built from its configuration (trust, the
//! WS-Management client, credentials), `run`, and [`StartError`] saying why
//! it could not start.

use std::sync::Arc;
use std::time::Duration;

use hcp_provider_sdk::support::{Failpoints, VmLocks};

use crate::config::{Config, ConfigError};
use crate::wsman::{Credentials, Wsman};
use crate::{FAILPOINTS_ENV, Hyperv};

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable (including its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The trust of `tls` could not be loaded.
    #[error(transparent)]
    Trust(hcp_tls::TrustError),
    /// The WS-Management client could not be built.
    #[error("cannot build the ws-management client")]
    Client(#[source] crate::wsman::ClientError),
    /// A secret file could not be read.
    #[error("{field} {}", path.display())]
    Secret {
        /// The field naming the file.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A credential is incomplete.
    #[error("{field}: required with {with}")]
    Missing {
        /// The missing field.
        field: &'static str,
        /// The field that needs it.
        with: &'static str,
    },
    /// The server failed.
    #[error("cannot serve")]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

impl Hyperv {
    /// Builds the provider from its configuration.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustError` names the `tls` table itself.
        let trust = config.tls.load().map_err(StartError::Trust)?;
        // Validated with the configuration: at least 1 s.
        let timeout = Duration::from_secs(config.timing.request_timeout_seconds);
        let host =
            Wsman::new(&config.url, &trust, timeout, config.auth_scheme).map_err(StartError::Client)?;
        if let Some(auth) = &config.auth {
            let password = match (&auth.password, &auth.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|source| StartError::Secret {
                        field: "auth.password_file",
                        path: f.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
                (None, None) => {
                    return Err(StartError::Missing { field: "auth.password", with: "auth.username" });
                }
            };
            host.set_credentials(Credentials { username: auth.username.clone(), password });
        }
        let failpoints = Failpoints::from_env(FAILPOINTS_ENV);
        Ok(Self {
            host: Arc::new(host),
            config: Arc::new(config),
            host_name: tokio::sync::OnceCell::new(),
            locks: VmLocks::new(),
            failpoints,
        })
    }

    /// The WS-Management client (tests read its counters).
    pub fn client(&self) -> &Wsman {
        &self.host
    }
}

/// Runs the provider until `shutdown` resolves; `ready` gets the bound
/// address.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Hyperv::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}
