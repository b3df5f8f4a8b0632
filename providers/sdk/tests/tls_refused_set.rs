//! A rotation that goes wrong half way keeps the old certificate serving,
//! as the server's own logs show. In a process of its own: the test reads
//! what the server logs through a global subscriber, which no other test
//! shares.

mod common;

use std::sync::{Arc, Mutex};

use common::*;

/// Events the server logged while the test ran, as text.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A rotation that goes wrong half way (the certificate file cut short,
/// then a whole certificate whose key is not there yet) keeps the old
/// certificate serving; once the set is whole, the new one is served and
/// its fingerprint logged. The server's warnings say when the watcher
/// refused a set, so nothing waits on the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_set_keeps_the_old_certificate_serving() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this process");
    let dir = TempDir::new();
    let ca = Ca::new("ca");
    let trust = ca.pem();
    let files = Files::new(&dir);
    let (old, new) = (ca.server(), ca.server());
    files.install(&old);
    let server = Server::tls(files.tls(false)).await;
    assert!(logs.text().contains(&old.fingerprint()), "the first certificate is logged: {}", logs.text());
    let serving = |want: &Leaf| {
        let (addr, trust, want) = (server.addr.clone(), trust.clone(), want.der.clone());
        async move { peer_certificate(&addr, &trust).await.unwrap() == want }
    };

    std::fs::write(&files.cert, &new.cert_pem[..new.cert_pem.len() / 2]).unwrap();
    wait_until("the cut certificate to be refused", || async {
        logs.text().contains("the certificate is not usable PEM")
    })
    .await;
    assert!(serving(&old).await, "the old certificate serves on");
    call_fresh(&server.url(), &trust, None).await.unwrap();

    std::fs::write(&files.cert, &new.cert_pem).unwrap();
    wait_until("the certificate without its key to be refused", || async {
        logs.text().contains("the certificate and private key cannot be served together")
    })
    .await;
    assert!(serving(&old).await, "the old certificate serves on");

    std::fs::write(&files.key, &new.key_pem).unwrap();
    wait_until("the new certificate", || serving(&new)).await;
    call_fresh(&server.url(), &trust, None).await.unwrap();
    let text = logs.text();
    let reloaded = text.lines().find(|l| l.contains("serving a new TLS certificate"));
    let reloaded = reloaded.unwrap_or_else(|| panic!("no reload logged: {text}"));
    assert!(reloaded.contains(&new.fingerprint()) && reloaded.contains("not_after="), "{reloaded}");
    assert!(!text.contains("ERROR"), "a refused set is a warning, the server carries on: {text}");
}
