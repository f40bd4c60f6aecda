//! What a benchmark run counted, and its summary: throughput, latency percentiles from an HDR
//! histogram, errors by gRPC status code.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency the histogram holds exactly; longer ones are recorded as this.
const MAX_NANOS: u64 = 120_000_000_000;
/// Three significant figures: 100 µs is told apart from 100.1 µs.
const SIGNIFICANT_FIGURES: u8 = 3;
/// Percentiles of the latency spectrum in the report, for charts.
const SPECTRUM: [f64; 13] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

/// Everything counted about the calls of a run.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// Latency of every successful call, in nanoseconds.
    latency: Histogram<u64>,
    /// Successful calls.
    pub(crate) calls: u64,
    /// Failed calls by gRPC status code name.
    pub(crate) errors: BTreeMap<&'static str, u64>,
    /// The first failure's message, to tell the user what went wrong.
    pub(crate) first_error: Option<String>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_NANOS, SIGNIFICANT_FIGURES)
                .expect("valid histogram bounds"),
            calls: 0,
            errors: BTreeMap::new(),
            first_error: None,
        }
    }
}

impl Tally {
    /// A successful call that took `latency`.
    pub(crate) fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(MAX_NANOS);
        self.latency.saturating_record(nanos.clamp(1, MAX_NANOS));
        self.calls += 1;
    }

    /// A failed call.
    pub(crate) fn error(&mut self, code: &'static str, message: &str) {
        *self.errors.entry(code).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{code}: {message}"));
        }
    }

    /// Latency percentiles in microseconds.
    pub(crate) fn latency(&self) -> Latency {
        let h = &self.latency;
        let us = |nanos: u64| nanos as f64 / 1_000.0;
        let at = |q: f64| us(h.value_at_quantile(q));
        Latency {
            mean: h.mean() / 1_000.0,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p99_9: at(0.999),
            max: us(h.max()),
        }
    }

    /// Latency (µs) at each percentile of [`SPECTRUM`], as `[percentile, µs]` pairs.
    pub(crate) fn spectrum(&self) -> Vec<[f64; 2]> {
        SPECTRUM
            .iter()
            .map(|&p| {
                let nanos = self.latency.value_at_quantile(p / 100.0);
                [p, nanos as f64 / 1_000.0]
            })
            .collect()
    }
}

/// Latency percentiles of successful calls, in microseconds (0 when there were none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Latency {
    pub(crate) mean: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p99_9: f64,
    pub(crate) max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut t = Tally::default();
        for i in 1..=1000 {
            t.record(us(i));
        }
        let l = t.latency();
        assert_eq!(t.calls, 1000);
        // Three significant figures: within 0.1 %.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(l.p50, 500.0), "p50 {}", l.p50);
        assert!(near(l.p90, 900.0), "p90 {}", l.p90);
        assert!(near(l.p99, 990.0), "p99 {}", l.p99);
        assert!(near(l.p99_9, 999.0), "p99.9 {}", l.p99_9);
        assert!(near(l.max, 1000.0), "max {}", l.max);
        assert!(near(l.mean, 500.5), "mean {}", l.mean);
        let spectrum = t.spectrum();
        assert_eq!(spectrum.first().unwrap()[0], 0.0);
        assert_eq!(spectrum.last().unwrap()[1], l.max);
        assert!(spectrum.windows(2).all(|w| w[0][1] <= w[1][1]));
    }

    #[test]
    fn errors_count_by_code_and_the_first_message_is_kept() {
        let mut t = Tally::default();
        t.record(us(100));
        t.error("UNAVAILABLE", "relay: upstream unreachable");
        t.error("UNAVAILABLE", "again");
        t.error("UNAUTHENTICATED", "bad token");
        assert_eq!(t.calls, 1);
        assert_eq!(t.errors["UNAVAILABLE"], 2);
        assert_eq!(t.errors["UNAUTHENTICATED"], 1);
        assert_eq!(
            t.first_error.as_deref(),
            Some("UNAVAILABLE: relay: upstream unreachable")
        );
        assert!((t.latency().max - 100.0).abs() < 0.5);
    }

    #[test]
    fn no_calls_give_zero_latency() {
        let t = Tally::default();
        assert_eq!(t.latency().p50, 0.0);
        assert_eq!(t.latency().max, 0.0);
    }

    #[test]
    fn latencies_beyond_the_range_saturate_instead_of_failing() {
        let mut t = Tally::default();
        t.record(Duration::from_secs(3600));
        t.record(Duration::ZERO);
        assert_eq!(t.calls, 2);
        assert!(t.latency().max >= 119_000_000.0);
    }
}
