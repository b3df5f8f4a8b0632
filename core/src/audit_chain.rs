//! The audit trail's hash chain: how an event's hash is computed, how the
//! chain is checked, and the sealer that extends it.
//!
//! Events are written unsealed in the transaction of the action they
//! record, so auditing adds no lock that every request would wait on. The
//! sealer (one per deployment, through a singleton lease) gives them, in the
//! order it finds them, the next sequence number and
//! `hash = SHA-256(prev_hash ‖ seq ‖ every column)`, each part
//! length-prefixed. Verification walks the chain in sequence order and
//! names the first events that break it: an edited column changes the hash;
//! a deleted event leaves a gap in the sequence; an event moved or replaced
//! no longer follows its predecessor's hash.
//!
//! The hashes carry no secret: they show that sealed history was not
//! changed by anyone who did not also recompute the chain after it. The
//! verifier reports the head (sequence number and hash); recorded outside
//! the database (a log, a ticket), it anchors everything before it.

use std::time::Duration;

use chrono::SecondsFormat;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::model::AuditEvent;
use crate::store::{ChainedEvent, Store, StoreError};

/// Events sealed per transaction.
const SEAL_BATCH: u32 = 500;
/// Problems reported at most (the first ones break everything after them).
const MAX_PROBLEMS: usize = 20;
/// Name of the sealer's singleton lease.
const LEASE: &str = "audit-sealer";

/// The hash of the event at `seq` following `prev_hash`.
pub fn link_hash(prev_hash: &str, seq: i64, e: &AuditEvent) -> String {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(b"hcp.audit.v1");
    part(prev_hash.as_bytes());
    part(&seq.to_be_bytes());
    part(e.id.0.as_bytes());
    part(e.at.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
    for text in [
        &e.actor,
        &e.tenant_id,
        &e.project_id,
        &e.action,
        &e.resource_type,
        &e.resource_id,
        &e.outcome,
        &e.job_id,
        &e.trace_id,
        &e.detail,
    ] {
        part(text.as_bytes());
    }
    hex::encode(h.finalize())
}

/// What is wrong at one place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The sequence number where the chain breaks.
    pub seq: i64,
    /// The event found there.
    pub event_id: String,
    /// What is wrong, in words.
    pub what: String,
}

/// The result of checking the whole chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Sealed events read.
    pub sealed: i64,
    /// Events not sealed yet (the sealer runs every second).
    pub unsealed: i64,
    /// The last sequence number.
    pub head_seq: i64,
    /// The last hash: record it elsewhere to anchor the chain.
    pub head_hash: String,
    /// The first places where the chain breaks; empty when it holds.
    pub problems: Vec<Problem>,
}

/// Checks events in chain order, one at a time.
#[derive(Debug, Default)]
pub struct ChainCheck {
    report: Report,
    prev_hash: String,
}

impl ChainCheck {
    /// Checks the next event read in sequence order.
    pub fn push(&mut self, c: &ChainedEvent) {
        let r = &mut self.report;
        r.sealed += 1;
        let expected_seq = r.head_seq + 1;
        let id = c.event.id.to_string();
        let mut problem = |what: String| {
            if r.problems.len() < MAX_PROBLEMS {
                r.problems.push(Problem { seq: c.seq, event_id: id.clone(), what });
            }
        };
        let own_ok = link_hash(&c.prev_hash, c.seq, &c.event) == c.hash;
        let follows = c.prev_hash == self.prev_hash;
        if c.seq != expected_seq {
            problem(format!("events {expected_seq} to {} are missing before event {id}: deleted", c.seq - 1));
        } else if !own_ok && !follows {
            problem(format!("event {id} at {} does not belong here: moved or replaced", c.seq));
        } else if !own_ok {
            problem(format!("event {id} at {} was changed after it was sealed", c.seq));
        } else if !follows {
            problem(format!("event {id} at {} does not follow the event before it: reordered", c.seq));
        }
        r.head_seq = c.seq;
        r.head_hash = c.hash.clone();
        self.prev_hash = c.hash.clone();
    }

