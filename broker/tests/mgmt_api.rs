//! The management HTTP API end to end: a broker started in-process on
//! loopback, driven with a real HTTP client (reqwest) and, where the API
//! must agree with AMQP, a real AMQP client (lapin).

mod mgmt_support;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mgmt_support::{WAIT, assert_error, start, wait_until};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

#[tokio::test]
async fn status_endpoints_describe_the_single_node() {
    // Goal: overview, nodes, cluster, cluster/ready and the alarms check answer with RabbitMQ's shapes.
    let h = start().await;
    let overview = h.get_json("/api/overview").await;
    assert_eq!(overview["product_name"], "Synod");
    assert_eq!(overview["node"], "synod@test");
    // The default exchange and the five amq.* ones.
    assert_eq!(overview["object_totals"]["exchanges"], 6);
    assert_eq!(overview["queue_totals"]["messages"], 0);
    let nodes = h.get_json("/api/nodes").await;
    assert_eq!(nodes.as_array().expect("list").len(), 1);
    assert_eq!(nodes[0]["name"], "synod@test");
    assert_eq!(nodes[0]["running"], true);
    assert_eq!(h.get_json("/api/nodes/synod@test").await["type"], "disc");
    let cluster = h.get_json("/api/cluster").await;
    assert_eq!(cluster["members"][0]["name"], "synod@test");
    assert_eq!(cluster["members"][0]["role"], "voter");
    assert_eq!(cluster["leader"], "synod@test");
    assert_eq!(cluster["epoch"], 0);
    // Readiness probes carry no credentials.
    let ready = h
        .http
        .get(format!("{}/api/cluster/ready", h.base))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        h.get_json("/api/health/checks/alarms").await["status"],
        "ok"
    );
    h.stop().await;
}

#[tokio::test]
async fn vhosts_users_and_permissions_round_trip() {
    // Goal: PUT/GET/DELETE of vhosts, users (password and imported hash) and permissions, with 201/204/404.
    let h = start().await;
    assert_eq!(
        h.put("/api/vhosts/dev%2Fone", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put("/api/vhosts/dev%2Fone", json!({})).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.get_json("/api/vhosts/dev%2Fone").await["name"], "dev/one");
    let vhosts = h.get_json("/api/vhosts").await;
    let names: Vec<&str> = vhosts
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["/", "dev/one"]);

    assert_eq!(
        h.put(
            "/api/users/alice",
            json!({"password": "pw1", "tags": "management"})
        )
        .await,
        StatusCode::CREATED
    );
    // RabbitMQ's hash of "test12" with salt 908DC60A, as a definitions export carries it.
    let hash = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
    assert_eq!(
        h.put(
            "/api/users/bob",
            json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["monitoring"]})
        )
        .await,
        StatusCode::CREATED
    );
    let bob = h.get_json("/api/users/bob").await;
    assert_eq!(bob["password_hash"], hash);
    assert_eq!(bob["tags"], json!(["monitoring"]));
    assert_eq!(bob["hashing_algorithm"], "rabbit_password_hashing_sha256");
    let me = h
        .request_as(Method::GET, "/api/whoami", "bob", "test12")
        .send()
        .await
        .expect("whoami");
    assert_eq!(
        me.status(),
        StatusCode::OK,
        "bob logs in with the imported hash"
    );
    assert_error(
        h.request(Method::PUT, "/api/users/carol")
            .json(&json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha512"}))
            .send()
            .await
            .expect("PUT"),
        StatusCode::BAD_REQUEST,
        "hashing_algorithm",
    )
    .await;
    assert_eq!(
        h.put(
            "/api/permissions/dev%2Fone/alice",
            json!({"configure": "^a\\.", "write": ".*", "read": ".*"})
        )
        .await,
        StatusCode::CREATED
    );
    let permission = h.get_json("/api/permissions/dev%2Fone/alice").await;
    assert_eq!(permission["configure"], "^a\\.");
    assert_eq!(permission["vhost"], "dev/one");
    assert_eq!(
        h.get_json("/api/users/alice/permissions").await[0]["vhost"],
        "dev/one"
    );
    assert_eq!(
        h.get_json("/api/vhosts/dev%2Fone/permissions")
            .await
            .as_array()
            .map(Vec::len),
        Some(2),
        "alice and guest, who created the vhost"
    );
    assert_eq!(
        h.delete("/api/permissions/dev%2Fone/alice").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.delete("/api/permissions/dev%2Fone/alice").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.delete("/api/users/alice").await, StatusCode::NO_CONTENT);
    assert_eq!(h.delete("/api/users/alice").await, StatusCode::NOT_FOUND);
    assert_eq!(
        h.delete("/api/vhosts/dev%2Fone").await,
        StatusCode::NO_CONTENT
    );
    let gone = h
        .request(Method::GET, "/api/vhosts/dev%2Fone")
        .send()
        .await
        .expect("GET");
    assert_error(gone, StatusCode::NOT_FOUND, "dev/one").await;
    let users = h.get_json("/api/users").await;
    assert_eq!(users.as_array().map(Vec::len), Some(2), "{users}");
    h.stop().await;
}

