//! Shared by tests that run a cluster of real `synod-broker` processes on
//! loopback: each node its own process, data directory and ports, all with
//! the same `--peers` seed list and secret, so nodes can be SIGKILLed and
//! restarted on the same cluster port. Must not fake the broker.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use lapin::{Connection, ConnectionProperties};
use reqwest::StatusCode;
use serde_json::Value;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(40);

/// One node of the cluster.
pub struct Node {
    /// Node name.
    pub name: String,
    args: Vec<String>,
    child: Option<Child>,
    /// AMQP address of the running process.
    pub amqp: SocketAddr,
    /// Management API base URL of the running process.
    pub mgmt: String,
}

/// A cluster of broker processes; killed (and its directories removed) on drop.
pub struct Cluster {
    /// The nodes, in seed-list order.
    pub nodes: Vec<Node>,
    root: PathBuf,
    http: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

impl Cluster {
    /// Starts `names` as one cluster and waits until every node is a ready
    /// member and all agree on the leader.
    pub async fn start(tag: &str, names: &[&str]) -> Cluster {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "synod-cluster-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).expect("temp dir");
        let secret = root.join("secret");
        std::fs::write(&secret, "cluster test secret\n").expect("secret");
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let peers = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (name, port) in names.iter().zip(&ports) {
            let data_dir = root.join(name);
            let args: Vec<String> = [
                "--node-name",
                name,
                "--data-dir",
                data_dir.to_str().expect("utf-8 path"),
                "--amqp-listen",
                "127.0.0.1:0",
                "--mgmt-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                &format!("127.0.0.1:{port}"),
                "--peers",
                &peers,
                "--cluster-secret-file",
                secret.to_str().expect("utf-8 path"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(Node {
                name: name.to_string(),
                args,
                child: None,
                amqp: SocketAddr::from(([127, 0, 0, 1], 0)),
                mgmt: String::new(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .no_proxy()
            .build()
            .expect("http client");
        let mut cluster = Cluster { nodes, root, http };
        // All seed-list nodes must be up for the very first start.
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        cluster.wait_agreed(&all(names.len())).await;
        cluster
    }

    /// Starts (again) the process of node `i` and waits until it listens.
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
            .args(&node.args)
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
                // Keep draining after the test stops listening, so the
                // broker never blocks on a full pipe.
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut seen = String::new();
        let mut amqp = None;
        let mut mgmt = None;
        while amqp.is_none() || mgmt.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} did not listen in time; its log:\n{seen}",
                node.name
            );
            match lines_rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening amqp=").nth(1) {
                        amqp = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                    }
                    if let Some(rest) = line.split("management API on ").nth(1) {
                        mgmt = rest.split([',', ' ']).next().map(|a| format!("http://{a}"));
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    panic!("{} exited ({status}); its log:\n{seen}", node.name);
                }
            }
        }
        node.amqp = amqp.expect("checked");
        node.mgmt = mgmt.expect("checked");
        node.child = Some(child);
    }

    /// SIGKILLs node `i`: no shutdown code runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Connects lapin as guest to node `i`.
    pub async fn connect(&self, i: usize) -> Connection {
        let uri = format!("amqp://guest:guest@{}/%2f", self.nodes[i].amqp);
        tokio::time::timeout(
            WAIT,
            Connection::connect(&uri, ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    /// GET `path` on node `i`'s management API as guest.
    pub async fn get(&self, i: usize, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.nodes[i].mgmt))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// DELETE `path` on node `i`'s management API as guest.
    pub async fn delete(&self, i: usize, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .delete(format!("{}{path}", self.nodes[i].mgmt))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `nodes` are all ready, each sees every node of the
    /// cluster as a voter, and all report the same leader; returns it.
    pub async fn wait_agreed(&self, nodes: &[usize]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut leaders = Vec::new();
            let mut ready = true;
            for &i in nodes {
                let (status, _) = self.get(i, "/api/cluster/ready").await;
                let (_, view) = self.get(i, "/api/cluster").await;
                let voters = view["members"]
                    .as_array()
                    .map_or(0, |m| m.iter().filter(|m| m["role"] == "voter").count());
                ready &= status == StatusCode::OK && voters == self.nodes.len();
                leaders.push(view["leader"].as_str().map(str::to_string));
            }
            if ready && leaders[0].is_some() && leaders.windows(2).all(|p| p[0] == p[1]) {
                return leaders[0].clone().expect("checked");
            }
            assert!(
                Instant::now() < deadline,
                "nodes {nodes:?} did not agree in {WAIT:?}; leaders {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `check` until it holds, failing with `what` after [`WAIT`].
    pub async fn wait_until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sorted queue names node `i` lists, as `vhost/name@home`.
    pub async fn queues(&self, i: usize) -> Vec<String> {
        let (status, body) = self.get(i, "/api/queues").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut names: Vec<String> = body
            .as_array()
            .expect("a list")
            .iter()
            .map(|q| {
                format!(
                    "{}/{}@{}",
                    q["vhost"].as_str().unwrap_or(""),
                    q["name"].as_str().unwrap_or(""),
                    q["node"].as_str().unwrap_or("")
                )
            })
            .collect();
        names.sort();
        names
    }
}

/// Indexes `0..n`.
pub fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
