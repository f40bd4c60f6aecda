//! Open-loop scheduling: call `i` is due at `start + i / rate`, whatever happened to the calls
//! before it. Latency is measured from that intended time, so a stall in the server shows up in
//! every call that should have gone out during it (no coordinated omission).

use std::time::{Duration, Instant};

/// Intended send times at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    start: Instant,
    /// Nanoseconds between two calls (fractional: 3 calls/s is 333,333,333.3 ns).
    interval_nanos: f64,
}

impl Schedule {
    /// `rate` calls per second from `start`; `rate` must be positive and finite.
    pub(crate) fn new(start: Instant, rate: f64) -> Self {
        assert!(rate.is_finite() && rate > 0.0, "rate must be positive");
        Self {
            start,
            interval_nanos: 1e9 / rate,
        }
    }

    /// When call `i` (from 0) is due.
    pub(crate) fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_nanos((i as f64 * self.interval_nanos).round() as u64)
    }

    /// How many calls are due by `now`: calls `0..n` all have `due(i) <= now`.
    pub(crate) fn due_by(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos() as f64;
        let mut n = (elapsed / self.interval_nanos).floor() as u64 + 1;
        // Float rounding may put the boundary call on the wrong side; settle it exactly.
        while n > 0 && self.due(n - 1) > now {
            n -= 1;
        }
        while self.due(n) <= now {
            n += 1;
        }
        n
    }

    /// Index of the first call due at or after `at` (the warm-up's end, the run's end).
    pub(crate) fn first_at_or_after(&self, at: Instant) -> u64 {
        let n = self.due_by(at);
        if n > 0 && self.due(n - 1) == at {
            n - 1
        } else {
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_due_at_even_intervals_from_the_start() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0);
        assert_eq!(s.due(0), t0);
        assert_eq!(s.due(1), t0 + Duration::from_millis(1));
        assert_eq!(s.due(2500), t0 + Duration::from_millis(2500));
    }

    #[test]
    fn fractional_intervals_do_not_drift() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 3.0);
        // 3 calls a second for an hour: exactly 10,800 intervals, not 10,800 × 333.33 ms rounded.
        assert_eq!(s.due(10_800), t0 + Duration::from_secs(3600));
    }

    #[test]
    fn due_by_counts_every_call_whose_time_has_come() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0);
        assert_eq!(s.due_by(t0), 1, "call 0 is due at once");
        assert_eq!(s.due_by(t0 + Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(t0 + Duration::from_millis(1)), 2);
        assert_eq!(s.due_by(t0 + Duration::from_micros(10_500)), 11);
        // A dispatcher that slept late owes every call it missed, not just one.
        assert_eq!(s.due_by(t0 + Duration::from_secs(1)), 1001);
    }

    #[test]
    fn due_by_agrees_with_due_at_high_rates() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 77_777.0);
        for i in [0, 1, 2, 999, 77_776, 77_777, 1_000_003] {
            let at = s.due(i);
            assert_eq!(s.due_by(at), i + 1, "call {i}");
            assert_eq!(s.first_at_or_after(at), i, "call {i}");
            assert_eq!(s.first_at_or_after(at + Duration::from_nanos(1)), i + 1);
        }
    }
}
