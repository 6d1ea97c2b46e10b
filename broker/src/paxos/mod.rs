//! Multi-Paxos consensus and reconfiguration as a pure state machine.
//!
//! Architecture invariant: this module knows nothing of sockets, files,
//! async runtimes or wall clocks; time arrives through `tick()`, messages through
//! `step()`, and output leaves as a `Ready` batch.
//!
//! # Protocol
//!
//! - **Identities.** A member is a [`NodeId`]: name plus the incarnation id
//!   of its data directory. Messages are addressed to an identity; a node
//!   drops messages for another incarnation, so a node that lost its disk is
//!   a stranger to the cluster and must join again.
//! - **Ballots** are `(round, leader)`; an acceptor keeps one promised ballot
//!   for all slots (persisted before any reply that depends on it).
//! - **Phase 1 once per ballot.** A voter whose randomized election timeout
//!   (drawn from the seeded [`SplitMix64`]) expires prepares its ballot from
//!   its first undecided slot; acceptors answer with everything they accepted
//!   from there. With a quorum of the configuration governing that slot, the
//!   leader re-proposes, for every slot up to the highest reported, the value
//!   of the highest ballot (or a no-op). A candidate that meets an acceptor
//!   with a longer decided prefix steps back and catches up first.
//! - **Phase 2 per proposal, batched.** Proposals made between two `ready()`
//!   calls leave in one `Accept` per voter; at most
//!   [`limits::PROPOSALS_IN_FLIGHT_MAX`] slots are open at once. The leader
//!   decides a slot when a quorum of voters accepted it, in order, and
//!   announces its decided index in `Commit` (also the heartbeat). A follower
//!   marks decided the slots it accepted in the leader's ballot (one value
//!   per slot per ballot) and fetches the rest (`CatchUpRequest`), or a
//!   snapshot when they were compacted.
//! - **Reconfiguration (epoch / stop-sign).** A [`ConfigChange`] is a log
//!   value. It is a stop-sign: the leader proposes nothing after it until it
//!   is decided, and the slots after it are decided by the new configuration,
//!   for which the leader first runs phase 1 again (same ballot). A new
//!   leader that finds a change among the slots it recovers stops there too.
//!   So every slot is decided by a quorum of exactly one configuration: the
//!   one produced by the decided slots before it. One change at a time;
//!   additions go learner first, promotion once the learner is within
//!   [`limits::PROMOTE_LAG_MAX_SLOTS`]; a leader whose removal is decided
//!   steps down, and a leader that decides another member's removal sends
//!   it one last `Commit` so that it learns it is out. Any member may ask
//!   for a change: a follower passes it to the leader (`ChangeRequest`),
//!   which proposes it against its own configuration and answers
//!   (`ChangeReply`) whether it did; the requester learns the decision
//!   itself from the log. A copy of a request for a change under way or
//!   already decided is answered as taken up.
//! - **Bootstrap.** A node with no stored configuration asks its seed list
//!   (`Join`). The seed-list node with the smallest name creates the cluster
//!   (itself as sole voter) once every other seed-list node answered that it
//!   has no configuration; everyone else, and a seed that hears of an
//!   existing cluster, is added by the leader: learner, then voter. A name
//!   that returns with a new incarnation first has its old incarnation removed.
//!
//! # Why the simulation covers the state space
//!
//! The module's behaviour is a function of its inputs only: the sequence of
//! `tick`, `step`, `propose` and crash/restore events, and the seed. The
//! simulation in `sim.rs` generates exactly these inputs from one seed, and
//! every input the real driver can produce is an input the simulation can
//! produce: any message may be lost, duplicated, delayed or reordered
//! (the network is a random multiset); any node may stop at any point between
//! `ready()` calls, losing any suffix of the writes not yet synced; any node
//! may lose its disk (one at a time, once every member
//! knows every decision: losing the only copy of a decision is data loss no
//! protocol survives); partitions are arbitrary directed cuts; membership
//! changes and proposals arrive at random times. Safety properties are
//! checked after every event against a global record kept outside the nodes
//! (the first decision of each slot, and every durable acceptance), so a
//! violation is caught at the event that causes it, not at the end. What the
//! simulation samples rather than enumerates is the interleaving; thousands
//! of seeds with fault rates chosen per seed (from calm to hostile) give
//! broad coverage, and any failing seed replays exactly with `SEED=`.
//! Timing faults beyond message delay (clock skew) do not exist for this
//! module: time is only the count of `tick` calls, and safety never depends
//! on it.

pub mod limits;
mod node;
mod rng;
#[cfg(test)]
mod sim;
mod types;

pub use limits::*;
pub use node::{MemberStatus, Options, Paxos, Proposal, Role, Status};
pub use rng::SplitMix64;
pub use types::{
    Ballot, Body, Config, ConfigChange, HardState, LogEntry, MemberRequest, Message, NodeId, Ready,
    Refusal, Snapshot, SnapshotUpdate, Stored, Value,
};

/// Errors returned to callers of the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Only the leader does this; `leader` is who to ask.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node follows, if it knows one.
        leader: Option<NodeId>,
    },
    /// No leader is known to forward to.
    #[error("no leader is known")]
    NoLeader,
    /// This node is not in the configuration.
    #[error("this node is not a member of the cluster configuration")]
    NotMember,
    /// The proposal queue is full.
    #[error("too many proposals are waiting")]
    Busy,
    /// Another configuration change is not decided yet.
    #[error("a configuration change is already in progress")]
    ChangeInProgress,
    /// The change does not apply to the current configuration.
    #[error("invalid configuration change: {0}")]
    InvalidChange(String),
    /// `compact` was called with an unusable index.
    #[error("cannot compact the log to {index}: {reason}")]
    Compact {
        /// The index asked for.
        index: u64,
        /// Why not.
        reason: &'static str,
    },
}
