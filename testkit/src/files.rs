//! An HTTP/1.1 file server for tests that fetch by URL (image imports):
//! each path answers a file, a file cut short, a file that stalls half way,
//! a redirect or a bare status. Plain TCP and a hand-written answer, so a
//! test controls exactly what the client gets. Stopped when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a path answers.
#[derive(Debug, Clone)]
pub enum Serve {
    /// 200 with the bytes and their Content-Length.
    File(Vec<u8>),
    /// 200 announcing the bytes' length, then only the first half, then the
    /// connection closes.
    Truncated(Vec<u8>),
    /// 200 announcing the bytes' length, then the first half, then nothing
    /// (the connection stays open until the server is dropped).
    Stall(Vec<u8>),
    /// 302 to this location.
    Redirect(String),
    /// This status with an empty body.
    Status(u16),
}

/// A running file server.
#[derive(Debug)]
pub struct FileServer {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    /// Serves `routes` (path -> answer); any other path is 404.
    pub async fn start(routes: Vec<(&str, Serve)>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let routes: Arc<HashMap<String, Serve>> =
            Arc::new(routes.into_iter().map(|(p, s)| (p.to_owned(), s)).collect());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let routes = routes.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let answer = routes.get(&path).cloned().unwrap_or(Serve::Status(404));
                    let _ = answer_with(&mut tcp, answer).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn answer_with(tcp: &mut tokio::net::TcpStream, answer: Serve) -> std::io::Result<()> {
    let head = |status: &str, len: usize| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
    };
    match answer {
        Serve::File(bytes) => {
            tcp.write_all(head("200 OK", bytes.len()).as_bytes()).await?;
            tcp.write_all(&bytes).await?;
        }
        Serve::Truncated(bytes) => {
            tcp.write_all(head("200 OK", bytes.len()).as_bytes()).await?;
            tcp.write_all(&bytes[..bytes.len() / 2]).await?;
        }
        Serve::Stall(bytes) => {
            tcp.write_all(head("200 OK", bytes.len()).as_bytes()).await?;
            tcp.write_all(&bytes[..bytes.len() / 2]).await?;
            tcp.flush().await?;
            std::future::pending::<()>().await;
        }
        Serve::Redirect(to) => {
            let h = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            tcp.write_all(h.as_bytes()).await?;
        }
        Serve::Status(code) => {
            tcp.write_all(head(&format!("{code} Status"), 0).as_bytes()).await?;
        }
    }
    tcp.shutdown().await
}
