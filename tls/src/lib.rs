//! HTTPS towards hypervisor APIs and console servers, shared by the
//! providers that speak HTTP (Proxmox, vSphere) and by the gateway's
//! console proxy when it opens a websocket upstream.
//!
//! - [`Trust`]: how the peer's certificate is trusted: CA certificates
//!   (PEM), or one pinned SHA-256 fingerprint of the leaf certificate, as
//!   operators pin Proxmox nodes and ESXi hosts whose certificates are
//!   self-signed. Never "accept anything".
//! - [`Https`]: HTTP/1.1 over rustls to one `host:port`, with a small pool
//!   of kept-alive connections and a per-request timeout.
//! - [`keys`]: a certificate refused for a key rustls does not take (an
//!   RSA-1024 one) is named, with its subject and key size, instead of
//!   rustls' bare `BadSignature`.
//!
//! rustls (with ring) because every TLS connection HCP makes uses it: one
//! TLS stack to audit, no OpenSSL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub mod keys;

pub use crate::keys::{CertificateRole, UnacceptedKey};

/// How to trust a server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// CA certificates (PEM).
    Ca(Vec<u8>),
    /// The SHA-256 fingerprint of the server's own certificate.
    Fingerprint([u8; 32]),
}

/// Parses `AA:BB:...` (or plain hex) into 32 bytes.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hex).ok()?;
    bytes.try_into().ok()
}

/// `AA:BB:...`, the form operators copy from `openssl x509 -fingerprint`.
pub fn format_fingerprint(f: &[u8; 32]) -> String {
    f.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The SHA-256 fingerprint of a DER certificate.
pub fn fingerprint_of(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

/// The `[tls]` table of a provider's configuration: exactly one of a CA
/// file or a certificate fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// PEM file with the CA certificates.
    pub ca_file: Option<std::path::PathBuf>,
    /// SHA-256 fingerprint of the server's certificate, `AA:BB:...`.
    pub fingerprint: Option<String>,
}

/// What is wrong with a [`TrustConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrustConfigError {
    /// Both are set.
    #[error("set ca_file or fingerprint, not both")]
    Both,
    /// Neither is set.
    #[error("set ca_file or fingerprint")]
    Neither,
    /// The fingerprint does not parse.
    #[error("the fingerprint must be 32 hex bytes, e.g. AA:BB:...")]
    BadFingerprint,
}

impl TrustConfig {
    /// Checks the table without reading files.
    pub fn check(&self) -> Result<(), TrustConfigError> {
        match (&self.ca_file, &self.fingerprint) {
            (Some(_), Some(_)) => Err(TrustConfigError::Both),
            (None, None) => Err(TrustConfigError::Neither),
            (None, Some(f)) if parse_fingerprint(f).is_none() => Err(TrustConfigError::BadFingerprint),
            _ => Ok(()),
        }
    }

    /// The trust it names (reads the CA file).
    pub fn load(&self) -> Result<Trust, TrustError> {
        self.check().map_err(TrustError::Config)?;
        match (&self.ca_file, &self.fingerprint) {
            (Some(ca), _) => std::fs::read(ca)
                .map(Trust::Ca)
                .map_err(|source| TrustError::CaFile { path: ca.clone(), source }),
            (None, Some(f)) => parse_fingerprint(f)
                .map(Trust::Fingerprint)
                .ok_or(TrustError::Config(TrustConfigError::BadFingerprint)),
            (None, None) => Err(TrustError::Config(TrustConfigError::Neither)),
        }
    }
}

