//! Typed client of one broker's management API (`mgmt::api` types over
//! HTTP basic auth). Knows paths and status codes; no Kubernetes, no retries.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use synod_broker::mgmt::api::{
    BindingDeclare, BindingInfo, ClusterStatus, DestinationType, ErrorResponse, ExchangeDeclare,
    MemberAdd, QueueDeclare, QueueInfo,
};

/// Timeout of one management API request: a slow broker must not stall a reconcile.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a readiness check: it is asked of every pod in each reconcile.
pub const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or did not answer in time.
    #[error("broker {url} unreachable: {source}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// What went wrong.
        #[source]
        source: reqwest::Error,
    },
    /// The broker answered with an error status.
    #[error("broker answered {status} to {method} {path}: {reason}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request method.
        method: String,
        /// The request path.
        path: String,
        /// The broker's `reason` (or the body when it is not JSON).
        reason: String,
    },
    /// The broker's answer did not have the expected JSON shape.
    #[error("broker answer to {path} is not the expected JSON: {reason}")]
    Decode {
        /// The request path.
        path: String,
        /// The decoding error.
        reason: String,
    },
}

impl Error {
    /// The HTTP status, when the broker answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the broker answered 404 (the object, or the vhost, does not exist).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// Percent-encodes one path segment (RabbitMQ's `/` vhost becomes `%2F`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A client of the management API of one broker node.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    http: reqwest::Client,
    base_url: String,
    username: String,
    password: String,
}

impl BrokerClient {
    /// A client of the broker at `base_url` (e.g. `http://10.0.0.7:15672`) as `username`.
    pub fn new(http: reqwest::Client, base_url: &str, username: &str, password: &str) -> Self {
        BrokerClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.to_string(),
        }
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Error> {
        self.send_within(method, path, body, REQUEST_TIMEOUT).await
    }

    async fn send_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<reqwest::Response, Error> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .basic_auth(&self.username, Some(&self.password))
            .timeout(timeout);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|source| Error::Unreachable {
            url: url.clone(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<ErrorResponse>(&text)
            .map(|e| e.reason)
            .unwrap_or(text);
        Err(Error::Status {
            status: status.as_u16(),
            method: method.to_string(),
            path: path.to_string(),
            reason,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let response = self.send(Method::GET, path, None).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|source| Error::Unreachable {
                url: format!("{}{path}", self.base_url),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|err| Error::Decode {
            path: path.to_string(),
            reason: err.to_string(),
        })
    }

    async fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), Error> {
        self.send(Method::PUT, path, Some(json(body)))
            .await
            .map(drop)
    }

    /// DELETE where 404 counts as success: the object is gone either way.
    async fn delete(&self, path: &str) -> Result<(), Error> {
        match self.send(Method::DELETE, path, None).await {
            Err(err) if err.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }

    /// `GET /api/cluster`: members, leader, epoch, decided index.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        self.get("/api/cluster").await
    }

    /// `GET /api/cluster/ready`: whether this node is a caught-up member.
    pub async fn is_ready(&self) -> Result<bool, Error> {
        match self
            .send_within(Method::GET, "/api/cluster/ready", None, READY_TIMEOUT)
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Status { status, .. })
                if status == StatusCode::SERVICE_UNAVAILABLE.as_u16() =>
            {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// `POST /api/cluster/members`: asks the cluster to add a node.
    pub async fn add_member(&self, member: &MemberAdd) -> Result<(), Error> {
        self.send(Method::POST, "/api/cluster/members", Some(json(member)))
            .await
            .map(drop)
    }

    /// `DELETE /api/cluster/members/{node}`: removes a node from the configuration.
    pub async fn remove_member(&self, node: &str) -> Result<(), Error> {
        self.delete(&format!("/api/cluster/members/{}", encode_segment(node)))
            .await
    }

    /// `GET /api/queues`: every queue with its home node.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, Error> {
        self.get("/api/queues").await
    }

    /// `PUT /api/exchanges/{vhost}/{name}`.
    pub async fn declare_exchange(
        &self,
        vhost: &str,
        name: &str,
        declare: &ExchangeDeclare,
    ) -> Result<(), Error> {
        self.put(&exchange_path(vhost, name), declare).await
    }

    /// `DELETE /api/exchanges/{vhost}/{name}`; absent counts as deleted.
    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), Error> {
        self.delete(&exchange_path(vhost, name)).await
    }

    /// `PUT /api/queues/{vhost}/{name}`.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        name: &str,
        declare: &QueueDeclare,
    ) -> Result<(), Error> {
        self.put(&queue_path(vhost, name), declare).await
    }

