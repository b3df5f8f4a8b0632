//! TLS of the provider's own gRPC server, on rustls directly rather than
//! tonic's fixed configuration, so that certificates can be replaced while
//! the provider runs.
//!
//! The current `rustls::ServerConfig` lives in a cell. Every accepted TCP
//! connection is handshaken in a task of its own (a slow client never
//! holds up accepting) with the configuration current when it was
//! accepted, and the finished TLS streams are handed to tonic. When the
//! certificate, key and client CA come from files ([`TlsFiles`]), a
//! watcher reads them again every [`TlsFiles::reload_every`]; when their
//! contents changed and make a usable configuration, it replaces the one
//! in the cell and logs the new certificate's fingerprint and expiry. A set
//! that does not (a file half written, a key that does not match the
//! certificate) leaves the served one in place, is logged as a warning,
//! and is tried again at the next tick. Established connections keep the
//! certificate they were made with; new ones get the new one.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Where the provider's server gets its TLS certificate, private key and,
/// for mutual TLS, the CA of the client certificates it requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTls {
    /// PEM held in memory (for programmatic use), served unchanged until
    /// the server stops.
    Pem(TlsPem),
    /// PEM files, read when serving starts (a set that cannot be served
    /// refuses to start) and again every [`TlsFiles::reload_every`], so a
    /// rotated certificate is served without a restart.
    Files(TlsFiles),
}

impl From<TlsPem> for ServerTls {
    fn from(pem: TlsPem) -> Self {
        Self::Pem(pem)
    }
}

impl From<TlsFiles> for ServerTls {
    fn from(files: TlsFiles) -> Self {
        Self::Files(files)
    }
}

/// A TLS server identity in PEM: certificate chain, private key and,
/// optionally, the CA certificates whose client certificates are required.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    /// The server's certificate, then any intermediates.
    pub cert_pem: Vec<u8>,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// CA certificates (one or more, e.g. the old and the new CA while
    /// clients move between them) whose client certificates are required;
    /// None accepts any client.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl TlsPem {
    /// Checks that the set can be served: the PEM parses, the key matches
    /// the certificate, the client CA certificates are usable.
    pub fn check(&self) -> Result<(), TlsError> {
        server_config(self).map(|_| ())
    }
}

impl fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPem").field("client_auth", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

/// The PEM files of a provider's TLS server and how often they are read
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA certificates of the client certificates required, if any.
    pub client_ca: Option<PathBuf>,
    /// How often the files are read again; not zero.
    pub reload_every: Duration,
}

impl TlsFiles {
    /// The reload interval when the configuration names none: 10 s.
    pub const DEFAULT_RELOAD: Duration = Duration::from_secs(10);

    /// Reads the files.
    pub fn read(&self) -> Result<TlsPem, TlsError> {
        let read = |part, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { part, path: path.to_owned(), source })
        };
        Ok(TlsPem {
            cert_pem: read(TlsPart::Certificate, &self.cert)?,
            key_pem: read(TlsPart::Key, &self.key)?,
            client_ca_pem: self.client_ca.as_deref().map(|p| read(TlsPart::ClientCa, p)).transpose()?,
        })
    }

    /// Reads the files and checks that they can be served.
    pub fn check(&self) -> Result<(), TlsError> {
        self.read()?.check()
    }
}

/// One part of a TLS server's configuration, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPart {
    /// The certificate chain.
    Certificate,
    /// The private key.
    Key,
    /// The client CA certificates.
    ClientCa,
}

impl fmt::Display for TlsPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Certificate => "certificate",
            Self::Key => "private key",
            Self::ClientCa => "client CA",
        })
    }
}

