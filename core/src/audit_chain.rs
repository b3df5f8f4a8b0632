//! The audit trail's hash chain: how an event's link is computed, how the
//! chain is checked, and the sealer that extends it and exports its head.
//!
//! Events are written unsealed in the transaction of the action they
//! record, so auditing adds no lock that every request would wait on. The
//! sealer (one per deployment, through a singleton lease) gives them, in the
//! order it finds them, the next sequence number and
//! `hash = HMAC-SHA256(audit key, key id ‖ prev_hash ‖ seq ‖ every column)`,
//! each part length-prefixed, and records the key's id beside it. The audit
//! key is derived from the secrets key (`secrets.key_file`) with
//! HKDF-SHA256, so it never enters the database; the key file may list
//! older keys after the current one ([`KeyRing`]), and events sealed under
//! them still verify.
//!
//! Verification walks the chain in sequence order and names the first
//! events that break it: an edited column changes the MAC; a deleted event
//! leaves a gap in the sequence; an event moved or replaced no longer
//! follows its predecessor's hash. Someone who can write the database but
//! does not hold the key cannot recompute a link that verifies: a link
//! recomputed with plain SHA-256, or under another key, is named.
//!
//! Events sealed without a key (before migration 0011, or by a core with
//! no secrets key) carry the older unkeyed link, SHA-256 over the same
//! parts. They are accepted only as a prefix of the chain, pinned by the
//! first keyed event after them (its MAC covers their head's hash); a chain
//! with no keyed event is reported as unkeyed, not intact.
//!
//! Nothing inside the database stops the one thing a key cannot: cutting
//! off the tail. So the sealer exports the head (sequence, hash, key id) as
//! a log line with target [`HEAD_TARGET`] and, when configured, one line
//! appended to `audit.anchor_file`; `verify` checked `against` such a head
//! fails when the chain no longer holds exactly that hash at that sequence
//! number.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use hcp_proto::error::excerpt;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::model::AuditEvent;
use crate::secrets::SecretKeys;
use crate::store::{ChainHead, ChainedEvent, Store, StoreError};

/// Events sealed per transaction.
const SEAL_BATCH: u32 = 500;
/// Problems reported at most (the first ones break everything after them).
const MAX_PROBLEMS: usize = 20;
/// Name of the sealer's singleton lease.
const LEASE: &str = "audit-sealer";
/// The HKDF info string that derives the audit key from a secrets key.
const KEY_INFO: &[u8] = b"hcp audit chain key v1";
/// Hex digits of a key id.
const KEY_ID_LEN: usize = 16;
/// How a link sealed without a key is shown where a key id would be.
pub const UNKEYED: &str = "unkeyed";
/// The tracing target (and message) of the exported head's log line:
/// `audit_head seq=.. hash=.. key_id=..`.
pub const HEAD_TARGET: &str = "audit_head";

/// The key one audit link is computed under, derived from one secrets key.
#[derive(Clone)]
pub struct AuditKey {
    id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey({})", self.id)
    }
}

impl AuditKey {
    /// Derives the audit key from a secrets key: HKDF-SHA256 with no salt
    /// and a fixed info string, so the secrets key itself never meets the
    /// audit data and the two uses cannot be confused. Its id is the first
    /// 16 hex digits of the SHA-256 of the derived key.
    pub fn derive(secret: &[u8; 32]) -> Self {
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit (255 × 32), so expand
        // cannot fail.
        let _ = Hkdf::<Sha256>::new(None, secret).expand(KEY_INFO, &mut key);
        let mut digest = Sha256::new();
        digest.update(b"hcp audit key id");
        digest.update(key);
        let id = hex::encode(digest.finalize())[..KEY_ID_LEN].to_owned();
        Self { id, key }
    }

    /// The key's id, stored with every link sealed under it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The keyed link of the event at `seq` following `prev_hash`.
    pub fn link(&self, prev_hash: &str, seq: i64, e: &AuditEvent) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        parts(b"hcp.audit.v2", Some(&self.id), prev_hash, seq, e, |b| mac.update(b));
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The audit keys this core holds: the current one (which seals) first,
/// older ones after (which still verify). Empty when core has no secrets
/// key: events are then sealed unkeyed.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<AuditKey>,
}

