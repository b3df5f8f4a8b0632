//! RabbitMQ for one test: a node of its own ([`RabbitServer`]), or a
//! cluster of nodes ([`RabbitCluster`], for quorum queues), that the test
//! kills (SIGKILL) and starts again (same node name, ports and storage) to
//! simulate outages.
//!
//! Every node gets free ports on 127.0.0.1 (AMQP and Erlang distribution),
//! a unique Erlang node name (`hcp-t-<uuid8>@localhost`), and its
//! configuration, Mnesia and quorum-queue data and logs in the test's
//! [`TempDir`]; all nodes of a test and `rabbitmqctl` share an Erlang cookie
//! there (`$HOME/.erlang.cookie`, with `HOME` set to that directory). Nothing
//! of `/etc/rabbitmq` or `/var/lib/rabbitmq` is read or written, so a system
//! RabbitMQ node on the machine (5672/25672) is left alone; only epmd (4369,
//! shared by every Erlang node on the machine) is used, and started by the
//! first node when none runs, as Erlang does.
//!
//! The binaries are Debian's `rabbitmq-server` package (3.10;
//! `scripts/services.sh`'s `ensure_rabbitmq`), from `/usr/lib/rabbitmq/bin`
//! (not `/usr/sbin`'s wrappers, which switch to the `rabbitmq` user), or
//! from the directory named by `HCP_RABBITMQ_BIN_DIR`. The Erlang VM runs
//! with one scheduler and no busy waiting, to stay light on small machines.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use crate::TempDir;

/// How long a node may take to boot: a node restarted while every peer is
/// down waits for one of them (Mnesia's table loading) before it boots.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How long one `rabbitmqctl` may run.
const CTL_TIMEOUT: Duration = Duration::from_secs(200);

/// `rabbitmqctl` waiting for a node to finish booting, with a timeout
/// (seconds) below [`CTL_TIMEOUT`].
const AWAIT_STARTUP: &[&str] = &["await_startup", "--timeout", "180"];

/// Extra arguments for the Erlang VM: no shell on stdin (the start script
/// then `exec`s the VM, so the child process is `beam.smp` itself), one
/// scheduler without busy waiting, and distribution on loopback only.
const ERL_ARGS: &str = "-noinput +S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none \
                        -kernel inet_dist_use_interface {127,0,0,1}";

/// Every node's `rabbitmq.conf` (a cluster's joining nodes add peer
/// discovery). guest/guest may connect from 127.0.0.1 by default.
const BASE_CONFIG: &str = "disk_free_limit.absolute = 50MB\n\
                           log.console = false\n\
                           log.file.level = info\n";

/// The directory of `rabbitmq-server` and `rabbitmqctl`.
fn bin_dir() -> PathBuf {
    std::env::var_os("HCP_RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"))
}

/// `n` distinct free TCP ports on 127.0.0.1 (every one picked before any
/// is released, so no two are equal).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    let ports =
        listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<std::io::Result<Vec<_>>>()?;
    Ok(ports)
}

/// A fresh id for node names: eight hex digits.
fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Writes what every node and `rabbitmqctl` of a test share in its
/// directory `home`: the Erlang cookie and an empty `rabbitmq-env.conf`
/// (instead of `/etc/rabbitmq/rabbitmq-env.conf`).
fn prepare_home(home: &Path) -> anyhow::Result<()> {
    let cookie = home.join(".erlang.cookie");
    std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string().to_uppercase())?;
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
    std::fs::write(home.join("rabbitmq-env.conf"), "")?;
    Ok(())
}

/// The environment of every RabbitMQ program of a test: nothing inherited
/// but `PATH` (no stray `RABBITMQ_*` or `ERL_*`), `HOME` for the cookie.
fn base_env(cmd: &mut Command, home: &Path) {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    cmd.env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("RABBITMQ_CONF_ENV_FILE", home.join("rabbitmq-env.conf"))
        .current_dir(home);
}

/// Runs `rabbitmqctl -n <node> <args>` with the test's cookie and returns
/// its standard output; an error (with its output) when it fails.
async fn ctl(home: &Path, node: &str, args: &[&str]) -> anyhow::Result<String> {
    // A distribution port of its own, instead of the shared default range
    // 35672-35682 that concurrent tests would exhaust.
    let port = free_ports(1)?[0].to_string();
    let mut cmd = Command::new(bin_dir().join("rabbitmqctl"));
    base_env(&mut cmd, home);
    cmd.env("RABBITMQ_CTL_DIST_PORT_MIN", &port)
        .env("RABBITMQ_CTL_DIST_PORT_MAX", &port)
        .arg("-n")
        .arg(node)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let what = format!("rabbitmqctl -n {node} {}", args.join(" "));
    let out = tokio::time::timeout(CTL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {CTL_TIMEOUT:?}"))??;
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the broker on `port` answers an AMQP 0-9-1 protocol header with
/// `Connection.Start` (a method frame of class 10, method 10).
async fn amqp_ready(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut frame = [0u8; 11];
        stream.read_exact(&mut frame).await?;
        Ok::<_, std::io::Error>(frame[0] == 1 && frame[7..11] == [0u8, 10, 0, 10])
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(true)))
}

