//! The limits that protect the broker from its clients, each reached by a
//! real client (lapin) on loopback while a second client keeps working:
//! node, user and vhost connection limits, user channel limits, vhost and
//! node queue limits, consumers per channel, `--channel-max`, and the
//! memory and free-disk alarms that block publishers. Limits are set with
//! the flags and through the management API (reqwest), as operators do.

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use synod_broker::broker::Settings;
use synod_broker::config::{Args, Config};
use synod_broker::server::{self, RunningBroker};
use tokio::net::TcpStream;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

/// Waits until `condition` holds, checking every few milliseconds.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// The AMQP reply code and text carried by a lapin error, if any.
fn reply(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        _ => None,
    }
}

fn config(extra: &[&str]) -> Config {
    let mut argv = vec![
        "synod-broker",
        "--node-name",
        "synod@limits",
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config")
}

/// A broker serving AMQP, the management API and `/metrics` on loopback.
struct Harness {
    broker: RunningBroker,
    http: reqwest::Client,
    base: String,
    metrics_url: String,
}

impl Harness {
    async fn start(extra: &[&str], tune: impl FnOnce(&mut Settings)) -> Harness {
        let config = config(extra);
        let mut settings = Settings::from_config(&config);
        tune(&mut settings);
        let broker = server::start_serving(config, Some(settings))
            .await
            .expect("broker starts");
        Harness::around(broker)
    }

    /// A broker whose data lives in `data_dir` (the disk alarm watches it).
    async fn start_durable(data_dir: &std::path::Path, extra: &[&str]) -> Harness {
        let dir = data_dir.to_str().expect("utf-8 path");
        let mut argv = vec!["--data-dir", dir];
        argv.extend_from_slice(extra);
        let broker = server::start_durable_serving(config(&argv), None)
            .await
            .expect("broker starts");
        Harness::around(broker)
    }

    fn around(broker: RunningBroker) -> Harness {
        let base = format!("http://{}", broker.mgmt_addr.expect("mgmt listener"));
        let metrics_url = format!(
            "http://{}/metrics",
            broker.metrics_addr.expect("metrics listener")
        );
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .no_proxy()
            .build()
            .expect("client");
        Harness {
            broker,
            http,
            base,
            metrics_url,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth("guest", Some("guest"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, body: Value) -> StatusCode {
        self.call(Method::PUT, path, Some(body)).await.0
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn metrics(&self) -> String {
        self.http
            .get(&self.metrics_url)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text")
    }

    async fn connect_as(&self, user: &str, vhost: &str) -> Result<Connection, lapin::Error> {
        let uri = format!(
            "amqp://{user}:{user}@{}/{}",
            self.broker.amqp_addr,
            vhost.replace('/', "%2f")
        );
        within(Connection::connect(&uri, ConnectionProperties::default())).await
    }

    async fn connect(&self) -> Connection {
        let uri = format!("amqp://guest:guest@{}/%2f", self.broker.amqp_addr);
        within(Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .expect("connect")
    }

    async fn stop(self) {
        self.broker.shutdown().await;
    }
}

/// Declares `queue`, publishes `body` to it with a confirm and reads it back.
async fn round_trip(connection: &Connection, queue: &str, body: &[u8]) {
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, queue).await.expect("declare");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    publish(&ch, queue, body).await;
    let got = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, body);
    within(ch.close(200, "done".into())).await.expect("close");
}

async fn declare(ch: &lapin::Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
}

/// Publishes to the default exchange (waits for the confirm when the
/// channel is in confirm mode).
async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    within(async {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await;
}

#[tokio::test]
async fn connections_over_the_node_limit_are_refused_with_530_after_open() {
    // Goal: with --max-connections 2 a third lapin client gets connection.close 530 naming the limit, beyond the refusal slots a socket is closed at once, the first two keep working and a freed slot is reusable.
    let h = Harness::start(&["--max-connections", "2"], |s| {
        s.connections_refusing_max = 1
    })
    .await;
    let first = h.connect().await;
    let second = h.connect().await;
    let err = h
        .connect_as("guest", "/")
        .await
        .expect_err("over the limit");
    let (code, text) = reply(&err).unwrap_or_else(|| panic!("a protocol error, got {err}"));
    assert_eq!(code, 530, "{text}");
    assert!(
        text.contains("NOT_ALLOWED") && text.contains("node connection limit (2) is reached"),
        "{text}"
    );
    // A silent socket holds the one refusal slot (once the refused
    // client's task has let it go): the next one is closed at accept,
    // before any byte, and lapin sees a network error, not a reply.
    let refused = h.broker.broker.metrics.connections_refused_total.get();
    let silent = within(async {
        loop {
            let socket = TcpStream::connect(h.broker.amqp_addr)
                .await
                .expect("connect");
            match h.connect_as("guest", "/").await {
                Err(err) if reply(&err).is_none() => return socket,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(h.broker.broker.metrics.connections_refused_total.get() >= refused + 2);
    drop(silent);
    round_trip(&first, "still-served", b"ok").await;
    within(second.close(200, "bye".into()))
        .await
        .expect("close");
    let again = within(async {
        loop {
            if let Ok(c) = h.connect_as("guest", "/").await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    round_trip(&again, "after-free", b"ok").await;
    h.stop().await;
}

#[tokio::test]
async fn user_and_vhost_limits_set_through_the_api_refuse_with_530() {
    // Goal: user max-connections / max-channels and vhost max-connections set with RabbitMQ's paths give 530 with RabbitMQ's texts to the client over them only; GET shows them; DELETE lifts them.
    let h = Harness::start(&[], |_| {}).await;
    assert_eq!(
        h.put("/api/users/alice", json!({"password": "alice", "tags": ""}))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put(
            "/api/permissions/%2f/alice",
            json!({"configure": ".*", "write": ".*", "read": ".*"})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put(
            "/api/user-limits/alice/max-connections",
            json!({"value": 1})
        )
        .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.put("/api/user-limits/alice/max-channels", json!({"value": 2}))
            .await,
        StatusCode::NO_CONTENT
    );
    let (status, limits) = h.get("/api/user-limits/alice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        limits,
        json!([{"user": "alice", "value": {"max-connections": 1, "max-channels": 2}}])
    );
    assert_eq!(
        h.put("/api/user-limits/alice/max-bananas", json!({"value": 2}))
            .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.put("/api/user-limits/nobody/max-channels", json!({"value": 2}))
            .await,
        StatusCode::NOT_FOUND
    );

    let alice = h.connect_as("alice", "/").await.expect("first connection");
    let err = h
        .connect_as("alice", "/")
        .await
        .expect_err("over the user limit");
    assert_eq!(
        reply(&err),
        Some((
            530,
            "NOT_ALLOWED - Connection refused for user 'alice': user connection limit (1) is reached"
                .to_string()
        ))
    );
    let guest = h.connect().await;
    // max-channels: the third channel of alice closes her connection with 530.
    let _one = within(alice.create_channel()).await.expect("channel 1");
    let _two = within(alice.create_channel()).await.expect("channel 2");
    let err = within(alice.create_channel())
        .await
        .expect_err("over the channel limit");
    assert_eq!(
        reply(&err),
        Some((
            530,
            "NOT_ALLOWED - number of channels opened for user 'alice' has reached the maximum allowed user limit of (2)"
                .to_string()
        ))
    );
    wait_until("alice's connection is closed", || {
        !alice.status().connected()
    })
    .await;
    for _ in 0..3 {
        within(guest.create_channel()).await.expect("guest channel");
    }
    round_trip(&guest, "guest-works", b"ok").await;

    // vhost max-connections.
    assert_eq!(
        h.put("/api/vhosts/small", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put(
            "/api/vhost-limits/small/max-connections",
            json!({"value": 1})
        )
        .await,
        StatusCode::NO_CONTENT
    );
    let (_, vhost_limits) = h.get("/api/vhost-limits").await;
    assert_eq!(
        vhost_limits,
        json!([{"vhost": "small", "value": {"max-connections": 1}}])
    );
    let in_small = h
        .connect_as("guest", "small")
        .await
        .expect("first in small");
    let err = h
        .connect_as("guest", "small")
        .await
        .expect_err("over the vhost limit");
    assert_eq!(
        reply(&err),
        Some((
            530,
            "NOT_ALLOWED - access to vhost 'small' refused for user 'guest': connection limit (1) is reached"
                .to_string()
        ))
    );
    round_trip(&in_small, "small-works", b"ok").await;
    let (status, _) = h
        .call(
            Method::DELETE,
            "/api/vhost-limits/small/max-connections",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let second_in_small = h
        .connect_as("guest", "small")
        .await
        .expect("no limit any more");
    round_trip(&second_in_small, "small-again", b"ok").await;
    assert_eq!(h.get("/api/vhost-limits").await.1, json!([]));
    h.stop().await;
}

#[tokio::test]
async fn queue_limits_close_the_declaring_channel_with_406() {
    // Goal: vhost max-queues (API) and --max-queues (flag) refuse a new queue with 406 and RabbitMQ-style text; redeclaring an existing queue and other channels keep working; the management API answers 400.
    let h = Harness::start(&["--max-queues", "3"], |_| {}).await;
    assert_eq!(
        h.put("/api/vhost-limits/%2f/max-queues", json!({"value": 2}))
            .await,
        StatusCode::NO_CONTENT
    );
    let connection = h.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "q1").await.expect("q1");
    declare(&ch, "q2").await.expect("q2");
    let err = declare(&ch, "q3").await.expect_err("over the vhost limit");
    assert_eq!(
        reply(&err),
        Some((
            406,
            "PRECONDITION_FAILED - cannot declare queue 'q3' in vhost '/': vhost queue limit (2) is reached"
                .to_string()
        ))
    );
    assert!(connection.status().connected(), "a channel error only");
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "q1")
        .await
        .expect("redeclaring is not a new queue");
    let (status, body) = h
        .call(
            Method::PUT,
            "/api/queues/%2f/q3",
            Some(json!({"durable": false})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The node-wide limit counts every vhost.
    assert_eq!(
        h.put("/api/vhosts/other", json!({})).await,
        StatusCode::CREATED
    );
    let other = h.connect_as("guest", "other").await.expect("connect");
    let other_ch = within(other.create_channel()).await.expect("channel");
    declare(&other_ch, "o1")
        .await
        .expect("third queue of the node");
    let err = declare(&other_ch, "o2")
        .await
        .expect_err("over the node limit");
    assert_eq!(
        reply(&err),
        Some((
            406,
            "PRECONDITION_FAILED - cannot declare queue 'o2' in vhost 'other': node queue limit (3) is reached"
                .to_string()
        ))
    );
    round_trip(&connection, "q2", b"still works").await;
    h.stop().await;
}

#[tokio::test]
async fn consumers_beyond_the_channel_limit_close_the_channel_with_406() {
    // Goal: with --max-consumers-per-channel 2 the third basic.consume on a channel gets 406; another channel still consumes and receives.
    let h = Harness::start(&["--max-consumers-per-channel", "2"], |_| {}).await;
    let connection = h.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "work").await.expect("declare");
    let mut consumers = Vec::new();
    for _ in 0..2 {
        consumers.push(
            within(ch.basic_consume(
                "work".into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await
            .expect("within the limit"),
        );
    }
    let err = within(ch.basic_consume(
        "work".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("over the limit");
    assert_eq!(
        reply(&err),
        Some((
            406,
            "PRECONDITION_FAILED - reached maximum (2) of consumers per channel".to_string()
        ))
    );
    let other = within(connection.create_channel()).await.expect("channel");
    let mut consumer = within(other.basic_consume(
        "work".into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("another channel consumes");
    let publisher = within(connection.create_channel()).await.expect("channel");
    publish(&publisher, "work", b"hello").await;
    let delivery = within(consumer.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"hello");
    h.stop().await;
}

#[tokio::test]
async fn channel_max_is_offered_in_tune() {
    // Goal: --channel-max 4 is what connection.tune offers, so lapin negotiates 4.
    let h = Harness::start(&["--channel-max", "4"], |_| {}).await;
    let connection = h.connect().await;
    assert_eq!(connection.configuration().channel_max(), 4);
    h.stop().await;
}

/// A consumer on its own connection: the deliveries it receives.
async fn consume(connection: &Connection, queue: &str) -> lapin::Consumer {
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, queue).await.expect("declare");
    within(ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("consume")
}

/// Asserts `consumer` receives nothing for a short while (the publisher is
/// blocked, so nothing can arrive; a bounded wait proves the absence).
async fn assert_nothing_arrives(consumer: &mut lapin::Consumer) {
    let got = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(got.is_err(), "nothing arrives while blocked: {got:?}");
}

#[tokio::test]
async fn a_disk_free_limit_above_the_free_space_blocks_publishers_until_lowered() {
    // Goal: --disk-free-limit = the disk's size raises the disk alarm: publishers get connection.blocked and are not read, consumers keep receiving, the alarms check is 503 naming disk and synod_alarms{resource="disk"} is 1; lowering the limit at run time unblocks.
    let dir = tempfile::tempdir().expect("temp dir");
    let total = synod_broker::resources::disk_total_bytes(dir.path()).expect("statvfs");
    let limit = total.to_string();
    let h = Harness::start_durable(dir.path(), &["--disk-free-limit", &limit]).await;
    wait_until("the disk alarm is raised", || h.broker.broker.alarms().disk).await;
    let (status, body) = h.get("/api/health/checks/alarms").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["alarms"], json!(["disk"]));
    let (_, nodes) = h.get("/api/nodes").await;
    assert_eq!(nodes[0]["disk_free_limit"], json!(total));
    assert_eq!(nodes[0]["disk_free_alarm"], json!(true));
    assert!(
        nodes[0]["disk_free"]
            .as_u64()
            .is_some_and(|free| free < total)
    );
    assert!(
        h.metrics()
            .await
            .contains("synod_alarms{resource=\"disk\"} 1"),
        "disk alarm gauge"
    );
    let consumer_connection = h.connect().await;
    let mut consumer = consume(&consumer_connection, "jobs").await;
    let publisher = h.connect().await;
    let ch = within(publisher.create_channel()).await.expect("channel");
    // As RabbitMQ, the first publish is read: it is what shows that the
    // connection publishes. Then the connection is told it is blocked and
    // is not read any more.
    publish(&ch, "jobs", b"first").await;
    wait_until("the publisher is told it is blocked", || {
        publisher.status().blocked()
    })
    .await;
    let delivery = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"first", "consumers keep receiving");
    // lapin itself may hold the frame while blocked: publish from a task.
    let held = tokio::spawn({
        let ch = ch.clone();
        async move { publish(&ch, "jobs", b"held").await }
    });
    assert_nothing_arrives(&mut consumer).await;
    h.broker.broker.set_disk_free_limit_bytes(0);
    wait_until("the publisher is unblocked", || {
        !publisher.status().blocked()
    })
    .await;
    within(held).await.expect("the held publish completes");
    let delivery = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"held");
    assert_eq!(h.get("/api/health/checks/alarms").await.0, StatusCode::OK);
    assert!(
        h.metrics()
            .await
            .contains("synod_alarms{resource=\"disk\"} 0"),
        "disk alarm cleared"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_tiny_memory_watermark_blocks_publishers_while_consumers_drain() {
    // Goal: --memory-high-watermark 1000 (bytes) is crossed by a 2000-byte message: the publisher is blocked, the alarms check names memory, a consumer on another connection drains the queue, which clears the alarm and unblocks the publisher.
    let h = Harness::start(&["--memory-high-watermark", "1000"], |_| {}).await;
    let publisher = h.connect().await;
    let ch = within(publisher.create_channel()).await.expect("channel");
    declare(&ch, "big").await.expect("declare");
    publish(&ch, "big", &[7u8; 2_000]).await;
    wait_until("the publisher is blocked", || publisher.status().blocked()).await;
    let (status, body) = h.get("/api/health/checks/alarms").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["alarms"], json!(["memory"]));
    assert!(
        h.metrics()
            .await
            .contains("synod_alarms{resource=\"memory\"} 1")
    );
    let consumer_connection = h.connect().await;
    let mut consumer = consume(&consumer_connection, "big").await;
    let delivery = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(delivery.data.len(), 2_000, "the consumer drains");
    wait_until("the publisher is unblocked", || {
        !publisher.status().blocked()
    })
    .await;
    publish(&ch, "big", b"small").await;
    let delivery = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(delivery.data, b"small");
    assert_eq!(h.get("/api/health/checks/alarms").await.0, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn limits_survive_a_restart_and_travel_in_definitions() {
    // Goal: user and vhost limits set through the API are in GET /api/definitions (users[].limits, vhost-limits parameters), survive a restart of a durable broker, and a definitions import sets them on another broker.
    let dir = tempfile::tempdir().expect("temp dir");
    let h = Harness::start_durable(dir.path(), &[]).await;
    assert_eq!(
        h.put("/api/user-limits/guest/max-channels", json!({"value": 64}))
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.put("/api/vhost-limits/%2f/max-queues", json!({"value": 10}))
            .await,
        StatusCode::NO_CONTENT
    );
    let (_, definitions) = h.get("/api/definitions").await;
    assert_eq!(
        definitions["users"][0]["limits"],
        json!({"max-channels": 64})
    );
    assert_eq!(
        definitions["parameters"],
        json!([{"vhost": "/", "component": "vhost-limits", "name": "limits",
                "value": {"max-queues": 10}}])
    );
    h.stop().await;
    let h = Harness::start_durable(dir.path(), &[]).await;
    assert_eq!(
        h.get("/api/user-limits").await.1,
        json!([{"user": "guest", "value": {"max-channels": 64}}])
    );
    assert_eq!(
        h.get("/api/vhost-limits/%2f").await.1,
        json!([{"vhost": "/", "value": {"max-queues": 10}}])
    );
    h.stop().await;

    let other = Harness::start(&[], |_| {}).await;
    let (status, answer) = other
        .call(Method::POST, "/api/definitions", Some(definitions))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        other.get("/api/vhost-limits").await.1,
        json!([{"vhost": "/", "value": {"max-queues": 10}}])
    );
    assert_eq!(
        other.get("/api/user-limits/guest").await.1,
        json!([{"user": "guest", "value": {"max-channels": 64}}])
    );
    other.stop().await;
}
