//! The message broker as core sees it: one trait, [`Broker`], implemented
//! for NATS JetStream and RabbitMQ in [`crate::queue`], and used by the
//! outbox publisher, the job consumer ([`crate::queue`]) and the job change
//! notifications ([`crate::events`]). A leaf module: it knows nothing of the
//! engine.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::config::QueueBackend;
use crate::store::OutboxMessage;

/// A message broker as core uses it. Implementations keep their own
/// connection and reconnect when asked for something after losing it; the
/// loops here retry with backoff.
pub trait Broker: Send + Sync + 'static {
    /// Which broker this is, for logs.
    fn backend(&self) -> QueueBackend;

    /// Sends `rows` (outbox rows: jobs and usage events, persistent) and
    /// returns the ids of those the broker confirmed it stored. A row not
    /// returned is sent again later; the same row sent twice must be
    /// harmless (JetStream dedupes it by id, a job delivered twice finds
    /// its lease taken).
    fn publish<'a>(&'a self, rows: &'a [OutboxMessage]) -> BoxFuture<'a, Result<Vec<i64>, BrokerError>>;

    /// Job messages for this worker, until the connection fails (an error
    /// item or the end of the stream); each is settled by the caller.
    fn deliveries(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Delivery, BrokerError>>, BrokerError>>;

    /// Announces a job change to the other processes (best effort: the
    /// watchers also re-read their job on their own).
    fn announce(&self, payload: Vec<u8>) -> BoxFuture<'static, ()>;

    /// What the processes announce (this one's included), until the
    /// connection fails.
    fn notifications(&self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, BrokerError>>;
}

/// One job message as the broker delivered it.
pub struct Delivery {
    /// The message's payload: a job id.
    pub payload: Vec<u8>,
    /// Tells the broker what became of it.
    pub settle: Box<dyn Settle>,
}

/// What became of a delivered message; the broker acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done with (the job started, finished or is another worker's):
    /// removed from the queue.
    Done,
    /// Deliver it again after this delay (a job waiting for its retry, or
    /// one that could not be offered).
    Later(Duration),
    /// Not a job message: never delivered again (dead-lettered where the
    /// broker has a route for it).
    Malformed,
}

/// Settles one delivery.
pub trait Settle: Send {
    /// Tells the broker `outcome`. An error means the broker will deliver
    /// the message again.
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), BrokerError>>;
}

/// Why the broker could not do what was asked; the caller logs it (its
/// source chain) and tries again.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct BrokerError {
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BrokerError {
    /// `what` failed because of `source`.
    pub fn new(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { what: what.into(), source: Some(source.into()) }
    }

    /// `what` failed, with no underlying error.
    pub fn plain(what: impl Into<String>) -> Self {
        Self { what: what.into(), source: None }
    }
}
