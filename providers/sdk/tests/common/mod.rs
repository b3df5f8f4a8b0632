//! What the serving tests share: certificates made at run time with
//! rcgen, a directory for the server's files removed when the test ends
//! (passed or not), a provider served in-process on an ephemeral port, and
//! clients that call it over new connections or read the certificate it
//! presents.

#![allow(dead_code, unreachable_pub)]

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hcp_provider_sdk::kit::ConfigError;
use hcp_provider_sdk::kit::config::{ProviderConfig, ServerConfig};
use hcp_provider_sdk::pb::identity_client::IdentityClient;
use hcp_provider_sdk::{
    Provider, ProviderError, ProviderInfo, ServeConfig, ServeError, ServerTls, TlsFiles, pb,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub type BoxError = Box<dyn Error + Send + Sync>;

/// How long a condition may take to come true; generous, because the
/// machine is shared. Nothing is asserted about how long it took.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The watcher's interval in these tests: the shortest allowed.
pub const RELOAD: Duration = Duration::from_secs(1);

/// A directory for one test's files, removed when dropped (also when the
/// test fails: certificates are no evidence worth keeping).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("hcp-sdk-serving-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made for the test.
pub struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key, in PEM, and the certificate's DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    /// A new key and a certificate for it naming `names`.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.0).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// A server certificate for `localhost`.
    pub fn server(&self) -> Leaf {
        self.leaf(&["localhost", "127.0.0.1"])
    }
}

impl Leaf {
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    pub fn fingerprint(&self) -> String {
        hcp_tls::format_fingerprint(&hcp_tls::fingerprint_of(&self.der))
    }
}

/// The server's files in `dir`: `server.pem`, `server.key` and, with
/// client authentication, `clients.pem`.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl Files {
    pub fn new(dir: &TempDir) -> Self {
        Self { cert: dir.join("server.pem"), key: dir.join("server.key"), client_ca: dir.join("clients.pem") }
    }

    /// Writes the certificate, then the key, as a plain copy would: the
    /// watcher may see the new certificate with the old key in between.
    pub fn install(&self, leaf: &Leaf) {
        std::fs::write(&self.cert, &leaf.cert_pem).unwrap();
        std::fs::write(&self.key, &leaf.key_pem).unwrap();
    }

    pub fn files(&self, client_auth: bool) -> TlsFiles {
        TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: client_auth.then(|| self.client_ca.clone()),
            reload_every: RELOAD,
        }
    }

    pub fn tls(&self, client_auth: bool) -> ServerTls {
        ServerTls::Files(self.files(client_auth))
    }
}

/// A provider answering Identity; nothing else is called.
pub struct Quiet;

#[hcp_provider_sdk::async_trait]
impl Provider for Quiet {
    fn info(&self) -> ProviderInfo {
        ProviderInfo::new("serving.test", "0", "none")
    }
    async fn capabilities(&self) -> Result<pb::Capabilities, ProviderError> {
        Ok(pb::Capabilities::default())
    }
    async fn create_vm(&self, _: pb::CreateVmRequest) -> Result<pb::VmInfo, ProviderError> {
        Err(unsupported())
    }
    async fn get_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> {
        Err(unsupported())
    }
    async fn list_vms(&self, _: pb::ListVmsRequest) -> Result<pb::ListVmsResponse, ProviderError> {
        Err(unsupported())
    }
    async fn start_vm(&self, _: &str) -> Result<pb::VmInfo, ProviderError> {
        Err(unsupported())
    }
    async fn stop_vm(&self, _: pb::StopVmRequest) -> Result<pb::VmInfo, ProviderError> {
        Err(unsupported())
    }
    async fn reboot_vm(&self, _: pb::RebootVmRequest) -> Result<pb::VmInfo, ProviderError> {
        Err(unsupported())
    }
    async fn delete_vm(&self, _: &str) -> Result<bool, ProviderError> {
        Err(unsupported())
    }
    async fn get_console(&self, _: pb::GetConsoleRequest) -> Result<pb::ConsoleEndpoint, ProviderError> {
        Err(unsupported())
    }
}

pub fn unsupported() -> ProviderError {
    ProviderError::new(hcp_provider_sdk::ErrorKind::Unsupported, "not in this test")
}

/// A provider server running in this process; stopped when dropped.
pub struct Server {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Server {
    /// Serves [`Quiet`] with `config` and waits until it listens; the
    /// serve error when it stops before.
    pub async fn start(config: ServeConfig) -> Result<Self, ServeError> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(hcp_provider_sdk::serve(
            Quiet,
            config,
            async move {
                let _ = stopped.await;
            },
            move |addr| {
                let _ = ready_tx.send(addr);
            },
        ));
        match ready_rx.await {
            Ok(addr) => Ok(Self { addr, stop: Some(stop), task }),
            Err(_) => {
                Err(task.await.expect("the server task panicked").expect_err("stopped without an error"))
            }
        }
    }

    pub async fn tls(tls: ServerTls) -> Self {
        Self::start(ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(tls),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A channel over a new connection (so a new handshake) trusting `trust`,
/// with a client certificate when given one.
pub async fn connect(url: &str, trust: &str, client: Option<&Leaf>) -> Result<Channel, BoxError> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trust)).domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(client.identity());
    }
    Ok(Endpoint::from_shared(url.to_owned())?.tls_config(tls)?.connect().await?)
}

/// One call on `channel`.
pub async fn call(channel: Channel) -> Result<(), BoxError> {
    let info = IdentityClient::new(channel).get_plugin_info(pb::GetPluginInfoRequest {}).await?;
    assert_eq!(info.into_inner().name, "serving.test");
    Ok(())
}

/// One call on a connection of its own.
pub async fn call_fresh(url: &str, trust: &str, client: Option<&Leaf>) -> Result<(), BoxError> {
    call(connect(url, trust, client).await?).await
}

/// The certificate the server presents to a new connection, read from a
/// TLS handshake of our own.
pub async fn peer_certificate(addr: &str, trust: &str) -> Result<Vec<u8>, BoxError> {
    let config = hcp_tls::client_config(&hcp_tls::Trust::Ca(trust.as_bytes().to_vec()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = connector.connect(name, tcp).await?;
    let certs = tls.get_ref().1.peer_certificates().ok_or("the server sent no certificate")?;
    Ok(certs.first().ok_or("the server sent an empty chain")?.to_vec())
}

/// Polls `check` until it says true, failing after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}");
        // The poll interval of a deadline loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A provider configuration with a `[server]` table, as the kit loads it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitConfig {
    pub listen: std::net::SocketAddr,
    #[serde(default)]
    pub server: ServerConfig,
}

impl ProviderConfig for KitConfig {
    fn listen(&self) -> std::net::SocketAddr {
        self.listen
    }
    fn set_listen(&mut self, listen: std::net::SocketAddr) {
        self.listen = listen;
    }
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()
    }
    fn server(&self) -> Option<&ServerConfig> {
        Some(&self.server)
    }
}
