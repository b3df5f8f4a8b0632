//! RabbitMQ (AMQP 0-9-1) as HCP's broker, with the `lapin` client.
//!
//! Topology, declared by every process when it connects (names start with
//! `[queue] stream_prefix`, `HCP` by default):
//! - `HCP.jobs`, a direct exchange, routes job messages (routing key
//!   `hcp.jobs.dispatch`) to the quorum queue `HCP.jobs` that all workers
//!   consume with manual acknowledgements and a bounded prefetch. A message
//!   a worker rejects (not a job id), or one delivered more than
//!   [`DELIVERY_LIMIT`] times, is dead-lettered through the fanout exchange
//!   `HCP.dead` into the quorum queue `HCP.jobs.dead`, for an operator to
//!   look at.
//! - A job that is not due yet goes to a delay queue
//!   `HCP.jobs.delay.<ms>` (quorum, every message living `<ms>`) which
//!   dead-letters it back into `HCP.jobs` when it expires; one fixed delay
//!   per queue, so no message waits behind a longer one.
//! - `HCP.usage`, a topic exchange, gets the usage events (routing keys
//!   `hcp.usage.started`, `hcp.usage.stopped`, ...). HCP binds no queue to
//!   it: operators bind their own (a metering pipeline); the events are
//!   also in the database, which the usage API reads.
//! - `HCP.events`, a fanout exchange, carries job change notifications;
//!   each process reads them through an exclusive queue of its own.
//!
//! Outbox rows are published persistent, on a channel in confirm mode: a
//! row is marked sent only after RabbitMQ confirmed it (for a quorum queue,
//! once a majority of its replicas has it). RabbitMQ has no publisher
//! dedupe; a row sent twice (a crash before it was marked) is a job
//! delivered twice, which the engine's lease makes harmless.
//!
//! The connection is made on first use and again after it fails, trying
//! the configured servers in turn (the nodes of a cluster); the callers'
//! loops retry with backoff.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::broker::{Broker, BrokerError, Delivery, Outcome, Settle};
use crate::config::{QueueBackend, redact_url};
use crate::store::{OutboxMessage, SUBJECT_JOBS, SUBJECT_USAGE_PREFIX};

/// Deliveries of one job message after which RabbitMQ dead-letters it
/// (the quorum queue's `x-delivery-limit`). A worker killed while holding
/// messages returns them; far more than any kill test makes.
pub const DELIVERY_LIMIT: i64 = 50;

/// The delay queues' delays, shortest first.
pub const DELAYS_MS: [u32; 4] = [250, 1_000, 5_000, 30_000];

/// How long a connection attempt to one server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The AMQP heartbeat asked for unless the URL sets one: a broker that
/// went away without closing the connection is noticed within two.
const HEARTBEAT_SECONDS: u16 = 10;
/// How long the publisher waits for RabbitMQ's confirmations of a batch.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The names of HCP's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// Names starting with `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// The exchange job messages are published to.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// The queue workers consume.
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.prefix)
    }

    /// The exchange of dead-lettered job messages.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The queue holding dead-lettered job messages.
    pub fn dead_queue(&self) -> String {
        format!("{}.jobs.dead", self.prefix)
    }

    /// The delay queue holding messages for `ms` milliseconds.
    pub fn delay_queue(&self, ms: u32) -> String {
        format!("{}.jobs.delay.{ms}", self.prefix)
    }

    /// The exchange usage events are published to.
    pub fn usage_exchange(&self) -> String {
        format!("{}.usage", self.prefix)
    }

    /// The exchange of job change notifications.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Where an outbox row goes: its exchange and routing key.
    fn route<'a>(&self, subject: &'a str) -> Option<(String, &'a str)> {
        if subject == SUBJECT_JOBS {
            Some((self.jobs_exchange(), subject))
        } else if subject.starts_with(SUBJECT_USAGE_PREFIX) {
            Some((self.usage_exchange(), subject))
        } else {
            None
        }
    }
}

/// The delay queue for a message due in `delay`: the longest delay not
/// longer than it (the message may come back early and be delayed again,
/// never late by more than the shortest delay).
pub fn delay_bucket(delay: Duration) -> u32 {
    let ms = delay.as_millis();
    DELAYS_MS.iter().rev().copied().find(|d| u128::from(*d) <= ms).unwrap_or(DELAYS_MS[0])
}

/// RabbitMQ as a [`Broker`].
pub struct AmqpBroker {
    servers: Vec<String>,
    topology: Topology,
    prefetch: u16,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// The server tried first at the next connection (round robin, so a
    /// dead node is not always tried first).
    next: AtomicUsize,
}

/// One connection and its confirm-mode channel for publishing.
struct Link {
    connection: Connection,
    confirms: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.confirms.status().connected()
    }
}

