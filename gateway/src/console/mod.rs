//! The console proxy: how a tenant's browser reaches a VM's screen without
//! ever learning where the hypervisor is or what its VNC password is.
//!
//! `GET /console/vnc?token=…` upgrades to a websocket (subprotocol
//! `binary`, as noVNC asks). The proxy checks the Origin against the allow
//! list (a CSRF defence: browsers always send it), asks core to redeem the
//! single-use token (core answers only the gateway's service account, role
//! `console.proxy`), connects to the endpoint core returns (plain TCP, or a
//! websocket with TLS trusted as the endpoint says: [`upstream`]),
//! authenticates to the VNC server with the password on the tenant's behalf
//! ([`rfb`]),
//! offers the browser an RFB handshake without authentication, and then
//! relays bytes both ways until either side closes or the maximum session
//! time core gave passes. Refusals accept the websocket and close it with a
//! 4xxx code and a reason the page shows. Every end is reported to core for
//! the audit trail.
//!
//! `GET /console/rdp?token=…` is the same for RDP, without the VNC step:
//! the proxy sends the endpoint's preconnection PDU (Hyper-V's VMConnect
//! needs the VM's GUID) and relays the client's RDP as it is. Native RDP
//! clients reach the TCP relay of [`rdp`] instead, with the token as their
//! preconnection blob. Both share the redeem, connect, relay and report
//! steps ([`Session`], [`relay`]).
//!
//! `GET /console/spice?token=…` is the same for SPICE ([`spice`]), whose
//! browser client opens one websocket per channel with the same token: the
//! proxy reads each connection's SpiceLinkMess first, and the main channel
//! opens the session (redeeming the token) while every other channel joins
//! it (core admits it while the session is open and from the client address
//! that opened it). The proxy answers the server's ticket with the real
//! password on the tenant's behalf and relays the rest.
//!
//! `GET /console/vnc.html?token=…` and the files beside it are the console
//! pages (`gateway/console/www`), with noVNC and xterm.js (installed from
//! npm into `gateway/console/node_modules` by `scripts/console-assets.sh`)
//! and spice-html5 (Debian's package, `/usr/share/spice-html5`, installed
//! by the same script) at `/console/spice-html5/…`.

pub mod rdp;
mod revoke;
pub mod rfb;
pub mod spice;
pub mod upstream;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hcp_proto::console::console_broker_service_client::ConsoleBrokerServiceClient;
use hcp_proto::console::{EndConsoleRequest, RedeemConsoleRequest, RedeemedConsole};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::Channel;

/// Console proxy settings.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// File holding the JWT of the gateway's service account (role
    /// `console.proxy`); read at each connection, so it can be rotated.
    /// Without it the proxy refuses every connection.
    pub service_token_file: Option<PathBuf>,
    /// Origins allowed to open consoles (e.g. `https://cloud.example.com`);
    /// empty means same origin as the request's Host.
    pub allowed_origins: Vec<String>,
    /// Directory with `www/` (the console page) and `node_modules/` (noVNC).
    pub assets_dir: PathBuf,
    /// Directory of spice-html5 (Debian's `spice-html5` package installs it
    /// at [`SPICE_HTML5_DIR`]).
    pub spice_html5_dir: PathBuf,
    /// Where the RDP relay for native clients listens ([`rdp`]); none
    /// without it.
    pub rdp_listen: Option<std::net::SocketAddr>,
}

/// What the console routes need.
pub(crate) struct Console {
    pub(crate) config: ConsoleConfig,
    pub(crate) core: Channel,
    /// The sessions open here, watched for core's revocation.
    open: Arc<revoke::OpenSessions>,
}

impl Console {
    /// The console routes' state, and the task that ends sessions core
    /// revokes (it stops when the state is dropped).
    pub(crate) fn new(config: ConsoleConfig, core: Channel) -> Arc<Self> {
        let console = Arc::new(Self { config, core, open: Arc::default() });
        tokio::spawn(revoke::poll(Arc::downgrade(&console)));
        console
    }
}

