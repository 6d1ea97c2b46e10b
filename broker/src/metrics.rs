//! The broker's one Prometheus registry. Every count the management API or
//! `/metrics` shows comes from these counters; nothing keeps a second tally.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metric families of the broker, registered once in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    /// The registry that `/metrics` encodes.
    pub registry: Registry,
    /// The per-queue families (`{vhost,queue}` labels), kept apart so that
    /// a scrape can leave them out when there are very many queues.
    pub queue_registry: Registry,
    /// Whether `encode` includes `queue_registry`.
    per_queue: Arc<AtomicBool>,
    /// 1 while a resource alarm is raised, by `resource` (`memory`, `disk`).
    pub alarms: IntGaugeVec,
    /// The `memory` series of `alarms`.
    pub memory_alarm: IntGauge,
    /// The `disk` series of `alarms` (free space below `--disk-free-limit`,
    /// or a write hit a full disk).
    pub disk_alarm: IntGauge,
    /// Open AMQP connections.
    pub connections: IntGauge,
    /// Open AMQP channels.
    pub channels: IntGauge,
    /// Consumers on this node.
    pub consumers: IntGauge,
    /// Queues on this node.
    pub queues: IntGauge,
    /// Messages ready for delivery, per queue.
    pub queue_messages_ready: IntGaugeVec,
    /// Messages delivered and not yet acknowledged, per queue.
    pub queue_messages_unacked: IntGaugeVec,
    /// Consumers per queue.
    pub queue_consumers: IntGaugeVec,
    /// Messages published by clients.
    pub messages_published_total: IntCounter,
    /// Publisher confirms sent (`basic.ack` to a publisher).
    pub messages_confirmed_total: IntCounter,
    /// Messages delivered to consumers or fetched with `basic.get`.
    pub messages_delivered_total: IntCounter,
    /// Deliveries acknowledged by consumers.
    pub messages_acknowledged_total: IntCounter,
    /// Deliveries sent with `redelivered = true`.
    pub messages_redelivered_total: IntCounter,
    /// Unroutable messages dropped (not mandatory).
    pub messages_unroutable_dropped_total: IntCounter,
    /// Unroutable mandatory messages returned with `basic.return`.
    pub messages_unroutable_returned_total: IntCounter,
    /// Failed authentication attempts.
    pub auth_failures_total: IntCounter,
    /// AMQP and AMQPS connections over `--max-connections`: refused with
    /// 530 at `connection.open`, or closed at accept when too many are
    /// being refused at once.
    pub connections_refused_total: IntCounter,
    /// Successful reloads of changed TLS certificate, key or CA files.
    pub tls_reloads_total: IntCounter,
    /// Changed TLS files that could not be used (the previous ones stay).
    pub tls_reload_failures_total: IntCounter,
    /// Members of the agreed cluster configuration.
    pub cluster_members: IntGauge,
    /// 1 when this node is the Paxos leader.
    pub paxos_is_leader: IntGauge,
    /// Configuration epoch.
    pub paxos_epoch: IntGauge,
    /// Highest decided log index.
    pub paxos_decided_index: IntGauge,
    /// Current ballot number.
    pub paxos_ballot: IntGauge,
    /// Elections this node started.
    pub paxos_elections_total: IntCounter,
    /// Time from proposal to decision.
    pub paxos_commit_latency_seconds: Histogram,
    /// Duration of each group-commit fsync.
    pub store_fsync_seconds: Histogram,
    /// Bytes of durable storage in use.
    pub store_bytes: IntGauge,
    /// Resident memory of this process.
    pub process_resident_memory_bytes: IntGauge,
    /// Constant 1 carrying the node and cluster names.
    pub identity_info: IntGaugeVec,
    /// Constant 1 carrying the version.
    pub build_info: IntGaugeVec,
    /// Publishes forwarded to a queue's home node, by `peer`.
    pub cluster_forwarded_messages_total: IntCounterVec,
    /// Forwarded publishes awaiting the home node's confirm, by `peer`.
    pub cluster_forward_in_flight: IntGaugeVec,
    /// Deliveries relayed from a home node to a consumer here, by `peer`.
    pub cluster_remote_deliveries_total: IntCounterVec,
    /// Publishes that could not be forwarded (home node unreachable), by `peer`.
    pub cluster_forward_failed_total: IntCounterVec,
    /// Queues this node moved to another home while draining.
    pub cluster_queues_moved_total: IntCounter,
    /// Messages this node copied to queues' new homes while draining.
    pub cluster_messages_moved_total: IntCounter,
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };
        let queue_registry = Registry::new();
        let queue_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
            queue_registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric name");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric name");
            h
        };
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ];
        let queue_labels = ["vhost", "queue"];
        let build_info = gauge_vec(
            "synod_build_info",
            "Constant 1 labelled with the broker version",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let alarms = gauge_vec(
            "synod_alarms",
            "1 while the resource alarm is raised",
            &["resource"],
        );
        // Both series exist from the start, so alert rules see 0, not absence.
        let memory_alarm = alarms.with_label_values(&["memory"]);
        let disk_alarm = alarms.with_label_values(&["disk"]);
        Metrics {
            per_queue: Arc::new(AtomicBool::new(true)),
            alarms,
            memory_alarm,
            disk_alarm,
            connections: gauge("synod_connections", "Open AMQP connections"),
            channels: gauge("synod_channels", "Open AMQP channels"),
            consumers: gauge("synod_consumers", "Consumers on this node"),
            queues: gauge("synod_queues", "Queues on this node"),
            queue_messages_ready: queue_gauge_vec(
                "synod_queue_messages_ready",
                "Messages ready for delivery",
                &queue_labels,
            ),
            queue_messages_unacked: queue_gauge_vec(
                "synod_queue_messages_unacked",
                "Messages delivered and not yet acknowledged",
                &queue_labels,
            ),
            queue_consumers: queue_gauge_vec(
                "synod_queue_consumers",
                "Consumers of a queue",
                &queue_labels,
            ),
            messages_published_total: counter(
                "synod_messages_published_total",
                "Messages published by clients",
            ),
            messages_confirmed_total: counter(
                "synod_messages_confirmed_total",
                "Publisher confirms sent",
            ),
            messages_delivered_total: counter(
                "synod_messages_delivered_total",
                "Messages delivered to consumers or fetched",
            ),
            messages_acknowledged_total: counter(
                "synod_messages_acknowledged_total",
                "Deliveries acknowledged by consumers",
            ),
            messages_redelivered_total: counter(
                "synod_messages_redelivered_total",
                "Deliveries sent with the redelivered flag",
            ),
            messages_unroutable_dropped_total: counter(
                "synod_messages_unroutable_dropped_total",
                "Unroutable messages dropped",
            ),
            messages_unroutable_returned_total: counter(
                "synod_messages_unroutable_returned_total",
                "Unroutable mandatory messages returned to the publisher",
            ),
            auth_failures_total: counter(
                "synod_auth_failures_total",
                "Failed authentication attempts",
            ),
            connections_refused_total: counter(
                "synod_connections_refused_total",
                "AMQP and AMQPS connections refused because the node's connection limit was reached",
            ),
            tls_reloads_total: counter(
                "synod_tls_reloads_total",
                "Changed TLS certificate, key or CA files put into use",
            ),
            tls_reload_failures_total: counter(
                "synod_tls_reload_failures_total",
                "Changed TLS files that could not be used; the previous ones stay in use",
            ),
            cluster_members: gauge(
                "synod_cluster_members",
                "Members of the agreed cluster configuration",
            ),
            paxos_is_leader: gauge("synod_paxos_is_leader", "1 when this node leads"),
            paxos_epoch: gauge("synod_paxos_epoch", "Configuration epoch"),
            paxos_decided_index: gauge("synod_paxos_decided_index", "Highest decided log index"),
            paxos_ballot: gauge("synod_paxos_ballot", "Current ballot number"),
            paxos_elections_total: counter(
                "synod_paxos_elections_total",
                "Elections started by this node",
            ),
            paxos_commit_latency_seconds: histogram(
                "synod_paxos_commit_latency_seconds",
                "Time from proposal to decision",
                latency_buckets.clone(),
            ),
            store_fsync_seconds: histogram(
                "synod_store_fsync_seconds",
                "Duration of each group-commit fsync",
                latency_buckets,
            ),
            store_bytes: gauge("synod_store_bytes", "Bytes of durable storage in use"),
            process_resident_memory_bytes: gauge(
                "synod_process_resident_memory_bytes",
                "Resident memory of this process",
            ),
            identity_info: gauge_vec(
                "synod_identity_info",
                "Constant 1 labelled with node and cluster names",
                &["node", "cluster"],
            ),
            build_info,
            cluster_forwarded_messages_total: counter_vec(
                "synod_cluster_forwarded_messages_total",
                "Publishes forwarded to the home node of their queue",
                &["peer"],
            ),
            cluster_forward_in_flight: gauge_vec(
                "synod_cluster_forward_in_flight",
                "Forwarded publishes awaiting the home node's confirm",
                &["peer"],
            ),
            cluster_remote_deliveries_total: counter_vec(
                "synod_cluster_remote_deliveries_total",
                "Deliveries relayed from a queue's home node to a consumer on this node",
                &["peer"],
            ),
            cluster_forward_failed_total: counter_vec(
                "synod_cluster_forward_failed_total",
                "Publishes not forwarded because their queue's home node was unreachable",
                &["peer"],
            ),
            cluster_queues_moved_total: counter(
                "synod_cluster_queues_moved_total",
                "Queues this node moved to another home node while draining",
            ),
            cluster_messages_moved_total: counter(
                "synod_cluster_messages_moved_total",
                "Messages this node copied to their queue's new home node while draining",
            ),
            registry,
            queue_registry,
        }
    }

    /// Turns the per-queue series on or off in `encode` (they keep being
    /// maintained either way; only the scrape leaves them out).
    pub fn set_per_queue(&self, enabled: bool) {
        self.per_queue.store(enabled, Ordering::Relaxed);
    }

    /// Whether `encode` includes the per-queue series.
    pub fn per_queue(&self) -> bool {
        self.per_queue.load(Ordering::Relaxed)
    }

    /// Encodes every family in the Prometheus text format.
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.process_resident_memory_bytes.set(rss);
        }
        let mut families = self.registry.gather();
        if self.per_queue() {
            families.extend(self.queue_registry.gather());
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Resident set size from `/proc/self/statm`, where there is one.
pub fn resident_memory_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_family_is_exported() {
        // Goal: the families promised in DESIGN.md appear in the text output.
        let metrics = Metrics::new();
        metrics
            .queue_messages_ready
            .with_label_values(&["/", "q"])
            .set(3);
        metrics.identity_info.with_label_values(&["n", "c"]).set(1);
        metrics.messages_published_total.inc();
        let text = metrics.encode();
        for family in [
            "synod_build_info",
            "synod_identity_info",
            "synod_connections",
            "synod_queue_messages_ready{queue=\"q\",vhost=\"/\"} 3",
            "synod_messages_published_total 1",
            "synod_paxos_commit_latency_seconds_bucket",
            "synod_store_fsync_seconds_bucket",
            "synod_process_resident_memory_bytes",
            "synod_alarms{resource=\"memory\"} 0",
            "synod_alarms{resource=\"disk\"} 0",
        ] {
            assert!(text.contains(family), "missing {family} in:\n{text}");
        }
    }

    #[test]
    fn per_queue_series_can_be_left_out() {
        // Goal: with per-queue series off, no {vhost,queue} series is encoded; totals stay.
        let metrics = Metrics::new();
        metrics
            .queue_messages_ready
            .with_label_values(&["/", "q"])
            .set(3);
        metrics.set_per_queue(false);
        let text = metrics.encode();
        assert!(!text.contains("synod_queue_messages_ready"), "{text}");
        assert!(text.contains("synod_queues "), "{text}");
        metrics.set_per_queue(true);
        assert!(metrics.encode().contains("synod_queue_messages_ready"));
    }
}
