//! Cross-node queues through real clients (lapin): three brokers started
//! in-process on loopback, each with its data directory and cluster port,
//! given identical metadata by executing the same commands on each. A queue
//! homed on `a` is published to through `b` and consumed through `c`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use synod_broker::config::{Args, Config};
use synod_broker::meta::{Command, QueueDef};
use synod_broker::server::{self, RunningBroker};

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(15);
const SECRET: &[u8] = b"forwarding test secret";

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

struct Node {
    config: Config,
    broker: Option<RunningBroker>,
}

impl Node {
    fn running(&self) -> &RunningBroker {
        self.broker.as_ref().expect("node is running")
    }

    async fn connect(&self) -> Connection {
        let uri = format!("amqp://guest:guest@{}/%2f", self.running().amqp_addr);
        within(Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .expect("connect")
    }

    async fn stop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }

    async fn restart(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match server::start_durable(self.config.clone(), None).await {
                Ok(broker) => {
                    self.broker = Some(broker);
                    return;
                }
                // The old cluster port may linger a moment after stop.
                Err(err) if Instant::now() < deadline => {
                    eprintln!("restart failed, retrying: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("restart: {err}"),
            }
        }
    }
}

struct Cluster {
    root: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts nodes `a`, `b`, `c`; the ports are picked free then released,
    /// so a start that loses a port to another test is retried elsewhere.
    async fn start(tag: &str) -> Cluster {
        let root = std::env::temp_dir().join(format!(
            "synod-forward-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        for attempt in 0..5 {
            let dir = root.join(format!("attempt-{attempt}"));
            match try_start(&dir).await {
                Ok(nodes) => return Cluster { root, nodes },
                Err(err) => eprintln!("cluster start attempt {attempt} failed: {err}"),
            }
        }
        panic!("the cluster did not start");
    }

    fn node(&self, name: &str) -> &Node {
        &self.nodes[index(name)]
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        &mut self.nodes[index(name)]
    }

    /// Decides `command` through the cluster's log (proposed on the first
    /// running node) and waits until every running node has applied it.
    async fn execute_everywhere(&self, command: Command) {
        let queue = match &command {
            Command::DeclareQueue { queue, .. } => Some(queue.name.clone()),
            _ => None,
        };
        // The nodes form the cluster after they start: wait until every
        // running node is a ready member before proposing.
        let deadline = Instant::now() + WAIT;
        for node in &self.nodes {
            if let Some(broker) = &node.broker {
                while !broker.broker.cluster().is_some_and(|c| c.status().ready) {
                    assert!(Instant::now() < deadline, "the cluster did not form");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let first = self
            .nodes
            .iter()
            .find_map(|n| n.broker.as_ref())
            .expect("a running node");
        within(first.broker.submit(command))
            .await
            .expect("command decided and applied");
        let Some(name) = queue else { return };
        let deadline = Instant::now() + WAIT;
        for node in &self.nodes {
            if let Some(broker) = &node.broker {
                while broker.broker.queue_def("/", &name).is_none() {
                    assert!(Instant::now() < deadline, "{name} not applied everywhere");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn declare_queue(&self, name: &str, home: &str, durable: bool) {
        self.execute_everywhere(Command::DeclareQueue {
            vhost: "/".into(),
            queue: QueueDef {
                name: name.into(),
                durable,
                exclusive_owner: None,
                auto_delete: false,
                arguments: FieldTable::default(),
                home_node: home.into(),
            },
        })
        .await;
    }

    async fn shutdown(mut self) {
        for node in &mut self.nodes {
            node.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn index(name: &str) -> usize {
    ["a", "b", "c"]
        .iter()
        .position(|n| *n == name)
        .expect("a node name")
}

async fn try_start(dir: &Path) -> Result<Vec<Node>, server::Error> {
    std::fs::create_dir_all(dir).expect("create dir");
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).expect("write secret");
    let names = ["a", "b", "c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let peers = names
        .iter()
        .zip(&ports)
        .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = Vec::new();
    for (name, port) in names.iter().zip(&ports) {
        let data_dir = dir.join(name);
        let cluster_listen = format!("127.0.0.1:{port}");
        let argv = [
            "synod-broker",
            "--node-name",
            name,
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--amqp-listen",
            "127.0.0.1:0",
            "--cluster-listen",
            &cluster_listen,
            "--peers",
            &peers,
            "--cluster-secret-file",
            secret.to_str().expect("utf-8 path"),
        ];
        let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
        match server::start_durable(config.clone(), None).await {
            Ok(broker) => nodes.push(Node {
                config,
                broker: Some(broker),
            }),
            Err(err) => {
                for mut node in nodes {
                    node.stop().await;
                }
                return Err(err);
            }
        }
    }
    Ok(nodes)
}

async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = within(connection.create_channel()).await.expect("channel");
    within(channel.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    channel
}

/// Publishes `body` to queue `queue` through the default exchange and
/// returns whether the publisher confirm was an ack.
async fn publish_confirmed(channel: &Channel, queue: &str, body: &[u8], persistent: bool) -> bool {
    let properties = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    within(channel.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        properties,
    ))
    .await
    .expect("publish")
    .await
    .expect("confirmation")
    .is_ack()
}

/// Waits until the home node's runtime queue has these counts.
async fn wait_counts(node: &Node, queue: &str, ready: u64, unacked: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let counts = node
            .running()
            .broker
            .queue("/", queue)
            .expect("queue exists on its home node")
            .counts();
        if counts.ready == ready && counts.unacked == unacked {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counts stayed {counts:?}, wanted ready {ready} unacked {unacked}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn published_on_one_node_consumed_on_another_exactly_once_in_order() {
    // Goal: a queue homed on a, published to through b with confirms and consumed through c, delivers every message once, in order.
    let cluster = Cluster::start("order").await;
    cluster.declare_queue("orders", "a", false).await;
    assert!(
        cluster
            .node("b")
            .running()
            .broker
            .queue("/", "orders")
            .is_none(),
        "only the home node holds the runtime queue"
    );
    let publisher = cluster.node("b").connect().await;
    let pub_channel = confirm_channel(&publisher).await;
    let n = 500;
    let mut confirms = Vec::new();
    for i in 0..n {
        confirms.push(
            within(pub_channel.basic_publish(
                "".into(),
                "orders".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_content_type("text/plain".into()),
            ))
            .await
            .expect("publish"),
        );
    }
    for confirm in confirms {
        assert!(within(confirm).await.expect("confirm").is_ack());
    }
    let consumer_conn = cluster.node("c").connect().await;
    let channel = within(consumer_conn.create_channel())
        .await
        .expect("channel");
    within(channel.basic_qos(50, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = within(channel.basic_consume(
        "orders".into(),
        "reader".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    for i in 0..n {
        let delivery = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("ok");
        assert_eq!(delivery.data, format!("m{i}").as_bytes());
        assert_eq!(
            delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str()),
            Some("text/plain")
        );
        within(delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    wait_counts(cluster.node("a"), "orders", 0, 0).await;
    let forwarded = cluster
        .node("b")
        .running()
        .broker
        .metrics
        .cluster_forwarded_messages_total
        .with_label_values(&["a"])
        .get();
    assert_eq!(forwarded, n);
    assert_eq!(
        cluster
            .node("b")
            .running()
            .broker
            .metrics
            .messages_confirmed_total
            .get(),
        n
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn get_declare_purge_and_settling_work_across_nodes() {
    // Goal: basic.get (and get-empty), passive declare counts, nack-requeue, reject, multiple ack and purge reach the home node.
    let cluster = Cluster::start("get").await;
    cluster.declare_queue("jobs", "a", false).await;
    let publisher = cluster.node("b").connect().await;
    let pub_channel = confirm_channel(&publisher).await;
    for i in 0..5 {
        assert!(publish_confirmed(&pub_channel, "jobs", format!("j{i}").as_bytes(), false).await);
    }
    let conn = cluster.node("c").connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let declared = within(ch.queue_declare(
        "jobs".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive declare");
    assert_eq!(declared.message_count(), 5);
    let get = |ch: Channel| async move {
        within(ch.basic_get("jobs".into(), BasicGetOptions::default()))
            .await
            .expect("get")
    };
    let first = get(ch.clone()).await.expect("a message");
    assert_eq!(first.delivery.data, b"j0");
    assert_eq!(first.message_count, 4);
    within(first.delivery.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .expect("nack");
    let again = get(ch.clone()).await.expect("the requeued message");
    assert_eq!(again.delivery.data, b"j0");
    assert!(again.delivery.redelivered);
    let second = get(ch.clone()).await.expect("a message");
    assert_eq!(second.delivery.data, b"j1");
    within(
        second
            .delivery
            .reject(BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject");
    let third = get(ch.clone()).await.expect("a message");
    assert_eq!(third.delivery.data, b"j2");
    // One multiple ack settles j0 and j2 on the home node.
    within(third.delivery.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack");
    wait_counts(cluster.node("a"), "jobs", 2, 0).await;
    let purged = within(ch.queue_purge("jobs".into(), QueuePurgeOptions::default()))
        .await
        .expect("purge");
    assert_eq!(purged, 2);
    assert!(get(ch.clone()).await.is_none(), "get-empty after purge");
    cluster.shutdown().await;
}

#[tokio::test]
async fn prefetch_bounds_remote_deliveries_and_cancel_requeues() {
    // Goal: with prefetch 1 and no ack only one message reaches the remote consumer; cancel and channel close give it back.
    let cluster = Cluster::start("prefetch").await;
    cluster.declare_queue("slow", "a", false).await;
    let publisher = cluster.node("b").connect().await;
    let pub_channel = confirm_channel(&publisher).await;
    for i in 0..3 {
        assert!(publish_confirmed(&pub_channel, "slow", format!("s{i}").as_bytes(), false).await);
    }
    let conn = cluster.node("c").connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = within(ch.basic_consume(
        "slow".into(),
        "one-at-a-time".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let delivery = within(consumer.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"s0");
    // The home node is the authority: one unacked, two still ready.
    wait_counts(cluster.node("a"), "slow", 2, 1).await;
    within(ch.basic_cancel("one-at-a-time".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    // The cancel reaches the home node asynchronously.
    let deadline = Instant::now() + WAIT;
    let home_queue = cluster
        .node("a")
        .running()
        .broker
        .queue("/", "slow")
        .expect("queue");
    while home_queue.counts().consumers != 0 {
        assert!(Instant::now() < deadline, "the home node kept the consumer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    within(ch.close(200, "bye".into())).await.expect("close");
    wait_counts(cluster.node("a"), "slow", 3, 0).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn losing_the_home_node_cancels_consumers_and_nacks_until_it_returns() {
    // Goal: when a goes away the consumer on c is cancelled and confirms on b are nacks; after a restarts its durable queue serves again.
    let mut cluster = Cluster::start("failover").await;
    cluster.declare_queue("durable-q", "a", true).await;
    let publisher = cluster.node("b").connect().await;
    let pub_channel = confirm_channel(&publisher).await;
    assert!(publish_confirmed(&pub_channel, "durable-q", b"before", true).await);
    let conn = cluster.node("c").connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut consumer = within(ch.basic_consume(
        "durable-q".into(),
        "watcher".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let delivery = within(consumer.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"before");
    within(delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    assert!(publish_confirmed(&pub_channel, "durable-q", b"kept", true).await);
    let kept = within(consumer.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(kept.data, b"kept");
    // Unacked when a stops: a requeues it when it comes back.
    cluster.node_mut("a").stop().await;
    assert!(
        within(consumer.next()).await.is_none(),
        "the consumer is cancelled when its queue's home goes away"
    );
    assert!(
        !publish_confirmed(&pub_channel, "durable-q", b"lost", true).await,
        "a publish to an unreachable home is nacked"
    );
    let returned = within(pub_channel.basic_publish(
        "".into(),
        "durable-q".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"returned",
        BasicProperties::default(),
    ))
    .await
    .expect("publish")
    .await
    .expect("confirmation");
    assert!(returned.is_nack(), "{returned:?}");
    let message = returned
        .take_message()
        .expect("a mandatory message comes back");
    assert_eq!(message.reply_code, 312);
    assert!(
        message.reply_text.as_str().contains("'a'"),
        "{}",
        message.reply_text
    );
    assert_eq!(message.delivery.data, b"returned");
    let err = within(ch.basic_get("durable-q".into(), BasicGetOptions::default()))
        .await
        .expect_err("get with the home down fails");
    let code = match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    };
    assert_eq!(code, Some(405), "{err}");
    cluster.node_mut("a").restart().await;
    // Publishes nack until the link is back (at most LINK_RETRY_DELAY_MS).
    let deadline = Instant::now() + WAIT;
    while !publish_confirmed(&pub_channel, "durable-q", b"after", true).await {
        assert!(Instant::now() < deadline, "publishes never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut consumer = within(ch.basic_consume(
        "durable-q".into(),
        "watcher-2".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume after restart");
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        let delivery = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("ok");
        bodies.push(String::from_utf8_lossy(&delivery.data).into_owned());
        within(delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    assert_eq!(bodies, ["kept", "after"]);
    cluster.shutdown().await;
}

#[tokio::test]
#[ignore = "throughput measurement; run with --ignored --nocapture"]
async fn cross_node_throughput_against_single_node() {
    // Goal: measure publish->consume throughput through b and c to a queue on a, against the same on one node.
    let cluster = Cluster::start("throughput").await;
    cluster.declare_queue("local", "a", false).await;
    cluster.declare_queue("remote", "a", false).await;
    let n = 50_000;
    let single = measure(cluster.node("a"), cluster.node("a"), "local", n).await;
    let cross = measure(cluster.node("b"), cluster.node("c"), "remote", n).await;
    println!(
        "publish->consume, {n} x 128 B, confirms: single node {single:.0} msg/s, \
         cross-node (publish on b, consume on c, queue on a) {cross:.0} msg/s, ratio {:.2}",
        cross / single
    );
    cluster.shutdown().await;
}

/// Messages per second from a confirm-mode publisher on `publish_on` to a
/// consumer on `consume_on` (prefetch 1000, acking every 100th, multiple).
async fn measure(publish_on: &Node, consume_on: &Node, queue: &'static str, n: u64) -> f64 {
    let body = vec![7u8; 128];
    let publisher = publish_on.connect().await;
    let consumer_conn = consume_on.connect().await;
    let pub_channel = confirm_channel(&publisher).await;
    let ch = within(consumer_conn.create_channel())
        .await
        .expect("channel");
    within(ch.basic_qos(1000, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = within(ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        let mut confirms = Vec::new();
        for _ in 0..n {
            confirms.push(
                pub_channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish"),
            );
            if confirms.len() >= 1000 {
                for c in confirms.drain(..) {
                    assert!(c.await.expect("confirm").is_ack());
                }
            }
        }
        for c in confirms {
            assert!(c.await.expect("confirm").is_ack());
        }
    });
    for i in 0..n {
        let delivery = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("ok");
        if i % 100 == 99 {
            within(delivery.ack(BasicAckOptions { multiple: true }))
                .await
                .expect("ack");
        }
    }
    producer.await.expect("producer");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = publisher.close(200, "done".into()).await;
    let _ = consumer_conn.close(200, "done".into()).await;
    rate
}

#[tokio::test]
async fn targeted_publishes_and_data_links_need_the_cluster() {
    // Goal: a client cannot send a targeted publish (540, nothing enqueued), and a data link with a wrong secret is refused.
    let cluster = Cluster::start("refuse").await;
    cluster.declare_queue("guarded", "a", false).await;
    let conn = cluster.node("a").connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut body = vec![0u8, 1, 7];
    body.extend_from_slice(b"guarded");
    body.extend_from_slice(b"sneaky");
    let _ = within(ch.basic_publish(
        "".into(),
        "guarded".into(),
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        &body,
        BasicProperties::default(),
    ))
    .await;
    let deadline = Instant::now() + WAIT;
    while conn.status().connected() {
        assert!(Instant::now() < deadline, "the connection stayed open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = cluster
        .node("a")
        .running()
        .broker
        .queue("/", "guarded")
        .expect("queue")
        .counts();
    assert_eq!(counts.ready, 0);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let home = cluster.node("a").config.cluster_listen.to_string();
    let intruder = synod_broker::cluster::transport::Transport::new(
        synod_broker::paxos::NodeId::new("b", 1),
        String::new(),
        b"not the secret".to_vec(),
        [("a".to_string(), home)].into_iter().collect(),
        None,
        shutdown,
    );
    let refused = within(intruder.dial_data_link("a", "/")).await;
    assert!(
        matches!(
            refused,
            Err(synod_broker::cluster::transport::Error::Authentication)
        ),
        "{:?}",
        refused.map(|_| ())
    );
    cluster.shutdown().await;
}
