//! NATS JetStream as HCP's broker.
//!
//! - Outbox rows go to JetStream with their outbox id as `Nats-Msg-Id`, so a
//!   row sent twice is stored once; a row is confirmed by JetStream's
//!   publish acknowledgement.
//! - Workers pull job messages from a durable work-queue consumer they all
//!   share; a job not due yet is nak'ed with its delay, a message that is
//!   not a job id is terminated.
//! - Job change notifications are core NATS messages on
//!   [`crate::events::SUBJECT`].
//!
//! Against a NATS cluster core is given every node's URL and the streams
//! are replicated ([`Streams`]): JetStream keeps accepting and delivering
//! while a minority of nodes is down, and while it has no quorum the outbox
//! holds the jobs as it does during an outage of a single server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use crate::broker::{Broker, BrokerError, Delivery, Outcome, Settle};
use crate::config::QueueBackend;
use crate::store::{OutboxMessage, SUBJECT_JOBS, SUBJECT_USAGE_PREFIX};

/// Name of the durable consumer all workers share.
pub const WORKER_CONSUMER: &str = "hcp-workers";

/// How long a worker's pull request waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's heartbeat on an idle pull request, by which the client
/// notices a request no server holds any more.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Connects to NATS, to any of `servers` (the client also learns the other
/// nodes of a cluster from the one it reaches, and moves to another when
/// its node goes away). Does not wait for a server: the client keeps trying
/// in the background, so core starts (and accepts requests) during an outage.
pub async fn connect(servers: &[String]) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .name("hcp-core")
        .connect(servers)
        .await
}

/// HCP's JetStream streams as this process sets them up: their names and
/// how many replicas they get.
#[derive(Debug, Clone)]
pub struct Streams {
    prefix: String,
    replicas: Option<usize>,
    /// Whether the replica count was logged (once per process: the
    /// publisher and the consumer both set the streams up, and again after
    /// every reconnect).
    announced: Arc<AtomicBool>,
}

impl Streams {
    /// Streams named `<prefix>_JOBS` and `<prefix>_USAGE` with `replicas`
    /// replicas each; none means 3 on a cluster that can place three, else 1.
    pub fn new(prefix: impl Into<String>, replicas: Option<u8>) -> Self {
        Self { prefix: prefix.into(), replicas: replicas.map(usize::from), announced: Arc::default() }
    }

    /// The job stream's name.
    pub fn jobs_name(&self) -> String {
        format!("{}_JOBS", self.prefix)
    }

    /// The usage stream's name.
    pub fn usage_name(&self) -> String {
        format!("{}_USAGE", self.prefix)
    }
}

/// The replica count used when none is configured and JetStream can place
/// it: a majority survives the loss of any one node.
const AUTO_REPLICAS: usize = 3;

/// Why a stream has the replica count it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// `[queue] stream_replicas` says so.
    Configured,
    /// Not configured, and the cluster placed three replicas.
    ClusterHasThree,
    /// Not configured, and the server is not in a cluster.
    NotClustered,
    /// Not configured, and the cluster refused three replicas with this
    /// JetStream error code (fewer than three JetStream servers online).
    CannotPlaceThree(u64),
    /// Not configured, and the stream already had more than three.
    AlreadyMore,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Configured => f.write_str("configured ([queue] stream_replicas)"),
            Why::ClusterHasThree => {
                f.write_str("not configured; the cluster has at least 3 JetStream servers")
            }
            Why::NotClustered => f.write_str("not configured; the NATS server is not in a cluster"),
            Why::CannotPlaceThree(code) => write!(
                f,
                "not configured; the cluster cannot place 3 replicas (JetStream error {code}: fewer than 3 JetStream servers online)"
            ),
            Why::AlreadyMore => f.write_str("not configured; the stream already had more"),
        }
    }
}

/// Why JetStream could not be used; the caller logs it and tries again.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    /// A stream could not be created, read or given its replicas.
    #[error("cannot set up the {which} stream")]
    Stream {
        /// `jobs` or `usage`.
        which: &'static str,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
    /// `[queue] stream_replicas` asks for replicas a single server cannot
    /// keep.
    #[error("{0} stream replicas need a NATS cluster, and the server is not in one")]
    NotClustered(usize),
}

