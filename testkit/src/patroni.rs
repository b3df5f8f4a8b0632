//! A PostgreSQL cluster with automatic failover for one test, from
//! Debian's packages: one etcd member, two PostgreSQL nodes each run by
//! Patroni (synchronous replication on), and HAProxy in front that sends
//! connections to whichever node Patroni's REST API says is the primary
//! (`GET /primary` answers 200 only on the node holding the leader key).
//! Core is given HAProxy's address, as in the deployment guide.
//!
//! Patroni, and the PostgreSQL it starts, run as the `postgres` user
//! (PostgreSQL refuses root). Everything is killed and removed on drop.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::TempDir;
use crate::rest::Rest;

/// PostgreSQL's programs (initdb, postgres, pg_basebackup) for Patroni.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// One PostgreSQL node and its Patroni.
struct Node {
    name: String,
    pg_port: u16,
    rest_port: u16,
    data_dir: PathBuf,
    config: PathBuf,
    patroni: Option<Child>,
}

/// A running cluster.
pub struct PgCluster {
    /// HAProxy's port on 127.0.0.1: the primary, whichever node it is.
    pub port: u16,
    nodes: Vec<Node>,
    etcd: Child,
    haproxy: Child,
    dir: TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The uid and gid of `postgres` (from /etc/passwd).
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or_else(|| anyhow::anyhow!("no postgres user (install postgresql)"))?;
    let f: Vec<&str> = line.split(':').collect();
    anyhow::ensure!(f.len() > 3, "unreadable passwd line {line:?}");
    Ok((f[2].parse()?, f[3].parse()?))
}

/// Whether the programs the cluster needs are installed; `Err` names what
/// is missing (the test command installs them: `ensure_patroni`).
pub fn available() -> Result<(), String> {
    let missing: Vec<&str> =
        [("patroni", "/usr/bin/patroni"), ("etcd", "/usr/bin/etcd"), ("haproxy", "/usr/sbin/haproxy")]
            .into_iter()
            .filter(|(_, p)| !Path::new(p).exists())
            .map(|(n, _)| n)
            .collect();
    if !Path::new(PG_BIN).join("postgres").exists() {
        return Err(format!("PostgreSQL 15 binaries in {PG_BIN}"));
    }
    if missing.is_empty() { Ok(()) } else { Err(missing.join(", ")) }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?,
    ))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl PgCluster {
    /// Starts etcd, two Patroni nodes and HAProxy, and waits until one node
    /// leads with the other as its synchronous standby and HAProxy reaches
    /// the leader.
    pub async fn start() -> anyhow::Result<Self> {
        available().map_err(|m| anyhow::anyhow!("the failover test bed needs {m}"))?;
        let dir = TempDir::new()?;
        let (uid, gid) = postgres_ids()?;

        let (etcd_client, etcd_peer) = (free_port()?, free_port()?);
        let etcd = Command::new("/usr/bin/etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-cluster=e1=http://127.0.0.1:{etcd_peer}"))
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), "etcd")?)
            .kill_on_drop(true)
            .spawn()?;

        let mut nodes = Vec::new();
        for name in ["pg1", "pg2"] {
            let (pg_port, rest_port) = (free_port()?, free_port()?);
            let data_dir = dir.path().join(name);
            let config = dir.path().join(format!("{name}.yml"));
            std::fs::write(&config, patroni_config(name, pg_port, rest_port, etcd_client, dir.path()))?;
            nodes.push(Node { name: name.to_owned(), pg_port, rest_port, data_dir, config, patroni: None });
        }
        let port = free_port()?;
        let haproxy_cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&haproxy_cfg, haproxy_config(port, &nodes))?;
        let haproxy = Command::new("/usr/sbin/haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_cfg)
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), "haproxy")?)
            .kill_on_drop(true)
            .spawn()?;
        chown_tree(dir.path(), uid, gid)?;

        let mut cluster = Self { port, nodes, etcd, haproxy, dir };
        crate::wait_until(Duration::from_secs(20), "etcd to listen", || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", etcd_client)).await.ok().map(|_| ()))
        })
        .await?;
        // The first node bootstraps (initdb); the second then clones it.
        cluster.start_node(0)?;
        cluster.wait_role(0, "leader", Duration::from_secs(60)).await?;
        cluster.start_node(1)?;
        cluster.wait_role(1, "sync_standby", Duration::from_secs(90)).await?;
        let url = cluster.admin_url();
        crate::wait_until(Duration::from_secs(30), "HAProxy to reach the primary", || async {
            use sqlx::Connection as _;
            Ok(sqlx::PgConnection::connect(&url).await.ok().map(|_| ()))
        })
        .await?;
        Ok(cluster)
    }

    /// An admin URL through HAProxy (for [`crate::db::TestDb::on_server`]).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let (uid, gid) = postgres_ids()?;
        let node = &mut self.nodes[i];
        let mut cmd = std::process::Command::new("/usr/bin/patroni");
        cmd.arg(&node.config)
            .uid(uid)
            .gid(gid)
            .env("HOME", self.dir.path())
            .stdout(log_file(self.dir.path(), &node.name)?)
            .stderr(log_file(self.dir.path(), &node.name)?);
        let mut cmd = Command::from(cmd);
        node.patroni = Some(cmd.kill_on_drop(true).spawn()?);
        Ok(())
    }

    /// Patroni's view of the cluster, from node `i`'s REST API.
    pub async fn members(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let rest = Rest::new(format!("http://127.0.0.1:{}", self.nodes[i].rest_port));
        let r = rest.raw("GET", "/cluster", None, None).await?;
        anyhow::ensure!(r.status == 200, "GET /cluster on {}: {}", self.nodes[i].name, r.status);
        Ok(r.body["members"].clone())
    }

    /// The role node `i` has in its own view of the cluster (`leader`,
    /// `sync_standby`, `replica`), once its state is `running` or
    /// `streaming`.
    async fn role(&self, i: usize) -> anyhow::Result<Option<String>> {
        let Ok(members) = self.members(i).await else { return Ok(None) };
        let name = &self.nodes[i].name;
        Ok(members.as_array().into_iter().flatten().find(|m| m["name"] == name.as_str()).and_then(|m| {
            let up = matches!(m["state"].as_str(), Some("running" | "streaming"));
            up.then(|| m["role"].as_str().unwrap_or_default().to_owned())
        }))
    }

    async fn wait_role(&self, i: usize, role: &str, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{} to be {role}", self.nodes[i].name);
        crate::wait_until(timeout, &what, || async {
            Ok((self.role(i).await?.as_deref() == Some(role)).then_some(()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; logs in {}", self.dir.path().display()))
    }

    /// The index of the node that leads now, if one does.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].patroni.is_some()
                && self.role(i).await.ok().flatten().as_deref() == Some("leader")
            {
                return Some(i);
            }
        }
        None
    }

    /// Waits until node `i` leads (after a failover).
    pub async fn wait_leader(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_role(i, "leader", timeout).await
    }

    /// Kills node `i` outright: its Patroni and its PostgreSQL, both with
    /// SIGKILL, so that nothing restarts PostgreSQL in place.
    pub async fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        let postmaster = postmaster_pid(&self.nodes[i].data_dir)?;
        if let Some(mut p) = self.nodes[i].patroni.take() {
            p.start_kill()?;
            p.wait().await?;
        }
        kill9(postmaster);
        Ok(())
    }

    /// The directory with every process's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A node's PostgreSQL port (to talk to it directly, not through
    /// HAProxy).
    pub fn node_port(&self, i: usize) -> u16 {
        self.nodes[i].pg_port
    }
}

