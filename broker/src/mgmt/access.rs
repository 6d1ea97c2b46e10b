//! Vhosts, users and permissions: `/api/vhosts`, `/api/users`,
//! `/api/permissions`. Changes are administrator-only and go through
//! `Broker::execute`.
//! Must not: store passwords in clear (only `auth` hashes), or bypass
//! `meta::Command`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;

use crate::auth;
use crate::meta::{Command, MetaError, User};
use crate::mgmt::api::{
    PermissionDeclare, PermissionInfo, UserDeclare, UserInfo, VhostDeclare, VhostInfo, split_tags,
};
use crate::mgmt::auth::Caller;
use crate::mgmt::{AppState, Error, JsonBody};

/// The only password hashing algorithm the broker stores.
pub(super) const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/vhosts", get(list_vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(get_vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/users", get(list_users))
        .route(
            "/api/users/{name}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{name}/permissions", get(user_permissions))
        .route("/api/whoami", get(whoami))
        .route("/api/permissions", get(list_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(get_permission)
                .put(put_permission)
                .delete(delete_permission),
        )
}

/// 201 when the command created the object, 204 when it already existed.
pub(super) fn created_or_not(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
}

fn vhost_info(name: String) -> VhostInfo {
    VhostInfo {
        name,
        description: String::new(),
        tags: Vec::new(),
    }
}

async fn list_vhosts(State(state): State<AppState>, caller: Caller) -> Json<Vec<VhostInfo>> {
    Json(
        state
            .broker
            .list_vhosts()
            .into_iter()
            .filter(|v| caller.can_read_vhost(v))
            .map(vhost_info)
            .collect(),
    )
}

async fn get_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<VhostInfo>, Error> {
    caller.require_read_vhost(&vhost)?;
    if state.broker.has_vhost(&vhost) {
        Ok(Json(vhost_info(vhost)))
    } else {
        Err(Error::NotFound(format!("no vhost '{vhost}'")))
    }
}

async fn put_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    JsonBody(_body): JsonBody<VhostDeclare>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    if vhost.is_empty() {
        return Err(Error::BadRequest("vhost name must not be empty".into()));
    }
    let outcome = state
        .broker
        .submit(Command::AddVhost {
            name: vhost.clone(),
        })
        .await?;
    if outcome.created {
        // As RabbitMQ does: the user who creates a vhost may use it.
        state
            .broker
            .submit(Command::SetPermissions {
                vhost,
                user: caller.name.clone(),
                configure: ".*".into(),
                write: ".*".into(),
                read: ".*".into(),
            })
            .await?;
    }
    Ok(created_or_not(outcome.created))
}

async fn delete_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    state
        .broker
        .submit(Command::DeleteVhost { name: vhost })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn user_info(user: User) -> UserInfo {
    UserInfo {
        name: user.name,
        tags: user.tags,
        password_hash: user.password_hash,
        hashing_algorithm: HASHING_ALGORITHM.into(),
    }
}

async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<UserInfo>>, Error> {
    caller.require_administrator()?;
    Ok(Json(
        state
            .broker
            .list_users()
            .into_iter()
            .map(user_info)
            .collect(),
    ))
}

async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<UserInfo>, Error> {
    caller.require_administrator()?;
    state
        .broker
        .list_users()
        .into_iter()
        .find(|u| u.name == name)
        .map(|u| Json(user_info(u)))
        .ok_or_else(|| Error::NotFound(format!("no user '{name}'")))
}

/// Checks an imported hash: the algorithm must be the one the broker
/// verifies, and the hash must decode to salt + SHA-256 (or be empty,
/// which disables password login as in RabbitMQ).
pub(super) fn check_password_hash(hash: &str, algorithm: Option<&str>) -> Result<(), Error> {
    if let Some(algorithm) = algorithm
        && algorithm != HASHING_ALGORITHM
    {
        return Err(Error::BadRequest(format!(
            "field 'hashing_algorithm': '{algorithm}' is not supported; use '{HASHING_ALGORITHM}'"
        )));
    }
    if hash.is_empty() {
        return Ok(());
    }
    let valid = base64::engine::general_purpose::STANDARD
        .decode(hash)
        .is_ok_and(|bytes| bytes.len() == 4 + 32);
    if valid {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "field 'password_hash': not a base64 salted SHA-256 hash".into(),
        ))
    }
}

