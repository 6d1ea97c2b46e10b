//! Data types of the Paxos module: identities, ballots, log values,
//! configurations, messages and the `Ready` batch. Plain data; no behaviour
//! beyond small pure functions, and no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A member's identity: its name plus the incarnation id chosen when its data
/// directory was created. A node that lost its disk comes back with a new
/// incarnation and is therefore a different member.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    /// Node name (`--node-name`).
    pub name: String,
    /// Disk incarnation; never 0 for a real node. 0 addresses "whoever runs
    /// under this name" and is accepted only for discovery messages.
    pub incarnation: u64,
}

impl NodeId {
    /// A concrete identity.
    pub fn new(name: impl Into<String>, incarnation: u64) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation,
        }
    }

    /// The discovery address of a name whose incarnation is not known yet.
    pub fn any(name: impl Into<String>) -> NodeId {
        NodeId::new(name, 0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:x}", self.name, self.incarnation)
    }
}

/// A ballot: a round number made unique by the identity of its leader.
/// Ordered by round first, then by leader identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ballot {
    /// Round number; 0 means "no ballot yet".
    pub round: u64,
    /// The leader that owns this ballot.
    pub leader: NodeId,
}

impl Default for NodeId {
    fn default() -> Self {
        NodeId::new("", 0)
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.round, self.leader)
    }
}

/// One change of membership, decided in the log like any command.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConfigChange {
    /// Adds a member that receives decided entries but does not vote.
    AddLearner(NodeId),
    /// Turns a caught-up learner into a voter.
    Promote(NodeId),
    /// Removes a voter or learner.
    Remove(NodeId),
}

/// A membership change a member asks the leader for on behalf of its
/// management API: the leader turns it into a [`ConfigChange`] (or an
/// invitation) checked against its own configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MemberRequest {
    /// Remove this member.
    Remove(NodeId),
    /// Invite the node running under this name to join (learner, then voter).
    Add(String),
}

/// Why a leader did not take up a forwarded [`MemberRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The receiver is not the leader (any more).
    NotLeader,
    /// Another configuration change is not decided yet.
    ChangeInProgress,
    /// The change does not apply to the leader's configuration.
    Invalid(String),
    /// The leader's queues are full.
    Busy,
}

/// The value of one log slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// Fills a slot that a new leader found empty.
    Noop,
    /// An opaque command of the application.
    Command(Vec<u8>),
    /// A membership change; also a stop-sign: no later slot is proposed before
    /// it is decided, and later slots are decided by the new configuration.
    Change(ConfigChange),
}

/// A membership configuration. The epoch counts decided changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// Number of changes decided since bootstrap (bootstrap is epoch 1).
    pub epoch: u64,
    /// Members whose acceptance counts towards a quorum.
    pub voters: BTreeSet<NodeId>,
    /// Members that receive decided entries but do not vote.
    pub learners: BTreeSet<NodeId>,
}

impl Config {
    /// The configuration a cluster starts with: the bootstrapping node alone.
    pub fn bootstrap(id: NodeId) -> Config {
        Config {
            epoch: 1,
            voters: BTreeSet::from([id]),
            learners: BTreeSet::new(),
        }
    }

    /// Votes needed to decide: a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Whether `id` votes in this configuration.
    pub fn is_voter(&self, id: &NodeId) -> bool {
        self.voters.contains(id)
    }

    /// Whether `id` is a voter or learner.
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.voters.contains(id) || self.learners.contains(id)
    }

    /// The member running under `name`, whatever its incarnation.
    pub fn member_named(&self, name: &str) -> Option<&NodeId> {
        self.voters
            .iter()
            .chain(self.learners.iter())
            .find(|id| id.name == name)
    }

    /// Voters then learners.
    pub fn members(&self) -> impl Iterator<Item = &NodeId> {
        self.voters.iter().chain(self.learners.iter())
    }

    /// Whether `change` may be proposed on top of this configuration.
    pub fn check(&self, change: &ConfigChange) -> Result<(), super::Error> {
        use super::Error::InvalidChange;
        match change {
            ConfigChange::AddLearner(id) => {
                if id.incarnation == 0 {
                    return Err(InvalidChange(format!("{id} has no incarnation")));
                }
                if self.member_named(&id.name).is_some() {
                    return Err(InvalidChange(format!("a member named {} exists", id.name)));
                }
            }
            ConfigChange::Promote(id) => {
                if !self.learners.contains(id) {
                    return Err(InvalidChange(format!("{id} is not a learner")));
                }
            }
            ConfigChange::Remove(id) => {
                if !self.is_member(id) {
                    return Err(InvalidChange(format!("{id} is not a member")));
                }
                if self.voters.len() == 1 && self.voters.contains(id) {
                    return Err(InvalidChange("cannot remove the last voter".into()));
                }
            }
        }
        Ok(())
    }

    /// The configuration after `change`. A change that is invalid here (it
    /// cannot be, since proposals are checked against the same configuration)
    /// leaves the members alone; every node computes the same result either way.
    pub fn apply(&self, change: &ConfigChange) -> Config {
        let mut next = self.clone();
        next.epoch += 1;
        if self.check(change).is_err() {
            return next;
        }
        match change {
            ConfigChange::AddLearner(id) => {
                next.learners.insert(id.clone());
            }
            ConfigChange::Promote(id) => {
                next.learners.remove(id);
                next.voters.insert(id.clone());
            }
            ConfigChange::Remove(id) => {
                next.learners.remove(id);
                next.voters.remove(id);
            }
        }
        next
    }
}

