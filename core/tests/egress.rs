//! The egress client's bounds against real receivers (issue 30): an HTTPS
//! server the test starts on 127.0.0.1, a range the policy explicitly
//! allows (plain http stays refused), with a certificate from the test's
//! own CA given as the policy's CA file.
//!
//! A redirect is a failed attempt naming its status and its target sees
//! no connection; a receiver that stalls (in the TLS handshake, before
//! answering, or in the middle of its body) fails the request within the
//! connect or total bound; a body past the size bound is cut, the status
//! kept, and the connection dropped instead of read to its end.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hcp_core::egress::{CheckedUrl, EgressClient, EgressError, EgressPolicy, EgressSettings, SystemResolver};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CONNECT: Duration = Duration::from_millis(500);
const TOTAL: Duration = Duration::from_secs(1);
const MAX_BODY: usize = 1024;
/// How long past its bound a request may end: this shows that it ends
/// (it does not hang), not how promptly, which a loaded machine's scheduler
/// decides (speed is hcp-bench's business, not a test's).
const SLACK: Duration = Duration::from_secs(5);

/// What a receiver does with each connection.
#[derive(Debug, Clone)]
enum Behaviour {
    /// Reads the request and answers this status, with a Location header.
    Answer(u16, String),
    /// Accepts the TCP connection and never starts TLS.
    NoHandshake,
    /// Reads the request and never answers.
    Silent,
    /// Answers 200 and sends a byte of body every 100 ms, forever.
    Trickle,
    /// Answers 200 and writes 100-byte chunks as fast as the client takes
    /// them, forever (chunked), or a body announced at 10 MB.
    Flood { chunked: bool },
}

