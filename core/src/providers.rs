//! Core's side of the provider plugin protocol: the handshake at
//! registration (identity, protocol version, capabilities, readiness), one
//! cached gRPC channel per provider, the classification of provider errors
//! into the taxonomy (and whether a retry can help), and the periodic health
//! probe that keeps `providers.healthy` and the capability flags current.
//! Each provider's channel has the trust registered for it (`trust`); its
//! credentials are sent only over a channel that keeps them secret.

pub mod trust;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::ids::ProviderId;
use hcp_proto::provider::compute_client::ComputeClient;
use hcp_proto::provider::identity_client::IdentityClient;
use hcp_proto::provider::{
    ConfigureRequest, GetCapabilitiesRequest, GetPluginInfoRequest, PluginInfo, ProbeRequest,
};
use tonic::transport::{Channel, Endpoint};

use trust::{TlsConnector, TlsDefaults, TlsFailure, TlsSettings, TlsText};

use crate::convert;
use crate::model::{Capabilities, Provider, ProviderTls, ProviderTransport, now};
use crate::secrets::SecretBox;
use crate::store::Store;

/// What the handshake learned from a provider.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Identity.
    pub info: PluginInfo,
    /// Protocol revision chosen.
    pub protocol_version: String,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// Readiness.
    pub ready: bool,
    /// Probe message.
    pub message: String,
}

/// A failed provider call, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderCallError {
    /// Taxonomy code.
    pub code: ErrorCode,
    /// Whether running the call again may succeed.
    pub retryable: bool,
    /// What the provider said.
    pub message: String,
}

impl ProviderCallError {
    /// Classifies a status returned by a provider (or by the transport).
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        let (code, retryable) = match status.code() {
            Code::NotFound => (ErrorCode::NotFound, false),
            Code::FailedPrecondition => (ErrorCode::Conflict, false),
            Code::AlreadyExists => (ErrorCode::Conflict, false),
            Code::InvalidArgument | Code::OutOfRange => (ErrorCode::InvalidArgument, false),
            Code::Unimplemented => (ErrorCode::FeatureNotSupported, false),
            Code::Unavailable | Code::Cancelled => (ErrorCode::ProviderUnavailable, true),
            Code::DeadlineExceeded => (ErrorCode::DeadlineExceeded, true),
            Code::Aborted | Code::ResourceExhausted => (ErrorCode::ProviderError, true),
            Code::Unauthenticated | Code::PermissionDenied => (ErrorCode::ProviderError, false),
            // A status that carries a source was made on this side from a
            // transport failure (the provider died or reset the connection
            // mid-call), not sent by the provider: the call may not have
            // happened or may have half happened, which the protocol's
            // idempotency makes safe to repeat.
            Code::Unknown | Code::Internal if std::error::Error::source(status).is_some() => {
                (ErrorCode::ProviderUnavailable, true)
            }
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => (ErrorCode::ProviderError, false),
        };
        // The provider may override the default with ErrorInfo metadata.
        use tonic_types::StatusExt;
        let retryable = status
            .get_error_details()
            .error_info()
            .and_then(|i| i.metadata.get("retryable").map(|v| v == "true"))
            .unwrap_or(retryable);
        Self { code, retryable, message: status.message().to_owned() }
    }
}

/// Cached channels to providers.
#[derive(Clone, Default)]
pub struct ProviderClients {
    channels: Arc<Mutex<HashMap<ProviderId, Cached>>>,
    call_timeout: Duration,
    probe_timeout: Duration,
    tls: Arc<TlsDefaults>,
    secrets: Option<SecretBox>,
}

/// A provider's channel, with the endpoint and trust it was opened for
/// (should the row say otherwise, a new channel is opened).
struct Cached {
    endpoint: String,
    tls: ProviderTls,
    channel: Channel,
    connector: Option<TlsConnector>,
}

/// Where and how to reach a provider: its endpoint and, for `https://`,
/// its checked trust.
#[derive(Debug, Clone)]
pub struct Target {
    endpoint: String,
    tls: Option<Arc<TlsSettings>>,
}

impl Target {
    /// `endpoint`, with `tls` for an `https://` one.
    pub fn new(endpoint: &str, tls: Option<TlsSettings>) -> Self {
        Self { endpoint: endpoint.to_owned(), tls: tls.map(Arc::new) }
    }
}

/// How a channel is opened: the endpoint tonic is given (with timeouts),
/// and the connector that makes its connections when it is not plain TCP.
struct Plan {
    endpoint: Endpoint,
    unix: Option<String>,
    tls: Option<TlsConnector>,
}