impl KeyRing {
    /// The audit keys derived from every key of a secrets key file, in its
    /// order.
    pub fn new(secrets: &SecretKeys) -> Self {
        Self { keys: secrets.all().iter().map(AuditKey::derive).collect() }
    }

    /// No key: events are sealed unkeyed and a keyed link cannot be checked.
    pub fn unkeyed() -> Self {
        Self::default()
    }

    /// The key new links are sealed under.
    pub fn current(&self) -> Option<&AuditKey> {
        self.keys.first()
    }

    /// The key with this id.
    pub fn get(&self, id: &str) -> Option<&AuditKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// The link of an event sealed without a key: SHA-256 over the same parts
/// (the link every event had before migration 0011).
pub fn unkeyed_link(prev_hash: &str, seq: i64, e: &AuditEvent) -> String {
    let mut h = Sha256::new();
    parts(b"hcp.audit.v1", None, prev_hash, seq, e, |b| h.update(b));
    hex::encode(h.finalize())
}

/// Feeds every part of a link to `out`, each length-prefixed.
fn parts(
    domain: &[u8],
    key_id: Option<&str>,
    prev_hash: &str,
    seq: i64,
    e: &AuditEvent,
    mut out: impl FnMut(&[u8]),
) {
    let mut part = |bytes: &[u8]| {
        out(&(bytes.len() as u64).to_be_bytes());
        out(bytes);
    };
    part(domain);
    if let Some(id) = key_id {
        part(id.as_bytes());
    }
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
}

/// A head recorded outside the database: the chain must hold exactly
/// `hash` at `seq`. Written `<seq>:<hash>`, as the `seq` and `hash` of an
/// `audit_head` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// A sequence number, from 1.
    pub seq: i64,
    /// The hash the event there had: 64 lowercase hex digits.
    pub hash: String,
}

/// An anchor that is not `<seq>:<hash>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "must be SEQ:HASH (a sequence number from 1, a colon and 64 hex digits, as in an audit_head line), got {got}"
)]
pub struct BadAnchor {
    /// An excerpt of what was given.
    pub got: String,
}

impl std::str::FromStr for Anchor {
    type Err = BadAnchor;

    fn from_str(s: &str) -> Result<Self, BadAnchor> {
        let bad = || BadAnchor { got: excerpt(s) };
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq: i64 = seq.parse().ok().filter(|n| *n >= 1).ok_or_else(bad)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self { seq, hash: hash.to_ascii_lowercase() })
    }
}

/// What is wrong at one place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The sequence number where the chain breaks.
    pub seq: i64,
    /// The event found there ("" when there is none).
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
    /// Sealed events whose link carries no key.
    pub unkeyed: i64,
    /// The last sequence number.
    pub head_seq: i64,
    /// The last hash: record it elsewhere to anchor the chain.
    pub head_hash: String,
    /// The key the last event was sealed under; `None` when unkeyed.
    pub head_key_id: Option<String>,
    /// The first places where the chain breaks; empty when it holds (and
    /// holds the anchor, when one was given).
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether every sealed event is intact, in place, pinned by a key,
    /// and the anchor (if any) holds.
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks events in chain order, one at a time.
#[derive(Debug)]
pub struct ChainCheck<'a> {
    ring: &'a KeyRing,
    against: Option<Anchor>,
    report: Report,
    prev_hash: String,
    /// Whether a keyed event was seen (it pins every unkeyed one before it).
    keyed: bool,
    /// Key ids already reported as not held.
    unknown_keys: Vec<String>,
    /// What the chain holds at the anchor's sequence number, once read:
    /// the event and its hash.
    at_anchor: Option<(String, String)>,
}