/// The largest websocket message (and frame) a client may send: RFB's
/// largest client message and a serial console's typing are far below it.
/// A bigger one ends the session with 1009.
pub(crate) const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Close codes (4000-4999 are the application's).
pub(crate) mod close {
    pub(super) const BAD_REQUEST: u16 = 4400;
    pub(super) const REFUSED: u16 = 4403;
    pub(super) const MAX_TIME: u16 = 4408;
    /// Core revoked the session: its VM stopped, moved or was deleted.
    pub(super) const REVOKED: u16 = 4410;
    /// A client message over [`super::MAX_CLIENT_MESSAGE`] (RFC 6455's
    /// "message too big").
    pub(super) const TOO_BIG: u16 = 1009;
    pub(super) const UPSTREAM: u16 = 4502;
    pub(super) const UNAVAILABLE: u16 = 4503;
}

#[derive(serde::Deserialize)]
pub(crate) struct TokenQuery {
    #[serde(default)]
    token: String,
}

/// Where Debian's `spice-html5` package installs the SPICE client.
pub const SPICE_HTML5_DIR: &str = "/usr/share/spice-html5";

/// The address of a connection's peer, as the gateway's listener saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::edge::EdgeListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::edge::EdgeListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The client's address as the connection shows it (no forwarding header is
/// trusted), when the server was started with connection info.
pub(crate) struct ClientAddress(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<axum::extract::ConnectInfo<Peer>>()
            .map(|c| c.0.0.ip().to_canonical().to_string());
        Ok(Self(ip.unwrap_or_default()))
    }
}

/// `GET /console/{name}`: `vnc` (and other protocols) upgrade to the proxy;
/// names with a dot are files of the console page.
pub(crate) async fn entry(
    State(console): State<Arc<Console>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<TokenQuery>,
    ClientAddress(client_address): ClientAddress,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if name.contains('.') {
        return serve_file(&console.config.assets_dir.join("www"), &name).await;
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("{name}: a websocket upgrade is needed ({e})"))
                .into_response();
        }
    };
    if let Err(why) = origin_allowed(&console.config.allowed_origins, &headers) {
        tracing::warn!(origin = ?headers.get(header::ORIGIN), "console refused: {why}");
        return (StatusCode::FORBIDDEN, why.to_string()).into_response();
    }
    let protocol = name;
    ws.protocols(["binary"])
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            session(console, protocol, q.token, client_address, socket).await;
        })
}

/// `GET /console/spice-html5/{*path}`: spice-html5's files.
pub(crate) async fn spice_html5(
    State(console): State<Arc<Console>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    serve_file(&console.config.spice_html5_dir, &path).await
}

/// `GET /console/novnc/{*path}`: noVNC's modules.
pub(crate) async fn novnc(
    State(console): State<Arc<Console>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    serve_file(&console.config.assets_dir.join("node_modules/@novnc/novnc"), &path).await
}

/// The npm packages whose files the console pages load (from
/// `node_modules`, installed from the lockfile); nothing else there is
/// served.
const PAGE_MODULES: &[&str] = &["@novnc/novnc", "@xterm/xterm", "@xterm/addon-fit"];

/// `GET /console/modules/{*path}`: a file of one of [`PAGE_MODULES`].
pub(crate) async fn modules(
    State(console): State<Arc<Console>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    let Some((module, rest)) =
        PAGE_MODULES.iter().find_map(|m| path.strip_prefix(m)?.strip_prefix('/').map(|rest| (*m, rest)))
    else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    serve_file(&console.config.assets_dir.join("node_modules").join(module), rest).await
}

/// What every console page and its files are sent with. The page's URL
/// carries a single-use token: it is never stored by a cache
/// (`no-store`), handed on in a Referer, or shown inside another site's
/// frame (clickjacking); its scripts come from the gateway alone, and it
/// connects nowhere but back to it (websockets included: CSP level 3's
/// 'self' covers ws: and wss: of the same host).
const PAGE_HEADERS: &[(header::HeaderName, &str)] = &[
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
         font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
];

/// Same origin (Origin's host is the request's Host) or listed; a request
/// without Origin comes from a non-browser client and is let through.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> Result<(), OriginRefused> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return Ok(());
    };
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return Ok(());
    }
    if allowed.is_empty() {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or_default();
        if !host.is_empty() && origin_host == host {
            return Ok(());
        }
    }
    Err(OriginRefused(origin.to_owned()))
}

/// A browser page from an origin that may not open consoles.
#[derive(Debug, thiserror::Error)]
#[error("origin {0} may not open consoles")]
struct OriginRefused(String);

