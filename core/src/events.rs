//! Job change notifications, so that job watchers (`WatchJob`, SSE through
//! the gateway) wake when their job changes instead of each polling the
//! database.
//!
//! The engine and the API announce each job change they commit
//! ([`JobEvents::changed`]). Within a process that is a broadcast channel.
//! With NATS configured, announcements also go out on the core subject
//! `hcp.events.jobs` and every process rebroadcasts what it hears, so a
//! watcher on one API process learns of a job a worker process finished.
//! Notifications are hints: a watcher reads the job itself from the store
//! when woken, and also every `limits.job_watch_fallback_seconds` (5) in
//! case one was lost (NATS down, a lagging receiver).
//!
//! Watchers are bounded ([`JobEvents::admit`]) and end at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hcp_proto::ids::JobId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

/// The NATS subject of job change notifications.
pub const SUBJECT: &str = "hcp.events.jobs";

/// The process's job change hub.
#[derive(Clone, Debug)]
pub struct JobEvents {
    tx: broadcast::Sender<JobId>,
    /// This process's name on the NATS subject: what it published itself
    /// was already broadcast locally, so the relay skips it.
    origin: Arc<str>,
    fallback: Duration,
    watchers: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    nats: Option<async_nats::Client>,
}

impl JobEvents {
    /// A hub admitting at most `max_watchers` watchers, which re-read
    /// their job at least every `fallback`, ending them when `shutdown`
    /// turns true.
    pub fn new(
        max_watchers: usize,
        fallback: Duration,
        shutdown: watch::Receiver<bool>,
        nats: Option<async_nats::Client>,
    ) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let origin: Arc<str> = uuid::Uuid::now_v7().simple().to_string().into();
        Self { tx, origin, fallback, watchers: Arc::new(Semaphore::new(max_watchers)), shutdown, nats }
    }

    /// How often a watcher re-reads its job without a notification.
    pub fn fallback(&self) -> Duration {
        self.fallback
    }

    /// Announces that a job changed (after the change committed).
    pub fn changed(&self, job: JobId) {
        let _ = self.tx.send(job);
        if let Some(nats) = &self.nats {
            let nats = nats.clone();
            let payload = format!("{} {job}", self.origin);
            tokio::spawn(async move {
                // Best effort: watchers also re-read on their own.
                let _ = nats.publish(SUBJECT, payload.into()).await;
            });
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

    /// Rebroadcasts what other processes announce on NATS, until shutdown.
    pub async fn relay(self, client: async_nats::Client) {
        let mut stop = self.shutdown.clone();
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to job notifications; watchers fall back to polling");
                return;
            }
        };
        loop {
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(m) => {
                        // `<origin> <job id>`; this process's own were sent
                        // locally already.
                        let text = std::str::from_utf8(&m.payload).unwrap_or_default();
                        if let Some((origin, id)) = text.split_once(' ')
                            && origin != &*self.origin
                            && let Ok(id) = id.parse::<JobId>()
                        {
                            let _ = self.tx.send(id);
                        }
                    }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    }
}
