//! NATS with JetStream for one test: a single server on a port of its own
//! ([`NatsServer`]), or a cluster of servers ([`NatsCluster`]), that the
//! test can stop and start again (same ports, same storage) to simulate
//! outages.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::TempDir;

/// A running (or stopped) test NATS server.
pub struct NatsServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

fn binary() -> String {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    "nats-server".to_owned()
}

impl NatsServer {
    /// Starts a server on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let mut s = Self { port, child: None, dir: TempDir::new()? };
        s.resume().await?;
        Ok(s)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), as in a crash.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts the server again on the same port and storage.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(
            self.dir.path().join(format!("nats-{}.log", uuid::Uuid::new_v4().simple())),
        )?;
        let child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        crate::wait_until(Duration::from_secs(20), "nats-server to listen", || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok().map(|_| ()))
        })
        .await
    }
}

/// A NATS cluster of JetStream servers for one test, each with its own
/// client port, route port and store on 127.0.0.1; the test kills nodes
/// (SIGKILL) and starts them again (same name, ports and store) to take
/// JetStream's quorum away and give it back.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

struct Node {
    name: String,
    port: u16,
    child: Option<Child>,
    config: std::path::PathBuf,
}

/// The cluster's name in every node's configuration.
const CLUSTER_NAME: &str = "hcp-test";

impl NatsCluster {
    /// Starts `size` nodes routed to each other and waits until JetStream
    /// answers (the nodes have elected a meta leader).
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs a node");
        // Every port picked before any is released, so no two are equal.
        let listeners = (0..2 * size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let (client_ports, route_ports) = ports.split_at(size);
        let dir = TempDir::new()?;
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("n{i}");
            let routes = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let store = dir.path().join(&name);
            let text = format!(
                "server_name: \"{name}\"\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: \"{CLUSTER_NAME}\", listen: \"127.0.0.1:{route}\", routes: [{routes}] }}\n",
                port = client_ports[i],
                store = store.display(),
                route = route_ports[i],
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text)?;
            nodes.push(Node { name, port: client_ports[i], child: None, config });
        }
        let mut cluster = Self { nodes, dir };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_listening(i).await?;
        }
        cluster.wait_jetstream().await?;
        Ok(cluster)
    }

    /// Every node's URL, comma-separated, as core's `[queue] nats_url`
    /// takes them.
    pub fn urls(&self) -> String {
        self.servers().join(",")
    }

    /// Every node's URL, as a NATS client takes them.
    pub fn servers(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect()
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never: [`NatsCluster::start`]
    /// refuses that).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s server name (`n<i>`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Kills node `i` (SIGKILL), as in a crash.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts node `i` again with its name, ports and store, and waits
    /// until it listens.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)?;
        self.wait_listening(i).await
    }

    /// Sends the JetStream API request `$JS.API.<request>` to a running
    /// node and returns its JSON answer (an `error` member when JetStream
    /// refused it).
    pub async fn jetstream_api(&self, request: &str) -> anyhow::Result<serde_json::Value> {
        let servers: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect();
        anyhow::ensure!(!servers.is_empty(), "no node is running");
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(servers.as_slice())
            .await?;
        // Short: JetStream does not answer while it has no leader, and the
        // tests poll until it does.
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            client.request(format!("$JS.API.{request}"), bytes::Bytes::new()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer to $JS.API.{request} within 1 s"))??;
        Ok(serde_json::from_slice(&answer.payload)?)
    }

    /// The index of the node leading `stream` (from `STREAM.INFO`'s
    /// `cluster.leader`); none while it has no leader.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<Option<usize>> {
        let info = self.jetstream_api(&format!("STREAM.INFO.{stream}")).await?;
        let leader = info["cluster"]["leader"].as_str().unwrap_or_default();
        Ok(self.nodes.iter().position(|n| n.name == leader))
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        anyhow::ensure!(node.child.is_none(), "node {} is running", node.name);
        let log = std::fs::File::create(self.dir.path().join(format!(
            "{}-{}.log",
            node.name,
            uuid::Uuid::new_v4().simple()
        )))?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    async fn wait_listening(&self, i: usize) -> anyhow::Result<()> {
        let port = self.nodes[i].port;
        crate::wait_until(Duration::from_secs(20), "a nats-server node to listen", || async move {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()))
        })
        .await
    }

    /// Waits until JetStream answers its account request without an error:
    /// the nodes found each other and elected a meta leader.
    async fn wait_jetstream(&self) -> anyhow::Result<()> {
        crate::wait_until(Duration::from_secs(30), "the cluster's JetStream to answer", || async {
            Ok(match self.jetstream_api("INFO").await {
                Ok(answer) if answer.get("error").is_none() => Some(()),
                _ => None,
            })
        })
        .await
    }
}
