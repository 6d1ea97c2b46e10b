//! The chart's Grafana dashboards and alert rules against a real Prometheus
//! scraping a real three-node cluster: three `synod-broker` processes joined
//! with `--peers` on loopback, lapin traffic, then every panel query must be
//! valid and return series, every alert rule must evaluate, and alerts must
//! fire when their condition is made true (unroutable traffic, a growing
//! backlog, a killed node, a lost majority). Must not fake the broker, the
//! cluster or Prometheus; `prometheus` and `promtool` come from Debian's
//! `prometheus` package (scripts/debian-packages.txt).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use prometheus_support::{
    Prometheus, RATE_INTERVAL, TempDir, WAIT, check_dashboard, free_loopback_port, http_client,
    scrape_job, test_rules, variable_values, wait_for,
};
use serde_json::Value;

mod prometheus_support;

/// The `namespace` target label the PodMonitor's scrape would carry.
const NAMESPACE: &str = "synod-test";

/// The `synod_cluster` target label the PodMonitor's relabeling adds.
const CLUSTER: &str = "alpha";

/// Dashboard files checked here, relative to the chart.
const DASHBOARDS: &[&str] = &[
    "dashboards/synod-overview.json",
    "dashboards/synod-paxos.json",
];

/// Dashboards not checked here, and why.
const DASHBOARDS_NOT_HERE: &[(&str, &str)] = &[(
    "dashboards/synod-operator.json",
    "its series come from synod-operator, which needs a Kubernetes API server: \
     operator/tests/dashboards_prometheus.rs checks it",
)];

/// Panels allowed to return no series on a healthy cluster, and why.
/// Every panel of the broker dashboards returns series today.
const EXPECTED_EMPTY: &[(&str, &str)] = &[];

/// One `synod-broker` process; killed (only this process) on drop.
struct BrokerNode {
    name: String,
    child: Child,
    amqp: SocketAddr,
    mgmt: SocketAddr,
    metrics: SocketAddr,
}

impl BrokerNode {
    /// SIGKILL: the node is gone as if its machine died.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address after `marker` in a log line, up to a comma or space.
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    rest.split([',', ' ']).next()?.parse().ok()
}

/// Starts one broker and waits until it logs its AMQP, management and
/// metrics addresses (all on ephemeral ports); `Err` with its log when it
/// exits first (its cluster port was taken, for instance).
fn spawn_node(
    name: &str,
    data_dir: &Path,
    cluster_port: u16,
    peers: &str,
    secret: &Path,
) -> Result<BrokerNode, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
        .arg("--node-name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--amqp-listen",
            "127.0.0.1:0",
            "--mgmt-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--cluster-listen")
        .arg(format!("127.0.0.1:{cluster_port}"))
        .arg("--peers")
        .arg(peers)
        .arg("--cluster-secret-file")
        .arg(secret)
        .env("SYNOD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn synod-broker");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            // Once the addresses are known nobody listens; keep draining so
            // the broker never blocks on a full pipe.
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut log = String::new();
    let mut amqp = None;
    let mut mgmt_and_metrics = None;
    loop {
        match lines_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(addr) = address_after(&line, "listening amqp=") {
                    amqp = Some(addr);
                }
                if let (Some(mgmt), Some(metrics)) = (
                    address_after(&line, "management API on "),
                    address_after(&line, "metrics on "),
                ) {
                    mgmt_and_metrics = Some((mgmt, metrics));
                }
                log.push_str(&line);
                log.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                return Err(format!("{name} exited with {status}:\n{log}"));
            }
        }
        if let (Some(amqp), Some((mgmt, metrics))) = (amqp, mgmt_and_metrics) {
            return Ok(BrokerNode {
                name: name.to_string(),
                child,
                amqp,
                mgmt,
                metrics,
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} did not listen within {WAIT:?}:\n{log}"));
        }
    }
}