impl AmqpBroker {
    /// A broker on `servers` (AMQP URLs, tried in turn), with HCP's
    /// exchanges and queues named by `topology`, giving each worker at most
    /// `prefetch` unacknowledged job messages.
    pub fn new(servers: Vec<String>, topology: Topology, prefetch: u16) -> Self {
        Self { servers, topology, prefetch, link: tokio::sync::Mutex::new(None), next: AtomicUsize::new(0) }
    }

    /// The current connection, or a new one (topology declared) when
    /// there is none or it failed.
    async fn link(&self) -> Result<Arc<Link>, BrokerError> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref()
            && link.usable()
        {
            return Ok(link.clone());
        }
        *current = None;
        let n = self.servers.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = BrokerError::plain("no RabbitMQ server is configured");
        for i in 0..n {
            let url = &self.servers[(first + i) % n];
            match self.open(url).await {
                Ok(link) => {
                    let link = Arc::new(link);
                    *current = Some(link.clone());
                    tracing::info!(server = %redact_url(url), "connected to RabbitMQ");
                    return Ok(link);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn open(&self, url: &str) -> Result<Link, BrokerError> {
        let mut uri = lapin::uri::AMQPUri::from_str(url)
            .map_err(|e| BrokerError::plain(format!("{}: {e}", redact_url(url))))?;
        uri.query.heartbeat.get_or_insert(HEARTBEAT_SECONDS);
        uri.query.connection_timeout.get_or_insert(CONNECT_TIMEOUT.as_millis() as u64);
        let properties = ConnectionProperties::default().with_connection_name("hcp-core".into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties))
            .await
            .map_err(|_| BrokerError::plain(format!("no connection to {} within 5 s", redact_url(url))))?
            .map_err(|e| BrokerError::new(format!("cannot connect to {}", redact_url(url)), e))?;
        let confirms =
            connection.create_channel().await.map_err(|e| BrokerError::new("cannot open a channel", e))?;
        self.declare(&confirms).await?;
        confirms
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| BrokerError::new("cannot enable publisher confirms", e))?;
        Ok(Link { connection, confirms })
    }

    /// Declares HCP's exchanges and queues (idempotent; RabbitMQ refuses a
    /// declaration that contradicts an existing one, which is reported).
    async fn declare(&self, ch: &Channel) -> Result<(), BrokerError> {
        let t = &self.topology;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for (name, kind) in [
            (t.jobs_exchange(), ExchangeKind::Direct),
            (t.dead_exchange(), ExchangeKind::Fanout),
            (t.usage_exchange(), ExchangeKind::Topic),
            (t.events_exchange(), ExchangeKind::Fanout),
        ] {
            ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
                .await
                .map_err(|e| BrokerError::new(format!("cannot declare the exchange {name}"), e))?;
        }
        let queue = QueueDeclareOptions { durable: true, ..Default::default() };
        let mut jobs = quorum();
        jobs.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(t.dead_exchange().into()));
        jobs.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
        let mut declared = vec![(t.jobs_queue(), jobs), (t.dead_queue(), quorum())];
        for ms in DELAYS_MS {
            let mut delay = quorum();
            delay.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::from(ms)));
            delay.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(t.jobs_exchange().into()));
            delay.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(SUBJECT_JOBS.into()));
            declared.push((t.delay_queue(ms), delay));
        }
        for (name, args) in declared {
            ch.queue_declare(name.as_str().into(), queue, args)
                .await
                .map_err(|e| BrokerError::new(format!("cannot declare the queue {name}"), e))?;
        }
        for (queue_name, exchange, key) in
            [(t.jobs_queue(), t.jobs_exchange(), SUBJECT_JOBS), (t.dead_queue(), t.dead_exchange(), "")]
        {
            ch.queue_bind(
                queue_name.as_str().into(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::new(format!("cannot bind {queue_name} to {exchange}"), e))?;
        }
        Ok(())
    }

    async fn send(&self, rows: &[OutboxMessage]) -> Result<Vec<i64>, BrokerError> {
        let link = self.link().await?;
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        for m in rows {
            let Some((exchange, key)) = self.topology.route(&m.subject) else {
                tracing::error!(subject = %m.subject, "an outbox row for no known exchange; left in the outbox");
                continue;
            };
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("hcp-outbox-{}", m.id).into())
                .with_content_type("text/plain".into());
            match link
                .confirms
                .basic_publish(
                    exchange.as_str().into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    m.payload.as_bytes(),
                    properties,
                )
                .await
            {
                Ok(confirm) => pending.push((m.id, confirm)),
                Err(e) => {
                    failure = Some(BrokerError::new("cannot publish", e));
                    break;
                }
            }
        }
        let mut sent = Vec::with_capacity(pending.len());
        for (id, confirm) in pending {
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(c)) if c.is_ack() => sent.push(id),
                Ok(Ok(_)) => failure = Some(BrokerError::plain("RabbitMQ refused to store a message (nack)")),
                Ok(Err(e)) => failure = Some(BrokerError::new("no confirmation from RabbitMQ", e)),
                Err(_) => failure = Some(BrokerError::plain("no confirmation from RabbitMQ within 10 s")),
            }
        }
        match failure {
            Some(e) if sent.is_empty() => Err(e),
            _ => Ok(sent),
        }
    }

    /// A new channel on the current connection (made if need be).
    async fn channel(&self) -> Result<(Arc<Link>, Channel), BrokerError> {
        let link = self.link().await?;
        let ch = link
            .connection
            .create_channel()
            .await
            .map_err(|e| BrokerError::new("cannot open a channel", e))?;
        Ok((link, ch))
    }

    async fn attach(&self) -> Result<BoxStream<'static, Result<Delivery, BrokerError>>, BrokerError> {
        let (link, ch) = self.channel().await?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| BrokerError::new("cannot set the prefetch", e))?;
        let consumer = ch
            .basic_consume(
                self.topology.jobs_queue().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::new("cannot consume the job queue", e))?;
        let topology = self.topology.clone();
        Ok(consumer
            .map(move |d| match d {
                Ok(d) => Ok(Delivery {
                    payload: d.data.clone(),
                    settle: Box::new(AmqpSettle {
                        delivery: d,
                        link: link.clone(),
                        topology: topology.clone(),
                    }),
                }),
                Err(e) => Err(BrokerError::new("the job consumer failed", e)),
            })
            .boxed())
    }

    async fn listen(&self) -> Result<BoxStream<'static, Vec<u8>>, BrokerError> {
        let (_link, ch) = self.channel().await?;
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::new("cannot declare a notification queue", e))?;
        ch.queue_bind(
            queue.name().clone(),
            self.topology.events_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::new("cannot bind the notification queue", e))?;
        let consumer = ch
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::new("cannot consume job notifications", e))?;
        // The channel lives as long as the stream.
        Ok(consumer
            .take_while(|d| futures::future::ready(d.is_ok()))
            .filter_map(|d| async move { d.ok().map(|d| d.data) })
            .boxed())
    }
}

