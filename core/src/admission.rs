//! Admission control for core's gRPC server: what a call must get past
//! before a handler runs, after [`crate::auth::AuthLayer`] has named the
//! caller.
//!
//! - **Per-tenant rate limit**: one bucket per tenant of
//!   `limits.rate_per_second` with bursts of `limits.burst`, shared by every
//!   API process through the store ([`crate::store::Store::claim_rate_tokens`]);
//!   past it, RATE_LIMITED (429) with the seconds until a token is free. One
//!   tenant's flood uses up its own bucket, not the others'. Operators and
//!   HCP's own services carry no tenant and are not rate-limited (load
//!   shedding still applies to them).
//! - **Load shedding**: at most `limits.max_concurrent_requests` calls run
//!   at once; one more is refused at once with UNAVAILABLE and
//!   `retry_after_seconds`, instead of queueing until every caller times
//!   out.
//! - **Timeout**: a call that has not answered within
//!   `limits.request_timeout_seconds` gets DEADLINE_EXCEEDED (a
//!   server-streaming call only needs to start within it).
//!
//! Health and reflection calls are not counted.
//!
//! # The shared rate limit
//!
//! A process claims a tenant's tokens from the shared bucket in batches of
//! at most `k = max(1, ⌊min(burst / 4, rate / 10)⌋)` ([`batch_size`]), one
//! statement per batch, and spends them locally, so a flood costs one
//! database round trip per batch, none while tokens last. It asks for one
//! token first, for twice the last batch each time it spends a whole one
//! (up to `k`), and for as many as it spent when a batch lapses with
//! tokens left, so a tenant calling slowly through many processes strands
//! few tokens. Tokens not spent within [`LEASE`] (1 s) of their claim lapse
//! and are not given back. A claim that gets nothing tells how long the
//! bucket needs to hold the next batch; until then the tenant's calls are
//! refused without asking the database again.
//!
//! **The bound.** Every admitted call spent a token the shared bucket
//! granted, the bucket grants at most `rate × d + burst` in any span `d`
//! of the database's clock, and each process holds at most one batch (at
//! most `k` tokens) per tenant. So with `N` API processes, a tenant's
//! admitted calls in any interval of length `d` number at most
//! `rate × d + burst + N × k`, the last term being tokens claimed before
//! the interval and spent in it (each lapses within [`LEASE`] of its
//! claim). With the defaults (200/s, burst 400, `k` = 20) and four API
//! processes: at most `200 × d + 480`. The interval is on the database's
//! clock; on another host's clock it may differ by the time a claim takes.
//!
//! **When the database cannot be reached** (a claim fails or takes more
//! than [`CLAIM_TIMEOUT`]), each process decides by a token bucket of its
//! own instead, as if it were alone (at most `rate × d + burst` per
//! process: the limit fails open to the per-process one, never to none).
//! This is logged once per outage, every call so decided counts
//! `hcp_rate_limit_fallback_total`, and the shared bucket is tried again
//! after [`RETRY_SHARED`]. Claims count `hcp_rate_limit_claims_total` by
//! `outcome` (`granted`, `empty`, `failed`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use hcp_proto::error::{ApiError, ErrorCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::config::{Invalid, LimitsConfig};
use crate::error::DETAIL_RETRY_AFTER;
use crate::store::{RateClaim, RateLimit, Store, StoreError};

/// How long claimed tokens may be spent before they lapse.
pub const LEASE: Duration = Duration::from_secs(1);
/// A claim that has not answered within this long counts as a failed one.
pub const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed claim, how long calls are decided by this process's own
/// buckets before the shared ones are tried again.
pub const RETRY_SHARED: Duration = Duration::from_secs(1);

/// Tenants (and local buckets) kept at most; idle ones are dropped first
/// when full.
const MAX_BUCKETS: usize = 100_000;

