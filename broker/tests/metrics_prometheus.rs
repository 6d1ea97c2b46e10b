//! `/metrics` against the real Prometheus tools: `promtool check metrics`
//! accepts the scrape, and a `prometheus` server started here on loopback
//! scrapes the broker and answers a query for every metric family.
//! Both binaries come from Debian's `prometheus` package
//! (scripts/debian-packages.txt); without them these tests fail, loudly.

mod mgmt_support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use mgmt_support::{Harness, start};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Every family `/metrics` promises (DESIGN.md, plus alarms and auth
/// failures); histograms are queried through their `_count` series.
const FAMILIES: &[&str] = &[
    "synod_build_info",
    "synod_identity_info",
    "synod_connections",
    "synod_channels",
    "synod_consumers",
    "synod_queues",
    "synod_queue_messages_ready",
    "synod_queue_messages_unacked",
    "synod_queue_consumers",
    "synod_messages_published_total",
    "synod_messages_confirmed_total",
    "synod_messages_delivered_total",
    "synod_messages_acknowledged_total",
    "synod_messages_redelivered_total",
    "synod_messages_unroutable_dropped_total",
    "synod_messages_unroutable_returned_total",
    "synod_auth_failures_total",
    "synod_alarms",
    "synod_cluster_members",
    "synod_paxos_is_leader",
    "synod_paxos_epoch",
    "synod_paxos_decided_index",
    "synod_paxos_ballot",
    "synod_paxos_elections_total",
    "synod_paxos_commit_latency_seconds_count",
    "synod_store_fsync_seconds_count",
    "synod_store_bytes",
    "synod_process_resident_memory_bytes",
];

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

/// A broker with one queue holding a message, so per-queue series exist.
async fn busy_broker() -> Harness {
    let h = start().await;
    assert_eq!(
        h.put("/api/queues/%2F/jobs", json!({"durable": true}))
            .await,
        StatusCode::CREATED
    );
    let connection = h.amqp("guest", "guest", "%2f").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    let _ = connection.close(200, "done".into()).await;
    h
}

#[tokio::test]
async fn promtool_accepts_the_scrape() {
    // Goal: the /metrics text passes `promtool check metrics` and carries every family.
    let promtool = tool("promtool");
    let h = busy_broker().await;
    let text = h.scrape().await;
    for family in FAMILIES {
        let base = family.trim_end_matches("_count");
        assert!(text.contains(&format!("# TYPE {base} ")), "{base} missing");
    }
    assert!(text.contains("synod_queue_messages_ready{queue=\"jobs\",vhost=\"/\"} 1"));
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write scrape");
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    h.stop().await;
}

/// Kills the Prometheus server (only the process this test started) and
/// removes its data directory, even when the test fails.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

async fn query(http: &reqwest::Client, base: &str, promql: &str) -> Option<Value> {
    let encoded: String = promql
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let response = http
        .get(format!("{base}/api/v1/query?query={encoded}"))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    let result = body["data"]["result"].as_array()?;
    (!result.is_empty()).then(|| body["data"]["result"].clone())
}

#[tokio::test]
async fn a_prometheus_server_scrapes_every_family() {
    // Goal: a real Prometheus scraping the broker on loopback answers a query for each family.
    let prometheus = tool("prometheus");
    let h = busy_broker().await;
    let metrics_addr = h.broker.metrics_addr.expect("metrics listener");
    let dir = std::env::temp_dir().join(format!(
        "synod-prometheus-test-{}-{}",
        std::process::id(),
        metrics_addr.port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: synod\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .expect("write config");
    let web_port = free_loopback_port();
    let child = Command::new(prometheus)
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
    let _server = Server { child, dir };
    let base = format!("http://127.0.0.1:{web_port}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    // Prometheus needs a few seconds to start and scrape twice; a longer
    // bound than the broker tests' WAIT.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = query(&http, &base, "up{job=\"synod\"} == 1").await;
        if up.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "prometheus never reported the broker target up"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for family in FAMILIES {
        let result = query(&http, &base, family).await;
        assert!(result.is_some(), "prometheus has no samples of {family}");
    }
    let ready = query(&http, &base, "synod_queue_messages_ready{queue=\"jobs\"}")
        .await
        .expect("per-queue series");
    assert_eq!(ready[0]["value"][1], "1");
    h.stop().await;
}
