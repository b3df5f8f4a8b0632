//! Start-up: the provider built from its configuration (trust, the API
//! client, a token or a user's password), `run`, and [`StartError`] saying
//! why it could not start.

use std::sync::Arc;

use hcp_provider_sdk::support::VmLocks;

use crate::Proxmox;
use crate::client::{Credentials, Pve};
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
    /// `[auth]` names neither a token nor a user.
    #[error("auth: set token_id or username")]
    NoCredential,
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
            let read = |v: &Option<String>,
                        f: &Option<std::path::PathBuf>,
                        field: &'static str|
             -> Result<Option<String>, StartError> {
                match (v, f) {
                    (Some(v), _) => Ok(Some(v.clone())),
                    (None, Some(f)) => Ok(Some(
                        std::fs::read_to_string(f)
                            .map_err(|source| StartError::Secret { field, path: f.clone(), source })?
                            .trim()
                            .to_owned(),
                    )),
                    (None, None) => Ok(None),
                }
            };
            let missing = |field, with| StartError::Missing { field, with };
            let creds = match (&auth.token_id, &auth.username) {
                (Some(id), _) => Credentials::Token {
                    id: id.clone(),
                    secret: read(&auth.token_secret, &auth.token_secret_file, "auth.token_secret_file")?
                        .ok_or_else(|| missing("auth.token_secret", "auth.token_id"))?,
                },
                (None, Some(user)) => Credentials::Password {
                    username: user.clone(),
                    password: read(&auth.password, &auth.password_file, "auth.password_file")?
                        .ok_or_else(|| missing("auth.password", "auth.username"))?,
                },
                (None, None) => return Err(StartError::NoCredential),
            };
            pve.set_credentials(creds).await;
        }
        Ok(Self {
            pve: Arc::new(pve),
            config: Arc::new(config),
            locks: VmLocks::new(),
            version: tokio::sync::Mutex::new(None),
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
