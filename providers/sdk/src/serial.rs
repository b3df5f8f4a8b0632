//! A VM's serial port for core's console proxy: a TCP listener in the
//! provider process that relays one VM's serial line per connection.
//!
//! Most hypervisors keep a VM's serial port where only the hypervisor host
//! reaches it (a pty, a unix socket, a named pipe). A provider that can open
//! it as a byte stream ([`SerialPorts`]) gets a serial console by binding a
//! [`SerialRelay`] and answering `GetConsole` for `serial` with
//! [`SerialRelay::endpoint`]. The endpoint carries a single-use ticket as its
//! `password`: the proxy sends the ticket and a line feed as the first bytes
//! of the connection, and from then on the connection is the serial line,
//! raw bytes both ways. A connection without a valid ticket within
//! [`TICKET_WAIT`] is closed without a byte; a ticket is good once, for
//! [`TICKET_TTL`], for the VM it was minted for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::{ErrorKind, ProviderError, pb};

/// How long a minted ticket stays good (core redeems its console token and
/// connects right after asking for the endpoint).
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// How long a new connection has to send its ticket line.
pub const TICKET_WAIT: Duration = Duration::from_secs(10);
/// Tickets are this many hex digits.
const TICKET_HEX: usize = 64;
/// Most tickets outstanding at once; minting more drops the expired ones
/// and then refuses.
const MAX_TICKETS: usize = 4096;
/// The most of a console log a provider reads and returns: its last MiB.
pub const MAX_LOG_BYTES: usize = 1 << 20;
/// The most lines a GetConsoleLog may ask for.
pub const MAX_LOG_LINES: u32 = 10_000;

/// The console log from the last `tail_lines` lines of `bytes` (the end of
/// what the guest wrote, at most [`MAX_LOG_BYTES`] of it). A last line
/// without its line feed counts; bytes that are not UTF-8 become U+FFFD.
/// `earlier` says whether something was written before `bytes`.
pub fn tail(bytes: &[u8], tail_lines: u32, earlier: bool) -> pb::ConsoleLog {
    let earlier = earlier || bytes.len() > MAX_LOG_BYTES;
    let bytes = &bytes[bytes.len().saturating_sub(MAX_LOG_BYTES)..];
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let wanted = tail_lines.max(1);
    let (mut start, mut lines) = (0, 0u32);
    if !bytes.is_empty() {
        lines = 1;
        let mut pos = body.len();
        while let Some(i) = body[..pos].iter().rposition(|&b| b == b'\n') {
            if lines == wanted {
                start = i + 1;
                break;
            }
            pos = i;
            lines += 1;
        }
    }
    pb::ConsoleLog {
        output: String::from_utf8_lossy(&bytes[start..]).into_owned(),
        lines,
        truncated: earlier || start > 0,
    }
}

/// [`tail`] of a log file: its last [`MAX_LOG_BYTES`]. A file that does not
/// exist yet is an empty log (the guest has written nothing).
pub async fn tail_file(path: &std::path::Path, tail_lines: u32) -> Result<pb::ConsoleLog, ProviderError> {
    use tokio::io::AsyncSeekExt;
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(tail(b"", tail_lines, false)),
        Err(e) => {
            return Err(ProviderError::new(ErrorKind::Internal, format!("cannot read the console log: {e}")));
        }
    };
    let read = async {
        let len = file.metadata().await?.len();
        let from = len.saturating_sub(MAX_LOG_BYTES as u64);
        file.seek(std::io::SeekFrom::Start(from)).await?;
        let mut bytes = Vec::with_capacity((len - from) as usize);
        (&mut file).take(MAX_LOG_BYTES as u64).read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>((bytes, from > 0))
    };
    let (bytes, earlier) = read
        .await
        .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("cannot read the console log: {e}")))?;
    Ok(tail(&bytes, tail_lines, earlier))
}

/// A serial line as a byte stream.
pub trait SerialStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> SerialStream for T {}

/// Opens a VM's serial port.
#[crate::async_trait]
pub trait SerialPorts: Send + Sync + 'static {
    /// The VM's first serial port, connected. A VM that is not running is
    /// [`ErrorKind::InvalidState`].
    async fn open_serial(&self, vm_id: &str) -> Result<Box<dyn SerialStream>, ProviderError>;
}

