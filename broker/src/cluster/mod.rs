//! Drives `paxos`: transport between nodes, timers, durable acceptor state,
//! and the API the broker uses to agree on metadata. Must not decide anything
//! itself: every rule of the protocol lives in `paxos`.
//!
//! - [`node`]: [`ClusterNode`], the task owning the Paxos instance; its API
//!   (`propose`, the [`Applied`] stream, `status`, `add_member`,
//!   `remove_member`, `compact`) and the `synod_paxos_*` metrics.
//! - [`transport`]: TCP (or TLS) framing, the HMAC handshake, per-peer queues.
//! - [`storage`]: `<data-dir>/paxos/` (incarnation id, checksummed log).
//! - [`codec`]: the byte encoding shared by transport and storage.
//! - [`forward`]: data links to queues' home nodes (cross-node publish,
//!   consume, get); the home side is `connection::serve_internal`.
//!
//! # Joining a cluster
//!
//! Every node starts with the same `--peers` seed list (it may include the
//! node itself). A node with an empty `paxos/` directory has no
//! configuration; it asks the seed-list nodes to let it in. The seed-list
//! node with the smallest name creates the cluster, as its only voter, once
//! every other seed-list node has answered that it has no configuration (so
//! all seed-list nodes must be up for the very first start; afterwards a
//! node whose disk was wiped hears that a cluster exists and joins it).
//! Everyone else is added by the leader: as a learner, then as a voter once
//! caught up. A node added later needs in its seed list some node that is, or
//! was, a member: requests to join are passed on towards the leader. A node that lost its disk comes back with a new incarnation: the
//! leader removes the old incarnation, then adds the new one. A removed node
//! stays out until `add_member` invites it again.
//!
//! # Membership changes from any member
//!
//! `add_member` and `remove_member` work on every member: a follower passes
//! the request to the leader through Paxos (`ChangeRequest`), the leader
//! answers whether it proposed the change (`ChangeReply`), and the
//! requester resolves when it applies the decision from its own log. A
//! refusal keeps its reason (change in progress, invalid change); a node
//! that knows no leader answers at once with `NoQuorum`.
//!
//! # Peer authentication
//!
//! Both ends of every connection prove knowledge of the contents of
//! `--cluster-secret-file` by HMAC-SHA256 over fresh nonces; the secret never
//! crosses the wire. With cluster TLS on (`--tls-cert` with `--peers`, see
//! `broker/SECURITY.md`), that handshake runs inside mutual TLS: the peer's
//! certificate must chain to `--tls-ca`, and a dialed peer's must name the
//! dialed host. Without it, traffic after the handshake is not encrypted.

pub mod codec;
pub mod forward;
pub mod limits;
pub mod node;
pub mod storage;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use node::{Applied, ClusterConfig, ClusterNode, ClusterStatus, MemberInfo};

/// Errors of the cluster API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No leader could be reached before the deadline.
    #[error("no quorum: no leader is reachable")]
    NoQuorum,
    /// This node is not a member of the agreed configuration.
    #[error("this node is not a member of the cluster")]
    NotMember,
    /// The request was not decided in time (it may still be decided later).
    #[error("timed out waiting for the decision")]
    Timeout,
    /// Only the leader does this.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader's name, when known.
        leader: Option<String>,
    },
    /// Another membership change is in progress.
    #[error("a membership change is already in progress")]
    ChangeInProgress,
    /// The change does not apply to the configuration.
    #[error("invalid membership change: {0}")]
    InvalidChange(String),
    /// No member has this name.
    #[error("no member is named {0:?}")]
    UnknownMember(String),
    /// Too many requests are waiting.
    #[error("too many requests are waiting")]
    Busy,
    /// The node has stopped.
    #[error("the cluster node has stopped")]
    Stopped,
    /// The cluster listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The secret file could not be read.
    #[error("--cluster-secret-file {path}: {source}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The Paxos directory could not be read or written.
    #[error("paxos storage: {0}")]
    Storage(#[from] storage::Error),
    /// Compaction was refused.
    #[error("{0}")]
    Compact(String),
}

impl From<crate::paxos::Error> for Error {
    fn from(err: crate::paxos::Error) -> Error {
        use crate::paxos::Error as P;
        match err {
            P::NotLeader { leader } => Error::NotLeader {
                leader: leader.map(|l| l.name),
            },
            P::NoLeader => Error::NoQuorum,
            P::NotMember => Error::NotMember,
            P::Busy => Error::Busy,
            P::ChangeInProgress => Error::ChangeInProgress,
            P::InvalidChange(reason) => Error::InvalidChange(reason),
            err @ P::Compact { .. } => Error::Compact(err.to_string()),
        }
    }
}
