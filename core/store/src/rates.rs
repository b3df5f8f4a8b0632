//! Tenants' rate limits, shared by every API process: one bucket per
//! tenant in `rate_buckets`, kept as GCRA state (the "theoretical arrival
//! time", TAT, of the next call) in microseconds on the database's clock,
//! so that the API hosts' clocks need not agree.
//!
//! With `T = 1 / rate` and the burst `B`, a bucket whose TAT is `tat` holds
//! `B - (max(tat, now) - now) / T` tokens at `now` (at most `B`: a TAT in
//! the past is a full bucket). A claim of up to `k` tokens grants
//! `min(k, ⌊that⌋)` (none when it is below 1) and moves the TAT to
//! `max(tat, now) + granted × T`, in one statement that locks the
//! tenant's row (an upsert: a tenant's first claim finds a full bucket).
//! Whatever the order in which processes claim, the grants in any span of
//! the database's clock of length `d` add up to at most `rate × d + B`:
//! after a claim read at `s` the TAT is at least `s`, no claim leaves it
//! beyond its own reading plus `B × T`, and each granted token moves it by
//! `T`.
//!
//! This is the one place the store reads the database's clock rather than
//! binding a time from Rust: every process must measure the same bucket
//! with the same clock.

use std::time::Duration;

use super::{BackendKind, StoreError, StoreResult, col, on_pool};

/// A rate limit: how many calls per second on average, and how many may be
/// saved up for a burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    rate_per_second: f64,
    burst: f64,
}

impl RateLimit {
    /// `None` unless `rate_per_second` is a finite number above 0 and
    /// `burst` a finite number of at least 1 (the ranges core's
    /// configuration allows).
    pub fn new(rate_per_second: f64, burst: f64) -> Option<Self> {
        let ok = rate_per_second.is_finite() && rate_per_second > 0.0 && burst.is_finite() && burst >= 1.0;
        ok.then_some(Self { rate_per_second, burst })
    }

    /// Calls per second on average.
    pub fn rate_per_second(self) -> f64 {
        self.rate_per_second
    }

    /// Calls that may be saved up.
    pub fn burst(self) -> f64 {
        self.burst
    }

    /// The time one token stands for, microseconds.
    fn interval_us(self) -> f64 {
        1e6 / self.rate_per_second
    }
}

/// What one claim on a tenant's shared bucket got.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateClaim {
    /// Tokens granted: at most what was asked, none when the bucket held
    /// less than one.
    pub granted: u32,
    /// How far the bucket's TAT is ahead of the database's clock after the
    /// claim (zero for a full bucket): the bucket holds
    /// `burst - backlog × rate` tokens.
    pub backlog: Duration,
}

impl RateClaim {
    /// How long after the claim the bucket holds `n` tokens (as many as it
    /// may, if `n` is more than the burst) when nobody claims meanwhile;
    /// zero when it already does.
    pub fn wait_for(&self, n: u32, limit: RateLimit) -> Duration {
        let n = f64::from(n).min(limit.burst.floor());
        let us = self.backlog.as_secs_f64() * 1e6 - (limit.burst - n) * limit.interval_us();
        Duration::try_from_secs_f64(us.max(0.0) / 1e6).unwrap_or(Duration::MAX)
    }
}

/// The claim on PostgreSQL. `clock_timestamp()` is read in the update
/// branch after the row's lock is held, so concurrent claims read the
/// clock in the order they apply.
const CLAIM_POSTGRES: &str = "\
    INSERT INTO rate_buckets AS b (tenant_id, tat_us, claimed_at_us, granted) \
    SELECT $1, c.now + g.n * $3, c.now, g.n \
    FROM (SELECT extract(epoch FROM clock_timestamp())::float8 * 1e6 AS now) c, \
         (SELECT least($2, floor($4)::bigint) AS n) g \
    ON CONFLICT (tenant_id) DO UPDATE SET (tat_us, claimed_at_us, granted) = ( \
        SELECT s.start + s.n * $3, s.now, s.n FROM ( \
            SELECT c.now, c.start, greatest(0, least($2, floor($4 - (c.start - c.now) / $3)::bigint)) AS n \
            FROM (SELECT d.now, greatest(b.tat_us, d.now) AS start \
                  FROM (SELECT extract(epoch FROM clock_timestamp())::float8 * 1e6 AS now) d) c) s) \
    RETURNING tat_us, claimed_at_us, granted";

/// The same claim on SQLite: `unixepoch('subsec')` (milliseconds, SQLite
/// 3.42 and later; the same value throughout one statement), `min`/`max`
/// for `least`/`greatest`, and `CAST(x AS INTEGER)` for the floor (it
/// truncates, which is the floor for the values at or above 0 that are
/// kept). The `WHERE true` tells SQLite's parser that `ON CONFLICT` is the
/// upsert's, not a join's.
const CLAIM_SQLITE: &str = "\
    INSERT INTO rate_buckets AS b (tenant_id, tat_us, claimed_at_us, granted) \
    SELECT $1, c.now + g.n * $3, c.now, g.n \
    FROM (SELECT unixepoch('subsec') * 1e6 AS now) c, \
         (SELECT min($2, CAST($4 AS INTEGER)) AS n) g \
    WHERE true \
    ON CONFLICT (tenant_id) DO UPDATE SET (tat_us, claimed_at_us, granted) = ( \
        SELECT s.start + s.n * $3, s.now, s.n FROM ( \
            SELECT c.now, c.start, max(0, min($2, CAST($4 - (c.start - c.now) / $3 AS INTEGER))) AS n \
            FROM (SELECT d.now, max(b.tat_us, d.now) AS start \
                  FROM (SELECT unixepoch('subsec') * 1e6 AS now) d) c) s) \
    RETURNING tat_us, claimed_at_us, granted";

impl super::Store {
    /// Claims up to `want` tokens from `tenant_id`'s shared bucket under
    /// `limit`, in one statement; a tenant's first claim finds its bucket
    /// full. Every process must claim with the same `limit`: the bucket
    /// keeps only its TAT, and each claim measures it with its own rate
    /// and burst.
    pub async fn claim_rate_tokens(
        &self,
        tenant_id: &str,
        want: u32,
        limit: RateLimit,
    ) -> StoreResult<RateClaim> {
        let sql = match self.kind() {
            BackendKind::Postgres => CLAIM_POSTGRES,
            BackendKind::Sqlite => CLAIM_SQLITE,
        };
        let (tat, at, granted): (f64, f64, i64) = on_pool!(self, |pool| {
            let row = sqlx::query(sql)
                .bind(tenant_id)
                .bind(i64::from(want))
                .bind(limit.interval_us())
                .bind(limit.burst)
                .fetch_one(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(e, "rate bucket"))?;
            (col!(&row, "tat_us"), col!(&row, "claimed_at_us"), col!(&row, "granted"))
        });
        let granted = u32::try_from(granted)
            .ok()
            .filter(|g| *g <= want)
            .ok_or_else(|| StoreError::Corrupt(format!("rate bucket granted {granted} of {want}")))?;
        let backlog = Duration::try_from_secs_f64((tat - at).max(0.0) / 1e6).unwrap_or(Duration::MAX);
        Ok(RateClaim { granted, backlog })
    }
}
