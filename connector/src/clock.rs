//! Unix time on tokio's clock, for token expiry: the wall clock is read once, when the clock is
//! made, and time moves on from there with [`tokio::time::Instant`]. Token claims are Unix seconds
//! while the session's timers are tokio instants; converting both ways through one clock keeps them
//! in step, and lets the unit tests run expiry on paused time (`tokio::time::pause` moves it).
//!
//! A step of the system clock after the clock was made is not followed (the monotonic clock does
//! not jump); tokens themselves are still verified against the wall clock when presented
//! ([`crate::auth`]), and the `ttl` told to the SDK is counted on the wall clock too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The furthest ahead [`Clock::instant_at`] looks (a token's `exp` can be any number).
const HORIZON: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Unix time derived from one reading of the wall clock and tokio's clock since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// The tokio instant of the reading.
    base: Instant,
    /// The Unix time of the reading.
    unix_at_base: Duration,
}

impl Clock {
    /// A clock reading the wall clock now.
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            unix_at_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// The Unix time now, in whole seconds.
    pub(crate) fn unix_now(&self) -> u64 {
        (self.unix_at_base + self.base.elapsed()).as_secs()
    }

    /// The instant Unix second `secs` begins (the clock's reading if it began before).
    pub(crate) fn instant_at(&self, secs: u64) -> Instant {
        let after = Duration::from_secs(secs).saturating_sub(self.unix_at_base);
        self.base + after.min(HORIZON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time_and_converts_both_ways() {
        let clock = Clock::new();
        let start = clock.unix_now();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.unix_now(), start + 90);
        let at = clock.instant_at(start + 100);
        // Second `start + 100` begins within the second after `start`'s 100 s mark.
        let ahead = at - Instant::now();
        assert!(
            ahead > Duration::from_secs(9) && ahead <= Duration::from_secs(10),
            "{ahead:?}"
        );
        tokio::time::sleep_until(at).await;
        assert_eq!(clock.unix_now(), start + 100);
        // The past is the clock's reading; a far future stays representable.
        assert!(clock.instant_at(0) <= Instant::now());
        assert!(clock.instant_at(u64::MAX) > Instant::now());
    }
}