async fn put_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<UserDeclare>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    if name.is_empty() {
        return Err(Error::BadRequest("user name must not be empty".into()));
    }
    let existing = state
        .broker
        .list_users()
        .into_iter()
        .find(|u| u.name == name);
    let password_hash = match (body.password, body.password_hash) {
        (Some(_), Some(_)) => {
            return Err(Error::BadRequest(
                "field 'password': give either password or password_hash, not both".into(),
            ));
        }
        (Some(password), None) => auth::hash_password(&password),
        (None, Some(hash)) => {
            check_password_hash(&hash, body.hashing_algorithm.as_deref())?;
            hash
        }
        // Updating only the tags keeps the password.
        (None, None) => match &existing {
            Some(user) => user.password_hash.clone(),
            None => {
                return Err(Error::BadRequest(
                    "field 'password': password or password_hash is required".into(),
                ));
            }
        },
    };
    let outcome = state
        .broker
        .submit(Command::PutUser {
            name,
            password_hash,
            tags: split_tags(&body.tags),
        })
        .await?;
    Ok(created_or_not(outcome.created))
}

async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    state.broker.submit(Command::DeleteUser { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn whoami(caller: Caller, State(state): State<AppState>) -> Json<UserInfo> {
    let tags = state
        .broker
        .list_users()
        .into_iter()
        .find(|u| u.name == caller.name)
        .map(|u| u.tags)
        .unwrap_or_default();
    Json(UserInfo {
        name: caller.name.clone(),
        tags,
        password_hash: String::new(),
        hashing_algorithm: String::new(),
    })
}

fn permissions_where(state: &AppState, keep: impl Fn(&str, &str) -> bool) -> Vec<PermissionInfo> {
    state
        .broker
        .list_permissions()
        .into_iter()
        .filter(|(vhost, user, _)| keep(vhost, user))
        .map(|(vhost, user, p)| PermissionInfo {
            user,
            vhost,
            configure: p.configure,
            write: p.write,
            read: p.read,
        })
        .collect()
}

async fn list_permissions(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<PermissionInfo>>, Error> {
    caller.require_administrator()?;
    Ok(Json(permissions_where(&state, |_, _| true)))
}

async fn vhost_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Vec<PermissionInfo>>, Error> {
    caller.require_administrator()?;
    if !state.broker.has_vhost(&vhost) {
        return Err(Error::NotFound(format!("no vhost '{vhost}'")));
    }
    Ok(Json(permissions_where(&state, |v, _| v == vhost)))
}

async fn user_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Vec<PermissionInfo>>, Error> {
    caller.require_administrator()?;
    if !state.broker.list_users().iter().any(|u| u.name == name) {
        return Err(Error::NotFound(format!("no user '{name}'")));
    }
    Ok(Json(permissions_where(&state, |_, u| u == name)))
}

async fn get_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Json<PermissionInfo>, Error> {
    caller.require_administrator()?;
    permissions_where(&state, |v, u| v == vhost && u == user)
        .into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no permissions for user '{user}' in vhost '{vhost}'"
            ))
        })
}

async fn put_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    JsonBody(body): JsonBody<PermissionDeclare>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    let existed = state
        .broker
        .list_permissions()
        .iter()
        .any(|(v, u, _)| *v == vhost && *u == user);
    state
        .broker
        .submit(Command::SetPermissions {
            vhost,
            user,
            configure: body.configure,
            write: body.write,
            read: body.read,
        })
        .await
        .map_err(|err| match err {
            // A permission needs both ends; RabbitMQ answers 400 here.
            MetaError::NotFound(reason) | MetaError::Invalid(reason) => Error::BadRequest(reason),
            other => other.into(),
        })?;
    Ok(created_or_not(!existed))
}

async fn delete_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<StatusCode, Error> {
    caller.require_administrator()?;
    let existed = state
        .broker
        .list_permissions()
        .iter()
        .any(|(v, u, _)| *v == vhost && *u == user);
    if !existed {
        return Err(Error::NotFound(format!(
            "no permissions for user '{user}' in vhost '{vhost}'"
        )));
    }
    state
        .broker
        .submit(Command::ClearPermissions { vhost, user })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
