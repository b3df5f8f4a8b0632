//! Core's configuration: one typed, strict struct (unknown keys are refused),
//! read from a TOML file, with environment overrides applied in one place
//! ([`Config::apply_env`]). Every field has a documented default, so an
//! empty file is a valid quick-start configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{MissingPolicy, OrphanPolicy, PowerPolicy};

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
/// Environment variable overriding [`QueueConfig::amqp_url`] (which holds
/// RabbitMQ's password: an environment file keeps it out of the TOML).
pub const ENV_AMQP_URL: &str = "HCP_AMQP_URL";

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
    pub reconciler: ReconcilerConfig,
    /// Host drains.
    pub drain: DrainConfig,
    /// The audit chain's anchors.
    pub audit: AuditConfig,
    /// How long an Idempotency-Key keeps its answer, seconds. Default 86400
    /// (24 h); after that the key may be used for a new request.
    pub idempotency_key_ttl_seconds: u64,
    /// Logs and traces.
    pub telemetry: hcp_telemetry::TelemetryConfig,
    /// Admission control: load shedding, rate limits, timeouts.
    pub limits: LimitsConfig,
    /// Where core may connect on a tenant's or an operator's behalf
    /// (webhooks, image imports).
    pub egress: EgressConfig,
    /// Webhook deliveries: retries and when an endpoint is disabled.
    pub webhooks: WebhooksConfig,
    /// Image imports and captures.
    pub images: ImagesConfig,
}

/// Image imports and captures (`[images]`). A download goes through the
/// `[egress]` policy (its allow-list, TLS trust and connect timeout) with
/// the bounds set here, which are an image's, not a webhook's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Where an import is downloaded and converted while its job runs (a
    /// directory per image, removed when the job ends). Default
    /// `$TMPDIR/hcp-images`.
    pub staging_dir: PathBuf,
    /// The qemu-img that inspects and converts images. Default `qemu-img`
    /// (from PATH).
    pub qemu_img: PathBuf,
    /// The largest file an import fetches, bytes. Default 68719476736
    /// (64 GiB).
    pub max_image_bytes: u64,
    /// Time for a whole download, seconds. Default 3600.
    pub download_timeout_seconds: u64,
    /// The longest a download waits for its next bytes, seconds. Default 60.
    pub stall_timeout_seconds: u64,
    /// Redirects a download follows, each checked like the first URL.
    /// Default 5.
    pub max_redirects: u8,
    /// Time for one provider's ImportImage or CaptureImage call, seconds.
    /// Default 3600.
    pub provider_timeout_seconds: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            staging_dir: std::env::temp_dir().join("hcp-images"),
            qemu_img: PathBuf::from("qemu-img"),
            max_image_bytes: 64 << 30,
            download_timeout_seconds: 3600,
            stall_timeout_seconds: 60,
            max_redirects: 5,
            provider_timeout_seconds: 3600,
        }
    }
}

/// Outbound connections to URLs tenants and operators give (`[egress]`):
/// the one policy for webhooks and image import (`crate::egress`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Allow plain http URLs. Default false; `hcp up` (development mode)
    /// sets it.
    pub allow_http: bool,
    /// Address ranges (CIDR) the operator opts into although they are
    /// denied by default (loopback, private, link-local, ...), e.g.
    /// `["127.0.0.0/8"]`. Default none.
    pub allow_networks: Vec<String>,
    /// PEM file of CA certificates trusted besides the system's. Default none.
    pub ca_file: Option<PathBuf>,
    /// Time to connect (TCP, then TLS), seconds. Default 5.
    pub connect_timeout_seconds: u64,
    /// Time for a whole request, seconds. Default 10.
    pub timeout_seconds: u64,
    /// Most response body bytes read. Default 65536.
    pub max_response_bytes: u64,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow_http: false,
            allow_networks: Vec::new(),
            ca_file: None,
            connect_timeout_seconds: 5,
            timeout_seconds: 10,
            max_response_bytes: 65_536,
        }
    }
}

/// Webhook deliveries (`[webhooks]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The wait after a delivery's first failed attempt, milliseconds;
    /// each further failure doubles it (with jitter). Default 1000.
    pub backoff_base_ms: u64,
    /// The longest wait between attempts, milliseconds. Default 600000.
    pub backoff_max_ms: u64,
    /// Failed attempts in a row (any delivery) that disable an endpoint.
    /// Default 1000.
    pub disable_after_failures: u32,
    /// Failing this long without a success disables an endpoint, seconds.
    /// Default 259200 (3 days).
    pub disable_after_seconds: u64,
    /// How often the delivery worker looks for due deliveries when no
    /// job change woke it, milliseconds. Default 1000.
    pub poll_interval_ms: u64,
    /// Deliveries sent at once. Default 16.
    pub concurrency: u32,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            backoff_base_ms: 1000,
            backoff_max_ms: 600_000,
            disable_after_failures: 1000,
            disable_after_seconds: 259_200,
            poll_interval_ms: 1000,
            concurrency: 16,
        }
    }
}

