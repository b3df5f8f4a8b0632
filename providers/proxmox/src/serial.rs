//! The serial console: PVE's `termproxy` behind the SDK's serial relay.
//!
//! PVE keeps a VM's serial port (`serial0: socket`, which this provider
//! gives every VM it creates) as a unix socket on its node; the API reaches
//! it through `POST …/termproxy` (`serial=serial0`), which starts
//! pve-xtermjs' `termproxy` running `qm terminal`, and the websocket
//! `GET …/vncwebsocket?port=…&vncticket=…` to it. The session on that
//! websocket has its own framing ([`data_packet`], [`PING`]): the client's
//! first message is `<user>:<ticket>\n` and the server answers `OK`; then
//! everything the client sends is a packet, everything the server sends is
//! the terminal's output as it is.
//!
//! Core's console proxy gets raw bytes both ways from the SDK's
//! [`SerialRelay`](hcp_provider_sdk::serial::SerialRelay); [`SerialLines`]
//! translates: bytes from the proxy become data packets, output passes
//! unchanged, and a ping every [`PING_EVERY`] keeps the session open (as
//! PVE's own terminal page does). PVE has no API for what a guest wrote on
//! its serial port before a session, so there is no console log.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hcp_provider_sdk::serial::{SerialPorts, SerialStream};
use hcp_provider_sdk::{ErrorKind, ProviderError, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::Proxmox;
use crate::client::{Method, Params, PveError, PveSocket, lenient};
use crate::errors::map_error;

/// The serial port HCP's VMs get and the console opens.
pub(crate) const SERIAL_PORT: &str = "serial0";
/// Its value in the VM's config: a unix socket on the node.
pub(crate) const SERIAL_SOCKET: &str = "socket";
/// How often an idle session is pinged (PVE's terminal page: 30 s).
pub(crate) const PING_EVERY: Duration = Duration::from_secs(30);
/// A ping packet.
pub(crate) const PING: &[u8] = b"2";
/// How long termproxy has to answer the ticket line.
const AUTH_WAIT: Duration = Duration::from_secs(10);
/// Most bytes read from core's proxy into one data packet.
const CHUNK: usize = 16 * 1024;

/// A data packet: `0:<length>:<bytes>`, `length` in bytes.
pub(crate) fn data_packet(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("0:{}:", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out
}

/// The first message of a session: `<user>:<ticket>\n`.
pub(crate) fn ticket_line(user: &str, ticket: &str) -> Vec<u8> {
    format!("{user}:{ticket}\n").into_bytes()
}

/// Opens VMs' serial ports for the relay. The relay's key for a VM is its
/// API path (`/nodes/{node}/qemu/{vmid}`), found when the console was asked
/// for.
pub(crate) struct SerialLines {
    pub(crate) pve: Arc<crate::client::Pve>,
}

#[hcp_provider_sdk::async_trait]
impl SerialPorts for SerialLines {
    async fn open_serial(&self, vm_path: &str) -> Result<Box<dyn SerialStream>, ProviderError> {
        let params: Params = vec![("serial", SERIAL_PORT.to_owned())];
        let data =
            self.pve.call(Method::Post, &format!("{vm_path}/termproxy"), params).await.map_err(map_error)?;
        let port = lenient::u64(&data["port"])
            .ok_or_else(|| map_error(PveError::Decode("termproxy without port".into())))?;
        let (Some(ticket), Some(user)) = (data["ticket"].as_str(), data["user"].as_str()) else {
            return Err(map_error(PveError::Decode("termproxy without ticket or user".into())));
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("port", &port.to_string())
            .append_pair("vncticket", ticket)
            .finish();
        let mut ws =
            self.pve.websocket(&format!("{vm_path}/vncwebsocket?{query}")).await.map_err(map_error)?;
        ws.send(Message::Binary(ticket_line(user, ticket).into()))
            .await
            .map_err(|e| unavailable(format!("termproxy: {e}")))?;
        let early = tokio::time::timeout(AUTH_WAIT, authenticated(&mut ws))
            .await
            .map_err(|_| unavailable("termproxy did not answer the ticket".to_owned()))??;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(pump(ws, theirs, early));
        Ok(Box::new(ours))
    }
}

fn unavailable(message: String) -> ProviderError {
    ProviderError::new(ErrorKind::Unavailable, message)
}

/// Waits for termproxy's `OK`; returns what came after it in the same
/// messages (the terminal's first output).
async fn authenticated(ws: &mut PveSocket) -> Result<Vec<u8>, ProviderError> {
    let mut got = Vec::new();
    while got.len() < 2 {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(Message::Text(t))) => got.extend_from_slice(t.as_bytes()),
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                return Err(unavailable("termproxy closed the session before accepting it".to_owned()));
            }
            Some(Ok(_)) => {}
        }
    }
    if !got.starts_with(b"OK") {
        return Err(unavailable("termproxy refused the session".to_owned()));
    }
    Ok(got.split_off(2))
}

/// Relays between the termproxy websocket and the relay's end of the line
/// until either closes.
async fn pump(ws: PveSocket, line: tokio::io::DuplexStream, early: Vec<u8>) {
    let (mut sink, mut stream) = ws.split();
    let (mut from_proxy, mut to_proxy) = tokio::io::split(line);
    if !early.is_empty() && to_proxy.write_all(&early).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            n = from_proxy.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(data_packet(&buf[..n]).into())).await.is_err() {
                        break;
                    }
                }
            },
            msg = stream.next() => {
                let out = match msg {
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                if to_proxy.write_all(&out).await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Binary(PING.to_vec().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

impl Proxmox {
    /// The serial console of a running VM that has `serial0: socket`: a
    /// ticket for the relay.
    pub(crate) async fn serial_console(&self, vm_id: &str) -> Result<pb::ConsoleEndpoint, ProviderError> {
        let Some(relay) = self.serial.get() else {
            return Err(ProviderError::new(ErrorKind::Unsupported, "serial consoles are not supported"));
        };
        let f = self.require(vm_id).await?;
        if f.status != "running" {
            return Err(ProviderError::new(ErrorKind::InvalidState, format!("vm {vm_id} is not running")));
        }
        // PVE itself refuses nothing at termproxy: `qm terminal` prints its
        // refusal into the session. Asked first, it is a clear answer.
        let config = self
            .pve
            .call(Method::Get, &format!("{}/config", f.path()), Vec::new())
            .await
            .map_err(map_error)?;
        if config[SERIAL_PORT].as_str() != Some(SERIAL_SOCKET) {
            return Err(ProviderError::new(
                ErrorKind::InvalidState,
                format!(
                    "vm {vm_id} has no serial port ({SERIAL_PORT}: {SERIAL_SOCKET} is not in its config)"
                ),
            ));
        }
        relay.endpoint(&f.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_termproxys() {
        assert_eq!(data_packet(b"ls\r"), b"0:3:ls\r");
        assert_eq!(data_packet("é".as_bytes()), b"0:2:\xc3\xa9");
        assert_eq!(data_packet(b""), b"0:0:");
        assert_eq!(data_packet(b"0:1:"), b"0:4:0:1:");
        assert_eq!(ticket_line("root@pam!hcp", "PVEVNC:AB::cd"), b"root@pam!hcp:PVEVNC:AB::cd\n");
        assert_eq!(PING, b"2");
    }
}
