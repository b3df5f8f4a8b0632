//! Trust on the channel to each provider. Registration's TLS settings are
//! checked here into [`TlsSettings`] (each failure naming the request field),
//! with core's configured `[providers]` files ([`TlsDefaults`]) filling what
//! a registration leaves out. [`TlsConnector`] opens a provider's TLS
//! connections with exactly that trust and keeps the last TLS failure it
//! met ([`TlsWatch`]): tonic and h2 flatten a failure seen after the
//! handshake (a provider refusing core's client certificate under TLS 1.3)
//! into "transport error", so the connection's own reads and writes are
//! watched. [`TlsFailure`] says what such a failure means to an operator.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hcp_domain::model::endpoint_host;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A certificate chain with its private key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Core's configured trust for providers (`providers.tls_ca_file`,
/// `tls_client_cert_file`, `tls_client_key_file`), parsed once at start:
/// what a registration does not set.
#[derive(Default)]
pub struct TlsDefaults {
    ca: Vec<CertificateDer<'static>>,
    identity: Option<Identity>,
}

impl std::fmt::Debug for TlsDefaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDefaults")
            .field("ca_certificates", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// Why core's configured provider TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DefaultsError {
    /// A file cannot be read.
    #[error("cannot read providers.{setting} ({path})")]
    Read {
        /// The setting.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file's contents are unusable.
    #[error("providers.{setting} ({path}) is unusable")]
    Unusable {
        /// The setting.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: SettingsError,
    },
    /// Only one of the client certificate and its key is set.
    #[error(
        "providers.tls_client_cert_file and providers.tls_client_key_file go together; set both or neither"
    )]
    HalfIdentity,
}

impl TlsDefaults {
    /// Reads and checks the configured files.
    pub fn load(c: &crate::config::ProvidersConfig) -> Result<Self, DefaultsError> {
        let read = |setting: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| DefaultsError::Read {
                setting,
                path: path.display().to_string(),
                source,
            })
        };
        let unusable = |setting: &'static str, path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| DefaultsError::Unusable { setting, path, source }
        };
        let mut out = Self::default();
        if let Some(path) = &c.tls_ca_file {
            out.ca = ca_certificates(&read("tls_ca_file", path)?).map_err(unusable("tls_ca_file", path))?;
        }
        match (&c.tls_client_cert_file, &c.tls_client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = client_chain(&read("tls_client_cert_file", cert)?)
                    .map_err(unusable("tls_client_cert_file", cert))?;
                let key_der = private_key(&read("tls_client_key_file", key)?)
                    .map_err(unusable("tls_client_key_file", key))?;
                let identity = Identity { chain, key: key_der };
                client_config(&out.ca, Some(&identity)).map_err(unusable("tls_client_key_file", key))?;
                out.identity = Some(identity);
            }
            (None, None) => {}
            _ => return Err(DefaultsError::HalfIdentity),
        }
        Ok(out)
    }
}

/// One provider's TLS settings as text: from a registration, or from its
/// stored row with the client key opened.
#[derive(Default)]
pub struct TlsText<'a> {
    /// CA certificates (PEM).
    pub ca_pem: Option<&'a str>,
    /// Core's client certificate chain (PEM).
    pub client_cert_pem: Option<&'a str>,
    /// Its private key (PEM).
    pub client_key_pem: Option<&'a str>,
    /// The name the provider's certificate must carry.
    pub server_name: Option<&'a str>,
}

/// Checked trust for one provider's TLS channel: the rustls configuration
/// and the name the certificate must carry.
pub struct TlsSettings {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    presents_certificate: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .field("presents_certificate", &self.presents_certificate)
            .finish_non_exhaustive()
    }
}