/// Admission control for the gRPC API (the `admission` layer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls run at once by this process; more are refused with 503 at
    /// once. Default 512.
    pub max_concurrent_requests: usize,
    /// Calls per second one tenant may make, on average, to all API
    /// processes together (they share each tenant's bucket through the
    /// database; see [`crate::admission`] for the exact bound). Callers
    /// without a tenant (operators, services) are not rate-limited. Every
    /// API process must have the same value. Default 200.
    pub rate_per_second: f64,
    /// How many calls a tenant may save up for a burst. Every API process
    /// must have the same value. Default 400.
    pub burst: f64,
    /// A call answers within this many seconds or gets 504. Default 30.
    pub request_timeout_seconds: u64,
    /// Job watchers (`WatchJob`) open at once; more get 503. Default 1024.
    pub max_job_watchers: usize,
    /// A watcher is woken by job change notifications, and re-reads its
    /// job at least this often in case one was lost, seconds. Default 5.
    pub job_watch_fallback_seconds: u64,
}

impl LimitsConfig {
    /// The per-tenant rate limit, refused (naming the setting) as
    /// [`Config::validate`] refuses it.
    pub fn rate_limit(&self) -> Result<crate::store::RateLimit, Invalid> {
        crate::store::RateLimit::new(self.rate_per_second, self.burst).ok_or_else(|| {
            if self.rate_per_second.is_finite() && self.rate_per_second > 0.0 {
                Invalid::new("limits.burst", Allowed::AtLeast(1.0).to_string(), self.burst)
            } else {
                Invalid::new("limits.rate_per_second", Allowed::AboveZero.to_string(), self.rate_per_second)
            }
        })
    }
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
            reconciler: ReconcilerConfig::default(),
            drain: DrainConfig::default(),
            audit: AuditConfig::default(),
            secrets: SecretsConfig::default(),
            idempotency_key_ttl_seconds: 86_400,
            telemetry: hcp_telemetry::TelemetryConfig::default(),
            limits: LimitsConfig::default(),
            egress: EgressConfig::default(),
            webhooks: WebhooksConfig::default(),
            images: ImagesConfig::default(),
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
    /// How often a worker running a job asks the store whether its
    /// cancellation was requested (besides being woken by the job's change
    /// notification). It bounds how long a provider that ignores the
    /// cancellation keeps the job: the worker drops the provider call then
    /// and does not wait for it. Default 1000 ms; 50 to 60000.
    pub cancel_check_ms: u64,
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
            cancel_check_ms: 1000,
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
    /// CA (PEM) that signs the certificates of `https://` providers
    /// registered without a `tls.ca_pem` of their own; the system roots are
    /// not used. Read and checked at start.
    pub tls_ca_file: Option<PathBuf>,
    /// Core's client certificate (PEM) for providers that require one and
    /// were registered without a `tls.client_cert_pem` of their own. Set
    /// with `tls_client_key_file` or not at all.
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
    /// File holding a key of 64 hex digits (32 bytes), or several, one a
    /// line: the first seals, the ones after it are older keys that still
    /// open and verify what they sealed. It seals provider credentials, and
    /// the audit chain's key is derived from it. Without it, providers
    /// cannot be registered with credentials and audit events are sealed
    /// without a key (`verify` then reports the chain as unkeyed).
    pub key_file: Option<PathBuf>,
}

/// Where the audit chain's head is exported (`[audit]`), so that it can be
/// checked against a record outside the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The sealer exports the head (a log line with target `audit_head`,
    /// and a line of `anchor_file`) at most this often, when it moved,
    /// seconds. Default 60.
    pub anchor_interval_seconds: u64,
    /// A file the sealer appends one line to per export
    /// (`audit_head seq=.. hash=.. key_id=.. at=..`); created when missing.
    /// Checked at start by worker processes, which refuse to start when
    /// they cannot append to it. Default none.
    pub anchor_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { anchor_interval_seconds: 60, anchor_file: None }
    }
}

/// Which broker carries jobs between processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// No broker: the in-process queue of one `hcp up` process.
    Embedded,
    /// NATS JetStream (`nats_url`).
    Nats,
    /// RabbitMQ (`amqp_url`).
    #[serde(rename = "rabbitmq")]
    RabbitMq,
}

impl std::fmt::Display for QueueBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueBackend::Embedded => "embedded",
            QueueBackend::Nats => "nats",
            QueueBackend::RabbitMq => "rabbitmq",
        })
    }
}