impl Plan {
    fn lazy(self) -> Channel {
        match (self.unix, self.tls) {
            (Some(path), _) => self.endpoint.connect_with_connector_lazy(unix_connector(path)),
            (None, Some(tls)) => self.endpoint.connect_with_connector_lazy(tls),
            (None, None) => self.endpoint.connect_lazy(),
        }
    }

    async fn now(&self) -> Result<Channel, tonic::transport::Error> {
        match (&self.unix, &self.tls) {
            (Some(path), _) => self.endpoint.connect_with_connector(unix_connector(path.clone())).await,
            (None, Some(tls)) => self.endpoint.connect_with_connector(tls.clone()).await,
            (None, None) => self.endpoint.connect().await,
        }
    }
}

/// A connector for a unix socket at `path`.
fn unix_connector(
    path: String,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { Ok(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    })
}

impl ProviderClients {
    /// Creates an empty cache. `tls` is core's configured trust for
    /// `https://` providers, used for what a registration does not set.
    pub fn new(call_timeout: Duration, probe_timeout: Duration, tls: TlsDefaults) -> Self {
        Self { channels: Arc::default(), call_timeout, probe_timeout, tls: Arc::new(tls), secrets: None }
    }

    /// Opens providers' sealed TLS client keys with `secrets`.
    pub fn with_secrets(mut self, secrets: Option<SecretBox>) -> Self {
        self.secrets = secrets;
        self
    }

    /// Core's configured trust for `https://` providers.
    pub fn tls_defaults(&self) -> &TlsDefaults {
        &self.tls
    }

    /// How to reach a registered provider (its client key opened).
    fn target(&self, p: &Provider) -> Result<Target, ApiError> {
        if ProviderTransport::of(&p.endpoint) != Some(ProviderTransport::Tls) {
            return Ok(Target::new(&p.endpoint, None));
        }
        let unusable = |e: &dyn std::error::Error| {
            tracing::warn!(
                provider = %p.name,
                error = %hcp_telemetry::error_chain(e),
                "cannot use the provider's TLS settings"
            );
            ApiError::new(
                ErrorCode::ProviderUnavailable,
                format!(
                    "the TLS settings of provider {} cannot be used: {}",
                    p.name,
                    hcp_telemetry::error_chain(e)
                ),
            )
        };
        let key = match &p.tls.client_key {
            Some(sealed) => {
                let secrets = self.secrets.as_ref().ok_or_else(|| unusable(&CallError::NoSecretsKey))?;
                let pem = secrets.open_bytes(p.id.0.as_bytes(), &sealed.0).map_err(|e| unusable(&e))?;
                Some(String::from_utf8(pem).map_err(|e| unusable(&e))?)
            }
            None => None,
        };
        let text = TlsText {
            ca_pem: p.tls.ca_pem.as_deref(),
            client_cert_pem: p.tls.client_cert_pem.as_deref(),
            client_key_pem: key.as_deref(),
            server_name: p.tls.server_name.as_deref(),
        };
        let settings = TlsSettings::new(&p.endpoint, &text, &self.tls).map_err(|e| unusable(&e))?;
        Ok(Target::new(&p.endpoint, Some(settings)))
    }

