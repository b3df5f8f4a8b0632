//! A TCP proxy a test can take down and bring back, to cut a service off
//! (e.g. PostgreSQL) for the processes under test without stopping the
//! server that other tests share. Down: existing connections are cut and
//! the port refuses new ones (connection refused, as a stopped server
//! would). Up: the same port accepts again.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    /// The proxy's address: give it to the processes under test.
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpProxy {
    /// Proxies a new port on 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        let task = tokio::spawn(serve(Some(listener), addr, target, up.clone()));
        Ok(Self { addr, up, task })
    }

    /// Takes the proxy down (`false`) or brings it back (`true`).
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

async fn serve(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    target: SocketAddr,
    up: Arc<watch::Sender<bool>>,
) {
    let mut state = up.subscribe();
    loop {
        let Some(l) = &listener else {
            // Down: nothing listens; wait to come back, then bind again.
            if state.wait_for(|u| *u).await.is_err() {
                return;
            }
            listener = loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break Some(l),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let conn_state = up.subscribe();
                tokio::spawn(pipe(client, target, conn_state));
            }
            _ = state.wait_for(|u| !*u) => listener = None,
        }
    }
}

async fn pipe(mut client: TcpStream, target: SocketAddr, mut state: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Down: the connection is cut mid-stream.
        _ = state.wait_for(|u| !*u) => {}
    }
}
