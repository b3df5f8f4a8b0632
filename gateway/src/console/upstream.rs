//! The console proxy's side towards the hypervisor: opens the byte stream
//! that carries RFB to the console server a provider described, whatever
//! carries it.
//!
//! - TCP (`CONSOLE_TRANSPORT_TCP`): a plain connection to `host:port` (a
//!   hypervisor's VNC listener, as libvirt gives).
//! - Websocket (`CONSOLE_TRANSPORT_WEBSOCKET`): `ws(s)://host:port{path}`
//!   with the endpoint's headers (an API token, a session cookie) and
//!   subprotocol on the upgrade, as Proxmox's `vncwebsocket` and vSphere's
//!   `/ticket/…` want. TLS trusts exactly the endpoint's CA certificates or
//!   its pinned certificate fingerprint ([`hcp_tls::client_config`]); an
//!   endpoint with TLS and neither is refused, never trusted blindly. The
//!   websocket's binary messages become a byte stream ([`WsIo`]), so the
//!   RFB handshake ([`super::rfb`]) and the relay are the same for both.
//!
//! Connecting (TCP, TLS and the upgrade) has [`CONNECT_TIMEOUT`]. Errors'
//! `Display` is what the tenant is told when the session closes: it never
//! names the host, the path (which may hold a ticket) or a header; the
//! operator's detail is in the error's sources, for the log.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use hcp_proto::provider::{ConsoleEndpoint, ConsoleTransport};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long connecting to a console server may take, TLS and websocket
/// upgrade included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A byte stream to a console server.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open console server connection, positioned before the server's RFB
/// greeting.
pub type Upstream = Box<dyn Io>;

/// Why no connection to the console server could be opened. `Display` is
/// the tenant's close reason; sources carry the detail for the log.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The endpoint asks for something the proxy does not do (a transport
    /// it does not know, TLS or a path on plain TCP).
    #[error("consoles of this kind are not supported yet")]
    Unsupported,
    /// The endpoint cannot be used as given (a provider's mistake).
    #[error("the console endpoint is not usable: {0}")]
    Invalid(&'static str),
    /// TLS without a CA or a fingerprint to trust.
    #[error("the console server cannot be trusted: its endpoint names no CA and no certificate fingerprint")]
    NoTrust,
    /// The TCP connection failed (the text is the OS error, which names no
    /// address).
    #[error("cannot reach the console server: {0}")]
    Connect(io::Error),
    /// Nothing within [`CONNECT_TIMEOUT`].
    #[error("cannot reach the console server: timed out")]
    Timeout,
    /// The server's certificate is not the trusted one.
    #[error("cannot reach the console server: its TLS certificate is not trusted")]
    Untrusted(#[source] io::Error),
    /// TLS failed otherwise.
    #[error("cannot reach the console server: the TLS handshake failed")]
    Tls(#[source] io::Error),
    /// The server answered the upgrade with an HTTP status.
    #[error("the console server refused the websocket (HTTP {0})")]
    Refused(u16),
    /// The websocket handshake failed otherwise.
    #[error("the console server's websocket handshake failed")]
    Handshake(#[source] tungstenite::Error),
}

impl UpstreamError {
    /// Whether the tenant asked for something unsupported (close code
    /// 4400) rather than the upstream failing (4502).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported)
    }
}

/// Connects to the console server `endpoint` describes.
pub async fn connect(endpoint: &ConsoleEndpoint) -> Result<Upstream, UpstreamError> {
    // `transport()` would read an unknown value as TCP.
    match ConsoleTransport::try_from(endpoint.transport).map_err(|_| UpstreamError::Unsupported)? {
        ConsoleTransport::Tcp => {
            if endpoint.tls || !endpoint.path.is_empty() {
                return Err(UpstreamError::Unsupported);
            }
            let tcp = within(tcp(endpoint)).await?;
            Ok(Box::new(tcp))
        }
        ConsoleTransport::Websocket => {
            // Everything that can be refused without a connection is.
            let tls = if endpoint.tls {
                let config = hcp_tls::client_config(&trust(endpoint)?)
                    .map_err(|_| UpstreamError::Invalid("its TLS CA certificates cannot be read"))?;
                let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|_| UpstreamError::Invalid("its host is not a valid TLS server name"))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            } else {
                None
            };
            let request = upgrade_request(endpoint)?;
            within(async {
                let tcp = tcp(endpoint).await?;
                let stream: Upstream = match tls {
                    Some((connector, name)) => {
                        Box::new(connector.connect(name, tcp).await.map_err(tls_error)?)
                    }
                    None => Box::new(tcp),
                };
                let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, None)
                    .await
                    .map_err(|e| match e {
                        tungstenite::Error::Http(resp) => UpstreamError::Refused(resp.status().as_u16()),
                        e => UpstreamError::Handshake(e),
                    })?;
                Ok(Box::new(WsIo::new(ws)) as Upstream)
            })
            .await
        }
    }
}

