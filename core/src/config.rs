//! Core's configuration: one typed, strict struct (unknown keys are refused),
//! read from a TOML file, with environment overrides applied in one place
//! ([`Config::apply_env`]). Every field has a documented default, so an
//! empty file is a valid quick-start configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Environment variable overriding [`Config::database_url`].
pub const ENV_DATABASE_URL: &str = "HCP_DATABASE_URL";
/// Environment variable overriding [`Config::listen`].
pub const ENV_LISTEN: &str = "HCP_CORE_LISTEN";
/// Environment variable overriding [`AuthConfig::hs256_secret_file`].
pub const ENV_JWT_SECRET_FILE: &str = "HCP_JWT_SECRET_FILE";
/// Environment variable overriding [`SecretsConfig::key_file`].
pub const ENV_SECRETS_KEY_FILE: &str = "HCP_SECRETS_KEY_FILE";
/// Environment variable overriding [`QueueConfig::nats_url`].
pub const ENV_NATS_URL: &str = "HCP_NATS_URL";

/// Everything core needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address. Default `127.0.0.1:50051`; port 0 picks one.
    pub listen: SocketAddr,
    /// Where `/metrics` (Prometheus) is served; none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// `sqlite://PATH`, `sqlite::memory:` or `postgres://...`.
    /// Default `sqlite://hcp.db`.
    pub database_url: String,
    /// PostgreSQL connections in all (a quarter of them, at least one, for
    /// the job engine's bookkeeping). Default 16.
    pub database_max_connections: u32,
    /// Run migrations at start. Default true.
    pub migrate: bool,
    /// Which parts this process runs. Default both.
    pub roles: Roles,
    /// Token verification.
    pub auth: AuthConfig,
    /// The job engine.
    pub jobs: JobsConfig,
    /// Talking to providers.
    pub providers: ProvidersConfig,
    /// Console sessions.
    pub console: ConsoleConfig,
    /// The message queue; none means the embedded in-process queue.
    pub queue: QueueConfig,
    /// Where the key that seals provider credentials comes from.
    pub secrets: SecretsConfig,
    /// Drift detection and its policies.
    pub reconciler: crate::reconciler::ReconcilerConfig,
    /// Host drains.
    pub drain: crate::drain::DrainConfig,
    /// How long an Idempotency-Key keeps its answer, seconds. Default 86400
    /// (24 h); after that the key may be used for a new request.
    pub idempotency_key_ttl_seconds: u64,
    /// Logs and traces.
    pub telemetry: hcp_telemetry::TelemetryConfig,
    /// Admission control: load shedding, rate limits, timeouts.
    pub limits: LimitsConfig,
}

/// Admission control for the gRPC API ([`crate::admission`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls run at once by this process; more are refused with 503 at
    /// once. Default 512.
    pub max_concurrent_requests: usize,
    /// Calls per second one tenant may make to this process, on average.
    /// Callers without a tenant (operators, services) are not rate-limited.
    /// Default 200.
    pub rate_per_second: f64,
    /// How many calls a caller may save up for a burst. Default 400.
    pub burst: f64,
    /// A call answers within this many seconds or gets 504. Default 30.
    pub request_timeout_seconds: u64,
    /// Job watchers (`WatchJob`) open at once; more get 503. Default 1024.
    pub max_job_watchers: usize,
    /// A watcher is woken by job change notifications, and re-reads its
    /// job at least this often in case one was lost, seconds. Default 5.
    pub job_watch_fallback_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 512,
            rate_per_second: 200.0,
            burst: 400.0,
            request_timeout_seconds: 30,
            max_job_watchers: 1024,
            job_watch_fallback_seconds: 5,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            database_url: "sqlite://hcp.db".to_owned(),
            database_max_connections: 16,
            migrate: true,
            roles: Roles::default(),
            auth: AuthConfig::default(),
            jobs: JobsConfig::default(),
            providers: ProvidersConfig::default(),
            console: ConsoleConfig::default(),
            queue: QueueConfig::default(),
            reconciler: crate::reconciler::ReconcilerConfig::default(),
            drain: crate::drain::DrainConfig::default(),
            secrets: SecretsConfig::default(),
            idempotency_key_ttl_seconds: 86_400,
            telemetry: hcp_telemetry::TelemetryConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

