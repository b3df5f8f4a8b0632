//! The store owns all SQL. One [`Store`] with two backends, embedded SQLite
//! (the quick-start default, a file or memory) and PostgreSQL (production);
//! a module per resource holds its queries.
//!
//! Both backends run the same SQL text: placeholders are `$N` (SQLite accepts
//! them), timestamps and ids are bound from Rust and never produced by the
//! database, and the schemas in `migrations/{postgres,sqlite}` differ only in
//! column types. The [`on_pool!`] macro expands a query body once per backend
//! so that each arm is compiled against its concrete driver types. One
//! exception: the shared rate buckets ([`Store::claim_rate_tokens`]) read
//! the database's clock, which every process shares, in a statement written
//! once per backend (the clock and a few functions are spelled differently).
//!
//! Database errors become [`StoreError`] here, never further out.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

mod audit;
mod cache;
mod catalog;
mod consoles;
mod fleet;
mod guards;
mod hosts;
mod images;
mod jobs;
mod keypairs;
mod keys;
mod metrics;
pub(crate) mod outbox;
mod providers;
mod rates;
mod reconcile;
mod vms;
mod volumes;
mod webhooks;

pub use audit::{AuditQuery, ChainHead, ChainedEvent};
pub use cache::{Catalog, LOADS_MAX_AGE, Loads, MAX_AGE as CATALOG_MAX_AGE};
pub use catalog::NetworkReplace;
pub use fleet::{FleetCount, FleetQuery, FleetVm, ForceDelete, ForceDeleted, Leftover};
pub use guards::{IdempotencyRecord, Quota, QuotaUpdate, Usage};
pub use hosts::{CapacityGuard, GroupGuard, HostReport, Member};
pub use images::{ImageDeletion, ImageQuery};
pub use jobs::{Finish, ListJobsQuery, RecordedStep, StepRecord, VolumeReport};
pub use metrics::Gauges;
pub use outbox::{OutboxMessage, SUBJECT_JOBS, SUBJECT_USAGE_PREFIX, UsageEvent};
pub use rates::{RateClaim, RateLimit};
pub use reconcile::KnownVm;
pub use vms::{AcceptOperation, HostChange, ListVmsQuery, NewVm, SnapshotAccept, VmUpdate};
pub use volumes::{
    AttachTarget, CreateVolumes, ListVolumesQuery, VolumeOperation, VolumeUpdate, VolumeUsageEvent,
};
pub use webhooks::AttemptOutcome;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist (or is not visible to the caller).
    #[error("not found")]
    NotFound,
    /// A unique key is taken.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What was being inserted.
        what: String,
    },
    /// The change conflicts with the current state (a foreign key still in
    /// use, a VM that changed state meanwhile).
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a bug, a corrupt row, an unexpected database error.
    #[error("database error")]
    Internal(#[source] sqlx::Error),
    /// A stored value does not decode into the domain type.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Another request holds the idempotency key (it committed first).
    #[error("idempotency key taken by a concurrent request")]
    IdempotencyRace,
    /// A job is operating on the VM; the caller may wait for it and retry.
    #[error("{message}")]
    Busy {
        /// The job in flight.
        job: hcp_proto::ids::JobId,
        /// What to tell the caller.
        message: String,
    },
    /// The project's quota does not allow the request.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The host has no room left for the VM (its size times the zone's
    /// overcommit ratios); the caller may try another host.
    #[error("{0}")]
    NoRoom(String),
    /// The transaction lost a serialization conflict or a deadlock to a
    /// concurrent one, and kept losing after [`MAX_CONFLICT_RETRIES`]
    /// tries; the caller may try again later.
    #[error("the database aborted the transaction for a conflict with a concurrent one")]
    Contention(#[source] sqlx::Error),
    /// A PostgreSQL store needs a connection for the API and one for the
    /// job engine.
    #[error("max_connections must be at least 2, got {0}")]
    TooFewConnections(u32),
}

impl StoreError {
    /// Classifies a driver error.
    pub(crate) fn from_sqlx(err: sqlx::Error, what: &str) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) => match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    StoreError::AlreadyExists { what: what.to_owned() }
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    StoreError::Conflict(format!("{what} is referenced by other resources"))
                }
                _ if db.code().as_deref().is_some_and(means_conflict) => StoreError::Contention(err),
                _ if db.code().as_deref().is_some_and(means_unavailable) => StoreError::Unavailable(err),
                _ => StoreError::Internal(err),
            },
            // A broken or half-made connection (seen when the database goes
            // away during the connection's TLS or startup exchange) is an
            // outage, not a bug: the pool drops the connection.
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            _ => StoreError::Internal(err),
        }
    }
}

