//! Ending open sessions that core revoked. When a VM stops, moves or is
//! deleted, core marks its console sessions revoked (in the transaction
//! that finishes the job). The proxy keeps the sessions it has open here
//! and asks core every [`POLL`] which of them are revoked (one call for all
//! of them, `RevokedConsoles`); each revoked session is closed with
//! [`super::close::REVOKED`] and core's reason, and its end is audited
//! like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hcp_proto::console::RevokedConsolesRequest;
use tokio::sync::oneshot;

use super::{Console, broker_call};

/// How often the proxy asks core about its open sessions.
pub(crate) const POLL: Duration = Duration::from_secs(2);

/// The sessions open in this proxy: session id -> where to say it was
/// revoked.
#[derive(Default)]
pub(crate) struct OpenSessions {
    sessions: Mutex<HashMap<String, oneshot::Sender<String>>>,
}

impl OpenSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<String>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `session_id` until the returned guard is dropped.
    pub(crate) fn watch(self: &Arc<Self>, session_id: &str) -> Watch {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(session_id.to_owned(), tx);
        Watch { open: Arc::downgrade(self), session_id: session_id.to_owned(), revoked: Some(rx) }
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn revoke(&self, session_id: &str, reason: String) {
        if let Some(tx) = self.lock().remove(session_id) {
            let _ = tx.send(reason);
        }
    }
}

/// One open session's watch: resolves when core revokes it.
pub(crate) struct Watch {
    open: Weak<OpenSessions>,
    session_id: String,
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
            open.lock().remove(&self.session_id);
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
}