async fn within<T>(f: impl Future<Output = Result<T, UpstreamError>>) -> Result<T, UpstreamError> {
    tokio::time::timeout(CONNECT_TIMEOUT, f).await.map_err(|_| UpstreamError::Timeout)?
}

async fn tcp(endpoint: &ConsoleEndpoint) -> Result<tokio::net::TcpStream, UpstreamError> {
    let port =
        u16::try_from(endpoint.port).map_err(|_| UpstreamError::Invalid("its port is out of range"))?;
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), port))
        .await
        .map_err(UpstreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The trust the endpoint names: exactly one of a CA and a fingerprint.
fn trust(endpoint: &ConsoleEndpoint) -> Result<hcp_tls::Trust, UpstreamError> {
    match (endpoint.tls_ca_pem.is_empty(), endpoint.tls_fingerprint_sha256.is_empty()) {
        (false, true) => Ok(hcp_tls::Trust::Ca(endpoint.tls_ca_pem.as_bytes().to_vec())),
        (true, false) => hcp_tls::parse_fingerprint(&endpoint.tls_fingerprint_sha256)
            .map(hcp_tls::Trust::Fingerprint)
            .ok_or(UpstreamError::Invalid("its TLS fingerprint is not 32 hex bytes")),
        (true, true) => Err(UpstreamError::NoTrust),
        (false, false) => Err(UpstreamError::Invalid("it names both a CA and a certificate fingerprint")),
    }
}

/// A certificate that fails verification (a wrong pin, an unknown CA) is
/// told apart from other TLS failures.
fn tls_error(e: io::Error) -> UpstreamError {
    let untrusted = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_) | rustls::Error::General(_)));
    if untrusted { UpstreamError::Untrusted(e) } else { UpstreamError::Tls(e) }
}

/// The upgrade request: URL, the endpoint's headers and subprotocol.
fn upgrade_request(
    endpoint: &ConsoleEndpoint,
) -> Result<tungstenite::handshake::client::Request, UpstreamError> {
    let scheme = if endpoint.tls { "wss" } else { "ws" };
    let host =
        if endpoint.host.contains(':') { format!("[{}]", endpoint.host) } else { endpoint.host.clone() };
    let path = if endpoint.path.is_empty() { "/" } else { endpoint.path.as_str() };
    if !path.starts_with('/') {
        return Err(UpstreamError::Invalid("its path does not start with /"));
    }
    let url = format!("{scheme}://{host}:{}{path}", endpoint.port);
    let mut request = url
        .into_client_request()
        .map_err(|_| UpstreamError::Invalid("its host, port or path is malformed"))?;
    let headers = request.headers_mut();
    for h in &endpoint.headers {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| UpstreamError::Invalid("a header name is malformed"))?;
        let value = http::HeaderValue::from_str(&h.value)
            .map_err(|_| UpstreamError::Invalid("a header value is malformed"))?;
        headers.append(name, value);
    }
    if !endpoint.websocket_subprotocol.is_empty() {
        let value = http::HeaderValue::from_str(&endpoint.websocket_subprotocol)
            .map_err(|_| UpstreamError::Invalid("its websocket subprotocol is malformed"))?;
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    Ok(request)
}

/// A websocket as a byte stream: each write is one binary message, reads
/// return the bytes of binary messages in order, and a close (or the end
/// of the connection) is the end of the stream. Pings are answered by
/// tungstenite; text messages are not RFB and are an error.
pub struct WsIo<S> {
    ws: S,
    /// What is left of the last binary message read.
    pending: Bytes,
}

impl<S> WsIo<S> {
    /// Wraps a websocket whose handshake is done.
    pub fn new(ws: S) -> Self {
        Self { ws, pending: Bytes::new() }
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the websocket is closed")
        }
        e => io::Error::other(format!("websocket: {e}")),
    }
}