    fn plan(&self, target: &Target, timeout: Duration) -> Result<Plan, ApiError> {
        let uri = target.endpoint.as_str();
        let bad = || ApiError::invalid_field("endpoint", format!("{uri:?} is not a valid URI"));
        let (unix, tls) = match (uri.strip_prefix("unix://"), &target.tls) {
            (Some(path), _) => (Some(path.to_owned()), None),
            (None, Some(settings)) => (None, Some(TlsConnector::new(uri, settings.clone()).ok_or_else(bad)?)),
            (None, None) if uri.starts_with("https://") => {
                return Err(ApiError::invalid_field(
                    "tls",
                    format!("{uri} is https:// and has no TLS settings"),
                ));
            }
            (None, None) => (None, None),
        };
        // A unix socket or TLS is reached through a connector; the URI tonic
        // sees then only names the authority HTTP/2 needs.
        let target_uri = match (&unix, &tls) {
            (Some(_), _) => "http://provider.local".to_owned(),
            (None, Some(_)) => format!("http://{}", &uri["https://".len()..]),
            (None, None) => uri.to_owned(),
        };
        let endpoint = Endpoint::from_shared(target_uri)
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout);
        Ok(Plan { endpoint, unix, tls })
    }

    /// Returns the compute client for a provider.
    pub fn compute(&self, provider: &Provider) -> Result<Compute, ApiError> {
        Ok(ComputeClient::new(Metered(self.channel(provider)?, self.call_timeout)))
    }

    /// A client whose calls may take `at_least` (a stop that waits for the
    /// guest as long as the tenant asked): the shared channel when its call
    /// timeout allows that, else a channel of its own for this job.
    pub fn compute_for(&self, provider: &Provider, at_least: Duration) -> Result<Compute, ApiError> {
        if at_least <= self.call_timeout {
            return self.compute(provider);
        }
        let target = self.target(provider)?;
        Ok(ComputeClient::new(Metered(self.plan(&target, at_least)?.lazy(), at_least)))
    }

    fn channel(&self, provider: &Provider) -> Result<Channel, ApiError> {
        Ok(self.cached(provider)?.0)
    }

    /// The provider's channel and, for TLS, its connector (whose watch
    /// tells why connections fail).
    fn cached(&self, provider: &Provider) -> Result<(Channel, Option<TlsConnector>), ApiError> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&provider.id)
            && c.endpoint == provider.endpoint
            && c.tls == provider.tls
        {
            return Ok((c.channel.clone(), c.connector.clone()));
        }
        let plan = self.plan(&self.target(provider)?, self.call_timeout)?;
        let connector = plan.tls.clone();
        let channel = plan.lazy();
        map.insert(
            provider.id,
            Cached {
                endpoint: provider.endpoint.clone(),
                tls: provider.tls.clone(),
                channel: channel.clone(),
                connector: connector.clone(),
            },
        );
        Ok((channel, connector))
    }

    /// Forgets a provider's channel (after removal).
    pub fn forget(&self, id: ProviderId) {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Performs the handshake with an endpoint: it must answer, speak
    /// protocol revision [`hcp_proto::PROVIDER_PROTOCOL_VERSION`] and report
    /// its capabilities.
    /// With `credentials`, the provider is configured before its
    /// capabilities and readiness are read; the caller has checked that the
    /// channel may carry them. A TLS failure is INVALID_ARGUMENT naming the
    /// registration field to fix and the endpoint.
    pub async fn handshake(
        &self,
        target: &Target,
        credentials: Option<&std::collections::HashMap<String, String>>,
    ) -> Result<Handshake, ApiError> {
        let uri = target.endpoint.as_str();
        let plan = self.plan(target, self.probe_timeout)?;
        let tls = plan.tls.clone();
        let channel = plan
            .now()
            .await
            .map_err(|e| tls_failure(uri, tls.as_ref(), &e).unwrap_or_else(|| unreachable(uri, &e)))?;
        let mut identity = IdentityClient::new(channel);
        let failed = |what: &str, s: tonic::Status| {
            tls_failure(uri, tls.as_ref(), &s).unwrap_or_else(|| {
                ApiError::new(
                    ErrorCode::ProviderUnavailable,
                    format!("provider at {uri} failed {what}: {}", status_text(&s)),
                )
            })
        };
        let info = identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map_err(|s| failed("GetPluginInfo", s))?
            .into_inner();
        if !info.protocol_versions.iter().any(|v| v == hcp_proto::PROVIDER_PROTOCOL_VERSION) {
            return Err(ApiError::invalid_field(
                "endpoint",
                format!(
                    "provider {} speaks protocol version(s) [{}]; this core speaks {}",
                    info.name,
                    info.protocol_versions.join(", "),
                    hcp_proto::PROVIDER_PROTOCOL_VERSION
                ),
            ));
        }
        if let Some(creds) = credentials {
            identity.configure(ConfigureRequest { credentials: creds.clone() }).await.map_err(|s| {
                ApiError::invalid_field(
                    "credentials",
                    format!("the provider refused its credentials: {}", s.message()),
                )
            })?;
        }
        let caps = identity
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .map_err(|s| failed("GetCapabilities", s))?
            .into_inner();
        let probe = identity.probe(ProbeRequest {}).await.map_err(|s| failed("Probe", s))?.into_inner();
        Ok(Handshake {
            info,
            protocol_version: hcp_proto::PROVIDER_PROTOCOL_VERSION.to_owned(),
            capabilities: convert::capabilities_from_proto(&caps),
            ready: probe.ready,
            message: probe.message,
        })
    }

    /// Sends a registered provider its credentials again, when its channel
    /// may carry them: never in clear to another host unless the operator
    /// registered it with `allow_plaintext`.
    pub async fn configure(
        &self,
        provider: &Provider,
        credentials: std::collections::HashMap<String, String>,
    ) -> Result<(), CallError> {
        if !provider.may_receive_secrets() {
            return Err(CallError::Plaintext { endpoint: provider.endpoint.clone() });
        }
        let mut identity = IdentityClient::new(self.channel(provider).map_err(CallError::Channel)?);
        tokio::time::timeout(self.probe_timeout, identity.configure(ConfigureRequest { credentials }))
            .await
            .map_err(|_| CallError::Timeout { method: "Configure" })?
            .map(|_| ())
            .map_err(CallError::Status)
    }

    /// Probes one registered provider: readiness and current capabilities.
    pub async fn probe(&self, provider: &Provider) -> (bool, String, Option<Capabilities>) {
        let (channel, tls) = match self.cached(provider) {
            Ok(c) => c,
            Err(e) => return (false, e.message, None),
        };
        let mut identity = IdentityClient::new(channel);
        let probe = tokio::time::timeout(self.probe_timeout, identity.probe(ProbeRequest {})).await;
        match probe {
            Err(_) => (false, "probe timed out".to_owned(), None),
            Ok(Err(s)) => {
                let why = match tls_failure(&provider.endpoint, tls.as_ref(), &s) {
                    Some(e) => e.message,
                    None => status_text(&s),
                };
                (false, format!("probe failed: {why}"), None)
            }
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.needs_configuration {
                    return (false, format!("needs configuration: {}", r.message), None);
                }
                let caps = tokio::time::timeout(
                    self.probe_timeout,
                    identity.get_capabilities(GetCapabilitiesRequest {}),
                )
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|c| convert::capabilities_from_proto(&c.into_inner()));
                (r.ready, r.message, caps)
            }
        }
    }
}

