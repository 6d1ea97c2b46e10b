//! Every bound of the cluster driver in one place. Names end in their unit.

/// Largest frame on the cluster port (a snapshot travels in one frame).
pub const FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Frames queued for one peer; more are dropped (Paxos retransmits).
pub const OUTGOING_FRAMES_MAX: usize = 4_096;
/// Messages received and not yet handed to the state machine.
pub const INBOX_MESSAGES_MAX: usize = 4_096;
/// Messages handed to the state machine before its output is processed.
pub const INBOX_BATCH_MAX: usize = 512;
/// Inbound cluster connections at once.
pub const INBOUND_CONNECTIONS_MAX: usize = 64;
/// Time to open a TCP connection to a peer.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Time for the authentication handshake.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// First delay before redialing a peer; doubles up to the maximum.
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 50;
/// Longest delay before redialing a peer.
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;
/// API requests (proposals, membership changes) waiting in the driver.
pub const COMMANDS_MAX: usize = 1_024;
/// Proposals waiting for their decision.
pub const PENDING_PROPOSALS_MAX: usize = 8_192;
/// Membership changes waiting for their decision.
pub const PENDING_CHANGES_MAX: usize = 64;
/// Decided entries queued for the application before the driver waits.
pub const APPLIED_QUEUE_MAX: usize = 4_096;
/// A member this many slots behind the leader is not "caught up".
pub const READY_LAG_MAX_SLOTS: u64 = 8;
/// Peer identities whose last message time is tracked for status.
pub const PEERS_TRACKED_MAX: usize = 1_024;
/// Forwarded publishes on one data link whose home-node confirm has not
/// arrived; beyond this the publishing connection stops reading.
pub const LINK_PUBLISHES_IN_FLIGHT_MAX: usize = 8_192;
/// After a data link to a peer fails, operations on its queues fail at once
/// for this long instead of redialing for every message.
pub const LINK_RETRY_DELAY_MS: u64 = 250;
/// Prefetch of the remote consumer behind a `no_ack` client consumer (the
/// entry node acknowledges after writing, so the home node stays bounded).
pub const LINK_NO_ACK_PREFETCH: u16 = 2_048;
/// Channels of one data link (one per client channel using the peer's queues).
pub const LINK_CHANNELS_MAX: u16 = u16::MAX;
/// Frames queued for one data link's writer before the reader is consulted.
pub const LINK_WRITE_BATCH_MAX: usize = 256;
