//! End-to-end AMQP 0-9-1 behaviour through a real client (lapin) against a
//! broker started in-process on 127.0.0.1:0.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use synod_broker::config::{Args, Config};
use synod_broker::server::{self, RunningBroker};

use clap::Parser;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn start() -> RunningBroker {
    let config = Config::from_args(
        Args::try_parse_from(["synod-broker", "--amqp-listen", "127.0.0.1:0"]).expect("flags"),
    )
    .expect("config");
    server::start(config).await.expect("broker starts")
}

async fn connect(broker: &RunningBroker) -> Connection {
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr);
    tokio::time::timeout(
        WAIT,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

/// The AMQP reply code carried by a lapin error, if any.
fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

#[tokio::test]
async fn publish_consume_ack_round_trip() {
    // Goal: handshake, declare, publish, consume and ack work end to end, in order.
    let broker = start().await;
    let connection = connect(&broker).await;
    let channel = within(connection.create_channel()).await.expect("channel");
    let queue = within(channel.queue_declare(
        "work".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    assert_eq!(queue.name().as_str(), "work");
    for i in 0..10 {
        within(channel.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default().with_content_type("text/plain".into()),
        ))
        .await
        .expect("publish");
    }
    let mut consumer = within(channel.basic_consume(
        "work".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    assert!(
        consumer.tag().as_str().starts_with("amq.ctag-"),
        "{}",
        consumer.tag()
    );
    for i in 0..10 {
        let delivery = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("ok");
        assert_eq!(delivery.data, format!("m{i}").as_bytes());
        assert!(!delivery.redelivered);
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
    let passive = within(channel.queue_declare(
        "work".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive");
    assert_eq!(passive.message_count(), 0);
    let metrics = &broker.broker.metrics;
    assert_eq!(metrics.messages_published_total.get(), 10);
    assert_eq!(metrics.messages_delivered_total.get(), 10);
    within(async {
        while metrics.messages_acknowledged_total.get() < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(connection.close(200, "bye".into()))
        .await
        .expect("close");
    broker.shutdown().await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_is_404() {
    // Goal: a passive declare of an absent queue closes the channel with 404 only.
    let broker = start().await;
    let connection = connect(&broker).await;
    let channel = within(connection.create_channel()).await.expect("channel");
    let err = within(channel.queue_declare(
        "nope".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect_err("404");
    assert_eq!(reply_code(&err), Some(404), "{err}");
    let other = within(connection.create_channel())
        .await
        .expect("connection still usable");
    within(other.queue_declare(
        "".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare on another channel");
    broker.shutdown().await;
}

#[allow(dead_code)]
fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in entries {
        table.insert((*k).into(), v.clone());
    }
    table
}
