//! `synod-broker local-cluster`: a cluster on this machine in one command.
//! Starts N broker processes (this same binary) on loopback with distinct
//! ports and data directories and one seed list, waits until every node is a
//! ready member of the agreed configuration, prints how to connect, and stops
//! them all (SIGTERM, so they drain) on Ctrl-C or when one of them dies.
//!
//! Must not: run the nodes in this process (a node is a process, as in
//! production), or listen on anything but loopback.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Cluster name the local cluster's nodes report (`cluster_name`).
const LOCAL_CLUSTER_NAME: &str = "synod-local";

/// Flags of `synod-broker local-cluster`.
#[derive(Debug, Parser)]
#[command(
    name = "synod-broker local-cluster",
    about = "Run a Synod cluster of several processes on this machine"
)]
pub struct LocalArgs {
    /// Number of nodes (an odd number survives the loss of a minority).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// AMQP port of the first node; node i uses `base + i` for AMQP,
    /// `base + 10000 + i` for management, `base + 10020 + i` for metrics
    /// and `base + 20000 + i` for cluster traffic (5672 gives RabbitMQ's
    /// usual 5672, 15672, 15692 and 25672 to the first node).
    #[arg(long, default_value_t = 5672, value_parser = clap::value_parser!(u16).range(1..=45000))]
    pub base_port: u16,
    /// Directory holding one data directory per node.
    #[arg(long, default_value = "./synod-local")]
    pub data_dir: PathBuf,
    /// How long to wait for the nodes to agree, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_seconds: u64,
}

/// Why the local cluster could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The nodes did not agree in time.
    #[error("the nodes did not agree within {0} s (see their logs above)")]
    NotAgreed(u64),
    /// A node exited.
    #[error("node {name} exited ({status})")]
    NodeExited {
        /// Node name.
        name: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
}

/// One node's ports.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// AMQP port.
    pub amqp: u16,
    /// Management API port.
    pub mgmt: u16,
    /// Metrics port.
    pub metrics: u16,
    /// Cluster port.
    pub cluster: u16,
}

/// The nodes `args` describes.
pub fn plan(args: &LocalArgs) -> Vec<LocalNode> {
    (0..args.nodes)
        .map(|i| LocalNode {
            name: format!("local-{}", i + 1),
            amqp: args.base_port + i,
            mgmt: args.base_port + 10_000 + i,
            metrics: args.base_port + 10_020 + i,
            cluster: args.base_port + 20_000 + i,
        })
        .collect()
}

/// Runs the cluster until `shutdown` completes or a node exits.
pub async fn run(args: LocalArgs, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    let exe = std::env::current_exe().map_err(io("locating this binary".into()))?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(io(format!("creating {}", args.data_dir.display())))?;
    let secret = args.data_dir.join("cluster-secret");
    if !secret.exists() {
        let value: [u8; 16] = rand::random();
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex).map_err(io(format!("writing {}", secret.display())))?;
    }
    let nodes = plan(&args);
    let peers = nodes
        .iter()
        .map(|n| format!("{}=127.0.0.1:{}", n.name, n.cluster))
        .collect::<Vec<_>>()
        .join(",");
    let mut children: Vec<(String, Child)> = Vec::new();
    for node in &nodes {
        let child = Command::new(&exe)
            .arg("--node-name")
            .arg(&node.name)
            .arg("--cluster-name")
            .arg(LOCAL_CLUSTER_NAME)
            .arg("--data-dir")
            .arg(args.data_dir.join(&node.name))
            .arg("--amqp-listen")
            .arg(format!("127.0.0.1:{}", node.amqp))
            .arg("--mgmt-listen")
            .arg(format!("127.0.0.1:{}", node.mgmt))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", node.metrics))
            .arg("--cluster-listen")
            .arg(format!("127.0.0.1:{}", node.cluster))
            .arg("--peers")
            .arg(&peers)
            .arg("--cluster-secret-file")
            .arg(&secret)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting node {}", node.name)))?;
        children.push((node.name.clone(), child));
    }
    let agreed = wait_ready(&nodes, Duration::from_secs(args.wait_seconds));
    let result = tokio::select! {
        ready = agreed => match ready {
            true => {
                print_banner(&nodes, &args.data_dir);
                tokio::select! {
                    _ = shutdown => Ok(()),
                    exited = first_exit(&mut children) => Err(exited),
                }
            }
            false => Err(Error::NotAgreed(args.wait_seconds)),
        },
        _ = tokio::time::sleep(Duration::from_secs(args.wait_seconds + 5)) => {
            Err(Error::NotAgreed(args.wait_seconds))
        }
        exited = first_exit(&mut children) => Err(exited),
    };
    stop_all(children).await;
    result
}

/// Resolves when any node exits.
async fn first_exit(children: &mut [(String, Child)]) -> Error {
    let waits = children.iter_mut().map(|(name, child)| {
        Box::pin(async move {
            match child.wait().await {
                Ok(status) => Error::NodeExited {
                    name: name.clone(),
                    status,
                },
                Err(source) => Error::Io {
                    what: format!("waiting for node {name}"),
                    source,
                },
            }
        })
    });
    futures::future::select_all(waits).await.0
}

/// SIGTERM every node (they close connections and flush), then wait.
async fn stop_all(children: Vec<(String, Child)>) {
    for (_, child) in &children {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    for (name, mut child) in children {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("node {name} did not stop in 10 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// Waits until every node answers 200 on `/api/cluster/ready`.
async fn wait_ready(nodes: &[LocalNode], limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut all_ready = true;
        for node in nodes {
            all_ready &= http_status(node.mgmt, "/api/cluster/ready").await == Some(200);
        }
        if all_ready {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The status code of `GET path` on a loopback port (HTTP/1.0, no body read).
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 200"
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

fn print_banner(nodes: &[LocalNode], data_dir: &std::path::Path) {
    println!();
    println!(
        "Synod local cluster is up: {} nodes agree on their membership.",
        nodes.len()
    );
    for node in nodes {
        println!(
            "  {}: amqp://guest:guest@127.0.0.1:{}/  management http://127.0.0.1:{}/api/overview  metrics http://127.0.0.1:{}/metrics",
            node.name, node.amqp, node.mgmt, node.metrics
        );
    }
    println!(
        "Connect any AMQP 0-9-1 client to any node (user guest, password guest); see the cluster with"
    );
    println!(
        "  curl -u guest:guest http://127.0.0.1:{}/api/cluster",
        nodes[0].mgmt
    );
    println!(
        "Data lives in {}; Ctrl-C stops every node.",
        data_dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_gives_the_first_node_rabbitmq_ports() {
        // Goal: base 5672 maps node 1 to 5672/15672/15692/25672 and nodes
        // never share a port.
        let args = LocalArgs::parse_from(["local-cluster"]);
        let nodes = plan(&args);
        assert_eq!(nodes.len(), 3);
        let first = &nodes[0];
        assert_eq!(
            (first.amqp, first.mgmt, first.metrics, first.cluster),
            (5672, 15672, 15692, 25672)
        );
        let mut ports: Vec<u16> = nodes
            .iter()
            .flat_map(|n| [n.amqp, n.mgmt, n.metrics, n.cluster])
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 12);
    }
}