/// A receiver on 127.0.0.1: counts connections and complete requests;
/// `hung_up` is set once a flood's write fails (the client went away).
#[derive(Clone)]
struct Receiver {
    port: u16,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    hung_up: Arc<AtomicBool>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl Receiver {
    async fn start(tls: tokio_rustls::TlsAcceptor, behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let hung_up = Arc::new(AtomicBool::new(false));
        let (c, r, h) = (connections.clone(), requests.clone(), hung_up.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (tls, behaviour, r, h) = (tls.clone(), behaviour.clone(), r.clone(), h.clone());
                conns.spawn(async move {
                    if let Behaviour::NoHandshake = behaviour {
                        drain(tcp).await;
                    } else if let Ok(stream) = tls.accept(tcp).await {
                        serve(stream, &behaviour, &r, &h).await;
                    }
                });
            }
        });
        Self { port, connections, requests, hung_up, task: Arc::new(task) }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// Reads until the peer closes.
async fn drain<S: AsyncRead + Unpin>(mut s: S) {
    let mut chunk = [0u8; 4096];
    while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
}

/// Reads one request (head and Content-Length body), then behaves.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    behaviour: &Behaviour,
    requests: &AtomicU64,
    hung_up: &AtomicBool,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = s.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    match behaviour {
        Behaviour::Answer(status, location) => {
            let answer = format!(
                "HTTP/1.1 {status} Moved\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.shutdown().await;
        }
        Behaviour::NoHandshake | Behaviour::Silent => drain(s).await,
        Behaviour::Trickle => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n").await;
            loop {
                if s.write_all(b"x").await.is_err() || s.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Behaviour::Flood { chunked } => {
            let head: &[u8] = if *chunked {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n"
            };
            let piece = if *chunked { format!("64\r\n{}\r\n", "x".repeat(100)) } else { "x".repeat(100) };
            let mut ok = s.write_all(head).await.is_ok();
            while ok {
                ok = s.write_all(piece.as_bytes()).await.is_ok() && s.flush().await.is_ok();
            }
            hung_up.store(true, Ordering::SeqCst);
        }
    }
}

/// A client whose policy allows loopback explicitly, trusts the test CA,
/// and has short bounds.
fn client(ca_file: &Path) -> EgressClient {
    let policy = EgressPolicy::new(&EgressSettings {
        allow_http: false,
        allow_networks: vec!["127.0.0.0/8".into()],
        ca_file: Some(ca_file.to_owned()),
        connect_timeout: CONNECT,
        total_timeout: TOTAL,
        max_response_bytes: MAX_BODY,
    })
    .unwrap();
    EgressClient::new(policy, Arc::new(SystemResolver))
}

async fn post(c: &EgressClient, url: &str) -> (Result<hcp_core::egress::Answer, EgressError>, Duration) {
    let url: CheckedUrl = c.check_resolves(url).await.unwrap();
    let started = Instant::now();
    let got = c.post(&url, &[("HCP-Event-Id", "e1".to_owned())], Bytes::from_static(b"{}")).await;
    (got, started.elapsed())
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_and_its_target_sees_nothing() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, tls) = hcp_testkit::tls::loopback_server(dir.path(), "egress test CA").unwrap();
    let c = client(&ca_file);
    // The target would accept anything.
    let target = Receiver::start(tls.clone(), Behaviour::Answer(200, String::new())).await;
    for status in [301, 302, 303, 307, 308] {
        for location in [target.url("/caught"), "/elsewhere".to_owned()] {
            let from = Receiver::start(tls.clone(), Behaviour::Answer(status, location.clone())).await;
            let (got, _) = post(&c, &from.url("/hook")).await;
            match got {
                Err(e @ EgressError::Redirect(code)) => {
                    assert_eq!(code, status, "{location}");
                    assert!(e.to_string().contains("not followed"), "{e}");
                }
                other => panic!("{status} to {location}: expected a failed attempt, got {other:?}"),
            }
            assert_eq!(
                (from.connections.load(Ordering::SeqCst), from.requests.load(Ordering::SeqCst)),
                (1, 1),
                "one request, to the URL given, for {status} to {location}"
            );
        }
    }
    assert_eq!(target.connections.load(Ordering::SeqCst), 0, "the redirect target saw no connection");
}

/// Each row: how the receiver stalls, the bound that ends the request,
/// and that bound's value in the error.
#[tokio::test]
async fn a_stalled_receiver_fails_the_request_within_its_bound() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, tls) = hcp_testkit::tls::loopback_server(dir.path(), "egress test CA").unwrap();
    let c = client(&ca_file);
    let rows = [
        (Behaviour::NoHandshake, CONNECT, "the TLS handshake is bounded by the connect time"),
        (Behaviour::Silent, TOTAL, "no answer: the total time"),
        (Behaviour::Trickle, TOTAL, "a body that never ends: the total time"),
    ];
    for (behaviour, bound, what) in rows {
        let r = Receiver::start(tls.clone(), behaviour.clone()).await;
        let (got, took) = post(&c, &r.url("/hook")).await;
        match got {
            Err(EgressError::Timeout(d)) => assert_eq!(d, bound, "{what}"),
            other => panic!("{behaviour:?}: expected a time-out, got {other:?}"),
        }
        assert!(
            took >= bound && took < bound + SLACK,
            "{what}: failed after {took:?}, the bound is {bound:?}"
        );
    }
}

#[tokio::test]
async fn a_body_past_the_size_bound_is_cut_and_the_connection_dropped() {
    let dir = hcp_testkit::TempDir::new().unwrap();
    let (ca_file, tls) = hcp_testkit::tls::loopback_server(dir.path(), "egress test CA").unwrap();
    let c = client(&ca_file);
    for chunked in [true, false] {
        let r = Receiver::start(tls.clone(), Behaviour::Flood { chunked }).await;
        let (got, took) = post(&c, &r.url("/hook")).await;
        let answer = got.unwrap_or_else(|e| panic!("chunked {chunked}: the status counts, got {e:?}"));
        assert_eq!(answer.status, 200);
        assert!(
            answer.body.len() <= MAX_BODY && answer.body.iter().all(|b| *b == b'x'),
            "chunked {chunked}: at most {MAX_BODY} bytes of the body, got {}",
            answer.body.len()
        );
        // 100-byte chunks: the ones within the bound are kept.
        assert!(!chunked || !answer.body.is_empty(), "the body is cut, not dropped");
        assert!(took < TOTAL, "chunked {chunked}: cut at the bound, not at the time-out ({took:?})");
        hcp_testkit::wait_until(Duration::from_secs(5), "the receiver to see the client hang up", || async {
            Ok(r.hung_up.load(Ordering::SeqCst).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("chunked {chunked}: {e:#}"));
    }
}
