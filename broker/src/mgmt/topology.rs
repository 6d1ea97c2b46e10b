//! Exchanges, queues and bindings: `/api/exchanges`, `/api/queues`,
//! `/api/bindings`. PUT/POST declare and DELETE deletes, all through
//! `Broker::submit(meta::Command)`; redeclaring equivalently is a no-op.
//! Must not: keep message counts of its own (they come from the queues).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::broker::{Access, QueueSummary};
use crate::exchange::{Binding, Destination, ExchangeKind};
use crate::meta::{Command, ExchangeDef, QueueDef};
use crate::mgmt::access::created_or_not;
use crate::mgmt::api::{
    BindingDeclare, BindingInfo, DestinationType, ExchangeDeclare, ExchangeInfo, ExchangeType,
    QueueDeclare, QueueInfo,
};
use crate::mgmt::auth::Caller;
use crate::mgmt::convert::{
    arguments_to_table, decode_segment, encode_segment, properties_key, table_to_arguments,
};
use crate::mgmt::{AppState, Error, JsonBody};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/exchanges", get(list_exchanges))
        .route("/api/exchanges/{vhost}", get(list_vhost_exchanges))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(get_exchange).put(put_exchange).delete(delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_source_bindings),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_destination_bindings),
        )
        .route("/api/queues", get(list_queues))
        .route("/api/queues/{vhost}", get(list_vhost_queues))
        .route(
            "/api/queues/{vhost}/{name}",
            get(get_queue).put(put_queue).delete(delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(list_bindings))
        .route("/api/bindings/{vhost}", get(list_vhost_bindings))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(list_pair_bindings).post(post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(get_binding).delete(delete_binding),
        )
}

pub(super) fn exchange_type(kind: ExchangeKind) -> ExchangeType {
    match kind {
        ExchangeKind::Direct => ExchangeType::Direct,
        ExchangeKind::Fanout => ExchangeType::Fanout,
        ExchangeKind::Topic => ExchangeType::Topic,
        ExchangeKind::Headers => ExchangeType::Headers,
    }
}

pub(super) fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

fn require_vhost(state: &AppState, caller: &Caller, vhost: &str) -> Result<(), Error> {
    caller.require_read_vhost(vhost)?;
    if state.broker.has_vhost(vhost) {
        Ok(())
    } else {
        Err(Error::NotFound(format!("no vhost '{vhost}'")))
    }
}

/// Names starting with `amq.` are reserved for the broker, as in AMQP.
fn refuse_reserved(what: &str, name: &str, vhost: &str) -> Result<(), Error> {
    if name.is_empty() || name.starts_with("amq.") {
        Err(Error::Forbidden(format!(
            "{what} name '{name}' in vhost '{vhost}' is reserved"
        )))
    } else {
        Ok(())
    }
}

// ----- exchanges -----

fn exchange_info(vhost: String, def: ExchangeDef) -> ExchangeInfo {
    ExchangeInfo {
        arguments: table_to_arguments(&def.arguments),
        name: def.name,
        vhost,
        kind: exchange_type(def.kind),
        durable: def.durable,
        auto_delete: def.auto_delete,
        internal: def.internal,
    }
}

fn exchanges_where(state: &AppState, keep: impl Fn(&str) -> bool) -> Vec<ExchangeInfo> {
    state
        .broker
        .list_exchanges()
        .into_iter()
        .filter(|(vhost, _)| keep(vhost))
        .map(|(vhost, def)| exchange_info(vhost, def))
        .collect()
}

async fn list_exchanges(State(state): State<AppState>, caller: Caller) -> Json<Vec<ExchangeInfo>> {
    Json(exchanges_where(&state, |v| caller.can_read_vhost(v)))
}

async fn list_vhost_exchanges(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Vec<ExchangeInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(exchanges_where(&state, |v| v == vhost)))
}

async fn get_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<ExchangeInfo>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    let def = state
        .broker
        .exchange(&vhost, &name)
        .ok_or_else(|| Error::NotFound(format!("no exchange '{name}' in vhost '{vhost}'")))?;
    Ok(Json(exchange_info(vhost, def)))
}

