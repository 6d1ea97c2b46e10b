//! Measures time-to-elect after a leader is stopped and decided proposals
//! per second, three nodes on loopback; prints the numbers (run with
//! `--nocapture`) and fails if they fall outside generous bounds.

mod cluster_support;

use std::time::{Duration, Instant};

use cluster_support::{agreed, cleanup, cluster, leader_index, wait_for};
use futures::StreamExt;

const TIMEOUT: Duration = Duration::from_secs(20);
const ELECTION_RUNS: usize = 10;
const PROPOSALS: usize = 3_000;
const PROPOSALS_IN_FLIGHT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_elect_and_throughput() {
    // Goal: a new leader within 2 s of losing the old one, and > 100 decisions/s.
    let mut elections = Vec::new();
    for run in 0..ELECTION_RUNS {
        let mut nodes = cluster(&format!("measure-{run}"), &["m1", "m2", "m3"]).await;
        {
            let all: Vec<_> = nodes.iter().collect();
            wait_for("3 voters", TIMEOUT, || agreed(&all, &["m1", "m2", "m3"])).await;
        }
        let leader = leader_index(&nodes).expect("a leader");
        nodes[leader].stop().await;
        let took = wait_for("a new leader", TIMEOUT, || {
            nodes.iter().any(|n| {
                n.node
                    .as_ref()
                    .is_some_and(|node| node.status().role == "leader")
            })
        })
        .await;
        elections.push(took);
        cleanup(nodes).await;
    }
    elections.sort();
    let median = elections[elections.len() / 2];
    let max = *elections.last().expect("runs");
    println!(
        "time to elect after leader stop (10 ms ticks, election timeout 10-20 ticks): median {median:?}, max {max:?}"
    );

    let nodes = cluster("measure-throughput", &["t1", "t2", "t3"]).await;
    {
        let all: Vec<_> = nodes.iter().collect();
        wait_for("3 voters", TIMEOUT, || agreed(&all, &["t1", "t2", "t3"])).await;
    }
    let leader = leader_index(&nodes).expect("a leader");
    let node = nodes[leader].node();
    let start = Instant::now();
    let decided: Vec<_> = futures::stream::iter(0..PROPOSALS)
        .map(|i| node.propose(format!("proposal {i:08}").into_bytes()))
        .buffer_unordered(PROPOSALS_IN_FLIGHT)
        .collect()
        .await;
    let elapsed = start.elapsed();
    assert!(decided.iter().all(|r| r.is_ok()), "every proposal decided");
    let rate = PROPOSALS as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {PROPOSALS} proposals ({PROPOSALS_IN_FLIGHT} in flight) decided in {elapsed:?}: {rate:.0}/s"
    );
    cleanup(nodes).await;
    assert!(
        median < Duration::from_secs(2),
        "median election {median:?}"
    );
    assert!(rate > 100.0, "only {rate:.0} decisions/s");
}