/// The message queue for production deployments: NATS JetStream or
/// RabbitMQ.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `nats`, `rabbitmq` or `embedded`. Unset: `nats` when `nats_url` is
    /// set, `rabbitmq` when `amqp_url` is, else `embedded`.
    pub backend: Option<QueueBackend>,
    /// `nats://host:4222`, or several such URLs separated by commas (every
    /// node of a NATS cluster, so that core reaches the cluster while any
    /// one node is down).
    pub nats_url: Option<String>,
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`), or several
    /// separated by commas (the nodes of a RabbitMQ cluster, tried in turn).
    pub amqp_url: Option<String>,
    /// Prefix of the broker's names: JetStream streams `<prefix>_JOBS` and
    /// `<prefix>_USAGE`; RabbitMQ exchanges and queues `<prefix>.jobs`,
    /// `<prefix>.usage`, ... Default `HCP`.
    pub stream_prefix: String,
    /// Replicas of each stream (1 to 5, JetStream's limit). Unset: 3 when
    /// JetStream can place three (a cluster with at least three JetStream
    /// servers), else 1. An existing stream is changed to this count.
    pub stream_replicas: Option<u8>,
    /// RabbitMQ: job messages a worker holds unacknowledged at most (1 to
    /// 1000). Default 64.
    pub prefetch: u16,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            backend: None,
            nats_url: None,
            amqp_url: None,
            stream_prefix: "HCP".to_owned(),
            stream_replicas: None,
            prefetch: 64,
        }
    }
}

impl QueueConfig {
    /// The broker in use.
    pub fn backend(&self) -> QueueBackend {
        self.backend.unwrap_or(match (&self.nats_url, &self.amqp_url) {
            (Some(_), _) => QueueBackend::Nats,
            (None, Some(_)) => QueueBackend::RabbitMq,
            (None, None) => QueueBackend::Embedded,
        })
    }

    /// The NATS servers `nats_url` names, in order; none when it is unset.
    pub fn nats_servers(&self) -> Option<Vec<String>> {
        self.nats_url.as_deref().map(split_urls)
    }

    /// The RabbitMQ servers `amqp_url` names, in order; none when it is
    /// unset.
    pub fn amqp_servers(&self) -> Option<Vec<String>> {
        self.amqp_url.as_deref().map(split_urls)
    }

    /// Refuses a backend without its URL, a URL for another backend than
    /// the one chosen (a configuration that does not do what it says), and
    /// URLs that are not the backend's.
    fn check_backend(&self) -> Result<(), Invalid> {
        let backend = self.backend();
        let nats = ("queue.nats_url", self.nats_url.is_some());
        let amqp = ("queue.amqp_url", self.amqp_url.is_some());
        let (own, others) = match backend {
            QueueBackend::Nats => (Some(nats), vec![amqp]),
            QueueBackend::RabbitMq => (Some(amqp), vec![nats]),
            QueueBackend::Embedded => (None, vec![nats, amqp]),
        };
        if let Some((other, _)) = others.iter().find(|(_, set)| *set) {
            return Err(Invalid::new(
                "queue.backend",
                format!("a backend that uses the URLs given ({other} is set)"),
                backend.to_string(),
            ));
        }
        if let Some((field, false)) = own {
            return Err(Invalid::new(field, format!("set for backend = \"{backend}\""), "unset".to_owned()));
        }
        // The clients would retry a server they cannot parse forever
        // instead of failing.
        check_url_list(
            "queue.nats_url",
            self.nats_url.as_deref(),
            "one or more NATS server URLs separated by commas (nats://host:4222)",
            |u| u.parse::<async_nats::ServerAddr>().is_ok(),
        )?;
        check_url_list(
            "queue.amqp_url",
            self.amqp_url.as_deref(),
            "one or more AMQP URLs separated by commas (amqp://user:password@host:5672/vhost)",
            |u| {
                (u.starts_with("amqp://") || u.starts_with("amqps://"))
                    && <lapin::uri::AMQPUri as std::str::FromStr>::from_str(u).is_ok()
            },
        )
    }
}

/// Refuses a comma-separated URL list (`field`, when set) that names no
/// server or holds an entry `valid` refuses, showing the entry without its
/// password.
fn check_url_list(
    field: &'static str,
    list: Option<&str>,
    allowed: &str,
    valid: impl Fn(&str) -> bool,
) -> Result<(), Invalid> {
    let Some(list) = list else { return Ok(()) };
    let invalid = |got: &str| {
        let shown: String = redact_url(got).chars().take(120).collect();
        Invalid::new(field, allowed.to_owned(), format!("{shown:?}"))
    };
    let servers = split_urls(list);
    if servers.is_empty() {
        return Err(invalid(list));
    }
    match servers.iter().find(|s| !valid(s)) {
        Some(bad) => Err(invalid(bad)),
        None => Ok(()),
    }
}

/// `url` with the password of its user part replaced by `***`, for logs and
/// messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The URLs of a comma-separated list, trimmed.
fn split_urls(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
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

/// Reconciler settings (`[reconciler]` in core's configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilerConfig {
    /// Period between passes. Default 60 s.
    pub interval_seconds: u64,
    /// Policy for VMs missing on the hypervisor. Default report.
    pub missing: MissingPolicy,
    /// Policy for power drift. Default report.
    pub power: PowerPolicy,
    /// Policy for orphans. Default report.
    pub orphan: OrphanPolicy,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            interval_seconds: 60,
            missing: MissingPolicy::default(),
            power: PowerPolicy::default(),
            orphan: OrphanPolicy::default(),
        }
    }
}

/// Drain settings (`[drain]` in core's configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Moves in flight per draining host. Default 4.
    pub concurrency: u32,
    /// Period between passes, milliseconds. Default 500. While a drain is
    /// in progress a pass also follows every job change (a move that
    /// finished frees a slot), at most one per 10 ms.
    pub interval_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { concurrency: 4, interval_ms: 500 }
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
    /// A value is outside its allowed range.
    #[error("invalid configuration in {path}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which field, and what it allows.
        #[source]
        source: Invalid,
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

/// A configuration value outside its allowed range: the field as written in
/// the file (`jobs.lease_seconds`), what it allows, and what it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {allowed}, got {got}")]
pub struct Invalid {
    /// The field, dotted as in the file.
    pub field: &'static str,
    /// The allowed range, in words.
    pub allowed: String,
    /// The value found.
    pub got: String,
}

impl Invalid {
    fn new(field: &'static str, allowed: String, got: impl std::fmt::Display) -> Self {
        Self { field, allowed, got: got.to_string() }
    }
}

/// What a numeric setting allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allowed {
    /// `min..=max`.
    Range {
        /// The smallest value.
        min: f64,
        /// The largest value.
        max: f64,
    },
    /// From another setting's value up to `max`.
    FromField {
        /// The setting whose value is the minimum.
        min: &'static str,
        /// The largest value.
        max: f64,
    },
    /// A finite number of at least `min`.
    AtLeast(f64),
    /// A finite number above zero.
    AboveZero,
}

impl std::fmt::Display for Allowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Allowed::Range { min, max } => write!(f, "between {min} and {max}"),
            Allowed::FromField { min, max } => write!(f, "between {min} and {max}"),
            Allowed::AtLeast(min) => write!(f, "at least {min}"),
            Allowed::AboveZero => write!(f, "a number above 0"),
        }
    }
}

/// The allowed range of one numeric setting, as [`Config::validate`]
/// applies it and the README's configuration reference lists it.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The field, dotted as in the file.
    pub field: &'static str,
    /// What it allows.
    pub allowed: Allowed,
    value: fn(&Config) -> f64,
}

impl Bound {
    const fn new(field: &'static str, allowed: Allowed, value: fn(&Config) -> f64) -> Self {
        Self { field, allowed, value }
    }

    const fn range(field: &'static str, min: f64, max: f64, value: fn(&Config) -> f64) -> Self {
        Self::new(field, Allowed::Range { min, max }, value)
    }

    /// The value's check against `config`.
    pub fn check(&self, config: &Config) -> Result<(), Invalid> {
        let value = (self.value)(config);
        let ok = value.is_finite()
            && match self.allowed {
                Allowed::Range { min, max } => (min..=max).contains(&value),
                Allowed::FromField { min, max } => {
                    let min = bounds().iter().find(|b| b.field == min).map_or(0.0, |b| (b.value)(config));
                    (min..=max).contains(&value)
                }
                Allowed::AtLeast(min) => value >= min,
                Allowed::AboveZero => value > 0.0,
            };
        if ok {
            return Ok(());
        }
        let allowed = match self.allowed {
            Allowed::FromField { min, max } => {
                let from = bounds().iter().find(|b| b.field == min).map_or(0.0, |b| (b.value)(config));
                format!("between {min} ({from}) and {max}")
            }
            other => other.to_string(),
        };
        Err(Invalid::new(self.field, allowed, value))
    }
}

/// Every numeric setting's allowed range. A setting missing here takes any
/// value its type holds.
pub fn bounds() -> &'static [Bound] {
    use Allowed::{AboveZero, AtLeast, FromField};
    const DAY: f64 = 86_400.0;
    const BOUNDS: &[Bound] = &[
        // Core keeps a quarter of its connections (rounded up) for the job
        // engine and the rest for the API: at least one each.
        Bound::range("database_max_connections", 2.0, 10_000.0, |c| c.database_max_connections as f64),
        Bound::range("idempotency_key_ttl_seconds", 1.0, 366.0 * DAY, |c| {
            c.idempotency_key_ttl_seconds as f64
        }),
        Bound::range("jobs.concurrency", 1.0, 4096.0, |c| c.jobs.concurrency as f64),
        Bound::range("jobs.max_attempts", 1.0, 1000.0, |c| f64::from(c.jobs.max_attempts)),
        Bound::range("jobs.backoff_base_ms", 1.0, 1000.0 * DAY, |c| c.jobs.backoff_base_ms as f64),
        Bound::new(
            "jobs.backoff_max_ms",
            FromField { min: "jobs.backoff_base_ms", max: 1000.0 * DAY },
            |c| c.jobs.backoff_max_ms as f64,
        ),
        // Leases are renewed at a third of their length.
        Bound::range("jobs.lease_seconds", 2.0, 3600.0, |c| c.jobs.lease_seconds as f64),
        Bound::range("jobs.shutdown_grace_seconds", 0.0, 3600.0, |c| c.jobs.shutdown_grace_seconds as f64),
        Bound::range("jobs.poll_interval_ms", 10.0, 1000.0 * DAY, |c| c.jobs.poll_interval_ms as f64),
        Bound::range("jobs.cancel_check_ms", 50.0, 60000.0, |c| c.jobs.cancel_check_ms as f64),
        Bound::range("auth.jwks_min_refresh_seconds", 1.0, DAY, |c| c.auth.jwks_min_refresh_seconds as f64),
        Bound::range("providers.probe_interval_seconds", 1.0, DAY, |c| {
            c.providers.probe_interval_seconds as f64
        }),
        Bound::range("providers.call_timeout_seconds", 1.0, DAY, |c| c.providers.call_timeout_seconds as f64),
        Bound::range("providers.probe_timeout_seconds", 1.0, 3600.0, |c| {
            c.providers.probe_timeout_seconds as f64
        }),
        Bound::range("console.token_ttl_seconds", 1.0, DAY, |c| c.console.token_ttl_seconds as f64),
        Bound::range("console.max_session_seconds", 1.0, 7.0 * DAY, |c| {
            f64::from(c.console.max_session_seconds)
        }),
        Bound::range("limits.max_concurrent_requests", 1.0, 1e6, |c| c.limits.max_concurrent_requests as f64),
        Bound::new("limits.rate_per_second", AboveZero, |c| c.limits.rate_per_second),
        Bound::new("limits.burst", AtLeast(1.0), |c| c.limits.burst),
        Bound::range("limits.request_timeout_seconds", 1.0, 3600.0, |c| {
            c.limits.request_timeout_seconds as f64
        }),
        Bound::range("limits.max_job_watchers", 1.0, 1e6, |c| c.limits.max_job_watchers as f64),
        Bound::range("limits.job_watch_fallback_seconds", 1.0, DAY, |c| {
            c.limits.job_watch_fallback_seconds as f64
        }),
        Bound::range("reconciler.interval_seconds", 1.0, DAY, |c| c.reconciler.interval_seconds as f64),
        Bound::range("drain.concurrency", 1.0, 1000.0, |c| f64::from(c.drain.concurrency)),
        Bound::range("drain.interval_ms", 50.0, 3_600_000.0, |c| c.drain.interval_ms as f64),
        Bound::range("audit.anchor_interval_seconds", 1.0, DAY, |c| c.audit.anchor_interval_seconds as f64),
        Bound::range("egress.connect_timeout_seconds", 1.0, 60.0, |c| {
            c.egress.connect_timeout_seconds as f64
        }),
        Bound::new(
            "egress.timeout_seconds",
            FromField { min: "egress.connect_timeout_seconds", max: 300.0 },
            |c| c.egress.timeout_seconds as f64,
        ),
        Bound::range("egress.max_response_bytes", 1.0, 16_777_216.0, |c| c.egress.max_response_bytes as f64),
        Bound::range("webhooks.backoff_base_ms", 10.0, 3_600_000.0, |c| c.webhooks.backoff_base_ms as f64),
        Bound::new(
            "webhooks.backoff_max_ms",
            FromField { min: "webhooks.backoff_base_ms", max: DAY * 1000.0 },
            |c| c.webhooks.backoff_max_ms as f64,
        ),
        Bound::range("webhooks.disable_after_failures", 1.0, 1e9, |c| {
            f64::from(c.webhooks.disable_after_failures)
        }),
        Bound::range("webhooks.disable_after_seconds", 1.0, 366.0 * DAY, |c| {
            c.webhooks.disable_after_seconds as f64
        }),
        Bound::range("webhooks.poll_interval_ms", 10.0, 3_600_000.0, |c| c.webhooks.poll_interval_ms as f64),
        Bound::range("webhooks.concurrency", 1.0, 1024.0, |c| f64::from(c.webhooks.concurrency)),
        Bound::range("images.max_image_bytes", 1.0, 17_592_186_044_416.0, |c| {
            c.images.max_image_bytes as f64
        }),
        Bound::range("images.download_timeout_seconds", 1.0, DAY, |c| {
            c.images.download_timeout_seconds as f64
        }),
        Bound::range("images.stall_timeout_seconds", 1.0, 3600.0, |c| c.images.stall_timeout_seconds as f64),
        Bound::range("images.max_redirects", 0.0, 20.0, |c| f64::from(c.images.max_redirects)),
        Bound::range("images.provider_timeout_seconds", 1.0, DAY, |c| {
            c.images.provider_timeout_seconds as f64
        }),
        // JetStream keeps at most 5 replicas; unset is checked as 1 (it
        // becomes 1 or 3, both allowed).
        Bound::range("queue.stream_replicas", 1.0, 5.0, |c| c.queue.stream_replicas.map_or(1.0, f64::from)),
        Bound::range("queue.prefetch", 1.0, 1000.0, |c| f64::from(c.queue.prefetch)),
    ];
    BOUNDS
}

/// The README's configuration reference: one table row per bound.
pub fn bounds_table() -> String {
    let mut table = String::from("| setting | allowed |\n|---|---|\n");
    for b in bounds() {
        table.push_str(&format!("| `{}` | {} |\n", b.field, b.allowed));
    }
    table
}

impl Config {
    /// Reads a TOML file and checks its values ([`Config::validate`]).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config =
            Self::from_toml(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate().map_err(|source| ConfigError::Invalid { path: path.to_owned(), source })?;
        Ok(config)
    }

    /// Checks every value against its allowed range ([`bounds`]); the
    /// first one outside it is named. Nothing is clamped: a value HCP
    /// cannot honour is refused at start rather than silently changed.
    pub fn validate(&self) -> Result<(), Invalid> {
        bounds().iter().try_for_each(|b| b.check(self))?;
        self.queue.check_backend()
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
                ENV_AMQP_URL => self.queue.amqp_url = Some(v),
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

    /// Each row: a file, the field the refusal must name, and the range.
    #[test]
    fn values_outside_their_range_are_refused_naming_the_field() {
        let rows: &[(&str, &str, &str)] = &[
            ("database_max_connections = 1", "database_max_connections", "between 2 and 10000, got 1"),
            ("idempotency_key_ttl_seconds = 0", "idempotency_key_ttl_seconds", "between 1 and"),
            ("[jobs]\nconcurrency = 0", "jobs.concurrency", "between 1 and 4096, got 0"),
            ("[jobs]\nmax_attempts = 0", "jobs.max_attempts", "between 1 and 1000, got 0"),
            ("[jobs]\nbackoff_base_ms = 0", "jobs.backoff_base_ms", "got 0"),
            (
                "[jobs]\nbackoff_base_ms = 900\nbackoff_max_ms = 800",
                "jobs.backoff_max_ms",
                "between jobs.backoff_base_ms (900) and 86400000, got 800",
            ),
            ("[jobs]\nlease_seconds = 1", "jobs.lease_seconds", "between 2 and 3600, got 1"),
            (
                "[jobs]\nshutdown_grace_seconds = 3601",
                "jobs.shutdown_grace_seconds",
                "between 0 and 3600, got 3601",
            ),
            ("[jobs]\npoll_interval_ms = 5", "jobs.poll_interval_ms", "between 10 and"),
            ("[jobs]\ncancel_check_ms = 49", "jobs.cancel_check_ms", "between 50 and 60000, got 49"),
            ("[auth]\njwks_min_refresh_seconds = 0", "auth.jwks_min_refresh_seconds", "got 0"),
            ("[providers]\nprobe_interval_seconds = 0", "providers.probe_interval_seconds", "got 0"),
            ("[providers]\ncall_timeout_seconds = 0", "providers.call_timeout_seconds", "got 0"),
            ("[providers]\nprobe_timeout_seconds = 0", "providers.probe_timeout_seconds", "got 0"),
            ("[console]\ntoken_ttl_seconds = 0", "console.token_ttl_seconds", "got 0"),
            ("[console]\nmax_session_seconds = 0", "console.max_session_seconds", "got 0"),
            ("[limits]\nmax_concurrent_requests = 0", "limits.max_concurrent_requests", "got 0"),
            ("[limits]\nrate_per_second = 0.0", "limits.rate_per_second", "a number above 0, got 0"),
            ("[limits]\nrate_per_second = -3.0", "limits.rate_per_second", "got -3"),
            ("[limits]\nrate_per_second = nan", "limits.rate_per_second", "got NaN"),
            ("[limits]\nburst = inf", "limits.burst", "got inf"),
            ("[limits]\nburst = 0.5", "limits.burst", "at least 1, got 0.5"),
            ("[limits]\nrequest_timeout_seconds = 0", "limits.request_timeout_seconds", "got 0"),
            ("[limits]\nmax_job_watchers = 0", "limits.max_job_watchers", "got 0"),
            ("[limits]\njob_watch_fallback_seconds = 0", "limits.job_watch_fallback_seconds", "got 0"),
            ("[reconciler]\ninterval_seconds = 0", "reconciler.interval_seconds", "got 0"),
            ("[drain]\nconcurrency = 0", "drain.concurrency", "got 0"),
            ("[drain]\ninterval_ms = 10", "drain.interval_ms", "between 50 and 3600000, got 10"),
            (
                "[audit]\nanchor_interval_seconds = 0",
                "audit.anchor_interval_seconds",
                "between 1 and 86400, got 0",
            ),
            (
                "[egress]\nconnect_timeout_seconds = 0",
                "egress.connect_timeout_seconds",
                "between 1 and 60, got 0",
            ),
            (
                "[egress]\nconnect_timeout_seconds = 9\ntimeout_seconds = 8",
                "egress.timeout_seconds",
                "between egress.connect_timeout_seconds (9) and 300, got 8",
            ),
            ("[egress]\nmax_response_bytes = 0", "egress.max_response_bytes", "got 0"),
            ("[webhooks]\nbackoff_base_ms = 5", "webhooks.backoff_base_ms", "between 10 and 3600000, got 5"),
            (
                "[webhooks]\nbackoff_base_ms = 900\nbackoff_max_ms = 800",
                "webhooks.backoff_max_ms",
                "between webhooks.backoff_base_ms (900) and 86400000, got 800",
            ),
            ("[webhooks]\ndisable_after_failures = 0", "webhooks.disable_after_failures", "got 0"),
            ("[webhooks]\ndisable_after_seconds = 0", "webhooks.disable_after_seconds", "got 0"),
            ("[webhooks]\npoll_interval_ms = 1", "webhooks.poll_interval_ms", "got 1"),
            ("[webhooks]\nconcurrency = 0", "webhooks.concurrency", "got 0"),
            ("[images]\nmax_image_bytes = 0", "images.max_image_bytes", "got 0"),
            ("[images]\ndownload_timeout_seconds = 0", "images.download_timeout_seconds", "got 0"),
            ("[images]\nstall_timeout_seconds = 3601", "images.stall_timeout_seconds", "got 3601"),
            ("[images]\nmax_redirects = 21", "images.max_redirects", "got 21"),
            ("[images]\nprovider_timeout_seconds = 0", "images.provider_timeout_seconds", "got 0"),
            ("[queue]\nstream_replicas = 0", "queue.stream_replicas", "between 1 and 5, got 0"),
            ("[queue]\nstream_replicas = 6", "queue.stream_replicas", "between 1 and 5, got 6"),
            ("[queue]\nprefetch = 0", "queue.prefetch", "between 1 and 1000, got 0"),
            ("[queue]\nprefetch = 1001", "queue.prefetch", "between 1 and 1000, got 1001"),
        ];
        for (toml, field, says) in rows {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert_eq!(err.field, *field, "{toml}");
            assert!(err.to_string().starts_with(field) && err.to_string().contains(says), "{toml}: {err}");
        }
        for b in bounds() {
            assert!(rows.iter().any(|(_, field, _)| field == &b.field), "no row refuses {}", b.field);
        }
        Config::default().validate().unwrap();
        // The smallest values the tests and the benchmark use are allowed.
        let small = "[jobs]\nlease_seconds = 2\npoll_interval_ms = 20\n[drain]\ninterval_ms = 50\n";
        Config::from_toml(small).unwrap().validate().unwrap();
    }

    #[test]
    fn the_rate_limit_is_refused_naming_its_setting() {
        let limit = |toml| Config::from_toml(toml).unwrap().limits.rate_limit();
        let default = limit("").unwrap();
        assert_eq!((default.rate_per_second(), default.burst()), (200.0, 400.0));
        assert_eq!(limit("[limits]\nrate_per_second = 0.0").unwrap_err().field, "limits.rate_per_second");
        assert_eq!(limit("[limits]\nrate_per_second = inf").unwrap_err().field, "limits.rate_per_second");
        let err = limit("[limits]\nburst = 0.5").unwrap_err();
        assert_eq!(err.to_string(), "limits.burst must be at least 1, got 0.5");
    }

    #[test]
    fn nats_url_names_one_server_or_several() {
        let servers = |toml| Config::from_toml(toml).unwrap().queue.nats_servers();
        assert_eq!(servers(""), None);
        assert_eq!(servers("[queue]\nnats_url = \"nats://a:4222\"").unwrap(), ["nats://a:4222"]);
        assert_eq!(
            servers("[queue]\nnats_url = \"nats://a:4222, nats://b:4222,nats://c:4222\"").unwrap(),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        let c = Config::from_toml("[queue]\nstream_replicas = 3").unwrap();
        assert_eq!(c.queue.stream_replicas, Some(3));
        c.validate().unwrap();
        // A list naming no server, or something that is not a NATS URL, is
        // refused at start, naming the field and the bad entry.
        for (toml, bad) in [
            ("nats_url = \" , \"", "\" , \""),
            ("nats_url = \"\"", "\"\""),
            ("nats_url = \"nats://a:4222,not a url\"", "\"not a url\""),
            ("nats_url = \"nats://a:99999\"", "\"nats://a:99999\""),
        ] {
            let err = Config::from_toml(&format!("[queue]\n{toml}")).unwrap().validate().unwrap_err();
            assert_eq!(err.field, "queue.nats_url", "{toml}");
            assert!(err.to_string().contains(bad), "{toml}: {err}");
        }
    }

    #[test]
    fn the_queue_backend_is_chosen_by_its_url_or_named_with_it() {
        let backend = |toml: &str| {
            let c = Config::from_toml(&format!("[queue]\n{toml}")).unwrap();
            c.validate().map(|()| c.queue.backend())
        };
        assert_eq!(backend("").unwrap(), QueueBackend::Embedded);
        assert_eq!(backend("nats_url = \"nats://a:4222\"").unwrap(), QueueBackend::Nats);
        assert_eq!(backend("amqp_url = \"amqp://u:p@a:5672/%2f\"").unwrap(), QueueBackend::RabbitMq);
        assert_eq!(
            backend("backend = \"rabbitmq\"\namqp_url = \"amqps://u:p@a:5671/hcp, amqp://b\"").unwrap(),
            QueueBackend::RabbitMq
        );
        let c = Config::from_toml("[queue]\namqp_url = \"amqp://a, amqp://b:5673\"").unwrap();
        assert_eq!(c.queue.amqp_servers().unwrap(), ["amqp://a", "amqp://b:5673"]);
        // Each refused naming the field at fault, and never showing a
        // password.
        for (toml, field, says) in [
            ("backend = \"rabbitmq\"", "queue.amqp_url", "set for backend = \"rabbitmq\""),
            ("backend = \"nats\"", "queue.nats_url", "unset"),
            (
                "backend = \"nats\"\nnats_url = \"nats://a\"\namqp_url = \"amqp://a\"",
                "queue.backend",
                "queue.amqp_url is set",
            ),
            (
                "backend = \"rabbitmq\"\nnats_url = \"nats://a\"\namqp_url = \"amqp://a\"",
                "queue.backend",
                "queue.nats_url is set",
            ),
            ("nats_url = \"nats://a\"\namqp_url = \"amqp://a\"", "queue.backend", "queue.amqp_url is set"),
            ("backend = \"embedded\"\namqp_url = \"amqp://a\"", "queue.backend", "is set"),
            ("amqp_url = \"http://u:hunter2@a\"", "queue.amqp_url", "@a"),
            ("amqp_url = \" , \"", "queue.amqp_url", "AMQP URLs"),
            ("amqp_url = \"amqp://a:99999\"", "queue.amqp_url", "amqp://a:99999"),
            ("amqp_url = \"amqp://a\"\nprefetch = 0", "queue.prefetch", "between 1 and 1000, got 0"),
        ] {
            let err = backend(toml).unwrap_err();
            assert_eq!(err.field, field, "{toml}: {err}");
            assert!(err.to_string().contains(says), "{toml}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{toml}: {err}");
        }
        assert!(Config::from_toml("[queue]\nbackend = \"kafka\"").is_err());
    }

    #[test]
    fn passwords_stay_out_of_logs_and_messages() {
        assert_eq!(redact_url("amqp://hcp:s3cret@mq-1:5672/%2f"), "amqp://hcp:***@mq-1:5672/%2f");
        assert_eq!(redact_url("nats://u:p@w@n1:4222"), "nats://u:***@n1:4222");
        assert_eq!(redact_url("amqp://hcp@mq-1"), "amqp://hcp@mq-1");
        assert_eq!(redact_url("amqp://mq-1:5672"), "amqp://mq-1:5672");
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
