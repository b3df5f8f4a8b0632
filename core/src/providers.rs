//! Core's side of the provider plugin protocol: the handshake at
//! registration (identity, protocol version, capabilities, readiness), one
//! cached gRPC channel per provider, the classification of provider errors
//! into the taxonomy (and whether a retry can help), and the periodic health
//! probe that keeps `providers.healthy` and the capability flags current.

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

use crate::convert;
use crate::model::{Capabilities, Provider, now};
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
    channels: Arc<Mutex<HashMap<ProviderId, (String, Channel)>>>,
    call_timeout: Duration,
    probe_timeout: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ProviderClients {
    /// Creates an empty cache. `tls` is used for `https://` endpoints (the
    /// CA that signs provider certificates, and core's client certificate).
    pub fn new(
        call_timeout: Duration,
        probe_timeout: Duration,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        Self { channels: Arc::default(), call_timeout, probe_timeout, tls }
    }

    fn endpoint(&self, uri: &str, timeout: Duration) -> Result<Endpoint, ApiError> {
        let bad = || ApiError::invalid_field("endpoint", format!("{uri:?} is not a valid URI"));
        // A unix socket is reached through a connector; the URI here only
        // names the authority HTTP/2 needs.
        let target = if uri.starts_with("unix://") { "http://provider.local" } else { uri };
        let mut e = Endpoint::from_shared(target.to_owned())
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout);
        if uri.starts_with("https://") {
            e = e.tls_config(self.tls.clone().unwrap_or_default()).map_err(|err| {
                ApiError::invalid_field("endpoint", format!("cannot use TLS for {uri}: {err}"))
            })?;
        }
        Ok(e)
    }

    /// A connector for `unix:///path` endpoints, or None for TCP ones.
    fn unix_connector(
        uri: &str,
    ) -> Option<
        impl tower::Service<
            http::Uri,
            Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
            Error = std::io::Error,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    > {
        let path = uri.strip_prefix("unix://")?.to_owned();
        Some(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move { Ok(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
    }

    /// A channel to `uri` that connects on first use.
    fn connect_lazy(&self, uri: &str) -> Result<Channel, ApiError> {
        let endpoint = self.endpoint(uri, self.call_timeout)?;
        Ok(match Self::unix_connector(uri) {
            Some(c) => endpoint.connect_with_connector_lazy(c),
            None => endpoint.connect_lazy(),
        })
    }

    /// A channel to `uri`, connected now (for the handshake).
    async fn connect_now(&self, uri: &str) -> Result<Channel, ApiError> {
        let endpoint = self.endpoint(uri, self.probe_timeout)?;
        match Self::unix_connector(uri) {
            Some(c) => endpoint.connect_with_connector(c).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| unreachable(uri, &e))
    }

    /// Returns the compute client for a provider.
    pub fn compute(&self, provider: &Provider) -> Result<Compute, ApiError> {
        Ok(ComputeClient::new(Metered(self.channel(provider)?)))
    }

    /// A client whose calls may take `at_least` (a stop that waits for the
    /// guest as long as the tenant asked): the shared channel when its call
    /// timeout allows that, else a channel of its own for this job.
    pub fn compute_for(&self, provider: &Provider, at_least: Duration) -> Result<Compute, ApiError> {
        if at_least <= self.call_timeout {
            return self.compute(provider);
        }
        let endpoint = self.endpoint(&provider.endpoint, at_least)?;
        Ok(ComputeClient::new(Metered(match Self::unix_connector(&provider.endpoint) {
            Some(c) => endpoint.connect_with_connector_lazy(c),
            None => endpoint.connect_lazy(),
        })))
    }

    fn channel(&self, provider: &Provider) -> Result<Channel, ApiError> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((endpoint, ch)) = map.get(&provider.id)
            && *endpoint == provider.endpoint
        {
            return Ok(ch.clone());
        }
        let ch = self.connect_lazy(&provider.endpoint)?;
        map.insert(provider.id, (provider.endpoint.clone(), ch.clone()));
        Ok(ch)
    }

    /// Forgets a provider's channel (after removal).
    pub fn forget(&self, id: ProviderId) {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Performs the handshake with an endpoint: it must answer, speak
    /// protocol revision [`hcp_proto::PROVIDER_PROTOCOL_VERSION`] and report
    /// its capabilities.
    /// With `credentials`, the provider is configured before its
    /// capabilities and readiness are read.
    pub async fn handshake(
        &self,
        uri: &str,
        credentials: Option<&std::collections::HashMap<String, String>>,
    ) -> Result<Handshake, ApiError> {
        let channel = self.connect_now(uri).await?;
        let mut identity = IdentityClient::new(channel);
        let unavailable = |what: &str, s: tonic::Status| {
            ApiError::new(
                ErrorCode::ProviderUnavailable,
                format!("provider at {uri} failed {what}: {}", s.message()),
            )
        };
        let info = identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map_err(|s| unavailable("GetPluginInfo", s))?
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
            .map_err(|s| unavailable("GetCapabilities", s))?
            .into_inner();
        let probe = identity.probe(ProbeRequest {}).await.map_err(|s| unavailable("Probe", s))?.into_inner();
        Ok(Handshake {
            info,
            protocol_version: hcp_proto::PROVIDER_PROTOCOL_VERSION.to_owned(),
            capabilities: convert::capabilities_from_proto(&caps),
            ready: probe.ready,
            message: probe.message,
        })
    }

    /// Sends a registered provider its credentials again.
    pub async fn configure(
        &self,
        provider: &Provider,
        credentials: std::collections::HashMap<String, String>,
    ) -> Result<(), CallError> {
        let mut identity = IdentityClient::new(self.channel(provider).map_err(CallError::Channel)?);
        tokio::time::timeout(self.probe_timeout, identity.configure(ConfigureRequest { credentials }))
            .await
            .map_err(|_| CallError::Timeout { method: "Configure" })?
            .map(|_| ())
            .map_err(CallError::Status)
    }

    /// Probes one registered provider: readiness and current capabilities.
    pub async fn probe(&self, provider: &Provider) -> (bool, String, Option<Capabilities>) {
        let channel = match self.channel(provider) {
            Ok(c) => c,
            Err(e) => return (false, e.message, None),
        };
        let mut identity = IdentityClient::new(channel);
        let probe = tokio::time::timeout(self.probe_timeout, identity.probe(ProbeRequest {})).await;
        match probe {
            Err(_) => (false, "probe timed out".to_owned(), None),
            Ok(Err(s)) => (false, format!("probe failed: {}", s.message()), None),
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
}

/// Most hosts recorded per provider.
const MAX_HOSTS: usize = 4096;

fn unreachable(uri: &str, e: &tonic::transport::Error) -> ApiError {
    use std::error::Error;
    let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
    ApiError::new(ErrorCode::ProviderUnavailable, format!("cannot connect to provider at {uri}: {e}{cause}"))
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
                Err(e) => message = format!("cannot configure: {}", hcp_telemetry::error_chain(&e)),
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
/// `/hcp.provider.v1.Compute/StartVm`).
#[derive(Clone, Debug)]
pub struct Metered(Channel);

impl tower::Service<http::Request<tonic::body::Body>> for Metered {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
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
