//! `GET|POST /api/definitions`: export and import of RabbitMQ's definitions
//! format (vhosts, users with password hashes and limits, permissions,
//! exchanges, queues, bindings, vhost limits as `vhost-limits` parameters).
//! Sections Synod does not implement are ignored and named in the answer.
//! Administrator only.
//! Must not: apply anything except through `Broker::execute`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::exchange::{Binding, Destination};
use crate::meta::{Command, ExchangeDef, QueueDef, UserLimit, VhostLimit};
use crate::mgmt::access::{HASHING_ALGORITHM, check_password_hash};
use crate::mgmt::api::{
    Definitions, DefinitionsBinding, DefinitionsImported, DefinitionsParameter, DefinitionsQueue,
    DefinitionsUser, DefinitionsVhost, DestinationType, ExchangeInfo, PermissionInfo,
};
use crate::mgmt::auth::Caller;
use crate::mgmt::convert::{arguments_to_table, table_to_arguments};
use crate::mgmt::topology::{exchange_kind, exchange_type};
use crate::mgmt::{AppState, Error, JsonBody};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/api/definitions", get(export).post(import))
}

async fn export(State(state): State<AppState>, caller: Caller) -> Result<Json<Definitions>, Error> {
    caller.require_administrator()?;
    let broker = &state.broker;
    let mut user_limits = broker.list_user_limits();
    let users = broker
        .list_users()
        .into_iter()
        .map(|u| DefinitionsUser {
            limits: limit_values(user_limits.remove(&u.name).unwrap_or_default(), |l| {
                l.name()
            }),
            name: u.name,
            password_hash: u.password_hash,
            hashing_algorithm: Some(HASHING_ALGORITHM.into()),
            tags: u.tags,
        })
        .collect();
    let parameters = broker
        .list_vhost_limits()
        .into_iter()
        .map(|(vhost, limits)| DefinitionsParameter {
            vhost,
            component: VHOST_LIMITS_COMPONENT.into(),
            name: "limits".into(),
            value: serde_json::json!(limit_values(limits, |l| l.name())),
        })
        .collect();
    let vhosts = broker
        .list_vhosts()
        .into_iter()
        .map(|name| DefinitionsVhost { name })
        .collect();
    let permissions = broker
        .list_permissions()
        .into_iter()
        .map(|(vhost, user, p)| PermissionInfo {
            user,
            vhost,
            configure: p.configure,
            write: p.write,
            read: p.read,
        })
        .collect();
    // Like RabbitMQ: built-in exchanges and exclusive queues are not exported.
    let exchanges = broker
        .list_exchanges()
        .into_iter()
        .filter(|(_, e)| !e.name.is_empty() && !e.name.starts_with("amq."))
        .map(|(vhost, def)| ExchangeInfo {
            arguments: table_to_arguments(&def.arguments),
            name: def.name,
            vhost,
            kind: exchange_type(def.kind),
            durable: def.durable,
            auto_delete: def.auto_delete,
            internal: def.internal,
        })
        .collect();
    let queues = broker
        .list_queues()
        .into_iter()
        .filter(|q| q.def.exclusive_owner.is_none())
        .map(|q| DefinitionsQueue {
            arguments: table_to_arguments(&q.def.arguments),
            name: q.def.name,
            vhost: q.vhost,
            durable: q.def.durable,
            auto_delete: q.def.auto_delete,
        })
        .collect();
    let mut bindings = Vec::new();
    for vhost in broker.list_vhosts() {
        for (source, binding) in broker.list_bindings(&vhost) {
            let (destination, destination_type) = match binding.destination {
                Destination::Queue(name) => (name, DestinationType::Queue),
                Destination::Exchange(name) => (name, DestinationType::Exchange),
            };
            bindings.push(DefinitionsBinding {
                source,
                vhost: vhost.clone(),
                destination,
                destination_type,
                routing_key: binding.routing_key,
                arguments: table_to_arguments(&binding.arguments),
            });
        }
    }
    Ok(Json(Definitions {
        rabbit_version: None,
        rabbitmq_version: None,
        product_name: Some("Synod".into()),
        product_version: Some(env!("CARGO_PKG_VERSION").into()),
        users,
        vhosts,
        permissions,
        exchanges,
        queues,
        bindings,
        parameters,
        other: BTreeMap::new(),
    }))
}

