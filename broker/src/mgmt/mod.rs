//! Management HTTP API (RabbitMQ-compatible paths and JSON shapes) and the
//! Prometheus `/metrics` endpoint, each served by axum on its own listener.
//!
//! Must not: change topology except through `Broker::submit(meta::Command)`
//! (the path AMQP uses, which the cluster will route through Paxos), or
//! keep counts of its own: every number comes from the broker's queues and
//! its one metrics registry.
//!
//! Map: [`api`] request/response types (shared with the operator);
//! `error` the one error enum and its status mapping; `auth` basic auth
//! and tags; `convert` JSON <-> AMQP tables, path encoding, body parsing;
//! `status` overview, nodes, connections, channels, health, cluster;
//! `access` vhosts, users, permissions; `resource_limits` user and vhost limits;
//! `topology` exchanges, queues,
//! bindings; `definitions` import/export; [`cluster`] the cluster view.

mod access;
pub mod api;
mod auth;
pub mod cluster;
mod convert;
mod definitions;
mod error;
mod resource_limits;
mod status;
mod topology;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::broker::Broker;
use crate::limits;

pub use error::Error;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The node's broker.
    pub broker: Arc<Broker>,
    /// When the API started serving (for `uptime`).
    pub started: Instant,
}

/// A JSON request body, parsed so that errors name the field; bodies over
/// `limits::HTTP_BODY_SIZE_MAX` are refused with 413.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Error::PayloadTooLarge(format!(
                        "request body larger than {} bytes",
                        limits::HTTP_BODY_SIZE_MAX
                    ))
                } else {
                    Error::BadRequest(rejection.body_text())
                }
            })?;
        Ok(JsonBody(convert::parse_body(&bytes)?))
    }
}

/// The management API's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    let state = AppState {
        broker,
        started: Instant::now(),
    };
    Router::new()
        .merge(status::routes())
        .merge(access::routes())
        .merge(resource_limits::routes())
        .merge(topology::routes())
        .merge(definitions::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(
            limits::HTTP_BODY_SIZE_MAX,
        ))
        .with_state(state)
}

async fn not_found() -> Error {
    Error::NotFound("no such path".into())
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed("method not allowed on this path".into())
}

/// The `/metrics` endpoint's routes: the registry in Prometheus text format.
pub fn metrics_router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(broker)
}

async fn scrape(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    // Encoding walks every series; keep it off the async workers so a slow
    // scrape of many queues cannot stall AMQP connections.
    let text = tokio::task::spawn_blocking(move || broker.metrics.encode()).await;
    match text {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "metrics encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves `router` on `listener` (HTTP or HTTPS) until `shutdown` turns true.
pub async fn serve(
    listener: crate::tls::HttpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    // The no-op tap gives axum a listener type whose peer address it can
    // hand to handlers as `ConnectInfo<SocketAddr>`.
    let listener = listener.tap_io(|_| {});
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let stop = async move {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(err) = axum::serve(listener, service)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(%err, "HTTP listener failed");
    }
}
