//! Production dispatch over NATS JetStream.
//!
//! - The publisher sends the store's outbox rows (jobs to run, usage
//!   events) to JetStream and marks them sent. Each message carries its
//!   outbox id as `Nats-Msg-Id`, so a row sent twice is stored once. While
//!   NATS is down rows wait in the outbox: requests are still accepted.
//! - The consumer (worker processes) pulls job messages from a durable
//!   work-queue consumer shared by all workers and offers each job to the
//!   engine, which leases it in the store. A message for a job that is not
//!   due yet goes back with a delay; one for a finished job is dropped.
//!
//! The store stays the source of truth: workers also poll it, so a message
//! lost anywhere only delays its job.
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
use futures::StreamExt;
use hcp_proto::ids::JobId;
use hcp_telemetry::error_chain;
use tokio::sync::{Notify, watch};

use crate::jobs::{Engine, JobQueue, Offer};
use crate::model::now;
use crate::store::{SUBJECT_JOBS, SUBJECT_USAGE_PREFIX, Store};

/// Name of the durable consumer all workers share.
pub const WORKER_CONSUMER: &str = "hcp-workers";

/// How long a worker's pull request waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's heartbeat on an idle pull request, by which the client
/// notices a request no server holds any more.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Announces accepted jobs: wakes the outbox publisher (and local workers).
#[derive(Clone, Default)]
pub struct NatsQueue {
    publisher: Arc<Notify>,
    engine: Arc<Notify>,
}

impl NatsQueue {
    /// Creates the queue; `engine` is the local engine's wake-up.
    pub fn new(engine: Arc<Notify>) -> Self {
        Self { publisher: Arc::default(), engine }
    }

    /// The publisher's wake-up.
    pub fn publisher_wake(&self) -> Arc<Notify> {
        self.publisher.clone()
    }
}

impl JobQueue for NatsQueue {
    fn job_accepted(&self, _job: JobId) {
        self.publisher.notify_one();
        self.engine.notify_one();
    }
}

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
    /// The workers' durable consumer could not be created.
    #[error("cannot create the consumer")]
    Consumer(#[source] async_nats::Error),
    /// Pulling messages could not start or failed.
    #[error("cannot pull messages")]
    Pull(#[source] async_nats::Error),
    /// The server ended the message stream.
    #[error("message stream ended")]
    Ended,
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

/// Sends outbox rows until `shutdown`.
pub async fn run_publisher(
    store: Store,
    client: async_nats::Client,
    streams: Streams,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let mut ready = false;
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !ready {
            match ensure_streams(&js, &streams).await {
                Ok(_) => ready = true,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "jetstream not ready; the outbox keeps messages")
                }
            }
        }
        let mut failed = !ready;
        if ready {
            loop {
                let batch = match store.pending_outbox(256).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the outbox");
                        failed = true;
                        break;
                    }
                };
                if batch.is_empty() {
                    break;
                }
                // Send the batch, then wait for all acknowledgements.
                let mut pending = Vec::with_capacity(batch.len());
                for m in &batch {
                    let publish = jetstream::message::PublishMessage::build()
                        .payload(m.payload.clone().into())
                        .message_id(format!("hcp-outbox-{}", m.id));
                    match js.send_publish(m.subject.clone(), publish).await {
                        Ok(ack) => pending.push((m.id, ack)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot publish; will retry");
                            failed = true;
                            break;
                        }
                    }
                }
                let mut sent = Vec::with_capacity(pending.len());
                for (id, ack) in pending {
                    match tokio::time::timeout(Duration::from_secs(5), ack).await {
                        Ok(Ok(_)) => sent.push(id),
                        _ => failed = true,
                    }
                }
                if let Err(e) = store.mark_outbox_published(&sent, now()).await {
                    tracing::warn!(error = %e, "cannot mark outbox rows sent; they will be sent again");
                }
                if failed {
                    break;
                }
            }
        }
        let wait = if failed {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            backoff
        } else {
            backoff = Duration::from_millis(200);
            Duration::from_millis(500)
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Pulls job messages and offers them to `engine` until `shutdown`.
pub async fn run_consumer(
    client: async_nats::Client,
    streams: Streams,
    engine: Engine,
    mut shutdown: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match consume(&js, &streams, &engine, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %error_chain(&e), "job consumer stopped; reconnecting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn consume(
    js: &jetstream::Context,
    streams: &Streams,
    engine: &Engine,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), QueueError> {
    let stream = ensure_streams(js, streams).await?;
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
        .map_err(|e| QueueError::Consumer(e.into()))?;
    // Short pull requests: a request held by a consumer leader that died
    // (a cluster node killed, or its quorum lost) is replaced when it
    // expires or misses a heartbeat, here within seconds rather than the
    // client's default 30 s. Idle, this is one request per 5 s per worker.
    let mut messages = consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| QueueError::Pull(e.into()))?;
    tracing::info!("job consumer attached");
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.changed() => return Ok(()),
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(QueueError::Pull(e.into())),
            None => return Err(QueueError::Ended),
        };
        let id = std::str::from_utf8(&msg.payload).ok().and_then(|s| s.parse::<JobId>().ok());
        let Some(id) = id else {
            tracing::warn!("dropping a job message without a job id");
            let _ = msg.ack().await;
            continue;
        };
        // Offered concurrently: an offer waits for a free slot and then for
        // the claiming transaction, and a burst of jobs must not queue behind
        // each other's claims (the engine's permits bound the work).
        let engine = engine.clone();
        tokio::spawn(async move {
            let ack = match engine.offer(id).await {
                Ok(Offer::Started) | Ok(Offer::Gone) => jetstream::AckKind::Ack,
                Ok(Offer::NotDue(delay)) => {
                    jetstream::AckKind::Nak(Some(delay.max(Duration::from_millis(10))))
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "cannot offer job; redelivering");
                    jetstream::AckKind::Nak(Some(Duration::from_secs(1)))
                }
            };
            if let Err(e) = msg.ack_with(ack).await {
                tracing::debug!(error = %e, "ack failed; the message will be redelivered");
            }
        });
    }
}
