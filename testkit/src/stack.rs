//! The whole system as OS processes: core (one combined process, or API and
//! worker processes apart), one gateway per API process, and simulated
//! providers, each started from the `hcp` binary on an ephemeral port;
//! optionally a NATS JetStream server, or a NATS cluster, of the test's own. Process logs go to
//! files in the stack's temporary directory, which is kept when the test
//! fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hcp_cli::dev::{Spawned, bootstrap, mint, spawn};
use hcp_core::auth::{ROLE_OPS_ADMIN, ROLE_TENANT_MEMBER};
use tokio::process::Child;

use crate::TempDir;
use crate::db::{Backend, TestDb};
use crate::nats::{NatsCluster, NatsServer};
use crate::rabbitmq::{RabbitCluster, RabbitServer};
use crate::rest::Rest;

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Store backend.
    pub backend: Backend,
    /// Capabilities of the first sim provider.
    pub sim_capabilities: String,
    /// Extra flags for the first sim provider (e.g. `--latency-ms 100`).
    pub sim_args: Vec<String>,
    /// Extra top-level TOML for core (before any table).
    pub core_toml: String,
    /// Extra keys of core's `[jobs]` table.
    pub jobs_toml: String,
    /// Extra keys of core's `[providers]` table.
    pub providers_toml: String,
    /// Extra keys of core's `[console]` table.
    pub console_toml: String,
    /// Extra keys of core's `[queue]` table (with NATS).
    pub queue_toml: String,
    /// Run NATS JetStream (a server of the test's own) for dispatch.
    pub nats: bool,
    /// Run a NATS cluster of this many JetStream servers instead of the
    /// single server (0: none), core given every node's URL.
    pub nats_cluster: usize,
    /// Run RabbitMQ (a node of the test's own) for dispatch.
    pub rabbitmq: bool,
    /// Run a RabbitMQ cluster of this many nodes instead (0: none), core
    /// given every node's URL.
    pub rabbitmq_cluster: usize,
    /// API processes (each with a gateway).
    pub api_processes: usize,
    /// Worker processes; 0 means API processes also run jobs.
    pub worker_processes: usize,
    /// Core reaches PostgreSQL through a proxy the test can take down
    /// ([`TestStack::db_proxy`]), to cut the database off without stopping
    /// the server other tests share.
    pub db_proxy: bool,
    /// The first sim provider serves `/metrics` (on a free port picked for
    /// it: providers announce only their gRPC address).
    pub sim_metrics: bool,
    /// The PostgreSQL server (an admin URL) for [`Backend::Postgres`]:
    /// another than the test server, e.g. [`crate::patroni::PgCluster`]'s.
    pub postgres_admin_url: Option<String>,
    /// Environment for every process of the stack (e.g.
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
    /// Console URLs name the first gateway, as `hcp up` configures them
    /// (for clients that open them as they are, like `hcp vm console`):
    /// the gateway gets a port picked before core starts. Otherwise core
    /// announces its default and [`TestStack::console`] rewrites the URLs.
    pub console_urls_name_the_gateway: bool,
    /// The `hcp` binary core and gateway processes run (the previous
    /// release's, for an upgrade test; see [`TestStack::set_core_exe`]);
    /// `None`: the stack's. Sim providers always run the stack's.
    pub core_exe: Option<PathBuf>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            sim_capabilities: "cloud_init,snapshot,snapshot_running,console_vnc,console_serial,console_log"
                .to_owned(),
            sim_args: Vec::new(),
            core_toml: String::new(),
            jobs_toml: String::new(),
            providers_toml: String::new(),
            console_toml: String::new(),
            queue_toml: String::new(),
            console_urls_name_the_gateway: false,
            nats: false,
            nats_cluster: 0,
            rabbitmq: false,
            rabbitmq_cluster: 0,
            api_processes: 1,
            worker_processes: 0,
            db_proxy: false,
            postgres_admin_url: None,
            sim_metrics: false,
            env: Vec::new(),
            core_exe: None,
        }
    }
}

