//! Restart behaviour of the `synod-broker` binary with a data directory:
//! durable topology and persistent messages survive a SIGKILL, transient
//! ones do not, delivered-but-unacked messages come back redelivered, and
//! bad data directories give the documented exit codes.

mod durable_support;

use durable_support::{BrokerProcess, DataDir, within};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

async fn declare_queue(ch: &Channel, name: &str, durable: bool, exclusive: bool) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable,
            exclusive,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("queue.declare");
}

/// Whether a passive declare finds the queue (a fresh channel each time,
/// since a miss closes the channel with 404).
async fn queue_exists(connection: &lapin::Connection, name: &str) -> bool {
    let ch = within(connection.create_channel()).await.expect("channel");
    match within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    {
        Ok(_) => true,
        Err(err) => {
            assert_eq!(reply_code(&err), Some(404), "{err}");
            false
        }
    }
}

async fn exchange_exists(connection: &lapin::Connection, name: &str) -> bool {
    let ch = within(connection.create_channel()).await.expect("channel");
    match within(ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    {
        Ok(()) => true,
        Err(err) => {
            assert_eq!(reply_code(&err), Some(404), "{err}");
            false
        }
    }
}

async fn confirm_channel(connection: &lapin::Connection) -> Channel {
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    ch
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    ))
    .await
    .expect("publish");
    let confirmation = within(confirm).await.expect("confirmation");
    assert!(confirmation.is_ack(), "{confirmation:?}");
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test]
async fn durable_topology_survives_a_kill_and_transient_topology_does_not() {
    // Goal: durable exchanges, queues and bindings come back after SIGKILL; transient and exclusive ones do not.
    let dir = DataDir::new("topology");
    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    for (name, durable) in [("ex.durable", true), ("ex.transient", false)] {
        within(ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("exchange.declare");
    }
    declare_queue(&ch, "q.durable", true, false).await;
    declare_queue(&ch, "q.transient", false, false).await;
    declare_queue(&ch, "q.exclusive", true, true).await;
    within(ch.queue_bind(
        "q.durable".into(),
        "ex.durable".into(),
        "a.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    within(ch.queue_bind(
        "q.transient".into(),
        "ex.durable".into(),
        "a.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    // Declared and deleted: must not come back either.
    declare_queue(&ch, "q.deleted", true, false).await;
    within(ch.queue_delete("q.deleted".into(), QueueDeleteOptions::default()))
        .await
        .expect("delete");
    broker.kill();

    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    assert!(exchange_exists(&connection, "ex.durable").await);
    assert!(!exchange_exists(&connection, "ex.transient").await);
    assert!(queue_exists(&connection, "q.durable").await);
    assert!(!queue_exists(&connection, "q.transient").await);
    assert!(!queue_exists(&connection, "q.exclusive").await);
    assert!(!queue_exists(&connection, "q.deleted").await);
    // The binding came back: a message to the durable exchange reaches the queue.
    let ch = confirm_channel(&connection).await;
    publish_confirmed(
        &ch,
        "ex.durable",
        "a.b",
        b"routed",
        BasicProperties::default(),
    )
    .await;
    let got = within(ch.basic_get("q.durable".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("the binding routed the message");
    assert_eq!(got.delivery.data, b"routed");
    broker.kill();
}

#[tokio::test]
async fn persistent_messages_survive_a_kill_in_order_with_properties() {
    // Goal: confirmed persistent messages come back in order with headers and properties; transient ones do not.
    let dir = DataDir::new("messages");
    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = confirm_channel(&connection).await;
    declare_queue(&ch, "orders", true, false).await;
    declare_queue(&ch, "scratch", false, false).await;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-trace"),
        AMQPValue::LongString("abc".into()),
    );
    headers.insert(ShortString::from("n"), AMQPValue::LongInt(42));
    for i in 0..20 {
        let props = persistent()
            .with_content_type("application/json".into())
            .with_correlation_id(format!("c{i}").into())
            .with_priority(3)
            .with_headers(headers.clone());
        publish_confirmed(&ch, "", "orders", format!("m{i}").as_bytes(), props).await;
        if i % 5 == 0 {
            // Transient message in a durable queue and persistent in a transient one: both lost.
            publish_confirmed(&ch, "", "orders", b"transient", BasicProperties::default()).await;
            publish_confirmed(&ch, "", "scratch", b"p", persistent()).await;
        }
    }
    // A message with a long TTL keeps it; one already past it is dropped at restart.
    publish_confirmed(
        &ch,
        "",
        "orders",
        b"ttl-long",
        persistent().with_expiration("600000".into()),
    )
    .await;
    broker.kill();

    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    let mut consumer = within(ch.basic_consume(
        "orders".into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    for i in 0..20 {
        let delivery = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        assert_eq!(delivery.data, format!("m{i}").as_bytes());
        assert!(!delivery.redelivered);
        assert_eq!(delivery.routing_key.as_str(), "orders");
        let p = &delivery.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.correlation_id().as_ref().map(|s| s.as_str()),
            Some(format!("c{i}").as_str())
        );
        assert_eq!(*p.priority(), Some(3));
        assert_eq!(p.headers().as_ref(), Some(&headers));
    }
    let last = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(last.data, b"ttl-long");
    assert_eq!(
        last.properties.expiration().as_ref().map(|s| s.as_str()),
        Some("600000")
    );
    let passive = within(ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive");
    assert_eq!(passive.message_count(), 0, "no transient message came back");
    assert!(!queue_exists(&connection, "scratch").await);
    broker.kill();
}

#[tokio::test]
async fn delivered_unacked_messages_come_back_redelivered_and_acked_ones_do_not() {
    // Goal: after a kill, unacked deliveries return with redelivered = true and acked ones are gone.
    let dir = DataDir::new("redeliver");
    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = confirm_channel(&connection).await;
    declare_queue(&ch, "work", true, false).await;
    for i in 0..4 {
        publish_confirmed(&ch, "", "work", format!("w{i}").as_bytes(), persistent()).await;
    }
    let consumer_ch = within(connection.create_channel()).await.expect("channel");
    let first = within(consumer_ch.basic_get("work".into(), BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("w0");
    assert_eq!(first.delivery.data, b"w0");
    within(first.delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let second = within(consumer_ch.basic_get("work".into(), BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("w1");
    assert_eq!(second.delivery.data, b"w1");
    // The store writes records in submission order: once this later publish
    // is confirmed, the ack and the delivery above are on disk too.
    declare_queue(&ch, "barrier", true, false).await;
    publish_confirmed(&ch, "", "barrier", b"sync", persistent()).await;
    broker.kill();

    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    let mut seen = Vec::new();
    while let Some(got) = within(ch.basic_get("work".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
    {
        seen.push((
            String::from_utf8_lossy(&got.delivery.data).into_owned(),
            got.delivery.redelivered,
        ));
    }
    assert_eq!(
        seen,
        [
            ("w1".to_string(), true),
            ("w2".to_string(), false),
            ("w3".to_string(), false)
        ]
    );
    broker.kill();
}

#[tokio::test]
async fn a_locked_or_incompatible_data_directory_stops_the_binary_with_its_exit_code() {
    // Goal: a second process on the same directory exits 1; a newer format version exits 2; both say why.
    let dir = DataDir::new("exit-codes");
    let broker = BrokerProcess::start(&dir.0);
    let connection = broker.connect().await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare_queue(&ch, "kept", true, false).await;
    let Err(exited) = BrokerProcess::try_start(&dir.0) else {
        panic!("a second broker started on a locked data directory");
    };
    assert_eq!(exited.code, Some(1), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("in use by another process"),
        "{}",
        exited.stderr
    );
    broker.kill();

    // Bump the version field of the store's metadata file, as a newer release would write it.
    let store_dir = dir.0.join("store");
    let mut bumped = false;
    for entry in std::fs::read_dir(&store_dir).expect("store dir") {
        let path = entry.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("read");
        if bytes.len() >= 10 {
            bytes[8] = 0xff;
            bytes[9] = 0xff;
            std::fs::write(&path, bytes).expect("write");
            bumped = true;
        }
    }
    assert!(bumped, "the store wrote files");
    let Err(exited) = BrokerProcess::try_start(&dir.0) else {
        panic!("the broker started on an incompatible data directory");
    };
    assert_eq!(exited.code, Some(2), "{}", exited.stderr);
    assert!(exited.stderr.contains("not supported"), "{}", exited.stderr);
}