/// Why a [`Trust`] cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The `[tls]` table is unusable.
    #[error("tls")]
    Config(#[source] TrustConfigError),
    /// The CA file cannot be read.
    #[error("tls.ca_file {}", path.display())]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA PEM holds something that is not PEM.
    #[error("the CA certificates cannot be read")]
    BadCaPem(#[source] rustls::pki_types::pem::Error),
    /// The CA PEM holds a certificate rustls refuses as a root.
    #[error("the CA certificates cannot be read")]
    BadCa(#[source] rustls::Error),
    /// The CA PEM holds no certificate.
    #[error("the CA file holds no certificate")]
    NoCa,
    /// The host is no name a certificate can be checked against.
    #[error("tls: server name {host}")]
    ServerName {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// rustls refused the configuration.
    #[error("tls")]
    Tls(#[from] rustls::Error),
    /// rustls cannot build a verifier for the CA certificates.
    #[error("the CA certificates cannot be used")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// A rustls client configuration that trusts exactly what `trust` says. A
/// certificate refused for its key says which one and why
/// ([`UnacceptedKey`]).
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier = match trust {
        Trust::Ca(pem) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let mut ders = Vec::new();
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(TrustError::BadCaPem)?;
                roots.add(cert.clone()).map_err(TrustError::BadCa)?;
                ders.push(cert);
            }
            if roots.is_empty() {
                return Err(TrustError::NoCa);
            }
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(TrustError::Verifier)?;
            keys::Explained { inner: webpki, roots: ders }
        }
        Trust::Fingerprint(fingerprint) => keys::Explained {
            inner: Arc::new(Pinned {
                fingerprint: *fingerprint,
                algorithms: provider.signature_verification_algorithms,
            }),
            roots: Vec::new(),
        },
    };
    Ok(builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth())
}

/// Accepts exactly the certificate with the pinned SHA-256 fingerprint;
/// handshake signatures are still verified.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got = fingerprint_of(end_entity.as_ref());
        if got == self.fingerprint {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {} does not match the pinned one",
                format_fingerprint(&got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A failed HTTP exchange (no answer at all; an answer with any status is
/// an [`Answer`]).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, TLS, or the exchange itself failed.
    #[error("{0}")]
    Transport(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// An HTTP answer, whatever its status.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The reason phrase, when the server sent a non-standard one (PVE puts
    /// its error text there).
    pub reason: Option<String>,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// HTTPS/1.1 to one `host:port`, with a small pool of kept-alive
/// connections.
pub struct Https {
    connector: tokio_rustls::TlsConnector,
    host: String,
    port: u16,
    server_name: rustls::pki_types::ServerName<'static>,
    idle: std::sync::Mutex<Vec<Sender>>,
    timeout: Duration,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

impl Https {
    /// A client for `host:port` trusting `trust`; each request gets at most
    /// `timeout`.
    pub fn new(host: &str, port: u16, trust: &Trust, timeout: Duration) -> Result<Self, TrustError> {
        let server_name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|source| TrustError::ServerName { host: host.to_owned(), source })?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config(trust)?)),
            host: host.to_owned(),
            port,
            server_name,
            idle: std::sync::Mutex::new(Vec::new()),
            timeout,
        })
    }

    /// The host this client talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port this client talks to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, for the `Host` header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The TLS connector (for a websocket to the same server).
    pub fn connector(&self) -> &tokio_rustls::TlsConnector {
        &self.connector
    }

    async fn connect(&self) -> Result<Sender, HttpError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| HttpError::Transport(format!("connect {}:{}: {e}", self.host, self.port)))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.connector.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            match UnacceptedKey::of_handshake(&e) {
                Some(key) => HttpError::Transport(format!("tls with {}: {key}", self.authority())),
                None => HttpError::Transport(format!("tls with {}: {e}", self.authority())),
            }
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| HttpError::Transport(format!("http: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer, on a pooled connection
    /// when one is idle.
    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<Answer, HttpError> {
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|s| !s.is_closed())
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => self.connect().await?,
        };
        let answer = self.exchange(&mut sender, req).await?;
        if !sender.is_closed() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(sender);
        }
        Ok(answer)
    }

    /// A connection of its own, outside the pool, for schemes that
    /// authenticate a connection rather than a request (NTLM).
    pub async fn connection(&self) -> Result<Connection, HttpError> {
        Ok(Connection { sender: self.connect().await? })
    }

    /// Sends one request on `conn`.
    pub async fn send_on(
        &self,
        conn: &mut Connection,
        req: http::Request<Full<Bytes>>,
    ) -> Result<Answer, HttpError> {
        self.exchange(&mut conn.sender, req).await
    }

    async fn exchange(
        &self,
        sender: &mut Sender,
        req: http::Request<Full<Bytes>>,
    ) -> Result<Answer, HttpError> {
        let work = async {
            sender.ready().await.map_err(|e| HttpError::Transport(format!("http: {e}")))?;
            let resp =
                sender.send_request(req).await.map_err(|e| HttpError::Transport(format!("http: {e}")))?;
            let status = resp.status().as_u16();
            let reason = resp
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Transport(format!("body: {e}")))?
                .to_bytes();
            Ok::<_, HttpError>(Answer { status, reason, headers, body })
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| HttpError::Timeout(self.timeout))?
    }
}

/// One HTTP/1.1 connection held by its user (see [`Https::connection`]).
pub struct Connection {
    sender: Sender,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("closed", &self.sender.is_closed()).finish()
    }
}

impl Connection {
    /// True once the peer or an error closed it.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons_and_print_with_them() {
        let f = [0xabu8; 32];
        let text = format_fingerprint(&f);
        assert_eq!(text.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&text), Some(f));
        assert_eq!(parse_fingerprint(&text.replace(':', "")), Some(f));
        assert_eq!(parse_fingerprint("AB:CD"), None);
        assert_eq!(parse_fingerprint("not hex"), None);
    }

    #[test]
    fn a_trust_table_that_names_nothing_is_refused_with_its_reason() {
        use std::error::Error as _;
        let e = TrustConfig::default().load().unwrap_err();
        assert_eq!(e.to_string(), "tls");
        assert_eq!(e.source().map(ToString::to_string).as_deref(), Some("set ca_file or fingerprint"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        assert!(matches!(client_config(&Trust::Ca(b"nothing here".to_vec())), Err(TrustError::NoCa)));
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert!(client_config(&Trust::Ca(ca.cert.pem().into_bytes())).is_ok());
    }
}