/// A running stack.
pub struct TestStack {
    /// First gateway's address.
    pub gateway: SocketAddr,
    /// First gateway's RDP relay (`--console-rdp-listen`).
    pub gateway_rdp: SocketAddr,
    /// `/metrics` of the first API process, the first gateway and (with
    /// [`StackOptions::sim_metrics`]) the first sim, by job name.
    pub metrics: Vec<(&'static str, SocketAddr)>,
    /// First API process's gRPC address.
    pub core: SocketAddr,
    /// First sim provider's address.
    pub sim: SocketAddr,
    /// REST client for the first gateway.
    pub rest: Rest,
    /// REST clients, one per gateway (one per API process).
    pub rests: Vec<Rest>,
    /// The NATS server, when the stack uses one.
    pub nats: Option<NatsServer>,
    /// The NATS cluster, when the stack uses one.
    pub nats_cluster: Option<NatsCluster>,
    /// The RabbitMQ node, when the stack uses one.
    pub rabbitmq: Option<RabbitServer>,
    /// The RabbitMQ cluster, when the stack uses one.
    pub rabbitmq_cluster: Option<RabbitCluster>,
    /// The database (kept alive as long as the stack).
    pub db: TestDb,
    /// The proxy between core and PostgreSQL, with `db_proxy`.
    pub db_proxy: Option<crate::proxy::TcpProxy>,
    /// The database URL core is given (through the proxy, if any).
    core_db_url: String,
    /// Each API process's gRPC address.
    api_addrs: Vec<SocketAddr>,
    /// Each gateway's address.
    gateway_addrs: Vec<SocketAddr>,
    secret: Vec<u8>,
    exe: PathBuf,
    /// What core and gateway processes (re)start from.
    core_exe: PathBuf,
    opts: StackOptions,
    children: HashMap<String, Child>,
    /// Each process's readiness object, by name.
    ready: HashMap<String, serde_json::Value>,
    next_worker: usize,
    dir: TempDir,
}

const READY: Duration = Duration::from_secs(60);

impl TestStack {
    /// Starts the stack and seeds zone `zone-1`, flavors small/medium/large,
    /// image `debian-12` and the sim provider.
    pub async fn start(exe: &Path, opts: StackOptions) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let db = match (&opts.postgres_admin_url, opts.backend) {
            (Some(admin), Backend::Postgres) => TestDb::on_server(admin).await?,
            _ => TestDb::new(opts.backend).await?,
        };
        let (db_proxy, core_db_url) = if opts.db_proxy {
            // postgres://user@host:port/name -> the same through the proxy.
            let (scheme_user, rest) =
                db.url.split_once('@').ok_or_else(|| anyhow::anyhow!("no host in {}", db.url))?;
            let (host, name) =
                rest.split_once('/').ok_or_else(|| anyhow::anyhow!("no database in {}", db.url))?;
            let target = tokio::net::lookup_host(host)
                .await?
                .next()
                .ok_or_else(|| anyhow::anyhow!("cannot resolve {host}"))?;
            let proxy = crate::proxy::TcpProxy::start(target).await?;
            let url = format!("{scheme_user}@{}/{name}", proxy.addr);
            (Some(proxy), url)
        } else {
            (None, db.url.clone())
        };
        let brokers = [opts.nats, opts.nats_cluster > 0, opts.rabbitmq, opts.rabbitmq_cluster > 0];
        anyhow::ensure!(brokers.iter().filter(|b| **b).count() <= 1, "one broker per stack");
        let nats = if opts.nats { Some(NatsServer::start().await?) } else { None };
        let nats_cluster =
            if opts.nats_cluster > 0 { Some(NatsCluster::start(opts.nats_cluster).await?) } else { None };
        let rabbitmq = if opts.rabbitmq { Some(RabbitServer::start().await?) } else { None };
        let rabbitmq_cluster = if opts.rabbitmq_cluster > 0 {
            Some(RabbitCluster::start(opts.rabbitmq_cluster).await?)
        } else {
            None
        };
        let secret_hex = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        // Core refuses secret files its group or others may read.
        write_owner_only(&dir.path().join("jwt-secret"), &secret_hex)?;
        write_owner_only(&dir.path().join("secrets.key"), &hcp_core::secrets::SecretBox::generate_key_hex())?;
        let proxy_token = mint(
            secret_hex.as_bytes(),
            "console-proxy",
            None,
            &[],
            &[hcp_core::auth::ROLE_CONSOLE_PROXY],
            86400,
        )?;
        std::fs::write(dir.path().join("console-proxy.jwt"), proxy_token)?;
        let mut stack = Self {
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway_rdp: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: Vec::new(),
            core: SocketAddr::from(([127, 0, 0, 1], 0)),
            sim: SocketAddr::from(([127, 0, 0, 1], 0)),
            rest: Rest::new(String::new()),
            rests: Vec::new(),
            nats,
            nats_cluster,
            rabbitmq,
            rabbitmq_cluster,
            db,
            db_proxy,
            core_db_url,
            api_addrs: Vec::new(),
            gateway_addrs: Vec::new(),
            secret: secret_hex.into_bytes(),
            exe: exe.to_owned(),
            core_exe: opts.core_exe.clone().unwrap_or_else(|| exe.to_owned()),
            opts: opts.clone(),
            children: HashMap::new(),
            ready: HashMap::new(),
            next_worker: 0,
            dir,
        };
        let mut sim_args = vec!["--capabilities".to_owned(), opts.sim_capabilities.clone()];
        sim_args.extend(opts.sim_args.iter().cloned());
        if opts.sim_metrics {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let mut args = vec!["provider-sim".to_owned(), "--listen".to_owned(), "127.0.0.1:0".to_owned()];
            args.extend(sim_args);
            let exe = stack.exe.clone();
            let env = [("HCP_PROVIDER_METRICS_LISTEN", port.to_string())];
            stack.sim = stack.spawn_exe("sim", &exe, &args, &env).await?.0;
            stack.metrics.push(("sim", port));
        } else {
            stack.sim = stack.start_sim_with("sim", &sim_args).await?;
        }

