//! HTTP basic authentication against the broker's users, and what each
//! user tag may do. Must not: change any state (it only reads users and
//! permissions through the `Broker` facade).
//!
//! Tags, as in RabbitMQ: `administrator` may do everything; `monitoring`
//! may read everything and change nothing; `management` (and
//! `policymaker`) may read, and change topology, where the user's vhost
//! permissions allow. A user with none of these tags is refused (403).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;

use crate::broker::{Access, Broker};
use crate::mgmt::{AppState, Error};

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User name.
    pub name: String,
    administrator: bool,
    monitoring: bool,
    management: bool,
    broker: Arc<Broker>,
}

impl Caller {
    /// Whether the user has the `administrator` tag.
    pub fn is_administrator(&self) -> bool {
        self.administrator
    }

    /// Refuses unless the user is an administrator.
    pub fn require_administrator(&self) -> Result<(), Error> {
        if self.administrator {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "user '{}' is not an administrator",
                self.name
            )))
        }
    }

    /// Whether the user may see everything (administrator or monitoring).
    pub fn sees_everything(&self) -> bool {
        self.administrator || self.monitoring
    }

    /// Whether the user may see objects of `vhost`.
    pub fn can_read_vhost(&self, vhost: &str) -> bool {
        self.sees_everything() || self.broker.permissions(vhost, &self.name).is_some()
    }

    /// Refuses unless the user may see `vhost` (404 for the vhost itself
    /// would leak its existence, so this is a 403 like RabbitMQ's).
    pub fn require_read_vhost(&self, vhost: &str) -> Result<(), Error> {
        if self.can_read_vhost(vhost) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "user '{}' has no access to vhost '{vhost}'",
                self.name
            )))
        }
    }

    /// Refuses unless the user may do `access` on `resource` in `vhost`
    /// through the API: administrators always; management users by their
    /// vhost permissions; monitoring users never (they only read).
    pub fn require_access(&self, vhost: &str, access: Access, resource: &str) -> Result<(), Error> {
        if self.administrator {
            return Ok(());
        }
        let allowed = self.management
            && !self.monitoring
            && self
                .broker
                .permissions(vhost, &self.name)
                .is_some_and(|p| p.allows(access, resource));
        if allowed {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "user '{}' may not {} '{resource}' in vhost '{vhost}'",
                self.name,
                match access {
                    Access::Configure => "configure",
                    Access::Write => "write to",
                    Access::Read => "read from",
                }
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(Error::Unauthorized("credentials required".into()));
        };
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr);
        // An address that keeps failing waits for every answer (see
        // `login_throttle`); other addresses are not affected.
        if let Some(peer) = peer {
            let delay = state
                .broker
                .login_throttle
                .delay_for(peer.ip(), std::time::Instant::now());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        let record_failure = |user: &str, reason: &str| {
            let failures = peer.map(|peer| {
                state
                    .broker
                    .login_throttle
                    .record_failure(peer.ip(), std::time::Instant::now())
            });
            tracing::warn!(?peer, %user, %reason, ?failures, "management API authentication failed");
        };
        let Some((username, password)) = decode_basic(value.as_bytes()) else {
            state.broker.metrics.auth_failures_total.inc();
            record_failure("", "malformed basic credentials");
            return Err(Error::Unauthorized("malformed basic credentials".into()));
        };
        let from_loopback = peer.is_some_and(|addr| addr.ip().is_loopback());
        // `authenticate` counts failures in auth_failures_total.
        let user = state
            .broker
            .authenticate(&username, &password, from_loopback)
            .map_err(|reason| {
                record_failure(&username, &reason);
                Error::Unauthorized("login failed".into())
            })?;
        let has = |tag: &str| user.tags.iter().any(|t| t == tag);
        let caller = Caller {
            administrator: has("administrator"),
            monitoring: has("monitoring"),
            management: has("management") || has("policymaker"),
            name: user.name,
            broker: state.broker.clone(),
        };
        if !(caller.administrator || caller.monitoring || caller.management) {
            return Err(Error::Forbidden(format!(
                "user '{}' has no management tag",
                caller.name
            )));
        }
        Ok(caller)
    }
}

/// Decodes `Basic base64(user:password)`.
fn decode_basic(header_value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header_value).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_decode() {
        // Goal: a well-formed Basic header yields user and password; others yield None.
        assert_eq!(
            decode_basic(b"Basic Z3Vlc3Q6Z3Vlc3Q="),
            Some(("guest".into(), "guest".into()))
        );
        assert_eq!(
            decode_basic(b"basic dTpwOnE="),
            Some(("u".into(), "p:q".into()))
        );
        assert_eq!(decode_basic(b"Bearer abc"), None);
        assert_eq!(decode_basic(b"Basic !!!"), None);
    }
}