impl ProviderClients {
    /// Asks a provider for its hosts and records them. A provider that
    /// does not implement ListHosts has none to tell about (Ok).
    pub async fn refresh_hosts(&self, store: &Store, provider: &Provider) -> Result<(), CallError> {
        let mut compute = self.compute(provider).map_err(CallError::Channel)?;
        let answer = tokio::time::timeout(
            self.probe_timeout,
            compute.list_hosts(hcp_proto::provider::ListHostsRequest {}),
        )
        .await
        .map_err(|_| CallError::Timeout { method: "ListHosts" })?;
        let hosts = match answer {
            Ok(r) => r.into_inner().hosts,
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(()),
            Err(status) => return Err(CallError::Failed { method: "ListHosts", status }),
        };
        let mut reports = Vec::with_capacity(hosts.len().min(MAX_HOSTS));
        for h in hosts.into_iter().take(MAX_HOSTS) {
            if h.name.is_empty() || h.name.len() > 255 {
                tracing::warn!(provider = %provider.name, "ignoring a host with an empty or overlong name");
                continue;
            }
            let state = match hcp_proto::provider::HostState::try_from(h.state) {
                Ok(hcp_proto::provider::HostState::HostUp) => crate::model::HostState::Up,
                Ok(hcp_proto::provider::HostState::HostMaintenance) => crate::model::HostState::Maintenance,
                _ => crate::model::HostState::Down,
            };
            reports.push(crate::store::HostReport {
                name: h.name,
                vcpus: h.vcpus,
                memory_mib: h.memory_mib,
                state,
            });
        }
        Ok(store.record_hosts(provider.id, &reports, now()).await?)
    }
}

/// Why a call to a provider outside a job (its hosts, its credentials)
/// failed. Such calls are retried by the next probe or pass.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider cannot be reached.
    #[error(transparent)]
    Channel(ApiError),
    /// The call took longer than the probe timeout.
    #[error("{method} timed out")]
    Timeout {
        /// The protocol method.
        method: &'static str,
    },
    /// The provider refused the call.
    #[error("{method} failed: {}", status.message())]
    Failed {
        /// The protocol method.
        method: &'static str,
        /// Its answer.
        status: tonic::Status,
    },
    /// The provider refused its credentials (its message).
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// Credentials are stored, but this process has no key to open them.
    #[error("no secrets key configured")]
    NoSecretsKey,
    /// The provider asks for credentials HCP does not have.
    #[error("no stored credentials")]
    NoCredentials,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The stored credentials do not open.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// The provider's channel is plaintext TCP to another host, and the
    /// operator did not allow that (a row stored before core refused such
    /// endpoints).
    #[error(
        "refusing to send credentials in clear to {endpoint} (plaintext TCP to a host that is not loopback); register the provider again with https:// (tls), a unix:// socket, or allow_plaintext"
    )]
    Plaintext {
        /// The provider's endpoint.
        endpoint: String,
    },
}

