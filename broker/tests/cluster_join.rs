//! Brokers started with `--peers` form one Paxos cluster, and the
//! management API shows and changes its membership: three durable brokers in
//! this process on loopback, each with its own data directory.

use std::time::{Duration, Instant};

use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use synod_broker::config::{Args, Config};
use synod_broker::server::{self, RunningBroker};

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

const SECRET: &str = "join test secret\n";

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "synod-join-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A loopback port free right now (the broker binds it moments later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

struct Node {
    name: String,
    config: Config,
    broker: RunningBroker,
    base: String,
}

/// Starts the brokers; the cluster ports are picked free then released, so
/// another test may take one first: then everything is stopped and started
/// again on other ports (each attempt in fresh data directories).
async fn start_cluster(names: &[&str], root: &std::path::Path) -> Vec<Node> {
    for attempt in 0..5 {
        match try_start_cluster(names, &root.join(format!("attempt-{attempt}"))).await {
            Ok(nodes) => return nodes,
            Err(err) => eprintln!("cluster start attempt {attempt} failed: {err}"),
        }
    }
    panic!("the cluster did not start in 5 attempts");
}

async fn try_start_cluster(
    names: &[&str],
    root: &std::path::Path,
) -> Result<Vec<Node>, server::Error> {
    std::fs::create_dir_all(root).expect("create attempt dir");
    let secret = root.join("secret");
    std::fs::write(&secret, SECRET).expect("write secret");
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
        let cluster_listen = format!("127.0.0.1:{port}");
        let argv = [
            "synod-broker",
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
            &cluster_listen,
            "--peers",
            &peers,
            "--cluster-secret-file",
            secret.to_str().expect("utf-8 path"),
        ];
        let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
        let broker = match server::start_durable_serving(config.clone(), None).await {
            Ok(broker) => broker,
            Err(err) => {
                shutdown(nodes).await;
                return Err(err);
            }
        };
        let base = format!("http://{}", broker.mgmt_addr.expect("mgmt listener"));
        nodes.push(Node {
            name: name.to_string(),
            config,
            broker,
            base,
        });
    }
    Ok(nodes)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .expect("client")
}

