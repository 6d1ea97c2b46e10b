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
/// Time a client has to complete the TLS (AMQPS) and AMQP handshakes together,
/// in milliseconds; then the socket is closed without a reply.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Largest message body accepted by default, in bytes (RabbitMQ's default
/// `max_message_size`); `--max-message-size` lowers or raises it.
pub const MESSAGE_SIZE_MAX: u64 = 128 * 1024 * 1024;
/// Highest value `--max-message-size` may be set to, in bytes (RabbitMQ's
/// hard ceiling): bodies are held in memory whole.
pub const MESSAGE_SIZE_CONFIGURABLE_MAX: u64 = 512 * 1024 * 1024;
/// Largest HTTP request body on the management API, in bytes.
pub const HTTP_BODY_SIZE_MAX: usize = 16 * 1024 * 1024;
/// Time to wait for `close-ok` after sending `connection.close`, in milliseconds.
pub const CLOSE_OK_WAIT_MS: u64 = 1_000;
/// Outbound events (deliveries) written per socket flush.
pub const OUTBOUND_BATCH_MAX: usize = 256;
/// Default of `--max-connections`: open AMQP connections per node (AMQP
/// and AMQPS together, handshakes included). A connection beyond it is
/// refused with `connection.close 530` after `connection.open`.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Connections over `--max-connections` that are taken through the
/// handshake at once to be refused with `connection.close 530`; beyond
/// this, sockets are closed at accept without a byte.
pub const CONNECTIONS_REFUSING_MAX: usize = 64;
/// Failed logins from one IP address within `AUTH_FAILURE_WINDOW_MS` after
/// which that address's authentication replies are delayed.
pub const AUTH_FAILURES_PER_WINDOW_MAX: u32 = 5;
/// Window over which failed logins of one address are counted, in milliseconds.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 60_000;
/// Delay added to each authentication reply to an address over the
/// failure bound, in milliseconds (well inside the handshake timeout).
pub const AUTH_FAILURE_DELAY_MS: u64 = 2_000;
/// Addresses whose failed logins are tracked; beyond this, the oldest is forgotten.
pub const AUTH_FAILURE_ADDRESSES_MAX: usize = 10_000;
/// TLS handshakes in progress on one HTTPS listener; beyond this, accepts wait.
pub const HTTPS_HANDSHAKES_MAX: usize = 256;
/// Period at which the TLS certificate, key and CA files are read again to
/// pick up a renewed certificate, in milliseconds.
pub const TLS_RELOAD_INTERVAL_MS: u64 = 2_000;
/// Ready-message bytes above which publishing connections are blocked when
/// the machine's memory cannot be read (otherwise the default is
/// [`MEMORY_HIGH_WATERMARK_FRACTION_DEFAULT`] of it).
pub const MEMORY_HIGH_WATERMARK_BYTES: u64 = 1024 * 1024 * 1024;
/// Default of `--memory-high-watermark`: the fraction of the memory
/// available to the process (cgroup limit, else physical RAM) that message
/// bodies held in memory may use before publishers are blocked
/// (RabbitMQ's `vm_memory_high_watermark.relative` default).
pub const MEMORY_HIGH_WATERMARK_FRACTION_DEFAULT: f64 = 0.4;
/// Default of `--disk-free-limit`: free bytes on the data directory's file
/// system below which publishers are blocked (RabbitMQ's `disk_free_limit`).
pub const DISK_FREE_LIMIT_BYTES_DEFAULT: u64 = 50_000_000;
/// Period of the free-disk check on the data directory, in milliseconds.
pub const DISK_FREE_CHECK_INTERVAL_MS: u64 = 1_000;
/// Period of the broker's housekeeping (message TTL, `x-expires`, memory alarm), in milliseconds.
pub const HOUSEKEEPING_INTERVAL_MS: u64 = 25;
/// Size a connection's read and write buffers start at and shrink back to
/// when the connection is idle, in bytes. Reads that fill the read buffer
/// double it, up to the negotiated frame size (plus a frame header).
pub const CONNECTION_BUFFER_SIZE_MIN: usize = 4 * 1024;
/// Time without traffic after which a connection's grown buffers are
/// released and replaced with [`CONNECTION_BUFFER_SIZE_MIN`] ones, in milliseconds.
pub const CONNECTION_BUFFER_IDLE_MS: u64 = 2_000;
/// Deliveries queued for one connection but not yet written to its socket.
pub const DELIVERY_BACKLOG_MAX: usize = 2_048;
/// Bodies up to this size are copied out of the read buffer so that a queued
/// message never pins a whole buffer block; larger ones stay zero-copy, in bytes.
pub const BODY_COPY_SIZE_MAX: usize = 32 * 1024;
/// Default of `--queue-memory-max`: body bytes a durable queue keeps in
/// memory before it pages persistent bodies out to the store's log.
pub const QUEUE_MEMORY_MAX_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Messages read back from the log in one page-in (read-ahead) step.
pub const PAGE_IN_BATCH_MAX: usize = 256;
/// Body bytes read back from the log in one page-in step (at least one message).
pub const PAGE_IN_BATCH_BYTES_MAX: u64 = 1024 * 1024;
/// Messages a drain has sent to a queue's new home and awaits confirms for.
pub const DRAIN_IN_FLIGHT_MAX: usize = 2_048;
/// How long a drain waits for the new home to confirm a copied message
/// before it gives the link up (and requeues what was in flight), in milliseconds.
pub const DRAIN_CONFIRM_TIMEOUT_MS: u64 = 30_000;
/// After a queue moved, how long the old home waits for deliveries its
/// consumers still hold (acked: gone; requeued: copied too), in milliseconds.
pub const DRAIN_UNACKED_WAIT_MS: u64 = 30_000;
/// Pause between two attempts of a drain step that failed (no quorum, no
/// target, link down), and between looks at a queue still holding
/// deliveries, in milliseconds.
pub const DRAIN_RETRY_DELAY_MS: u64 = 500;
/// How long the management API waits to reach a node's cluster port before
/// it calls the node unreachable, in milliseconds.
pub const DRAIN_PROBE_TIMEOUT_MS: u64 = 2_000;
/// How long an `x-expires` deletion proposed to the cluster is left to be
/// decided before it is proposed again, in milliseconds.
pub const EXPIRY_RETRY_MS: u64 = 5_000;