/// Starts nodes `n0`, `n1`, `n2` with one seed list and secret. The cluster
/// ports are picked free and released, so another test may take one first:
/// then everything is killed and started again on other ports.
fn start_cluster(root: &Path) -> Vec<BrokerNode> {
    let names = ["n0", "n1", "n2"];
    for attempt in 0..5 {
        let dir = root.join(format!("attempt-{attempt}"));
        std::fs::create_dir_all(&dir).expect("attempt dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, "dashboards test secret\n").expect("write secret");
        let ports: Vec<u16> = names.iter().map(|_| free_loopback_port()).collect();
        let peers = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (name, port) in names.iter().zip(&ports) {
            match spawn_node(name, &dir.join(name), *port, &peers, &secret) {
                Ok(node) => nodes.push(node),
                Err(log) => {
                    eprintln!("cluster start attempt {attempt} failed: {log}");
                    break;
                }
            }
        }
        if nodes.len() == names.len() {
            return nodes;
        }
    }
    panic!("the cluster did not start in 5 attempts");
}

/// This node's view of the cluster leader, once it is ready and knows one.
async fn leader_seen_by(http: &reqwest::Client, node: &BrokerNode) -> Option<String> {
    let ready = http
        .get(format!("http://{}/api/cluster/ready", node.mgmt))
        .send()
        .await
        .ok()?;
    if ready.status() != reqwest::StatusCode::OK {
        return None;
    }
    let view: Value = http
        .get(format!("http://{}/api/cluster", node.mgmt))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    view["leader"].as_str().map(str::to_string)
}

/// Publishes with confirms and waits for the broker's ack.
async fn publish_confirmed(channel: &Channel, exchange: &str, key: &str, mandatory: bool) {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            b"m",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
}

/// Moves every message counter of `node` at least once and leaves a
/// consumer holding unacknowledged deliveries; returns what must stay open.
async fn drive_traffic(node: &BrokerNode) -> (Connection, lapin::Consumer) {
    let uri = format!("amqp://guest:guest@{}/%2f", node.amqp);
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for queue in ["orders", "backlog"] {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
    }
    for _ in 0..20 {
        publish_confirmed(&channel, "", "orders", false).await;
    }
    // Unroutable, both dropped and returned.
    publish_confirmed(&channel, "amq.direct", "nowhere", false).await;
    publish_confirmed(&channel, "amq.direct", "nowhere", true).await;
    // Fetched, requeued, fetched again (redelivered) and acknowledged.
    let first = channel
        .basic_get("orders".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    first
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .expect("nack");
    let again = channel
        .basic_get("orders".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("a message");
    assert!(
        again.delivery.redelivered,
        "a requeued message is redelivered"
    );
    again
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    // A consumer that never acknowledges: unacked and consumer series > 0.
    let consuming = connection.create_channel().await.expect("channel");
    consuming
        .basic_qos(3, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consuming
        .basic_consume(
            "orders".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..3 {
        tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery")
            .expect("delivery ok");
    }
    // A failed login.
    let wrong = format!("amqp://guest:wrong@{}/%2f", node.amqp);
    assert!(
        Connection::connect(&wrong, ConnectionProperties::default())
            .await
            .is_err(),
        "a wrong password is refused"
    );
    (connection, consumer)
}

/// Until `stop`, keeps publishing to `node`: to `orders` (so rates are not
/// zero), unroutable (SynodUnroutableMessages), and into `backlog`, which
/// nobody consumes, past 1000 messages and growing
/// (SynodQueueGrowingWithoutConsumers). Errors end it quietly: the node
/// may be killed later in the test.
fn keep_publishing(node: &BrokerNode, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let uri = format!("amqp://guest:guest@{}/%2f", node.amqp);
    tokio::spawn(async move {
        let Ok(connection) = Connection::connect(&uri, ConnectionProperties::default()).await
        else {
            return;
        };
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let publish = |exchange: &'static str, key: &'static str| {
            channel.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                b"m",
                BasicProperties::default(),
            )
        };
        for _ in 0..1001 {
            if publish("", "backlog").await.is_err() {
                return;
            }
        }
        while !stop.load(Ordering::Relaxed) {
            for (exchange, key) in [("", "orders"), ("amq.direct", "nowhere"), ("", "backlog")] {
                if publish(exchange, key).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = connection.close(200, "done".into()).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_works_against_a_three_node_cluster() {
    // Goal: every broker dashboard panel returns series from a real cluster, every rule evaluates, and alerts fire for real.
    let root = TempDir::new("cluster");
    let mut nodes = start_cluster(&root.0);
    let http = http_client();
    let leader = wait_for("three ready nodes agreeing on a leader", || async {
        let mut leaders = BTreeSet::new();
        for node in &nodes {
            leaders.insert(leader_seen_by(&http, node).await?);
        }
        (leaders.len() == 1).then(|| leaders.pop_first()).flatten()
    })
    .await;
    let leader_idx = nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("the leader is one of the nodes");
    // Traffic goes to a follower, which survives until the end.
    let traffic_idx = (leader_idx + 1) % nodes.len();
    let other_idx = (leader_idx + 2) % nodes.len();
    let (connection, _consumer) = drive_traffic(&nodes[traffic_idx]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = keep_publishing(&nodes[traffic_idx], stop.clone());

    let prom_dir = TempDir::new("prometheus");
    let rules = test_rules(&prom_dir.0);
    let targets: Vec<String> = nodes.iter().map(|n| n.metrics.to_string()).collect();
    let job = scrape_job(
        "synod",
        &targets,
        &[("namespace", NAMESPACE), ("synod_cluster", CLUSTER)],
    );
    let prometheus = Prometheus::start(&prom_dir.0, &[job], &rules);
    prometheus.wait_scraped("synod", nodes.len()).await;

    let values = variable_values(&[("namespace", NAMESPACE), ("cluster", CLUSTER)]);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for file in DASHBOARDS {
        let check = check_dashboard(&prometheus, file, &values, EXPECTED_EMPTY).await;
        failures.extend(check.failures);
        report.extend(check.report);
    }
    for (file, why) in DASHBOARDS_NOT_HERE {
        report.push(format!("{file}: not checked here: {why}"));
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "dashboard problems:\n{}",
        failures.join("\n")
    );

    // The panels show the cluster as it is.
    for (promql, expected) in [
        (
            "count(synod_build_info{namespace=\"synod-test\",synod_cluster=\"alpha\"})",
            3.0,
        ),
        ("max(synod_cluster_members{synod_cluster=\"alpha\"})", 3.0),
        ("sum(synod_paxos_is_leader{synod_cluster=\"alpha\"})", 1.0),
    ] {
        assert_eq!(prometheus.scalar(promql).await, Some(expected), "{promql}");
    }
    let published = prometheus
        .scalar(&format!(
            "sum(rate(synod_messages_published_total[{RATE_INTERVAL}]))"
        ))
        .await
        .expect("a publish rate");
    assert!(published > 0.0, "publish rate {published} while publishing");

    // Every rule evaluates without error; the operator's rule has no
    // series here but must evaluate all the same.
    let rule_names = prometheus.assert_rules_evaluate().await;
    assert!(
        rule_names.len() >= 8 && rule_names.contains("SynodOperatorReconcileErrors"),
        "rules loaded: {rule_names:?}"
    );

    // Alerts of a healthy cluster: unroutable traffic and the unconsumed,
    // growing backlog fire; nothing about nodes or Paxos does.
    prometheus
        .wait_firing("SynodUnroutableMessages", &[("synod_cluster", CLUSTER)])
        .await;
    prometheus
        .wait_firing(
            "SynodQueueGrowingWithoutConsumers",
            &[("queue", "backlog"), ("vhost", "/")],
        )
        .await;
    let active = prometheus.active_alert_names().await;
    for quiet in [
        "SynodNodeDown",
        "SynodNoPaxosMajority",
        "SynodMemberLagging",
        "SynodLeaderFlapping",
        "SynodResourceAlarm",
    ] {
        assert!(
            !active.contains(quiet),
            "{quiet} is active on a healthy cluster: {active:?}"
        );
    }

    // One follower killed: SynodNodeDown for it, and the majority holds.
    nodes[other_idx].kill();
    let down = nodes[other_idx].metrics.to_string();
    prometheus
        .wait_firing(
            "SynodNodeDown",
            &[("instance", down.as_str()), ("namespace", NAMESPACE)],
        )
        .await;
    assert!(
        prometheus
            .alerts("SynodNoPaxosMajority", "firing")
            .await
            .is_empty(),
        "two of three nodes are a majority"
    );

    // The leader killed too: the survivor cannot be elected alone.
    nodes[leader_idx].kill();
    prometheus
        .wait_firing(
            "SynodNoPaxosMajority",
            &[("namespace", NAMESPACE), ("synod_cluster", CLUSTER)],
        )
        .await;

    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    let _ = connection.close(200, "done".into()).await;
    drop(prometheus);
    drop(nodes);
}
