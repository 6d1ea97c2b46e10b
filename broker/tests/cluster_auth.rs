//! A node that cannot prove the cluster secret is kept out.

mod cluster_support;

use std::time::Duration;

use cluster_support::{agreed, bind, cleanup, cluster, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_never_joins() {
    // Goal: the handshake rejects a wrong secret, so the intruder stays outside the configuration.
    let mut nodes = cluster("auth", &["a1", "a2"]).await;
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("2 voters", Duration::from_secs(20), || {
            agreed(&all, &["a1", "a2"])
        })
        .await;
    }
    let listener = bind().await;
    let mut intruder = cluster_support::TestNode {
        name: "a3".into(),
        dir: cluster_support::temp_dir("auth-a3"),
        addr: listener.local_addr().expect("addr"),
        peers: nodes[0].peers.clone(),
        secret: b"wrong secret".to_vec(),
        node: None,
        applied: Default::default(),
        metrics: Default::default(),
    };
    intruder
        .peers
        .insert("a3".into(), intruder.addr.to_string());
    intruder.start_on(listener).await;
    // Long enough for dozens of join attempts (every 5 ticks of 10 ms).
    let leader = nodes
        .iter()
        .position(|n| n.status().role == "leader")
        .expect("a leader");
    for round in 0..20 {
        nodes[leader]
            .node()
            .propose(format!("tick {round}").into_bytes())
            .await
            .expect("decided");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(intruder.status().role, "joining");
    for node in &nodes {
        let names: Vec<String> = node
            .status()
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(names, vec!["a1".to_string(), "a2".to_string()]);
    }
    nodes.push(intruder);
    cleanup(nodes).await;
}
