//! Read-mostly status routes: overview, nodes, connections (and closing
//! one), channels, the alarms health check and the cluster view.
//! Must not: count anything itself; numbers come from the metrics registry
//! and the broker's registries.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::broker::ConnectionHandle;
use crate::mgmt::api::{
    ChannelInfo, ConnectionDetails, ConnectionInfo, HealthCheck, MemberAdd, MessageStats, NodeInfo,
    ObjectTotals, Overview, QueueTotals,
};
use crate::mgmt::auth::Caller;
use crate::mgmt::{AppState, Error, JsonBody, cluster};

/// Version of the management API shape this module follows.
const MANAGEMENT_VERSION: &str = "3.13.0";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{name}", get(node))
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{name}",
            get(connection).delete(close_connection),
        )
        .route("/api/channels", get(channels))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/cluster", get(cluster_status))
        .route("/api/cluster/ready", get(cluster_ready))
        .route("/api/cluster/members", post(add_member))
        .route("/api/cluster/members/{node}", delete(remove_member))
}

fn gauge(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

async fn overview(State(state): State<AppState>, caller: Caller) -> Json<Overview> {
    let broker = &state.broker;
    let metrics = &broker.metrics;
    let mut queue_totals = QueueTotals::default();
    for queue in broker.list_queues() {
        if caller.can_read_vhost(&queue.vhost) {
            queue_totals.messages_ready += queue.counts.ready;
            queue_totals.messages_unacknowledged += queue.counts.unacked;
        }
    }
    queue_totals.messages = queue_totals.messages_ready + queue_totals.messages_unacknowledged;
    let exchanges = broker
        .list_exchanges()
        .iter()
        .filter(|(vhost, _)| caller.can_read_vhost(vhost))
        .count() as u64;
    Json(Overview {
        management_version: MANAGEMENT_VERSION.into(),
        product_name: "Synod".into(),
        product_version: env!("CARGO_PKG_VERSION").into(),
        cluster_name: broker.settings.cluster_name.clone(),
        node: broker.settings.node_name.clone(),
        object_totals: ObjectTotals {
            connections: gauge(metrics.connections.get()),
            channels: gauge(metrics.channels.get()),
            exchanges,
            queues: gauge(metrics.queues.get()),
            consumers: gauge(metrics.consumers.get()),
        },
        queue_totals,
        message_stats: MessageStats {
            publish: metrics.messages_published_total.get(),
            confirm: metrics.messages_confirmed_total.get(),
            deliver_get: metrics.messages_delivered_total.get(),
            ack: metrics.messages_acknowledged_total.get(),
            redeliver: metrics.messages_redelivered_total.get(),
            return_unroutable: metrics.messages_unroutable_returned_total.get(),
            drop_unroutable: metrics.messages_unroutable_dropped_total.get(),
        },
    })
}

fn this_node(state: &AppState) -> NodeInfo {
    let broker = &state.broker;
    NodeInfo {
        name: broker.settings.node_name.clone(),
        kind: "disc".into(),
        running: true,
        mem_used: crate::metrics::resident_memory_bytes()
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(0),
        mem_limit: broker.memory_high_watermark_bytes(),
        mem_alarm: broker.metrics.memory_alarm.get() == 1,
        disk_free_alarm: broker.metrics.disk_alarm.get() == 1,
        disk_free_limit: broker.disk_free_limit_bytes(),
        disk_free: crate::resources::disk_free_bytes(&broker.settings.data_dir).unwrap_or(0),
        uptime: u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

async fn nodes(State(state): State<AppState>, _caller: Caller) -> Json<Vec<NodeInfo>> {
    Json(vec![this_node(&state)])
}

async fn node(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeInfo>, Error> {
    let node = this_node(&state);
    if node.name == name {
        Ok(Json(node))
    } else {
        Err(Error::NotFound(format!("no node '{name}'")))
    }
}

fn connection_info(node: &str, handle: &ConnectionHandle) -> ConnectionInfo {
    let channels = handle
        .channels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len() as u64;
    ConnectionInfo {
        name: handle.name.clone(),
        node: node.to_string(),
        user: handle.user.clone(),
        vhost: handle.vhost.clone(),
        peer_host: handle.peer.ip().to_string(),
        peer_port: handle.peer.port(),
        connected_at: handle.connected_at_s.saturating_mul(1000),
        channels,
        state: "running".into(),
        protocol: "AMQP 0-9-1".into(),
    }
}

/// Whether `caller` may see (and close) a connection: everything for
/// administrators and monitoring users, their own for others.
fn visible(caller: &Caller, handle: &ConnectionHandle) -> bool {
    caller.sees_everything() || handle.user == caller.name
}

async fn connections(State(state): State<AppState>, caller: Caller) -> Json<Vec<ConnectionInfo>> {
    let node = &state.broker.settings.node_name;
    let mut list: Vec<ConnectionInfo> = state
        .broker
        .list_connections()
        .iter()
        .filter(|h| visible(&caller, h))
        .map(|h| connection_info(node, h))
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Json(list)
}

async fn connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ConnectionInfo>, Error> {
    state
        .broker
        .list_connections()
        .iter()
        .find(|h| h.name == name && visible(&caller, h))
        .map(|h| Json(connection_info(&state.broker.settings.node_name, h)))
        .ok_or_else(|| Error::NotFound(format!("no connection '{name}'")))
}

async fn close_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Error> {
    let handle = state
        .broker
        .list_connections()
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| Error::NotFound(format!("no connection '{name}'")))?;
    // Monitoring users see every connection but may close none.
    if !(caller.is_administrator() || handle.user == caller.name) {
        return Err(Error::Forbidden(format!(
            "user '{}' may not close connection '{name}'",
            caller.name
        )));
    }
    if state
        .broker
        .close_connection(&name, "Closed via management API")
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("no connection '{name}'")))
    }
}