struct Ticket {
    vm_id: String,
    expires: Instant,
}

/// The relay's listener and its outstanding tickets.
pub struct SerialRelay {
    local: SocketAddr,
    host: String,
    tickets: Mutex<HashMap<String, Ticket>>,
}

impl SerialRelay {
    /// Binds `listen` and serves connections with `ports`. `host` is the
    /// address core's console proxy connects to (the listener's own address
    /// when empty).
    pub async fn bind(
        listen: SocketAddr,
        host: &str,
        ports: Arc<dyn SerialPorts>,
    ) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let host = if host.is_empty() { local.ip().to_string() } else { host.to_owned() };
        let relay = Arc::new(Self { local, host, tickets: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&relay);
        tokio::spawn(async move {
            loop {
                let (conn, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "serial relay: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(relay) = weak.upgrade() else { return };
                let ports = ports.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay.serve(conn, ports.as_ref()).await {
                        tracing::info!(%peer, error = %e.message, "serial relay: connection refused");
                    }
                });
            }
        });
        tracing::info!(listen = %local, "serial relay listening");
        Ok(relay)
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A console endpoint for `vm_id`'s serial port with a fresh ticket.
    pub fn endpoint(&self, vm_id: &str) -> Result<pb::ConsoleEndpoint, ProviderError> {
        let bytes: [u8; TICKET_HEX / 2] = rand::random();
        let ticket: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tickets.retain(|_, t| t.expires > now);
        if tickets.len() >= MAX_TICKETS {
            return Err(ProviderError::new(
                ErrorKind::Unavailable,
                "too many serial console tickets outstanding; try again shortly",
            ));
        }
        tickets.insert(ticket.clone(), Ticket { vm_id: vm_id.to_owned(), expires: now + TICKET_TTL });
        Ok(pb::ConsoleEndpoint {
            protocol: "serial".into(),
            host: self.host.clone(),
            port: u32::from(self.local.port()),
            password: ticket,
            transport: pb::ConsoleTransport::Tcp as i32,
            ..Default::default()
        })
    }

    /// Takes a ticket: the VM it names, once.
    fn take(&self, ticket: &str) -> Option<String> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let t = tickets.remove(ticket)?;
        (t.expires > Instant::now()).then_some(t.vm_id)
    }

    async fn serve(&self, mut conn: TcpStream, ports: &dyn SerialPorts) -> Result<(), ProviderError> {
        let line = tokio::time::timeout(TICKET_WAIT, read_ticket(&mut conn))
            .await
            .map_err(|_| ProviderError::new(ErrorKind::InvalidArgument, "no ticket in time"))??;
        let vm_id = self
            .take(&line)
            .ok_or_else(|| ProviderError::new(ErrorKind::InvalidArgument, "unknown or used ticket"))?;
        let mut port = ports.open_serial(&vm_id).await?;
        tracing::info!(%vm_id, "serial relay: session opened");
        let r = tokio::io::copy_bidirectional(&mut conn, &mut port).await;
        tracing::info!(%vm_id, moved = ?r.as_ref().ok(), "serial relay: session ended");
        Ok(())
    }
}

