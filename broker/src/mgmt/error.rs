//! The one error type of the management API and its mapping to HTTP status
//! codes and RabbitMQ's `{"error": ..., "reason": ...}` bodies.
//! Must not: decide policy (who may do what); it only reports outcomes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::meta::MetaError;
use crate::mgmt::api::ErrorResponse;

/// Why a management request failed. Each variant knows its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing or wrong credentials (401, with `WWW-Authenticate`).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but the user's tags or permissions do not allow it (403).
    #[error("{0}")]
    Forbidden(String),
    /// The object or path does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// Malformed JSON or an invalid field; the reason names the field (400).
    #[error("{0}")]
    BadRequest(String),
    /// A redeclaration with different properties or a refused precondition (400).
    #[error("{0}")]
    Conflict(String),
    /// Another change of the same thing is under way, e.g. a cluster
    /// membership change; retry once it is done (409).
    #[error("{0}")]
    InProgress(String),
    /// The path exists but not for this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request body is larger than `limits::HTTP_BODY_SIZE_MAX` (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The node cannot serve the request now, e.g. not ready (503).
    #[error("{0}")]
    Unavailable(String),
    /// The request needs a node that cannot be reached, e.g. removing a
    /// dead member that is still the home of queues (409).
    #[error("{0}")]
    Unreachable(String),
}

impl Error {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::BadRequest(_) | Error::Conflict(_) => StatusCode::BAD_REQUEST,
            Error::InProgress(_) | Error::Unreachable(_) => StatusCode::CONFLICT,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The short `error` field RabbitMQ uses for this status.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unauthorized(_) => "not_authorised",
            Error::Forbidden(_) => "not_authorised",
            Error::NotFound(_) => "Object Not Found",
            Error::BadRequest(_) => "bad_request",
            Error::Conflict(_) => "bad_request",
            Error::InProgress(_) | Error::Unreachable(_) => "conflict",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::Unavailable(_) => "unavailable",
        }
    }
}

impl From<MetaError> for Error {
    fn from(err: MetaError) -> Error {
        match err {
            MetaError::NotFound(reason) => Error::NotFound(reason),
            MetaError::PreconditionFailed(reason) => Error::Conflict(reason),
            MetaError::AccessRefused(reason) => Error::Forbidden(reason),
            MetaError::Invalid(reason) => Error::BadRequest(reason),
            MetaError::Unavailable(reason) => Error::Unavailable(reason),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorResponse {
            error: self.kind().to_string(),
            reason: self.to_string(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Synod Management\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_meta_error_maps_to_its_status() {
        // Goal: metadata refusals become 404 / 400 / 403 / 400 as RabbitMQ answers them.
        let cases = [
            (MetaError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (
                MetaError::PreconditionFailed("x".into()),
                StatusCode::BAD_REQUEST,
            ),
            (MetaError::AccessRefused("x".into()), StatusCode::FORBIDDEN),
            (MetaError::Invalid("x".into()), StatusCode::BAD_REQUEST),
        ];
        for (meta, status) in cases {
            assert_eq!(Error::from(meta).status(), status);
        }
    }

    #[test]
    fn unauthorized_carries_a_basic_challenge() {
        // Goal: a 401 response asks for basic credentials and has a JSON body.
        let response = Error::Unauthorized("no".into()).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(
            response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .is_some_and(|v| v.as_bytes().starts_with(b"Basic"))
        );
    }
}