impl<'a> ChainCheck<'a> {
    /// A check of links against `ring`, and of the chain against an anchor.
    pub fn new(ring: &'a KeyRing, against: Option<Anchor>) -> Self {
        Self {
            ring,
            against,
            report: Report::default(),
            prev_hash: String::new(),
            keyed: false,
            unknown_keys: Vec::new(),
            at_anchor: None,
        }
    }

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
        // Whether the event's own link holds; None when its key is not held.
        let own_ok = match &c.key_id {
            None => Some(unkeyed_link(&c.prev_hash, c.seq, &c.event) == c.hash),
            Some(key_id) => self.ring.get(key_id).map(|k| k.link(&c.prev_hash, c.seq, &c.event) == c.hash),
        };
        let follows = c.prev_hash == self.prev_hash;
        if c.seq != expected_seq {
            problem(format!("events {expected_seq} to {} are missing before event {id}: deleted", c.seq - 1));
        } else if c.key_id.is_none() && self.keyed {
            problem(format!(
                "event {id} at {} has a link without a key after keyed events: recomputed by someone without \
                 the key",
                c.seq
            ));
        } else if let (None, Some(key_id)) = (own_ok, &c.key_id) {
            if !self.unknown_keys.contains(key_id) {
                self.unknown_keys.push(key_id.clone());
                problem(format!(
                    "event {id} at {} was sealed under key {}, which is not in this core's key ring \
                     (secrets.key_file): it cannot be checked",
                    c.seq,
                    excerpt(key_id)
                ));
            } else if !follows {
                problem(format!("event {id} at {} does not follow the event before it: reordered", c.seq));
            }
        } else if own_ok == Some(false) && !follows {
            problem(format!("event {id} at {} does not belong here: moved or replaced", c.seq));
        } else if own_ok == Some(false) {
            problem(format!(
                "event {id} at {} was changed after it was sealed (or its link recomputed without the key)",
                c.seq
            ));
        } else if !follows {
            problem(format!("event {id} at {} does not follow the event before it: reordered", c.seq));
        }
        if c.key_id.is_some() {
            self.keyed = true;
        } else {
            r.unkeyed += 1;
        }
        if self.against.as_ref().is_some_and(|a| a.seq == c.seq) {
            self.at_anchor = Some((id, c.hash.clone()));
        }
        r.head_seq = c.seq;
        r.head_hash = c.hash.clone();
        r.head_key_id = c.key_id.clone();
        self.prev_hash = c.hash.clone();
    }

    /// The report: what `push` found, with what only the whole chain shows
    /// (no keyed event, an anchor not held) first.
    pub fn finish(self, unsealed: i64) -> Report {
        let mut report = Report { unsealed, ..self.report };
        let mut first = Vec::new();
        if let Some(a) = &self.against {
            match self.at_anchor {
                None if a.seq > report.head_seq => first.push(Problem {
                    seq: a.seq,
                    event_id: String::new(),
                    what: format!(
                        "the anchor's event {} is not in the chain, which ends at {}: truncated",
                        a.seq, report.head_seq
                    ),
                }),
                None => first.push(Problem {
                    seq: a.seq,
                    event_id: String::new(),
                    what: format!("the anchor's event {} is not in the chain: deleted", a.seq),
                }),
                Some((id, hash)) if hash != a.hash => first.push(Problem {
                    seq: a.seq,
                    event_id: id,
                    what: format!(
                        "event at {} has hash {}, the anchor says {}: the chain up to it was rewritten",
                        a.seq,
                        excerpt(&hash),
                        a.hash
                    ),
                }),
                Some(_) => {}
            }
        }
        if report.sealed > 0 && !self.keyed {
            first.push(Problem {
                seq: 1,
                event_id: String::new(),
                what: format!(
                    "events 1 to {} were sealed without a key and no keyed event follows them: the chain is \
                     unkeyed (core has no secrets.key_file)",
                    report.head_seq
                ),
            });
        }
        first.append(&mut report.problems);
        first.truncate(MAX_PROBLEMS);
        report.problems = first;
        report
    }
}

