//! Every bound of the broker in one place. Names end in their unit or `_max`.
//! A value here is a promise to operators: change it only with the docs.

/// Largest frame the broker accepts or offers in `connection.tune`, in bytes.
pub const FRAME_SIZE_MAX: u32 = 131_072;
/// Smallest frame size the spec allows a peer to negotiate, in bytes.
pub const FRAME_SIZE_MIN: u32 = 4_096;
/// Channels per connection offered in `connection.tune`.
pub const CHANNELS_PER_CONNECTION_MAX: u16 = 2_047;
/// Heartbeat interval offered in `connection.tune`, in seconds.
pub const HEARTBEAT_INTERVAL_DEFAULT_S: u16 = 60;
/// Time a client has to complete the AMQP handshake, in milliseconds.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Largest message body accepted, in bytes (RabbitMQ's default `max_message_size`).
pub const MESSAGE_SIZE_MAX: u64 = 128 * 1024 * 1024;
/// Largest HTTP request body on the management API, in bytes.
pub const HTTP_BODY_SIZE_MAX: usize = 16 * 1024 * 1024;
