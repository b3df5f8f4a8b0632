//! `run`: assembles core from its configuration and serves until shutdown.
//!
//! The gRPC stack, outermost first:
//! 1. [`hcp_telemetry::GrpcTraceLayer`]: one span per call, parented on the caller's W3C
//!    `traceparent`, carrying `trace_id` for every log line beneath it.
//! 2. [`AuthLayer`]: verifies the bearer token (fetching an identity
//!    provider's keys when configured) and stores the principal; health and
//!    reflection are left open for load balancers and tooling.
//! 3. [`crate::admission::AdmissionLayer`]: per-tenant rate limit shared
//!    by all API processes (429), load shedding past the concurrency limit
//!    (503 with a retry time), and the request timeout (504).
//! 4. The service handlers.
//!
//! Background tasks (worker role): the job engine and the provider health
//! prober. On shutdown the server stops accepting, in-flight calls finish,
//! job watchers end, and the engine lets its jobs finish for
//! `jobs.shutdown_grace_seconds`, then hands the rest back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hcp_proto::common::caller_service_server::CallerServiceServer;
use hcp_proto::common::catalog_service_server::CatalogServiceServer;
use hcp_proto::ops::audit_service_server::AuditServiceServer;
use hcp_proto::ops::catalog_admin_service_server::CatalogAdminServiceServer;
use hcp_proto::ops::job_admin_service_server::JobAdminServiceServer;
use hcp_proto::ops::provider_admin_service_server::ProviderAdminServiceServer;
use hcp_proto::ops::quota_admin_service_server::QuotaAdminServiceServer;
use hcp_proto::tenant::job_service_server::JobServiceServer;
use hcp_proto::tenant::key_pair_service_server::KeyPairServiceServer;
use hcp_proto::tenant::quota_service_server::QuotaServiceServer;
use hcp_proto::tenant::vm_service_server::VmServiceServer;
use hcp_proto::tenant::volume_service_server::VolumeServiceServer;
use hcp_proto::tenant::webhook_service_server::WebhookServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::ApiContext;
use crate::api::caller::CallerApi;
use crate::api::catalog::CatalogApi;
use crate::api::ops::OpsApi;
use crate::api::tenant::TenantApi;
use crate::auth::{AuthLayer, Verifier};
use crate::config::Config;
use crate::jobs::{Engine, LocalQueue};
use crate::providers::{ProviderClients, probe_all};
use crate::store::Store;

/// Largest request message core decodes (the gateway accepts JSON bodies
/// of at most 1 MiB, which encode smaller).
const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// Largest header list core accepts on a call, bytes.
const MAX_HEADER_LIST: u32 = 32 * 1024;

