//! The whole system as OS processes: core, the gateway and simulated
//! providers, each started from the `hcp` binary on an ephemeral port.
//! Process logs go to files in the stack's temporary directory, which is
//! kept when the test fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hcp_cli::dev::{Spawned, bootstrap, mint, spawn};
use hcp_core::auth::{ROLE_OPS_ADMIN, ROLE_TENANT_MEMBER};
use tokio::process::Child;

use crate::TempDir;
use crate::db::{Backend, TestDb};
use crate::rest::Rest;

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Store backend.
    pub backend: Backend,
    /// Capabilities of the first sim provider.
    pub sim_capabilities: String,
    /// Extra TOML appended to core's configuration.
    pub core_toml: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            sim_capabilities: "cloud_init,snapshot,snapshot_running,console_vnc".to_owned(),
            core_toml: String::new(),
        }
    }
}

/// A running stack.
pub struct TestStack {
    /// Gateway address.
    pub gateway: SocketAddr,
    /// Core gRPC address.
    pub core: SocketAddr,
    /// First sim provider address.
    pub sim: SocketAddr,
    /// REST client for the gateway.
    pub rest: Rest,
    secret: Vec<u8>,
    exe: PathBuf,
    children: Vec<Child>,
    /// The database (kept alive as long as the stack).
    pub db: TestDb,
    dir: TempDir,
}

const READY: Duration = Duration::from_secs(60);

impl TestStack {
    /// Starts sim, core and gateway, and seeds zone `zone-1`, flavors
    /// small/medium/large, image `debian-12` and the sim provider.
    pub async fn start(exe: &Path, opts: StackOptions) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let db = TestDb::new(opts.backend).await?;
        let secret_hex = hex_secret();
        let secret_file = dir.path().join("jwt-secret");
        std::fs::write(&secret_file, &secret_hex)?;
        let secret = secret_hex.into_bytes();
        let core_toml = format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = \"{db}\"\n{extra}\n\n[auth]\nhs256_secret_file = \"{secret}\"\n\n\
             [jobs]\npoll_interval_ms = 100\nbackoff_base_ms = 50\nbackoff_max_ms = 200\n\n\
             [providers]\nprobe_interval_seconds = 1\nprobe_timeout_seconds = 1\n",
            db = db.url,
            secret = secret_file.display(),
            extra = opts.core_toml,
        );
        let core_config = dir.path().join("core.toml");
        std::fs::write(&core_config, core_toml)?;

        let mut stack = Self {
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            core: SocketAddr::from(([127, 0, 0, 1], 0)),
            sim: SocketAddr::from(([127, 0, 0, 1], 0)),
            rest: Rest::new(String::new()),
            secret,
            exe: exe.to_owned(),
            children: Vec::new(),
            db,
            dir,
        };
        stack.sim = stack.start_sim("sim", &opts.sim_capabilities).await?;
        let core = stack
            .spawn_logged("core", &["core".into(), "--config".into(), core_config.display().to_string()])
            .await?;
        stack.core = core;
        let gateway = stack
            .spawn_logged(
                "gateway",
                &[
                    "gateway".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--core".into(),
                    format!("http://{core}"),
                ],
            )
            .await?;
        stack.gateway = gateway;
        stack.rest = Rest::new(format!("http://{gateway}"));
        bootstrap(&format!("http://{core}"), &stack.ops_token(), "zone-1", &format!("http://{}", stack.sim))
            .await?;
        Ok(stack)
    }

    async fn spawn_logged(&mut self, name: &str, args: &[String]) -> anyhow::Result<SocketAddr> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let Spawned { child, addr } = spawn(&self.exe, args, &[], Stdio::from(log), READY).await?;
        self.children.push(child);
        Ok(addr)
    }

    /// Starts another sim provider process (not registered).
    pub async fn start_sim(&mut self, name: &str, capabilities: &str) -> anyhow::Result<SocketAddr> {
        self.spawn_logged(
            name,
            &[
                "provider-sim".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--capabilities".into(),
                capabilities.into(),
            ],
        )
        .await
    }

    /// A tenant token for `tenant` granting `projects` as tenant.member.
    pub fn tenant_token(&self, tenant: &str, projects: &[&str]) -> String {
        self.token(Some(tenant), projects, &[ROLE_TENANT_MEMBER], 3600)
    }

    /// An ops.admin token.
    pub fn ops_token(&self) -> String {
        self.token(None, &[], &[ROLE_OPS_ADMIN], 3600)
    }

    /// Any token signed with the stack's key.
    pub fn token(&self, tenant: Option<&str>, projects: &[&str], roles: &[&str], ttl: u64) -> String {
        mint(&self.secret, "test-user", tenant, projects, roles, ttl).unwrap_or_default()
    }

    /// The stack's directory (configs and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the text of a process log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A gRPC channel to core.
    pub async fn core_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(format!("http://{}", self.core))?.connect().await?)
    }

    /// A gRPC channel to the first sim provider.
    pub async fn sim_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(format!("http://{}", self.sim))?.connect().await?)
    }
}

fn hex_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}
