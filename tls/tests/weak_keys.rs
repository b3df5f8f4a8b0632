//! A server whose certificate (or whose CA's) has an RSA key rustls does
//! not take, as old vCenters, ESXi hosts and Proxmox nodes have: the error
//! names the certificate, its key size and the server's address instead of
//! rustls' bare `BadSignature`. The certificates are made at run time with
//! the `openssl` command; the RSA-1024 server is `openssl s_server`
//! (ring, under rustls, cannot sign with a key that small), the server with
//! a CA's weak key is rustls itself.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hcp_tls::{HttpError, Https, Trust};
use http_body_util::Full;

/// A directory of the test's own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hcp-tls-weak-keys-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when the `openssl` command runs; otherwise says why the test is
/// skipped (and fails under CI, which must run it).
fn openssl_or_skip(what: &str) -> bool {
    if Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{what}: the openssl command is missing under CI");
    eprintln!("SKIP {what}: the openssl command is missing");
    false
}

/// Runs `openssl` in `dir` with `args`, split at spaces; panics with its
/// output when it fails.
fn openssl(dir: &Dir, args: &str) {
    let out = Command::new("openssl").args(args.split(' ')).current_dir(&dir.0).output().unwrap();
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A self-signed CA certificate with a new RSA key of `bits`:
/// `{name}.pem` and `{name}.key`.
fn ca(dir: &Dir, name: &str, bits: u32, subject: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 -newkey rsa:{bits} -nodes -keyout {name}.key -out {name}.pem -days 2 -subj {subject}"
        ),
    );
}

/// A certificate for 127.0.0.1 (not a CA) with a new key (`newkey` as
/// `openssl req -newkey` takes it), signed by the CA `{ca}`: `{name}.pem`
/// and `{name}.key`.
fn signed_by(dir: &Dir, name: &str, newkey: &str, subject: &str, ca: &str) {
    openssl(
        dir,
        &format!("req -new -newkey {newkey} -nodes -keyout {name}.key -out {name}.csr -subj {subject}"),
    );
    std::fs::write(
        dir.file(&format!("{name}.ext")),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 2 \
             -sha256 -extfile {name}.ext"
        ),
    );
}

/// `openssl s_server` serving `cert`/`key` (security level 0, so that
/// OpenSSL itself takes an RSA-1024 key), killed when dropped.
struct SServer {
    child: Child,
    port: u16,
}

impl SServer {
    fn start(dir: &Dir, cert: &Path, key: &Path) -> Self {
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-www", "-cipher", "DEFAULT:@SECLEVEL=0", "-cert"])
            .arg(cert)
            .arg("-key")
            .arg(key)
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.file("s_server.log")).unwrap())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // `ACCEPT 127.0.0.1:PORT` once it listens; EOF if it failed.
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("ACCEPT ").and_then(|a| a.rsplit_once(':')?.1.parse().ok()));
        // The rest is read until it exits, so that it never writes to a
        // closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let mut server = Self { child, port: 0 };
        match port {
            Some(p) => server.port = p,
            None => panic!(
                "openssl s_server did not start: {}",
                std::fs::read_to_string(dir.file("s_server.log")).unwrap_or_default()
            ),
        }
        server
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn fingerprint_of_pem(path: &Path) -> [u8; 32] {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path).unwrap();
    hcp_tls::fingerprint_of(der.as_ref())
}

/// One GET to `127.0.0.1:port`; the status, or the transport error's text.
async fn get(port: u16, trust: &Trust) -> Result<u16, String> {
    let https = Https::new("127.0.0.1", port, trust, Duration::from_secs(10)).unwrap();
    let req =
        http::Request::get("/").header("host", https.authority()).body(Full::new(Bytes::new())).unwrap();
    match https.send(req).await {
        Ok(answer) => Ok(answer.status),
        Err(HttpError::Transport(text)) => Err(text),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_server_certificate_with_an_rsa_1024_key_is_named_with_its_size_and_address() {
    if !openssl_or_skip("weak server key test") {
        return;
    }
    let dir = Dir::new();
    // A lab CA with a good key signed the server's certificate, whose own
    // key is RSA-1024; another server has a 2048-bit key.
    ca(&dir, "ca", 2048, "/CN=Lab-Root-CA");
    signed_by(&dir, "weak", "rsa:1024", "/CN=old-vcenter.example/O=Lab", "ca");
    signed_by(&dir, "strong", "rsa:2048", "/CN=new-vcenter.example", "ca");

    // The harness works: the same server with a 2048-bit key is reached,
    // and a wrong pin is still refused as a wrong pin.
    let strong = SServer::start(&dir, &dir.file("strong.pem"), &dir.file("strong.key"));
    let pinned = Trust::Fingerprint(fingerprint_of_pem(&dir.file("strong.pem")));
    assert_eq!(get(strong.port, &pinned).await, Ok(200));
    let wrong = get(strong.port, &Trust::Fingerprint([7; 32])).await.unwrap_err();
    assert!(wrong.contains("does not match the pinned one"), "{wrong}");

    // The RSA-1024 server, trusted by its fingerprint (which matches) or
    // through its CA: both say what is wrong with which certificate where.
    let weak = SServer::start(&dir, &dir.file("weak.pem"), &dir.file("weak.key"));
    let trusts = [
        ("pinned", Trust::Fingerprint(fingerprint_of_pem(&dir.file("weak.pem")))),
        ("ca", Trust::Ca(pem(&dir.file("ca.pem")))),
    ];
    for (how, trust) in trusts {
        let e = get(weak.port, &trust).await.unwrap_err();
        let want = format!(
            "tls with 127.0.0.1:{}: the server's certificate \
             (O=Lab,CN=old-vcenter.example) has a 1024-bit RSA key, too small: only RSA keys of 2048 \
             to 8192 bits are accepted; replace the certificate with one whose key is larger",
            weak.port
        );
        assert_eq!(e, want, "trusted {how}");
    }
}

/// A rustls server for 127.0.0.1 with `cert`/`key`, answering every
/// request 200; stopped when the returned handle is dropped.
async fn rustls_server(cert: &Path, key: &Path) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ =
                    tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, task)
}

struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn a_trusted_ca_with_an_rsa_1024_key_is_named_when_it_signed_the_server_certificate() {
    if !openssl_or_skip("weak CA key test") {
        return;
    }
    let dir = Dir::new();
    // An old CA with an RSA-1024 key signs a server certificate with a
    // P-256 key; rustls serves it.
    ca(&dir, "ca", 1024, "/CN=Old-Lab-CA");
    signed_by(&dir, "leaf", "ec -pkeyopt ec_paramgen_curve:P-256", "/CN=esx1.example", "ca");
    let (port, task) = rustls_server(&dir.file("leaf.pem"), &dir.file("leaf.key")).await;
    let _server = Abort(task);

    let e = get(port, &Trust::Ca(pem(&dir.file("ca.pem")))).await.unwrap_err();
    let want = format!(
        "tls with 127.0.0.1:{port}: the trusted CA certificate (CN=Old-Lab-CA) has a \
         1024-bit RSA key, too small: only RSA keys of 2048 to 8192 bits are accepted; replace the certificate \
         with one whose key is larger"
    );
    assert_eq!(e, want);
    // Pinned, the server's own certificate is all that counts: it works.
    let pinned = Trust::Fingerprint(fingerprint_of_pem(&dir.file("leaf.pem")));
    assert_eq!(get(port, &pinned).await, Ok(200));
}
