//! Admission control for core's gRPC server: what a call must get past
//! before a handler runs, after [`crate::auth::AuthLayer`] has named the
//! caller.
//!
//! - **Load shedding**: at most `limits.max_concurrent_requests` calls run
//!   at once; one more is refused at once with UNAVAILABLE and
//!   `retry_after_seconds`, instead of queueing until every caller times
//!   out.
//! - **Per-tenant rate limit**: a token bucket per tenant of
//!   `limits.rate_per_second` with bursts of `limits.burst`; past it,
//!   RATE_LIMITED (429) with the seconds until a token is free. One
//!   tenant's flood uses up its own bucket, not the others'. Buckets live in
//!   each API process. Operators and HCP's own services carry no tenant and
//!   are not rate-limited (load shedding still applies to them).
//! - **Timeout**: a call that has not answered within
//!   `limits.request_timeout_seconds` gets DEADLINE_EXCEEDED (a
//!   server-streaming call only needs to start within it).
//!
//! Health and reflection calls are not counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcp_proto::error::{ApiError, ErrorCode};
use tokio::sync::Semaphore;

use crate::auth::Principal;
use crate::config::LimitsConfig;
use crate::error::DETAIL_RETRY_AFTER;

/// Buckets kept at most; idle ones are dropped first when full.
const MAX_BUCKETS: usize = 100_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by caller.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
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
    /// From the `[limits]` configuration.
    pub fn new(c: &LimitsConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(c.max_concurrent_requests)),
            limiter: Arc::new(RateLimiter::new(c.rate_per_second, c.burst)),
            timeout: Duration::from_secs(c.request_timeout_seconds),
        }
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
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

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
        let limited = principal.tenant_id.as_deref().map(|t| self.layer.limiter.take(t, Instant::now()));
        if let Some(Err(wait)) = limited {
            let secs = wait.as_secs().max(1);
            let err = ApiError::new(
                ErrorCode::RateLimited,
                format!("too many requests from this caller; retry in {secs} s"),
            )
            .with_detail(DETAIL_RETRY_AFTER, secs.to_string());
            return Box::pin(async move { Ok(refusal(err)) });
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            tracing::warn!("core is at its concurrency limit; shedding a request");
            let err = ApiError::new(ErrorCode::Unavailable, "core is overloaded; retry later")
                .with_detail(DETAIL_RETRY_AFTER, "1");
            return Box::pin(async move { Ok(refusal(err)) });
        };
        let timeout = self.layer.timeout;
        Box::pin(async move {
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

    #[test]
    fn buckets_refill_and_are_per_caller() {
        let l = RateLimiter::new(10.0, 3.0);
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
}