/// Reads the whole chain from the store and checks it against `ring` (and
/// `against`, when given).
pub async fn verify(store: &Store, ring: &KeyRing, against: Option<Anchor>) -> Result<Report, StoreError> {
    // Counted before the chain is read: the sealer may seal events in
    // between, and then they are counted twice (unsealed, then sealed)
    // rather than not at all. "Nothing unsealed" is never claimed for
    // events the chain read did not see.
    let unsealed = store.unsealed_audit_events().await?;
    let mut check = ChainCheck::new(ring, against);
    let mut after = 0;
    loop {
        let page = store.chained_audit_events(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        page.iter().for_each(|c| check.push(c));
    }
    Ok(check.finish(unsealed))
}

/// Seals up to one batch of unsealed events: under the ring's current key,
/// or unkeyed when it has none, but never unkeyed after a keyed head (the
/// events then wait for a sealer with the key). Returns how many were
/// sealed.
pub async fn seal(store: &Store, ring: &KeyRing) -> Result<usize, SealError> {
    match ring.current() {
        Some(key) => {
            Ok(store.seal_audit_events(SEAL_BATCH, Some(key.id()), |p, s, e| key.link(p, s, e)).await?)
        }
        None => match store.audit_chain_head().await? {
            Some(ChainHead { key_id: Some(key_id), .. }) => Err(SealError::Keyless { head_key_id: key_id }),
            _ => Ok(store.seal_audit_events(SEAL_BATCH, None, unkeyed_link).await?),
        },
    }
}

/// The sealer could not extend the chain.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The store failed.
    #[error("cannot seal audit events")]
    Store(#[from] StoreError),
    /// This core has no key and the chain is keyed: a link without a key
    /// after a keyed one would break the chain.
    #[error("the audit chain's head is sealed under key {head_key_id} and this core has no secrets.key_file")]
    Keyless {
        /// The head's key id.
        head_key_id: String,
    },
}

/// Where the chain's head is exported: always a log line (target
/// [`HEAD_TARGET`]); also a file, one line appended per export, when
/// configured. At most once per interval, and only when the head moved.
#[derive(Debug)]
pub struct HeadExport {
    file: Option<PathBuf>,
    every: Duration,
    last: Option<(Instant, ChainHead)>,
}

/// The anchor file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot append to audit.anchor_file {path}")]
pub struct AnchorFileError {
    /// The file.
    pub path: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl HeadExport {
    /// Exports to the log and to `file`, at most once per `every`.
    pub fn new(file: Option<PathBuf>, every: Duration) -> Self {
        Self { file, every, last: None }
    }

    /// Checks that the anchor file can be appended to (creating it when
    /// missing), so a wrong path is refused at start, not on the first
    /// export.
    pub fn check(&self) -> Result<(), AnchorFileError> {
        match &self.file {
            Some(path) => open_append(path).map(drop),
            None => Ok(()),
        }
    }

    /// The line an export writes for `head`, without the newline.
    pub fn line(head: &ChainHead, at: chrono::DateTime<chrono::Utc>) -> String {
        format!(
            "{HEAD_TARGET} seq={} hash={} key_id={} at={}",
            head.seq,
            head.hash,
            head.key_id.as_deref().unwrap_or(UNKEYED),
            at.to_rfc3339_opts(SecondsFormat::Secs, true)
        )
    }

    /// Exports the store's head if the interval passed and it moved since
    /// the last export. A failed export is logged and tried again next time.
    pub async fn tick(&mut self, store: &Store) {
        if self.last.as_ref().is_some_and(|(at, _)| at.elapsed() < self.every) {
            return;
        }
        let head = match store.audit_chain_head().await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit chain's head");
                return;
            }
        };
        if self.last.as_ref().is_some_and(|(_, last)| *last == head) {
            return;
        }
        tracing::info!(
            target: HEAD_TARGET,
            seq = head.seq,
            hash = %head.hash,
            key_id = %head.key_id.as_deref().unwrap_or(UNKEYED),
            "audit_head"
        );
        if let Some(path) = self.file.clone() {
            let line = format!("{}\n", Self::line(&head, crate::model::now()));
            let written = tokio::task::spawn_blocking(move || append(&path, &line)).await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, cause = %e.source, "cannot export the audit chain's head");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot export the audit chain's head");
                    return;
                }
            }
        }
        self.last = Some((Instant::now(), head));
    }
}

fn open_append(path: &std::path::Path) -> Result<std::fs::File, AnchorFileError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AnchorFileError { path: path.display().to_string(), source })
}

/// Appends one line in one write (`O_APPEND`: it lands whole at the end
/// even if another process appends too) and flushes it to disk.
fn append(path: &std::path::Path, line: &str) -> Result<(), AnchorFileError> {
    let mut file = open_append(path)?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|source| AnchorFileError { path: path.display().to_string(), source })
}

