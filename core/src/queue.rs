//! Production dispatch through a message broker: NATS JetStream
//! ([`nats`]) or RabbitMQ ([`amqp`]), chosen by `[queue] backend`.
//!
//! Both sit behind one trait, [`Broker`] (in [`crate::broker`], a leaf
//! module), which is all the rest of core sees:
//! - the outbox publisher ([`run_publisher`]) sends the store's outbox rows
//!   (jobs to run, usage events) and marks a row sent only once the broker
//!   confirmed it; while the broker is down rows wait in the outbox and
//!   requests are still accepted;
//! - the job consumer ([`run_consumer`], worker processes) takes job
//!   messages and offers each job to the engine, which leases it in the
//!   store; a message for a job that is not due yet comes back after a
//!   delay, one for a finished job is dropped, one that is not a job id is
//!   dead-lettered (RabbitMQ) or terminated (JetStream);
//! - job change notifications ([`crate::events`]) go between processes
//!   over the same broker.
//!
//! The store stays the source of truth: workers also poll it, so a message
//! lost anywhere only delays its job, and a message delivered twice finds
//! the job leased or finished.

pub mod amqp;
pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hcp_proto::ids::JobId;
use hcp_telemetry::error_chain;
use tokio::sync::{Notify, watch};

use crate::config::{QueueBackend, QueueConfig};
use crate::jobs::{Engine, JobQueue, Offer};
use crate::model::now;
use crate::store::Store;

pub use crate::broker::{Broker, BrokerError, Delivery, Outcome, Settle};
pub use nats::WORKER_CONSUMER;

/// Why the broker could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// NATS.
    #[error("cannot connect to NATS")]
    Nats(#[source] async_nats::ConnectError),
}

/// Connects to the broker `config` names; none for the embedded queue.
/// Does not wait for the broker: both clients keep trying, so core starts
/// (and accepts requests into the outbox) during an outage.
pub async fn connect(config: &QueueConfig) -> Result<Option<Arc<dyn Broker>>, ConnectError> {
    Ok(match config.backend() {
        QueueBackend::Embedded => None,
        QueueBackend::Nats => {
            let servers = config.nats_servers().unwrap_or_default();
            let client = nats::connect(&servers).await.map_err(ConnectError::Nats)?;
            let streams = nats::Streams::new(config.stream_prefix.clone(), config.stream_replicas);
            Some(Arc::new(nats::NatsBroker::new(client, streams)))
        }
        QueueBackend::RabbitMq => Some(Arc::new(amqp::AmqpBroker::new(
            config.amqp_servers().unwrap_or_default(),
            amqp::Topology::new(&config.stream_prefix),
            config.prefetch,
        ))),
    })
}

/// Announces accepted jobs: wakes the outbox publisher (and local workers).
#[derive(Clone, Default)]
pub struct BrokerQueue {
    publisher: Arc<Notify>,
    engine: Arc<Notify>,
}

impl BrokerQueue {
    /// Creates the queue; `engine` is the local engine's wake-up.
    pub fn new(engine: Arc<Notify>) -> Self {
        Self { publisher: Arc::default(), engine }
    }

    /// The publisher's wake-up.
    pub fn publisher_wake(&self) -> Arc<Notify> {
        self.publisher.clone()
    }
}

impl JobQueue for BrokerQueue {
    fn job_accepted(&self, _job: JobId) {
        self.publisher.notify_one();
        self.engine.notify_one();
    }
}

/// Rows sent per round.
const BATCH: u32 = 256;
/// The longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Sends outbox rows until `shutdown`: woken by accepted jobs, and every
/// half second; after a failure, with backoff up to 5 s.
pub async fn run_publisher(
    store: Store,
    broker: Arc<dyn Broker>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let failed = publish_pending(&store, broker.as_ref()).await.is_err();
        let wait = if failed {
            backoff = (backoff * 2).min(MAX_BACKOFF);
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

/// Sends pending rows until none is left; stops at the first round the
/// broker did not confirm entirely.
async fn publish_pending(store: &Store, broker: &dyn Broker) -> Result<(), ()> {
    loop {
        let batch = store.pending_outbox(BATCH).await.map_err(|e| {
            tracing::warn!(error = %error_chain(&e), "cannot read the outbox");
        })?;
        if batch.is_empty() {
            return Ok(());
        }
        let (sent, complete) = match broker.publish(&batch).await {
            Ok(sent) => {
                let complete = sent.len() == batch.len();
                if !complete {
                    tracing::warn!(
                        backend = %broker.backend(),
                        sent = sent.len(),
                        of = batch.len(),
                        "the broker did not confirm every message; the rest stay in the outbox"
                    );
                }
                (sent, complete)
            }
            Err(e) => {
                tracing::warn!(backend = %broker.backend(), error = %error_chain(&e), "cannot publish; the outbox keeps the messages");
                (Vec::new(), false)
            }
        };
        if !sent.is_empty()
            && let Err(e) = store.mark_outbox_published(&sent, now()).await
        {
            tracing::warn!(error = %error_chain(&e), "cannot mark outbox rows sent; they will be sent again");
        }
        if !complete {
            return Err(());
        }
    }
}

/// Takes job messages and offers them to `engine` until `shutdown`,
/// attaching again with backoff whenever the broker goes away.
pub async fn run_consumer(broker: Arc<dyn Broker>, engine: Engine, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match consume(broker.as_ref(), &engine, &mut shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                backend = %broker.backend(),
                error = %error_chain(&e),
                "job consumer stopped; attaching again"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn consume(
    broker: &dyn Broker,
    engine: &Engine,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), BrokerError> {
    let mut deliveries = broker.deliveries().await?;
    tracing::info!(backend = %broker.backend(), "job consumer attached");
    *backoff = Duration::from_millis(200);
    loop {
        let next = tokio::select! {
            d = deliveries.next() => d,
            _ = shutdown.changed() => return Ok(()),
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e),
            None => return Err(BrokerError::plain("the broker ended the delivery stream")),
        };
        let Some(id) = job_id(&delivery.payload) else {
            tracing::warn!(backend = %broker.backend(), "a job message without a job id; not delivered again");
            if let Err(e) = delivery.settle.settle(Outcome::Malformed).await {
                tracing::debug!(error = %error_chain(&e), "cannot settle a malformed message");
            }
            continue;
        };
        // Offered concurrently: an offer waits for a free slot and then for
        // the claiming transaction, and a burst of jobs must not queue behind
        // each other's claims (the engine's permits bound the work).
        let engine = engine.clone();
        tokio::spawn(async move {
            let outcome = match engine.offer(id).await {
                Ok(Offer::Started) | Ok(Offer::Gone) => Outcome::Done,
                Ok(Offer::NotDue(delay)) => Outcome::Later(delay.max(Duration::from_millis(10))),
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "cannot offer job; delivering it again");
                    Outcome::Later(Duration::from_secs(1))
                }
            };
            if let Err(e) = delivery.settle.settle(outcome).await {
                tracing::debug!(job_id = %id, error = %error_chain(&e), "settling failed; the message will be delivered again");
            }
        });
    }
}

/// The job id a job message carries, if it is one.
fn job_id(payload: &[u8]) -> Option<JobId> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_job_id_is_a_job_message() {
        let id = JobId::new();
        assert_eq!(job_id(id.to_string().as_bytes()), Some(id));
        assert_eq!(job_id(b""), None);
        assert_eq!(job_id(b"not-a-job"), None);
        assert_eq!(job_id(&[0xff, 0xfe]), None);
    }
}
