//! The chart's Grafana dashboards and alert rules against a real Prometheus
//! scraping a real three-node cluster: three `synod-broker` processes joined
//! with `--peers` on loopback, lapin traffic, then every panel query must be
//! valid and return series, every alert rule must evaluate, and alerts must
//! fire when their condition is made true (unroutable traffic, a growing
//! backlog, a killed node, a lost majority). Must not fake the broker, the
//! cluster or Prometheus; `prometheus` and `promtool` come from Debian's
//! `prometheus` package (scripts/debian-packages.txt).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
use serde_json::Value;

/// Upper bound for any single wait: a cluster forming, Prometheus starting
/// and scraping, an alert going from pending to firing.
const WAIT: Duration = Duration::from_secs(60);

/// The `namespace` target label the PodMonitor's scrape would carry.
const NAMESPACE: &str = "synod-test";

/// The `synod_cluster` target label the PodMonitor's relabeling adds.
const CLUSTER: &str = "alpha";

/// How often Prometheus scrapes and evaluates rules here.
const SCRAPE_INTERVAL: &str = "1s";

/// What `$__rate_interval` stands for. Grafana makes it at least four scrape
/// intervals; a little more keeps `rate()` from coming back empty when one
/// scrape of a loaded machine is late.
const RATE_INTERVAL: &str = "10s";

/// `for:` of every alert in the test copy of the rules, so that an alert
/// fires within seconds of its condition becoming true.
const TEST_FOR: &str = "2s";

/// Dashboard files checked here, relative to the chart.
const DASHBOARDS: &[&str] = &[
    "dashboards/synod-overview.json",
    "dashboards/synod-paxos.json",
];

/// Dashboards not checked here, and why.
const DASHBOARDS_NOT_HERE: &[(&str, &str)] = &[(
    "dashboards/synod-operator.json",
    "its series come from synod-operator, which runs only against a Kubernetes API server; \
     this test has brokers only",
)];

/// Panels allowed to return no series on a healthy cluster, and why.
/// Every panel of the broker dashboards returns series today.
const EXPECTED_EMPTY: &[(&str, &str)] = &[];

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: install Debian's `prometheus` package \
             (listed in scripts/debian-packages.txt; scripts/install-deps.sh does it)"
        )
    })
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/synod")
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "synod-dashboards-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Waits until `check` returns `Some`, polling; panics naming `what` after [`WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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