    /// `DELETE /api/queues/{vhost}/{name}`; absent counts as deleted.
    pub async fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), Error> {
        self.delete(&queue_path(vhost, name)).await
    }

    /// `GET /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`.
    pub async fn bindings_between(
        &self,
        vhost: &str,
        source: &str,
        destination_type: DestinationType,
        destination: &str,
    ) -> Result<Vec<BindingInfo>, Error> {
        self.get(&binding_path(vhost, source, destination_type, destination))
            .await
    }

    /// `POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`.
    pub async fn create_binding(
        &self,
        vhost: &str,
        source: &str,
        destination_type: DestinationType,
        destination: &str,
        declare: &BindingDeclare,
    ) -> Result<(), Error> {
        let path = binding_path(vhost, source, destination_type, destination);
        self.send(Method::POST, &path, Some(json(declare)))
            .await
            .map(drop)
    }

    /// `DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}`.
    pub async fn delete_binding(
        &self,
        vhost: &str,
        source: &str,
        destination_type: DestinationType,
        destination: &str,
        properties_key: &str,
    ) -> Result<(), Error> {
        let path = format!(
            "{}/{}",
            binding_path(vhost, source, destination_type, destination),
            encode_segment(properties_key)
        );
        self.delete(&path).await
    }
}

fn exchange_path(vhost: &str, name: &str) -> String {
    format!(
        "/api/exchanges/{}/{}",
        encode_segment(vhost),
        encode_segment(name)
    )
}

fn queue_path(vhost: &str, name: &str) -> String {
    format!(
        "/api/queues/{}/{}",
        encode_segment(vhost),
        encode_segment(name)
    )
}

fn binding_path(
    vhost: &str,
    source: &str,
    destination_type: DestinationType,
    destination: &str,
) -> String {
    format!(
        "/api/bindings/{}/e/{}/{}/{}",
        encode_segment(vhost),
        encode_segment(source),
        destination_type.path_segment(),
        encode_segment(destination)
    )
}

