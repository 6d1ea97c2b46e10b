//! User and vhost limits: `/api/user-limits` and `/api/vhost-limits`, with
//! RabbitMQ's paths and JSON shapes. Administrator-only; every change is a
//! `meta::Command` through `Broker::submit`, so a cluster agrees on it.
//! Must not: enforce the limits (the connections and `meta` do).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};

use crate::meta::{Command, UserLimit, VhostLimit};
use crate::mgmt::api::{LimitValue, UserLimitsInfo, VhostLimitsInfo};
use crate::mgmt::auth::Caller;
use crate::mgmt::{AppState, Error, JsonBody};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/user-limits", get(list_user_limits))
        .route("/api/user-limits/{user}", get(get_user_limits))
        .route(
            "/api/user-limits/{user}/{name}",
            put(put_user_limit).delete(delete_user_limit),
        )
        .route("/api/vhost-limits", get(list_vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(get_vhost_limits))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            put(put_vhost_limit).delete(delete_vhost_limit),
        )
}

fn user_limit(name: &str) -> Result<UserLimit, Error> {
    UserLimit::parse(name).ok_or_else(|| {
        Error::BadRequest(format!(
            "'{name}' is not a user limit; use max-connections or max-channels"
        ))
    })
}

fn vhost_limit(name: &str) -> Result<VhostLimit, Error> {
    VhostLimit::parse(name).ok_or_else(|| {
        Error::BadRequest(format!(
            "'{name}' is not a vhost limit; use max-connections or max-queues"
        ))
    })
}

/// A negative value clears the limit, as RabbitMQ reads it.
fn bound(body: LimitValue) -> Option<u64> {
    u64::try_from(body.value).ok()
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn user_limits_where(state: &AppState, keep: impl Fn(&str) -> bool) -> Vec<UserLimitsInfo> {
    state
        .broker
        .list_user_limits()
        .into_iter()
        .filter(|(user, _)| keep(user))
        .map(|(user, limits)| UserLimitsInfo {
            user,
            value: limits
                .into_iter()
                .map(|(limit, value)| (limit.name().to_string(), clamp(value)))
                .collect(),
        })
        .collect()
}

fn vhost_limits_where(state: &AppState, keep: impl Fn(&str) -> bool) -> Vec<VhostLimitsInfo> {
    state
        .broker
        .list_vhost_limits()
        .into_iter()
        .filter(|(vhost, _)| keep(vhost))
        .map(|(vhost, limits)| VhostLimitsInfo {
            vhost,
            value: limits
                .into_iter()
                .map(|(limit, value)| (limit.name().to_string(), clamp(value)))
                .collect(),
        })
        .collect()
}

async fn list_user_limits(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<UserLimitsInfo>>, Error> {
    caller.require_administrator()?;
    Ok(Json(user_limits_where(&state, |_| true)))
}

async fn get_user_limits(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<Vec<UserLimitsInfo>>, Error> {
    caller.require_administrator()?;
    if !state.broker.list_users().iter().any(|u| u.name == user) {
        return Err(Error::NotFound(format!("no user '{user}'")));
    }
    Ok(Json(user_limits_where(&state, |u| u == user)))
}

async fn put_user_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<LimitValue>,
) -> Result<StatusCode, Error> {
    set_user_limit(&state, &caller, user, &name, bound(body)).await
}

async fn delete_user_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    set_user_limit(&state, &caller, user, &name, None).await
}

/// Sets (`Some`) or clears (`None`) the user limit called `name`.
async fn set_user_limit(
    state: &AppState,
    caller: &Caller,
    user: String,
    name: &str,
    value: Option<u64>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    let limit = user_limit(name)?;
    state
        .broker
        .submit(Command::SetUserLimit { user, limit, value })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_vhost_limits(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<VhostLimitsInfo>>, Error> {
    caller.require_administrator()?;
    Ok(Json(vhost_limits_where(&state, |_| true)))
}

async fn get_vhost_limits(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Vec<VhostLimitsInfo>>, Error> {
    caller.require_administrator()?;
    if !state.broker.has_vhost(&vhost) {
        return Err(Error::NotFound(format!("no vhost '{vhost}'")));
    }
    Ok(Json(vhost_limits_where(&state, |v| v == vhost)))
}

async fn put_vhost_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<LimitValue>,
) -> Result<StatusCode, Error> {
    set_vhost_limit(&state, &caller, vhost, &name, bound(body)).await
}

async fn delete_vhost_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    set_vhost_limit(&state, &caller, vhost, &name, None).await
}

/// Sets (`Some`) or clears (`None`) the vhost limit called `name`.
async fn set_vhost_limit(
    state: &AppState,
    caller: &Caller,
    vhost: String,
    name: &str,
    value: Option<u64>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    let limit = vhost_limit(name)?;
    state
        .broker
        .submit(Command::SetVhostLimit {
            vhost,
            limit,
            value,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