/// An accepted (and possibly decided) log entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LogEntry {
    /// The ballot in which this acceptor accepted the value.
    pub ballot: Ballot,
    /// The value.
    pub value: Value,
}

/// The applied state at a decided index, with the configuration in force there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Last slot covered.
    pub index: u64,
    /// The configuration after applying every slot up to `index`.
    pub config: Config,
    /// The application's state, opaque to Paxos; empty means the initial state.
    pub data: Vec<u8>,
}

/// The acceptor's small durable state.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HardState {
    /// Highest ballot promised; never goes down.
    pub promised: Ballot,
    /// Every slot up to here is decided and stored (in the log or the snapshot).
    pub decided: u64,
}

/// What the caller stored, handed back on restart.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Last hard state written, if any.
    pub hard_state: Option<HardState>,
    /// Last snapshot written, if any (none: the node never joined a cluster).
    pub snapshot: Option<Snapshot>,
    /// Log entries after the snapshot; a later write of a slot replaces the earlier.
    pub entries: BTreeMap<u64, LogEntry>,
}

/// A message between two nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver (incarnation 0 for discovery messages).
    pub to: NodeId,
    /// Content.
    pub body: Body,
}

/// Message contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Phase 1a: promise `ballot` and report what you accepted from `from_slot` on.
    Prepare {
        /// The candidate's ballot.
        ballot: Ballot,
        /// First slot the candidate does not know to be decided.
        from_slot: u64,
    },
    /// Phase 1b.
    Promise {
        /// The ballot promised.
        ballot: Ballot,
        /// The acceptor's decided index; a candidate behind it steps back.
        decided: u64,
        /// Accepted entries from `from_slot` on (empty when `decided >= from_slot`).
        entries: Vec<(u64, LogEntry)>,
    },
    /// Phase 2a, batched.
    Accept {
        /// The leader's ballot.
        ballot: Ballot,
        /// Slots and their values.
        entries: Vec<(u64, Value)>,
        /// The leader's decided index (piggybacked commit).
        decided: u64,
    },
    /// Phase 2b.
    Accepted {
        /// The ballot accepted.
        ballot: Ballot,
        /// Slots accepted.
        slots: Vec<u64>,
        /// The acceptor's decided index.
        decided: u64,
    },
    /// Refusal: the receiver has promised a higher ballot.
    Reject {
        /// The ballot promised.
        promised: Ballot,
    },
    /// Leader heartbeat: every slot up to `decided` is decided, and a slot
    /// this node accepted in `ballot` holds the decided value.
    Commit {
        /// The leader's ballot.
        ballot: Ballot,
        /// The leader's decided index.
        decided: u64,
    },
    /// Reply to `Commit`, reporting progress.
    CommitAck {
        /// The ballot of the acknowledged `Commit`.
        ballot: Ballot,
        /// The sender's decided index.
        decided: u64,
    },
    /// Asks for decided entries from `from_slot` on.
    CatchUpRequest {
        /// First slot wanted.
        from_slot: u64,
        /// False when the sender has no configuration yet and needs a snapshot.
        has_base: bool,
    },
    /// Decided entries, contiguous from the requested slot.
    CatchUp {
        /// Entries.
        entries: Vec<(u64, LogEntry)>,
        /// The sender's decided index.
        decided: u64,
    },
    /// A snapshot replacing everything up to its index.
    InstallSnapshot {
        /// The snapshot.
        snapshot: Snapshot,
    },
    /// A proposal sent to the leader by a follower.
    Forward {
        /// The command.
        data: Vec<u8>,
    },
    /// A node outside the configuration asks to be added.
    Join {
        /// Times this request was passed on towards the leader.
        hops: u8,
    },
    /// Reply to `Join`: whether the replier belongs to a cluster.
    JoinReply {
        /// True when the replier has a configuration.
        has_config: bool,
    },
    /// The leader asks a named node outside the configuration to join.
    Invite,
    /// A member passes a membership change to the leader.
    ChangeRequest {
        /// The requester's id for this request, echoed in the reply.
        request: u64,
        /// What to change.
        change: MemberRequest,
    },
    /// The leader's answer to `ChangeRequest`: taken up (the requester then
    /// learns the decision from the log) or refused.
    ChangeReply {
        /// The request answered.
        request: u64,
        /// `None` when the leader proposed the change (or the invitation).
        refusal: Option<Refusal>,
    },
}