/// Which parts of core a process runs; API and worker processes scale apart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Roles {
    /// Serve the gRPC API.
    pub api: bool,
    /// Run jobs, health probes, the reconciler and the audit sealer.
    pub worker: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Self { api: true, worker: true }
    }
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Required `iss` claim. Default `hcp-dev`.
    pub issuer: String,
    /// Required `aud` claim. Default `hcp`.
    pub audience: String,
    /// File holding the HS256 shared secret. Either this or
    /// `public_key_pem_file` must be set.
    pub hs256_secret_file: Option<PathBuf>,
    /// File holding an RS256 / ES256 public key (PEM).
    pub public_key_pem_file: Option<PathBuf>,
    /// Algorithm for `public_key_pem_file`: `RS256`, `RS384`, `RS512`,
    /// `PS256`, `ES256`, `ES384` or `EdDSA`.
    pub public_key_algorithm: Option<String>,
    /// An identity provider's JWKS endpoint (`https://…/jwks.json`): keys
    /// are chosen by the token's `kid`, cached per the endpoint's
    /// `Cache-Control`, and fetched again for an unknown `kid`. Exactly one
    /// of `hs256_secret_file`, `public_key_pem_file` and `jwks_url` is set.
    pub jwks_url: Option<String>,
    /// A token's `kid` unknown to the cache fetches the key set again at
    /// most this often, seconds. Default 10.
    pub jwks_min_refresh_seconds: u64,
    /// The `alg` values accepted. Default: the key's own (`HS256` for a
    /// secret, `public_key_algorithm` for a PEM key, `RS256` and `ES256`
    /// for a JWKS). `none` is never accepted, nor an HMAC algorithm with a
    /// public key or a JWKS (the key confusion attack).
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds. Default 30.
    pub leeway_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "hcp-dev".to_owned(),
            audience: "hcp".to_owned(),
            hs256_secret_file: None,
            public_key_pem_file: None,
            public_key_algorithm: None,
            jwks_url: None,
            jwks_min_refresh_seconds: 10,
            algorithms: Vec::new(),
            leeway_seconds: 30,
        }
    }
}

/// The job engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs run at once by this process. Default 16.
    pub concurrency: usize,
    /// Attempts before a job fails for good. Default 5.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter. Default 500 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 30 s.
    pub backoff_max_ms: u64,
    /// Lease length; renewed at a third of it. Default 6 s: a job whose
    /// worker died is taken over within about that long.
    pub lease_seconds: u64,
    /// On SIGTERM, how long jobs in flight may run to their end before
    /// their leases are handed back for another worker to take at once.
    /// Default 20 s.
    pub shutdown_grace_seconds: u64,
    /// A stable name for this worker (unique among live workers, e.g. the
    /// pod or host name). When set, a restarted worker hands back at start
    /// the leases its previous run held, so its jobs resume at once instead
    /// of after the lease. Default: a fresh random name per start.
    pub worker_id: Option<String>,
    /// How often idle workers look for runnable jobs in the store (the
    /// safety net under the queue). Default 1000 ms.
    pub poll_interval_ms: u64,
    /// TEST ONLY: leases lapse at once, so several workers may run one job.
    /// Exists so tests can prove they catch the duplicates this allows.
    pub unsafe_disable_leases: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            lease_seconds: 6,
            shutdown_grace_seconds: 20,
            worker_id: None,
            poll_interval_ms: 1000,
            unsafe_disable_leases: false,
        }
    }
}

/// Talking to provider processes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// Health probe period. Default 10 s.
    pub probe_interval_seconds: u64,
    /// Deadline of one provider call. Default 300 s (creating a VM can be slow).
    pub call_timeout_seconds: u64,
    /// Deadline of handshake and probe calls. Default 5 s.
    pub probe_timeout_seconds: u64,
    /// CA (PEM) that signs the certificates of `https://` providers; the
    /// system roots are not used.
    pub tls_ca_file: Option<PathBuf>,
    /// Core's client certificate (PEM) for providers that require one.
    pub tls_client_cert_file: Option<PathBuf>,
    /// Key of `tls_client_cert_file` (PEM).
    pub tls_client_key_file: Option<PathBuf>,
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        Self {
            probe_interval_seconds: 10,
            call_timeout_seconds: 300,
            probe_timeout_seconds: 5,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }
}

