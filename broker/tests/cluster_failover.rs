//! Three nodes on loopback: they agree on their membership, survive the loss
//! of the leader, and a restarted node catches up from its data directory.

mod cluster_support;

use std::time::Duration;

use cluster_support::{agreed, cleanup, cluster, leader_index, wait_for};

const TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_fail_over_and_catch_up() {
    // Goal: 3 members agreed; leader loss -> new leader keeps deciding; restart -> catch-up.
    let mut nodes = cluster("failover", &["n1", "n2", "n3"]).await;
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("3 voters agreed", TIMEOUT, || {
            agreed(&all, &["n1", "n2", "n3"])
        })
        .await;
    }
    let leader = leader_index(&nodes).expect("a leader");
    let follower = (leader + 1) % 3;
    // Proposals from the leader and through a follower are both decided.
    nodes[leader]
        .node()
        .propose(b"one".to_vec())
        .await
        .expect("decided");
    nodes[follower]
        .node()
        .propose(b"two".to_vec())
        .await
        .expect("decided via forward");
    wait_for("every node applied both", TIMEOUT, || {
        nodes
            .iter()
            .all(|n| n.commands() == vec![b"one".to_vec(), b"two".to_vec()])
    })
    .await;
    let old_leader_name = nodes[leader].name.clone();
    let incarnation = nodes[leader].status().incarnation;

    nodes[leader].stop().await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    wait_for("a new leader among the survivors", TIMEOUT, || {
        survivors
            .iter()
            .any(|i| nodes[*i].status().role == "leader")
    })
    .await;
    let new_leader = *survivors
        .iter()
        .find(|i| nodes[**i].status().role == "leader")
        .expect("found above");
    assert_ne!(nodes[new_leader].name, old_leader_name);
    for (k, i) in survivors.iter().enumerate() {
        let data = format!("after-{k}").into_bytes();
        nodes[*i]
            .node()
            .propose(data)
            .await
            .expect("decided without the old leader");
    }

    nodes[leader].restart().await;
    let target = nodes[new_leader].status().decided_index;
    wait_for("the restarted node catches up", TIMEOUT, || {
        let s = nodes[leader].status();
        s.decided_index >= target && s.ready
    })
    .await;
    assert_eq!(
        nodes[leader].status().incarnation,
        incarnation,
        "same disk, same identity"
    );
    let expected = nodes[new_leader].commands();
    wait_for("the restarted node applied the same log", TIMEOUT, || {
        nodes[leader].commands() == expected
    })
    .await;
    assert_eq!(expected.len(), 4);
    let all: Vec<_> = nodes.iter().collect();
    wait_for("3 voters agreed again", TIMEOUT, || {
        agreed(&all, &["n1", "n2", "n3"])
    })
    .await;
    cleanup(nodes).await;
}