#[tokio::test]
async fn exchanges_queues_and_bindings_follow_amqp() {
    // Goal: declarations are idempotent, conflicts are 400, bindings get a Location, and counts match AMQP traffic.
    let h = start().await;
    let exchange = json!({"type": "topic", "durable": true});
    assert_eq!(
        h.put("/api/exchanges/%2F/events", exchange.clone()).await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put("/api/exchanges/%2F/events", exchange).await,
        StatusCode::NO_CONTENT
    );
    let conflict = h
        .request(Method::PUT, "/api/exchanges/%2F/events")
        .json(&json!({"type": "direct", "durable": true}))
        .send()
        .await
        .expect("PUT");
    assert_error(conflict, StatusCode::BAD_REQUEST, "inequivalent arg 'type'").await;
    let info = h.get_json("/api/exchanges/%2F/events").await;
    assert_eq!(info["type"], "topic");
    assert_eq!(info["durable"], true);
    assert_eq!(
        h.put(
            "/api/queues/%2F/work",
            json!({"durable": true, "arguments": {"x-max-length": 100}})
        )
        .await,
        StatusCode::CREATED
    );
    let conflict = h
        .request(Method::PUT, "/api/queues/%2F/work")
        .json(&json!({"durable": true, "arguments": {"x-max-length": 5}}))
        .send()
        .await
        .expect("PUT");
    assert_error(conflict, StatusCode::BAD_REQUEST, "x-max-length").await;
    let reserved = h
        .request(Method::PUT, "/api/queues/%2F/amq.mine")
        .json(&json!({}))
        .send()
        .await
        .expect("PUT");
    assert_error(reserved, StatusCode::FORBIDDEN, "reserved").await;

    let created = h
        .request(Method::POST, "/api/bindings/%2F/e/events/q/work")
        .json(&json!({"routing_key": "job.#", "arguments": {}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(created.status(), StatusCode::CREATED);
    let location = created.headers()[header::LOCATION]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(location, "/api/bindings/%2F/e/events/q/work/job.%23");
    let binding = h.get_json(&location).await;
    assert_eq!(binding["routing_key"], "job.#");
    assert_eq!(binding["properties_key"], "job.%23");
    let pair = h.get_json("/api/bindings/%2F/e/events/q/work").await;
    assert_eq!(pair.as_array().map(Vec::len), Some(1));
    let all = h.get_json("/api/bindings/%2F").await;
    assert!(
        all.as_array()
            .expect("list")
            .iter()
            .any(|b| b["source"] == "" && b["destination"] == "work"),
        "default exchange binding listed: {all}"
    );
    assert_eq!(
        h.get_json("/api/queues/%2F/work/bindings")
            .await
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Publish through AMQP; the API's counts come from the same queue.
    let connection = h.amqp("guest", "guest", "%2f").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..3 {
        channel
            .basic_publish(
                "events".into(),
                format!("job.{i}").as_str().into(),
                BasicPublishOptions::default(),
                b"payload",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
    }
    let queue = h.get_json("/api/queues/%2F/work").await;
    assert_eq!(queue["messages_ready"], 3, "{queue}");
    assert_eq!(queue["messages"], 3);
    assert_eq!(queue["messages_unacknowledged"], 0);
    assert_eq!(queue["consumers"], 0);
    assert_eq!(queue["node"], "synod@test");
    assert_eq!(queue["arguments"]["x-max-length"], 100);
    let overview = h.get_json("/api/overview").await;
    assert_eq!(overview["queue_totals"]["messages_ready"], 3);
    assert!(
        overview["message_stats"]["publish"]
            .as_u64()
            .expect("count")
            >= 3
    );
    let not_empty = h
        .request(Method::DELETE, "/api/queues/%2F/work?if-empty=true")
        .send()
        .await
        .expect("DELETE");
    assert_error(not_empty, StatusCode::BAD_REQUEST, "not empty").await;

    assert_eq!(h.delete(&location).await, StatusCode::NO_CONTENT);
    assert_eq!(h.delete(&location).await, StatusCode::NOT_FOUND);
    assert_eq!(
        h.delete("/api/queues/%2F/work").await,
        StatusCode::NO_CONTENT
    );
    // AMQP sees the deletion: a passive declare fails with 404.
    let err = channel
        .queue_declare(
            "work".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("queue is gone");
    assert!(
        err.to_string().contains("404") || err.to_string().contains("NOT_FOUND"),
        "{err}"
    );
    assert_eq!(
        h.delete("/api/exchanges/%2F/events").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.delete("/api/exchanges/%2F/events").await,
        StatusCode::NOT_FOUND
    );
    let _ = connection.close(200, "done".into()).await;
    h.stop().await;
}

#[tokio::test]
async fn connections_and_channels_are_listed_and_closable() {
    // Goal: an AMQP connection and its channels appear in the API, and DELETE closes the connection.
    let h = start().await;
    let connection = h.amqp("guest", "guest", "%2f").await.expect("connect");
    let _first = connection.create_channel().await.expect("channel");
    let _second = connection.create_channel().await.expect("channel");
    wait_until("connection and channels listed", || async {
        let connections = h.get_json("/api/connections").await;
        let channels = h.get_json("/api/channels").await;
        connections.as_array().map(Vec::len) == Some(1)
            && channels.as_array().map(Vec::len) == Some(2)
    })
    .await;
    let listed = h.get_json("/api/connections").await;
    let name = listed[0]["name"].as_str().expect("name").to_string();
    assert_eq!(listed[0]["user"], "guest");
    assert_eq!(listed[0]["vhost"], "/");
    assert_eq!(listed[0]["channels"], 2);
    let channels = h.get_json("/api/channels").await;
    assert_eq!(channels[0]["connection_details"]["name"], name.as_str());
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    assert_eq!(
        h.get_json(&format!("/api/connections/{encoded}")).await["name"],
        name.as_str()
    );
    assert_eq!(
        h.delete(&format!("/api/connections/{encoded}")).await,
        StatusCode::NO_CONTENT
    );
    wait_until("connection closed by the broker", || {
        let connected = connection.status().connected();
        async move { !connected }
    })
    .await;
    wait_until("connection unlisted", || async {
        h.get_json("/api/connections")
            .await
            .as_array()
            .map(Vec::len)
            == Some(0)
    })
    .await;
    assert_eq!(
        h.delete(&format!("/api/connections/{encoded}")).await,
        StatusCode::NOT_FOUND
    );
    h.stop().await;
}

#[tokio::test]
async fn every_error_status_has_a_json_body() {
    // Goal: 401 (with a challenge, counted), 403, 404, 400 naming the field, 405 and 413 answer as specified.
    let h = start().await;
    let failures_before = h.broker.broker.metrics.auth_failures_total.get();
    let anonymous = h
        .http
        .get(format!("{}/api/overview", h.base))
        .send()
        .await
        .expect("GET");
    assert!(anonymous.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "credentials").await;
    let wrong = h
        .request_as(Method::GET, "/api/overview", "guest", "wrong")
        .send()
        .await
        .expect("GET");
    assert_error(wrong, StatusCode::UNAUTHORIZED, "login failed").await;
    assert!(h.broker.broker.metrics.auth_failures_total.get() > failures_before);
    assert!(h.scrape().await.contains("synod_auth_failures_total 1"));

    assert_eq!(
        h.put(
            "/api/users/watcher",
            json!({"password": "w", "tags": "monitoring"})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put("/api/users/nobody", json!({"password": "n", "tags": ""}))
            .await,
        StatusCode::CREATED
    );
    let read = h
        .request_as(Method::GET, "/api/queues", "watcher", "w")
        .send()
        .await
        .expect("GET");
    assert_eq!(read.status(), StatusCode::OK, "monitoring reads");
    let write = h
        .request_as(Method::PUT, "/api/queues/%2F/q", "watcher", "w")
        .json(&json!({}))
        .send()
        .await
        .expect("PUT");
    assert_error(write, StatusCode::FORBIDDEN, "watcher").await;
    let users = h
        .request_as(Method::GET, "/api/users", "watcher", "w")
        .send()
        .await
        .expect("GET");
    assert_error(users, StatusCode::FORBIDDEN, "administrator").await;
    let untagged = h
        .request_as(Method::GET, "/api/overview", "nobody", "n")
        .send()
        .await
        .expect("GET");
    assert_error(untagged, StatusCode::FORBIDDEN, "no management tag").await;

    let unknown = h
        .request(Method::GET, "/api/no/such/thing")
        .send()
        .await
        .expect("GET");
    assert_error(unknown, StatusCode::NOT_FOUND, "no such path").await;
    let missing = h
        .request(Method::GET, "/api/queues/%2F/missing")
        .send()
        .await
        .expect("GET");
    assert_error(missing, StatusCode::NOT_FOUND, "missing").await;
    let bad_type = h
        .request(Method::PUT, "/api/queues/%2F/q")
        .json(&json!({"durable": "yes"}))
        .send()
        .await
        .expect("PUT");
    assert_error(bad_type, StatusCode::BAD_REQUEST, "durable").await;
    let bad_json = h
        .request(Method::PUT, "/api/exchanges/%2F/x")
        .header(header::CONTENT_TYPE, "application/json")
        .body("{\"type\": ")
        .send()
        .await
        .expect("PUT");
    assert_error(bad_json, StatusCode::BAD_REQUEST, "JSON").await;
    let bad_variant = h
        .request(Method::PUT, "/api/exchanges/%2F/x")
        .json(&json!({"type": "x-consistent-hash"}))
        .send()
        .await
        .expect("PUT");
    assert_error(bad_variant, StatusCode::BAD_REQUEST, "type").await;
    let missing_field = h
        .request(Method::PUT, "/api/permissions/%2F/watcher")
        .json(&json!({"configure": ".*", "write": ".*"}))
        .send()
        .await
        .expect("PUT");
    assert_error(missing_field, StatusCode::BAD_REQUEST, "read").await;
    let wrong_method = h
        .request(Method::POST, "/api/overview")
        .send()
        .await
        .expect("POST");
    assert_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "method").await;
    let huge = vec![b' '; synod_broker::limits::HTTP_BODY_SIZE_MAX + 1];
    let too_large = h
        .request(Method::POST, "/api/definitions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(huge)
        .send()
        .await
        .expect("POST");
    assert_error(too_large, StatusCode::PAYLOAD_TOO_LARGE, "larger than").await;
    h.stop().await;
}

#[tokio::test]
async fn management_users_see_and_change_only_what_permissions_allow() {
    // Goal: a `management` user lists only its vhosts and declares only where `configure` allows.
    let h = start().await;
    assert_eq!(
        h.put("/api/vhosts/team", json!({})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put(
            "/api/users/dev",
            json!({"password": "d", "tags": "management"})
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        h.put(
            "/api/permissions/team/dev",
            json!({"configure": "^dev\\..*", "write": ".*", "read": ".*"})
        )
        .await,
        StatusCode::CREATED
    );
    let vhosts: Value = h
        .request_as(Method::GET, "/api/vhosts", "dev", "d")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        vhosts,
        json!([{"name": "team", "description": "", "tags": []}])
    );
    let other = h
        .request_as(Method::GET, "/api/queues/%2F", "dev", "d")
        .send()
        .await
        .expect("GET");
    assert_error(other, StatusCode::FORBIDDEN, "no access").await;
    let allowed = h
        .request_as(Method::PUT, "/api/queues/team/dev.jobs", "dev", "d")
        .json(&json!({"durable": true}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(allowed.status(), StatusCode::CREATED);
    let refused = h
        .request_as(Method::PUT, "/api/queues/team/prod.jobs", "dev", "d")
        .json(&json!({"durable": true}))
        .send()
        .await
        .expect("PUT");
    assert_error(refused, StatusCode::FORBIDDEN, "prod.jobs").await;
    let admin_only = h
        .request_as(Method::PUT, "/api/vhosts/mine", "dev", "d")
        .json(&json!({}))
        .send()
        .await
        .expect("PUT");
    assert_error(admin_only, StatusCode::FORBIDDEN, "administrator").await;
    let _ = WAIT;
    h.stop().await;
}