    /// The report so far.
    pub fn finish(self, unsealed: i64) -> Report {
        Report { unsealed, ..self.report }
    }
}

/// Reads the whole chain from the store and checks it.
pub async fn verify(store: &Store) -> Result<Report, StoreError> {
    // Counted before the chain is read: the sealer may seal events in
    // between, and then they are counted twice (unsealed, then sealed)
    // rather than not at all. "Nothing unsealed" is never claimed for
    // events the chain read did not see.
    let unsealed = store.unsealed_audit_events().await?;
    let mut check = ChainCheck::default();
    let mut after = 0;
    loop {
        let page = store.chained_audit_events(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        page.iter().for_each(|c| check.push(c));
    }
    Ok(check.finish(unsealed))
}

/// Seals new events every `every` while this process holds the sealer's
/// lease, until `stop` changes.
pub async fn run_sealer(store: Store, owner: String, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let t = crate::model::now();
        let until = t + chrono::Duration::from_std(every * 10).unwrap_or(chrono::Duration::seconds(10));
        match store.acquire_singleton(LEASE, &owner, t, until).await {
            Ok(true) => loop {
                match store.seal_audit_events(SEAL_BATCH, link_hash).await {
                    Ok(n) if n == SEAL_BATCH as usize => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "cannot seal audit events");
                        break;
                    }
                }
            },
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot take the audit sealer's lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use hcp_proto::ids::EventId;

    use super::*;

    fn event(detail: &str) -> AuditEvent {
        AuditEvent {
            id: EventId::new(),
            at: crate::model::now(),
            actor: "alice".into(),
            tenant_id: "acme".into(),
            project_id: "demo".into(),
            action: "vm.create".into(),
            resource_type: "vm".into(),
            resource_id: "r".into(),
            outcome: "accepted".into(),
            job_id: String::new(),
            trace_id: String::new(),
            detail: detail.into(),
        }
    }

    fn chain(n: usize) -> Vec<ChainedEvent> {
        let mut prev = String::new();
        (1..=n as i64)
            .map(|seq| {
                let e = event(&format!("d{seq}"));
                let hash = link_hash(&prev, seq, &e);
                let c = ChainedEvent { event: e, seq, prev_hash: prev.clone(), hash: hash.clone() };
                prev = hash;
                c
            })
            .collect()
    }

    fn check(events: &[ChainedEvent]) -> Report {
        let mut c = ChainCheck::default();
        events.iter().for_each(|e| c.push(e));
        c.finish(0)
    }

    #[test]
    fn an_intact_chain_holds() {
        let events = chain(5);
        let r = check(&events);
        assert!(r.problems.is_empty(), "{r:?}");
        assert_eq!((r.sealed, r.head_seq, r.head_hash.as_str()), (5, 5, events[4].hash.as_str()));
    }

    #[test]
    fn edits_deletions_and_reorders_are_named() {
        let mut edited = chain(5);
        edited[2].event.detail = "nothing happened".into();
        let r = check(&edited);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert_eq!(r.problems[0].seq, 3);
        assert!(r.problems[0].what.contains("changed"));

        let mut deleted = chain(5);
        deleted.remove(1);
        let r = check(&deleted);
        assert_eq!(r.problems[0].seq, 3);
        assert!(r.problems[0].what.contains("missing") && r.problems[0].what.contains("deleted"));

        // Two events swap places (their sequence numbers swapped).
        let mut swapped = chain(5);
        swapped.swap(1, 2);
        swapped[1].seq = 2;
        swapped[2].seq = 3;
        let r = check(&swapped);
        assert_eq!(r.problems[0].seq, 2, "{r:?}");
        assert!(r.problems[0].what.contains("moved"));

        // Even the last event cannot be deleted unnoticed if the head was
        // recorded: the head moves back.
        let mut truncated = chain(5);
        let head = truncated[4].hash.clone();
        truncated.pop();
        assert_ne!(check(&truncated).head_hash, head);
    }
}
