//! Latency histograms (hdrhistogram, microsecond resolution) and the quantile summary every
//! report uses.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Highest trackable value: one hour, in microseconds. Larger values are clamped to it.
const HIGHEST_US: u64 = 3_600_000_000;

/// A histogram of durations, recorded in microseconds with 3 significant digits.
#[derive(Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Self {
        // Proven invariant: the bounds are constants that satisfy hdrhistogram's rules
        // (low >= 1, high >= 2 * low, sigfig <= 5), so construction cannot fail.
        Self(
            Histogram::new_with_bounds(1, HIGHEST_US, 3)
                .expect("constant histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.min(HIGHEST_US));
    }

    /// Records seconds (as the database reports lags); negative values count as zero.
    pub fn record_secs(&mut self, seconds: f64) {
        let micros = if seconds.is_finite() && seconds > 0.0 {
            (seconds * 1e6).round().min(HIGHEST_US as f64) as u64
        } else {
            0
        };
        self.0.saturating_record(micros);
    }

    pub fn add(&mut self, other: &Hist) {
        // Both histograms share the same bounds, so adding cannot fail; saturate anyway.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> Quantiles {
        if self.0.is_empty() {
            return Quantiles::default();
        }
        let ms = |us: u64| Some(round3(us as f64 / 1000.0));
        Quantiles {
            count: self.0.len(),
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
            mean: Some(round3(self.0.mean() / 1000.0)),
        }
    }

    /// Points of the percentile distribution for plotting: (x, milliseconds) where
    /// x = log10(1 / (1 - q)), so 0 is the median's left end, 1 is p90, 2 is p99, 3 is p99.9.
    pub fn percentile_curve(&self, max_nines: f64) -> Vec<(f64, f64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let steps = 200;
        (0..=steps)
            .map(|i| {
                let x = max_nines * i as f64 / steps as f64;
                let q = (1.0 - 10f64.powf(-x)).min(1.0);
                let value = if i == steps {
                    self.0.max()
                } else {
                    self.0.value_at_quantile(q)
                };
                (x, value as f64 / 1000.0)
            })
            .collect()
    }
}

pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Quantiles in milliseconds; all null when nothing was recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

/// `a / b`, or None when either is missing or b is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 100.0).round() / 100.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_in_milliseconds() {
        let mut h = Hist::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let q = h.summary();
        assert_eq!(q.count, 100);
        assert!((q.p50.unwrap() - 50.0).abs() < 0.1, "{q:?}");
        assert!((q.p99.unwrap() - 99.0).abs() < 0.1, "{q:?}");
        assert!((q.max.unwrap() - 100.0).abs() < 0.1, "{q:?}");
        assert!(Hist::new().summary().p50.is_none());
        h.record_secs(-1.0);
        assert_eq!(h.len(), 101);
    }
}
