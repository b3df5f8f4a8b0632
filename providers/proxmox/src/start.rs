//! Start-up: the provider built from its configuration (trust, the API
//! client, a token or a user's password), `run`, and [`StartError`] saying
//! why it could not start.

use std::sync::Arc;

use hcp_provider_sdk::support::VmLocks;

use crate::Proxmox;
use crate::client::{Credentials, Pve};
use hcp_provider_sdk::kit::Secret;

use crate::config::{Config, ConfigError};

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable (including its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The trust of `tls` could not be loaded.
    #[error(transparent)]
    Trust(hcp_tls::TrustError),
    /// The API client could not be built.
    #[error("cannot build the api client")]
    Client(#[source] crate::client::ClientError),
    /// A credential is missing, or its file cannot be read.
    #[error(transparent)]
    Secret(#[from] hcp_provider_sdk::kit::SecretError),
    /// `[auth]` names neither a token nor a user.
    #[error("auth: set token_id or username")]
    NoCredential,
    /// The serial console relay could not listen.
    #[error("serial relay on {listen}")]
    SerialRelay {
        /// `serial_listen` and `serial_port`.
        listen: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("cannot serve")]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

impl Proxmox {
    /// Builds the provider from its configuration (credentials from the
    /// config file, if any, are installed at once).
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustError` names the `tls` table itself.
        let trust = config.tls.load().map_err(StartError::Trust)?;
        let pve = Pve::new(&config.api_url, trust, config.timing.clone()).map_err(StartError::Client)?;
        if let Some(auth) = &config.auth {
            let creds = match (&auth.token_id, &auth.username) {
                (Some(id), _) => Credentials::Token {
                    id: id.clone(),
                    secret: Secret {
                        field: "auth.token_secret",
                        inline: auth.token_secret.as_deref(),
                        file_field: "auth.token_secret_file",
                        file: auth.token_secret_file.as_deref(),
                    }
                    .require("auth.token_id")?,
                },
                (None, Some(user)) => Credentials::Password {
                    username: user.clone(),
                    password: Secret {
                        field: "auth.password",
                        inline: auth.password.as_deref(),
                        file_field: "auth.password_file",
                        file: auth.password_file.as_deref(),
                    }
                    .require("auth.username")?,
                },
                (None, None) => return Err(StartError::NoCredential),
            };
            pve.set_credentials(creds).await;
        }
        let pve = Arc::new(pve);
        let listen = std::net::SocketAddr::new(config.serial_listen, config.serial_port);
        let host = config.console_host.clone().unwrap_or_default();
        let lines = Arc::new(crate::serial::SerialLines { pve: pve.clone() });
        let relay = hcp_provider_sdk::serial::SerialRelay::bind(listen, &host, lines)
            .await
            .map_err(|source| StartError::SerialRelay { listen, source })?;
        Ok(Self {
            pve,
            config: Arc::new(config),
            locks: VmLocks::new(),
            volume_locks: VmLocks::new(),
            version: tokio::sync::Mutex::new(None),
            serial: std::sync::OnceLock::from(relay),
        })
    }

    /// The API client (tests read its request counter).
    pub fn client(&self) -> &Pve {
        &self.pve
    }
}

/// Runs the provider until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(String) + Send,
) -> Result<(), StartError> {
    let serve = hcp_provider_sdk::kit::config::serve_config(&config)?;
    let provider = Proxmox::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}