fn postmaster_pid(data_dir: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid"))?;
    Ok(text.lines().next().unwrap_or_default().trim().parse()?)
}

fn kill9(pid: i32) {
    // Quietly: a postmaster killed earlier leaves its pid file behind.
    let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Patroni's children are not ours: end each PostgreSQL by its pid
        // (its backends exit when their postmaster dies).
        for node in &mut self.nodes {
            if let Some(p) = node.patroni.as_mut() {
                let _ = p.start_kill();
            }
            if let Ok(pid) = postmaster_pid(&node.data_dir) {
                kill9(pid);
            }
        }
        let _ = self.haproxy.start_kill();
        let _ = self.etcd.start_kill();
    }
}

/// Patroni's configuration of one node. Timings are short for a test
/// (the leader key lives 10 s, Patroni's loop runs every second); the
/// deployment guide gives production values.
fn patroni_config(name: &str, pg_port: u16, rest_port: u16, etcd_port: u16, dir: &Path) -> String {
    let dir = dir.display();
    format!(
        r#"scope: hcp
name: {name}
restapi:
  listen: 127.0.0.1:{rest_port}
  connect_address: 127.0.0.1:{rest_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters:
        max_connections: 300
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
  initdb:
    - encoding: UTF8
    - auth: trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {dir}/{name}
  bin_dir: {PG_BIN}
  pgpass: {dir}/{name}.pgpass
  authentication:
    superuser:
      username: postgres
      password: hcp-test
    replication:
      username: replicator
      password: hcp-test
  parameters:
    unix_socket_directories: {dir}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
"#
    )
}

/// HAProxy in TCP mode: a node is in service while its Patroni answers
/// 200 on `/primary`; sessions to a node marked down are cut at once, so
/// clients reconnect to the new primary instead of waiting on a dead one.
fn haproxy_config(port: u16, nodes: &[Node]) -> String {
    let servers: String = nodes
        .iter()
        .map(|n| {
            format!("  server {} 127.0.0.1:{} maxconn 300 check port {}\n", n.name, n.pg_port, n.rest_port)
        })
        .collect();
    format!(
        "global\n  maxconn 1000\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30m\n  timeout server 30m\n  timeout check 1s\n\
         listen primary\n  bind 127.0.0.1:{port}\n  option httpchk GET /primary\n  http-check expect status 200\n\
         \x20 default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n{servers}"
    )
}