/// Whether a SQLSTATE says the transaction was aborted for a conflict with
/// a concurrent one and would likely succeed if run again: 40001
/// (serialization failure) and 40P01 (deadlock detected).
fn means_conflict(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

/// How many times a transaction aborted for a conflict is run again.
pub const MAX_CONFLICT_RETRIES: u32 = 4;

/// Runs `attempt` (one whole transaction) until it does not fail with
/// [`StoreError::Contention`], at most `1 + MAX_CONFLICT_RETRIES` times,
/// waiting a few jittered milliseconds between tries so that the two
/// sides of a deadlock do not meet again.
pub(crate) async fn retry_conflicts<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut retries = 0;
    loop {
        match attempt().await {
            Err(StoreError::Contention(source)) if retries < MAX_CONFLICT_RETRIES => {
                retries += 1;
                ::metrics::counter!("hcp_store_transaction_retries_total").increment(1);
                tracing::debug!(error = %source, retries, "transaction aborted for a conflict; running it again");
                tokio::time::sleep(conflict_pause(retries)).await;
            }
            other => return other,
        }
    }
}

/// Between 1 and `2^retries` ms, spread by the clock's nanoseconds.
fn conflict_pause(retries: u32) -> Duration {
    let span = 1u64 << retries.min(6);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    Duration::from_millis(1 + u64::from(nanos) % span)
}

/// Begins a transaction on `pool` (only through `on_pool!(transaction ..)`).
pub(crate) async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> StoreResult<sqlx::Transaction<'static, DB>> {
    pool.begin().await.map_err(|e| StoreError::from_sqlx(e, "transaction"))
}

/// Whether a SQLSTATE says the database cannot serve now, though nothing
/// is wrong with the request: class 08 (connection exceptions), 53 (out of
/// resources, e.g. 53300 too many connections), 57P01-57P03 (the server is
/// shutting down, crashed, or starting). The client is told 503 and to
/// retry.
fn means_unavailable(code: &str) -> bool {
    // 25006: a write reached a server that is read-only, a standby still
    // behind the address of the primary during a failover.
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
}

/// Short for results of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Which database the store uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    /// Connections for the job engine's own bookkeeping (claims, leases,
    /// steps, finishing, outbox marks). On PostgreSQL their commits do not
    /// wait for the WAL flush (`synchronous_commit = off`): a server crash
    /// can lose the last fraction of a second of them, which leaves a job
    /// RUNNING with a lease that lapses, and it runs again, which every
    /// provider call allows (they are idempotent). What HCP promised a client
    /// (an accepted request, a created record) is committed on `backend`,
    /// durably; since WAL is flushed in order, a durable commit also makes
    /// every engine commit before it durable. On SQLite: the same pool.
    engine: Backend,
    /// Whether changes also write outbox rows for a message queue.
    outbox: bool,
    /// The in-memory catalog and host loads (see [`cache`]).
    cache: std::sync::Arc<cache::Cache>,
}

/// Runs `$body` with `$pool` bound to the concrete pool of the store's
/// backend (or, with `engine`, of its job engine connections, see
/// [`Store::engine`]). The body is compiled once per backend.
///
/// `on_pool!(transaction self, |tx| { ... tx.commit() ... })` is the one
/// way the store opens a transaction: `tx` is begun for the body, and the
/// whole body runs again ([`retry_conflicts`]) when PostgreSQL aborts it
/// for a serialization failure or a deadlock. A body that commits nothing
/// (returns early) rolls back when `tx` is dropped.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        $crate::on_pool!(@match &$store.backend, |$pool| $body)
    };
    (engine $store:expr, |$pool:ident| $body:expr) => {
        $crate::on_pool!(@match &$store.engine, |$pool| $body)
    };
    (transaction $store:expr, |$tx:ident| $body:expr) => {
        $crate::retry_conflicts(|| async { $crate::on_pool!(@transaction &$store.backend, |$tx| $body) }).await
    };
    (engine transaction $store:expr, |$tx:ident| $body:expr) => {
        $crate::retry_conflicts(|| async { $crate::on_pool!(@transaction &$store.engine, |$tx| $body) }).await
    };
    (@transaction $backend:expr, |$tx:ident| $body:expr) => {
        match $backend {
            $crate::Backend::Sqlite(pool) => {
                let mut $tx = $crate::begin(pool).await?;
                $body
            }
            $crate::Backend::Postgres(pool) => {
                let mut $tx = $crate::begin(pool).await?;
                $body
            }
        }
    };
    (@match $backend:expr, |$pool:ident| $body:expr) => {
        match $backend {
            $crate::Backend::Sqlite($pool) => $body,
            $crate::Backend::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A domain name (a state, a job kind) as an SQL string literal:
/// `'DELETED'`. States are never spelled in SQL text: queries name them
/// through [`sql!`] or `format!` with this, from the domain's enums.
pub(crate) struct Quoted(pub(crate) &'static str);

impl std::fmt::Display for Quoted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}'", self.0)
    }
}

