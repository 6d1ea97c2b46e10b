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

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in entries {
        table.insert((*k).into(), v.clone());
    }
    table
}

async fn declare(channel: &lapin::Channel, name: &str, arguments: FieldTable) -> String {
    within(channel.queue_declare(name.into(), QueueDeclareOptions::default(), arguments))
        .await
        .expect("declare")
        .name()
        .to_string()
}

async fn publish(
    channel: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    within(channel.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        properties,
    ))
    .await
    .expect("publish");
}

async fn get(channel: &lapin::Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    within(channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
}

/// Polls `basic.get` until a message arrives (TTL and dead-lettering are asynchronous).
async fn get_eventually(channel: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    within(async {
        loop {
            if let Some(message) = get(channel, queue).await {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn exchanges_route_direct_fanout_topic_headers_and_exchange_to_exchange() {
    // Goal: each exchange type routes as RabbitMQ does, including e2e bindings.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    for q in ["d", "f1", "f2", "t1", "t2", "h", "e2e"] {
        declare(&ch, q, FieldTable::default()).await;
    }
    let bind = |q: &'static str, ex: &'static str, key: &'static str, args: FieldTable| {
        let ch = ch.clone();
        async move {
            within(ch.queue_bind(
                q.into(),
                ex.into(),
                key.into(),
                QueueBindOptions::default(),
                args,
            ))
            .await
            .expect("bind")
        }
    };
    bind("d", "amq.direct", "k", FieldTable::default()).await;
    bind("f1", "amq.fanout", "", FieldTable::default()).await;
    bind("f2", "amq.fanout", "", FieldTable::default()).await;
    bind("t1", "amq.topic", "stock.*.nyse", FieldTable::default()).await;
    bind("t2", "amq.topic", "stock.#", FieldTable::default()).await;
    bind(
        "h",
        "amq.headers",
        "",
        table(&[
            ("x-match", AMQPValue::LongString("any".into())),
            ("format", AMQPValue::LongString("pdf".into())),
        ]),
    )
    .await;
    within(ch.exchange_declare(
        "src".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare exchange");
    within(ch.exchange_bind(
        "amq.direct".into(),
        "src".into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("e2e bind");
    bind("e2e", "src", "", FieldTable::default()).await;

    publish(
        &ch,
        "amq.direct",
        "k",
        b"direct",
        BasicProperties::default(),
    )
    .await;
    publish(
        &ch,
        "amq.fanout",
        "whatever",
        b"fanout",
        BasicProperties::default(),
    )
    .await;
    publish(
        &ch,
        "amq.topic",
        "stock.ibm.nyse",
        b"topic1",
        BasicProperties::default(),
    )
    .await;
    publish(
        &ch,
        "amq.topic",
        "stock.ibm.lse",
        b"topic2",
        BasicProperties::default(),
    )
    .await;
    publish(
        &ch,
        "amq.headers",
        "",
        b"headers",
        BasicProperties::default()
            .with_headers(table(&[("format", AMQPValue::LongString("pdf".into()))])),
    )
    .await;
    publish(
        &ch,
        "amq.headers",
        "",
        b"no-match",
        BasicProperties::default(),
    )
    .await;
    // src fans out to e2e directly and to amq.direct, whose key "k" reaches d.
    publish(&ch, "src", "k", b"via-src", BasicProperties::default()).await;

    let drain = |q: &'static str| {
        let ch = ch.clone();
        async move {
            let mut out = Vec::new();
            while let Some(m) = get(&ch, q).await {
                out.push(String::from_utf8(m.delivery.data).expect("utf-8"));
            }
            out
        }
    };
    assert_eq!(drain("d").await, ["direct", "via-src"]);
    assert_eq!(drain("f1").await, ["fanout"]);
    assert_eq!(drain("f2").await, ["fanout"]);
    assert_eq!(drain("t1").await, ["topic1"]);
    assert_eq!(drain("t2").await, ["topic1", "topic2"]);
    assert_eq!(drain("h").await, ["headers"]);
    assert_eq!(drain("e2e").await, ["via-src"]);
    broker.shutdown().await;
}

#[tokio::test]
async fn confirms_returns_and_unroutable_counters() {
    // Goal: confirm mode acks publishes; mandatory unroutable gets basic.return 312 then an ack.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    declare(&ch, "c", FieldTable::default()).await;
    let mut confirms = Vec::new();
    for _ in 0..50 {
        confirms.push(
            within(ch.basic_publish(
                "".into(),
                "c".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            ))
            .await
            .expect("publish"),
        );
    }
    for confirm in confirms {
        let confirmation = within(confirm).await.expect("confirmation");
        assert!(confirmation.is_ack(), "{confirmation:?}");
    }
    let returned = within(ch.basic_publish(
        "amq.direct".into(),
        "nowhere".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"lost",
        BasicProperties::default(),
    ))
    .await
    .expect("publish")
    .await
    .expect("confirmation");
    let message = returned.take_message().expect("returned message");
    assert_eq!(message.reply_code, 312);
    assert_eq!(message.delivery.data, b"lost");
    publish(
        &ch,
        "amq.direct",
        "nowhere",
        b"dropped",
        BasicProperties::default(),
    )
    .await;
    within(ch.wait_for_confirms()).await.expect("confirms");
    let metrics = &broker.broker.metrics;
    assert_eq!(metrics.messages_unroutable_returned_total.get(), 1);
    assert_eq!(metrics.messages_unroutable_dropped_total.get(), 1);
    assert_eq!(metrics.messages_confirmed_total.get(), 52);
    broker.shutdown().await;
}

#[tokio::test]
async fn prefetch_limits_unacked_and_nack_requeue_sets_redelivered() {
    // Goal: qos(2) caps in-flight deliveries; a requeued message comes back first, redelivered.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "p", FieldTable::default()).await;
    for i in 0..5 {
        publish(
            &ch,
            "",
            "p",
            format!("{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    within(ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = within(ch.basic_consume(
        "p".into(),
        "c1".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let first = within(consumer.next()).await.expect("d").expect("ok");
    let second = within(consumer.next()).await.expect("d").expect("ok");
    assert_eq!(
        (first.data.as_slice(), second.data.as_slice()),
        (&b"0"[..], &b"1"[..])
    );
    // A third delivery must not come while two are unacked.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), consumer.next())
            .await
            .is_err()
    );
    let queue = broker.broker.queue("/", "p").expect("queue");
    assert_eq!(queue.counts().unacked, 2);
    within(first.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .expect("nack");
    let again = within(consumer.next()).await.expect("d").expect("ok");
    assert_eq!(again.data, b"0");
    assert!(again.redelivered);
    within(again.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    within(second.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let third = within(consumer.next()).await.expect("d").expect("ok");
    let fourth = within(consumer.next()).await.expect("d").expect("ok");
    assert_eq!(
        (third.data.as_slice(), fourth.data.as_slice()),
        (&b"2"[..], &b"3"[..])
    );
    // Ack both with multiple=true on the later tag.
    within(fourth.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    let fifth = within(consumer.next()).await.expect("d").expect("ok");
    assert_eq!(fifth.data, b"4");
    within(fifth.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    within(async {
        while queue.counts() != Default::default() && queue.counts().consumers != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(broker.broker.metrics.messages_redelivered_total.get() >= 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn closing_a_channel_requeues_its_unacked_messages() {
    // Goal: unacked deliveries return to the queue, redelivered, when their channel closes.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "r", FieldTable::default()).await;
    publish(&ch, "", "r", b"once", BasicProperties::default()).await;
    let consumer_channel = within(connection.create_channel()).await.expect("channel");
    let mut consumer = within(consumer_channel.basic_consume(
        "r".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let delivery = within(consumer.next()).await.expect("d").expect("ok");
    assert!(!delivery.redelivered);
    within(consumer_channel.close(200, "done".into()))
        .await
        .expect("close channel");
    let again = get_eventually(&ch, "r").await;
    assert!(again.delivery.redelivered);
    assert_eq!(again.delivery.data, b"once");
    broker.shutdown().await;
}

#[tokio::test]
async fn dead_lettering_on_reject_ttl_and_max_length_writes_x_death() {
    // Goal: rejected, expired and overflowed messages reach the DLX with RabbitMQ's x-death.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("dlx");
    declare(&ch, "dead", FieldTable::default()).await;
    within(ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    let dlx = (
        "x-dead-letter-exchange",
        AMQPValue::LongString("dlx".into()),
    );
    declare(&ch, "rejecting", table(std::slice::from_ref(&dlx))).await;
    declare(
        &ch,
        "ttl",
        table(&[dlx.clone(), ("x-message-ttl", AMQPValue::LongInt(50))]),
    )
    .await;
    declare(
        &ch,
        "short",
        table(&[dlx.clone(), ("x-max-length", AMQPValue::LongInt(1))]),
    )
    .await;
    declare(&ch, "plain", table(std::slice::from_ref(&dlx))).await;

    publish(
        &ch,
        "",
        "rejecting",
        b"rejected",
        BasicProperties::default(),
    )
    .await;
    let got = within(ch.basic_get("rejecting".into(), BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("message");
    within(got.delivery.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("reject");
    let dead = get_eventually(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"rejected");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death in {headers:?}");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("x-death entry is not a table");
    };
    assert_eq!(
        text(death.inner().get("reason")).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        text(death.inner().get("queue")).as_deref(),
        Some("rejecting")
    );
    assert_eq!(text(death.inner().get("exchange")).as_deref(), Some(""));
    assert_eq!(death.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(
        text(headers.inner().get("x-first-death-reason")).as_deref(),
        Some("rejected")
    );

    publish(&ch, "", "ttl", b"expired", BasicProperties::default()).await;
    let dead = get_eventually(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"expired");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    assert_eq!(
        text(headers.inner().get("x-first-death-reason")).as_deref(),
        Some("expired")
    );

    publish(
        &ch,
        "",
        "plain",
        b"per-message",
        BasicProperties::default().with_expiration("30".into()),
    )
    .await;
    let dead = get_eventually(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"per-message");
    assert!(
        dead.delivery.properties.expiration().is_none(),
        "expiration is removed"
    );

    publish(&ch, "", "short", b"first", BasicProperties::default()).await;
    publish(&ch, "", "short", b"second", BasicProperties::default()).await;
    let dead = get_eventually(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"first");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    assert_eq!(
        text(headers.inner().get("x-first-death-reason")).as_deref(),
        Some("maxlen")
    );
    assert_eq!(
        get(&ch, "short").await.expect("kept").delivery.data,
        b"second"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn reject_publish_overflow_nacks_the_publisher() {
    // Goal: x-overflow=reject-publish refuses the message and confirm mode nacks it.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm");
    declare(
        &ch,
        "full",
        table(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]),
    )
    .await;
    let mut results = Vec::new();
    for i in 0..3 {
        let confirm = within(ch.basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            format!("{i}").as_bytes(),
            BasicProperties::default(),
        ))
        .await
        .expect("publish");
        results.push(within(confirm).await.expect("confirmation").is_ack());
    }
    assert_eq!(results, [true, true, false]);
    assert_eq!(
        broker
            .broker
            .queue("/", "full")
            .expect("queue")
            .counts()
            .ready,
        2
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn exclusive_queues_are_locked_to_their_connection_and_deleted_with_it() {
    // Goal: another connection gets 405 RESOURCE_LOCKED; the queue goes when its owner closes.
    let broker = start().await;
    let owner = connect(&broker).await;
    let ch = within(owner.create_channel()).await.expect("channel");
    within(ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    let other = connect(&broker).await;
    let other_ch = within(other.create_channel()).await.expect("channel");
    let err = within(other_ch.basic_consume(
        "mine".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("locked");
    assert_eq!(reply_code(&err), Some(405), "{err}");
    within(owner.close(200, "bye".into())).await.expect("close");
    within(async {
        while broker.broker.queue("/", "mine").is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    // Goal: consumer cancel notification: the consumer's stream ends when its queue is deleted.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "doomed", FieldTable::default()).await;
    let mut consumer = within(ch.basic_consume(
        "doomed".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let admin = within(connection.create_channel()).await.expect("channel");
    within(admin.queue_delete("doomed".into(), QueueDeleteOptions::default()))
        .await
        .expect("delete");
    assert!(
        within(consumer.next()).await.is_none(),
        "stream ends on basic.cancel"
    );
    // The channel stays usable.
    declare(&ch, "after", FieldTable::default()).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn transactions_commit_and_roll_back() {
    // Goal: tx publishes are invisible until commit and discarded by rollback.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "tx", FieldTable::default()).await;
    within(ch.tx_select()).await.expect("select");
    publish(&ch, "", "tx", b"rolled back", BasicProperties::default()).await;
    within(ch.tx_rollback()).await.expect("rollback");
    publish(&ch, "", "tx", b"committed", BasicProperties::default()).await;
    let reader = within(connection.create_channel()).await.expect("channel");
    assert!(
        get(&reader, "tx").await.is_none(),
        "not visible before commit"
    );
    within(ch.tx_commit()).await.expect("commit");
    assert_eq!(
        get(&reader, "tx").await.expect("visible").delivery.data,
        b"committed"
    );
    assert!(get(&reader, "tx").await.is_none());
    broker.shutdown().await;
}

#[tokio::test]
async fn wrong_credentials_and_missing_permissions_are_refused() {
    // Goal: bad passwords are ACCESS_REFUSED (counted); permissions are checked per operation.
    let broker = start().await;
    let uri = format!("amqp://guest:wrong@{}/%2f", broker.amqp_addr);
    let err = within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect_err("refused");
    assert_eq!(reply_code(&err), Some(403), "{err}");
    assert_eq!(broker.broker.metrics.auth_failures_total.get(), 1);

    use synod_broker::meta::Command;
    broker
        .broker
        .execute(Command::PutUser {
            name: "reader".into(),
            password_hash: synod_broker::auth::hash_password("pw"),
            tags: vec![],
        })
        .expect("user");
    broker
        .broker
        .execute(Command::SetPermissions {
            vhost: "/".into(),
            user: "reader".into(),
            configure: "^$".into(),
            write: "^amq\\.direct$".into(),
            read: ".*".into(),
        })
        .expect("permissions");
    let uri = format!("amqp://reader:pw@{}/%2f", broker.amqp_addr);
    let connection = within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("connects");
    let ch = within(connection.create_channel()).await.expect("channel");
    let err = within(ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("configure denied");
    assert_eq!(reply_code(&err), Some(403), "{err}");
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.basic_publish(
        "amq.direct".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"ok",
        BasicProperties::default(),
    ))
    .await
    .expect("write allowed");
    within(ch.basic_publish(
        "".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"no",
        BasicProperties::default(),
    ))
    .await
    .expect("sent");
    // The default exchange is amq.default, which the write regex does not match.
    let err = within(ch.queue_declare(
        "x".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect_err("channel closed by the refused publish");
    assert!(matches!(reply_code(&err), Some(403) | None), "{err}");
    assert!(!ch.status().connected());

    let uri = format!("amqp://reader:pw@{}/nope", broker.amqp_addr);
    let err = within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect_err("no such vhost");
    assert_eq!(reply_code(&err), Some(530), "{err}");
    broker.shutdown().await;
}

#[tokio::test]
async fn queue_properties_and_operations_follow_rabbitmq() {
    // Goal: server-named queues, equivalence (406), purge, delete if-empty/if-unused, get-empty, x-expires.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    let generated = declare(&ch, "", FieldTable::default()).await;
    assert!(generated.starts_with("amq.gen-"), "{generated}");
    declare(&ch, "ops", FieldTable::default()).await;
    let err = within(ch.queue_declare(
        "ops".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect_err("inequivalent");
    assert_eq!(reply_code(&err), Some(406), "{err}");
    let ch = within(connection.create_channel()).await.expect("channel");
    for _ in 0..3 {
        publish(&ch, "", "ops", b"m", BasicProperties::default()).await;
    }
    let err = within(ch.queue_delete(
        "ops".into(),
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await
    .expect_err("not empty");
    assert_eq!(reply_code(&err), Some(406), "{err}");
    let ch = within(connection.create_channel()).await.expect("channel");
    assert_eq!(
        within(ch.queue_purge("ops".into(), QueuePurgeOptions::default()))
            .await
            .expect("purge"),
        3
    );
    assert!(get(&ch, "ops").await.is_none(), "get-empty after purge");
    assert_eq!(
        within(ch.queue_delete(
            "ops".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            }
        ))
        .await
        .expect("delete"),
        0
    );
    assert!(broker.broker.queue("/", "ops").is_none());

    declare(
        &ch,
        "expiring",
        table(&[("x-expires", AMQPValue::LongInt(100))]),
    )
    .await;
    within(async {
        while broker.broker.queue("/", "expiring").is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let err = within(ch.exchange_declare(
        "amq.custom".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("reserved");
    assert_eq!(reply_code(&err), Some(403), "{err}");
    broker.shutdown().await;
}

#[tokio::test]
async fn management_close_and_shutdown_close_connections_with_320() {
    // Goal: Broker::close_connection and shutdown send CONNECTION_FORCED to clients.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "", FieldTable::default()).await;
    let listed = broker.broker.list_connections();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].name.contains(" -> "), "{}", listed[0].name);
    assert_eq!(broker.broker.list_channels().len(), 1);
    assert!(
        broker
            .broker
            .close_connection(&listed[0].name, "closed by test")
    );
    within(async {
        while connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(async {
        while !broker.broker.list_connections().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(broker.broker.metrics.connections.get(), 0);
    assert_eq!(broker.broker.metrics.channels.get(), 0);
    let second = connect(&broker).await;
    broker.shutdown().await;
    within(async {
        while second.status().connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

mod raw {
    //! A hand-driven client for the cases a well-behaved library cannot produce.
    use bytes::BytesMut;
    use synod_broker::protocol::{Encoder, Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use amq_protocol::protocol::{AMQPClass, channel, connection};

    pub struct Raw {
        pub socket: TcpStream,
        pub buf: BytesMut,
        pub encoder: Encoder,
    }

    impl Raw {
        pub async fn send(&mut self, channel_id: u16, method: AMQPClass) {
            let mut out = BytesMut::new();
            self.encoder.method(&mut out, channel_id, &method);
            self.socket.write_all(&out).await.expect("write");
        }

        /// The next frame, or None when the server closed the socket.
        pub async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) =
                    Frame::parse(&mut self.buf, 1 << 20).expect("server frames are valid")
                {
                    return Some(frame);
                }
                if self.socket.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        }

        /// The next frame, or None on close or on anything unparseable.
        pub async fn next_lenient(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = Frame::parse(&mut self.buf, 1 << 20).ok()? {
                    return Some(frame);
                }
                if self.socket.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        }

        /// Waits for connection.close; returns its reply code.
        pub async fn close_code(&mut self) -> Option<u16> {
            while let Some(frame) = self.next().await {
                if let Frame::Method(0, method) = frame
                    && let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = *method
                {
                    return Some(close.reply_code);
                }
            }
            None
        }
    }

    /// Connects and completes the handshake as guest, with channel 1 open.
    pub async fn open(addr: std::net::SocketAddr, heartbeat: u16) -> Raw {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("header");
        let mut raw = Raw {
            socket,
            buf: BytesMut::new(),
            encoder: Encoder::default(),
        };
        raw.next().await.expect("start");
        raw.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: Default::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        raw.next().await.expect("tune");
        raw.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max: 4096,
                heartbeat,
            })),
        )
        .await;
        raw.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        raw.next().await.expect("open-ok");
        raw.send(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        raw.next().await.expect("channel open-ok");
        raw
    }
}

#[tokio::test]
async fn malformed_frames_close_only_the_offending_connection() {
    // Goal: bad frame end, oversized frames and stray content get 501/505 closes; others keep working.
    use tokio::io::AsyncWriteExt;
    let broker = start().await;
    let bystander = connect(&broker).await;
    let ch = within(bystander.create_channel()).await.expect("channel");
    declare(&ch, "still-here", FieldTable::default()).await;

    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "bad frame end",
            vec![1, 0, 1, 0, 0, 0, 4, 0, 20, 0, 10, 0xAB],
            501,
        ),
        (
            "frame above frame_max",
            {
                let mut f = vec![3, 0, 1];
                f.extend_from_slice(&100_000u32.to_be_bytes());
                f
            },
            501,
        ),
        ("unknown frame type", vec![7, 0, 1, 0, 0, 0, 0, 0xCE], 501),
        (
            "body without publish",
            vec![3, 0, 1, 0, 0, 0, 1, b'x', 0xCE],
            505,
        ),
        (
            "header without publish",
            {
                let mut f = vec![2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0];
                f.extend_from_slice(&5u64.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0xCE]);
                f
            },
            505,
        ),
        (
            "channel.flow on an unopened channel",
            vec![1, 0, 9, 0, 0, 0, 5, 0, 20, 0, 20, 1, 0xCE],
            504,
        ),
        (
            "truncated method arguments",
            vec![1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 10, 0xCE],
            502,
        ),
        (
            "unknown method",
            vec![1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xCE],
            540,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut raw = within(raw::open(broker.amqp_addr, 0)).await;
        raw.socket.write_all(&bytes).await.expect("write");
        assert_eq!(within(raw.close_code()).await, Some(code), "{what}");
        // The server closes the socket after the close (or close-ok timeout).
        within(async { while raw.next().await.is_some() {} }).await;
    }
    publish(&ch, "", "still-here", b"alive", BasicProperties::default()).await;
    assert_eq!(
        get(&ch, "still-here").await.expect("message").delivery.data,
        b"alive"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn unknown_protocol_headers_get_ours_back() {
    // Goal: a non-0-9-1 header is answered with AMQP\0\0\x09\x01 and the socket closes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = start().await;
    let mut socket = tokio::net::TcpStream::connect(broker.amqp_addr)
        .await
        .expect("connect");
    socket
        .write_all(b"AMQP\x01\x01\x00\x0a")
        .await
        .expect("write");
    let mut reply = Vec::new();
    within(socket.read_to_end(&mut reply)).await.expect("read");
    assert_eq!(reply, b"AMQP\x00\x00\x09\x01");
    broker.shutdown().await;
}

#[tokio::test]
async fn silent_peers_are_closed_after_two_missed_heartbeats() {
    // Goal: with heartbeat=1 the server sends heartbeats and drops a peer silent for ~2s.
    let broker = start().await;
    let mut raw = within(raw::open(broker.amqp_addr, 1)).await;
    let started = std::time::Instant::now();
    let mut heartbeats = 0;
    while let Some(frame) = within(raw.next()).await {
        if matches!(frame, synod_broker::protocol::Frame::Heartbeat(0)) {
            heartbeats += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(heartbeats >= 1, "server sent heartbeats");
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn crossing_the_memory_watermark_blocks_publishers_until_it_clears() {
    // Goal: connection.blocked is sent when ready bytes exceed the watermark, unblocked after.
    let config = Config::from_args(
        Args::try_parse_from(["synod-broker", "--amqp-listen", "127.0.0.1:0"]).expect("flags"),
    )
    .expect("config");
    let mut settings = synod_broker::broker::Settings::new(&config.node_name);
    settings.memory_high_watermark_bytes = 1_000;
    let broker = server::start_with(config, Some(settings))
        .await
        .expect("broker starts");
    let publisher = connect(&broker).await;
    let ch = within(publisher.create_channel()).await.expect("channel");
    declare(&ch, "big", FieldTable::default()).await;
    publish(&ch, "", "big", &[0u8; 2_000], BasicProperties::default()).await;
    within(async {
        while !publisher.status().blocked() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // A connection that has not published keeps working and can drain.
    let other = connect(&broker).await;
    let other_ch = within(other.create_channel()).await.expect("channel");
    within(other_ch.queue_purge("big".into(), QueuePurgeOptions::default()))
        .await
        .expect("purge");
    within(async {
        while publisher.status().blocked() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    publish(&ch, "", "big", b"small", BasicProperties::default()).await;
    assert_eq!(
        get(&ch, "big").await.expect("message").delivery.data,
        b"small"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn exclusive_consumers_and_tag_reuse_are_refused() {
    // Goal: a second consumer on an exclusively consumed queue gets 403; consume-ok never precedes it.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    declare(&ch, "solo", FieldTable::default()).await;
    // Keep the consumer alive: lapin cancels consumers when they are dropped.
    let _exclusive = within(ch.basic_consume(
        "solo".into(),
        "only".into(),
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("exclusive consume");
    let other = within(connection.create_channel()).await.expect("channel");
    let err = within(other.basic_consume(
        "solo".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("in exclusive use");
    assert_eq!(reply_code(&err), Some(403), "{err}");
    assert_eq!(
        broker
            .broker
            .queue("/", "solo")
            .expect("queue")
            .counts()
            .consumers,
        1
    );
    // Reusing a live consumer tag on its channel is a connection error (530).
    let err = within(ch.basic_consume(
        "solo".into(),
        "only".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("tag reuse");
    assert_eq!(reply_code(&err), Some(530), "{err}");
    within(async {
        while connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn random_frames_after_the_handshake_never_break_the_broker() {
    // Goal: seeded garbage (random and near-valid frames) closes at most its own connection.
    use rand::{Rng, SeedableRng};
    use tokio::io::AsyncWriteExt;
    let broker = start().await;
    let bystander = connect(&broker).await;
    let ch = within(bystander.create_channel()).await.expect("channel");
    declare(&ch, "fuzz", FieldTable::default()).await;
    let seed: u64 = std::env::var("SYNOD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Valid (class, method) pairs so that argument decoding gets exercised.
    let methods: &[(u16, u16)] = &[
        (20, 10),
        (20, 20),
        (20, 40),
        (40, 10),
        (40, 20),
        (40, 30),
        (50, 10),
        (50, 20),
        (50, 30),
        (50, 40),
        (50, 50),
        (60, 10),
        (60, 20),
        (60, 30),
        (60, 40),
        (60, 70),
        (60, 80),
        (60, 90),
        (60, 100),
        (60, 110),
        (60, 120),
        (85, 10),
        (90, 10),
        (90, 20),
    ];
    for round in 0..40 {
        let mut raw = within(raw::open(broker.amqp_addr, 0)).await;
        let mut bytes = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            let frame_type = [1u8, 1, 1, 2, 3, 8, rng.random()][rng.random_range(0..7)];
            let channel: u16 = rng.random_range(0..3);
            let mut payload = Vec::new();
            if frame_type == 1 {
                let (class, method) = methods[rng.random_range(0..methods.len())];
                payload.extend_from_slice(&class.to_be_bytes());
                payload.extend_from_slice(&method.to_be_bytes());
            }
            for _ in 0..rng.random_range(0..40) {
                payload.push(rng.random());
            }
            bytes.push(frame_type);
            bytes.extend_from_slice(&channel.to_be_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&payload);
            bytes.push(if rng.random_range(0..10) == 0 {
                rng.random()
            } else {
                0xCE
            });
        }
        let _ = raw.socket.write_all(&bytes).await;
        // Whatever happens to this connection, the broker answers or closes it in time.
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            while raw.next_lenient().await.is_some() {}
        })
        .await;
        drop(raw);
        publish(&ch, "", "fuzz", b"ok", BasicProperties::default()).await;
        assert!(
            get(&ch, "fuzz").await.is_some(),
            "seed {seed} round {round}"
        );
    }
    // A connection task that panicked would skip its cleanup and leave
    // these gauges high: every fuzzed connection must have been released.
    let metrics = &broker.broker.metrics;
    within(async {
        while metrics.connections.get() != 1 || metrics.channels.get() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(broker.broker.list_connections().len(), 1, "seed {seed}");
    broker.shutdown().await;
}

#[tokio::test]
async fn global_qos_is_shared_by_the_channels_consumers() {
    // Goal: qos(1, global=true) allows one unacked delivery across all consumers of the channel.
    let broker = start().await;
    let connection = connect(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    for q in ["g1", "g2"] {
        declare(&ch, q, FieldTable::default()).await;
        publish(&ch, "", q, q.as_bytes(), BasicProperties::default()).await;
    }
    within(ch.basic_qos(1, BasicQosOptions { global: true }))
        .await
        .expect("qos");
    let mut c1 = within(ch.basic_consume(
        "g1".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let mut c2 = within(ch.basic_consume(
        "g2".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let first = within(c1.next()).await.expect("d").expect("ok");
    assert_eq!(first.data, b"g1");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), c2.next())
            .await
            .is_err(),
        "the channel-wide limit holds g2 back"
    );
    within(first.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let second = within(c2.next()).await.expect("d").expect("ok");
    assert_eq!(second.data, b"g2");
    broker.shutdown().await;
}

#[tokio::test]
async fn bodies_of_every_size_round_trip_while_connection_buffers_grow_and_shrink() {
    // Goal: buffers that start small grow for multi-frame bodies, and small and large bodies come back intact and in order.
    let broker = start().await;
    let connection = connect(&broker).await;
    let channel = within(connection.create_channel()).await.expect("channel");
    let queue = declare(&channel, "sizes", FieldTable::default()).await;
    // Sizes around the buffer minimum, the copy threshold and the frame size.
    let sizes = [0, 16, 4_095, 4_096, 33_000, 131_072, 300_000, 1_048_576, 16];
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect();
    for body in &bodies {
        publish(&channel, "", &queue, body, BasicProperties::default()).await;
    }
    for (i, body) in bodies.iter().enumerate() {
        let message = get_eventually(&channel, &queue).await;
        assert_eq!(message.delivery.data.len(), body.len(), "message {i}");
        assert!(message.delivery.data == *body, "message {i} differs");
    }
}
