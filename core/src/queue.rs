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

use std::sync::Arc;
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

/// Connects to NATS. Does not wait for the server: the client keeps trying
/// in the background, so core starts (and accepts requests) during an outage.
pub async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .name("hcp-core")
        .connect(url)
        .await
}

/// Why JetStream could not be used; the caller logs it and tries again.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    /// A stream could not be created or read.
    #[error("cannot create the {which} stream")]
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
}

async fn ensure_streams(
    js: &jetstream::Context,
    prefix: &str,
) -> Result<jetstream::stream::Stream, QueueError> {
    let jobs = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("{prefix}_JOBS"),
            subjects: vec![SUBJECT_JOBS.to_owned()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| QueueError::Stream { which: "jobs", source: e.into() })?;
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("{prefix}_USAGE"),
        subjects: vec![format!("{SUBJECT_USAGE_PREFIX}>")],
        retention: jetstream::stream::RetentionPolicy::Limits,
        storage: jetstream::stream::StorageType::File,
        max_age: Duration::from_secs(30 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| QueueError::Stream { which: "usage", source: e.into() })?;
    Ok(jobs)
}

/// Sends outbox rows until `shutdown`.
pub async fn run_publisher(
    store: Store,
    client: async_nats::Client,
    prefix: String,
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
            match ensure_streams(&js, &prefix).await {
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
    prefix: String,
    engine: Engine,
    mut shutdown: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match consume(&js, &prefix, &engine, &mut shutdown).await {
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
    prefix: &str,
    engine: &Engine,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), QueueError> {
    let stream = ensure_streams(js, prefix).await?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            WORKER_CONSUMER,
            pull::Config {
                durable_name: Some(WORKER_CONSUMER.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| QueueError::Consumer(e.into()))?;
    let mut messages = consumer.messages().await.map_err(|e| QueueError::Pull(e.into()))?;
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
