//! Log compaction on a real cluster: after every member compacts, a new node
//! catches up from a snapshot, and a restarted member restores from its own.

mod cluster_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_support::{
    SECRET, TestNode, agreed, bind, cleanup, cluster, leader_index, temp_dir, wait_for,
};
use synod_broker::cluster::Applied;
use synod_broker::metrics::Metrics;

const TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_catches_up_from_a_snapshot() {
    // Goal: compacted logs are served as snapshots and survive restarts.
    let mut nodes = cluster("snapshot", &["s1", "s2", "s3"]).await;
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("3 voters", TIMEOUT, || agreed(&all, &["s1", "s2", "s3"])).await;
    }
    let leader = leader_index(&nodes).expect("a leader");
    for i in 0..20 {
        nodes[leader]
            .node()
            .propose(format!("c{i}").into_bytes())
            .await
            .expect("decided");
    }
    let index = nodes[leader].status().decided_index;
    wait_for("all applied", TIMEOUT, || {
        nodes.iter().all(|n| n.status().decided_index >= index)
    })
    .await;
    for node in &nodes {
        node.node()
            .compact(index, format!("state@{index}").into_bytes())
            .await
            .expect("compacts");
    }

    let listener = bind().await;
    let addr = listener.local_addr().expect("addr");
    let mut peers: BTreeMap<String, String> = nodes[0].peers.clone();
    peers.insert("s4".into(), addr.to_string());
    let mut joiner = TestNode {
        name: "s4".into(),
        dir: temp_dir("snapshot-s4"),
        addr,
        peers,
        secret: SECRET.to_vec(),
        node: None,
        applied: Arc::new(Mutex::new(Vec::new())),
        metrics: Metrics::new(),
    };
    joiner.start_on(listener).await;
    cluster_support::change_on_leader(&nodes, "s4", true).await;
    let expected_snapshot = Applied::Snapshot {
        index,
        data: format!("state@{index}").into_bytes(),
    };
    wait_for("s4 installed the snapshot", TIMEOUT, || {
        joiner
            .applied
            .lock()
            .expect("lock")
            .contains(&expected_snapshot)
    })
    .await;
    assert!(
        joiner.commands().iter().all(|c| c != b"c0"),
        "compacted entries are not replayed one by one"
    );

    // A restarted member hands its stored snapshot to the application first.
    let other = (leader + 1) % 3;
    nodes[other].stop().await;
    nodes[other].restart().await;
    wait_for(
        "the restarted member restores its snapshot",
        TIMEOUT,
        || nodes[other].applied.lock().expect("lock").first() == Some(&expected_snapshot),
    )
    .await;
    nodes.push(joiner);
    cleanup(nodes).await;
}
