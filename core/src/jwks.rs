//! Signing keys from an identity provider's JWKS endpoint (`auth.jwks_url`),
//! selected by the token's `kid`.
//!
//! - Cached for as long as the endpoint's `Cache-Control: max-age` says
//!   (clamped to [`MIN_MAX_AGE`]..[`MAX_MAX_AGE`]; [`DEFAULT_MAX_AGE`] when
//!   it says nothing), then fetched again on the next token.
//! - A `kid` the cache does not hold makes one fetch, at most once per
//!   `auth.jwks_min_refresh_seconds`: an identity provider that rotates its
//!   keys is followed without a restart, and a flood of tokens with made-up
//!   `kid`s costs the provider one request per interval, not one per token.
//! - One fetch at a time (concurrent askers wait for it and share it).
//! - If a fetch fails, the keys already held stay in use (and the failure
//!   is logged); with no keys at all, tokens get UNAVAILABLE, not
//!   UNAUTHENTICATED, since nothing is known to be wrong with them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::{Mutex, RwLock};
// The runtime's clock, not the system's: the same instant in production,
// and one a test can pause and advance (`tokio::time::advance`) to cross
// the refetch interval or a `max-age` without waiting for it.
use tokio::time::Instant;

/// The cache lifetime when the endpoint sends no `max-age`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The shortest cache lifetime honoured.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(10);
/// The longest cache lifetime honoured.
pub const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Largest JWKS document read.
const MAX_DOCUMENT: usize = 1024 * 1024;
/// Deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A key from the set: what verifies, and the algorithm the set pins it
/// to, if it does.
#[derive(Clone)]
pub struct SigningKey {
    /// The verification key.
    pub key: Arc<DecodingKey>,
    /// The JWK's `alg`, when present.
    pub algorithm: Option<Algorithm>,
}

/// Why no key was found.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The set holds no key with this id, even after a refresh.
    #[error("no signing key with this key id")]
    UnknownKid,
    /// No key set could be fetched yet.
    #[error("the identity provider's keys cannot be fetched")]
    Unavailable,
}

/// The JWKS endpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The URL does not parse or is not http(s).
    #[error("invalid jwks_url {0:?}")]
    Url(String),
    /// The system's root certificates could not be loaded.
    #[error("cannot load the system's root certificates")]
    Roots(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("timed out")]
    Timeout,
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("cannot read the body")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("not a JWK set")]
    Parse(#[source] serde_json::Error),
}

#[derive(Default)]
struct State {
    keys: HashMap<String, SigningKey>,
    /// The last successful fetch.
    fetched_at: Option<Instant>,
    /// The last fetch, successful or not.
    attempted_at: Option<Instant>,
    fresh_until: Option<Instant>,
}

/// The cached key set of one JWKS endpoint.
pub struct JwksCache {
    url: http::Uri,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    min_refresh: Duration,
    state: RwLock<State>,
    fetching: Mutex<()>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache").field("url", &self.url).finish_non_exhaustive()
    }
}

impl JwksCache {
    /// A cache for `url` that refreshes for an unknown `kid` at most once per
    /// `min_refresh`. Fetches nothing yet.
    pub fn new(url: &str, min_refresh: Duration) -> Result<Self, JwksError> {
        let uri: http::Uri = url.parse().map_err(|_| JwksError::Url(url.to_owned()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(JwksError::Url(url.to_owned()));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(JwksError::Roots)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(Self {
            url: uri,
            client,
            min_refresh,
            state: RwLock::new(State::default()),
            fetching: Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many fetches were made (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key named `kid`, fetching the set when the cache has expired or
    /// does not know `kid` (rate-limited).
    pub async fn key(&self, kid: &str) -> Result<SigningKey, LookupError> {
        {
            let state = self.state.read().await;
            let fresh = state.fresh_until.is_some_and(|t| Instant::now() < t);
            if fresh && let Some(k) = state.keys.get(kid) {
                return Ok(k.clone());
            }
        }
        self.refresh(kid).await;
        let state = self.state.read().await;
        match state.keys.get(kid) {
            Some(k) => Ok(k.clone()),
            None if state.fetched_at.is_none() => Err(LookupError::Unavailable),
            None => Err(LookupError::UnknownKid),
        }
    }

    /// Fetches the set if it has expired or does not know `kid`, unless
    /// the last attempt is more recent than the minimum interval.
    async fn refresh(&self, kid: &str) {
        let _one_at_a_time = self.fetching.lock().await;
        {
            // Another asker may have fetched while this one waited.
            let state = self.state.read().await;
            let now = Instant::now();
            let expired = state.fresh_until.is_none_or(|t| now >= t);
            let may_fetch = state.attempted_at.is_none_or(|t| now.duration_since(t) >= self.min_refresh);
            let known = state.keys.contains_key(kid);
            let needed = expired || !known;
            if !may_fetch || !needed {
                return;
            }
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result =
            tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await.unwrap_or(Err(FetchError::Timeout));
        let mut state = self.state.write().await;
        let now = Instant::now();
        state.attempted_at = Some(now);
        match result {
            Ok((keys, max_age)) => {
                tracing::info!(url = %self.url, keys = keys.len(), ?max_age, "fetched the identity provider's signing keys");
                state.keys = keys;
                state.fetched_at = Some(now);
                state.fresh_until = Some(now + max_age);
            }
            Err(e) => {
                // Keep what is held; try again after the minimum interval.
                tracing::warn!(url = %self.url, error = %e, cause = ?std::error::Error::source(&e), "cannot fetch the identity provider's signing keys");
                state.fresh_until = Some(now + self.min_refresh);
            }
        }
    }

    async fn fetch(&self) -> Result<(HashMap<String, SigningKey>, Duration), FetchError> {
        let req = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .expect("a GET with a parsed URI builds");
        let resp = self.client.request(req).await.map_err(FetchError::Request)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status()));
        }
        let max_age = max_age(resp.headers().get(http::header::CACHE_CONTROL));
        let body = http_body_util::Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body).map_err(FetchError::Parse)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else { continue };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    let algorithm = jwk.common.key_algorithm.and_then(|a| a.to_string().parse().ok());
                    keys.insert(kid.clone(), SigningKey { key: Arc::new(key), algorithm });
                }
                // Keys HCP cannot use (encryption keys, unknown types) are
                // skipped; the others still serve.
                Err(e) => tracing::debug!(kid, error = %e, "skipping a JWK"),
            }
        }
        Ok((keys, max_age))
    }
}

/// The cache lifetime a `Cache-Control` header asks for.
fn max_age(header: Option<&http::HeaderValue>) -> Duration {
    let Some(text) = header.and_then(|h| h.to_str().ok()) else { return DEFAULT_MAX_AGE };
    let mut age = None;
    for directive in text.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return MIN_MAX_AGE;
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v.trim_matches('"').parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    age.unwrap_or(DEFAULT_MAX_AGE).clamp(MIN_MAX_AGE, MAX_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lifetimes_follow_cache_control() {
        let check = |h: Option<&str>, want: u64| {
            let v = h.map(|h| http::HeaderValue::from_str(h).unwrap());
            assert_eq!(max_age(v.as_ref()), Duration::from_secs(want), "{h:?}");
        };
        check(None, 300);
        check(Some("public, max-age=3600"), 3600);
        check(Some("max-age=1"), 10);
        check(Some("max-age=999999999"), 86400);
        check(Some("no-store"), 10);
        check(Some("max-age=nope"), 300);
    }
}
