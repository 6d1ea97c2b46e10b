//! The operator's Prometheus registry: reconcile counts and durations per
//! kind. Counting only; serving `/metrics` is `main`'s job.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Reconcile-duration histogram buckets in seconds: reconciles call the API
/// server and brokers, so they span milliseconds to tens of seconds.
const DURATION_BUCKETS_SECONDS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// All metric families of the operator, registered once in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `synod_operator_reconcile_total{kind,result}`: `result` is `success` or an error's label.
    pub reconcile_total: IntCounterVec,
    /// `synod_operator_reconcile_duration_seconds{kind}`.
    pub reconcile_duration_seconds: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "synod_operator_reconcile_total",
                "Reconciles by kind and result (success or the error's kind).",
            ),
            &["kind", "result"],
        )
        .expect("metric name and labels are valid");
        let reconcile_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "synod_operator_reconcile_duration_seconds",
                "Time spent in one reconcile, by kind.",
            )
            .buckets(DURATION_BUCKETS_SECONDS.to_vec()),
            &["kind"],
        )
        .expect("metric name and labels are valid");
        registry
            .register(Box::new(reconcile_total.clone()))
            .expect("registered once");
        registry
            .register(Box::new(reconcile_duration_seconds.clone()))
            .expect("registered once");
        Metrics {
            registry,
            reconcile_total,
            reconcile_duration_seconds,
        }
    }

    /// Counts one reconcile of `kind` that ended with `result` after `seconds`.
    pub fn observe(&self, kind: &str, result: &str, seconds: f64) {
        self.reconcile_total
            .with_label_values(&[kind, result])
            .inc();
        self.reconcile_duration_seconds
            .with_label_values(&[kind])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_kind_and_result() {
        // Goal: observe() shows up under the promised names and labels.
        let metrics = Metrics::new();
        metrics.observe("Queue", "success", 0.2);
        metrics.observe("Queue", "broker", 0.3);
        let text = metrics.encode();
        assert!(
            text.contains(r#"synod_operator_reconcile_total{kind="Queue",result="success"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"result="broker"} 1"#), "{text}");
        assert!(
            text.contains(r#"synod_operator_reconcile_duration_seconds_count{kind="Queue"} 2"#),
            "{text}"
        );
    }
}
