//! Membership changes on a real loopback cluster: nodes join and leave one at
//! a time, and a node that lost its disk rejoins under a new incarnation.

mod cluster_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_support::{
    SECRET, TestNode, agreed, bind, cleanup, cluster, leader_index, temp_dir, wait_for,
};
use synod_broker::metrics::Metrics;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn add_node(nodes: &mut Vec<TestNode>, name: &str) {
    let listener = bind().await;
    let mut peers: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.addr.to_string()))
        .collect();
    let addr = listener.local_addr().expect("addr");
    peers.insert(name.to_string(), addr.to_string());
    let mut node = TestNode {
        name: name.to_string(),
        dir: temp_dir(&format!("membership-{name}")),
        addr,
        peers,
        secret: SECRET.to_vec(),
        node: None,
        applied: Arc::new(Mutex::new(Vec::new())),
        metrics: Metrics::new(),
    };
    node.start_on(listener).await;
    nodes.push(node);
}

async fn leader(nodes: &[TestNode]) -> usize {
    wait_for("a leader", TIMEOUT, || leader_index(nodes).is_some()).await;
    leader_index(nodes).expect("waited for it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_leave_and_return_after_disk_loss() {
    // Goal: add a 4th and 5th, remove two, wipe one: every member reports the same configuration.
    let mut nodes = cluster("membership", &["n1", "n2", "n3"]).await;
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("3 voters", TIMEOUT, || agreed(&all, &["n1", "n2", "n3"])).await;
    }
    for name in ["n4", "n5"] {
        add_node(&mut nodes, name).await;
        cluster_support::change_on_leader(&nodes, name, true).await;
    }
    {
        let all: Vec<_> = nodes.iter().collect();
        let five = ["n1", "n2", "n3", "n4", "n5"];
        wait_for("5 voters", TIMEOUT, || agreed(&all, &five)).await;
        assert_eq!(nodes[0].metrics.cluster_members.get(), 5);
    }
    for name in ["n1", "n2"] {
        cluster_support::change_on_leader(&nodes, name, false).await;
        let index = nodes.iter().position(|n| n.name == name).expect("known");
        // Wait for the survivors to agree before the next change, since the
        // removed node may have been the leader.
        let remaining: Vec<usize> = (0..nodes.len()).filter(|i| *i != index).collect();
        wait_for("a leader among the remaining nodes", TIMEOUT, || {
            remaining
                .iter()
                .any(|i| nodes[*i].status().role == "leader")
        })
        .await;
        let mut removed = nodes.remove(index);
        removed.stop().await;
        std::fs::remove_dir_all(&removed.dir).ok();
    }
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("3 voters after removals", TIMEOUT, || {
            agreed(&all, &["n3", "n4", "n5"])
        })
        .await;
    }
    let l = leader(&nodes).await;
    nodes[l]
        .node()
        .propose(b"after removals".to_vec())
        .await
        .expect("decided");

    // n3 loses its disk: it comes back with a new incarnation and rejoins.
    let index = nodes.iter().position(|n| n.name == "n3").expect("n3");
    let old_incarnation = nodes[index].status().incarnation;
    nodes[index].stop().await;
    std::fs::remove_dir_all(&nodes[index].dir).expect("wipe");
    // Its seed list names the current members, as a redeployed node's would.
    let peers: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.addr.to_string()))
        .collect();
    nodes[index].peers = peers;
    nodes[index].restart().await;
    let new_incarnation = nodes[index].status().incarnation;
    assert_ne!(old_incarnation, new_incarnation);
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("the wiped node rejoins as a voter", TIMEOUT, || {
            agreed(&all, &["n3", "n4", "n5"])
                && all.iter().all(|n| {
                    n.status()
                        .members
                        .iter()
                        .any(|m| m.name == "n3" && m.incarnation == new_incarnation)
                })
        })
        .await;
    }
    let l = leader(&nodes).await;
    nodes[l]
        .node()
        .propose(b"after rejoin".to_vec())
        .await
        .expect("decided");
    cleanup(nodes).await;
}
