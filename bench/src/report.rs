//! Medians and percentiles for printing.

use hdrhistogram::Histogram;

/// Median and (min, max) of repeated measurements.
pub fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    let mid = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    (mid, xs[0], xs[n - 1])
}

/// `p50 p90 p99 p999 max` of a histogram, in its unit.
pub fn percentiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {} p90 {} p99 {} p999 {} max {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

/// The same figures as JSON, with the count.
pub fn json_percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({"count": h.len(), "p50": h.value_at_quantile(0.5), "p90": h.value_at_quantile(0.9),
           "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999), "max": h.max()})
}