async fn serve_file(root: &Path, rel: &str) -> Response {
    let rel = Path::new(rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let path = root.join(rel);
    let content_type = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(&path).await {
        Ok(body) => {
            let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
            for (name, value) in PAGE_HEADERS {
                response.headers_mut().insert(name, header::HeaderValue::from_static(value));
            }
            response
        }
        Err(_) if !root.exists() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the console page is not installed ({} is missing): run scripts/console-assets.sh",
                root.display()
            ),
        )
            .into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

/// Why a session ended: a close code and a reason for the tenant.
pub(crate) struct End {
    code: u16,
    reason: String,
}

impl End {
    pub(crate) fn new(code: u16, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

/// Byte counters of a session, for the audit trail.
#[derive(Default)]
pub(crate) struct Counters {
    to_client: AtomicU64,
    to_server: AtomicU64,
}

/// What ends a session from outside: its maximum time, or core revoking it.
pub(crate) struct Limit {
    max: Duration,
    watch: revoke::Watch,
}

impl Limit {
    /// Resolves with the session's end when either comes.
    pub(crate) async fn reached(mut self) -> End {
        tokio::select! {
            () = tokio::time::sleep(self.max) => End::new(close::MAX_TIME, "maximum console session time reached"),
            reason = self.watch.revoked() => End::new(close::REVOKED, reason),
        }
    }
}

/// The protocols the proxy relays, as metrics label them.
fn label(protocol: &str) -> Option<&'static str> {
    match protocol {
        "vnc" => Some("vnc"),
        "rdp" => Some("rdp"),
        "serial" => Some("serial"),
        "spice" => Some("spice"),
        _ => None,
    }
}

/// One console session's bookkeeping, whatever carries it: when it began,
/// what it moved, and the redeemed token whose end core must hear about.
pub(crate) struct Session {
    started: Instant,
    counters: Counters,
    redeemed: Option<RedeemedConsole>,
    /// The protocol, while the session counts in
    /// `hcp_console_sessions_active`.
    active: Option<&'static str>,
    /// The client's address, for core to store (or, for a SPICE channel,
    /// check).
    client_address: String,
    /// A SPICE channel joining the session its main channel opened.
    channel: bool,
}

impl Session {
    pub(crate) fn new(client_address: String) -> Self {
        Self {
            started: Instant::now(),
            counters: Counters::default(),
            redeemed: None,
            active: None,
            client_address,
            channel: false,
        }
    }

    /// The console server's password, once a token is redeemed.
    fn password(&self) -> &str {
        self.redeemed.as_ref().and_then(|r| r.endpoint.as_ref()).map_or("", |e| e.password.as_str())
    }

    /// Redeems `token` for `protocol`, connects to the console server and
    /// does the server side of the protocol's opening (VNC authentication
    /// with the endpoint's password; RDP's preconnection PDU; the serial
    /// relay's ticket; none for SPICE, whose link needs the client too).
    /// Returns the connection and what limits the session.
    pub(crate) async fn open(
        &mut self,
        console: &Console,
        protocol: &str,
        token: &str,
    ) -> Result<(upstream::Upstream, Limit), End> {
        if token.is_empty() {
            return Err(End::new(close::BAD_REQUEST, "the console URL has no token"));
        }
        let Some(label) = label(protocol) else {
            return Err(End::new(close::BAD_REQUEST, format!("{protocol} consoles are not supported yet")));
        };
        let r = redeem(console, protocol, token, &self.client_address, self.channel).await?;
        // Core refuses at start a max_session_seconds below 1.
        let limit = Limit {
            max: Duration::from_secs(u64::from(r.max_session_seconds)),
            watch: console.open.watch(&r.session_id),
        };
        let endpoint = r.endpoint.clone();
        // From here on the session's end is reported, whatever happens.
        self.redeemed = Some(r);
        let Some(endpoint) = endpoint else {
            return Err(End::new(close::UPSTREAM, "core gave no console endpoint"));
        };
        let mut server = match upstream::connect(&endpoint).await {
            Ok(s) => s,
            Err(e) if e.is_unsupported() => {
                return Err(End::new(close::BAD_REQUEST, format!("{protocol} {e}")));
            }
            Err(e) => {
                // The chain names no host, path or header either: the
                // endpoint itself is never logged.
                tracing::warn!(transport = ?endpoint.transport(), error = %chain(&e), "console server unreachable");
                return Err(End::new(close::UPSTREAM, e.to_string()));
            }
        };
        // A server that accepts and then says nothing must not hold the
        // session (and its audit report) forever.
        let opening = async {
            match label {
                "rdp" => rdp::send_blob(&mut server, &endpoint.preconnection_blob)
                    .await
                    .map_err(|e| format!("cannot reach the console server: {e}")),
                "serial" => send_ticket(&mut server, &endpoint.password)
                    .await
                    .map_err(|e| format!("cannot reach the console server: {e}")),
                "spice" => Ok(()),
                _ => rfb::connect_server(&mut server, &endpoint.password).await.map_err(|e| e.to_string()),
            }
        };
        match tokio::time::timeout(upstream::CONNECT_TIMEOUT, opening).await {
            Ok(Ok(())) => {
                metrics::gauge!("hcp_console_sessions_active", "protocol" => label).increment(1.0);
                self.active = Some(label);
                Ok((server, limit))
            }
            Ok(Err(e)) => Err(End::new(close::UPSTREAM, e)),
            Err(_) => {
                Err(End::new(close::UPSTREAM, "the console server did not complete its handshake in time"))
            }
        }
    }

    /// Tells core how the session ended (for the audit trail), if a token
    /// was redeemed.
    pub(crate) async fn report(self, console: &Console, end: End) {
        if let Some(label) = self.active {
            metrics::gauge!("hcp_console_sessions_active", "protocol" => label).decrement(1.0);
        }
        let Some(r) = self.redeemed else { return };
        let req = EndConsoleRequest {
            session_id: r.session_id,
            reason: end.reason,
            duration_ms: self.started.elapsed().as_millis() as u64,
            bytes_to_client: self.counters.to_client.load(Ordering::Relaxed),
            bytes_to_server: self.counters.to_server.load(Ordering::Relaxed),
            channel: self.channel,
        };
        if let Err(e) = broker_call(console, req, |mut c, r| async move { c.end_console(r).await }).await {
            tracing::warn!(error = %e.message(), "could not record the end of a console session");
        }
    }
}

/// The serial relay's opening: its ticket and a line feed (none when the
/// endpoint has no ticket: a serial line served as it is).
async fn send_ticket(server: &mut (impl AsyncWrite + Unpin), ticket: &str) -> std::io::Result<()> {
    if ticket.is_empty() {
        return Ok(());
    }
    server.write_all(format!("{ticket}\n").as_bytes()).await?;
    server.flush().await
}

/// Whether a websocket error is a client message over the size limit.
fn too_big(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    matches!(e.into_inner().downcast_ref::<Error>(), Some(Error::Capacity(_)))
}

/// Copies bytes both ways between a client and a console server, counting
/// them, until either side closes or fails.
pub(crate) async fn relay(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    server: &mut (impl AsyncRead + AsyncWrite + Unpin),
    counters: &Counters,
) -> End {
    async fn pump(
        from: &mut (impl AsyncRead + Unpin),
        to: &mut (impl AsyncWrite + Unpin),
        counter: &AtomicU64,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            to.write_all(&buf[..n]).await?;
            to.flush().await?;
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    tokio::select! {
        r = pump(&mut client_rx, &mut server_tx, &counters.to_server) => match r {
            Ok(()) => End::new(1000, "client closed"),
            Err(e) => End::new(close::UPSTREAM, format!("console connection failed: {e}")),
        },
        r = pump(&mut server_rx, &mut client_tx, &counters.to_client) => match r {
            Ok(()) => End::new(1000, "the console server closed the session"),
            Err(e) => End::new(close::UPSTREAM, format!("console connection failed: {e}")),
        },
    }
}

async fn session(
    console: Arc<Console>,
    protocol: String,
    token: String,
    client_address: String,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let mut s = Session::new(client_address);
    let end = async {
        // A serial console's keys may come as text messages (a terminal
        // page types text); every other protocol is binary.
        // The browser side is a byte stream: a pipe whose far end the
        // bridge below feeds from and into websocket messages. The bridge
        // runs from the start: SPICE's client speaks first.
        let (mut client, bridge_end) = tokio::io::duplex(256 * 1024);
        let (mut from_pipe, mut into_pipe) = tokio::io::split(bridge_end);
        let proxy = async {
            // SPICE: whether the connection opens the session or joins it
            // is in the client's link message, read before the token is
            // redeemed.
            let link = if protocol == "spice" {
                let read = spice::read_client_link(&mut client);
                match tokio::time::timeout(upstream::CONNECT_TIMEOUT, read).await {
                    Ok(Ok(link)) => {
                        s.channel = !link.opens_session();
                        Some(link)
                    }
                    Ok(Err(e)) => return End::new(close::BAD_REQUEST, e.to_string()),
                    Err(_) => return End::new(close::BAD_REQUEST, "the SPICE client sent no link message in time"),
                }
            } else {
                None
            };
            let (mut server, limit) = match s.open(&console, &protocol, &token).await {
                Ok(o) => o,
                Err(end) => return end,
            };
            if let Some(link) = &link {
                let linking = spice::link(&mut server, &mut client, link, s.password());
                match tokio::time::timeout(upstream::CONNECT_TIMEOUT, linking).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::new(close::UPSTREAM, e.to_string()),
                    Err(_) => {
                        return End::new(close::UPSTREAM, "the SPICE link did not complete in time");
                    }
                }
            }
            // VNC: the proxy answered the server's authentication, so it
            // offers the browser RFB without any. RDP passes through as is.
            if protocol == "vnc"
                && let Err(e) = rfb::accept_client(&mut client).await
            {
                return End::new(close::BAD_REQUEST, e.to_string());
            }
            tokio::select! {
                end = relay(&mut client, &mut server, &s.counters) => end,
                end = limit.reached() => end,
            }
        };
        let bridge = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(Ok(Message::Binary(b))) => {
                            if into_pipe.write_all(&b).await.is_err() {
                                return End::new(1000, "the console server closed the session");
                            }
                        }
                        Some(Ok(Message::Text(t))) if protocol == "serial" => {
                            if into_pipe.write_all(t.as_bytes()).await.is_err() {
                                return End::new(1000, "the console server closed the session");
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => return End::new(1000, "client closed"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let text = e.to_string();
                            if too_big(e) {
                                return End::new(
                                    close::TOO_BIG,
                                    format!("a client message over {MAX_CLIENT_MESSAGE} bytes"),
                                );
                            }
                            return End::new(1000, format!("client connection failed: {text}"));
                        }
                    },
                    n = from_pipe.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return End::new(1000, "the console server closed the session"),
                        Ok(n) => {
                            if sink.send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                                return End::new(1000, "client connection failed");
                            }
                        }
                    },
                }
            }
        };
        tokio::select! {
            end = proxy => end,
            end = bridge => end,
        }
    }
    .await;
    tracing::info!(code = end.code, reason = %end.reason, "console session ended");
    // Close reasons are at most 123 bytes.
    let mut reason = end.reason.clone();
    while reason.len() > 123 {
        reason.pop();
    }
    // A client that reads nothing must not keep the end from being reported.
    let closing = async {
        let _ = sink.send(Message::Close(Some(CloseFrame { code: end.code, reason: reason.into() }))).await;
        let _ = sink.close().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    s.report(&console, end).await;
}