/// The runtime-parameter component RabbitMQ keeps vhost limits in.
const VHOST_LIMITS_COMPONENT: &str = "vhost-limits";

/// Limits by their management API names, as RabbitMQ exports them.
fn limit_values<L>(
    limits: BTreeMap<L, u64>,
    name: impl Fn(L) -> &'static str,
) -> BTreeMap<String, i64> {
    limits
        .into_iter()
        .map(|(limit, value)| {
            (
                name(limit).to_string(),
                i64::try_from(value).unwrap_or(i64::MAX),
            )
        })
        .collect()
}

/// A limit's bound from a definitions value: a negative one means none
/// (RabbitMQ's reading); anything but an integer is refused.
fn limit_bound(name: &str, value: &serde_json::Value) -> Result<Option<u64>, Error> {
    match value.as_i64() {
        Some(n) => Ok(u64::try_from(n).ok()),
        None => Err(Error::BadRequest(format!(
            "limit '{name}': {value} is not an integer"
        ))),
    }
}

/// Names the definitions entry an error came from, so the client can find it.
fn at(section: &str, index: usize, what: String) -> impl FnOnce(Error) -> Error {
    let section = section.to_string();
    move |err| Error::BadRequest(format!("{section}[{index}] ({what}): {err}"))
}

async fn import(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(definitions): JsonBody<Definitions>,
) -> Result<Json<DefinitionsImported>, Error> {
    caller.require_administrator()?;
    let broker = &state.broker;
    let Definitions {
        users,
        vhosts,
        permissions,
        exchanges,
        queues,
        bindings,
        parameters,
        mut other,
        ..
    } = definitions;
    // Check what can be checked up front, so that a bad hash or argument
    // deep in the file does not leave half an import behind.
    for (i, user) in users.iter().enumerate() {
        check_password_hash(&user.password_hash, user.hashing_algorithm.as_deref()).map_err(at(
            "users",
            i,
            format!("user '{}'", user.name),
        ))?;
    }
    let mut limit_commands = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let what = format!("user '{}'", user.name);
        for (name, value) in &user.limits {
            let command = UserLimit::parse(name)
                .map(|limit| Command::SetUserLimit {
                    user: user.name.clone(),
                    limit,
                    // A negative bound means none, as RabbitMQ reads it.
                    value: u64::try_from(*value).ok(),
                })
                .ok_or_else(|| Error::BadRequest(format!("'{name}' is not a user limit")));
            limit_commands.push((what.clone(), command.map_err(at("users", i, what.clone()))?));
        }
    }
    let mut ignored_parameters = Vec::new();
    for (i, parameter) in parameters.into_iter().enumerate() {
        if parameter.component != VHOST_LIMITS_COMPONENT {
            ignored_parameters.push(serde_json::json!(parameter));
            continue;
        }
        let what = format!("limits of vhost '{}'", parameter.vhost);
        let Some(values) = parameter.value.as_object() else {
            return Err(at("parameters", i, what)(Error::BadRequest(
                "value: not an object of limits".into(),
            )));
        };
        for (name, value) in values {
            let limit = VhostLimit::parse(name)
                .ok_or_else(|| Error::BadRequest(format!("'{name}' is not a vhost limit")));
            let command = limit.and_then(|limit| {
                Ok(Command::SetVhostLimit {
                    vhost: parameter.vhost.clone(),
                    limit,
                    value: limit_bound(name, value)?,
                })
            });
            limit_commands.push((
                what.clone(),
                command.map_err(at("parameters", i, what.clone()))?,
            ));
        }
    }
    if !ignored_parameters.is_empty() {
        other.insert(
            "parameters".into(),
            serde_json::Value::Array(ignored_parameters),
        );
    }
    let mut exchange_commands = Vec::new();
    for (i, e) in exchanges.iter().enumerate() {
        let what = format!("exchange '{}' in vhost '{}'", e.name, e.vhost);
        exchange_commands.push((
            what.clone(),
            Command::DeclareExchange {
                vhost: e.vhost.clone(),
                exchange: ExchangeDef {
                    name: e.name.clone(),
                    kind: exchange_kind(e.kind),
                    durable: e.durable,
                    auto_delete: e.auto_delete,
                    internal: e.internal,
                    arguments: arguments_to_table(&e.arguments).map_err(at(
                        "exchanges",
                        i,
                        what,
                    ))?,
                },
            },
        ));
    }
    let mut queue_commands = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let what = format!("queue '{}' in vhost '{}'", q.name, q.vhost);
        let arguments = arguments_to_table(&q.arguments).map_err(at("queues", i, what.clone()))?;
        queue_commands.push((
            what.clone(),
            Command::DeclareQueue {
                vhost: q.vhost.clone(),
                queue: QueueDef {
                    name: q.name.clone(),
                    durable: q.durable,
                    exclusive_owner: None,
                    auto_delete: q.auto_delete,
                    arguments: arguments.clone(),
                    home_node: broker.home_for(&arguments),
                },
            },
        ));
    }
    let mut binding_commands = Vec::new();
    for (i, b) in bindings.iter().enumerate() {
        let what = format!(
            "binding from '{}' to '{}' in vhost '{}'",
            b.source, b.destination, b.vhost
        );
        let destination = match b.destination_type {
            DestinationType::Queue => Destination::Queue(b.destination.clone()),
            DestinationType::Exchange => Destination::Exchange(b.destination.clone()),
        };
        binding_commands.push((
            what.clone(),
            Command::Bind {
                vhost: b.vhost.clone(),
                source: b.source.clone(),
                binding: Binding {
                    destination,
                    routing_key: b.routing_key.clone(),
                    arguments: arguments_to_table(&b.arguments).map_err(at("bindings", i, what))?,
                },
            },
        ));
    }

    // RabbitMQ's order: users, vhosts, permissions, then the topology.
    let mut sections: Vec<(&str, Vec<(String, Command)>)> = Vec::new();
    sections.push((
        "users",
        users
            .into_iter()
            .map(|u| {
                (
                    format!("user '{}'", u.name),
                    Command::PutUser {
                        name: u.name,
                        password_hash: u.password_hash,
                        tags: u.tags,
                    },
                )
            })
            .collect(),
    ));
    sections.push((
        "vhosts",
        vhosts
            .into_iter()
            .map(|v| {
                (
                    format!("vhost '{}'", v.name),
                    Command::AddVhost { name: v.name },
                )
            })
            .collect(),
    ));
    sections.push((
        "permissions",
        permissions
            .into_iter()
            .map(|p| {
                (
                    format!("permissions of '{}' in vhost '{}'", p.user, p.vhost),
                    Command::SetPermissions {
                        vhost: p.vhost,
                        user: p.user,
                        configure: p.configure,
                        write: p.write,
                        read: p.read,
                    },
                )
            })
            .collect(),
    ));
    sections.push(("exchanges", exchange_commands));
    sections.push(("queues", queue_commands));
    sections.push(("bindings", binding_commands));
    // Last, as in a snapshot: a queue limit must not refuse the queues
    // the same document declares.
    sections.push(("limits", limit_commands));

    let mut imported = BTreeMap::new();
    for (section, commands) in sections {
        let n_commands = commands.len() as u64;
        for (i, (what, command)) in commands.into_iter().enumerate() {
            broker
                .submit(command)
                .await
                .map_err(|err| at(section, i, what)(err.into()))?;
        }
        imported.insert(section.to_string(), n_commands);
    }
    let ignored: Vec<String> = other
        .iter()
        .filter(|(_, value)| !is_empty_section(value))
        .map(|(key, _)| format!("{key}: not supported by Synod, ignored"))
        .collect();
    for note in &ignored {
        tracing::info!("definitions import: {note}");
    }
    Ok(Json(DefinitionsImported { imported, ignored }))
}

/// Whether an unknown top-level value carries nothing (an empty list or
/// object, or null), so that ignoring it is not worth a note.
fn is_empty_section(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => true,
        serde_json::Value::Array(items) => items.is_empty(),
        serde_json::Value::Object(map) => map.is_empty(),
        _ => false,
    }
}