        let combined = opts.worker_processes == 0;
        let stack_dir = stack.dir.path().to_owned();
        // A free port for the first gateway, when core must name it (a
        // port the kernel just handed out is not handed out again at once).
        let first_gateway = if opts.console_urls_name_the_gateway {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            stack.opts.console_toml.push_str(&format!("\npublic_base_url = \"ws://{port}\"\n"));
            Some(port)
        } else {
            None
        };
        for i in 0..opts.api_processes.max(1) {
            let name = format!("core-api-{i}");
            let config = stack.write_core_config(&name, true, combined)?;
            let listen = match first_gateway {
                Some(port) if i == 0 => port.to_string(),
                _ => "127.0.0.1:0".to_owned(),
            };
            let core = stack.spawn_core(&name, &core_args(&config), &[]).await?;
            let gateway = stack
                .spawn_core(&format!("gateway-{i}"), &gateway_args(&stack_dir, &listen, core), &[])
                .await?;
            if i == 0 {
                stack.core = core;
                stack.gateway = gateway;
                let announced = |name: &str, key: &str| -> anyhow::Result<SocketAddr> {
                    stack.ready[name][key]
                        .as_str()
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| anyhow::anyhow!("{name} announced no {key}"))
                };
                let gw = format!("gateway-{i}");
                let (rdp, gw_metrics, core_metrics) = (
                    announced(&gw, "rdp_addr")?,
                    announced(&gw, "metrics_addr")?,
                    announced(&name, "metrics_addr")?,
                );
                stack.gateway_rdp = rdp;
                stack.metrics.push(("core", core_metrics));
                stack.metrics.push(("gateway", gw_metrics));
            }
            stack.api_addrs.push(core);
            stack.gateway_addrs.push(gateway);
            stack.rests.push(Rest::new(format!("http://{gateway}")));
        }
        stack.rest = stack.rests[0].clone();
        for _ in 0..opts.worker_processes {
            stack.start_worker().await?;
        }
        bootstrap(
            &format!("http://{}", stack.core),
            &stack.ops_token(),
            "zone-1",
            &format!("http://{}", stack.sim),
        )
        .await?;
        Ok(stack)
    }

    /// Replaces the extra keys of core's `[queue]` table for the core
    /// processes started from now on (a configuration changed between
    /// releases or restarts).
    pub fn set_queue_toml(&mut self, toml: impl Into<String>) {
        self.opts.queue_toml = toml.into();
    }

    fn write_core_config(&self, name: &str, api: bool, worker: bool) -> anyhow::Result<PathBuf> {
        let nats_url = self
            .nats
            .as_ref()
            .map(NatsServer::url)
            .or_else(|| self.nats_cluster.as_ref().map(NatsCluster::urls));
        let amqp_url = self
            .rabbitmq
            .as_ref()
            .map(RabbitServer::url)
            .or_else(|| self.rabbitmq_cluster.as_ref().map(RabbitCluster::urls));
        let queue = match (nats_url, amqp_url) {
            (Some(url), _) => format!("\n[queue]\nnats_url = \"{url}\"\n{}\n", self.opts.queue_toml),
            (None, Some(url)) => {
                format!("\n[queue]\nbackend = \"rabbitmq\"\namqp_url = \"{url}\"\n{}\n", self.opts.queue_toml)
            }
            (None, None) => String::new(),
        };
        let toml = format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndatabase_url = \"{db}\"\n{extra}\n\n[roles]\napi = {api}\nworker = {worker}\n\n\
             [auth]\nhs256_secret_file = \"{secret}\"\n\n\
             [jobs]\n{jobs}\n\n\
             [providers]\nprobe_interval_seconds = 1\nprobe_timeout_seconds = 1\n{providers}\n\n\
             [secrets]\nkey_file = \"{key}\"\n{queue}\n\
             [console]\nrdp_address = \"rdp.invalid:3390\"\n{console}",
            db = self.core_db_url,
            extra = self.opts.core_toml,
            secret = self.dir.path().join("jwt-secret").display(),
            jobs = jobs_table(&self.opts.jobs_toml),
            key = self.dir.path().join("secrets.key").display(),
            providers = self.opts.providers_toml,
            console = self.opts.console_toml,
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// Spawns a core or gateway process from [`Self::core_exe`].
    async fn spawn_core(
        &mut self,
        name: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<SocketAddr> {
        let exe = self.core_exe.clone();
        Ok(self.spawn_exe(name, &exe, args, env).await?.0)
    }

    async fn spawn_logged(&mut self, name: &str, args: &[String]) -> anyhow::Result<SocketAddr> {
        Ok(self.spawn_announced(name, args).await?.0)
    }

    async fn spawn_announced(&mut self, name: &str, args: &[String]) -> anyhow::Result<(SocketAddr, String)> {
        let exe = self.exe.clone();
        self.spawn_exe(name, &exe, args, &[]).await
    }

    async fn spawn_exe(
        &mut self,
        name: &str,
        exe: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<(SocketAddr, String)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        let mut env = env.to_vec();
        env.extend(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let Spawned { child, addr, announced, ready } =
            spawn(exe, args, &env, Stdio::from(log), READY).await?;
        self.children.insert(name.to_owned(), child);
        self.ready.insert(name.to_owned(), ready);
        Ok((addr, announced))
    }

    /// Starts a sim provider process with `args` (after `provider-sim`);
    /// returns the address it announced (`host:port` or a socket path).
    pub async fn start_sim_args(&mut self, name: &str, args: &[String]) -> anyhow::Result<String> {
        let mut all = vec!["provider-sim".to_owned()];
        all.extend(args.iter().cloned());
        Ok(self.spawn_announced(name, &all).await?.1)
    }

    /// Starts another program as part of the stack (a provider built by
    /// another crate, a hypervisor simulator) with extra environment;
    /// returns the address it announced on its readiness line. Its log is
    /// `<name>.log` in the stack's directory.
    pub async fn start_program(
        &mut self,
        name: &str,
        exe: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<String> {
        Ok(self.spawn_exe(name, exe, args, env).await?.1)
    }

    /// Waits until a process of the stack exits by itself (e.g. at a
    /// failpoint); returns its exit status and forgets it.
    pub async fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.children.get_mut(name).ok_or_else(|| anyhow::anyhow!("no process {name}"))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("{name} still running after {timeout:?}"))??;
        self.children.remove(name);
        Ok(status)
    }

    /// Starts another worker-only core process; returns its name.
    pub async fn start_worker(&mut self) -> anyhow::Result<String> {
        let name = format!("core-worker-{}", self.next_worker);
        self.next_worker += 1;
        let config = self.write_core_config(&name, false, true)?;
        self.spawn_core(&name, &core_args(&config), &[]).await?;
        Ok(name)
    }

    /// Names of the running worker processes.
    pub fn workers(&self) -> Vec<String> {
        let mut w: Vec<String> =
            self.children.keys().filter(|k| k.starts_with("core-worker-")).cloned().collect();
        w.sort();
        w
    }

    /// The OS process id of a process of the stack.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).and_then(|c| c.id())
    }

    /// Stops a process with SIGTERM and waits up to `timeout` for it to
    /// exit; returns its exit status.
    pub async fn stop(&mut self, name: &str, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(name, "TERM")?;
        self.wait_exit(name, timeout).await
    }

    /// Restarts API process `i` (SIGTERM, then the same configuration on
    /// the same address, so its gateway reconnects to it).
    pub async fn restart_api(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let name = format!("core-api-{i}");
        let status = self.stop(&name, timeout).await?;
        anyhow::ensure!(status.success(), "{name} exited with {status}");
        let config = self.dir.path().join(format!("{name}.toml"));
        let env = [(hcp_core::config::ENV_LISTEN, self.api_addrs[i].to_string())];
        self.spawn_core(&name, &core_args(&config), &env).await?;
        Ok(())
    }

    /// Restarts gateway `i` (SIGTERM, then on the same address, in front of
    /// the same API process).
    pub async fn restart_gateway(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let name = format!("gateway-{i}");
        let status = self.stop(&name, timeout).await?;
        anyhow::ensure!(status.success(), "{name} exited with {status}");
        let args = gateway_args(self.dir.path(), &self.gateway_addrs[i].to_string(), self.api_addrs[i]);
        self.spawn_core(&name, &args, &[]).await?;
        Ok(())
    }

    /// The `hcp` binary that core and gateway processes started or
    /// restarted from now on run: a rolling upgrade restarts them one at a
    /// time after this.
    pub fn set_core_exe(&mut self, exe: &Path) {
        self.core_exe = exe.to_owned();
    }

    /// Kills a process with SIGKILL and forgets it.
    pub async fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.children.remove(name) {
            let _ = c.kill().await;
        }
    }

    /// Starts another sim provider process (not registered).
    pub async fn start_sim(&mut self, name: &str, capabilities: &str) -> anyhow::Result<SocketAddr> {
        self.start_sim_with(name, &["--capabilities".to_owned(), capabilities.to_owned()]).await
    }

    async fn start_sim_with(&mut self, name: &str, extra: &[String]) -> anyhow::Result<SocketAddr> {
        self.start_sim_at(name, "127.0.0.1:0", extra).await
    }

    /// Starts a sim provider process listening on `listen` with extra flags.
    pub async fn start_sim_at(
        &mut self,
        name: &str,
        listen: &str,
        extra: &[String],
    ) -> anyhow::Result<SocketAddr> {
        let mut args = vec!["provider-sim".to_owned(), "--listen".to_owned(), listen.to_owned()];
        args.extend(extra.iter().cloned());
        self.spawn_logged(name, &args).await
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to a process of the stack.
    pub fn signal(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .children
            .get(name)
            .and_then(|c| c.id())
            .ok_or_else(|| anyhow::anyhow!("no process {name}"))?;
        let status =
            std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// A tenant token for `tenant` granting `projects` as tenant.member.
    pub fn tenant_token(&self, tenant: &str, projects: &[&str]) -> String {
        self.token(Some(tenant), projects, &[ROLE_TENANT_MEMBER], 3600)
    }

    /// An ops.admin token.
    pub fn ops_token(&self) -> String {
        self.token(None, &[], &[ROLE_OPS_ADMIN], 3600)
    }

    /// Registers a provider process as an operator does, over REST: zone
    /// `zone`, the provider `name` at `endpoint` (with `credentials`), and
    /// the zone's network `default` backed by `network_backing` on it.
    /// Returns the provider as registered (with its capabilities).
    pub async fn register_provider(
        &self,
        zone: &str,
        name: &str,
        endpoint: &str,
        credentials: serde_json::Value,
        network_backing: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let ops = self.ops_token();
        let mut provider = serde_json::Value::Null;
        for (path, body) in [
            (
                "/api/hcp/ops/v1/zones",
                serde_json::json!({"name": zone, "description": format!("{name}'s zone")}),
            ),
            (
                "/api/hcp/ops/v1/providers",
                serde_json::json!({"name": name, "zone": zone, "endpoint": endpoint, "credentials": credentials}),
            ),
            (
                "/api/hcp/ops/v1/networks",
                serde_json::json!({"name": "default", "zone": zone, "backings": {name: network_backing}}),
            ),
        ] {
            let r = self.rest.post(path, &ops, &body).await?;
            anyhow::ensure!(r.status == 201, "{path}: {} {}", r.status, r.body);
            if path.ends_with("providers") {
                provider = r.body;
            }
        }
        Ok(provider)
    }

    /// Any token signed with the stack's key.
    pub fn token(&self, tenant: Option<&str>, projects: &[&str], roles: &[&str], ttl: u64) -> String {
        self.subject_token("test-user", tenant, projects, roles, ttl)
    }

    /// A token for the person `subject` (the actor jobs and audit events
    /// name), signed with the stack's key.
    pub fn subject_token(
        &self,
        subject: &str,
        tenant: Option<&str>,
        projects: &[&str],
        roles: &[&str],
        ttl: u64,
    ) -> String {
        mint(&self.secret, subject, tenant, projects, roles, ttl).unwrap_or_default()
    }

    /// Asks for a console of the VM at `vm_path` (`…/vms/{id}`) as
    /// `token`'s tenant with `body` (e.g. `{"type": "vnc"}`); returns the
    /// answer with `url` and `web_url` pointed at this stack's gateway
    /// (core's `public_base_url` is left at its default) and an RDP
    /// `address` at its relay (core announces `rdp.invalid:3390`).
    pub async fn console(
        &self,
        vm_path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let r = self.rest.post(&format!("{vm_path}:console"), token, body).await?;
        anyhow::ensure!(r.status == 200, "console: {} {}", r.status, r.body);
        let mut answer = r.body;
        if answer["address"].as_str().is_some_and(|a| !a.is_empty()) {
            anyhow::ensure!(answer["address"] == "rdp.invalid:3390", "address: {answer}");
            answer["address"] = serde_json::json!(self.gateway_rdp.to_string());
        }
        for key in ["url", "web_url"] {
            let url = answer[key].as_str().unwrap_or_default().to_owned();
            if url.is_empty() {
                // VNC, SPICE and serial have a web page (web is one of them).
                let paged =
                    matches!(body["type"].as_str(), None | Some("" | "vnc" | "spice" | "serial" | "web"));
                anyhow::ensure!(key == "web_url" && !paged, "no {key} in {answer}");
                continue;
            }
            let (scheme, rest) = url.split_once("://").ok_or_else(|| anyhow::anyhow!("{key} {url}"))?;
            let path = &rest[rest.find('/').unwrap_or(rest.len())..];
            answer[key] = serde_json::json!(format!("{scheme}://{}{path}", self.gateway));
        }
        Ok(answer)
    }

    /// The stack's directory (configs and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the text of a process log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A gRPC channel to the first API process.
    pub async fn core_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(format!("http://{}", self.core))?.connect().await?)
    }

    /// A gRPC channel to the first sim provider.
    pub async fn sim_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(format!("http://{}", self.sim))?.connect().await?)
    }

    /// The simulator's counters.
    pub async fn sim_stats(&self) -> anyhow::Result<hcp_proto::sim::StatsResponse> {
        let mut sim = hcp_proto::sim::sim_control_client::SimControlClient::new(self.sim_channel().await?);
        Ok(sim.stats(hcp_proto::sim::StatsRequest {}).await?.into_inner())
    }
}

fn core_args(config: &Path) -> Vec<String> {
    vec!["core".into(), "--config".into(), config.display().to_string()]
}

fn gateway_args(dir: &Path, listen: &str, core: SocketAddr) -> Vec<String> {
    let args = [
        "gateway",
        "--listen",
        listen,
        "--core",
        &format!("http://{core}"),
        "--service-token-file",
        &dir.join("console-proxy.jwt").display().to_string(),
        "--console-assets-dir",
        &console_assets_dir().display().to_string(),
        "--console-rdp-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.into_iter().map(str::to_owned).collect()
}

/// The console page and noVNC of this checkout (`scripts/console-assets.sh`
/// installs noVNC there).
pub fn console_assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/console")
}

/// Core's `[jobs]` keys for tests: quick polling and short backoff, unless
/// the test sets a key itself.
fn jobs_table(extra: &str) -> String {
    let mut out = extra.to_owned();
    for (key, value) in [("poll_interval_ms", "100"), ("backoff_base_ms", "50"), ("backoff_max_ms", "200")] {
        if !extra.lines().any(|l| l.trim_start().starts_with(key)) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out
}

/// Writes a file only its owner may read (mode 0600), as core demands of
/// its secret files.
fn write_owner_only(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}