/// The secrets key (never stored in the database).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// File holding 64 hex digits (32 bytes). Without it, providers cannot
    /// be registered with credentials.
    pub key_file: Option<PathBuf>,
}

/// The message queue (NATS JetStream) for production deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `nats://host:4222`; unset means the embedded queue (one process).
    pub nats_url: Option<String>,
    /// Prefix of the JetStream stream names (`<prefix>_JOBS`,
    /// `<prefix>_USAGE`). Default `HCP`.
    pub stream_prefix: String,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { nats_url: None, stream_prefix: "HCP".to_owned() }
    }
}

/// Console sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Base URL of the console proxy as tenants reach it (the gateway),
    /// `ws://` or `wss://`. Default `ws://127.0.0.1:8080`.
    #[serde(deserialize_with = "websocket_base")]
    pub public_base_url: String,
    /// Seconds a token stays redeemable. Default 60.
    pub token_ttl_seconds: u64,
    /// Longest a console session stays open once connected, seconds; the
    /// proxy closes it then. Default 3600.
    pub max_session_seconds: u32,
    /// `host:port` of the gateway's RDP relay as tenants reach it (the
    /// gateway's `--console-rdp-listen`), given to RDP consoles as their
    /// `address`. Default empty: no relay is announced.
    #[serde(deserialize_with = "host_port_or_empty")]
    pub rdp_address: String,
}

fn host_port_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let address = String::deserialize(d)?;
    let valid = address.is_empty()
        || address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if !valid {
        return Err(serde::de::Error::custom(format!(
            "must be host:port (e.g. rdp.example.com:3390), got {address:?}"
        )));
    }
    Ok(address)
}

fn websocket_base<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    if !(url.starts_with("ws://") || url.starts_with("wss://")) || url.len() <= "wss://".len() {
        return Err(serde::de::Error::custom(format!(
            "must be a websocket base URL (ws://host:port or wss://host), got {url:?}"
        )));
    }
    Ok(url)
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            public_base_url: "ws://127.0.0.1:8080".to_owned(),
            token_ttl_seconds: 60,
            max_session_seconds: 3600,
            rdp_address: String::new(),
        }
    }
}

/// The configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("invalid configuration in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, which names the key.
        #[source]
        source: toml::de::Error,
    },
    /// An environment override does not parse.
    #[error("invalid value for {var}: {value:?}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies the `HCP_*` overrides from `env` (pass `std::env::vars()`).
    pub fn apply_env(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        for (k, v) in env {
            match k.as_str() {
                ENV_DATABASE_URL => self.database_url = v,
                ENV_LISTEN => {
                    self.listen = v.parse().map_err(|_| ConfigError::Env { var: ENV_LISTEN, value: v })?
                }
                ENV_JWT_SECRET_FILE => self.auth.hs256_secret_file = Some(PathBuf::from(v)),
                ENV_NATS_URL => self.queue.nats_url = Some(v),
                ENV_SECRETS_KEY_FILE => self.secrets.key_file = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.listen.port(), 50051);
        assert_eq!(c.jobs.max_attempts, 5);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("[jobs]\nmax_attempt = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_attempt"), "{err}");
    }

    #[test]
    fn console_urls_must_be_websockets() {
        let err = Config::from_toml("[console]\npublic_base_url = \"http://gw:8080\"\n").unwrap_err();
        assert!(err.to_string().contains("public_base_url") && err.to_string().contains("ws://"), "{err}");
        let err = Config::from_toml("[console]\nrdp_address = \"rdp.example.com\"\n").unwrap_err();
        assert!(err.to_string().contains("rdp_address") && err.to_string().contains("host:port"), "{err}");
        let c = Config::from_toml("[console]\nrdp_address = \"rdp.example.com:3390\"\n").unwrap();
        assert_eq!(c.console.rdp_address, "rdp.example.com:3390");
        let c = Config::from_toml("[console]\npublic_base_url = \"wss://cloud.example.com\"\n").unwrap();
        assert_eq!(c.console.max_session_seconds, 3600);
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env([(ENV_DATABASE_URL.to_owned(), "postgres://x".to_owned())]).unwrap();
        assert_eq!(c.database_url, "postgres://x");
        let err = c.apply_env([(ENV_LISTEN.to_owned(), "nope".to_owned())]).unwrap_err();
        assert!(err.to_string().contains(ENV_LISTEN));
    }
}
