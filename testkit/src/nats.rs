//! A NATS server with JetStream for one test, on a port of its own, that
//! the test can stop and start again (same port, same storage) to simulate
//! an outage.

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
