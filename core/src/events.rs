//! Job change notifications, so that job watchers (`WatchJob`, SSE through
//! the gateway) wake when their job changes instead of each polling the
//! database.
//!
//! The engine and the API announce each job change they commit
//! ([`JobEvents::changed`]). Within a process that is a broadcast channel.
//! With a broker configured, announcements also go out through it (NATS:
//! the core subject `hcp.events.jobs`; RabbitMQ: a fanout exchange) and
//! every process rebroadcasts what it hears, so a watcher on one API
//! process learns of a job a worker process finished. Notifications are
//! hints: a watcher reads the job itself from the store when woken, and
//! also every `limits.job_watch_fallback_seconds` (5) in case one was lost
//! (the broker down, a lagging receiver).
//!
//! Watchers are bounded ([`JobEvents::admit`]) and end at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hcp_proto::ids::JobId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::broker::Broker;

/// The NATS subject of job change notifications.
pub const SUBJECT: &str = "hcp.events.jobs";

/// The process's job change hub.
#[derive(Clone)]
pub struct JobEvents {
    tx: broadcast::Sender<JobId>,
    /// This process's name in notifications: what it published itself
    /// was already broadcast locally, so the relay skips it.
    origin: Arc<str>,
    fallback: Duration,
    watchers: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    broker: Option<Arc<dyn Broker>>,
}

impl JobEvents {
    /// A hub admitting at most `max_watchers` watchers, which re-read
    /// their job at least every `fallback`, ending them when `shutdown`
    /// turns true.
    pub fn new(
        max_watchers: usize,
        fallback: Duration,
        shutdown: watch::Receiver<bool>,
        broker: Option<Arc<dyn Broker>>,
    ) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let origin: Arc<str> = uuid::Uuid::now_v7().simple().to_string().into();
        Self { tx, origin, fallback, watchers: Arc::new(Semaphore::new(max_watchers)), shutdown, broker }
    }

    /// How often a watcher re-reads its job without a notification.
    pub fn fallback(&self) -> Duration {
        self.fallback
    }

    /// Announces that a job changed (after the change committed).
    pub fn changed(&self, job: JobId) {
        let _ = self.tx.send(job);
        if let Some(broker) = &self.broker {
            // Best effort: watchers also re-read on their own.
            tokio::spawn(broker.announce(format!("{} {job}", self.origin).into_bytes()));
        }
    }

    /// A slot for one more watcher, or None when all are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.watchers.clone().try_acquire_owned().ok()
    }

    /// Notifications from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobId> {
        self.tx.subscribe()
    }

    /// Turns true at shutdown.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Rebroadcasts what other processes announce through `broker`, until
    /// shutdown; listens again (with backoff) when the broker goes away.
    pub async fn relay(self, broker: Arc<dyn Broker>) {
        let mut stop = self.shutdown.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            match broker.notifications().await {
                Ok(mut notes) => {
                    backoff = Duration::from_millis(200);
                    loop {
                        tokio::select! {
                            note = notes.next() => match note {
                                Some(text) => self.rebroadcast(&text),
                                None => break,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                }
                Err(e) => tracing::debug!(
                    error = %hcp_telemetry::error_chain(&e),
                    "cannot listen to job notifications; watchers fall back to polling"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// `<origin> <job id>`: another process's notification is broadcast
    /// here; this process's own were sent locally already.
    fn rebroadcast(&self, note: &[u8]) {
        let text = std::str::from_utf8(note).unwrap_or_default();
        if let Some((origin, id)) = text.split_once(' ')
            && origin != &*self.origin
            && let Ok(id) = id.parse::<JobId>()
        {
            let _ = self.tx.send(id);
        }
    }
}
