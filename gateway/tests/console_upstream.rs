//! The console proxy's websocket upstream against a console server of the
//! test's own (TLS with a self-signed certificate, a websocket that wants
//! a header and the `binary` subprotocol, RFB with VNC authentication):
//! trust by pinned fingerprint works and the headers arrive; a wrong
//! fingerprint, or TLS with nothing to trust, is refused with a reason that
//! names nothing of the upstream.

use std::sync::{Arc, Mutex};

use hcp_gateway::console::rfb;
use hcp_gateway::console::upstream::{self, UpstreamError, WsIo};
use hcp_proto::provider::{ConsoleEndpoint, ConsoleHeader, ConsoleTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const PASSWORD: &str = "vnc-pw12";
const TICKET: &str = "PVEVNC:0000::s3cr3t-ticket";
const AUTH: &str = "PVEAPIToken=hcp@pve!provider=s3cr3t-token";
const NAME: &str = "test console 42";

/// A TLS websocket console server on 127.0.0.1; records the upgrade
/// requests it saw (path and headers), and serves RFB to each.
struct Server {
    addr: std::net::SocketAddr,
    fingerprint: String,
    seen: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// tungstenite's upgrade callback returns its large error response type.
#[allow(clippy::result_large_err)]
async fn server() -> Server {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = cert.cert.der().to_vec();
    let fingerprint = hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(&der));
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.into()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, recorded) = (acceptor.clone(), recorded.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let ws = tokio_tungstenite::accept_hdr_async(tls, |req: &Request, mut resp: Response| {
                    recorded.lock().unwrap().push(req.clone());
                    resp.headers_mut().insert("sec-websocket-protocol", "binary".parse().unwrap());
                    Ok(resp)
                })
                .await;
                if let Ok(ws) = ws {
                    let _ = vnc(WsIo::new(ws)).await;
                }
            });
        }
    });
    Server { addr, fingerprint, seen, task }
}

/// RFB 3.8 with VNC authentication, then ServerInit named [`NAME`].
async fn vnc(mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) -> std::io::Result<()> {
    s.write_all(rfb::VERSION).await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    s.write_all(&[1, 2]).await?;
    assert_eq!(s.read_u8().await?, 2);
    let challenge = [42u8; 16];
    s.write_all(&challenge).await?;
    let mut response = [0u8; 16];
    s.read_exact(&mut response).await?;
    assert_eq!(response, rfb::vnc_response(PASSWORD, &challenge), "the proxy answers with the password");
    s.write_u32(0).await?;
    s.read_u8().await?; // ClientInit
    let mut init = vec![0, 64, 0, 48, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
    init.extend_from_slice(&(NAME.len() as u32).to_be_bytes());
    init.extend_from_slice(NAME.as_bytes());
    s.write_all(&init).await?;
    s.flush().await?;
    // Stay until the client goes.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    Ok(())
}

fn endpoint(server: &Server) -> ConsoleEndpoint {
    ConsoleEndpoint {
        protocol: "vnc".into(),
        host: "127.0.0.1".into(),
        port: u32::from(server.addr.port()),
        password: PASSWORD.into(),
        tls: true,
        path: format!("/api2/json/nodes/pve1/qemu/100/vncwebsocket?port=5900&vncticket={TICKET}"),
        transport: ConsoleTransport::Websocket.into(),
        headers: vec![ConsoleHeader { name: "Authorization".into(), value: AUTH.into() }],
        tls_fingerprint_sha256: server.fingerprint.clone(),
        websocket_subprotocol: "binary".into(),
        ..Default::default()
    }
}

/// Nothing of the endpoint is in the reason the tenant would be told.
fn assert_discreet(e: &UpstreamError, endpoint: &ConsoleEndpoint) {
    let told = e.to_string();
    for secret in [
        endpoint.host.as_str(),
        &endpoint.port.to_string(),
        "vncwebsocket",
        TICKET,
        AUTH,
        &endpoint.tls_fingerprint_sha256,
    ] {
        assert!(secret.is_empty() || !told.contains(secret), "{told:?} names {secret:?}");
    }
}

#[tokio::test]
async fn a_pinned_websocket_upstream_carries_rfb_and_the_headers() {
    let server = server().await;
    let e = endpoint(&server);
    let mut up = upstream::connect(&e).await.expect("connects with the pinned fingerprint");
    rfb::connect_server(&mut up, &e.password).await.expect("VNC authentication succeeds");
    up.write_all(&[1]).await.unwrap(); // ClientInit, shared
    up.flush().await.unwrap();
    let mut head = [0u8; 24];
    up.read_exact(&mut head).await.unwrap();
    assert_eq!((&head[..2], &head[2..4]), (&[0u8, 64][..], &[0u8, 48][..]), "64x48");
    let mut name = vec![0u8; u32::from_be_bytes(head[20..24].try_into().unwrap()) as usize];
    up.read_exact(&mut name).await.unwrap();
    assert_eq!(String::from_utf8(name).unwrap(), NAME);
    drop(up);

    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.uri().to_string(), e.path, "the path and its query arrive as given");
    assert_eq!(req.headers()["authorization"], AUTH);
    assert_eq!(req.headers()["sec-websocket-protocol"], "binary");
}

#[tokio::test]
async fn a_wrong_fingerprint_or_no_trust_is_refused_discreetly() {
    let server = server().await;
    let wrong = ConsoleEndpoint { tls_fingerprint_sha256: ["00"; 32].join(":"), ..endpoint(&server) };
    let Err(e) = upstream::connect(&wrong).await else { panic!("a wrong fingerprint must be refused") };
    assert!(matches!(e, UpstreamError::Untrusted(_)), "{e:?}");
    assert_eq!(e.to_string(), "cannot reach the console server: its TLS certificate is not trusted");
    assert_discreet(&e, &wrong);

    let blind = ConsoleEndpoint { tls_fingerprint_sha256: String::new(), ..endpoint(&server) };
    let Err(e) = upstream::connect(&blind).await else { panic!("TLS without trust must be refused") };
    assert!(matches!(e, UpstreamError::NoTrust), "{e:?}");
    assert_discreet(&e, &blind);

    // A CA that did not sign the server's certificate is no better.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let stranger = ConsoleEndpoint {
        tls_fingerprint_sha256: String::new(),
        tls_ca_pem: other.cert.pem(),
        ..endpoint(&server)
    };
    let Err(e) = upstream::connect(&stranger).await else { panic!("an unknown issuer must be refused") };
    assert!(matches!(e, UpstreamError::Untrusted(_)), "{e:?}");
    assert_discreet(&e, &stranger);

    assert!(server.seen.lock().unwrap().is_empty(), "no upgrade reached the server: {:?}", server.seen);
}
