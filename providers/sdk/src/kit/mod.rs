//! The provider kit: everything a provider process repeats around its
//! [`Provider`](crate::Provider) implementation, written once.
//!
//! - [`cli`]: the command line (`--config`, `--listen`, `--json-logs`) and
//!   the process entry ([`cli::main`]) that loads the configuration, starts
//!   the runtime and telemetry, and serves, answering a typed [`KitError`].
//! - [`config`]: strict TOML loading and [`ProviderConfig`], whose
//!   `validate` refuses a bad value at start with a [`ConfigError`] naming
//!   the field and the allowed range (nothing is clamped silently), and the
//!   `[server]` table that turns into a [`ServeConfig`](crate::ServeConfig)
//!   (unix socket and its mode, TLS files reloaded while serving).
//! - [`backoff`]: the retry delay (exponential, capped, jittered).
//! - [`url`]: `https://host[:port]/path` split into its parts.
//! - [`backings`]: HCP network names to the hypervisor's backings.
//! - [`secret`]: a secret given inline or in a file, and the field it
//!   lacks.

pub mod backings;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod secret;
pub mod url;

pub use backings::{BackingError, Backings};
pub use backoff::Backoff;
pub use cli::{KitError, Spec};
pub use config::{ConfigError, ProviderConfig, ServerConfig};
pub use secret::{Secret, SecretError};
pub use url::{HttpsUrl, UrlError, split_https_url};