/// A quorum queue's arguments.
fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

impl Broker for AmqpBroker {
    fn backend(&self) -> QueueBackend {
        QueueBackend::RabbitMq
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
        // Best effort, on the current connection only: a notification is
        // not worth a connection attempt (the publisher makes those).
        let link = self.link.try_lock().ok().and_then(|l| l.as_ref().filter(|l| l.usable()).cloned());
        let exchange = self.topology.events_exchange();
        async move {
            if let Some(link) = link {
                let _ = link
                    .confirms
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &payload,
                        BasicProperties::default(),
                    )
                    .await;
            }
        }
        .boxed()
    }

    fn notifications(&self) -> BoxFuture<'_, Result<BoxStream<'static, Vec<u8>>, BrokerError>> {
        self.listen().boxed()
    }
}

/// Settles a RabbitMQ delivery: ack; a delayed redelivery through a delay
/// queue; or reject without requeueing, which dead-letters it.
struct AmqpSettle {
    delivery: lapin::message::Delivery,
    link: Arc<Link>,
    topology: Topology,
}

impl Settle for AmqpSettle {
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), BrokerError>> {
        async move {
            let acker = &self.delivery.acker;
            match outcome {
                Outcome::Done => acker.ack(BasicAckOptions::default()).await.map(drop),
                Outcome::Malformed => acker.reject(BasicRejectOptions { requeue: false }).await.map(drop),
                Outcome::Later(delay) => {
                    // The copy is confirmed before the original is acked:
                    // a crash between the two delivers the job twice, never
                    // not at all.
                    let queue = self.topology.delay_queue(delay_bucket(delay));
                    let copied = match self
                        .link
                        .confirms
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &self.delivery.data,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                    {
                        Ok(confirm) => matches!(
                            tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await,
                            Ok(Ok(c)) if c.is_ack()
                        ),
                        Err(_) => false,
                    };
                    if copied {
                        acker.ack(BasicAckOptions::default()).await.map(drop)
                    } else {
                        acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.map(drop)
                    }
                }
            }
            .map_err(|e| BrokerError::new("cannot settle a job message", e))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_goes_to_the_longest_delay_queue_not_longer_than_it() {
        assert_eq!(delay_bucket(Duration::from_millis(10)), 250);
        assert_eq!(delay_bucket(Duration::from_millis(250)), 250);
        assert_eq!(delay_bucket(Duration::from_millis(999)), 250);
        assert_eq!(delay_bucket(Duration::from_secs(3)), 1_000);
        assert_eq!(delay_bucket(Duration::from_secs(29)), 5_000);
        assert_eq!(delay_bucket(Duration::from_secs(3600)), 30_000);
    }

    #[test]
    fn outbox_subjects_route_to_their_exchange() {
        let t = Topology::new("HCP");
        assert_eq!(t.route(SUBJECT_JOBS), Some(("HCP.jobs".to_owned(), SUBJECT_JOBS)));
        assert_eq!(t.route("hcp.usage.started"), Some(("HCP.usage".to_owned(), "hcp.usage.started")));
        assert_eq!(t.route("hcp.other"), None);
    }
}