/// Seals new events every `every` while this process holds the sealer's
/// lease, and exports the head, until `stop` changes.
pub async fn run_sealer(
    store: Store,
    ring: Arc<KeyRing>,
    mut export: HeadExport,
    owner: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut keyless_warned = false;
    loop {
        let t = crate::model::now();
        let until = t + chrono::Duration::from_std(every * 10).unwrap_or(chrono::Duration::seconds(10));
        match store.acquire_singleton(LEASE, &owner, t, until).await {
            Ok(true) => {
                loop {
                    match seal(&store, &ring).await {
                        Ok(n) if n == SEAL_BATCH as usize => continue,
                        Ok(_) => break,
                        Err(e @ SealError::Keyless { .. }) => {
                            if !keyless_warned {
                                tracing::error!(error = %e, "audit events stay unsealed until a core with the key seals them");
                                keyless_warned = true;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "cannot seal audit events");
                            break;
                        }
                    }
                }
                export.tick(&store).await;
            }
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

    fn key(byte: u8) -> AuditKey {
        AuditKey::derive(&[byte; 32])
    }

    fn ring(bytes: &[u8]) -> KeyRing {
        let text: String = bytes.iter().map(|b| format!("{}\n", hex::encode([*b; 32]))).collect();
        KeyRing::new(&SecretKeys::parse(&text, "k").unwrap())
    }

    /// Seals `event` after `prev` under `key` (unkeyed when None).
    fn seal_one(prev: Option<&ChainedEvent>, event: AuditEvent, key: Option<&AuditKey>) -> ChainedEvent {
        let seq = prev.map_or(1, |p| p.seq + 1);
        let prev_hash = prev.map(|p| p.hash.clone()).unwrap_or_default();
        let c = ChainedEvent { event, seq, prev_hash: String::new(), hash: String::new(), key_id: None };
        relink(c, &prev_hash, key)
    }

    /// Gives `c` the link after `prev_hash` under `key`, as a sealer (or
    /// someone recomputing the chain) would.
    fn relink(mut c: ChainedEvent, prev_hash: &str, key: Option<&AuditKey>) -> ChainedEvent {
        c.prev_hash = prev_hash.to_owned();
        c.hash = match key {
            Some(k) => k.link(prev_hash, c.seq, &c.event),
            None => unkeyed_link(prev_hash, c.seq, &c.event),
        };
        c.key_id = key.map(|k| k.id().to_owned());
        c
    }

    /// Renumbers from 1 and recomputes every link from `from` on.
    fn recompute(events: &mut [ChainedEvent], from: usize, key: Option<&AuditKey>, claimed_id: Option<&str>) {
        for i in 0..events.len() {
            events[i].seq = i as i64 + 1;
            if i + 1 >= from {
                let prev = if i == 0 { String::new() } else { events[i - 1].hash.clone() };
                events[i] = relink(events[i].clone(), &prev, key);
                if let Some(id) = claimed_id {
                    events[i].key_id = Some(id.to_owned());
                }
            }
        }
    }

    fn chain(n: usize, key: Option<&AuditKey>) -> Vec<ChainedEvent> {
        let mut out: Vec<ChainedEvent> = Vec::new();
        for seq in 1..=n {
            let c = seal_one(out.last(), event(&format!("d{seq}")), key);
            out.push(c);
        }
        out
    }

    fn check(ring: &KeyRing, events: &[ChainedEvent], against: Option<Anchor>) -> Report {
        let mut c = ChainCheck::new(ring, against);
        events.iter().for_each(|e| c.push(e));
        c.finish(0)
    }

    #[test]
    fn the_audit_key_is_derived_and_named_by_a_digest() {
        let (a, b) = (key(1), key(2));
        assert_eq!(a.id().len(), 16);
        assert!(a.id().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.id(), key(1).id(), "derivation is deterministic");
        assert_ne!(a.id(), b.id());
        // The derived key is not the secrets key: a MAC under the raw key
        // differs.
        let e = event("x");
        let mut raw = Hmac::<Sha256>::new_from_slice(&[1; 32]).unwrap();
        parts(b"hcp.audit.v2", Some(a.id()), "", 1, &e, |p| raw.update(p));
        assert_ne!(hex::encode(raw.finalize().into_bytes()), a.link("", 1, &e));
        assert!(!format!("{a:?}").contains(&hex::encode(a.key)), "Debug hides the key");
    }

    #[test]
    fn an_intact_keyed_chain_holds() {
        let k = key(1);
        let events = chain(5, Some(&k));
        let r = check(&ring(&[1]), &events, None);
        assert!(r.intact(), "{r:?}");
        assert_eq!((r.sealed, r.head_seq, r.head_hash.as_str()), (5, 5, events[4].hash.as_str()));
        assert_eq!((r.unkeyed, r.head_key_id.as_deref()), (0, Some(k.id())));
    }

    #[test]
    fn edits_deletions_and_reorders_are_named() {
        let k = key(1);
        let ring = ring(&[1]);
        let mut edited = chain(5, Some(&k));
        edited[2].event.detail = "nothing happened".into();
        let r = check(&ring, &edited, None);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert_eq!(r.problems[0].seq, 3);
        assert!(r.problems[0].what.contains("changed"));

        let mut deleted = chain(5, Some(&k));
        deleted.remove(1);
        let r = check(&ring, &deleted, None);
        assert_eq!(r.problems[0].seq, 3);
        assert!(r.problems[0].what.contains("missing") && r.problems[0].what.contains("deleted"));

        // Two events swap places (their sequence numbers swapped).
        let mut swapped = chain(5, Some(&k));
        swapped.swap(1, 2);
        swapped[1].seq = 2;
        swapped[2].seq = 3;
        let r = check(&ring, &swapped, None);
        assert_eq!(r.problems[0].seq, 2, "{r:?}");
        assert!(r.problems[0].what.contains("moved"));
    }

    /// Each tampering, then the chain recomputed from the tampered place
    /// on by someone without the key, each way they could: plain SHA-256
    /// (the unkeyed link), or an HMAC under a key of their own, with its id
    /// or claiming the real key's. Every one is named at the tampered place.
    #[test]
    fn tampering_with_links_recomputed_without_the_key_is_named() {
        let k = key(1);
        let ring = ring(&[1]);
        let wrong = key(9);
        type Tamper = fn(&mut Vec<ChainedEvent>) -> usize;
        let tamperings: [(&str, Tamper); 4] = [
            ("edited", |c| {
                c[2].event.detail = "nothing happened".into();
                3
            }),
            ("deleted", |c| {
                c.remove(2);
                3
            }),
            ("reordered", |c| {
                c.swap(2, 3);
                3
            }),
            ("inserted", |c| {
                let mut forged = c[0].clone();
                forged.event = event("forged");
                c.insert(2, forged);
                3
            }),
        ];
        for (what, tamper) in tamperings {
            for (how, key, claimed) in [
                ("plain SHA-256", None, None),
                ("plain SHA-256 claiming the key", None, Some(k.id())),
                ("another key", Some(&wrong), None),
                ("another key claiming the key's id", Some(&wrong), Some(k.id())),
            ] {
                let mut events = chain(6, Some(&k));
                let at = tamper(&mut events);
                recompute(&mut events, at, key, claimed);
                let r = check(&ring, &events, None);
                assert!(!r.intact(), "{what}, recomputed with {how}: {r:?}");
                assert_eq!(r.problems[0].seq, at as i64, "{what}, recomputed with {how}: {r:?}");
                // Recomputed from the first event on, it is still named.
                let mut events = chain(6, Some(&k));
                tamper(&mut events);
                recompute(&mut events, 1, key, claimed);
                let r = check(&ring, &events, None);
                assert!(!r.intact() && r.problems[0].seq == 1, "{what}, all recomputed with {how}: {r:?}");
            }
        }
    }

    #[test]
    fn older_keys_in_the_ring_still_verify_and_missing_ones_are_named() {
        let (old, new) = (key(1), key(2));
        let mut events = chain(3, Some(&old));
        for seq in 4..=6 {
            let c = seal_one(events.last(), event(&format!("d{seq}")), Some(&new));
            events.push(c);
        }
        let r = check(&ring(&[2, 1]), &events, None);
        assert!(r.intact(), "{r:?}");
        assert_eq!(r.head_key_id.as_deref(), Some(new.id()));
        // Without the older key, its events cannot be checked: named once.
        let r = check(&ring(&[2]), &events, None);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].seq == 1 && r.problems[0].what.contains(old.id()), "{r:?}");
        // A core without any key cannot check a keyed chain.
        assert!(!check(&KeyRing::unkeyed(), &events, None).intact());
    }

    #[test]
    fn unkeyed_events_are_pinned_by_the_first_keyed_one_and_not_intact_alone() {
        let k = key(1);
        let ring = ring(&[1]);
        // Sealed before the key: an unkeyed prefix, then keyed events.
        let mut events = chain(3, None);
        for seq in 4..=5 {
            let c = seal_one(events.last(), event(&format!("d{seq}")), Some(&k));
            events.push(c);
        }
        let r = check(&ring, &events, None);
        assert!(r.intact(), "{r:?}");
        assert_eq!(r.unkeyed, 3);
        // The prefix edited and recomputed: the first keyed event no longer
        // follows.
        let mut edited = events.clone();
        edited[1].event.actor = "nobody".into();
        recompute(&mut edited[..3], 2, None, None);
        let r = check(&ring, &edited, None);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].seq == 4 && r.problems[0].what.contains("does not follow"), "{r:?}");
        // Only unkeyed events: reported as unkeyed, not intact.
        let r = check(&KeyRing::unkeyed(), &chain(3, None), None);
        assert!(!r.intact(), "{r:?}");
        assert!(r.problems[0].what.contains("unkeyed"), "{r:?}");
        assert_eq!((r.unkeyed, r.head_key_id), (3, None));
    }

    #[test]
    fn an_anchor_names_a_truncated_or_rewritten_chain() {
        let k = key(1);
        let ring = ring(&[1]);
        let events = chain(5, Some(&k));
        let anchor = Anchor { seq: 4, hash: events[3].hash.clone() };
        assert!(check(&ring, &events, Some(anchor.clone())).intact());
        // The tail cut off from the anchor on: the rest is intact, but the
        // anchor's event is gone.
        let r = check(&ring, &events[..3], Some(anchor.clone()));
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].seq == 4 && r.problems[0].what.contains("truncated"), "{r:?}");
        // Rewritten under the key (someone who holds it): every link holds,
        // but not the anchor.
        let mut rewritten = events.clone();
        rewritten[1].event.outcome = "denied".into();
        recompute(&mut rewritten, 2, Some(&k), None);
        assert!(check(&ring, &rewritten, None).intact());
        let r = check(&ring, &rewritten, Some(anchor));
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].what.contains("rewritten"), "{r:?}");
        assert_eq!(r.problems[0].event_id, rewritten[3].event.id.to_string());
    }

    #[test]
    fn anchors_parse_strictly() {
        let hash = "ab".repeat(32);
        assert_eq!(format!("7:{hash}").parse(), Ok(Anchor { seq: 7, hash: hash.clone() }));
        assert_eq!(format!("7:{}", hash.to_uppercase()).parse::<Anchor>().unwrap().hash, hash);
        for bad in [
            String::new(),
            "7".into(),
            hash.clone(),
            format!("0:{hash}"),
            format!("-1:{hash}"),
            format!("x:{hash}"),
            format!("7:{}", &hash[1..]),
            format!("7:{hash}0"),
            format!("7:{}zz", &hash[2..]),
            format!("7: {hash}"),
            "9".repeat(10_000),
        ] {
            let err = bad.parse::<Anchor>().unwrap_err();
            assert!(err.to_string().starts_with("must be SEQ:HASH"), "{bad}");
            assert!(err.to_string().len() < 300, "the error quotes an excerpt: {err}");
        }
    }

    #[test]
    fn the_exported_line_names_seq_hash_and_key() {
        let at = chrono::DateTime::parse_from_rfc3339("2025-01-02T03:04:05Z").unwrap().to_utc();
        let head = ChainHead { seq: 12, hash: "ab".repeat(32), key_id: Some("0123456789abcdef".into()) };
        let line = HeadExport::line(&head, at);
        assert_eq!(
            line,
            format!(
                "audit_head seq=12 hash={} key_id=0123456789abcdef at=2025-01-02T03:04:05Z",
                "ab".repeat(32)
            )
        );
        let unkeyed = HeadExport::line(&ChainHead { key_id: None, ..head }, at);
        assert!(unkeyed.contains("key_id=unkeyed"), "{unkeyed}");
    }
}
