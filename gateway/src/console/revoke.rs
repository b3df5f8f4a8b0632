//! Ending open sessions that core revoked. When a VM stops, moves or is
//! deleted, core marks its console sessions revoked (in the transaction
//! that finishes the job). The proxy keeps the sessions it has open here
//! and asks core every [`POLL`] which of them are revoked (one call for all
//! of them, `RevokedConsoles`); each revoked session is closed with
//! [`super::close::REVOKED`] and core's reason, and its end is audited
//! like any other. A SPICE session has a connection per channel, all under
//! one session id: each is watched, and all end together (core also
//! answers so for a session whose main channel ended).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hcp_proto::console::RevokedConsolesRequest;
use tokio::sync::oneshot;

use super::{Console, broker_call};

/// How often the proxy asks core about its open sessions.
pub(crate) const POLL: Duration = Duration::from_secs(2);

/// A session's open connections: connection number -> where to say the
/// session was revoked.
type Connections = HashMap<u64, oneshot::Sender<String>>;

/// The sessions open in this proxy: session id -> its connections.
#[derive(Default)]
pub(crate) struct OpenSessions {
    sessions: Mutex<HashMap<String, Connections>>,
    next: AtomicU64,
}

impl OpenSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connections>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `session_id` for one connection until the returned guard is
    /// dropped.
    pub(crate) fn watch(self: &Arc<Self>, session_id: &str) -> Watch {
        let (tx, rx) = oneshot::channel();
        let connection = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(session_id.to_owned()).or_default().insert(connection, tx);
        Watch { open: Arc::downgrade(self), session_id: session_id.to_owned(), connection, revoked: Some(rx) }
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn revoke(&self, session_id: &str, reason: String) {
        for (_, tx) in self.lock().remove(session_id).unwrap_or_default() {
            let _ = tx.send(reason.clone());
        }
    }
}

/// One open connection's watch: resolves when core revokes its session.
pub(crate) struct Watch {
    open: Weak<OpenSessions>,
    session_id: String,
    connection: u64,
    revoked: Option<oneshot::Receiver<String>>,
}

impl Watch {
    /// Core's reason, once the session is revoked (never, otherwise).
    pub(crate) async fn revoked(&mut self) -> String {
        match self.revoked.take() {
            Some(rx) => match rx.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(open) = self.open.upgrade() {
            let mut sessions = open.lock();
            if let Some(connections) = sessions.get_mut(&self.session_id) {
                connections.remove(&self.connection);
                if connections.is_empty() {
                    sessions.remove(&self.session_id);
                }
            }
        }
    }
}

/// Asks core about the open sessions every [`POLL`] while `console` lives.
pub(crate) async fn poll(console: Weak<Console>) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(console) = console.upgrade() else { return };
        let session_ids = console.open.ids();
        if session_ids.is_empty() {
            continue;
        }
        let req = RevokedConsolesRequest { session_ids };
        match broker_call(&console, req, |mut c, r| async move { c.revoked_consoles(r).await }).await {
            Ok(r) => {
                for s in r.revoked {
                    let reason =
                        if s.reason.is_empty() { "the console was revoked".to_owned() } else { s.reason };
                    tracing::info!(reason = %reason, "console session revoked by core");
                    console.open.revoke(&s.session_id, reason);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot ask core which console sessions are revoked")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_revoked_session_hears_why_and_a_dropped_watch_is_forgotten() {
        let open = Arc::new(OpenSessions::default());
        let mut a = open.watch("a");
        let b = open.watch("b");
        let mut ids = open.ids();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        open.revoke("a", "the vm was stopped".into());
        assert_eq!(a.revoked().await, "the vm was stopped");
        drop(b);
        drop(a);
        assert!(open.ids().is_empty());
        // Revoking what is not open does nothing.
        open.revoke("c", "x".into());
    }

    #[tokio::test]
    async fn every_channel_of_a_session_hears_it_end() {
        let open = Arc::new(OpenSessions::default());
        let main = open.watch("s");
        let mut display = open.watch("s");
        let mut inputs = open.watch("s");
        assert_eq!(open.ids(), ["s"]);
        drop(main);
        assert_eq!(open.ids(), ["s"], "the other channels are still watched");
        open.revoke("s", "the console session ended".into());
        assert_eq!(display.revoked().await, "the console session ended");
        assert_eq!(inputs.revoked().await, "the console session ended");
        drop((display, inputs));
        assert!(open.ids().is_empty());
    }
}
