//! Importing a RabbitMQ definitions export through `POST /api/definitions`
//! declares everything in it, visibly to the API and to AMQP clients, and
//! an export imports back unchanged.

mod mgmt_support;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use mgmt_support::{WAIT, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SAMPLE: &str = include_str!("data/rabbitmq-3.12-definitions.json");

fn names(list: &Value, vhost: &str) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .expect("list")
        .iter()
        .filter(|o| o["vhost"] == vhost)
        .filter_map(|o| o["name"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_rabbitmq_export_imports_and_serves_amqp() {
    // Goal: every vhost, user, permission, exchange, queue and binding of a RabbitMQ export is declared and usable.
    let h = start().await;
    let response = h
        .request(Method::POST, "/api/definitions")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(SAMPLE)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.expect("JSON");
    assert_eq!(report["imported"]["users"], 3);
    assert_eq!(report["imported"]["bindings"], 5);
    let ignored = report["ignored"].to_string();
    for section in [
        "policies",
        "parameters",
        "global_parameters",
        "topic_permissions",
    ] {
        assert!(ignored.contains(section), "{section} not noted: {ignored}");
    }

    let vhosts = h.get_json("/api/vhosts").await;
    assert!(vhosts.to_string().contains("\"orders\""), "{vhosts}");
    assert_eq!(
        names(&h.get_json("/api/queues").await, "orders"),
        [
            "orders.audit",
            "orders.created",
            "orders.dead",
            "orders.priority"
        ]
    );
    assert_eq!(
        names(&h.get_json("/api/queues").await, "/"),
        ["healthcheck"]
    );
    let exchanges = h.get_json("/api/exchanges/orders").await;
    for name in [
        "orders.events",
        "orders.fanout",
        "orders.dlx",
        "orders.match",
    ] {
        assert!(
            names(&exchanges, "orders").contains(&name.to_string()),
            "{name}"
        );
    }
    let created = h.get_json("/api/queues/orders/orders.created").await;
    assert_eq!(created["arguments"]["x-dead-letter-exchange"], "orders.dlx");
    assert_eq!(created["arguments"]["x-max-length"], 100000);
    let fanout = h.get_json("/api/exchanges/orders/orders.fanout").await;
    assert_eq!(fanout["internal"], true);
    let headers = h
        .get_json("/api/bindings/orders/e/orders.match/q/orders.priority")
        .await;
    assert_eq!(headers[0]["arguments"]["x-match"], "all");
    let e2e = h
        .get_json("/api/bindings/orders/e/orders.events/e/orders.fanout")
        .await;
    assert_eq!(e2e[0]["routing_key"], "order.#");
    let users = h.get_json("/api/users").await;
    let grafana = users
        .as_array()
        .expect("list")
        .iter()
        .find(|u| u["name"] == "grafana")
        .expect("grafana imported");
    assert_eq!(grafana["tags"], json!(["monitoring"]));
    let permission = h.get_json("/api/permissions/orders/orders-svc").await;
    assert_eq!(permission["configure"], "^orders\\.");

    // The imported admin logs in to the API with the password behind its hash.
    let admin = h
        .request_as(Method::GET, "/api/overview", "ops-admin", "s3cret-admin")
        .send()
        .await
        .expect("GET");
    assert_eq!(admin.status(), StatusCode::OK);

    // Over AMQP, as the imported administrator: passive declares find
    // the topology, and a message published to the topic exchange reaches
    // the queue bound directly and the one behind the exchange binding.
    let connection = h
        .amqp("ops-admin", "s3cret-admin", "orders")
        .await
        .expect("imported user connects over AMQP");
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [
        "orders.created",
        "orders.audit",
        "orders.dead",
        "orders.priority",
    ] {
        channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|err| panic!("queue {queue} visible over AMQP: {err}"));
    }
    channel
        .exchange_declare(
            "orders.events".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange visible over AMQP");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            "orders.events".into(),
            "order.created".into(),
            BasicPublishOptions::default(),
            b"order 42",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    for queue in ["orders.created", "orders.audit"] {
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(delivery.data, b"order 42", "{queue}");
    }
    let _ = connection.close(200, "done".into()).await;
    h.stop().await;
}

#[tokio::test]
async fn an_export_imports_back_into_an_empty_broker() {
    // Goal: GET /api/definitions output is accepted by POST on a fresh broker and yields the same topology.
    let first = start().await;
    let response = first
        .request(Method::POST, "/api/definitions")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(SAMPLE)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    let exported = first.get_json("/api/definitions").await;
    assert_eq!(exported["product_name"], "Synod");
    assert!(
        !exported["exchanges"].to_string().contains("amq.direct"),
        "built-in exchanges are not exported"
    );
    let second = start().await;
    let response = second
        .request(Method::POST, "/api/definitions")
        .json(&exported)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    let again = second.get_json("/api/definitions").await;
    for section in ["vhosts", "permissions", "exchanges", "queues", "bindings"] {
        assert_eq!(again[section], exported[section], "{section}");
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_bad_definitions_file_names_the_entry() {
    // Goal: an unsupported hash algorithm or a binding to a missing queue is a 400 naming the entry.
    let h = start().await;
    let bad_hash = json!({"users": [{"name": "x", "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_md5", "tags": []}]});
    let response = h
        .request(Method::POST, "/api/definitions")
        .json(&bad_hash)
        .send()
        .await
        .expect("POST");
    mgmt_support::assert_error(response, StatusCode::BAD_REQUEST, "users[0]").await;
    let dangling = json!({"bindings": [{"source": "amq.topic", "vhost": "/", "destination": "nowhere", "destination_type": "queue", "routing_key": "k", "arguments": {}}]});
    let response = h
        .request(Method::POST, "/api/definitions")
        .json(&dangling)
        .send()
        .await
        .expect("POST");
    mgmt_support::assert_error(response, StatusCode::BAD_REQUEST, "bindings[0]").await;
    let wrong_shape = json!({"queues": [{"name": "q", "vhost": "/", "durable": "yes"}]});
    let response = h
        .request(Method::POST, "/api/definitions")
        .json(&wrong_shape)
        .send()
        .await
        .expect("POST");
    mgmt_support::assert_error(response, StatusCode::BAD_REQUEST, "queues[0].durable").await;
    h.stop().await;
}
