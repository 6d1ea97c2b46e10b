//! A cluster serves one topology: metadata declared through any node is
//! decided through Paxos and served by every node, conflicting declarations
//! resolve as on one broker, a node cut off from the majority refuses
//! changes with a clear error, and a restarted node keeps its durable
//! queues and messages. Three real `synod-broker` processes on loopback.

mod multinode;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use multinode::{Cluster, WAIT, all};
use reqwest::StatusCode;

const NAMES: [&str; 3] = ["alpha", "bravo", "charlie"];

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The reply code of a lapin error that closed the channel, if it did.
fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declared_on_any_node_is_served_by_every_node() {
    // Goal: exchange, queue and binding declared on alpha exist on bravo and
    // charlie (passive declares, management API with alpha as the queue's
    // home); an inequivalent redeclare on bravo gets 406; a delete on
    // charlie removes the queue everywhere.
    let cluster = Cluster::start("topology", &NAMES).await;
    let a = cluster.connect(0).await;
    let ch = a.create_channel().await.expect("channel");
    ch.exchange_declare(
        "logs".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare exchange on alpha");
    ch.queue_declare("orders".into(), durable_queue(), FieldTable::default())
        .await
        .expect("declare queue on alpha");
    ch.queue_bind(
        "orders".into(),
        "logs".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind on alpha");

    for i in [1, 2] {
        // Other nodes apply the decided log a moment after alpha answers.
        let node = &cluster;
        node.wait_until("the binding is applied on every node", || async move {
            node.get(i, "/api/bindings/%2f/e/logs/q/orders").await.1 != serde_json::json!([])
        })
        .await;
        let conn = cluster.connect(i).await;
        let ch = conn.create_channel().await.expect("channel");
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            passive,
            FieldTable::default(),
        )
        .await
        .expect("exchange decided before alpha answered, so it is here");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare("orders".into(), passive, FieldTable::default())
            .await
            .expect("queue known on every node");
        let (status, queue) = cluster.get(i, "/api/queues/%2f/orders").await;
        assert_eq!(status, StatusCode::OK, "{queue}");
        assert_eq!(queue["node"], "alpha", "the home node is the declaring one");
        let (status, bindings) = cluster.get(i, "/api/bindings/%2f/e/logs/q/orders").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bindings.as_array().map(Vec::len), Some(1), "{bindings}");
    }

    // Inequivalent redeclare through another node: 406, as on one broker.
    let b = cluster.connect(1).await;
    let ch_b = b.create_channel().await.expect("channel");
    let err = ch_b
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("durable=false against durable=true");
    assert_eq!(reply_code(&err), Some(406), "{err}");

    // Delete on charlie: gone on every node.
    let c = cluster.connect(2).await;
    let ch_c = c.create_channel().await.expect("channel");
    ch_c.queue_delete("orders".into(), QueueDeleteOptions::default())
        .await
        .expect("delete on charlie");
    let (status, _) = cluster.get(2, "/api/queues/%2f/orders").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "applied before charlie answered"
    );
    for i in [0, 1] {
        let node = &cluster;
        node.wait_until("the delete is applied on every node", || async move {
            node.get(i, "/api/queues/%2f/orders").await.0 == StatusCode::NOT_FOUND
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_declarations_on_two_nodes_resolve_to_one_winner() {
    // Goal: the same queue declared at the same moment on alpha (durable)
    // and bravo (transient): exactly one succeeds, the other gets 406, and
    // every node ends up with the winner's definition.
    let cluster = Cluster::start("race", &NAMES).await;
    let a = cluster.connect(0).await;
    let b = cluster.connect(1).await;
    for round in 0..5 {
        let name = format!("race-{round}");
        let ch_a = a.create_channel().await.expect("channel");
        let ch_b = b.create_channel().await.expect("channel");
        let (on_a, on_b) = tokio::join!(
            ch_a.queue_declare(name.as_str().into(), durable_queue(), FieldTable::default()),
            ch_b.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default()
            ),
        );
        let winner_durable = match (&on_a, &on_b) {
            (Ok(_), Err(err)) => {
                assert_eq!(reply_code(err), Some(406), "{err}");
                true
            }
            (Err(err), Ok(_)) => {
                assert_eq!(reply_code(err), Some(406), "{err}");
                false
            }
            other => panic!("exactly one declaration must win: {other:?}"),
        };
        for i in all(3) {
            let path = format!("/api/queues/%2f/{name}");
            let node = &cluster;
            let path = &path;
            node.wait_until("every node applies the winner", || async move {
                node.get(i, path).await.0 == StatusCode::OK
            })
            .await;
            let (_, queue) = cluster.get(i, path).await;
            assert_eq!(
                queue["durable"], winner_durable,
                "node {i} holds the winner"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_majority_refuses_changes_and_converges_after_healing() {
    // Goal: with two of three nodes down, the last one answers a declaration
    // with 405 naming the lost majority (not a hang, not a silent success);
    // once the others are back, changes are decided again and every node
    // lists the same queues.
    let mut cluster = Cluster::start("minority", &NAMES).await;
    cluster.kill(1);
    cluster.kill(2);
    let a = cluster.connect(0).await;
    let ch = a.create_channel().await.expect("channel");
    let refused = tokio::time::timeout(
        WAIT,
        ch.queue_declare("lonely".into(), durable_queue(), FieldTable::default()),
    )
    .await
    .expect("an answer, not a hang")
    .expect_err("no majority, no decision");
    assert_eq!(reply_code(&refused), Some(405), "{refused}");
    assert!(refused.to_string().contains("majority"), "{refused}");
    let (status, _) = cluster.get(0, "/api/queues/%2f/lonely").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a refused change left no trace"
    );

    cluster.spawn(1);
    cluster.spawn(2);
    cluster.wait_agreed(&all(3)).await;
    let ch = a.create_channel().await.expect("channel after the refusal");
    ch.queue_declare("lonely".into(), durable_queue(), FieldTable::default())
        .await
        .expect("decided once the majority is back");
    let expected = cluster.queues(0).await;
    assert!(
        expected.contains(&"//lonely@alpha".to_string()),
        "{expected:?}"
    );
    for i in [1, 2] {
        let node = &cluster;
        node.wait_until("every node lists the same queues", || async move {
            node.queues(i).await == node.queues(0).await
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_home_node_keeps_durable_queues_and_messages_and_drops_transient_ones() {
    // Goal: alpha holds a durable queue with 200 confirmed persistent
    // messages and a transient queue; after SIGKILL and restart the durable
    // queue comes back with every message in order, and the transient queue
    // is gone from every node.
    let mut cluster = Cluster::start("restart", &NAMES).await;
    {
        let a = cluster.connect(0).await;
        let ch = a.create_channel().await.expect("channel");
        ch.queue_declare("keep".into(), durable_queue(), FieldTable::default())
            .await
            .expect("durable queue");
        ch.queue_declare(
            "temp".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("transient queue");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        for i in 0..200u32 {
            ch.basic_publish(
                "".into(),
                "keep".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        }
    }
    cluster.kill(0);
    cluster.spawn(0);
    cluster.wait_agreed(&all(3)).await;

    let a = cluster.connect(0).await;
    let ch = a.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            "keep".into(),
            "after-restart".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for expected in 0..200u32 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(delivery.data, expected.to_be_bytes(), "in order");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    for i in all(3) {
        let node = &cluster;
        node.wait_until("the transient queue is gone everywhere", || async move {
            node.get(i, "/api/queues/%2f/temp").await.0 == StatusCode::NOT_FOUND
        })
        .await;
        let (status, _) = node.get(i, "/api/queues/%2f/keep").await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_queues_spread_over_the_members_and_a_named_home_is_honoured() {
    // Goal: three queues declared on alpha with `x-queue-leader-locator:
    // balanced` get three different home nodes; the management API places a
    // queue on the member it names and refuses an unknown one with 400.
    let cluster = Cluster::start("balanced", &NAMES).await;
    let a = cluster.connect(0).await;
    let ch = a.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-leader-locator".into(),
        lapin::types::AMQPValue::LongString("balanced".into()),
    );
    let mut homes = Vec::new();
    for i in 0..3 {
        let name = format!("spread-{i}");
        ch.queue_declare(name.as_str().into(), durable_queue(), args.clone())
            .await
            .expect("declare balanced");
        let (_, queue) = cluster.get(0, &format!("/api/queues/%2f/{name}")).await;
        homes.push(queue["node"].as_str().unwrap_or("").to_string());
    }
    homes.sort();
    assert_eq!(homes, ["alpha", "bravo", "charlie"]);

    let http = reqwest::Client::new();
    let put = |node: &str| {
        http.put(format!(
            "{}/api/queues/%2f/placed-{node}",
            cluster.nodes[0].mgmt
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true, "node": node}))
        .send()
    };
    let placed = put("charlie").await.expect("PUT");
    assert!(placed.status().is_success(), "{}", placed.status());
    let (_, queue) = cluster.get(0, "/api/queues/%2f/placed-charlie").await;
    assert_eq!(queue["node"], "charlie");
    let unknown = put("zulu").await.expect("PUT");
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_through_a_fanout_exchange_across_three_nodes() {
    // Goal: the classic `logs` example spread over the cluster: a publisher
    // on alpha, one subscriber on bravo and one on charlie, each with its
    // own exclusive server-named queue; both subscribers get every message,
    // in order, and the publisher's confirms all arrive.
    let cluster = Cluster::start("pubsub", &NAMES).await;
    let mut subscribers = Vec::new();
    for i in [1, 2] {
        let conn = cluster.connect(i).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare logs");
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("server-named queue");
        ch.queue_bind(
            queue.name().clone(),
            "logs".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let consumer = ch
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        subscribers.push((conn, ch, consumer));
    }
    // The publisher's node must know both bindings before it routes.
    let node = &cluster;
    node.wait_until("alpha knows both bindings", || async move {
        node.get(0, "/api/exchanges/%2f/logs/bindings/source")
            .await
            .1
            .as_array()
            .is_some_and(|b| b.len() == 2)
    })
    .await;
    let publisher = cluster.connect(0).await;
    let ch = publisher.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::new();
    for i in 0..100u32 {
        confirms.push(
            ch.basic_publish(
                "logs".into(),
                "".into(),
                BasicPublishOptions::default(),
                format!("log line {i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    for confirm in confirms {
        let confirmation = confirm.await.expect("confirmed");
        assert!(confirmation.is_ack(), "{confirmation:?}");
    }
    for (_, _, consumer) in &mut subscribers {
        for i in 0..100u32 {
            let delivery = tokio::time::timeout(WAIT, consumer.next())
                .await
                .expect("a delivery in time")
                .expect("stream open")
                .expect("delivery");
            assert_eq!(delivery.data, format!("log line {i}").as_bytes());
        }
    }
}