/// The most tokens one claim takes: `max(1, ⌊min(burst / 4, rate / 10)⌋)`,
/// a tenth of a second's worth and a quarter of the burst.
pub fn batch_size(limit: RateLimit) -> u32 {
    let k = (limit.burst() / 4.0).min(limit.rate_per_second() / 10.0).floor();
    // `as` saturates; the range is [1, u32::MAX].
    (k as u32).max(1)
}

/// Where the tenants' shared buckets are kept: the store, or a stand-in in
/// tests.
pub trait SharedBuckets: Send + Sync + std::fmt::Debug {
    /// Claims up to `want` of `tenant`'s tokens under `limit`, as
    /// [`Store::claim_rate_tokens`] does.
    fn claim<'a>(
        &'a self,
        tenant: &'a str,
        want: u32,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<RateClaim, StoreError>>;
}

impl SharedBuckets for Store {
    fn claim<'a>(
        &'a self,
        tenant: &'a str,
        want: u32,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<RateClaim, StoreError>> {
        Box::pin(self.claim_rate_tokens(tenant, want, limit))
    }
}

/// Per-tenant rate limits shared by every API process: tokens claimed in
/// batches from the shared buckets and spent here, and this process's own
/// buckets for when the shared ones cannot be reached.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    batch: u32,
    shared: Arc<dyn SharedBuckets>,
    tenants: Mutex<HashMap<String, Tenant>>,
    local: LocalBuckets,
    /// Since a failed claim: until when this process's own buckets decide.
    outage: Mutex<Option<Instant>>,
}

/// What this process holds of one tenant's shared bucket.
#[derive(Debug)]
struct Tenant {
    /// Granted tokens not spent yet.
    tokens: u32,
    /// When they lapse.
    lapse_at: Instant,
    /// What the last claim asked for, and how many of its tokens were spent.
    asked: u32,
    spent: u32,
    /// After a claim that got nothing: the shared bucket holds fewer than
    /// `asked` tokens until `empty_until`, and none until `next_token`.
    empty_until: Option<Instant>,
    next_token: Instant,
    /// One claim at a time for the tenant: calls arriving meanwhile wait
    /// for its batch rather than claiming one each.
    claiming: Arc<tokio::sync::Mutex<()>>,
}

