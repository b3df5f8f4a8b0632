//! The Proxmox VE API client: HTTPS (rustls, a CA file or a pinned
//! SHA-256 fingerprint), API-token or ticket + CSRF authentication (tickets
//! renewed before their 2 h expiry, and once more on a 401), the
//! `{"data": ...}` envelope and PVE's error shapes, retries with backoff for
//! what PVE says is transient (config lock timeouts, 595/596 node-proxy
//! failures), and UPID tasks polled until they stop.
//!
//! It knows nothing of HCP: `lib.rs` maps HCP operations onto it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hcp_provider_sdk::kit::{Backoff, HttpsUrl, UrlError, split_https_url};
use http_body_util::Full;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::config::TimingConfig;

/// Characters kept as they are in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// PVE's `urlencoded` format (`sshkeys`): everything but
/// `-_.!~*'()` and alphanumerics is percent-encoded, spaces as `%20`.
const URLENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Encodes a value for a path segment (UPIDs, snapshot names).
pub fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Encodes text in PVE's `urlencoded` format.
pub fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URLENCODED).to_string()
}

pub use hcp_tls::{Trust, parse_fingerprint};

/// How the provider authenticates.
#[derive(Clone)]
pub enum Credentials {
    /// `Authorization: PVEAPIToken=ID=SECRET`.
    Token {
        /// `USER@REALM!TOKENID`.
        id: String,
        /// The secret.
        secret: String,
    },
    /// Tickets from `POST /access/ticket`.
    Password {
        /// `USER@REALM`.
        username: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { id, .. } => write!(f, "Token({id})"),
            Self::Password { username, .. } => write!(f, "Password({username})"),
        }
    }
}

/// A failure talking to PVE.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PveError {
    /// No credentials yet.
    #[error("no credentials configured")]
    NoCredentials,
    /// Connection, TLS or HTTP failure.
    #[error("cannot reach proxmox: {0}")]
    Transport(String),
    /// PVE refused the credentials (401).
    #[error("proxmox refused the credentials: {0}")]
    Auth(String),
    /// PVE answered an error status.
    #[error("proxmox answered {status}: {message}{}", fmt_errors(.errors))]
    Status {
        /// HTTP status.
        status: u16,
        /// The message (body `message`, else the reason phrase).
        message: String,
        /// Parameter errors.
        errors: BTreeMap<String, String>,
    },
    /// A task ended in error.
    #[error("proxmox task {kind} failed: {message}")]
    Task {
        /// Task type (`qmclone`, ...).
        kind: String,
        /// Its exit status.
        message: String,
    },
    /// An answer could not be understood.
    #[error("unexpected answer from proxmox: {0}")]
    Decode(String),
    /// A task or request ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
}

fn fmt_errors(errors: &BTreeMap<String, String>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" ({})", parts.join("; "))
}

impl PveError {
    /// The message PVE gave, whatever the shape.
    pub fn message(&self) -> &str {
        match self {
            Self::Status { message, .. } | Self::Task { message, .. } => message,
            Self::Auth(m) | Self::Transport(m) | Self::Decode(m) | Self::Timeout(m) => m,
            Self::NoCredentials => "no credentials configured",
        }
    }

    /// A config lock held by someone else.
    pub fn is_lock(&self) -> bool {
        let m = self.message();
        (m.contains("can't lock file") && m.contains("got timeout")) || m.contains("VM is locked")
    }

    /// Worth repeating the request after a pause.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Status { status, .. } => matches!(status, 502 | 503 | 595 | 596) || self.is_lock(),
            Self::Task { .. } => self.is_lock(),
            _ => false,
        }
    }

    /// The vmid is taken (a clone or create collided).
    pub fn already_exists(&self) -> bool {
        self.message().contains("already exists")
    }

    /// The VM or its config is gone.
    pub fn is_not_found(&self) -> bool {
        let m = self.message();
        matches!(self, Self::Status { status: 500, .. })
            && (m.contains("does not exist") || m.contains("no such VM"))
    }
}

struct Session {
    ticket: String,
    csrf: String,
    obtained: Instant,
}