async fn cluster_view(http: &reqwest::Client, node: &Node) -> Option<Value> {
    let response = http
        .get(format!("{}/api/cluster", node.base))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

async fn ready(http: &reqwest::Client, node: &Node) -> Option<StatusCode> {
    let response = http
        .get(format!("{}/api/cluster/ready", node.base))
        .send()
        .await
        .ok()?;
    Some(response.status())
}

/// Voter names, sorted, and the leader of one node's view.
fn voters_and_leader(view: &Value) -> (Vec<String>, Option<String>) {
    let mut voters: Vec<String> = view["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|m| m["role"] == "voter")
                .filter_map(|m| m["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    voters.sort();
    (voters, view["leader"].as_str().map(str::to_string))
}

/// Waits until every node in `nodes` is ready and reports exactly `voters`
/// as voters and the same leader; returns that leader.
async fn wait_agreed(http: &reqwest::Client, nodes: &[&Node], voters: &[&str]) -> String {
    wait_agreed_without(http, nodes, voters, None).await
}

/// [`wait_agreed`] on a leader other than `not_leader`.
async fn wait_agreed_without(
    http: &reqwest::Client,
    nodes: &[&Node],
    voters: &[&str],
    not_leader: Option<&str>,
) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = Vec::new();
    loop {
        last.clear();
        let mut leaders = Vec::new();
        let mut agreed = true;
        for node in nodes {
            let view = cluster_view(http, node).await.unwrap_or(Value::Null);
            let (seen, leader) = voters_and_leader(&view);
            let is_ready = ready(http, node).await == Some(StatusCode::OK);
            agreed &=
                is_ready && seen == voters && leader.is_some() && leader.as_deref() != not_leader;
            leaders.push(leader);
            last.push((node.name.clone(), is_ready, view));
        }
        if agreed && leaders.windows(2).all(|pair| pair[0] == pair[1]) {
            return leaders[0].clone().expect("checked above");
        }
        assert!(
            Instant::now() < deadline,
            "no agreement on voters {voters:?} within {WAIT:?}; last views: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn shutdown(nodes: Vec<Node>) {
    for node in nodes {
        node.broker.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_with_peers_agree_and_change_membership_through_the_api() {
    // Goal: three brokers started with the same --peers agree on three voters and one leader; DELETE and POST /api/cluster/members change that for every node; a stopped leader is replaced and, restarted, rejoins.
    let root = temp_dir("three");
    let nodes = start_cluster(&["a", "b", "c"], &root).await;
    let http = client();
    let all: Vec<&Node> = nodes.iter().collect();
    let started = Instant::now();
    let leader = wait_agreed(&http, &all, &["a", "b", "c"]).await;
    eprintln!("three brokers agreed and ready in {:?}", started.elapsed());
    let leader_node = nodes
        .iter()
        .find(|n| n.name == leader)
        .expect("the leader is one of the nodes");

    // Membership changes are for administrators: a wrong password is refused.
    let refused = http
        .delete(format!("{}/api/cluster/members/x", leader_node.base))
        .basic_auth("guest", Some("wrong"))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    // An unknown member is a 404 with the JSON error shape.
    let unknown = http
        .delete(format!("{}/api/cluster/members/nobody", leader_node.base))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let body: Value = unknown.json().await.expect("json error");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nobody")),
        "{body}"
    );

    // Remove a follower through the leader.
    let victim = nodes
        .iter()
        .find(|n| n.name != leader)
        .expect("two followers");
    let removed = http
        .delete(format!(
            "{}/api/cluster/members/{}",
            leader_node.base, victim.name
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        removed.status(),
        StatusCode::NO_CONTENT,
        "{:?}",
        removed.text().await
    );
    let rest: Vec<&Node> = nodes.iter().filter(|n| n.name != victim.name).collect();
    let mut remaining: Vec<&str> = rest.iter().map(|n| n.name.as_str()).collect();
    remaining.sort();
    wait_agreed(&http, &rest, &remaining).await;

    // Invite it back: it is running with the cluster in its seed list.
    let added = http
        .post(format!("{}/api/cluster/members", leader_node.base))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"name": victim.name, "address": "unused"}))
        .send()
        .await
        .expect("request");
    let status = added.status();
    let victim_view = cluster_view(&http, victim).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{:?} {victim_view:?}",
        added.text().await
    );
    wait_agreed(&http, &all, &["a", "b", "c"]).await;

    // The members gauge follows the agreed configuration.
    let metrics_url = format!(
        "http://{}/metrics",
        leader_node.broker.metrics_addr.expect("metrics listener")
    );
    let text = http
        .get(metrics_url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        text.lines().any(|l| l == "synod_cluster_members 3"),
        "synod_cluster_members is not 3"
    );

    // Stop the leader's broker: the other two elect a new leader.
    let mut nodes = nodes;
    let index = nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("the leader is one of the nodes");
    let stopped = nodes.remove(index);
    let config = stopped.config.clone();
    stopped.broker.shutdown().await;
    let stopped_at = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().collect();
    let new_leader = wait_agreed_without(&http, &survivors, &["a", "b", "c"], Some(&leader)).await;
    eprintln!("new leader after {:?}", stopped_at.elapsed());
    assert!(survivors.iter().any(|n| n.name == new_leader));

    // Restarted from its data directory, it catches up and is ready again.
    let broker = server::start_durable_serving(config.clone(), None)
        .await
        .expect("broker restarts on its data directory and cluster port");
    nodes.push(Node {
        name: leader.clone(),
        base: format!("http://{}", broker.mgmt_addr.expect("mgmt listener")),
        config,
        broker,
    });
    let all: Vec<&Node> = nodes.iter().collect();
    wait_agreed(&http, &all, &["a", "b", "c"]).await;
    eprintln!("restarted broker ready after {:?}", stopped_at.elapsed());

    shutdown(nodes).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn single_node_refuses_membership_changes() {
    // Goal: a broker without --peers reports itself as the only voter and leader, is ready, and answers membership changes with 400.
    let root = temp_dir("single");
    let argv = [
        "synod-broker",
        "--node-name",
        "solo",
        "--data-dir",
        root.to_str().expect("utf-8 path"),
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
    let broker = server::start_durable_serving(config.clone(), None)
        .await
        .expect("broker starts");
    let node = Node {
        name: "solo".into(),
        config: config.clone(),
        base: format!("http://{}", broker.mgmt_addr.expect("mgmt listener")),
        broker,
    };
    let http = client();
    let view = cluster_view(&http, &node).await.expect("cluster view");
    assert_eq!(
        voters_and_leader(&view),
        (vec!["solo".to_string()], Some("solo".to_string()))
    );
    assert_eq!(ready(&http, &node).await, Some(StatusCode::OK));
    let added = http
        .post(format!("{}/api/cluster/members", node.base))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"name": "other", "address": "127.0.0.1:1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(added.status(), StatusCode::BAD_REQUEST);
    shutdown(vec![node]).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn unreadable_secret_file_is_a_configuration_error() {
    // Goal: --peers with a --cluster-secret-file that cannot be read fails to start with exit code 2, naming the flag.
    let root = temp_dir("secret");
    let data_dir = root.join("data");
    let missing = root.join("no-such-secret");
    let cluster_listen = format!("127.0.0.1:{}", free_port());
    let peers = format!("a={cluster_listen}");
    let argv = [
        "synod-broker",
        "--node-name",
        "a",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--cluster-listen",
        &cluster_listen,
        "--peers",
        &peers,
        "--cluster-secret-file",
        missing.to_str().expect("utf-8 path"),
    ];
    let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
    let err = server::start_durable_serving(config.clone(), None)
        .await
        .expect_err("no secret, no start");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("--cluster-secret-file"), "{err}");
    // The data directory was released: a second attempt fails the same way,
    // not on the directory lock.
    let again = server::start_durable_serving(config, None)
        .await
        .expect_err("still no secret");
    assert_eq!(again.exit_code(), 2, "{again}");
    let _ = std::fs::remove_dir_all(&root);
}