/// An error and its sources, for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Calls the broker with the service account's token.
async fn broker_call<T, R, F, Fut>(console: &Console, msg: T, f: F) -> Result<R, tonic::Status>
where
    F: FnOnce(ConsoleBrokerServiceClient<Channel>, tonic::Request<T>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let Some(file) = &console.config.service_token_file else {
        return Err(tonic::Status::unavailable(
            "the console proxy has no service token (--service-token-file)",
        ));
    };
    let token = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot read the service token: {e}")))?;
    let mut req = tonic::Request::new(msg);
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| tonic::Status::unavailable("the service token is not a valid header value"))?;
    req.metadata_mut().insert("authorization", value);
    hcp_telemetry::inject_request(&mut req);
    f(ConsoleBrokerServiceClient::new(console.core.clone()), req).await.map(tonic::Response::into_inner)
}

async fn redeem(
    console: &Console,
    protocol: &str,
    token: &str,
    client_address: &str,
    channel: bool,
) -> Result<RedeemedConsole, End> {
    let req = RedeemConsoleRequest {
        token: token.to_owned(),
        protocol: protocol.to_owned(),
        client_address: client_address.to_owned(),
        channel,
    };
    broker_call(console, req, |mut c, r| async move { c.redeem_console(r).await }).await.map_err(|s| {
        use tonic::Code;
        let code = match s.code() {
            Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument | Code::Aborted => {
                close::REFUSED
            }
            Code::PermissionDenied | Code::Unauthenticated => {
                tracing::error!(error = %s.message(), "core refused the console proxy's service token");
                return End::new(close::UNAVAILABLE, "the console proxy is misconfigured");
            }
            _ => close::UNAVAILABLE,
        };
        End::new(code, s.message().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_are_checked() {
        let none: Vec<String> = vec![];
        let listed = vec!["https://cloud.example.com".to_owned()];
        for (allowed, origin, host, ok) in [
            (&none, Some("http://127.0.0.1:8080"), "127.0.0.1:8080", true),
            (&none, Some("http://evil.example"), "127.0.0.1:8080", false),
            (&none, None, "127.0.0.1:8080", true),
            (&listed, Some("https://cloud.example.com"), "gw.internal:443", true),
            (&listed, Some("http://127.0.0.1:8080"), "127.0.0.1:8080", false),
        ] {
            assert_eq!(
                origin_allowed(allowed, &headers(origin, host)).is_ok(),
                ok,
                "{allowed:?} {origin:?} {host}"
            );
        }
    }
}
