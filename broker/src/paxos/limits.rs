//! Every bound of the Paxos module in one place. Names end in their unit.

/// Slots a leader may have proposed and not yet decided.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 256;
/// Proposals a leader queues while it cannot propose (phase 1, stop-sign, full window).
pub const PROPOSAL_QUEUE_MAX: usize = 4_096;
/// Entries in one `Accept` resent on a heartbeat, per peer.
pub const RESEND_ENTRIES_MAX: usize = 256;
/// Decided entries in one `CatchUp` message.
pub const CATCH_UP_ENTRIES_MAX: usize = 256;
/// A learner within this many slots of the leader is promoted to voter.
pub const PROMOTE_LAG_MAX_SLOTS: u64 = 8;
/// Ticks before an unanswered catch-up request is sent again.
pub const CATCH_UP_RETRY_TICKS: u64 = 4;
/// Ticks between `Join` messages of a node outside the configuration.
pub const JOIN_INTERVAL_TICKS: u64 = 5;
/// Pending joins and invitations a leader keeps.
pub const JOINS_PENDING_MAX: usize = 64;
/// Times a `Join` is passed on towards the leader before it is dropped.
pub const JOIN_HOPS_MAX: u8 = 3;
/// Answers to forwarded membership requests held for one `ready()` call.
pub const CHANGE_REPLIES_MAX: usize = 64;