async fn put_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<ExchangeDeclare>,
) -> Result<StatusCode, Error> {
    caller.require_access(&vhost, Access::Configure, &name)?;
    if state.broker.exchange(&vhost, &name).is_none() {
        refuse_reserved("exchange", &name, &vhost)?;
    }
    let outcome = state
        .broker
        .submit(Command::DeclareExchange {
            vhost,
            exchange: ExchangeDef {
                name,
                kind: exchange_kind(body.kind),
                durable: body.durable,
                auto_delete: body.auto_delete,
                internal: body.internal,
                arguments: arguments_to_table(&body.arguments)?,
            },
        })
        .await?;
    Ok(created_or_not(outcome.created))
}

/// Query parameters of DELETE on exchanges and queues.
#[derive(Debug, Default, serde::Deserialize)]
struct DeleteOptions {
    #[serde(rename = "if-unused", default)]
    if_unused: bool,
    #[serde(rename = "if-empty", default)]
    if_empty: bool,
}

async fn delete_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(options): Query<DeleteOptions>,
) -> Result<StatusCode, Error> {
    caller.require_access(&vhost, Access::Configure, &name)?;
    refuse_reserved("exchange", &name, &vhost)?;
    state
        .broker
        .submit(Command::DeleteExchange {
            vhost,
            name,
            if_unused: options.if_unused,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- queues -----

fn queue_info(node: &str, summary: QueueSummary) -> QueueInfo {
    let counts = summary.counts;
    QueueInfo {
        arguments: table_to_arguments(&summary.def.arguments),
        exclusive: summary.def.exclusive_owner.is_some(),
        name: summary.def.name,
        vhost: summary.vhost,
        durable: summary.def.durable,
        auto_delete: summary.def.auto_delete,
        node: if summary.def.home_node.is_empty() {
            node.to_string()
        } else {
            summary.def.home_node
        },
        messages: counts.ready + counts.unacked,
        messages_ready: counts.ready,
        messages_unacknowledged: counts.unacked,
        consumers: counts.consumers,
        state: "running".into(),
    }
}

fn queues_where(state: &AppState, keep: impl Fn(&str) -> bool) -> Vec<QueueInfo> {
    let node = &state.broker.settings.node_name;
    state
        .broker
        .list_queues()
        .into_iter()
        .filter(|q| keep(&q.vhost))
        .map(|q| queue_info(node, q))
        .collect()
}

async fn list_queues(State(state): State<AppState>, caller: Caller) -> Json<Vec<QueueInfo>> {
    Json(queues_where(&state, |v| caller.can_read_vhost(v)))
}

async fn list_vhost_queues(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Vec<QueueInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(queues_where(&state, |v| v == vhost)))
}

fn find_queue(state: &AppState, vhost: &str, name: &str) -> Result<QueueInfo, Error> {
    let summary = match state.broker.queue(vhost, name) {
        Some(queue) => QueueSummary {
            vhost: queue.vhost.clone(),
            def: queue.def.clone(),
            counts: queue.counts(),
        },
        // Homed on another node: its counts are that node's to tell.
        None => QueueSummary {
            vhost: vhost.to_string(),
            def: state
                .broker
                .queue_def(vhost, name)
                .ok_or_else(|| Error::NotFound(format!("no queue '{name}' in vhost '{vhost}'")))?,
            counts: Default::default(),
        },
    };
    Ok(queue_info(&state.broker.settings.node_name, summary))
}

async fn get_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<QueueInfo>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(find_queue(&state, &vhost, &name)?))
}

