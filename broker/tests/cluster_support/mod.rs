//! Support code for the cluster integration tests: nodes on loopback with their
//! own temporary data directories, and waiting on conditions with deadlines.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use synod_broker::cluster::{Applied, ClusterConfig, ClusterNode, ClusterStatus};
use synod_broker::metrics::Metrics;
use tokio::net::TcpListener;

pub const SECRET: &[u8] = b"test cluster secret";

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "synod-cluster-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A listener on a free loopback port.
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

/// One test node.
pub struct TestNode {
    pub name: String,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub peers: BTreeMap<String, String>,
    pub secret: Vec<u8>,
    pub node: Option<ClusterNode>,
    pub applied: Arc<Mutex<Vec<Applied>>>,
    pub metrics: Metrics,
}

impl TestNode {
    pub fn config(&self) -> ClusterConfig {
        let mut config = ClusterConfig::new(self.name.clone(), self.dir.clone());
        config.peers = self.peers.clone();
        config.secret = self.secret.clone();
        config.tick_interval = Duration::from_millis(10);
        config.election_ticks = 10;
        config.heartbeat_ticks = 2;
        config.request_timeout = Duration::from_secs(10);
        config
    }

    /// Starts (or restarts) the node on its address and data directory.
    pub async fn start_on(&mut self, listener: TcpListener) {
        let (node, mut applied_rx) =
            ClusterNode::start_with_listener(self.config(), listener, self.metrics.clone())
                .await
                .expect("cluster node starts");
        // A fresh list per start: the previous run's reader may still be
        // draining its channel.
        self.applied = Arc::new(Mutex::new(Vec::new()));
        let applied = self.applied.clone();
        tokio::spawn(async move {
            while let Some(entry) = applied_rx.recv().await {
                applied.lock().expect("lock").push(entry);
            }
        });
        self.node = Some(node);
    }

    pub async fn restart(&mut self) {
        // The stopped node's accept task may still hold the port for a moment
        // after shutdown returns: wait until it is free again, within a bound.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "rebind: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(err) => panic!("rebind same port {}: {err}", self.addr),
            }
        };
        self.start_on(listener).await;
    }

    pub async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }

    pub fn node(&self) -> &ClusterNode {
        self.node.as_ref().expect("node is running")
    }

    pub fn status(&self) -> ClusterStatus {
        self.node().status()
    }

    /// The commands this node applied, in order.
    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.applied
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|a| match a {
                Applied::Entry {
                    value: synod_broker::paxos::Value::Command(data),
                    ..
                } => Some(data.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Nodes `names`, each with its own listener, all sharing one seed list.
pub async fn cluster(tag: &str, names: &[&str]) -> Vec<TestNode> {
    let mut listeners = Vec::new();
    for _ in names {
        listeners.push(bind().await);
    }
    let peers: BTreeMap<String, String> = names
        .iter()
        .zip(&listeners)
        .map(|(n, l)| (n.to_string(), l.local_addr().expect("addr").to_string()))
        .collect();
    let mut nodes = Vec::new();
    for (name, listener) in names.iter().zip(listeners) {
        let mut node = TestNode {
            name: name.to_string(),
            dir: temp_dir(&format!("{tag}-{name}")),
            addr: listener.local_addr().expect("addr"),
            peers: peers.clone(),
            secret: SECRET.to_vec(),
            node: None,
            applied: Arc::new(Mutex::new(Vec::new())),
            metrics: Metrics::new(),
        };
        node.start_on(listener).await;
        nodes.push(node);
    }
    nodes
}

/// Waits until `condition` holds, checking every few milliseconds; panics
/// with `what` after `timeout`. Returns the time it took.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if condition() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Names of the voters in a status, sorted.
pub fn voters(status: &ClusterStatus) -> Vec<String> {
    let mut names: Vec<String> = status
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.name.clone())
        .collect();
    names.sort();
    names
}

/// Whether every running node in `nodes` (by index) sees exactly `expected`
/// as voters, at one epoch, following one leader.
pub fn agreed(nodes: &[&TestNode], expected: &[&str]) -> bool {
    let statuses: Vec<ClusterStatus> = nodes.iter().map(|n| n.status()).collect();
    let first = &statuses[0];
    statuses.iter().all(|s| {
        voters(s) == expected
            && s.members.len() == expected.len()
            && s.epoch == first.epoch
            && s.leader.is_some()
            && s.leader == first.leader
    })
}

/// The index of the node that every running node follows.
pub fn leader_index(nodes: &[TestNode]) -> Option<usize> {
    nodes.iter().position(|n| {
        n.node
            .as_ref()
            .is_some_and(|node| node.status().role == "leader")
    })
}

pub async fn cleanup(nodes: Vec<TestNode>) {
    for mut node in nodes {
        node.stop().await;
        std::fs::remove_dir_all(&node.dir).ok();
    }
}

/// Runs a membership change on whichever node leads, retrying while
/// leadership moves (a loaded machine can delay heartbeats past a timeout).
pub async fn change_on_leader(nodes: &[TestNode], name: &str, add: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = match leader_index(nodes) {
            Some(l) if add => nodes[l].node().add_member(name).await.map(|_| ()),
            Some(l) => nodes[l].node().remove_member(name).await.map(|_| ()),
            None => Err(synod_broker::cluster::Error::NoQuorum),
        };
        match result {
            Ok(()) => return,
            // Already gone: an earlier attempt was decided after all.
            Err(synod_broker::cluster::Error::UnknownMember(_)) if !add => return,
            Err(err) if Instant::now() < deadline => {
                eprintln!("retrying membership change for {name}: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("membership change for {name} failed: {err}"),
        }
    }
}