/// A TLS configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {part} file {}", path.display())]
    Read {
        /// What the file holds.
        part: TlsPart,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A part is not PEM of the expected kind (or is cut short).
    #[error("the {part} is not usable PEM")]
    Pem {
        /// Which part.
        part: TlsPart,
        /// What the PEM parser said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A part holds no certificate.
    #[error("the {part} holds no certificate")]
    NoCertificate {
        /// Which part.
        part: TlsPart,
    },
    /// A client CA certificate was refused.
    #[error("a client CA certificate is unusable")]
    ClientCa(#[source] rustls::Error),
    /// The client certificate verifier could not be built from the CAs.
    #[error("the client CA certificates cannot verify clients")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    /// The certificate chain and key do not make an identity (e.g. the key
    /// is not the certificate's).
    #[error("the certificate and private key cannot be served together")]
    Identity(#[source] rustls::Error),
    /// [`TlsFiles::reload_every`] is zero.
    #[error("the reload interval must not be zero")]
    ZeroReload,
}

impl TlsError {
    /// The part at fault, when one is.
    pub fn part(&self) -> Option<TlsPart> {
        match self {
            Self::Read { part, .. } | Self::Pem { part, .. } | Self::NoCertificate { part } => Some(*part),
            Self::ClientCa(_) | Self::ClientVerifier(_) => Some(TlsPart::ClientCa),
            Self::Identity(_) => Some(TlsPart::Key),
            Self::ZeroReload => None,
        }
    }
}

/// At most this many connections are in their TLS handshake at once;
/// beyond it, accepting waits for one to finish (the kernel's backlog
/// holds the rest).
const MAX_HANDSHAKES: usize = 1024;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long accepting pauses after the listener failed (e.g. out of file
/// descriptors), so a persistent failure does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The TLS side of a running server: the cell holding the configuration
/// new connections are handshaken with, and the watcher replacing it.
pub(crate) struct Tls {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    _watcher: Option<AbortOnDrop>,
}

impl Tls {
    /// Builds the first configuration (refusing a set that cannot be
    /// served) and, for files, starts the watcher.
    pub(crate) async fn start(tls: &ServerTls) -> Result<Self, TlsError> {
        let (pem, files) = match tls {
            ServerTls::Pem(pem) => (pem.clone(), None),
            ServerTls::Files(files) => {
                if files.reload_every.is_zero() {
                    return Err(TlsError::ZeroReload);
                }
                (read(files).await?, Some(files.clone()))
            }
        };
        let config = server_config(&pem)?;
        log_identity(&pem, "serving TLS certificate");
        let current = Arc::new(RwLock::new(Arc::new(config)));
        let watcher = files.map(|files| AbortOnDrop(tokio::spawn(watch(files, current.clone(), pem))));
        Ok(Self { current, _watcher: watcher })
    }

    /// The TLS connections accepted on `listener`, each handshaken in its
    /// own task with the configuration current when it was accepted. The
    /// guard stops accepting when dropped; so does dropping the stream.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
    ) -> (ReceiverStream<io::Result<TlsStream<TcpStream>>>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept(listener, self.current.clone(), tx));
        (ReceiverStream::new(rx), AbortOnDrop(task))
    }
}

/// Aborts the task when dropped, so a server that stops leaves no task
/// behind.
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections until the stream's receiver is gone.
async fn accept(
    listener: TcpListener,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    tx: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
) {
    // Dropping the set (when the receiver is gone) aborts the handshakes
    // still running.
    let mut handshakes = JoinSet::new();
    loop {
        if handshakes.len() >= MAX_HANDSHAKES {
            tokio::select! {
                _ = tx.closed() => return,
                _ = handshakes.join_next() => continue,
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // As tonic's own TCP listener does: gRPC messages are
                    // small and latency matters more than packet count.
                    let _ = tcp.set_nodelay(true);
                    let config = current.read().unwrap_or_else(PoisonError::into_inner).clone();
                    let tx = tx.clone();
                    handshakes.spawn(async move {
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Ok(stream)).await;
                            }
                            Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Reads `files` again every `reload_every` and serves their contents
/// once they change and can be served; `served` is what is served now.
async fn watch(files: TlsFiles, current: Arc<RwLock<Arc<rustls::ServerConfig>>>, mut served: TlsPem) {
    let every = files.reload_every;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A set that stays wrong is reported once, not at every tick.
    let mut reported: Option<String> = None;
    loop {
        ticks.tick().await;
        let outcome = match read(&files).await {
            Ok(pem) if pem == served => Ok(None),
            Ok(pem) => server_config(&pem).map(|config| Some((pem, config))),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => reported = None,
            Ok(Some((pem, config))) => {
                *current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                log_identity(&pem, "serving a new TLS certificate");
                served = pem;
                reported = None;
            }
            Err(error) => {
                let chain = hcp_telemetry::error_chain(&error);
                if reported.as_deref() != Some(chain.as_str()) {
                    tracing::warn!(
                        error = %chain,
                        cert = %files.cert.display(),
                        "the TLS files cannot be served; keeping the current certificate, trying again in {every:?}"
                    );
                    reported = Some(chain);
                }
            }
        }
    }
}

/// Reads the files without blocking the runtime's threads.
async fn read(files: &TlsFiles) -> Result<TlsPem, TlsError> {
    async fn one(part: TlsPart, path: &Path) -> Result<Vec<u8>, TlsError> {
        tokio::fs::read(path).await.map_err(|source| TlsError::Read { part, path: path.to_owned(), source })
    }
    let client_ca = match &files.client_ca {
        Some(path) => Some(one(TlsPart::ClientCa, path).await?),
        None => None,
    };
    Ok(TlsPem {
        cert_pem: one(TlsPart::Certificate, &files.cert).await?,
        key_pem: one(TlsPart::Key, &files.key).await?,
        client_ca_pem: client_ca,
    })
}

/// Logs the fingerprint, subject and expiry of the set's certificate, and
/// warns when it is not valid now.
fn log_identity(pem: &TlsPem, message: &'static str) {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(&pem.cert_pem).next() else {
        return;
    };
    let fingerprint = hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(&der));
    let client_auth = pem.client_ca_pem.is_some();
    match x509_parser::parse_x509_certificate(&der) {
        Ok((_, cert)) => {
            let (subject, not_after) = (cert.subject().to_string(), cert.validity().not_after.to_string());
            tracing::info!(%fingerprint, %subject, %not_after, client_auth, "{message}");
            if !cert.validity().is_valid() {
                tracing::warn!(%fingerprint, %not_after, "the TLS certificate is not valid now");
            }
        }
        Err(_) => tracing::info!(%fingerprint, client_auth, "{message}"),
    }
}

/// The certificates of a PEM part, at least one.
fn certificates(pem: &[u8], part: TlsPart) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { part, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { part });
    }
    Ok(certs)
}

/// The rustls configuration serving `pem` over HTTP/2, with ring as every
/// TLS connection of HCP.
fn server_config(pem: &TlsPem) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&pem.cert_pem, TlsPart::Certificate)?;
    let key = PrivateKeyDer::from_pem_slice(&pem.key_pem)
        .map_err(|source| TlsError::Pem { part: TlsPart::Key, source })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?;
    let builder = match &pem.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca, TlsPart::ClientCa)? {
                roots.add(cert).map_err(TlsError::ClientCa)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(TlsError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for localhost and its key.
    fn pem_of() -> TlsPem {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        TlsPem {
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            client_ca_pem: None,
        }
    }

    /// Each way a set can be wrong is refused with the part at fault.
    #[test]
    fn unusable_sets_name_the_part_at_fault() {
        let (good, other) = (pem_of(), pem_of());
        assert!(good.check().is_ok());
        let half = good.cert_pem[..good.cert_pem.len() / 2].to_vec();
        let cases: [(&str, TlsPem, TlsPart); 6] = [
            ("cut short", TlsPem { cert_pem: half, ..good.clone() }, TlsPart::Certificate),
            ("empty", TlsPem { cert_pem: Vec::new(), ..good.clone() }, TlsPart::Certificate),
            ("no key", TlsPem { key_pem: good.cert_pem.clone(), ..good.clone() }, TlsPart::Key),
            ("another key", TlsPem { key_pem: other.key_pem.clone(), ..good.clone() }, TlsPart::Key),
            ("empty CA", TlsPem { client_ca_pem: Some(b"x".to_vec()), ..good.clone() }, TlsPart::ClientCa),
            (
                "CA not PEM",
                TlsPem { client_ca_pem: Some(good.key_pem.clone()), ..good.clone() },
                TlsPart::ClientCa,
            ),
        ];
        for (what, pem, part) in cases {
            let e = pem.check().expect_err(what);
            assert_eq!(e.part(), Some(part), "{what}: {e:?}");
        }
        let with_ca = TlsPem { client_ca_pem: Some(other.cert_pem.clone()), ..good };
        assert!(with_ca.check().is_ok());
    }
}