/// The Prometheus server this test started, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but unreserved characters, for query strings.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` with the target labels the
    /// chart's PodMonitor gives broker pods, evaluating `rules`.
    fn start(dir: &Path, targets: &[SocketAddr], rules: &Path) -> Prometheus {
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 rule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: synod\n    static_configs:\n      - targets: [{targets}]\n\
                 \x20       labels:\n          namespace: {NAMESPACE}\n          synod_cluster: {CLUSTER}\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let web_port = free_loopback_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{web_port}"),
            http: http_client(),
        }
    }

    /// GETs an API path; the decoded body, whatever the status.
    async fn api(&self, path_and_query: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// An instant query: the result vector, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let body = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await
            .ok_or_else(|| "no answer from prometheus".to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        body["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("not a vector: {body}"))
    }

    /// The single value of a query that returns exactly one series.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await.ok()?;
        match result.as_slice() {
            [series] => series["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Alerts in `state` (`pending` or `firing`) named `name`, by their labels.
    async fn alerts(&self, name: &str, state: &str) -> Vec<Value> {
        let body = self.api("/api/v1/alerts").await.unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .filter(|a| a["labels"]["alertname"] == name && a["state"] == state)
                    .map(|a| a["labels"].clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until alert `name` fires with `labels` among its labels.
    async fn wait_firing(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        wait_for(&format!("alert {name} {labels:?} to fire"), || async {
            self.alerts(name, "firing").await.into_iter().find(|a| {
                labels
                    .iter()
                    .all(|(label, value)| a[*label].as_str() == Some(value))
            })
        })
        .await
    }

    /// Alerts pending or firing, by name.
    async fn active_alert_names(&self) -> BTreeSet<String> {
        let body = self.api("/api/v1/alerts").await.unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The alert rules as shipped, with every `for:` shortened to [`TEST_FOR`].
fn rules_with_short_for(original: &str) -> String {
    original
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("for:") {
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}for: {TEST_FOR}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

fn promtool_check_rules(path: &Path) {
    let output = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(path)
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check rules {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The values Grafana variables take here: the dashboard's own variables
/// pick this test's namespace and cluster; the built-in intervals get
/// what Grafana would compute for a one-second scrape (see [`RATE_INTERVAL`]).
fn variable_values() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("namespace", NAMESPACE),
        ("cluster", CLUSTER),
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", SCRAPE_INTERVAL),
        ("__range", "1h"),
    ])
}

/// `text` with every Grafana variable (`$name`, `${name}`, `[[name]]`)
/// replaced; `Err` names a variable this test does not know.
fn substitute(text: &str) -> Result<String, String> {
    let mut values: Vec<(&str, &str)> = variable_values().into_iter().collect();
    // Longest names first, so that `$__interval` cannot eat part of
    // `$__interval_ms` and the like.
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = text.to_string();
    for (name, value) in values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value)
            .replace(&format!("${name}"), value);
    }
    if out.contains('$') || out.contains("[[") {
        return Err(format!("unknown Grafana variable left in {out:?}"));
    }
    Ok(out)
}

/// One query target of one panel.
struct PanelQuery {
    dashboard: String,
    panel: String,
    expr: String,
}

/// Every panel target of a dashboard, rows' nested panels included.
fn panel_queries(dashboard: &str, board: &Value) -> Vec<PanelQuery> {
    fn walk(dashboard: &str, panels: &Value, out: &mut Vec<PanelQuery>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(PanelQuery {
                        dashboard: dashboard.to_string(),
                        panel: title.to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
            walk(dashboard, &panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &board["panels"], &mut out);
    out
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

    let rules_original = chart_dir().join("alerts/synod-rules.yaml");
    let prom_dir = TempDir::new("prometheus");
    let rules = prom_dir.0.join("synod-rules.yaml");
    std::fs::write(
        &rules,
        rules_with_short_for(&std::fs::read_to_string(&rules_original).expect("read rules")),
    )
    .expect("write test rules");
    promtool_check_rules(&rules_original);
    promtool_check_rules(&rules);
    let targets: Vec<SocketAddr> = nodes.iter().map(|n| n.metrics).collect();
    let prometheus = Prometheus::start(&prom_dir.0, &targets, &rules);

    // Every target up, and scraped often enough for rate() over the rate
    // interval to have two samples and then some.
    wait_for("three targets up and scraped five times", || async {
        let up = prometheus.scalar("count(up{job=\"synod\"} == 1)").await?;
        let scrapes = prometheus
            .scalar(&format!(
                "min(count_over_time(up{{job=\"synod\"}}[{RATE_INTERVAL}]))"
            ))
            .await?;
        (up == 3.0 && scrapes >= 5.0).then_some(())
    })
    .await;

    // Dashboard variables: each `label_values` query finds our value.
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for file in DASHBOARDS {
        let board: Value = serde_json::from_str(
            &std::fs::read_to_string(chart_dir().join(file)).expect("read dashboard"),
        )
        .expect("dashboard is JSON");
        for variable in board["templating"]["list"].as_array().into_iter().flatten() {
            let name = variable["name"].as_str().unwrap_or_default();
            let query = variable["query"]["query"]
                .as_str()
                .or_else(|| variable["query"].as_str())
                .unwrap_or_default();
            let Some(args) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
            else {
                continue;
            };
            let (selector, label) = args
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            let selector = substitute(selector.trim()).expect("variables");
            let label = label.trim();
            let series = prometheus
                .api(&format!("/api/v1/series?match[]={}", encode(&selector)))
                .await
                .unwrap_or(Value::Null);
            let values: BTreeSet<&str> = series["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s[label].as_str())
                .collect();
            let expected = variable_values()[name];
            if !values.contains(expected) {
                failures.push(format!(
                    "{file}: variable ${name} ({query}) offers {values:?}, not {expected}"
                ));
            }
        }

        // Panels: valid, and series unless listed in EXPECTED_EMPTY.
        for target in panel_queries(file, &board) {
            let expr = match substitute(&target.expr) {
                Ok(expr) => expr,
                Err(err) => {
                    failures.push(format!("{file}: {:?}: {err}", target.panel));
                    continue;
                }
            };
            match prometheus.query(&expr).await {
                Err(err) => failures.push(format!(
                    "{}: panel {:?}: invalid query {expr}: {err}",
                    target.dashboard, target.panel
                )),
                Ok(result) => {
                    let allowed_empty = EXPECTED_EMPTY.iter().any(|(p, _)| *p == target.panel);
                    if result.is_empty() && !allowed_empty {
                        failures.push(format!(
                            "{}: panel {:?}: no series for {expr}",
                            target.dashboard, target.panel
                        ));
                    }
                    report.push(format!(
                        "{file}: {:?}: {} series",
                        target.panel,
                        result.len()
                    ));
                }
            }
        }
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

    // Every rule evaluates without error.
    let rule_health = wait_for("every rule evaluated", || async {
        let body = prometheus.api("/api/v1/rules").await?;
        let mut health = BTreeMap::new();
        for group in body["data"]["groups"].as_array()? {
            for rule in group["rules"].as_array()? {
                let name = rule["name"].as_str()?.to_string();
                let state = rule["health"].as_str()?.to_string();
                if state == "unknown" {
                    return None;
                }
                health.insert(name, (state, rule["lastError"].clone()));
            }
        }
        (!health.is_empty()).then_some(health)
    })
    .await;
    let rule_count = rule_health.len();
    for (name, (state, error)) in &rule_health {
        assert_eq!(state, "ok", "rule {name} failed to evaluate: {error}");
    }
    assert!(rule_count >= 8, "only {rule_count} rules loaded");

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

#[test]
fn grafana_variables_are_substituted_or_refused() {
    // Goal: known variables in all three spellings are replaced; an unknown one is an error.
    assert_eq!(
        substitute("rate(x{a=~\"$namespace\",b=\"${cluster}\"}[[[__rate_interval]]])"),
        Ok(format!(
            "rate(x{{a=~\"{NAMESPACE}\",b=\"{CLUSTER}\"}}[{RATE_INTERVAL}])"
        ))
    );
    assert!(substitute("x{node=\"$node\"}").is_err());
}

#[test]
fn the_test_copy_of_the_rules_only_shortens_for() {
    // Goal: every `for:` becomes TEST_FOR with its indentation; other lines stay.
    let original = "rules:\n  - alert: A\n    expr: up == 0\n    for: 15m\n";
    assert_eq!(
        rules_with_short_for(original),
        format!("rules:\n  - alert: A\n    expr: up == 0\n    for: {TEST_FOR}\n")
    );
}