impl Tenant {
    fn new(now: Instant) -> Self {
        Self {
            tokens: 0,
            lapse_at: now,
            asked: 0,
            spent: 0,
            empty_until: None,
            next_token: now,
            claiming: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Whether dropping it would lose something: tokens, a refusal still
    /// running, or a claim in flight.
    fn busy(&self, now: Instant) -> bool {
        (self.tokens > 0 && now < self.lapse_at)
            || self.empty_until.is_some_and(|u| now < u)
            || Arc::strong_count(&self.claiming) > 1
    }

    /// How many tokens the next claim asks for: twice the last batch when
    /// it was spent (the first claim asks for one), as many as were spent
    /// when it lapsed with tokens left; at most `batch`.
    fn next_ask(&self, batch: u32) -> u32 {
        if self.tokens == 0 { self.asked.saturating_mul(2) } else { self.spent }.clamp(1, batch)
    }
}

/// What this process decides about a call without the database.
enum Local {
    Admit,
    Refuse(Duration),
    Claim(Arc<tokio::sync::Mutex<()>>),
}

impl RateLimiter {
    /// `limit` for each tenant, its buckets kept in `shared`.
    pub fn new(limit: RateLimit, shared: Arc<dyn SharedBuckets>) -> Self {
        Self {
            limit,
            batch: batch_size(limit),
            shared,
            tenants: Mutex::new(HashMap::new()),
            local: LocalBuckets::new(limit.rate_per_second(), limit.burst()),
            outage: Mutex::new(None),
        }
    }

    /// Takes a token for `tenant`; when none is left, how long until one
    /// is.
    pub async fn take(&self, tenant: &str) -> Result<(), Duration> {
        let lock = match self.spend(tenant, Instant::now()) {
            Local::Admit => return Ok(()),
            Local::Refuse(wait) => return Err(wait),
            Local::Claim(lock) => lock,
        };
        if self.in_outage(Instant::now()) {
            return self.fallback(tenant);
        }
        let _claiming = lock.lock().await;
        // The claim that held the lock may have left tokens or a refusal.
        let now = Instant::now();
        match self.spend(tenant, now) {
            Local::Admit => return Ok(()),
            Local::Refuse(wait) => return Err(wait),
            Local::Claim(_) => {}
        }
        if self.in_outage(now) {
            return self.fallback(tenant);
        }
        let want = self.lock_tenants().get(tenant).map_or(1, |t| t.next_ask(self.batch));
        let claimed = tokio::time::timeout(CLAIM_TIMEOUT, self.shared.claim(tenant, want, self.limit)).await;
        let now = Instant::now();
        let claim = match claimed {
            Ok(Ok(claim)) => claim,
            Ok(Err(e)) => {
                self.failed(now, &e);
                return self.fallback(tenant);
            }
            Err(_) => {
                self.failed(now, &ClaimTimedOut(CLAIM_TIMEOUT));
                return self.fallback(tenant);
            }
        };
        self.recovered();
        let outcome = if claim.granted > 0 { "granted" } else { "empty" };
        metrics::counter!("hcp_rate_limit_claims_total", "outcome" => outcome).increment(1);
        let mut tenants = self.lock_tenants();
        let t = tenants.entry(tenant.to_owned()).or_insert_with(|| Tenant::new(now));
        t.asked = want;
        t.tokens = claim.granted;
        t.spent = 0;
        t.lapse_at = now + LEASE;
        if claim.granted > 0 {
            t.tokens -= 1;
            t.spent = 1;
            t.empty_until = None;
            Ok(())
        } else {
            let wait = claim.wait_for(1, self.limit);
            t.empty_until = Some(now + claim.wait_for(want, self.limit));
            t.next_token = now + wait;
            Err(wait)
        }
    }

    fn lock_tenants(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tenant>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spends a held token, refuses while the shared bucket is known to be
    /// empty, or says a claim is needed.
    fn spend(&self, tenant: &str, now: Instant) -> Local {
        let mut tenants = self.lock_tenants();
        if let Some(t) = tenants.get_mut(tenant) {
            if t.tokens > 0 && now < t.lapse_at {
                t.tokens -= 1;
                t.spent += 1;
                return Local::Admit;
            }
            if let Some(until) = t.empty_until
                && now < until
            {
                return Local::Refuse(t.next_token.saturating_duration_since(now));
            }
            return Local::Claim(t.claiming.clone());
        }
        // A tenant this process has not seen (or has forgotten).
        if tenants.len() >= MAX_BUCKETS {
            tenants.retain(|_, t| t.busy(now));
        }
        let t = Tenant::new(now);
        let claiming = t.claiming.clone();
        tenants.insert(tenant.to_owned(), t);
        Local::Claim(claiming)
    }

    fn in_outage(&self, now: Instant) -> bool {
        self.outage.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|until| now < until)
    }

    /// A claim failed: this process's own buckets decide for a while;
    /// logged when an outage begins.
    fn failed(&self, now: Instant, error: &(dyn std::error::Error + 'static)) {
        metrics::counter!("hcp_rate_limit_claims_total", "outcome" => "failed").increment(1);
        let began =
            self.outage.lock().unwrap_or_else(|e| e.into_inner()).replace(now + RETRY_SHARED).is_none();
        if began {
            tracing::warn!(
                error = %hcp_telemetry::error_chain(error),
                "the shared rate buckets cannot be reached; each tenant is limited by this process's own bucket until they can"
            );
        }
    }

    /// A claim answered: an outage, if any, is over.
    fn recovered(&self) {
        if self.outage.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
            tracing::info!("the shared rate buckets answer again; tenants are limited across API processes");
        }
    }

    /// Decides by this process's own bucket.
    fn fallback(&self, tenant: &str) -> Result<(), Duration> {
        metrics::counter!("hcp_rate_limit_fallback_total").increment(1);
        self.local.take(tenant, Instant::now())
    }
}

/// A claim did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("the claim took more than {0:?}")]
struct ClaimTimedOut(Duration);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by caller, in this process alone: what limits tenants
/// while the shared buckets cannot be reached.
#[derive(Debug)]
pub struct LocalBuckets {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl LocalBuckets {
    /// `rate` tokens per second, at most `burst` saved up.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `who` at `now`; when none is left, how long until
    /// one is.
    pub fn take(&self, who: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(who) {
            // Full buckets are indistinguishable from new ones: drop them.
            let burst = self.burst;
            let rate = self.rate;
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(who.to_owned()).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

/// The admission layer.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    limiter: Arc<RateLimiter>,
    timeout: Duration,
}

impl AdmissionLayer {
    /// From the `[limits]` configuration, tenants' buckets kept in
    /// `shared`; refused like [`crate::config::Config::validate`] when the
    /// rate limit is out of range.
    pub fn new(c: &LimitsConfig, shared: Arc<dyn SharedBuckets>) -> Result<Self, Invalid> {
        Ok(Self {
            permits: Arc::new(Semaphore::new(c.max_concurrent_requests)),
            limiter: Arc::new(RateLimiter::new(c.rate_limit()?, shared)),
            timeout: Duration::from_secs(c.request_timeout_seconds),
        })
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission { inner, layer: self.clone() }
    }
}

/// The service [`AdmissionLayer`] makes.
#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

fn refusal(err: ApiError) -> http::Response<tonic::body::Body> {
    crate::error::status(err).into_http()
}

impl<S, B> tower::Service<http::Request<B>> for Admission<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Calls the auth layer let through without a principal are the
        // open ones (health, reflection).
        let Some(principal) = req.extensions().get::<Principal>() else {
            return Box::pin(inner.call(req));
        };
        // Tenants are limited; operators and HCP's own services (no
        // tenant) are only subject to load shedding.
        let tenant = principal.tenant_id.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            if let Some(tenant) = tenant
                && let Err(wait) = layer.limiter.take(&tenant).await
            {
                let secs = wait.as_secs().max(1);
                let err = ApiError::new(
                    ErrorCode::RateLimited,
                    format!("too many requests from this caller; retry in {secs} s"),
                )
                .with_detail(DETAIL_RETRY_AFTER, secs.to_string());
                return Ok(refusal(err));
            }
            let Ok(permit) = layer.permits.clone().try_acquire_owned() else {
                tracing::warn!("core is at its concurrency limit; shedding a request");
                let err = ApiError::new(ErrorCode::Unavailable, "core is overloaded; retry later")
                    .with_detail(DETAIL_RETRY_AFTER, "1");
                return Ok(refusal(err));
            };
            let timeout = layer.timeout;
            let result = tokio::time::timeout(timeout, inner.call(req)).await;
            drop(permit);
            match result {
                Ok(r) => r,
                Err(_) => Ok(refusal(ApiError::new(
                    ErrorCode::DeadlineExceeded,
                    format!("the request did not finish within {} s", timeout.as_secs()),
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn local_buckets_refill_and_are_per_caller() {
        let l = LocalBuckets::new(10.0, 3.0);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.take("a", t).is_ok());
        }
        let wait = l.take("a", t).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Another caller is unaffected.
        assert!(l.take("b", t).is_ok());
        // A tenth of a second later, one more.
        assert!(l.take("a", t + Duration::from_millis(100)).is_ok());
        assert!(l.take("a", t + Duration::from_millis(100)).is_err());
        // Never more than the burst saved up.
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.take("a", later).is_ok());
        }
        assert!(l.take("a", later).is_err());
    }

    #[test]
    fn a_batch_is_a_tenth_of_a_second_and_a_quarter_of_the_burst() {
        let k = |rate, burst| batch_size(RateLimit::new(rate, burst).unwrap());
        assert_eq!(k(200.0, 400.0), 20);
        assert_eq!(k(200.0, 40.0), 10);
        assert_eq!(k(5.0, 5.0), 1);
        assert_eq!(k(0.5, 1.0), 1);
        assert_eq!(k(1e9, 1e9), 100_000_000);
        assert_eq!(k(1e300, 1e300), u32::MAX);
    }

    /// A shared bucket in memory on the test's (paused) clock, doing what
    /// the store's statement does, counting claims; it can be made
    /// unreachable.
    #[derive(Debug, Default)]
    struct Memory {
        state: Mutex<MemoryState>,
    }

    #[derive(Debug, Default)]
    struct MemoryState {
        tat: HashMap<String, Instant>,
        claims: usize,
        granted: u64,
        down: bool,
    }

    impl Memory {
        fn claims(&self) -> usize {
            self.state.lock().unwrap().claims
        }
        fn granted(&self) -> u64 {
            self.state.lock().unwrap().granted
        }
        fn set_down(&self, down: bool) {
            self.state.lock().unwrap().down = down;
        }
    }

    impl SharedBuckets for Memory {
        fn claim<'a>(
            &'a self,
            tenant: &'a str,
            want: u32,
            limit: RateLimit,
        ) -> BoxFuture<'a, Result<RateClaim, StoreError>> {
            Box::pin(async move {
                // A round trip: calls arriving meanwhile find the claim in
                // flight.
                tokio::task::yield_now().await;
                let mut s = self.state.lock().unwrap();
                s.claims += 1;
                if s.down {
                    return Err(StoreError::Corrupt("unreachable in this test".into()));
                }
                let now = Instant::now();
                let interval = Duration::from_secs_f64(1.0 / limit.rate_per_second());
                let start = s.tat.get(tenant).copied().unwrap_or(now).max(now);
                let held = limit.burst() - (start - now).as_secs_f64() * limit.rate_per_second();
                let granted = (held.floor().max(0.0) as u32).min(want);
                let tat = start + interval * granted;
                s.tat.insert(tenant.to_owned(), tat);
                s.granted += u64::from(granted);
                Ok(RateClaim { granted, backlog: tat - now })
            })
        }
    }

    fn limiter(rate: f64, burst: f64) -> (RateLimiter, Arc<Memory>) {
        let shared = Arc::new(Memory::default());
        (RateLimiter::new(RateLimit::new(rate, burst).unwrap(), shared.clone()), shared)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_costs_one_claim_per_batch() {
        // k = 20: claims of 1, 2, 4, 8, 16, then 20 at a time.
        let (l, shared) = limiter(200.0, 400.0);
        for _ in 0..400 {
            assert!(l.take("acme").await.is_ok());
        }
        assert_eq!(shared.claims(), 5 + (400 - 31_usize).div_ceil(20));
        // The burst is used up: one claim finds the bucket empty, and the
        // calls after it are refused without asking again until a batch
        // is free (20 tokens: a tenth of a second).
        let wait = l.take("acme").await.unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(6), "{wait:?}");
        let claims = shared.claims();
        for _ in 0..100 {
            assert!(l.take("acme").await.is_err());
        }
        assert_eq!(shared.claims(), claims);
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..20 {
            assert!(l.take("acme").await.is_ok());
        }
        assert_eq!(shared.claims(), claims + 1);
        // Another tenant has its own bucket.
        assert!(l.take("other").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_wait_for_one_claim() {
        let (l, shared) = limiter(200.0, 400.0);
        let l = Arc::new(l);
        // Warm up to full batches of 20.
        for _ in 0..31 {
            l.take("acme").await.unwrap();
        }
        let claims = shared.claims();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                tokio::spawn({
                    let l = l.clone();
                    async move { l.take("acme").await }
                })
            })
            .collect();
        for c in calls {
            assert!(c.await.unwrap().is_ok());
        }
        assert_eq!(shared.claims(), claims + 1, "one batch for the twenty calls");
    }

    #[tokio::test(start_paused = true)]
    async fn two_processes_admit_no_more_than_one_bucket_grants_plus_their_batches() {
        // Two API processes sharing one bucket: 50/s, burst 40 (k = 5).
        let shared = Arc::new(Memory::default());
        let limit = RateLimit::new(50.0, 40.0).unwrap();
        let a = RateLimiter::new(limit, shared.clone());
        let b = RateLimiter::new(limit, shared.clone());
        let mut admitted = 0u64;
        let tick = Duration::from_millis(2);
        // Ten seconds of a flood on both, a call every 2 ms on each.
        for _ in 0..5000 {
            admitted += u64::from(a.take("acme").await.is_ok()) + u64::from(b.take("acme").await.is_ok());
            tokio::time::advance(tick).await;
        }
        let elapsed = 5000.0 * tick.as_secs_f64();
        let k = u64::from(batch_size(limit));
        assert!(admitted <= shared.granted(), "only granted tokens are spent");
        let bound = (50.0 * elapsed + 40.0) as u64 + 2 * k;
        assert!(admitted <= bound, "{admitted} admitted, at most {bound}");
        // And the tenant gets its rate, less at most the batches held.
        assert!(admitted + 2 * k >= (50.0 * elapsed) as u64, "{admitted} admitted in {elapsed} s");

        // Two processes with a bucket each (as before buckets were shared)
        // would have admitted nearly twice the bound.
        let (a, _) = limiter(50.0, 40.0);
        let (b, _) = limiter(50.0, 40.0);
        let mut apart = 0u64;
        for _ in 0..5000 {
            apart += u64::from(a.take("acme").await.is_ok()) + u64::from(b.take("acme").await.is_ok());
            tokio::time::advance(tick).await;
        }
        assert!(apart > bound + 400, "{apart} admitted by two buckets");
    }

    #[tokio::test(start_paused = true)]
    async fn unspent_tokens_lapse_and_the_next_claim_asks_for_what_was_spent() {
        let (l, shared) = limiter(200.0, 400.0);
        // Batches of 1, 2, 4, 8: 15 calls; the fifth claim asks for 16.
        for _ in 0..16 {
            l.take("acme").await.unwrap();
        }
        assert_eq!((shared.claims(), shared.granted()), (5, 31));
        // 15 of the batch of 16 are left when the lease ends.
        tokio::time::advance(LEASE).await;
        l.take("acme").await.unwrap();
        // A new claim, for one (what the lapsed batch had spent).
        assert_eq!((shared.claims(), shared.granted()), (6, 32));
        l.take("acme").await.unwrap();
        assert_eq!((shared.claims(), shared.granted()), (7, 34));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_bucket_falls_back_to_this_process_own_one() {
        let (l, shared) = limiter(2.0, 5.0);
        shared.set_down(true);
        // The local bucket: the burst, then refusals, never all admitted
        // nor all refused.
        let results: Vec<bool> = futures::future::join_all((0..20).map(|_| l.take("acme")))
            .await
            .into_iter()
            .map(|r| r.is_ok())
            .collect();
        assert_eq!(results.iter().filter(|ok| **ok).count(), 5, "{results:?}");
        // One claim found the outage; the others did not ask.
        assert_eq!(shared.claims(), 1);
        // After a while the shared bucket is asked again, and answers.
        tokio::time::advance(RETRY_SHARED).await;
        shared.set_down(false);
        assert!(l.take("acme").await.is_ok());
        assert_eq!((shared.claims(), shared.granted()), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_hangs_counts_as_an_outage() {
        #[derive(Debug)]
        struct Hangs;
        impl SharedBuckets for Hangs {
            fn claim<'a>(
                &'a self,
                _: &'a str,
                _: u32,
                _: RateLimit,
            ) -> BoxFuture<'a, Result<RateClaim, StoreError>> {
                Box::pin(futures::future::pending())
            }
        }
        let l = RateLimiter::new(RateLimit::new(1.0, 1.0).unwrap(), Arc::new(Hangs));
        assert!(l.take("acme").await.is_ok(), "the local bucket's one token");
        assert!(l.take("acme").await.is_err());
    }
}