/// Reads the ticket line byte by byte (so nothing after it is consumed).
async fn read_ticket(conn: &mut TcpStream) -> Result<String, ProviderError> {
    let bad = |why: &str| ProviderError::new(ErrorKind::InvalidArgument, why.to_owned());
    let mut line = Vec::with_capacity(TICKET_HEX);
    loop {
        let b = conn.read_u8().await.map_err(|_| bad("closed before the ticket"))?;
        if b == b'\n' {
            break;
        }
        if line.len() == TICKET_HEX || !b.is_ascii_hexdigit() {
            return Err(bad("not a ticket"));
        }
        line.push(b);
    }
    String::from_utf8(line).map_err(|_| bad("not a ticket"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;

    /// A port that echoes what it is sent, in upper case.
    struct Shouting;

    #[crate::async_trait]
    impl SerialPorts for Shouting {
        async fn open_serial(&self, vm_id: &str) -> Result<Box<dyn SerialStream>, ProviderError> {
            if vm_id == "stopped" {
                return Err(ProviderError::new(ErrorKind::InvalidState, "not running"));
            }
            let (ours, theirs): (DuplexStream, DuplexStream) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                let (mut rx, mut tx) = tokio::io::split(theirs);
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = rx.read(&mut buf).await {
                    let up = buf[..n].to_ascii_uppercase();
                    if tx.write_all(&up).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Box::new(ours))
        }
    }

    async fn relay() -> Arc<SerialRelay> {
        SerialRelay::bind("127.0.0.1:0".parse().unwrap(), "", Arc::new(Shouting)).await.unwrap()
    }

    async fn send(relay: &SerialRelay, first: &[u8]) -> TcpStream {
        let mut c = TcpStream::connect(relay.local_addr()).await.unwrap();
        c.write_all(first).await.unwrap();
        c
    }

    /// Reads until the peer closes (or 2 s pass): what the relay sent back.
    async fn drain(c: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn a_ticket_opens_its_vms_port_once() {
        let relay = relay().await;
        let e = relay.endpoint("vm-1").unwrap();
        assert_eq!((e.protocol.as_str(), e.host.as_str()), ("serial", "127.0.0.1"));
        assert_eq!(e.port, u32::from(relay.local_addr().port()));
        assert_eq!(e.password.len(), TICKET_HEX);

        let mut c = send(&relay, format!("{}\nhello", e.password).as_bytes()).await;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HELLO");
        drop(c);

        // The same ticket again: closed without a byte.
        let mut again = send(&relay, format!("{}\nhello", e.password).as_bytes()).await;
        assert_eq!(drain(&mut again).await, b"");
    }

    #[tokio::test]
    async fn connections_without_a_valid_ticket_get_nothing() {
        let relay = relay().await;
        let e = relay.endpoint("vm-1").unwrap();
        let mut wrong = e.password.clone();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        for first in [
            format!("{wrong}\nhello"),
            "not-hex\nhello".to_owned(),
            format!("{}{}\n", e.password, "0"),
            "\n".to_owned(),
        ] {
            let mut c = send(&relay, first.as_bytes()).await;
            assert_eq!(drain(&mut c).await, b"", "{first:?}");
        }
        // The refusals did not use up the real ticket.
        let mut c = send(&relay, format!("{}\nok", e.password).as_bytes()).await;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"OK");
    }

    #[test]
    fn the_tail_is_the_last_lines() {
        let t = |bytes: &[u8], n, earlier| {
            let l = tail(bytes, n, earlier);
            (l.output, l.lines, l.truncated)
        };
        assert_eq!(t(b"", 5, false), (String::new(), 0, false));
        assert_eq!(t(b"a\nb\nc\n", 2, false), ("b\nc\n".into(), 2, true));
        assert_eq!(t(b"a\nb\nc", 2, false), ("b\nc".into(), 2, true));
        assert_eq!(t(b"a\nb\nc\n", 3, false), ("a\nb\nc\n".into(), 3, false));
        assert_eq!(t(b"a\nb\nc\n", 10, false), ("a\nb\nc\n".into(), 3, false));
        assert_eq!(t(b"a\nb\n", 10, true), ("a\nb\n".into(), 2, true));
        assert_eq!(t(b"\n\nx\n", 1, false), ("x\n".into(), 1, true));
        // Not UTF-8: replaced, never refused.
        assert_eq!(t(b"ok \xff\n", 1, false), ("ok \u{fffd}\n".into(), 1, false));
        // At most the last MiB, whatever the lines.
        let big = vec![b'x'; MAX_LOG_BYTES + 10];
        let l = tail(&big, 1, false);
        assert_eq!((l.output.len(), l.lines, l.truncated), (MAX_LOG_BYTES, 1, true));
    }

    #[tokio::test]
    async fn a_missing_log_file_is_an_empty_log() {
        let l = tail_file(std::path::Path::new("/nonexistent/hcp/serial.log"), 10).await.unwrap();
        assert_eq!((l.output.as_str(), l.lines, l.truncated), ("", 0, false));
    }

    #[tokio::test]
    async fn a_port_that_cannot_open_closes_the_connection() {
        let relay = relay().await;
        let e = relay.endpoint("stopped").unwrap();
        let mut c = send(&relay, format!("{}\nhello", e.password).as_bytes()).await;
        assert_eq!(drain(&mut c).await, b"");
    }
}