impl<S> AsyncRead for WsIo<S>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message, Error = tungstenite::Error> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Writes wait in the websocket's buffer until flushed, and the
            // RFB handshake writes a question and then reads its answer
            // without flushing (a TCP stream needs none): whoever waits to
            // read has its writes sent first. A failed flush shows on the
            // next write.
            let _ = Pin::new(&mut self.ws).poll_flush(cx);
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the console server sent a text message",
                    )));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsIo<S>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message, Error = tungstenite::Error> + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcp_proto::provider::ConsoleHeader;

    fn endpoint() -> ConsoleEndpoint {
        ConsoleEndpoint {
            protocol: "vnc".into(),
            host: "pve.internal".into(),
            port: 8006,
            tls: true,
            path: "/api2/json/nodes/n/qemu/100/vncwebsocket?port=5900&vncticket=PVEVNC:secret".into(),
            transport: ConsoleTransport::Websocket.into(),
            headers: vec![ConsoleHeader {
                name: "Authorization".into(),
                value: "PVEAPIToken=a@b!c=secret".into(),
            }],
            tls_fingerprint_sha256: ["AB"; 32].join(":"),
            websocket_subprotocol: "binary".into(),
            ..Default::default()
        }
    }

    #[test]
    fn trust_is_exactly_one_of_a_ca_and_a_fingerprint() {
        let check = |ca: &str, fp: &str, want: Result<(), &str>| {
            let e =
                ConsoleEndpoint { tls_ca_pem: ca.into(), tls_fingerprint_sha256: fp.into(), ..endpoint() };
            let got = trust(&e).map(|_| ()).map_err(|e| e.to_string());
            match want {
                Ok(()) => assert!(got.is_ok(), "{ca:?} {fp:?}: {got:?}"),
                Err(text) => assert!(got.as_ref().is_err_and(|g| g.contains(text)), "{ca:?} {fp:?}: {got:?}"),
            }
        };
        check("", &["AB"; 32].join(":"), Ok(()));
        check("-----BEGIN CERTIFICATE-----", "", Ok(()));
        check("", "", Err("names no CA and no certificate fingerprint"));
        check("pem", "AB", Err("both"));
        check("", "AB:CD", Err("not 32 hex bytes"));
    }

    #[test]
    fn the_upgrade_carries_the_headers_and_subprotocol() {
        let r = upgrade_request(&endpoint()).unwrap();
        assert_eq!(
            r.uri().to_string(),
            "wss://pve.internal:8006/api2/json/nodes/n/qemu/100/vncwebsocket?port=5900&vncticket=PVEVNC:secret"
        );
        assert_eq!(r.headers()["authorization"], "PVEAPIToken=a@b!c=secret");
        assert_eq!(r.headers()["sec-websocket-protocol"], "binary");
        let plain = ConsoleEndpoint { tls: false, host: "::1".into(), path: String::new(), ..endpoint() };
        assert_eq!(upgrade_request(&plain).unwrap().uri().to_string(), "ws://[::1]:8006/");
        let bad = ConsoleEndpoint {
            headers: vec![ConsoleHeader { name: "cookie".into(), value: "a\nb".into() }],
            ..endpoint()
        };
        assert!(matches!(upgrade_request(&bad), Err(UpstreamError::Invalid(_))));
    }

    #[test]
    fn tenant_reasons_name_nothing_of_the_upstream() {
        let e = endpoint();
        let errors = [
            UpstreamError::Unsupported,
            UpstreamError::Invalid("a header value is malformed"),
            UpstreamError::NoTrust,
            UpstreamError::Timeout,
            UpstreamError::Untrusted(io::Error::other(format!("{} {}", e.host, e.tls_fingerprint_sha256))),
            UpstreamError::Tls(io::Error::other(e.host.clone())),
            UpstreamError::Refused(401),
            UpstreamError::Handshake(tungstenite::Error::Url(tungstenite::error::UrlError::NoHostName)),
        ];
        for err in errors {
            let told = err.to_string();
            for secret in [e.host.as_str(), "8006", "vncwebsocket", "PVEVNC", "secret", "AB:AB"] {
                assert!(!told.contains(secret), "{told:?} names {secret:?}");
            }
        }
    }
}