/// Most hosts recorded per provider.
const MAX_HOSTS: usize = 4096;

fn unreachable(uri: &str, e: &tonic::transport::Error) -> ApiError {
    ApiError::new(
        ErrorCode::ProviderUnavailable,
        format!("cannot connect to provider at {uri}: {}", hcp_telemetry::error_chain(e)),
    )
}

/// A status's message with the chain of its source, when it was made on
/// this side from a transport failure ("transport error" alone says
/// nothing).
fn status_text(s: &tonic::Status) -> String {
    match std::error::Error::source(s) {
        Some(cause) => format!("{}: {}", s.message(), hcp_telemetry::error_chain(cause)),
        None => s.message().to_owned(),
    }
}

/// The TLS failure behind `err` on a connection `connector` made, as an
/// error naming the endpoint, the registration field to fix and what to
/// do; None when TLS is not to blame.
fn tls_failure(
    uri: &str,
    connector: Option<&TlsConnector>,
    err: &(dyn std::error::Error + 'static),
) -> Option<ApiError> {
    let connector = connector?;
    let tls = connector.watch().last().or_else(|| trust::rustls_in(err))?;
    let failure = TlsFailure::of(tls, connector.presents_certificate());
    Some(ApiError::invalid_field(
        failure.field(),
        format!(
            "TLS to the provider at {uri} failed: {}; {}",
            hcp_telemetry::error_chain(&failure),
            failure.hint()
        ),
    ))
}

/// Probes every provider once and stores the results. Logs health changes.
/// A provider that lost its credentials (it says it needs configuration) is
/// sent them again, and counts as healthy once it is ready.
pub async fn probe_all(
    store: &Store,
    clients: &ProviderClients,
    secrets: Option<&crate::secrets::SecretBox>,
) {
    let providers = match store.list_providers().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list providers to probe");
            return;
        }
    };
    let probes = providers.iter().map(|p| async move {
        let (mut healthy, mut message, mut caps) = clients.probe(p).await;
        if !healthy && message.starts_with("needs configuration") && p.has_credentials {
            match reconfigure(store, clients, secrets, p).await {
                Ok(()) => (healthy, message, caps) = clients.probe(p).await,
                Err(e) => {
                    message = format!("cannot configure: {}", hcp_telemetry::error_chain(&e));
                    // Once per new reason, not at every probe.
                    if message != p.health_message {
                        tracing::warn!(
                            provider = %p.name,
                            endpoint = %p.endpoint,
                            %message,
                            "provider not configured"
                        );
                    }
                }
            }
        }
        (p, healthy, message, caps)
    });
    for (p, healthy, message, caps) in futures::future::join_all(probes).await {
        if healthy != p.healthy {
            tracing::info!(provider = %p.name, healthy, %message, "provider health changed");
        }
        if let Err(e) = store.update_provider_health(p.id, healthy, &message, caps.as_ref(), now()).await {
            tracing::warn!(provider = %p.name, error = %e, "cannot store probe result");
        }
        if healthy && let Err(e) = clients.refresh_hosts(store, p).await {
            tracing::warn!(provider = %p.name, error = %hcp_telemetry::error_chain(&e), "cannot refresh hosts");
        }
    }
}