/// What is wrong with one provider's TLS settings; [`SettingsError::field`]
/// names the request field.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The CA text is not PEM certificates.
    #[error("tls.ca_pem is not PEM certificates")]
    CaPem(#[source] rustls::pki_types::pem::Error),
    /// The CA text holds no certificate.
    #[error("tls.ca_pem holds no certificate")]
    NoCaCertificate,
    /// A CA certificate cannot be a trust anchor.
    #[error("tls.ca_pem holds a certificate that cannot be a CA")]
    Ca(#[source] rustls::Error),
    /// Neither the registration nor core's configuration names a CA.
    #[error(
        "an https:// endpoint needs tls.ca_pem (the CA that signs the provider's certificate), or providers.tls_ca_file in core's configuration"
    )]
    NoCa,
    /// The client certificate text is not PEM certificates.
    #[error("tls.client_cert_pem is not PEM certificates")]
    CertPem(#[source] rustls::pki_types::pem::Error),
    /// The client certificate text holds no certificate.
    #[error("tls.client_cert_pem holds no certificate")]
    NoCertificate,
    /// The key text is not a PEM private key (what it holds is never
    /// shown: it is a secret).
    #[error("tls.client_key_pem is not a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    KeyPem,
    /// A key without a certificate.
    #[error("tls.client_key_pem needs tls.client_cert_pem")]
    KeyWithoutCertificate,
    /// A certificate without a key.
    #[error("tls.client_cert_pem needs tls.client_key_pem")]
    CertificateWithoutKey,
    /// rustls refuses the certificate and key as a pair.
    #[error("tls.client_key_pem does not go with tls.client_cert_pem, or is of a kind core cannot use")]
    Identity(#[source] rustls::Error),
    /// The server name is no DNS name or IP address.
    #[error("tls.server_name {0} is no DNS name or IP address")]
    ServerName(String),
    /// The endpoint's host is no name a certificate can be checked against.
    #[error("the endpoint's host is no DNS name or IP address a certificate can be checked against")]
    EndpointHost,
}

impl SettingsError {
    /// The request field to blame.
    pub fn field(&self) -> &'static str {
        match self {
            Self::CaPem(_) | Self::NoCaCertificate | Self::Ca(_) | Self::NoCa => "tls.ca_pem",
            Self::CertPem(_) | Self::NoCertificate | Self::KeyWithoutCertificate => "tls.client_cert_pem",
            Self::KeyPem | Self::CertificateWithoutKey | Self::Identity(_) => "tls.client_key_pem",
            Self::ServerName(_) => "tls.server_name",
            Self::EndpointHost => "endpoint",
        }
    }
}

impl TlsSettings {
    /// Checks `text` for the `https://` endpoint `endpoint`, filling what it
    /// leaves out from `defaults`.
    pub fn new(endpoint: &str, text: &TlsText<'_>, defaults: &TlsDefaults) -> Result<Self, SettingsError> {
        let own_ca = match text.ca_pem {
            Some(pem) => Some(ca_certificates(pem.as_bytes())?),
            None => None,
        };
        let ca = own_ca.as_deref().unwrap_or(&defaults.ca);
        if ca.is_empty() {
            return Err(SettingsError::NoCa);
        }
        let own_identity = match (text.client_cert_pem, text.client_key_pem) {
            (Some(cert), Some(key)) => {
                Some(Identity { chain: client_chain(cert.as_bytes())?, key: private_key(key.as_bytes())? })
            }
            (None, None) => None,
            (Some(_), None) => return Err(SettingsError::CertificateWithoutKey),
            (None, Some(_)) => return Err(SettingsError::KeyWithoutCertificate),
        };
        let identity = own_identity.as_ref().or(defaults.identity.as_ref());
        let server_name = match text.server_name {
            Some(name) => ServerName::try_from(name.to_owned())
                .map_err(|_| SettingsError::ServerName(hcp_proto::error::excerpt(name)))?,
            None => endpoint_host(endpoint)
                .and_then(|h| ServerName::try_from(h.to_owned()).ok())
                .ok_or(SettingsError::EndpointHost)?,
        };
        Ok(Self {
            config: client_config(ca, identity)?,
            server_name,
            presents_certificate: identity.is_some(),
        })
    }
}

/// Parses CA certificates and checks each can be a trust anchor.
fn ca_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SettingsError> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(SettingsError::CaPem)?;
    if certs.is_empty() {
        return Err(SettingsError::NoCaCertificate);
    }
    let mut roots = RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).map_err(SettingsError::Ca)?;
    }
    Ok(certs)
}

fn client_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SettingsError> {
    let chain =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(SettingsError::CertPem)?;
    if chain.is_empty() {
        return Err(SettingsError::NoCertificate);
    }
    Ok(chain)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, SettingsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| SettingsError::KeyPem)
}

/// The rustls client configuration trusting exactly `ca`, presenting
/// `identity` when there is one, speaking HTTP/2.
fn client_config(
    ca: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, SettingsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone()).map_err(SettingsError::Ca)?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(SettingsError::Identity)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(SettingsError::Identity)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The last TLS failure met on a provider's connections, shared by its
