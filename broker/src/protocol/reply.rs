//! AMQP 0-9-1 reply codes and their names. Pure constants.

/// Success (used in close methods for a normal close).
pub const REPLY_SUCCESS: u16 = 200;
/// Soft: a mandatory message could not be routed (basic.return).
pub const NO_ROUTE: u16 = 312;
/// Hard: an operator closed the connection.
pub const CONNECTION_FORCED: u16 = 320;
/// Hard: the vhost is not valid.
pub const INVALID_PATH: u16 = 402;
/// Soft: permission denied (hard during the handshake).
pub const ACCESS_REFUSED: u16 = 403;
/// Soft: the named entity does not exist.
pub const NOT_FOUND: u16 = 404;
/// Soft: an exclusive resource is held by another connection.
pub const RESOURCE_LOCKED: u16 = 405;
/// Soft: a precondition (equivalence, if-unused, ...) failed.
pub const PRECONDITION_FAILED: u16 = 406;
/// Hard: malformed frame.
pub const FRAME_ERROR: u16 = 501;
/// Hard: malformed method arguments.
pub const SYNTAX_ERROR: u16 = 502;
/// Hard: a method not allowed in this state.
pub const COMMAND_INVALID: u16 = 503;
/// Hard: a channel used out of order.
pub const CHANNEL_ERROR: u16 = 504;
/// Hard: a frame that was not expected now.
pub const UNEXPECTED_FRAME: u16 = 505;
/// Hard: the server ran out of a resource.
pub const RESOURCE_ERROR: u16 = 506;
/// Hard: the peer is not allowed to do this.
pub const NOT_ALLOWED: u16 = 530;
/// Hard: the method is not implemented.
pub const NOT_IMPLEMENTED: u16 = 540;
/// Hard: internal error.
pub const INTERNAL_ERROR: u16 = 541;

/// The spec's name for a reply code, as RabbitMQ prefixes reply texts.
pub fn name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "OK",
        NO_ROUTE => "NO_ROUTE",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        INVALID_PATH => "INVALID_PATH",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// Whether a code closes the connection rather than a channel.
pub fn is_hard(code: u16) -> bool {
    matches!(
        code,
        CONNECTION_FORCED
            | INVALID_PATH
            | FRAME_ERROR
            | SYNTAX_ERROR
            | COMMAND_INVALID
            | CHANNEL_ERROR
            | UNEXPECTED_FRAME
            | RESOURCE_ERROR
            | NOT_ALLOWED
            | NOT_IMPLEMENTED
            | INTERNAL_ERROR
    )
}