fn json<B: Serialize>(body: &B) -> Vec<u8> {
    serde_json::to_vec(body).expect("API request types serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode as AxumStatus};
    use axum::response::IntoResponse;
    use axum::routing::{get, put};
    use std::sync::{Arc, Mutex};

    #[test]
    fn segments_are_percent_encoded() {
        // Goal: the default vhost and reserved characters survive as one path segment.
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_segment("orders.v1-x_y~"), "orders.v1-x_y~");
        assert_eq!(
            binding_path("/", "ex", DestinationType::Queue, "q"),
            "/api/bindings/%2F/e/ex/q/q"
        );
    }

    /// A management API stand-in on 127.0.0.1:0 recording what it receives.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn declares_with_basic_auth_and_encoded_vhost() {
        // Goal: PUT goes to /api/exchanges/%2F/{name} with basic auth and RabbitMQ's JSON body.
        let seen: Arc<Mutex<Vec<(String, String, serde_json::Value)>>> = Arc::default();
        let record = seen.clone();
        let router = axum::Router::new().route(
            "/api/exchanges/{vhost}/{name}",
            put(
                move |Path((vhost, name)): Path<(String, String)>,
                      headers: HeaderMap,
                      body: axum::Json<serde_json::Value>| {
                    let record = record.clone();
                    async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        record.lock().expect("lock").push((
                            format!("{vhost}|{name}"),
                            auth,
                            body.0,
                        ));
                        AxumStatus::CREATED
                    }
                },
            ),
        );
        let base = serve(router).await;
        let client = BrokerClient::new(reqwest::Client::new(), &base, "admin", "pw");
        let declare = ExchangeDeclare {
            kind: synod_broker::mgmt::api::ExchangeType::Fanout,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Default::default(),
        };
        client
            .declare_exchange("/", "events", &declare)
            .await
            .expect("declared");
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "/|events", "axum decodes %2F back to /");
        assert_eq!(seen[0].1, "Basic YWRtaW46cHc=");
        assert_eq!(seen[0].2["type"], "fanout");
    }

    #[tokio::test]
    async fn not_found_deletes_succeed_and_errors_carry_the_reason() {
        // Goal: DELETE answered 404 is success; a 400 surfaces the broker's reason.
        let router = axum::Router::new()
            .route(
                "/api/queues/{vhost}/{name}",
                axum::routing::delete(|| async {
                    (
                        AxumStatus::NOT_FOUND,
                        axum::Json(serde_json::json!({"error": "not_found", "reason": "no queue"})),
                    )
                })
                .put(|| async {
                    (
                        AxumStatus::BAD_REQUEST,
                        axum::Json(serde_json::json!({
                            "error": "bad_request",
                            "reason": "inequivalent arg 'durable'"
                        })),
                    )
                }),
            )
            .route(
                "/api/cluster/ready",
                get(|| async { AxumStatus::SERVICE_UNAVAILABLE }),
            );
        let base = serve(router).await;
        let client = BrokerClient::new(reqwest::Client::new(), &base, "u", "p");
        client
            .delete_queue("/", "gone")
            .await
            .expect("404 is deleted");
        let declare = QueueDeclare {
            durable: false,
            auto_delete: false,
            arguments: Default::default(),
            node: None,
        };
        let err = client
            .declare_queue("/", "q", &declare)
            .await
            .expect_err("conflict");
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains("inequivalent arg"), "{err}");
        assert!(!client.is_ready().await.expect("answered"));
    }

    #[tokio::test]
    async fn member_removal_that_is_still_draining_is_accepted() {
        // Goal: 202 (the node's queues are still moving) and 204 are success; 409 (node unreachable) is an error with the reason.
        let router = axum::Router::new().route(
            "/api/cluster/members/{node}",
            axum::routing::delete(|Path(node): Path<String>| async move {
                match node.as_str() {
                    "draining" => (
                        AxumStatus::ACCEPTED,
                        axum::Json(serde_json::json!({
                            "node": node, "draining": true, "queues_remaining": 3
                        })),
                    )
                        .into_response(),
                    "removed" => AxumStatus::NO_CONTENT.into_response(),
                    _ => (
                        AxumStatus::CONFLICT,
                        axum::Json(serde_json::json!({
                            "error": "conflict", "reason": "node gone is unreachable"
                        })),
                    )
                        .into_response(),
                }
            }),
        );
        let base = serve(router).await;
        let client = BrokerClient::new(reqwest::Client::new(), &base, "u", "p");
        client
            .remove_member("draining")
            .await
            .expect("202: removal under way");
        client.remove_member("removed").await.expect("204: removed");
        let err = client.remove_member("gone").await.expect_err("409");
        assert_eq!(err.status(), Some(409));
        assert!(err.to_string().contains("unreachable"), "{err}");
    }

    #[tokio::test]
    async fn an_absent_broker_is_unreachable() {
        // Goal: a closed port gives Unreachable, not a hang or a panic.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let client = BrokerClient::new(reqwest::Client::new(), &format!("http://{addr}"), "u", "p");
        let err = client.cluster_status().await.expect_err("nobody listens");
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    }
}