async fn put_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<QueueDeclare>,
) -> Result<StatusCode, Error> {
    caller.require_access(&vhost, Access::Configure, &name)?;
    if state.broker.queue(&vhost, &name).is_none() {
        refuse_reserved("queue", &name, &vhost)?;
    }
    let arguments = arguments_to_table(&body.arguments)?;
    let home_node = match body.node {
        Some(node) if state.broker.is_member(&node) => node,
        Some(node) => {
            return Err(Error::BadRequest(format!(
                "node '{node}' is not a member of this cluster"
            )));
        }
        None => state.broker.home_for(&arguments),
    };
    let outcome = state
        .broker
        .submit(Command::DeclareQueue {
            vhost,
            queue: QueueDef {
                name,
                durable: body.durable,
                exclusive_owner: None,
                auto_delete: body.auto_delete,
                arguments,
                home_node,
            },
        })
        .await?;
    Ok(created_or_not(outcome.created))
}

async fn delete_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(options): Query<DeleteOptions>,
) -> Result<StatusCode, Error> {
    caller.require_access(&vhost, Access::Configure, &name)?;
    let info = find_queue(&state, &vhost, &name)?;
    if options.if_empty && info.messages > 0 {
        return Err(Error::Conflict(format!(
            "queue '{name}' in vhost '{vhost}' is not empty"
        )));
    }
    if options.if_unused && info.consumers > 0 {
        return Err(Error::Conflict(format!(
            "queue '{name}' in vhost '{vhost}' in use"
        )));
    }
    state
        .broker
        .submit(Command::DeleteQueue { vhost, name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- bindings -----

fn binding_info(vhost: &str, source: String, binding: Binding) -> BindingInfo {
    let (destination, destination_type) = match binding.destination {
        Destination::Queue(name) => (name, DestinationType::Queue),
        Destination::Exchange(name) => (name, DestinationType::Exchange),
    };
    let arguments = table_to_arguments(&binding.arguments);
    BindingInfo {
        properties_key: properties_key(&binding.routing_key, &arguments),
        source,
        vhost: vhost.to_string(),
        destination,
        destination_type,
        routing_key: binding.routing_key,
        arguments,
    }
}

/// A vhost's bindings as RabbitMQ lists them: first the implicit binding
/// of every queue to the default exchange, then the declared ones.
fn vhost_bindings(state: &AppState, vhost: &str) -> Vec<BindingInfo> {
    let mut out: Vec<BindingInfo> = state
        .broker
        .list_queues()
        .into_iter()
        .filter(|q| q.vhost == vhost)
        .map(|q| {
            let name = q.def.name;
            binding_info(
                vhost,
                String::new(),
                Binding {
                    routing_key: name.clone(),
                    destination: Destination::Queue(name),
                    arguments: Default::default(),
                },
            )
        })
        .collect();
    out.extend(
        state
            .broker
            .list_bindings(vhost)
            .into_iter()
            .map(|(source, binding)| binding_info(vhost, source, binding)),
    );
    out
}

async fn list_bindings(State(state): State<AppState>, caller: Caller) -> Json<Vec<BindingInfo>> {
    let mut out = Vec::new();
    for vhost in state.broker.list_vhosts() {
        if caller.can_read_vhost(&vhost) {
            out.extend(vhost_bindings(&state, &vhost));
        }
    }
    Json(out)
}

async fn list_vhost_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Vec<BindingInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(vhost_bindings(&state, &vhost)))
}

async fn exchange_source_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Vec<BindingInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    state
        .broker
        .exchange(&vhost, &name)
        .ok_or_else(|| Error::NotFound(format!("no exchange '{name}' in vhost '{vhost}'")))?;
    let mut list = vhost_bindings(&state, &vhost);
    list.retain(|b| b.source == name);
    Ok(Json(list))
}

async fn exchange_destination_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Vec<BindingInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    state
        .broker
        .exchange(&vhost, &name)
        .ok_or_else(|| Error::NotFound(format!("no exchange '{name}' in vhost '{vhost}'")))?;
    let mut list = vhost_bindings(&state, &vhost);
    list.retain(|b| b.destination_type == DestinationType::Exchange && b.destination == name);
    Ok(Json(list))
}

async fn queue_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Vec<BindingInfo>>, Error> {
    require_vhost(&state, &caller, &vhost)?;
    find_queue(&state, &vhost, &name)?;
    let mut list = vhost_bindings(&state, &vhost);
    list.retain(|b| b.destination_type == DestinationType::Queue && b.destination == name);
    Ok(Json(list))
}

