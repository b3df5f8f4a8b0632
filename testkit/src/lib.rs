//! Test support for HCP's own tests, so that a system test reads like a
//! user story:
//! - [`db::TestDb`]: a fresh database per test, SQLite (a file in a
//!   temporary directory) or PostgreSQL (a new database on the server named
//!   by `HCP_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - [`fixtures`]: store records as the store suites write them.
//! - [`stack::TestStack`]: core, gateway and sim providers as separate OS
//!   processes on ephemeral ports, with tokens signed by the stack's key.
//! - [`nats::NatsServer`]: a JetStream server per test, that can be stopped;
//!   [`rabbitmq::RabbitServer`]: the same for RabbitMQ.
//! - [`queues::Queue`] and [`each_queue!`]: a test run once per production
//!   queue backend (NATS JetStream, RabbitMQ).
//! - [`patroni::PgCluster`]: PostgreSQL with automatic failover (Patroni,
//!   etcd, HAProxy) for the failover test.
//! - [`rest::Rest`]: a small JSON-over-HTTP client for the gateway.
//! - [`console`]: a tenant's console client (the websocket and the RFB
//!   handshake the gateway's console proxy offers); [`rdp`]: a native RDP
//!   client's first steps, for RDP consoles.
//! - [`tls::loopback_server`]: an HTTPS receiver's CA and certificate.
//! - [`wait_until`]: waiting for a condition with a deadline, never a sleep.
//! - [`workspace_bin`]: another workspace binary (a provider process outside
//!   `hcp`) for [`stack::TestStack::start_program`].

pub mod console;
pub mod db;
pub mod files;
pub mod fixtures;
pub mod flows;
pub mod load;
pub mod nats;
pub mod patroni;
pub mod proxy;
pub mod queues;
pub mod rabbitmq;
pub mod rdp;
pub mod rest;
pub mod stack;
pub mod tls;
pub mod vcsim;

use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, or fails after
/// `timeout` with `what` in the message.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary `bin` of another workspace package, found beside `exe` (a
/// binary of the running test's own package, e.g. `CARGO_BIN_EXE_hcp`).
/// A workspace build (`cargo build --workspace`, or `cargo nextest run
/// --workspace`) puts it there; when it is missing the error says so.
pub fn workspace_bin(exe: &std::path::Path, bin: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = exe.with_file_name(bin);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    Ok(path)
}

/// A directory under the system temp dir, removed on drop unless the test
/// is panicking (so logs survive a failure) or `HCP_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TempDir {
    path: std::path::PathBuf,
}

impl TempDir {
    /// Creates `hcp-test-<uuid>`.
    pub fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("hcp-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("HCP_KEEP_TEST_DIRS").is_some() {
            eprintln!("test artifacts kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
