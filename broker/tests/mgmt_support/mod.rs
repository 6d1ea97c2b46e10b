//! Shared setup of the management and metrics tests: a broker started
//! in-process with every listener on 127.0.0.1:0, and an HTTP client.
#![allow(dead_code)]

use std::time::Duration;

use clap::Parser;
use lapin::{Connection, ConnectionProperties};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use synod_broker::config::{Args, Config};
use synod_broker::server::{self, RunningBroker};

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running broker and a client for its management API.
pub struct Harness {
    /// The broker.
    pub broker: RunningBroker,
    /// HTTP client.
    pub http: reqwest::Client,
    /// `http://127.0.0.1:port` of the management API.
    pub base: String,
    /// `http://127.0.0.1:port/metrics`.
    pub metrics_url: String,
}

/// Starts a broker on loopback with `extra` flags.
pub async fn start_with_flags(extra: &[&str]) -> Harness {
    let mut argv = vec![
        "synod-broker",
        "--node-name",
        "synod@test",
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
    let broker = server::start_serving(config, None)
        .await
        .expect("broker starts");
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

/// Starts a broker on loopback with default settings.
pub async fn start() -> Harness {
    start_with_flags(&[]).await
}

impl Harness {
    /// A request as `user`/`password`.
    pub fn request_as(
        &self,
        method: Method,
        path: &str,
        user: &str,
        password: &str,
    ) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(user, Some(password))
    }

    /// A request as the default administrator `guest`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_as(method, path, "guest", "guest")
    }

    /// GET as guest; asserts 200 and returns the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.request(Method::GET, path).send().await.expect("GET");
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.expect("JSON body")
    }

    /// PUT `body` as guest; returns the status.
    pub async fn put(&self, path: &str, body: Value) -> StatusCode {
        self.request(Method::PUT, path)
            .json(&body)
            .send()
            .await
            .expect("PUT")
            .status()
    }

    /// DELETE as guest; returns the status.
    pub async fn delete(&self, path: &str) -> StatusCode {
        self.request(Method::DELETE, path)
            .send()
            .await
            .expect("DELETE")
            .status()
    }

    /// Scrapes `/metrics`.
    pub async fn scrape(&self) -> String {
        let response = self
            .http
            .get(&self.metrics_url)
            .send()
            .await
            .expect("scrape");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("text")
    }

    /// An AMQP connection as `user`/`password` to `vhost` (`%2f` encoded).
    pub async fn amqp(&self, user: &str, password: &str, vhost: &str) -> lapin::Result<Connection> {
        let uri = format!("amqp://{user}:{password}@{}/{vhost}", self.broker.amqp_addr);
        tokio::time::timeout(
            WAIT,
            Connection::connect(&uri, ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
    }

    /// Stops the broker.
    pub async fn stop(self) {
        self.broker.shutdown().await;
    }
}

/// Asserts an error response: the status and a JSON body with `error`
/// and a `reason` containing `reason_part`.
pub async fn assert_error(response: Response, status: StatusCode, reason_part: &str) {
    assert_eq!(response.status(), status, "status");
    let body: Value = response.json().await.expect("JSON error body");
    assert!(body["error"].is_string(), "{body}");
    let reason = body["reason"].as_str().expect("reason");
    assert!(
        reason.contains(reason_part),
        "reason {reason:?} lacks {reason_part:?}"
    );
}

/// Waits until `check` is true, polling; panics after `WAIT`.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