/// connector and every connection it opened. A handshake that succeeds
/// clears it.
#[derive(Clone, Default, Debug)]
pub struct TlsWatch(Arc<Mutex<Option<rustls::Error>>>);

impl TlsWatch {
    fn note(&self, e: &io::Error) {
        if let Some(tls) = rustls_of_io(e) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls.clone());
        }
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The last TLS failure, if any since the last good handshake.
    pub fn last(&self) -> Option<rustls::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn rustls_of_io(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The first rustls error in `err`'s source chain (through `io::Error`s,
/// whose `source` skips the error they carry).
pub fn rustls_in(err: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.clone());
        }
        if let Some(tls) = e.downcast_ref::<io::Error>().and_then(rustls_of_io) {
            return Some(tls.clone());
        }
        next = e.source();
    }
    None
}

/// Opens TLS connections to one provider (TCP to its host and port, then
/// the handshake with its [`TlsSettings`]); tonic speaks HTTP/2 on top.
///
/// Under TLS 1.3 a server checks the client's certificate after the
/// client's side of the handshake is done: a provider that refuses core's
/// certificate answers with an alert and closes. Were core to send its
/// first request at once, the request would meet the closed connection,
/// the provider's kernel would answer with a reset, and the alert saying
/// why would be lost. So when the provider asked for a client certificate,
/// the connector waits for its first words (the HTTP/2 settings every
/// server sends first, or the alert) before handing the connection over.
#[derive(Clone)]
pub struct TlsConnector {
    settings: Arc<TlsSettings>,
    host: String,
    port: u16,
    watch: TlsWatch,
}

/// Core's client certificate resolver, noting that the server asked for a
/// certificate.
#[derive(Debug)]
struct NoteRequest {
    inner: Arc<dyn ResolvesClientCert>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for NoteRequest {
    fn resolve(&self, hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::SeqCst);
        self.inner.resolve(hints, schemes)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

impl TlsConnector {
    /// A connector for the `https://` endpoint `endpoint`; None when it
    /// names no host.
    pub fn new(endpoint: &str, settings: Arc<TlsSettings>) -> Option<Self> {
        let uri: http::Uri = endpoint.parse().ok()?;
        let host = endpoint_host(endpoint)?.to_owned();
        let port = uri.port_u16().unwrap_or(443);
        Some(Self { settings, host, port, watch: TlsWatch::default() })
    }

    /// The failure watch of every connection this connector opens.
    pub fn watch(&self) -> &TlsWatch {
        &self.watch
    }

    /// Whether this connector presents a client certificate.
    pub fn presents_certificate(&self) -> bool {
        self.settings.presents_certificate
    }

    async fn connect(&self) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        // This connection's own configuration (sharing the session cache),
        // to learn whether the provider asks for a client certificate.
        let asked = Arc::new(AtomicBool::new(false));
        let mut config = (*self.settings.config).clone();
        config.client_auth_cert_resolver =
            Arc::new(NoteRequest { inner: config.client_auth_cert_resolver.clone(), asked: asked.clone() });
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut stream = tls.connect(self.settings.server_name.clone(), tcp).await?;
        if asked.load(Ordering::SeqCst) {
            // The provider's verdict on core's certificate; what it sent
            // stays buffered for HTTP/2.
            let first = tokio::io::AsyncBufReadExt::fill_buf(&mut stream).await?;
            if first.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the provider closed the connection after asking for core's client certificate",
                ));
            }
        }
        Ok(stream)
    }
}

/// A connection whose I/O errors are noted in a [`TlsWatch`].
pub struct Watched<S> {
    inner: S,
    watch: TlsWatch,
}

/// What [`TlsConnector`] connects.
pub type TlsIo = hyper_util::rt::TokioIo<Watched<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            match this.connect().await {
                Ok(stream) => {
                    this.watch.clear();
                    Ok(hyper_util::rt::TokioIo::new(Watched { inner: stream, watch: this.watch.clone() }))
                }
                Err(e) => {
                    this.watch.note(&e);
                    Err(e)
                }
            }
        })
    }
}