async fn ensure_streams(
    js: &jetstream::Context,
    streams: &Streams,
) -> Result<jetstream::stream::Stream, QueueError> {
    let (jobs, replicas, why) = ensure_stream(
        js,
        jetstream::stream::Config {
            name: streams.jobs_name(),
            subjects: vec![SUBJECT_JOBS.to_owned()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        streams.replicas,
    )
    .await
    .map_err(|source| QueueError::Stream { which: "jobs", source })?;
    ensure_stream(
        js,
        jetstream::stream::Config {
            name: streams.usage_name(),
            subjects: vec![format!("{SUBJECT_USAGE_PREFIX}>")],
            retention: jetstream::stream::RetentionPolicy::Limits,
            storage: jetstream::stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        streams.replicas,
    )
    .await
    .map_err(|source| QueueError::Stream { which: "usage", source })?;
    if !streams.announced.swap(true, Ordering::Relaxed) {
        tracing::info!(replicas, why = %why, stream = %streams.jobs_name(), "jetstream streams ready");
    }
    Ok(jobs)
}

/// Creates the stream `config` names, or brings an existing one to the
/// wanted replica count (JetStream moves a stream to more or fewer
/// replicas in place, and its consumers, which inherit the stream's count,
/// with it). Returns the stream, its replica count and why.
///
/// With no count configured: 1 when the server is not in a cluster (its
/// INFO names no cluster), else 3 if JetStream can place them. JetStream
/// places a stream's replicas on distinct JetStream servers that are
/// online, and refuses three in a cluster with fewer (10005 no suitable
/// peers, 10023 insufficient resources); then the stream gets 1. A stream
/// is never moved below the count it has unless configured so.
async fn ensure_stream(
    js: &jetstream::Context,
    mut config: jetstream::stream::Config,
    configured: Option<usize>,
) -> Result<(jetstream::stream::Stream, usize, Why), async_nats::Error> {
    let existing = match js.get_stream(&config.name).await {
        Ok(stream) => Some(stream),
        Err(e) if is_not_found(&e) => None,
        Err(e) => return Err(e.into()),
    };
    // JetStream answered, so the client is connected and holds the INFO of
    // its server. A single server would take a change to more replicas
    // without replicating anything, so it is never asked for one.
    let clustered = js.client().server_info().cluster.is_some();
    let (want, why) = match configured {
        Some(n) if n > 1 && !clustered => return Err(Box::new(QueueError::NotClustered(n))),
        Some(n) => (n, Why::Configured),
        None if clustered => (AUTO_REPLICAS, Why::ClusterHasThree),
        None => (1, Why::NotClustered),
    };
    config.num_replicas = want;
    let Some(stream) = existing else {
        return match js.create_stream(config.clone()).await {
            Ok(stream) => {
                let have = stream.cached_info().config.num_replicas.max(1);
                Ok((stream, have, why))
            }
            Err(e) => match cannot_place(&e) {
                Some(code) if configured.is_none() => {
                    config.num_replicas = 1;
                    Ok((js.create_stream(config).await?, 1, Why::CannotPlaceThree(code)))
                }
                _ => Err(e.into()),
            },
        };
    };
    let have = stream.cached_info().config.num_replicas.max(1);
    if have == want || (configured.is_none() && have > want) {
        return Ok((stream, have, if have > want { Why::AlreadyMore } else { why }));
    }
    match js.update_stream(&config).await {
        Ok(info) => {
            tracing::info!(stream = %config.name, from = have, to = want, "stream replicas changed");
            Ok((js.get_stream(&config.name).await?, info.config.num_replicas.max(1), why))
        }
        Err(e) => match cannot_place(&e) {
            Some(code) if configured.is_none() => Ok((stream, have, Why::CannotPlaceThree(code))),
            _ => Err(e.into()),
        },
    }
}

/// The JetStream error code of a refusal to place the replicas asked for.
fn cannot_place(e: &jetstream::context::CreateStreamError) -> Option<u64> {
    use jetstream::ErrorCode;
    match e.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(err) => {
            let code = err.error_code();
            [
                ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
                ErrorCode::CLUSTER_NO_PEERS,
                ErrorCode::INSUFFICIENT_RESOURCES,
            ]
            .contains(&code)
            .then_some(code.0)
        }
        _ => None,
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(err)
            if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// JetStream as a [`Broker`].
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Streams,
    /// Whether the streams were set up since the last failure.
    ready: AtomicBool,
}

impl NatsBroker {
    /// A broker over `client` with `streams`.
    pub fn new(client: async_nats::Client, streams: Streams) -> Self {
        let js = jetstream::new(client.clone());
        Self { client, js, streams, ready: AtomicBool::new(false) }
    }

    async fn send(&self, rows: &[OutboxMessage]) -> Result<Vec<i64>, BrokerError> {
        if !self.ready.load(Ordering::Relaxed) {
            ensure_streams(&self.js, &self.streams)
                .await
                .map_err(|e| BrokerError::new("jetstream is not ready", e))?;
            self.ready.store(true, Ordering::Relaxed);
        }
        // Send the batch, then wait for all acknowledgements.
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        for m in rows {
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone().into())
                .message_id(format!("hcp-outbox-{}", m.id));
            match self.js.send_publish(m.subject.clone(), publish).await {
                Ok(ack) => pending.push((m.id, ack)),
                Err(e) => {
                    failure = Some(BrokerError::new("cannot publish", e));
                    break;
                }
            }
        }
        let mut sent = Vec::with_capacity(pending.len());
        for (id, ack) in pending {
            match tokio::time::timeout(Duration::from_secs(5), ack).await {
                Ok(Ok(_)) => sent.push(id),
                Ok(Err(e)) => failure = Some(BrokerError::new("jetstream did not store a message", e)),
                Err(_) => failure = Some(BrokerError::plain("no acknowledgement from jetstream within 5 s")),
            }
        }
        match failure {
            Some(e) if sent.is_empty() => {
                self.ready.store(false, Ordering::Relaxed);
                Err(e)
            }
            _ => Ok(sent),
        }
    }

    async fn attach(&self) -> Result<BoxStream<'static, Result<Delivery, BrokerError>>, BrokerError> {
        let stream = ensure_streams(&self.js, &self.streams)
            .await
            .map_err(|e| BrokerError::new("jetstream is not ready", e))?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                WORKER_CONSUMER,
                pull::Config {
                    durable_name: Some(WORKER_CONSUMER.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    // 0: the stream's count, also after the stream changes it.
                    num_replicas: 0,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| BrokerError::new("cannot create the consumer", e))?;
        // Short pull requests: a request held by a consumer leader that died
        // (a cluster node killed, or its quorum lost) is replaced when it
        // expires or misses a heartbeat, here within seconds rather than the
        // client's default 30 s. Idle, this is one request per 5 s per worker.
        let messages = consumer
            .stream()
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| BrokerError::new("cannot pull messages", e))?;
        Ok(messages
            .map(|m| match m {
                Ok(msg) => Ok(Delivery { payload: msg.payload.to_vec(), settle: Box::new(NatsSettle(msg)) }),
                Err(e) => Err(BrokerError::new("cannot pull messages", e)),
            })
            .boxed())
    }
}

impl Broker for NatsBroker {
    fn backend(&self) -> QueueBackend {
        QueueBackend::Nats
    }

    fn publish<'a>(&'a self, rows: &'a [OutboxMessage]) -> BoxFuture<'a, Result<Vec<i64>, BrokerError>> {
        self.send(rows).boxed()
    }

    fn deliveries(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Delivery, BrokerError>>, BrokerError>> {
        self.attach().boxed()
    }

    fn announce(&self, payload: Vec<u8>) -> BoxFuture<'static, ()> {
        let client = self.client.clone();
        async move {
            let _ = client.publish(crate::events::SUBJECT, payload.into()).await;
        }
        .boxed()
    }

    fn notifications(&self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, BrokerError>> {
        async move {
            let sub = self
                .client
                .subscribe(crate::events::SUBJECT)
                .await
                .map_err(|e| BrokerError::new("cannot subscribe to job notifications", e))?;
            Ok(sub.map(|m| m.payload.to_vec()).boxed())
        }
        .boxed()
    }
}

/// Settles a JetStream message: ack, nak with a delay, or term.
struct NatsSettle(jetstream::Message);

impl Settle for NatsSettle {
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), BrokerError>> {
        let kind = match outcome {
            Outcome::Done => jetstream::AckKind::Ack,
            Outcome::Later(delay) => jetstream::AckKind::Nak(Some(delay)),
            Outcome::Malformed => jetstream::AckKind::Term,
        };
        async move { self.0.ack_with(kind).await.map_err(|e| BrokerError::new("cannot acknowledge", e)) }
            .boxed()
    }
}
