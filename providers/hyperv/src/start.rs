//! Start-up: the provider built from its configuration (trust, the
//! WS-Management client, credentials), `run`, and [`StartError`] saying why
//! it could not start.

use std::sync::Arc;
use std::time::Duration;

use hcp_provider_sdk::support::{Failpoints, VmLocks};

use hcp_provider_sdk::kit::Secret;

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
    /// A credential is missing, or its file cannot be read.
    #[error(transparent)]
    Secret(#[from] hcp_provider_sdk::kit::SecretError),
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
            let password = Secret {
                field: "auth.password",
                inline: auth.password.as_deref(),
                file_field: "auth.password_file",
                file: auth.password_file.as_deref(),
            }
            .require("auth.username")?;
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