fn destination_type(segment: &str) -> Result<DestinationType, Error> {
    match segment {
        "q" => Ok(DestinationType::Queue),
        "e" => Ok(DestinationType::Exchange),
        _ => Err(Error::NotFound(format!(
            "destination type '{segment}' is neither 'q' nor 'e'"
        ))),
    }
}

fn pair_bindings(
    state: &AppState,
    vhost: &str,
    source: &str,
    kind: DestinationType,
    destination: &str,
) -> Vec<BindingInfo> {
    let mut list = vhost_bindings(state, vhost);
    list.retain(|b| {
        b.source == source && b.destination_type == kind && b.destination == destination
    });
    list
}

async fn list_pair_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
) -> Result<Json<Vec<BindingInfo>>, Error> {
    let kind = destination_type(&kind)?;
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(pair_bindings(
        &state,
        &vhost,
        &source,
        kind,
        &destination,
    )))
}

fn destination(kind: DestinationType, name: String) -> Destination {
    match kind {
        DestinationType::Queue => Destination::Queue(name),
        DestinationType::Exchange => Destination::Exchange(name),
    }
}

async fn post_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, dest)): Path<(String, String, String, String)>,
    JsonBody(body): JsonBody<BindingDeclare>,
) -> Result<Response, Error> {
    let kind = destination_type(&kind)?;
    // As AMQP's queue.bind: write on the destination, read on the source.
    caller.require_access(&vhost, Access::Write, &dest)?;
    caller.require_access(&vhost, Access::Read, &source)?;
    let key = properties_key(&body.routing_key, &body.arguments);
    let location = format!(
        "/api/bindings/{}/e/{}/{}/{}/{}",
        encode_segment(&vhost),
        encode_segment(&source),
        kind.path_segment(),
        encode_segment(&dest),
        key
    );
    state
        .broker
        .submit(Command::Bind {
            vhost,
            source,
            binding: Binding {
                destination: destination(kind, dest),
                routing_key: body.routing_key,
                arguments: arguments_to_table(&body.arguments)?,
            },
        })
        .await?;
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

fn find_binding(
    state: &AppState,
    vhost: &str,
    source: &str,
    kind: DestinationType,
    dest: &str,
    props: &str,
) -> Result<BindingInfo, Error> {
    // The router hands `{props}` over decoded; compare decoded forms.
    pair_bindings(state, vhost, source, kind, dest)
        .into_iter()
        .find(|b| decode_segment(&b.properties_key) == props)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no binding '{props}' from '{source}' to '{dest}' in vhost '{vhost}'"
            ))
        })
}

async fn get_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> Result<Json<BindingInfo>, Error> {
    let kind = destination_type(&kind)?;
    require_vhost(&state, &caller, &vhost)?;
    Ok(Json(find_binding(
        &state, &vhost, &source, kind, &dest, &props,
    )?))
}

async fn delete_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, Error> {
    let kind = destination_type(&kind)?;
    caller.require_access(&vhost, Access::Write, &dest)?;
    caller.require_access(&vhost, Access::Read, &source)?;
    find_binding(&state, &vhost, &source, kind, &dest, &props)?;
    // Unbind with the declared binding itself, so that argument types
    // (which JSON does not keep) match exactly.
    let wanted = destination(kind, dest);
    let binding = state
        .broker
        .list_bindings(&vhost)
        .into_iter()
        .filter(|(s, b)| *s == source && b.destination == wanted)
        .map(|(_, b)| b)
        .find(|b| {
            let key = properties_key(&b.routing_key, &table_to_arguments(&b.arguments));
            decode_segment(&key) == props
        })
        .ok_or_else(|| {
            Error::Forbidden(format!(
                "the default exchange's binding to '{}' cannot be removed",
                wanted.name()
            ))
        })?;
    state
        .broker
        .submit(Command::Unbind {
            vhost,
            source,
            binding,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
