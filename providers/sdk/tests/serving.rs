//! How a provider is served when operators secure it: TLS certificates
//! rotated on disk while calls keep coming (a new key from the same CA,
//! then a certificate from a new CA), mutual TLS and its client CA
//! reloaded, handshakes that do not hold one another up, TLS from PEM in
//! memory, the checks that refuse a set at start, and the unix socket's
//! mode. Servers run in-process on ephemeral ports; the certificates are
//! made at run time with rcgen in a directory removed at the end, whether
//! the test passes or not. (The rotation that goes wrong half way reads the
//! server's logs, so it has a process of its own: `tls_refused_set.rs`.)

mod common;

use std::error::Error;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hcp_provider_sdk::kit::ConfigError;
use hcp_provider_sdk::kit::config::{from_toml, serve_config};
use hcp_provider_sdk::{ServeConfig, ServeError, ServerTls, SocketMode, TlsError, TlsFiles, TlsPart, TlsPem};

/// Calls made and failures seen by the traffic loops.
#[derive(Default)]
struct Traffic {
    stop: AtomicBool,
    fresh: AtomicUsize,
    kept: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Traffic {
    fn failed(&self, what: &str, e: &BoxError) {
        let mut chain = format!("{what}: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        self.failures.lock().unwrap().push(chain);
    }

    fn counts(&self) -> (usize, usize) {
        (self.fresh.load(Ordering::SeqCst), self.kept.load(Ordering::SeqCst))
    }

    /// Fails the test with the failures seen, if any.
    fn assert_none_failed(&self) {
        let failures = self.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} calls failed: {:#?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
    }

    /// Waits until both loops made `more` successful calls after `from`;
    /// a failed call ends the wait (and the test) at once.
    async fn advance(&self, from: (usize, usize), more: usize) {
        wait_until("calls on both kinds of connection", || async {
            self.assert_none_failed();
            let (fresh, kept) = self.counts();
            fresh >= from.0 + more && kept >= from.1 + more
        })
        .await;
    }
}

/// The certificate is replaced twice while two clients call without
/// pause: one on a new connection for every call, one on a connection
/// made before the first rotation. No call fails, and new connections see
/// each new certificate once the watcher has read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failed_call() {
    let dir = TempDir::new();
    let (first_ca, second_ca) = (Ca::new("first ca"), Ca::new("second ca"));
    // Clients trust both CAs from the start, as they must before a server
    // moves to a certificate of the new one.
    let trust = format!("{}{}", first_ca.pem(), second_ca.pem());
    let files = Files::new(&dir);
    let original = first_ca.server();
    files.install(&original);
    let server = Server::tls(files.tls(false)).await;
    assert_eq!(peer_certificate(&server.addr, &trust).await.unwrap(), original.der);

    let traffic = Arc::new(Traffic::default());
    let kept = connect(&server.url(), &trust, None).await.unwrap();
    let fresh_loop = tokio::spawn({
        let (traffic, url, trust) = (traffic.clone(), server.url(), trust.clone());
        async move {
            while !traffic.stop.load(Ordering::SeqCst) {
                match call_fresh(&url, &trust, None).await {
                    Ok(()) => traffic.fresh.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        traffic.failed("new connection", &e);
                        0
                    }
                };
                // The load generator's pace: a steady stream of
                // handshakes without taking the shared machine's cores.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let kept_loop = tokio::spawn({
        let traffic = traffic.clone();
        async move {
            while !traffic.stop.load(Ordering::SeqCst) {
                match call(kept.clone()).await {
                    Ok(()) => traffic.kept.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        traffic.failed("kept connection", &e);
                        0
                    }
                };
                // The load generator's pace.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    traffic.advance((0, 0), 5).await;

    // A new key from the same CA, then a certificate from the new CA.
    for (step, leaf) in [("new key", first_ca.server()), ("new ca", second_ca.server())] {
        files.install(&leaf);
        wait_until(step, || async {
            match peer_certificate(&server.addr, &trust).await {
                Ok(der) => der == leaf.der,
                Err(e) => {
                    traffic.failed(step, &e);
                    false
                }
            }
        })
        .await;
        // The traffic carries on past the rotation on both connections.
        traffic.advance(traffic.counts(), 5).await;
    }

    traffic.stop.store(true, Ordering::SeqCst);
    fresh_loop.await.unwrap();
    kept_loop.await.unwrap();
    traffic.assert_none_failed();
}

/// Connections that never start their handshake do not hold up anyone
/// else's: a call on a new connection succeeds while they are still open
/// (were handshakes done one at a time, the call would have waited for
/// theirs to time out and be closed).
#[tokio::test]
async fn a_silent_client_does_not_hold_up_the_next() {
    let dir = TempDir::new();
    let ca = Ca::new("ca");
    let files = Files::new(&dir);
    files.install(&ca.server());
    let server = Server::tls(files.tls(false)).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    call_fresh(&server.url(), &ca.pem(), None).await.unwrap();
    for stream in &silent {
        let mut buf = [0u8; 1];
        match stream.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the silent connection was answered or closed: {other:?}"),
        }
    }
}

/// With a client CA the server refuses a client without a certificate and
/// one whose certificate another CA signed, and serves one the CA signed;
/// when the client CA file changes, the new CA's clients get in and the
/// old one's are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_strangers_and_reloads_its_client_ca() {
    let dir = TempDir::new();
    let (server_ca, clients_ca, other_ca) =
        (Ca::new("server ca"), Ca::new("clients ca"), Ca::new("other ca"));
    let files = Files::new(&dir);
    files.install(&server_ca.server());
    std::fs::write(&files.client_ca, clients_ca.pem()).unwrap();
    let server = Server::tls(files.tls(true)).await;
    let (url, trust) = (server.url(), server_ca.pem());
    let (member, stranger) = (clients_ca.leaf(&["hcp-core"]), other_ca.leaf(&["hcp-core"]));

    assert!(call_fresh(&url, &trust, None).await.is_err(), "a client without a certificate is refused");
    assert!(call_fresh(&url, &trust, Some(&stranger)).await.is_err(), "another CA's client is refused");
    call_fresh(&url, &trust, Some(&member)).await.unwrap();

    std::fs::write(&files.client_ca, other_ca.pem()).unwrap();
    wait_until("the new client CA", || async { call_fresh(&url, &trust, Some(&stranger)).await.is_ok() })
        .await;
    assert!(call_fresh(&url, &trust, Some(&member)).await.is_err(), "the old CA's client is refused now");
    assert!(call_fresh(&url, &trust, None).await.is_err(), "a client without a certificate still is");
}

/// PEM given in memory is served as it is; a set that cannot be served,
/// or files with no reload interval, stop the server before it announces
/// itself; and the kit names the `[server]` field of the file at fault.
#[tokio::test]
async fn tls_from_memory_serves_and_unusable_sets_refuse_to_start() {
    let ca = Ca::new("ca");
    let leaf = ca.server();
    let pem = TlsPem {
        cert_pem: leaf.cert_pem.clone().into_bytes(),
        key_pem: leaf.key_pem.clone().into_bytes(),
        client_ca_pem: None,
    };
    let server = Server::tls(ServerTls::Pem(pem.clone())).await;
    assert_eq!(peer_certificate(&server.addr, &ca.pem()).await.unwrap(), leaf.der);
    call_fresh(&server.url(), &ca.pem(), None).await.unwrap();

    let refused = |tls: ServerTls| async move {
        let config =
            ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), tls: Some(tls), ..Default::default() };
        match Server::start(config).await {
            Ok(_) => panic!("served"),
            Err(ServeError::Tls(e)) => e,
            Err(e) => panic!("{e:?}"),
        }
    };
    let other = ca.server();
    let mismatched = TlsPem { key_pem: other.key_pem.clone().into_bytes(), ..pem.clone() };
    assert!(matches!(refused(mismatched.into()).await, TlsError::Identity(_)));
    let dir = TempDir::new();
    let files = Files::new(&dir);
    files.install(&leaf);
    let zero = TlsFiles { reload_every: Duration::ZERO, ..files.files(false) };
    assert!(matches!(refused(zero.into()).await, TlsError::ZeroReload));
    let missing = TlsFiles { cert: dir.join("absent.pem"), ..files.files(false) };
    let e = refused(missing.into()).await;
    assert_eq!(e.part(), Some(TlsPart::Certificate), "{e:?}");

    // The kit refuses the same before the provider starts, naming the field.
    std::fs::write(&files.key, &other.key_pem).unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        files.cert, files.key
    );
    let config: KitConfig = from_toml(&toml).unwrap();
    match serve_config(&config) {
        Err(e @ ConfigError::Tls { .. }) => {
            assert_eq!(e.field_name(), Some("server.tls_key_file"));
            assert!(e.source().is_some_and(|s| s.to_string().contains("cannot be served together")), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
}

/// The socket's permission bits are the configured ones (`0600` unless
/// told otherwise), whatever the umask made of them, by the time the
/// server announces itself; TLS is refused on a unix socket.
#[tokio::test]
async fn the_unix_socket_gets_its_mode() {
    let dir = TempDir::new();
    for (name, mode, want) in [("default.sock", None, 0o600), ("group.sock", Some("0660"), 0o660)] {
        let path = dir.join(name);
        let config: KitConfig = from_toml(&format!(
            "listen = \"127.0.0.1:0\"\n[server]\nunix_socket = {path:?}\n{}",
            mode.map(|m| format!("unix_socket_mode = {m:?}\n")).unwrap_or_default()
        ))
        .unwrap();
        let server = Server::start(serve_config(&config).unwrap()).await.unwrap();
        assert_eq!(server.addr, path.display().to_string());
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket(), "{name}");
        assert_eq!(meta.permissions().mode() & 0o7777, want, "{name}: {:o}", meta.permissions().mode());
        tokio::net::UnixStream::connect(&path).await.unwrap();
    }

    let both = ServeConfig {
        unix_socket: Some(dir.join("tls.sock")),
        tls: Some(ServerTls::Pem(TlsPem { cert_pem: Vec::new(), key_pem: Vec::new(), client_ca_pem: None })),
        ..Default::default()
    };
    assert!(matches!(Server::start(both).await, Err(ServeError::TlsOnUnixSocket)));

    // Set in code, the mode is applied as well.
    let path = dir.join("code.sock");
    let config = ServeConfig {
        unix_socket: Some(path.clone()),
        unix_socket_mode: SocketMode::new(0o640).unwrap(),
        ..Default::default()
    };
    let _server = Server::start(config).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o640);
}
