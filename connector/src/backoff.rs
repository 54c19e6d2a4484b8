//! The one retry policy of the connector: a delay that doubles after each attempt up to a cap, and
//! starts again after a success. Used by the LISTEN connection ([`Backoff::reconnect`]) and by
//! publish rules (from `rules[].retry_backoff_ms`, within the rule's `timeout_ms`).

use std::time::Duration;

/// Doubling delays between retries.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays of `first`, doubling up to `max`.
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first.min(max),
        }
    }

    /// The reconnect policy of database connections: 100 ms, doubling up to 5 s.
    pub(crate) fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The delay the next attempt would wait.
    pub(crate) fn peek(&self) -> Duration {
        self.next
    }

    /// The delay before the next attempt (each call doubles the one after, up to the cap).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts again from the first delay (after an attempt that worked).
    pub(crate) fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_and_resets() {
        let mut b = Backoff::reconnect();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        let mut r = Backoff::new(Duration::from_millis(300), Duration::from_secs(1));
        assert_eq!(
            [r.next_delay(), r.next_delay(), r.next_delay()],
            [300, 600, 1000].map(Duration::from_millis)
        );
    }
}