/// The PVE API client; share it behind an `Arc`.
pub struct Pve {
    http: hcp_tls::Https,
    trust: Trust,
    credentials: std::sync::RwLock<Option<Credentials>>,
    session: tokio::sync::Mutex<Option<Session>>,
    timing: TimingConfig,
    /// Requests sent (tests read it to prove there was no retry storm).
    pub requests_sent: std::sync::atomic::AtomicU64,
}

/// The HTTP method of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

impl Method {
    fn as_http(self) -> http::Method {
        match self {
            Self::Get => http::Method::GET,
            Self::Post => http::Method::POST,
            Self::Put => http::Method::PUT,
            Self::Delete => http::Method::DELETE,
        }
    }
}

/// Why a [`Pve`] client cannot be built (the texts name the config fields).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `api_url` does not parse.
    #[error("api_url")]
    Url(#[source] UrlError),
    /// `tls.ca_file` holds no certificate.
    #[error("tls.ca_file holds no certificate")]
    NoCa,
    /// `tls.ca_file` holds something unreadable (hcp-tls's reason).
    #[error("tls.ca_file")]
    BadCa(#[source] hcp_tls::TrustError),
    /// rustls refused the trust settings.
    #[error(transparent)]
    Tls(hcp_tls::TrustError),
}

/// A websocket to the API's server ([`Pve::websocket`]).
pub type PveSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Request parameters, already in PVE's text form.
pub type Params = Vec<(&'static str, String)>;

impl Pve {
    /// A client for `api_url` (`https://HOST:PORT`).
    pub fn new(api_url: &str, trust: Trust, timing: TimingConfig) -> Result<Self, ClientError> {
        let HttpsUrl { host, port, .. } = split_https_url(api_url, 8006, "").map_err(ClientError::Url)?;
        // `timing` was validated with the configuration: at least 1 s.
        let timeout = Duration::from_secs(timing.request_timeout_seconds);
        let http = hcp_tls::Https::new(&host, port, &trust, timeout).map_err(|e| match e {
            hcp_tls::TrustError::NoCa => ClientError::NoCa,
            e @ (hcp_tls::TrustError::BadCa(_) | hcp_tls::TrustError::BadCaPem(_)) => ClientError::BadCa(e),
            e => ClientError::Tls(e),
        })?;
        Ok(Self {
            http,
            trust,
            credentials: std::sync::RwLock::new(None),
            session: tokio::sync::Mutex::new(None),
            timing,
            requests_sent: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// `host:port` of the API.
    pub fn endpoint(&self) -> (&str, u16) {
        (self.http.host(), self.http.port())
    }

    /// How the API's certificate is trusted (the console proxy trusts the
    /// same server the same way).
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The headers that authenticate a GET made on this client's behalf by
    /// someone else: the console proxy's `vncwebsocket` upgrade. The API
    /// token, or the session cookie (logging in or renewing first when
    /// needed); no CSRF token, which only writes need. Secrets: never log
    /// them.
    pub async fn delegated_auth_headers(&self) -> Result<Vec<(&'static str, String)>, PveError> {
        let mut headers = self.auth_headers(false).await?;
        headers.retain(|(name, _)| *name != "csrfpreventiontoken");
        Ok(headers)
    }

    /// Opens a websocket to `path_and_query` under `/api2/json` on the
    /// API's server, as this client (its credentials and its trust in the
    /// server's certificate), with PVE's `binary` subprotocol: the
    /// `vncwebsocket` of a `termproxy` session. Refusals are [`decode`]d
    /// like any answer.
    pub async fn websocket(&self, path_and_query: &str) -> Result<PveSocket, PveError> {
        use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
        let url = format!("wss://{}/api2/json{path_and_query}", self.http.authority());
        let mut request =
            url.into_client_request().map_err(|e| PveError::Transport(format!("websocket request: {e}")))?;
        let headers = request.headers_mut();
        for (name, value) in self.delegated_auth_headers().await? {
            let value = http::HeaderValue::from_str(&value)
                .map_err(|_| PveError::Decode("malformed credential".into()))?;
            headers.insert(name, value);
        }
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static("binary"));
        let (host, port) = self.endpoint();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| PveError::Transport(format!("tls server name {host}: {e}")))?;
        let timeout = Duration::from_secs(self.timing.request_timeout_seconds);
        let connect =
            async {
                let tcp = tokio::net::TcpStream::connect((host, port))
                    .await
                    .map_err(|e| PveError::Transport(format!("connect {host}:{port}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let tls =
                    self.http.connector().connect(name, tcp).await.map_err(|e| {
                        PveError::Transport(format!("tls with {}: {e}", self.http.authority()))
                    })?;
                self.requests_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match tokio_tungstenite::client_async_with_config(request, tls, None).await {
                    Ok((ws, _)) => Ok(ws),
                    Err(tungstenite::Error::Http(resp)) => {
                        let status = resp.status().as_u16();
                        let reason = resp.status().canonical_reason();
                        let body = resp.body().clone().unwrap_or_default();
                        Err(decode(status, reason, &body)
                            .err()
                            .unwrap_or(PveError::Decode(format!("websocket upgrade answered {status}"))))
                    }
                    Err(e) => Err(PveError::Transport(format!("websocket: {e}"))),
                }
            };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| PveError::Timeout("websocket upgrade".into()))?
    }

    /// Installs credentials (and drops any ticket).
    pub async fn set_credentials(&self, c: Credentials) {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
        *self.session.lock().await = None;
    }

    /// True once credentials are installed.
    pub fn has_credentials(&self) -> bool {
        self.credentials.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn creds(&self) -> Option<Credentials> {
        self.credentials.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Auth headers for one request; logs in or renews the ticket first
    /// when needed.
    async fn auth_headers(&self, force_login: bool) -> Result<Vec<(&'static str, String)>, PveError> {
        match self.creds().ok_or(PveError::NoCredentials)? {
            Credentials::Token { id, secret } => {
                Ok(vec![("authorization", format!("PVEAPIToken={id}={secret}"))])
            }
            Credentials::Password { username, password } => {
                let mut session = self.session.lock().await;
                let renew_after = Duration::from_secs(self.timing.ticket_renew_seconds);
                let stale = session.as_ref().is_none_or(|s| s.obtained.elapsed() >= renew_after);
                if force_login || stale {
                    // Renew with the ticket as password while it is valid;
                    // log in with the password otherwise.
                    let renewing = session.as_ref().filter(|_| !force_login).map(|s| s.ticket.clone());
                    let secret = renewing.clone().unwrap_or(password.clone());
                    let fresh = match self.login(&username, &secret).await {
                        Err(PveError::Auth(_)) if renewing.is_some() => {
                            self.login(&username, &password).await?
                        }
                        other => other?,
                    };
                    *session = Some(fresh);
                }
                let s = session.as_ref().ok_or(PveError::NoCredentials)?;
                Ok(vec![
                    ("cookie", format!("PVEAuthCookie={}", encode_segment(&s.ticket))),
                    ("csrfpreventiontoken", s.csrf.clone()),
                ])
            }
        }
    }

    async fn login(&self, username: &str, password: &str) -> Result<Session, PveError> {
        let params: Params = vec![("username", username.to_owned()), ("password", password.to_owned())];
        let data = self.once(Method::Post, "/access/ticket", &params, &[]).await?;
        let ticket =
            data["ticket"].as_str().ok_or_else(|| PveError::Decode("ticket without ticket".into()))?;
        let csrf = data["CSRFPreventionToken"]
            .as_str()
            .ok_or_else(|| PveError::Decode("ticket without CSRFPreventionToken".into()))?;
        tracing::info!(user = username, "proxmox ticket obtained");
        Ok(Session { ticket: ticket.to_owned(), csrf: csrf.to_owned(), obtained: Instant::now() })
    }

    /// One HTTP exchange, no retries.
    async fn once(
        &self,
        method: Method,
        path: &str,
        params: &Params,
        headers: &[(&'static str, String)],
    ) -> Result<Value, PveError> {
        let encoded = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let mut uri = format!("/api2/json{path}");
        let body = if matches!(method, Method::Get | Method::Delete) {
            if !encoded.is_empty() {
                uri = format!("{uri}?{encoded}");
            }
            Bytes::new()
        } else {
            Bytes::from(encoded)
        };
        let mut req = http::Request::builder()
            .method(method.as_http())
            .uri(&uri)
            .header("host", self.http.authority())
            .header("accept", "application/json");
        if !body.is_empty() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(body)).map_err(|e| PveError::Transport(e.to_string()))?;
        self.requests_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = self.http.send(req).await.map_err(|e| match e {
            hcp_tls::HttpError::Transport(m) => PveError::Transport(m),
            hcp_tls::HttpError::Timeout(_) => PveError::Timeout("http request".to_owned()),
        })?;
        decode(answer.status, answer.reason.as_deref(), &answer.body)
    }

    /// Calls the API: authenticates, retries what PVE says is transient
    /// with exponential backoff and jitter, re-logs in once on a 401 with
    /// tickets, and returns the envelope's `data`.
    pub async fn call(&self, method: Method, path: &str, params: Params) -> Result<Value, PveError> {
        let mut attempt = 0;
        let mut relogged = false;
        let mut force_login = false;
        loop {
            let headers = self.auth_headers(force_login).await?;
            force_login = false;
            match self.once(method, path, &params, &headers).await {
                Ok(v) => return Ok(v),
                Err(PveError::Auth(m)) => {
                    let tickets = matches!(self.creds(), Some(Credentials::Password { .. }));
                    if tickets && !relogged {
                        tracing::info!("proxmox ticket refused; logging in again");
                        relogged = true;
                        force_login = true;
                        continue;
                    }
                    return Err(PveError::Auth(m));
                }
                Err(e) if e.is_retryable() && attempt + 1 < self.timing.retry_attempts => {
                    tracing::warn!(error = %e, attempt, path, "retrying proxmox call");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn backoff(&self, attempt: u32) {
        Backoff::from_millis(self.timing.retry_base_ms).wait(attempt).await;
    }

    /// Calls an asynchronous method and waits for its task; a task that
    /// ends in a lock timeout is retried like a refused request.
    pub async fn task(&self, method: Method, path: &str, params: Params) -> Result<String, PveError> {
        self.task_within(method, path, params, Duration::ZERO).await
    }

    /// [`Pve::task`] for a task that may legitimately run for `runs_up_to`
    /// (a shutdown waiting for its guest): it is waited for that long plus
    /// the configured task timeout.
    pub async fn task_within(
        &self,
        method: Method,
        path: &str,
        params: Params,
        runs_up_to: Duration,
    ) -> Result<String, PveError> {
        let mut attempt = 0;
        loop {
            let data = self.call(method, path, params.clone()).await?;
            let Some(upid) = data.as_str() else {
                // Some async methods answer null when nothing had to run.
                return Ok("OK".to_owned());
            };
            match self.wait_for(upid, runs_up_to).await {
                Err(e) if e.is_retryable() && attempt + 1 < self.timing.retry_attempts => {
                    tracing::warn!(error = %e, attempt, path, "retrying proxmox task");
                    self.backoff(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Polls a task until it stops: `OK` and `WARNINGS: n` are success,
    /// any other exit status is the failure's message.
    pub async fn wait(&self, upid: &str) -> Result<String, PveError> {
        self.wait_for(upid, Duration::ZERO).await
    }

    /// [`Pve::wait`], allowing the task `extra` time beyond the configured
    /// task timeout.
    async fn wait_for(&self, upid: &str, extra: Duration) -> Result<String, PveError> {
        let node = upid
            .split(':')
            .nth(1)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| PveError::Decode(format!("malformed UPID {upid:?}")))?;
        let kind = upid.split(':').nth(5).unwrap_or("task").to_owned();
        let path = format!("/nodes/{}/tasks/{}/status", encode_segment(node), encode_segment(upid));
        let deadline = Instant::now() + Duration::from_secs(self.timing.task_timeout_seconds) + extra;
        loop {
            let st = self.call(Method::Get, &path, Vec::new()).await?;
            if st["status"].as_str() == Some("stopped") {
                let exit = st["exitstatus"].as_str().unwrap_or("unknown").to_owned();
                return if exit == "OK" || exit.starts_with("WARNINGS") {
                    if exit != "OK" {
                        tracing::warn!(upid, exit = %exit, "proxmox task finished with warnings");
                    }
                    Ok(exit)
                } else {
                    Err(PveError::Task { kind, message: exit })
                };
            }
            if Instant::now() >= deadline {
                return Err(PveError::Timeout(format!("task {upid} still running")));
            }
            tokio::time::sleep(self.timing.poll()).await;
        }
    }
}

/// The bytes of a file being uploaded, as they arrive; an `Err` aborts the
/// upload (the connection is dropped mid-body, so PVE keeps nothing).
pub type FileChunks = tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>;

impl Pve {
    /// Uploads a file with `POST {path}` (PVE's `.../storage/{storage}/upload`)
    /// as `multipart/form-data`: the text `fields`, then the file part
    /// `filename` (PVE's HTTP server turns its file name into the
    /// `filename` parameter), exactly `size` bytes taken from `file` as they
    /// come, never held whole. One attempt on a connection of its own: a
    /// streamed body cannot be replayed. The request timeout applies from
    /// the body's end to the answer (PVE answers once it has the file), not
    /// to the transfer. Answers the envelope's `data` (the task's UPID).
    pub async fn upload(
        &self,
        path: &str,
        fields: Params,
        filename: &str,
        size: u64,
        file: FileChunks,
    ) -> Result<Value, PveError> {
        use futures::StreamExt as _;
        use http_body_util::BodyExt as _;

        let boundary = format!("hcp-{:032x}", rand::random::<u128>());
        let mut head = String::new();
        for (k, v) in &fields {
            head.push_str(&format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            ));
        }
        let quoted = filename.replace(['"', '\r', '\n'], "_");
        head.push_str(&format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"filename\"; filename=\"{quoted}\"\r\n\
             content-type: application/octet-stream\r\n\r\n"
        ));
        let tail = format!("\r\n--{boundary}--\r\n");
        let length = head.len() as u64 + size + tail.len() as u64;
        // Told when the whole body is out, so the wait for the answer can
        // be timed apart from the transfer.
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
        let middle = futures::stream::unfold(file, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        let stream = futures::stream::once(async move { Ok(Bytes::from(head)) })
            .chain(middle)
            .chain(futures::stream::once(async move {
                let _ = sent_tx.send(());
                Ok(Bytes::from(tail))
            }))
            .map(|c: Result<Bytes, std::io::Error>| c.map(hyper::body::Frame::data));
        let body = http_body_util::StreamBody::new(stream).boxed_unsync();

        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("/api2/json{path}"))
            .header("host", self.http.authority())
            .header("accept", "application/json")
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .header("content-length", length.to_string());
        for (k, v) in self.auth_headers(false).await? {
            req = req.header(k, v);
        }
        let req = req.body(body).map_err(|e| PveError::Transport(e.to_string()))?;

        let (host, port) = self.endpoint();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| PveError::Transport(format!("tls server name {host}: {e}")))?;
        let timeout = Duration::from_secs(self.timing.request_timeout_seconds);
        let connect =
            async {
                let tcp = tokio::net::TcpStream::connect((host, port))
                    .await
                    .map_err(|e| PveError::Transport(format!("connect {host}:{port}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let tls =
                    self.http.connector().connect(name, tcp).await.map_err(|e| {
                        PveError::Transport(format!("tls with {}: {e}", self.http.authority()))
                    })?;
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| PveError::Transport(format!("http: {e}")))
            };
        let (mut sender, conn) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| PveError::Timeout("connect".into()))??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.requests_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let exchange = async {
            let resp =
                sender.send_request(req).await.map_err(|e| PveError::Transport(format!("upload: {e}")))?;
            let status = resp.status().as_u16();
            let reason = resp
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| PveError::Transport(format!("upload answer: {e}")))?
                .to_bytes();
            decode(status, reason.as_deref(), &body)
        };
        let answer_late = async {
            // The body ended (or its feeder went away): from now on the
            // answer is due within the request timeout.
            let _ = sent_rx.await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            answer = exchange => answer,
            () = answer_late => Err(PveError::Timeout("upload answer".into())),
        }
    }
}

/// Decodes PVE's envelope or error.
fn decode(status: u16, reason: Option<&str>, body: &[u8]) -> Result<Value, PveError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if status == 401 {
        return Err(PveError::Auth(reason.unwrap_or("authentication failure").to_owned()));
    }
    if (200..300).contains(&status) {
        return match parsed {
            Some(v) => Ok(v.get("data").cloned().unwrap_or(Value::Null)),
            None => Err(PveError::Decode(format!("status {status} without a JSON body"))),
        };
    }
    // The body's `message` exists only on newer PVE; the reason phrase
    // carries it on every version.
    let message = parsed
        .as_ref()
        .and_then(|v| v["message"].as_str())
        .map(|m| m.trim_end().to_owned())
        .or_else(|| reason.map(str::to_owned))
        .unwrap_or_else(|| format!("http status {status}"));
    let errors = parsed
        .as_ref()
        .and_then(|v| v["errors"].as_object())
        .map(|m| {
            m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().trim_end().to_owned())).collect()
        })
        .unwrap_or_default();
    Err(PveError::Status { status, message, errors })
}

/// Lenient readers for numbers and flags PVE sends as JSON numbers or as
/// strings, depending on version and path.
pub mod lenient {
    use serde_json::Value;

    /// An unsigned integer from a number or a numeric string.
    pub fn u64(v: &Value) -> Option<u64> {
        match v {
            Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A 0/1 flag from a number, a string or a boolean.
    pub fn flag(v: &Value) -> bool {
        match v {
            Value::Bool(b) => *b,
            other => u64(other).is_some_and(|n| n != 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_read_from_strings_too() {
        for (v, want) in [
            (json!(5), Some(5)),
            (json!("5"), Some(5)),
            (json!(" 7 "), Some(7)),
            (json!("x"), None),
            (json!(2.0), Some(2)),
        ] {
            assert_eq!(lenient::u64(&v), want, "{v}");
        }
        assert!(lenient::flag(&json!("1")) && lenient::flag(&json!(true)) && !lenient::flag(&json!(0)));
    }

    #[test]
    fn errors_are_decoded_from_body_or_reason() {
        let e = decode(500, Some("VM 1 is locked"), b"{\"data\":null}").unwrap_err();
        assert_eq!(e.message(), "VM 1 is locked");
        let e = decode(400, Some("Parameter verification failed."), br#"{"data":null,"message":"Parameter verification failed.\n","errors":{"x":"property is not defined"}}"#).unwrap_err();
        assert!(
            matches!(&e, PveError::Status { status: 400, errors, .. } if errors["x"] == "property is not defined")
        );
        assert!(matches!(decode(401, None, b""), Err(PveError::Auth(_))));
        assert_eq!(decode(200, None, br#"{"data":"UPID:x"}"#).unwrap(), json!("UPID:x"));
    }

    #[test]
    fn transient_failures_are_recognised() {
        let status = |status, message: &str| PveError::Status {
            status,
            message: message.into(),
            errors: Default::default(),
        };
        assert!(
            status(500, "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout").is_retryable()
        );
        assert!(status(595, "Connection timed out").is_retryable());
        assert!(!status(500, "VM 100 is running - destroy failed").is_retryable());
        assert!(!PveError::Auth("x".into()).is_retryable());
        assert!(
            status(500, "Configuration file 'nodes/pve/qemu-server/999.conf' does not exist").is_not_found()
        );
        assert!(
            status(500, "unable to create VM 108 - VM 108 already exists on node 'pve'").already_exists()
        );
    }

    #[test]
    fn sshkeys_are_urlencoded_the_pve_way() {
        assert_eq!(urlencode("ssh-ed25519 AAAA+/= me@x\n"), "ssh-ed25519%20AAAA%2B%2F%3D%20me%40x%0A");
        assert_eq!(
            encode_segment("UPID:pve:1:a:b:qmstart:100:root@pam:"),
            "UPID%3Apve%3A1%3Aa%3Ab%3Aqmstart%3A100%3Aroot%40pam%3A"
        );
        assert_eq!(parse_fingerprint(&["0a"; 32].join(":")), Some([10u8; 32]));
        assert_eq!(parse_fingerprint("0a:0b"), None);
    }
}