impl<S> Watched<S> {
    fn noted<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            self.watch.note(e);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.noted(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.noted(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.noted(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.noted(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.noted(r)
    }
}

/// A TLS failure on a provider's channel, in the operator's terms.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The provider's certificate does not carry the expected name.
    #[error("the provider's certificate is not valid for {expected} (it names {presented})")]
    WrongName {
        /// The name core expected.
        expected: String,
        /// The names in the certificate.
        presented: String,
    },
    /// The provider's certificate is signed by a CA core does not trust.
    #[error("the provider's certificate is not signed by a CA core trusts for it")]
    UnknownCa,
    /// The provider's certificate is unusable otherwise (expired, not yet
    /// valid, revoked, badly signed).
    #[error("the provider's certificate is not acceptable")]
    BadCertificate(#[source] rustls::Error),
    /// The provider requires a client certificate and core sent none.
    #[error("the provider requires a client certificate and core presented none")]
    ClientCertificateRequired,
    /// The provider refused core's client certificate.
    #[error("the provider refused core's client certificate (alert {0:?})")]
    ClientCertificateRefused(AlertDescription),
    /// The endpoint does not speak TLS (it may be a plaintext port).
    #[error("the endpoint does not answer TLS")]
    NotTls(#[source] rustls::Error),
    /// Anything else TLS refused.
    #[error("the TLS handshake failed")]
    Other(#[source] rustls::Error),
}

impl TlsFailure {
    /// Reads a rustls error met on a connection that did (or did not)
    /// present a client certificate.
    pub fn of(e: rustls::Error, presented_certificate: bool) -> Self {
        use AlertDescription as A;
        match e {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            }) => {
                Self::WrongName { expected: format!("{}", expected.to_str()), presented: names(&presented) }
            }
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
                Self::WrongName { expected: "the expected name".to_owned(), presented: "others".to_owned() }
            }
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Self::UnknownCa,
            rustls::Error::InvalidCertificate(_) => Self::BadCertificate(e),
            rustls::Error::AlertReceived(A::CertificateRequired) => Self::ClientCertificateRequired,
            rustls::Error::AlertReceived(
                alert @ (A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied),
            ) => {
                if presented_certificate {
                    Self::ClientCertificateRefused(alert)
                } else {
                    Self::ClientCertificateRequired
                }
            }
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => Self::NotTls(e),
            _ => Self::Other(e),
        }
    }

    /// The registration field an operator fixes.
    pub fn field(&self) -> &'static str {
        match self {
            Self::WrongName { .. } => "tls.server_name",
            Self::UnknownCa => "tls.ca_pem",
            Self::ClientCertificateRequired | Self::ClientCertificateRefused(_) => "tls.client_cert_pem",
            Self::NotTls(_) => "endpoint",
            Self::BadCertificate(_) | Self::Other(_) => "tls",
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::WrongName { .. } => {
                "set tls.server_name to a name its certificate carries, or give the provider a certificate for the endpoint's host"
            }
            Self::UnknownCa => "set tls.ca_pem to the CA that signs the provider's certificate",
            Self::ClientCertificateRequired => {
                "set tls.client_cert_pem and tls.client_key_pem (or providers.tls_client_cert_file) to a certificate the provider's client CA signs"
            }
            Self::ClientCertificateRefused(_) => {
                "use a client certificate signed by the CA the provider trusts for clients"
            }
            Self::NotTls(_) => "check that the provider serves TLS on that port, or use its http:// endpoint",
            Self::BadCertificate(_) | Self::Other(_) => "check the provider's TLS settings",
        }
    }
}

/// At most a few names, for a bounded message. rustls writes each as
/// `DnsName("a.example")` or `IpAddress(…)`; the name alone is shown.
fn names(presented: &[String]) -> String {
    let plain: Vec<&str> = presented
        .iter()
        .map(|n| {
            n.split_once('(')
                .and_then(|(_, r)| r.strip_suffix(')'))
                .map_or(n.as_str(), |v| v.trim_matches('"'))
        })
        .collect();
    match plain.len() {
        0 => "no name".to_owned(),
        1..=4 => plain.join(", "),
        n => format!("{} and {} more", plain[..4].join(", "), n - 4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_in_the_operators_terms() {
        use rustls::Error as E;
        let name = ServerName::try_from("provider.example").unwrap();
        let wrong = E::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: name,
            presented: vec!["DnsName(\"other.example\")".into(), "IpAddress(10.0.0.5)".into()],
        });
        for (error, presented, field, shown) in [
            (
                wrong,
                false,
                "tls.server_name",
                "not valid for provider.example (it names other.example, 10.0.0.5)",
            ),
            (
                E::InvalidCertificate(CertificateError::UnknownIssuer),
                false,
                "tls.ca_pem",
                "not signed by a CA",
            ),
            (E::InvalidCertificate(CertificateError::Expired), false, "tls", "not acceptable"),
            (
                E::AlertReceived(AlertDescription::CertificateRequired),
                false,
                "tls.client_cert_pem",
                "presented none",
            ),
            (
                E::AlertReceived(AlertDescription::UnknownCA),
                true,
                "tls.client_cert_pem",
                "refused core's client",
            ),
            (E::AlertReceived(AlertDescription::UnknownCA), false, "tls.client_cert_pem", "presented none"),
            (
                E::AlertReceived(AlertDescription::BadCertificate),
                true,
                "tls.client_cert_pem",
                "BadCertificate",
            ),
            (
                E::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                false,
                "endpoint",
                "does not answer TLS",
            ),
            (E::AlertReceived(AlertDescription::HandshakeFailure), true, "tls", "handshake failed"),
        ] {
            let f = TlsFailure::of(error.clone(), presented);
            assert_eq!(f.field(), field, "{error:?}");
            assert!(f.to_string().contains(shown), "{error:?}: {f}");
        }
    }

    #[test]
    fn configured_defaults_go_in_pairs() {
        let half = crate::config::ProvidersConfig {
            tls_client_cert_file: Some("/nonexistent/core.pem".into()),
            ..Default::default()
        };
        assert!(matches!(TlsDefaults::load(&half), Err(DefaultsError::HalfIdentity)));
        let none = TlsDefaults::load(&crate::config::ProvidersConfig::default()).unwrap();
        assert!(none.ca.is_empty() && none.identity.is_none());
    }

    #[test]
    fn a_rustls_error_is_found_inside_io_errors() {
        let tls = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls.clone());
        // io::Error's own source() skips what it carries.
        assert_eq!(rustls_in(&io), Some(tls.clone()));
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] io::Error);
        assert_eq!(rustls_in(&Outer(io)), Some(tls));
        assert_eq!(rustls_in(&io::Error::from(io::ErrorKind::ConnectionRefused)), None);
    }

    #[test]
    fn settings_name_the_field_that_is_wrong() {
        let ca = {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["hcp-core".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let (ca_pem, cert_pem, key_pem) = (ca.pem(), cert.pem(), key.serialize_pem());
        let none = TlsDefaults::default();
        let endpoint = "https://provider.example:50061";
        let check =
            |text: TlsText<'_>| TlsSettings::new(endpoint, &text, &none).map(|_| ()).map_err(|e| e.field());
        let good = || TlsText {
            ca_pem: Some(&ca_pem),
            client_cert_pem: Some(&cert_pem),
            client_key_pem: Some(&key_pem),
            server_name: None,
        };
        assert_eq!(check(good()), Ok(()));
        assert_eq!(check(TlsText { client_cert_pem: None, client_key_pem: None, ..good() }), Ok(()));
        assert_eq!(check(TlsText { server_name: Some("10.0.0.5"), ..good() }), Ok(()));
        for (text, field) in [
            (TlsText { ca_pem: None, ..good() }, "tls.ca_pem"),
            (TlsText { ca_pem: Some("not pem"), ..good() }, "tls.ca_pem"),
            (
                TlsText {
                    ca_pem: Some("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
                    ..good()
                },
                "tls.ca_pem",
            ),
            (TlsText { client_cert_pem: Some("nothing"), ..good() }, "tls.client_cert_pem"),
            (TlsText { client_cert_pem: None, ..good() }, "tls.client_cert_pem"),
            (TlsText { client_key_pem: None, ..good() }, "tls.client_key_pem"),
            (TlsText { client_key_pem: Some("nothing"), ..good() }, "tls.client_key_pem"),
            (TlsText { client_key_pem: Some(&other_key), ..good() }, "tls.client_key_pem"),
            (TlsText { server_name: Some("not a name!"), ..good() }, "tls.server_name"),
        ] {
            assert_eq!(check(text), Err(field));
        }
        // The key never shows in an error.
        let secret = key_pem.replace("PRIVATE KEY", "PRIVATE KEX");
        let e = TlsSettings::new(endpoint, &TlsText { client_key_pem: Some(&secret), ..good() }, &none)
            .unwrap_err();
        let body: String = key_pem.lines().nth(1).unwrap().to_owned();
        assert!(!hcp_telemetry::error_chain(&e).contains(&body), "{e}");
        assert_eq!(
            crate::convert::fingerprints(&ca_pem),
            vec![hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(ca.der()))]
        );
    }
}
