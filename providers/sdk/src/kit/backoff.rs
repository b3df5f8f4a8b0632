//! The delay between retries of a hypervisor call: exponential from a base,
//! doubling at most six times, with jitter so that callers that failed
//! together do not retry together.

use std::time::Duration;

/// Retry delays from a base (the providers' `timing.retry_base_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base_ms: u64,
}

impl Backoff {
    /// The number of doublings after which the delay stops growing.
    pub const MAX_DOUBLINGS: u32 = 6;

    /// Delays starting at `base_ms` milliseconds (a configuration checks
    /// that it is at least 1; 0 retries at once).
    pub fn from_millis(base_ms: u64) -> Self {
        Self { base_ms }
    }

    /// The delay before retry `attempt` (0 for the first retry): uniformly
    /// between half and all of `base << min(attempt, 6)`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random())
    }

    /// Sleeps for [`Backoff::delay`].
    pub async fn wait(&self, attempt: u32) {
        tokio::time::sleep(self.delay(attempt)).await;
    }

    /// The delay for a given random draw (tests choose the draw).
    fn delay_with(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self.base_ms.saturating_mul(1 << attempt.min(Self::MAX_DOUBLINGS));
        let jitter = random % (ceiling / 2 + 1);
        Duration::from_millis(ceiling / 2 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_half_to_all() {
        let b = Backoff::from_millis(250);
        let ms = |attempt, random| b.delay_with(attempt, random).as_millis();
        for (attempt, low, high) in [(0, 125, 250), (1, 250, 500), (6, 8000, 16000), (30, 8000, 16000)] {
            assert_eq!(ms(attempt, 0), low, "attempt {attempt}");
            assert_eq!(ms(attempt, high as u64 / 2), high, "attempt {attempt}");
            for r in [1, 7, 12345, u64::MAX] {
                let d = ms(attempt, r);
                assert!((low..=high).contains(&d), "attempt {attempt}: {d}");
            }
        }
    }

    #[test]
    fn extreme_bases_neither_panic_nor_wrap() {
        assert_eq!(Backoff::from_millis(0).delay_with(3, 99), Duration::ZERO);
        let huge = Backoff::from_millis(u64::MAX).delay_with(6, 0);
        assert_eq!(huge, Duration::from_millis(u64::MAX / 2));
    }
}