/// The nodes `node` reports running in its cluster (`cluster_status`'s
/// `running_nodes`).
async fn running_nodes(home: &Path, node: &str) -> anyhow::Result<Vec<String>> {
    let out = ctl(home, node, &["cluster_status", "--formatter", "json"]).await?;
    let json = &out[out.find('{').unwrap_or(0)..];
    let status: serde_json::Value = serde_json::from_str(json)?;
    Ok(status["running_nodes"]
        .as_array()
        .map(|nodes| nodes.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// One RabbitMQ node: its name, ports and directory, and its VM while it
/// runs.
struct Node {
    /// The Erlang node name, `<name>@localhost`.
    name: String,
    port: u16,
    dist_port: u16,
    /// Configuration, data (`mnesia/`) and logs (`log/`, `stdout-*.log`).
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Creates the node's directory under `home` with its configuration.
    fn new(home: &Path, name: String, port: u16, dist_port: u16, config: &str) -> anyhow::Result<Self> {
        let short = name.split('@').next().unwrap_or(&name).to_owned();
        let dir = home.join(short);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("rabbitmq.conf"), config)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        Ok(Self { name, port, dist_port, dir, child: None })
    }

    /// Starts the node's VM (in a process group of its own).
    fn spawn(&mut self, home: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "RabbitMQ node {} is running", self.name);
        let out =
            std::fs::File::create(self.dir.join(format!("stdout-{}.log", uuid::Uuid::new_v4().simple())))?;
        let err = out.try_clone()?;
        let mnesia = self.dir.join("mnesia");
        let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
        base_env(&mut cmd, home);
        cmd.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", &mnesia)
            .env("RABBITMQ_MNESIA_DIR", mnesia.join("data"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", self.dir.join("rabbitmq.pid"))
            // The start script then `exec`s the VM instead of waiting for it
            // in a shell: SIGKILL reaches beam.smp itself.
            .env("RABBITMQ_ALLOW_INPUT", "true")
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", ERL_ARGS)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Waits until the node answers AMQP; fails at once when its VM exited.
    async fn wait_amqp(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
        loop {
            if amqp_ready(self.port).await {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().map(|c| c.try_wait()).transpose()?.flatten() {
                self.child = None;
                anyhow::bail!(
                    "RabbitMQ node {} exited while booting ({status}); logs in {}",
                    self.name,
                    self.dir.display()
                );
            }
            anyhow::ensure!(self.child.is_some(), "RabbitMQ node {} is not running", self.name);
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "timed out after {BOOT_TIMEOUT:?} waiting for RabbitMQ node {} to accept AMQP \
                     connections on port {}; logs in {}",
                    self.name,
                    self.port,
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to the node's process group (the VM), now; its port
    /// programs (erl_child_setup, inet_gethost, the disk monitor) exit when
    /// the VM is gone.
    fn kill_now(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Only while the child is not reaped: its pid (the group's id)
            // is still ours.
            if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", "--", &format!("-{pid}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.start_kill();
        }
    }

    /// Kills the node (SIGKILL) and waits until its VM is gone.
    async fn kill(&mut self) {
        self.kill_now();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait().await;
        }
    }
}

/// A running (or stopped) RabbitMQ node of one test's own.
pub struct RabbitServer {
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    node: Node,
    dir: TempDir,
}

impl RabbitServer {
    /// Starts a node on free ports and waits until it has booted and
    /// accepts AMQP connections.
    pub async fn start() -> anyhow::Result<Self> {
        let ports = free_ports(2)?;
        let dir = TempDir::new()?;
        prepare_home(dir.path())?;
        let name = format!("hcp-t-{}@localhost", short_id());
        let node = Node::new(dir.path(), name, ports[0], ports[1], BASE_CONFIG)?;
        let mut server = Self { port: ports[0], node, dir };
        server.resume().await?;
        Ok(server)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (the default vhost).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang node name (`hcp-t-<uuid8>@localhost`).
    pub fn node_name(&self) -> &str {
        &self.node.name
    }

    /// Kills the node (SIGKILL to its Erlang VM), as in a crash.
    pub async fn stop(&mut self) {
        self.node.kill().await;
    }

    /// Starts the node again on the same ports and storage (durable queues
    /// and persistent messages survive) and waits until it has booted.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.node.spawn(self.dir.path())?;
        self.node.wait_amqp().await?;
        ctl(self.dir.path(), &self.node.name, AWAIT_STARTUP).await?;
        Ok(())
    }

    /// Runs `rabbitmqctl` against the node (e.g. `["list_queues", "name",
    /// "messages"]`) and returns its standard output.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> anyhow::Result<String> {
        ctl(self.dir.path(), &self.node.name, args).await
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.node.kill_now();
    }
}

/// A RabbitMQ cluster for one test (quorum queues need one), each node
/// with its own name, AMQP and distribution ports and storage on
/// 127.0.0.1; the test kills nodes (SIGKILL) and starts them again (same
/// name, ports and storage).
pub struct RabbitCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl RabbitCluster {
    /// Starts `size` nodes clustered together and waits until every one has
    /// booted and every one runs in the cluster. Node 0 boots first; the
    /// others then join it at their first boot (classic peer discovery).
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs a node");
        let ports = free_ports(2 * size)?;
        let (amqp_ports, dist_ports) = ports.split_at(size);
        let dir = TempDir::new()?;
        prepare_home(dir.path())?;
        let id = short_id();
        let names: Vec<String> = (0..size).map(|i| format!("hcp-t-{id}-{i}@localhost")).collect();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let mut config = BASE_CONFIG.to_owned();
            if i > 0 {
                // Only node 0, already booted: nodes that boot together
                // would race to form the cluster (and retry for seconds).
                config.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
                config.push_str(&format!("cluster_formation.classic_config.nodes.1 = {}\n", names[0]));
            }
            nodes.push(Node::new(dir.path(), names[i].clone(), amqp_ports[i], dist_ports[i], &config)?);
        }
        let mut cluster = Self { nodes, dir };
        cluster.nodes[0].spawn(cluster.dir.path())?;
        cluster.nodes[0].wait_amqp().await?;
        for i in 1..size {
            cluster.nodes[i].spawn(cluster.dir.path())?;
        }
        for i in 1..size {
            cluster.nodes[i].wait_amqp().await?;
        }
        cluster.wait_booted_and_clustered(&(0..size).collect::<Vec<_>>()).await?;
        Ok(cluster)
    }

    /// Every node's AMQP URL, comma-separated.
    pub fn urls(&self) -> String {
        (0..self.nodes.len()).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// Node `i`'s AMQP URL, `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// Node `i`'s AMQP port on 127.0.0.1.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Node `i`'s Erlang node name (`hcp-t-<uuid8>-<i>@localhost`).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never: [`RabbitCluster::start`]
    /// refuses that).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills node `i` (SIGKILL to its Erlang VM), as in a crash.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].kill().await;
    }

    /// Starts node `i` again with its name, ports and storage, and waits
    /// until it has booted and runs in the cluster again. A node whose
    /// peers are all down waits for one of them before it boots: to bring
    /// back several killed nodes, use [`RabbitCluster::restart_nodes`].
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_nodes(&[i]).await
    }

    /// Starts the nodes `which` again together (see
    /// [`RabbitCluster::restart`]) and waits until they have booted and run
    /// in the cluster again.
    pub async fn restart_nodes(&mut self, which: &[usize]) -> anyhow::Result<()> {
        for &i in which {
            self.nodes[i].spawn(self.dir.path())?;
        }
        for &i in which {
            self.nodes[i].wait_amqp().await?;
        }
        self.wait_booted_and_clustered(which).await
    }

    /// Runs `rabbitmqctl` against node `i` (e.g. `["list_queues", "name",
    /// "type", "leader", "members"]`) and returns its standard output.
    pub async fn rabbitmqctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        ctl(self.dir.path(), &self.nodes[i].name, args).await
    }

    /// Waits until the nodes `which` have finished booting and node
    /// `which[0]` reports every running node of the cluster running.
    async fn wait_booted_and_clustered(&self, which: &[usize]) -> anyhow::Result<()> {
        let home = self.dir.path();
        futures::future::try_join_all(which.iter().map(|&i| ctl(home, &self.nodes[i].name, AWAIT_STARTUP)))
            .await?;
        let Some(&via) = which.first() else { return Ok(()) };
        let expected: Vec<&str> =
            self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.name.as_str()).collect();
        let via = &self.nodes[via].name;
        crate::wait_until(BOOT_TIMEOUT, "the RabbitMQ nodes to run in one cluster", || async {
            let running = running_nodes(home, via).await.unwrap_or_default();
            Ok(expected.iter().all(|n| running.iter().any(|r| r == n)).then_some(()))
        })
        .await
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_now();
        }
    }
}
