//! Webhook deliveries: the worker that sends what the store's outbox of
//! deliveries holds, and the signature receivers check.
//!
//! One process at a time sends (a named lease, like the drainer's). A pass
//! takes the due deliveries that are the oldest undelivered one of their
//! endpoint and VM, sends them at most `webhooks.concurrency` at once, and
//! records each attempt; a VM's next event becomes due only once the one
//! before it was delivered, so an endpoint hears of a VM's events in order.
//! A failed attempt is retried with exponential backoff and jitter
//! (`hcp_domain::webhook::retry_at`); an endpoint failing too often or too
//! long is disabled with a reason (`disable_reason`). Passes follow job
//! changes (`events.rs`) and otherwise the poll interval.
//!
//! Every request goes through [`crate::egress::EgressClient`]: the URL and
//! the address connected to are checked at each attempt.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hcp_domain::webhook::{AttemptResult, RetryPolicy, WebhookDelivery, WebhookEndpoint};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::watch;

use crate::config::WebhooksConfig;
use crate::egress::{EgressClient, EgressError};
use crate::model::now;
use crate::secrets::SecretBox;
use crate::store::{AttemptOutcome, Store, StoreError};

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "HCP-Signature";
/// The event id header (the same on every retry of the event).
pub const EVENT_ID_HEADER: &str = "HCP-Event-Id";
/// The event type header.
pub const EVENT_TYPE_HEADER: &str = "HCP-Event-Type";
/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest error text kept per attempt.
const MAX_ERROR: usize = 512;

const LEASE: &str = "webhook-deliverer";
/// How long delivered events are kept (with their attempts) for the
/// tenant's view.
const KEEP_DELIVERED: chrono::Duration = chrono::Duration::days(7);
/// How often delivered events past [`KEEP_DELIVERED`] are removed.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// A new signing secret: `whsec_` and 32 random bytes in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill(&mut bytes);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

/// The `HCP-Signature` value for `body` sent at unix time `t`: the HMAC is
/// keyed with the whole secret string and covers `"<t>.<body>"`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The associated data a secret is sealed with: its endpoint's id, so a
/// sealed secret cannot be moved to another endpoint.
pub fn secret_aad(endpoint: hcp_proto::ids::WebhookId) -> [u8; 16] {
    *endpoint.0.as_bytes()
}

/// The delivery worker.
#[derive(Clone)]
pub struct Deliverer {
    store: Store,
    egress: EgressClient,
    secrets: Option<SecretBox>,
    policy: RetryPolicy,
    config: WebhooksConfig,
    events: crate::events::JobEvents,
    owner: String,
}

