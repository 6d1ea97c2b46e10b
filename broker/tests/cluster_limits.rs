//! Limits are cluster metadata: a vhost limit set through one node's
//! management API is decided through Paxos, every node serves it, and the
//! queue limit holds whichever node a queue is declared through. Three
//! real `synod-broker` processes on loopback.

mod multinode;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use multinode::{Cluster, WAIT};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_queue_limit_set_on_one_node_holds_on_every_node() {
    // Goal: max-queues 2 PUT on alpha is listed by bravo and charlie; queues declared through alpha and bravo fill it; the third, through charlie, gets 406 with the limit's text.
    let cluster = Cluster::start("limits", &["alpha", "bravo", "charlie"]).await;
    let http = reqwest::Client::builder()
        .timeout(WAIT)
        .no_proxy()
        .build()
        .expect("client");
    let status = http
        .put(format!(
            "{}/api/vhost-limits/%2f/max-queues",
            cluster.nodes[0].mgmt
        ))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"value": 2}))
        .send()
        .await
        .expect("management API answers")
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    for i in [1, 2] {
        let node = &cluster;
        node.wait_until("the limit is applied on every node", || async move {
            node.get(i, "/api/vhost-limits").await.1
                == json!([{"vhost": "/", "value": {"max-queues": 2}}])
        })
        .await;
    }
    for (i, queue) in [(0, "from-alpha"), (1, "from-bravo")] {
        let connection = cluster.connect(i).await;
        let ch = connection.create_channel().await.expect("channel");
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("within the limit");
    }
    let connection = cluster.connect(2).await;
    let ch = connection.create_channel().await.expect("channel");
    let err = ch
        .queue_declare(
            "from-charlie".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("over the limit");
    let lapin::ErrorKind::ProtocolError(amqp) = err.kind() else {
        panic!("a channel error, got {err}");
    };
    assert_eq!(amqp.get_id(), 406, "{err}");
    assert!(
        amqp.get_message()
            .as_str()
            .contains("vhost queue limit (2) is reached"),
        "{err}"
    );
}