async fn channels(State(state): State<AppState>, caller: Caller) -> Json<Vec<ChannelInfo>> {
    let node = &state.broker.settings.node_name;
    let connections = state.broker.list_connections();
    let list = state
        .broker
        .list_channels()
        .into_iter()
        .filter(|c| caller.sees_everything() || c.user == caller.name)
        .map(|c| {
            let peer = connections
                .iter()
                .find(|h| h.name == c.connection)
                .map(|h| h.peer);
            ChannelInfo {
                name: c.name,
                node: node.clone(),
                number: c.number,
                user: c.user,
                vhost: c.vhost,
                consumer_count: u64::from(c.consumers),
                messages_unacknowledged: u64::from(c.unacked),
                prefetch_count: u64::from(c.prefetch),
                confirm: c.confirm,
                transactional: c.transactional,
                state: "running".into(),
                connection_details: ConnectionDetails {
                    name: c.connection,
                    peer_host: peer.map(|p| p.ip().to_string()).unwrap_or_default(),
                    peer_port: peer.map(|p| p.port()).unwrap_or(0),
                },
            }
        })
        .collect();
    Json(list)
}

async fn alarms(State(state): State<AppState>, _caller: Caller) -> Response {
    let metrics = &state.broker.metrics;
    let mut raised = Vec::new();
    if metrics.memory_alarm.get() == 1 {
        raised.push("memory".to_string());
    }
    if metrics.disk_alarm.get() == 1 {
        raised.push("disk".to_string());
    }
    if raised.is_empty() {
        let ok = HealthCheck {
            status: "ok".into(),
            reason: None,
            alarms: Vec::new(),
        };
        (StatusCode::OK, Json(ok)).into_response()
    } else {
        let failed = HealthCheck {
            status: "failed".into(),
            reason: Some(format!(
                "resource alarm(s) in effect: {}",
                raised.join(", ")
            )),
            alarms: raised,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(failed)).into_response()
    }
}

async fn cluster_status(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<crate::mgmt::api::ClusterView> {
    Json(cluster::view(&state.broker))
}

/// Unauthenticated on purpose: Kubernetes readiness probes send no
/// credentials, and the answer reveals nothing but readiness.
async fn cluster_ready(State(state): State<AppState>) -> Response {
    if cluster::is_ready(&state.broker) {
        let ok = HealthCheck {
            status: "ok".into(),
            reason: None,
            alarms: Vec::new(),
        };
        (StatusCode::OK, Json(ok)).into_response()
    } else {
        Error::Unavailable("not a caught-up member of the agreed configuration".into())
            .into_response()
    }
}

/// Administrators only. The node must be running with this cluster in its
/// seed list (`address` is where it listens; the seed list, not this
/// request, tells the cluster how to reach it). 201 once it votes.
async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<MemberAdd>,
) -> Result<Response, Error> {
    caller.require_administrator()?;
    if body.name.is_empty() {
        return Err(Error::BadRequest("name: must not be empty".into()));
    }
    cluster::add_member(&state.broker, &body.name).await?;
    Ok((StatusCode::CREATED, Json(cluster::view(&state.broker))).into_response())
}

/// Query parameters of `DELETE /api/cluster/members/{node}`.
#[derive(Debug, Default, serde::Deserialize)]
struct RemoveOptions {
    /// Remove an unreachable node even though its queues' messages are lost.
    #[serde(default)]
    force: bool,
}

/// Administrators only. Moves the node's queues away first: `202 Accepted`
/// with `{"node", "draining": true, "queues_remaining"}` while they move
/// (repeat the request), 204 once the node is not a member; 409 when the
/// node is unreachable and still the home of queues (unless `?force=true`,
/// which re-homes them empty). See `mgmt::cluster::remove_member`.
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(node): Path<String>,
    Query(options): Query<RemoveOptions>,
) -> Result<Response, Error> {
    caller.require_administrator()?;
    match cluster::remove_member(&state.broker, &node, options.force).await? {
        cluster::Removal::Removed => Ok(StatusCode::NO_CONTENT.into_response()),
        cluster::Removal::Draining(report) => {
            Ok((StatusCode::ACCEPTED, Json(report)).into_response())
        }
    }
}