impl Deliverer {
    /// A worker sending through `egress`; `owner` names this process.
    pub fn new(
        store: Store,
        egress: EgressClient,
        secrets: Option<SecretBox>,
        config: WebhooksConfig,
        events: crate::events::JobEvents,
        owner: String,
    ) -> Self {
        let policy = RetryPolicy {
            backoff_base: Duration::from_millis(config.backoff_base_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            disable_after_failures: config.disable_after_failures,
            disable_after: Duration::from_secs(config.disable_after_seconds),
        };
        Self { store, egress, secrets, policy, config, events, owner }
    }

    /// The lease's length: a round of sends (at most `concurrency`, each
    /// bounded by the egress total time) ends well within it, and the
    /// lease is renewed after every round, so two processes do not send
    /// the same VM's events at once unless one stalls.
    fn lease(&self) -> chrono::Duration {
        let round = self.egress.policy().total_timeout().saturating_mul(3) + Duration::from_secs(10);
        chrono::Duration::from_std(round).unwrap_or(chrono::Duration::seconds(60))
    }

    /// Runs passes while this process holds the lease, until shutdown;
    /// hourly, removes deliveries delivered more than a week ago.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.config.poll_interval_ms);
        let mut changes = self.events.subscribe();
        let mut purged: Option<Instant> = None;
        loop {
            let t = now();
            match self.store.acquire_singleton(LEASE, &self.owner, t, t + self.lease()).await {
                Ok(true) => {
                    if let Err(e) = self.pass().await {
                        tracing::warn!(error = %e, "webhook delivery pass failed");
                    }
                    if purged.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
                        purged = Some(Instant::now());
                        if let Err(e) = self.store.purge_webhook_deliveries(now() - KEEP_DELIVERED).await {
                            tracing::warn!(error = %e, "cannot remove old webhook deliveries");
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the webhook deliverer lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                // A job changed: its deliveries may be waiting. A lagging
                // receiver only means many changes.
                _ = changes.recv() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Sends every due delivery, round after round of at most
    /// `concurrency` (a delivered event makes the VM's next one due),
    /// renewing the lease between rounds.
    pub async fn pass(&self) -> Result<(), StoreError> {
        loop {
            let due = self.store.due_webhook_deliveries(now(), self.config.concurrency).await?;
            if due.is_empty() {
                return Ok(());
            }
            futures::stream::iter(due)
                .for_each_concurrent(None, |(d, e)| async move {
                    if let Err(err) = self.deliver(&d, &e).await {
                        tracing::warn!(error = %err, delivery = d.seq, "cannot record a webhook attempt");
                    }
                })
                .await;
            let t = now();
            if !self.store.acquire_singleton(LEASE, &self.owner, t, t + self.lease()).await? {
                return Ok(());
            }
        }
    }

    /// One attempt of `d` to `e`, recorded.
    async fn deliver(&self, d: &WebhookDelivery, e: &WebhookEndpoint) -> Result<(), StoreError> {
        let at = now();
        let started = Instant::now();
        let (status_code, error) = match self.send(d, e).await {
            // Whether the status counts as delivered is `AttemptResult`'s.
            Ok(code) => (Some(code), String::new()),
            Err(SendError::Egress(EgressError::Redirect(code))) => {
                (Some(code), format!("answered {code}, a redirect, which is not followed"))
            }
            Err(err) => (None, bounded(&hcp_telemetry::error_chain(&err))),
        };
        let attempt = AttemptResult {
            at,
            status_code,
            error,
            duration_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
        };
        let outcome = if attempt.delivered() {
            AttemptOutcome::Delivered
        } else {
            let jitter = rand::thread_rng().gen_range(0.0..=1.0);
            AttemptOutcome::Retry(hcp_domain::webhook::retry_at(&self.policy, d.attempts + 1, at, jitter))
        };
        let (failures, since) = self.store.record_webhook_attempt(d.seq, e.id, &attempt, outcome).await?;
        if let (AttemptOutcome::Retry(_), Some(since)) = (outcome, since)
            && let Some(reason) = hcp_domain::webhook::disable_reason(&self.policy, failures, since, &attempt)
        {
            tracing::warn!(webhook = %e.id, %reason, "webhook endpoint disabled");
            self.store.disable_webhook(e.id, &reason).await?;
        }
        Ok(())
    }

    /// Signs and POSTs the delivery; the receiver's status.
    async fn send(&self, d: &WebhookDelivery, e: &WebhookEndpoint) -> Result<u16, SendError> {
        let secrets = self.secrets.as_ref().ok_or(SendError::NoKey)?;
        let secret =
            secrets.open_bytes(&secret_aad(e.id), &e.sealed_secret).map_err(|_| SendError::Secret)?;
        let secret = String::from_utf8(secret).map_err(|_| SendError::Secret)?;
        let url = self
            .egress
            .policy()
            .check_url(&e.url)
            .map_err(|err| SendError::Egress(EgressError::Refused(err)))?;
        let body = Bytes::from(d.payload.clone());
        let headers = [
            (SIGNATURE_HEADER, signature(&secret, chrono::Utc::now().timestamp(), &body)),
            (EVENT_ID_HEADER, d.event_id.to_string()),
            (EVENT_TYPE_HEADER, d.event.as_str().to_owned()),
        ];
        let answer = self.egress.post(&url, &headers, body).await.map_err(SendError::Egress)?;
        Ok(answer.status)
    }
}

/// Why a delivery could not be sent.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("core has no secrets key to open the endpoint's secret with")]
    NoKey,
    #[error("the endpoint's secret cannot be opened with core's secrets key")]
    Secret,
    #[error(transparent)]
    Egress(EgressError),
}

/// `text` cut to [`MAX_ERROR`] bytes at a character boundary.
fn bounded(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature of a known input, computed independently with
    /// `printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test`.
    #[test]
    fn signatures_are_hmac_sha256_over_timestamp_dot_body() {
        let got = signature("whsec_test", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(got, format!("t=1700000000,v1={}", EXPECTED));
        assert_ne!(signature("whsec_other", 1_700_000_000, br#"{"a":1}"#), got);
        assert_ne!(signature("whsec_test", 1_700_000_001, br#"{"a":1}"#), got);
    }

    const EXPECTED: &str = "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789";

    #[test]
    fn secrets_are_prefixed_random_and_long() {
        let (a, b) = (new_secret(), new_secret());
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        assert_ne!(a, b);
    }

    #[test]
    fn errors_are_bounded_at_a_character_boundary() {
        let long = "é".repeat(600);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ERROR && cut.chars().all(|c| c == 'é'));
    }
}