/// Core failed to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration value is outside its allowed range.
    #[error("invalid configuration")]
    Config(#[source] crate::config::Invalid),
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(#[from] hcp_telemetry::metrics::MetricsListenError),
    /// The database could not be opened or migrated.
    #[error("cannot open the store at {url}")]
    Store {
        /// The database URL with credentials removed.
        url: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
    /// Token verification keys could not be loaded.
    #[error("cannot load token verification keys")]
    Keys(#[source] crate::auth::KeyError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// Core's TLS files for providers cannot be used.
    #[error("cannot use the providers' TLS settings")]
    ProviderTls(#[source] crate::providers::trust::DefaultsError),
    /// The secrets key could not be loaded.
    #[error("cannot load the secrets key")]
    Secrets(#[source] crate::secrets::SecretsError),
    /// The audit anchor file cannot be appended to.
    #[error("cannot use the audit anchor file")]
    AnchorFile(#[source] crate::audit_chain::AnchorFileError),
    /// The broker's URL is unusable.
    #[error("cannot set up the message broker")]
    Queue(#[source] crate::queue::ConnectError),
    /// The `[egress]` settings cannot be used.
    #[error("cannot use the egress settings")]
    Egress(#[source] crate::egress::PolicyError),
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Where a running core listens.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// gRPC.
    pub grpc: SocketAddr,
    /// `/metrics`, when configured.
    pub metrics: Option<SocketAddr>,
}

/// Runs core until `shutdown` resolves. `ready` is called with the bound
/// addresses once the store is migrated and the server is listening.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(Listening) + Send,
) -> Result<(), StartError> {
    config.validate().map_err(StartError::Config)?;
    let config = Arc::new(config);
    let store = Store::connect(&config.database_url, config.database_max_connections)
        .await
        .map_err(|source| StartError::Store { url: redact(&config.database_url), source })?;
    if config.migrate {
        store
            .migrate()
            .await
            .map_err(|source| StartError::Store { url: redact(&config.database_url), source })?;
    }
    let verifier = Verifier::from_config(&config.auth).map_err(StartError::Keys)?;
    let secret_keys = match &config.secrets.key_file {
        Some(path) => Some(crate::secrets::SecretKeys::from_file(path).map_err(StartError::Secrets)?),
        None => None,
    };
    let secrets = secret_keys.as_ref().map(crate::secrets::SecretBox::new);
    let audit_keys = Arc::new(match &secret_keys {
        Some(keys) => crate::audit_chain::KeyRing::new(keys),
        None => {
            tracing::warn!(
                "no secrets.key_file: audit events are sealed without a key, and verification reports the \
                 chain as unkeyed"
            );
            crate::audit_chain::KeyRing::unkeyed()
        }
    });
    // The sealer (a worker's) exports the chain's head; a file it cannot
    // append to is refused now rather than at the first export.
    let export = crate::audit_chain::HeadExport::new(
        config.audit.anchor_file.clone(),
        Duration::from_secs(config.audit.anchor_interval_seconds),
    );
    if config.roles.worker {
        export.check().map_err(StartError::AnchorFile)?;
    }
    let clients = ProviderClients::new(
        Duration::from_secs(config.providers.call_timeout_seconds),
        Duration::from_secs(config.providers.probe_timeout_seconds),
        crate::providers::trust::TlsDefaults::load(&config.providers).map_err(StartError::ProviderTls)?,
    )
    .with_secrets(secrets.clone());
    // Where tenants' URLs (webhooks) may lead: one policy, checked at
    // registration and at every connection.
    let egress = crate::egress::EgressClient::new(
        crate::egress::EgressPolicy::new(&(&config.egress).into()).map_err(StartError::Egress)?,
        Arc::new(crate::egress::SystemResolver),
    );
    let local = LocalQueue::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    // Background work and open job watchers stop as soon as shutdown
    // begins: the server's graceful stop waits for open streams, so a
    // watcher that waited for the server would hold it for an hour.
    let shutdown = {
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        }
    };
    let mut background = tokio::task::JoinSet::new();

    // Production dispatch: outbox rows published to the broker (NATS
    // JetStream or RabbitMQ). Embedded: the in-process queue wakes this
    // process's workers.
    let broker = crate::queue::connect(&config.queue).await.map_err(StartError::Queue)?;
    let store = store.with_outbox(broker.is_some());
    let events = crate::events::JobEvents::new(
        config.limits.max_job_watchers,
        Duration::from_secs(config.limits.job_watch_fallback_seconds),
        stop_rx.clone(),
        broker.clone(),
    );
    if let Some(broker) = &broker {
        background.spawn(events.clone().relay(broker.clone()));
    }
    let queue: Arc<dyn crate::jobs::JobQueue> = match &broker {
        Some(broker) => {
            let q = crate::queue::BrokerQueue::new(local.notifier());
            background.spawn(crate::queue::run_publisher(
                store.clone(),
                broker.clone(),
                q.publisher_wake(),
                stop_rx.clone(),
            ));
            Arc::new(q)
        }
        None => Arc::new(local.clone()),
    };

    if config.roles.worker {
        let worker_id =
            config.jobs.worker_id.clone().unwrap_or_else(|| format!("worker-{}", uuid::Uuid::now_v7()));
        let engine = Engine::new(
            store.clone(),
            clients.clone(),
            config.jobs.clone(),
            worker_id,
            local.notifier(),
            events.clone(),
            crate::images::ImageWork::new(egress.clone(), config.images.clone()),
        );
        if let Some(broker) = &broker {
            background.spawn(crate::queue::run_consumer(broker.clone(), engine.clone(), stop_rx.clone()));
        }
        background.spawn(engine.run(stop_rx.clone()));
        let reconciler = crate::reconciler::Reconciler::new(
            store.clone(),
            clients.clone(),
            config.reconciler.clone(),
            format!("reconciler-{}", uuid::Uuid::now_v7()),
            crate::moves::Moves::new(store.clone(), queue.clone(), config.jobs.max_attempts),
        );
        background.spawn(reconciler.run(stop_rx.clone()));
        let drainer = crate::drain::Drainer::new(
            store.clone(),
            crate::moves::Moves::new(store.clone(), queue.clone(), config.jobs.max_attempts),
            events.clone(),
            config.drain.clone(),
            format!("drainer-{}", uuid::Uuid::now_v7()),
        );
        background.spawn(drainer.run(stop_rx.clone()));
        // Tenants' webhook deliveries, sent by one process at a time.
        let deliverer = crate::webhooks::Deliverer::new(
            store.clone(),
            egress.clone(),
            secrets.clone(),
            config.webhooks.clone(),
            events.clone(),
            format!("webhooks-{}", uuid::Uuid::now_v7()),
        );
        background.spawn(deliverer.run(stop_rx.clone()));
        // The audit trail's hash chain, extended by one process at a time,
        // which also exports its head.
        background.spawn(crate::audit_chain::run_sealer(
            store.clone(),
            audit_keys.clone(),
            export,
            format!("audit-sealer-{}", uuid::Uuid::now_v7()),
            Duration::from_secs(1),
            stop_rx.clone(),
        ));
        // Expired idempotency keys are removed by workers, hourly.
        let (store_p, mut stop_p) = (store.clone(), stop_rx.clone());
        background.spawn(async move {
            loop {
                if let Err(e) = store_p.purge_idempotency(crate::model::now()).await {
                    tracing::warn!(error = %e, "cannot purge idempotency keys");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = stop_p.changed() => return,
                }
            }
        });
        let (store, clients, mut stop, secrets) =
            (store.clone(), clients.clone(), stop_rx.clone(), secrets.clone());
        let every = Duration::from_secs(config.providers.probe_interval_seconds);
        background.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => probe_all(&store, &clients, secrets.as_ref()).await,
                    _ = stop.changed() => return,
                }
            }
        });
    }

    let (metrics, _metrics_task) = match config.metrics_listen {
        Some(at) => {
            let (addr, serving) =
                hcp_telemetry::metrics::serve(at, Some(crate::metrics::refresher(store.clone()))).await?;
            (Some(addr), Some(serving))
        }
        None => (None, None),
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let ready = move |grpc| ready(Listening { grpc, metrics });

    let result = if config.roles.api {
        let page_key = store
            .shared_key("page-tokens", rand::random())
            .await
            .map_err(|source| StartError::Store { url: redact(&config.database_url), source })?;
        let ctx = ApiContext {
            store: store.clone(),
            clients: clients.clone(),
            queue: queue.clone(),
            config: config.clone(),
            secrets: secrets.clone(),
            audit_keys: audit_keys.clone(),
            pages: crate::api::page::PageTokens::new(page_key),
            events: events.clone(),
            egress: egress.clone(),
        };
        // Tenants' rate-limit buckets are shared by all API processes
        // through the store.
        let admission = crate::admission::AdmissionLayer::new(&config.limits, Arc::new(store.clone()))
            .map_err(StartError::Config)?;
        let tenant = TenantApi::new(ctx.clone());
        let ops = OpsApi::new(ctx.clone());
        let catalog = CatalogApi::new(ctx.clone());
        let key_pairs = crate::api::keypairs::KeyPairApi::new(ctx.clone());
        let webhooks = crate::api::webhooks::WebhookApi::new(ctx.clone(), egress);
        let console = crate::api::console::ConsoleApi::new(ctx);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<VmServiceServer<TenantApi>>().await;
        health.set_serving::<VolumeServiceServer<TenantApi>>().await;
        health.set_serving::<KeyPairServiceServer<crate::api::keypairs::KeyPairApi>>().await;
        health.set_serving::<WebhookServiceServer<crate::api::webhooks::WebhookApi>>().await;
        health.set_serving::<JobServiceServer<TenantApi>>().await;
        health.set_serving::<QuotaServiceServer<TenantApi>>().await;
        health.set_serving::<CatalogServiceServer<CatalogApi>>().await;
        health.set_serving::<CallerServiceServer<CallerApi>>().await;
        health.set_serving::<ProviderAdminServiceServer<OpsApi>>().await;
        health.set_serving::<CatalogAdminServiceServer<OpsApi>>().await;
        health.set_serving::<AuditServiceServer<OpsApi>>().await;
        health.set_serving::<QuotaAdminServiceServer<OpsApi>>().await;
        health.set_serving::<JobAdminServiceServer<OpsApi>>().await;
        health.set_serving::<hcp_proto::ops::vm_admin_service_server::VmAdminServiceServer<OpsApi>>().await;
        health.set_serving::<hcp_proto::ops::usage_service_server::UsageServiceServer<OpsApi>>().await;
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hcp_proto::FILE_DESCRIPTOR_SET);
        for name in hcp_proto::NORTHBOUND_SERVICES {
            reflection = reflection.with_service_name(*name);
        }
        let reflection = reflection
            .with_service_name("grpc.health.v1.Health")
            .build_v1()
            .map_err(StartError::Reflection)?;

        ready(addr);
        tracing::info!(%addr, "core grpc listening");
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            // Bounds on what one call may send: headers (the gateway sends at
            // most 16 KiB) and, per service below, the message.
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .layer(hcp_telemetry::GrpcTraceLayer::new("grpc").with_methods(hcp_proto::method_label))
            .layer(AuthLayer::new(verifier))
            .layer(admission)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(VmServiceServer::new(tenant.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(VolumeServiceServer::new(tenant.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(KeyPairServiceServer::new(key_pairs).max_decoding_message_size(MAX_MESSAGE))
            .add_service(WebhookServiceServer::new(webhooks).max_decoding_message_size(MAX_MESSAGE))
            .add_service(JobServiceServer::new(tenant.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(QuotaServiceServer::new(tenant).max_decoding_message_size(MAX_MESSAGE))
            .add_service(CatalogServiceServer::new(catalog).max_decoding_message_size(MAX_MESSAGE))
            .add_service(CallerServiceServer::new(CallerApi).max_decoding_message_size(MAX_MESSAGE))
            .add_service(ProviderAdminServiceServer::new(ops.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(CatalogAdminServiceServer::new(ops.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(AuditServiceServer::new(ops.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(QuotaAdminServiceServer::new(ops.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(JobAdminServiceServer::new(ops.clone()).max_decoding_message_size(MAX_MESSAGE))
            .add_service(
                hcp_proto::ops::vm_admin_service_server::VmAdminServiceServer::new(ops.clone())
                    .max_decoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                hcp_proto::ops::usage_service_server::UsageServiceServer::new(ops)
                    .max_decoding_message_size(MAX_MESSAGE),
            )
            // Not northbound: only HCP's console proxy (role console.proxy).
            .add_service(hcp_proto::console::console_broker_service_server::ConsoleBrokerServiceServer::new(
                console,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(StartError::Serve)
    } else {
        // A worker-only process still answers health checks.
        let (_health, health_service) = tonic_health::server::health_reporter();
        ready(addr);
        tracing::info!(%addr, "core worker listening (health only)");
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(StartError::Serve)
    };

    let _ = stop_tx.send(true);
    while background.join_next().await.is_some() {}
    store.close().await;
    tracing::info!("core stopped");
    result
}
