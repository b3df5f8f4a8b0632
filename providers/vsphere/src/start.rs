//! Start-up: the provider built from its configuration (trust, SOAP client,
//! credentials), `run`, and [`StartError`] saying why it could not start.

use std::collections::HashMap;
use std::sync::Arc;

use hcp_provider_sdk::support::{Failpoints, VmLocks};

use hcp_provider_sdk::kit::Secret;

use crate::config::{Config, ConfigError};
use crate::soap::Soap;
use crate::{FAILPOINTS_ENV, Vsphere};

/// Why the provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable (including its `[server]` files).
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The trust of `tls` or `console_tls` could not be loaded.
    #[error("{field}")]
    Trust {
        /// `tls` or `console_tls`.
        field: &'static str,
        /// What is wrong (its message names the `tls` table).
        #[source]
        source: hcp_tls::TrustError,
    },
    /// The SOAP client could not be built.
    #[error("cannot build the soap client")]
    Client(#[source] crate::soap::ClientError),
    /// A credential is missing, or its file cannot be read.
    #[error(transparent)]
    Secret(#[from] hcp_provider_sdk::kit::SecretError),
    /// The server failed.
    #[error("cannot serve")]
    Serve(#[from] hcp_provider_sdk::ServeError),
}

impl Vsphere {
    /// Builds the provider from its configuration (credentials from the
    /// config file, if any, are installed at once).
    pub async fn new(config: Config) -> Result<Self, StartError> {
        // `TrustError` names the `tls` table itself, so `console_tls` reads
        // `console_tls: tls: ...`, as it always did.
        let trust = config.tls.load().map_err(|source| StartError::Trust { field: "tls", source })?;
        let console_trust = match &config.console_tls {
            Some(t) => t.load().map_err(|source| StartError::Trust { field: "console_tls", source })?,
            None => trust.clone(),
        };
        let soap = Soap::new(&config.sdk_url, &trust, config.timing.clone()).map_err(StartError::Client)?;
        let vsphere_host = hcp_provider_sdk::kit::split_https_url(&config.sdk_url, 443, "/sdk")
            .map_err(|e| StartError::Client(crate::soap::ClientError::Url(e)))?
            .host;
        if let Some(auth) = &config.auth {
            let password = Secret {
                field: "auth.password",
                inline: auth.password.as_deref(),
                file_field: "auth.password_file",
                file: auth.password_file.as_deref(),
            }
            .require("auth.username")?;
            soap.set_credentials(auth.username.clone(), password).await;
        }
        let failpoints = Failpoints::from_env(FAILPOINTS_ENV);
        Ok(Self {
            soap: Arc::new(soap),
            config: Arc::new(config),
            console_trust,
            vsphere_host,
            places: tokio::sync::OnceCell::new(),
            locks: VmLocks::new(),
            lost_clones: std::sync::Mutex::new(HashMap::new()),
            host_names: std::sync::Mutex::new(HashMap::new()),
            failpoints,
        })
    }

    /// The SOAP client (tests read its counters).
    pub fn client(&self) -> &Soap {
        &self.soap
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
    let provider = Vsphere::new(config).await?;
    hcp_provider_sdk::serve(provider, serve, shutdown, ready).await?;
    Ok(())
}