impl Body {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Prepare { .. } => "prepare",
            Body::Promise { .. } => "promise",
            Body::Accept { .. } => "accept",
            Body::Accepted { .. } => "accepted",
            Body::Reject { .. } => "reject",
            Body::Commit { .. } => "commit",
            Body::CommitAck { .. } => "commit_ack",
            Body::CatchUpRequest { .. } => "catch_up_request",
            Body::CatchUp { .. } => "catch_up",
            Body::InstallSnapshot { .. } => "install_snapshot",
            Body::Forward { .. } => "forward",
            Body::Join { .. } => "join",
            Body::JoinReply { .. } => "join_reply",
            Body::Invite => "invite",
            Body::ChangeRequest { .. } => "change_request",
            Body::ChangeReply { .. } => "change_reply",
        }
    }
}

/// A snapshot the caller must store, and whether it replaces the application state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotUpdate {
    /// Received from another node (or created at bootstrap): store it, then
    /// restore the application state from `data` before applying `committed`.
    Installed(Snapshot),
    /// Made from the caller's own state by `compact`: store it; the
    /// application state already matches.
    Compacted(Snapshot),
}

impl SnapshotUpdate {
    /// The snapshot either way.
    pub fn snapshot(&self) -> &Snapshot {
        match self {
            SnapshotUpdate::Installed(s) | SnapshotUpdate::Compacted(s) => s,
        }
    }
}

/// One batch of output. The caller must, in this order: durably store
/// `snapshot`, then `entries`, then `hard_state` (fsync); then send
/// `messages`; then apply `committed`; then call `advance`.
#[derive(Debug, Default)]
pub struct Ready {
    /// Snapshot to store; entries up to its index may be discarded.
    pub snapshot: Option<SnapshotUpdate>,
    /// Log entries to store, replacing earlier ones at the same slot.
    pub entries: Vec<(u64, LogEntry)>,
    /// New hard state, when it changed.
    pub hard_state: Option<HardState>,
    /// Messages to send once the above is durable.
    pub messages: Vec<Message>,
    /// Newly decided slots, in order, without gaps.
    pub committed: Vec<(u64, Value)>,
    /// Answers to this node's forwarded membership requests, by request id:
    /// `Ok` when the leader proposed the change (its decision arrives in
    /// `committed`, at this node too), else why not.
    pub change_replies: Vec<(u64, Result<(), super::Error>)>,
}

impl Ready {
    /// Whether there is anything to store durably before sending.
    pub fn must_persist(&self) -> bool {
        self.snapshot.is_some() || !self.entries.is_empty() || self.hard_state.is_some()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        !self.must_persist()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && self.change_replies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_changes_follow_the_rules() {
        // Goal: each change is accepted or refused as the table says, and epochs count changes.
        let a = NodeId::new("a", 1);
        let b = NodeId::new("b", 2);
        let b_new = NodeId::new("b", 3);
        let start = Config::bootstrap(a.clone()).apply(&ConfigChange::AddLearner(b.clone()));
        let table: Vec<(ConfigChange, bool)> = vec![
            (ConfigChange::AddLearner(b.clone()), false),
            (ConfigChange::AddLearner(b_new.clone()), false),
            (ConfigChange::AddLearner(NodeId::any("c")), false),
            (ConfigChange::AddLearner(NodeId::new("c", 4)), true),
            (ConfigChange::Promote(b.clone()), true),
            (ConfigChange::Promote(a.clone()), false),
            (ConfigChange::Remove(b.clone()), true),
            (ConfigChange::Remove(b_new.clone()), false),
            (ConfigChange::Remove(a.clone()), false),
        ];
        for (change, ok) in table {
            assert_eq!(start.check(&change).is_ok(), ok, "{change:?}");
            let next = start.apply(&change);
            assert_eq!(next.epoch, start.epoch + 1);
            assert_eq!(
                next == Config {
                    epoch: next.epoch,
                    ..start.clone()
                },
                !ok,
                "{change:?}"
            );
        }
        let promoted = start.apply(&ConfigChange::Promote(b.clone()));
        assert!(promoted.is_voter(&b) && promoted.quorum() == 2);
    }
}