async fn reconfigure(
    store: &Store,
    clients: &ProviderClients,
    secrets: Option<&crate::secrets::SecretBox>,
    p: &Provider,
) -> Result<(), CallError> {
    // Refused before the credentials are even opened.
    if !p.may_receive_secrets() {
        return Err(CallError::Plaintext { endpoint: p.endpoint.clone() });
    }
    let secrets = secrets.ok_or(CallError::NoSecretsKey)?;
    let sealed = store.provider_credentials(p.id).await?.ok_or(CallError::NoCredentials)?;
    let creds = secrets.open(p.id.0.as_bytes(), &sealed)?;
    clients.configure(p, creds).await?;
    tracing::info!(provider = %p.name, "credentials sent again");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: tonic::Status) -> (ErrorCode, bool) {
        let e = ProviderCallError::from_status(&status);
        (e.code, e.retryable)
    }

    fn provider(endpoint: &str, allow_plaintext: bool) -> Provider {
        Provider {
            id: ProviderId::new(),
            name: "p".into(),
            zone: "z".into(),
            endpoint: endpoint.into(),
            plugin_name: String::new(),
            plugin_version: String::new(),
            hypervisor: "sim".into(),
            protocol_version: "1".into(),
            capabilities: Capabilities::default(),
            healthy: false,
            health_message: String::new(),
            last_probe_at: None,
            created_at: now(),
            has_credentials: true,
            tls: ProviderTls::default(),
            allow_plaintext,
        }
    }

    /// A provider stored before plaintext endpoints were refused is sent no
    /// credentials, and nothing is dialled to find that out (TEST-NET-1,
    /// which would not answer).
    #[tokio::test]
    async fn credentials_are_never_sent_in_clear_to_another_host() {
        let clients = ProviderClients::default();
        let creds = HashMap::from([("token".to_owned(), "hunter2".to_owned())]);
        let stored = provider("http://192.0.2.10:50061", false);
        assert!(!stored.may_receive_secrets());
        let err = clients.configure(&stored, creds).await.unwrap_err();
        assert!(matches!(&err, CallError::Plaintext { endpoint } if endpoint == "http://192.0.2.10:50061"));
        let shown = err.to_string();
        assert!(shown.contains("http://192.0.2.10:50061") && shown.contains("https://"), "{shown}");
        assert!(clients.channels.lock().unwrap().is_empty(), "no channel was opened");
        // The operator's override, loopback, unix sockets and TLS may.
        for (endpoint, allowed) in [
            ("http://192.0.2.10:50061", true),
            ("http://127.0.0.1:50061", false),
            ("http://[::1]:50061", false),
            ("unix:///run/hcp/p.sock", false),
            ("https://192.0.2.10:50061", false),
        ] {
            assert!(provider(endpoint, allowed).may_receive_secrets(), "{endpoint}");
        }
    }

    #[test]
    fn call_deadlines_are_sent_as_grpc_timeouts() {
        assert_eq!(grpc_timeout(Duration::from_secs(300)), "300000m");
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::from_secs(u64::MAX)), "99999999S");
    }

    #[test]
    fn provider_statuses_are_classified() {
        use tonic::Code;
        for (status, want) in [
            (tonic::Status::not_found("x"), (ErrorCode::NotFound, false)),
            (tonic::Status::unavailable("x"), (ErrorCode::ProviderUnavailable, true)),
            (tonic::Status::aborted("locked"), (ErrorCode::ProviderError, true)),
            // Sent by the provider: its own failure, not retried.
            (tonic::Status::new(Code::Unknown, "boom"), (ErrorCode::ProviderError, false)),
            (tonic::Status::internal("boom"), (ErrorCode::ProviderError, false)),
            // Made here from a dead connection: retried.
            (
                tonic::Status::from_error(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                (ErrorCode::ProviderUnavailable, true),
            ),
        ] {
            let shown = format!("{status:?}");
            assert_eq!(check(status), want, "{shown}");
        }
    }
}

/// A provider's compute client, its calls counted.
pub type Compute = ComputeClient<Metered>;

/// A channel to a provider that counts its calls:
/// `hcp_provider_calls_total{method,code}` and
/// `hcp_provider_call_duration_seconds{method}` (method as
/// `/hcp.provider.v1.Compute/StartVm`). Every call carries its deadline
/// (`grpc-timeout`, the channel's call timeout unless the request set one),
/// so the provider knows when HCP stops waiting.
#[derive(Clone, Debug)]
pub struct Metered(Channel, Duration);

/// A `grpc-timeout` value: at most 8 digits, in milliseconds, else seconds.
fn grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 100_000_000 { format!("{ms}m") } else { format!("{}S", d.as_secs().min(99_999_999)) }
}

impl tower::Service<http::Request<tonic::body::Body>> for Metered {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if !req.headers().contains_key("grpc-timeout")
            && let Ok(v) = http::HeaderValue::from_str(&grpc_timeout(self.1))
        {
            req.headers_mut().insert("grpc-timeout", v);
        }
        let path = req.uri().path();
        let method = hcp_proto::method_label(path).unwrap_or("other");
        let started = std::time::Instant::now();
        let call = tower::Service::call(&mut self.0, req);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(resp) => hcp_telemetry::metrics::grpc_code_label(resp.headers().get("grpc-status")),
                Err(_) => "Unavailable",
            };
            metrics::counter!("hcp_provider_calls_total", "method" => method, "code" => code).increment(1);
            metrics::histogram!("hcp_provider_call_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}