/// SQL text with domain names filled in once, from the enums:
/// `sql!("... WHERE status <> {vm_deleted}", vm_deleted = VmStatus::Deleted)`
/// is `"... WHERE status <> 'DELETED'"`, made on first use and then the same
/// `&'static str` (so prepared statements and partial indexes see the
/// literal, as when it was written by hand).
macro_rules! sql {
    ($text:literal $(, $name:ident = $value:expr)+ $(,)?) => {{
        static TEXT: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| format!($text $(, $name = $crate::Quoted($value.as_str()))+));
        TEXT.as_str()
    }};
}
pub(crate) use sql;

/// Reads one column, mapping a decode failure to [`StoreError::Corrupt`].
macro_rules! col {
    ($row:expr, $name:literal) => {
        sqlx::Row::try_get($row, $name).map_err(|e| $crate::StoreError::Corrupt(format!("{}: {e}", $name)))?
    };
}
pub(crate) use col;

impl Store {
    /// Connects to `url` without migrating. Accepted forms:
    /// `sqlite::memory:`, `sqlite://PATH` (created when missing),
    /// `postgres://...`.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let (backend, engine, cache) = if url.starts_with("sqlite:") {
            let memory = url.contains(":memory:") || url.contains("mode=memory");
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(StoreError::Internal)?
                .create_if_missing(true)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            let opts = if memory { opts } else { opts.journal_mode(SqliteJournalMode::Wal) };
            // SQLite allows one writer at a time; a single connection
            // serialises every statement in process, which removes
            // SQLITE_BUSY upgrades and makes an in-memory database one
            // database. The embedded store is for one core process.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "connection"))?;
            (Backend::Sqlite(pool.clone()), Backend::Sqlite(pool), cache::Cache::local())
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::from_sqlx(e, "connection"))?;
            let opts = without_loopback_tls(url, opts);
            // `max_connections` is the total: a quarter for the engine
            // (rounded up), the rest for the API.
            if max_connections < 2 {
                return Err(StoreError::TooFewConnections(max_connections));
            }
            let engine_connections = max_connections.div_ceil(4);
            let pool = PgPoolOptions::new()
                .max_connections(max_connections - engine_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts.clone())
                .await
                .map_err(|e| StoreError::from_sqlx(e, "connection"))?;
            let engine = PgPoolOptions::new()
                .max_connections(engine_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(opts.clone().options([("synchronous_commit", "off")]));
            // The catalog cache's listener has a connection of its own.
            let listener = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(opts);
            (Backend::Postgres(pool), Backend::Postgres(engine), cache::Cache::listening(listener))
        } else {
            return Err(StoreError::Corrupt(format!(
                "unsupported database url scheme in {:?} (use sqlite: or postgres:)",
                url.split(':').next().unwrap_or_default()
            )));
        };
        Ok(Self { backend, engine, outbox: false, cache })
    }

    /// Applies the embedded migrations of this backend. A database a newer
    /// release already migrated further is accepted as it is: migrations are
    /// expand-only (README "Upgrades"), so this release's processes keep
    /// working beside the newer ones during a rolling upgrade, and start
    /// again if one of them is restarted (or rolled back to) meanwhile.
    pub async fn migrate(&self) -> StoreResult<()> {
        let result = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::migrate!("../../migrations/sqlite").set_ignore_missing(true).run(pool).await
            }
            Backend::Postgres(pool) => {
                sqlx::migrate!("../../migrations/postgres").set_ignore_missing(true).run(pool).await
            }
        };
        result.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from_sqlx(e, "migration"),
            other => StoreError::Corrupt(format!("migration failed: {other}")),
        })
    }

    /// Makes accepted jobs and usage events also write outbox rows, for a
    /// publisher to send to the message queue. Off for the embedded mode.
    pub fn with_outbox(mut self, on: bool) -> Self {
        self.outbox = on;
        self
    }

    /// Whether outbox rows are written.
    pub fn outbox_enabled(&self) -> bool {
        self.outbox
    }

    /// Which backend this is.
    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, |pool| {
            sqlx::query("SELECT 1").execute(pool).await.map_err(|e| StoreError::from_sqlx(e, "ping"))?;
        });
        Ok(())
    }

    /// Closes the pools, waiting for checked-out connections.
    pub async fn close(&self) {
        self.cache.stop();
        on_pool!(self, |pool| pool.close().await);
        on_pool!(engine self, |pool| pool.close().await)
    }
}

/// TLS to a PostgreSQL on this machine (a loopback address or a unix
/// socket) only when the URL (or `PGSSLMODE`) asks for it: it protects
/// nothing there and costs every round trip. Elsewhere sqlx's default
/// (`prefer`) stands.
fn without_loopback_tls(url: &str, opts: PgConnectOptions) -> PgConnectOptions {
    let asked =
        url.contains("sslmode=") || url.contains("ssl-mode=") || std::env::var_os("PGSSLMODE").is_some();
    let host = opts.get_host();
    let local = opts.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if local && !asked { opts.ssl_mode(sqlx::postgres::PgSslMode::Disable) } else { opts }
}

fn to_u32(v: i32, column: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column}: negative value {v}")))
}

pub(crate) fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}
