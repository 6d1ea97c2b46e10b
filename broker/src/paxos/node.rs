//! The multi-Paxos state machine of one node: acceptor, proposer (leader) and
//! learner. Pure: it reads no clock, touches no socket or file, and draws
//! randomness only from the seed in its `Options`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::Error;
use super::limits::{
    CATCH_UP_ENTRIES_MAX, CATCH_UP_RETRY_TICKS, CHANGE_REPLIES_MAX, JOIN_HOPS_MAX,
    JOIN_INTERVAL_TICKS, JOINS_PENDING_MAX, PROMOTE_LAG_MAX_SLOTS, PROPOSAL_QUEUE_MAX,
    PROPOSALS_IN_FLIGHT_MAX, RESEND_ENTRIES_MAX,
};
use super::rng::SplitMix64;
use super::types::{
    Ballot, Body, Config, ConfigChange, HardState, LogEntry, MemberRequest, Message, NodeId, Ready,
    Refusal, Snapshot, SnapshotUpdate, Stored, Value,
};

/// How a node is set up. Times are in ticks; the caller decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's identity.
    pub id: NodeId,
    /// Names of the seed list (`--peers`); may include this node's own name.
    pub peers: Vec<String>,
    /// Seed of every random choice (election timeouts).
    pub seed: u64,
    /// Base election timeout; the actual one is drawn from `[t, 2t)`.
    pub election_ticks: u64,
    /// Interval between leader heartbeats and retransmissions.
    pub heartbeat_ticks: u64,
}

impl Options {
    /// Options with the default timing: elections after 10–20 ticks, heartbeats every 2.
    pub fn new(id: NodeId, peers: Vec<String>, seed: u64) -> Options {
        Options {
            id,
            peers,
            seed,
            election_ticks: 10,
            heartbeat_ticks: 2,
        }
    }
}

/// The part this node plays right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not in any configuration yet: looking for a cluster to join.
    Joining,
    /// Has a configuration that does not list it as a voter.
    Learner,
    /// Voter following a leader (or waiting for one).
    Follower,
    /// Voter running phase 1 for its own ballot.
    Candidate,
    /// Voter whose ballot won phase 1.
    Leader,
}

/// What a proposal became.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Proposed in this slot (it may still be lost if leadership changes).
    Slot(u64),
    /// Queued by the leader until it may propose again.
    Queued,
    /// Sent to the leader.
    Forwarded(NodeId),
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Identity.
    pub id: NodeId,
    /// Voter or learner.
    pub voter: bool,
    /// Its decided index, when known (the leader knows every member's).
    pub decided: Option<u64>,
    /// Ticks since this node last heard from it, when known.
    pub last_heard_ticks: Option<u64>,
}

/// A snapshot of this node's view, for status pages and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// The leader it follows (itself when leading).
    pub leader: Option<NodeId>,
    /// Highest ballot promised.
    pub ballot: Ballot,
    /// Configuration epoch (0 before joining).
    pub epoch: u64,
    /// Decided index.
    pub decided: u64,
    /// Configuration members.
    pub members: Vec<MemberStatus>,
    /// Elections this node started.
    pub elections_started: u64,
}

struct Phase1 {
    from_slot: u64,
    config: Config,
    promises: BTreeMap<NodeId, Vec<(u64, LogEntry)>>,
}

struct Inflight {
    value: Value,
    accepted: BTreeSet<NodeId>,
}

#[derive(Clone, Copy, Default)]
struct Progress {
    decided: u64,
    heard_tick: u64,
}

struct Leadership {
    ballot: Ballot,
    /// Phase 1 succeeded once: this node acts as leader.
    established: bool,
    /// Phase 1 in progress, for the slots of one configuration.
    phase1: Option<Phase1>,
    next_slot: u64,
    /// Slot of an undecided configuration change; nothing is proposed after it.
    stop_sign: Option<u64>,
    inflight: BTreeMap<u64, Inflight>,
    queue: VecDeque<Value>,
    progress: BTreeMap<NodeId, Progress>,
    joins: BTreeMap<String, NodeId>,
    invites: BTreeSet<String>,
    quorum_check_tick: u64,
}

/// One node's multi-Paxos state machine. Drive it with [`Paxos::tick`],
/// [`Paxos::step`] and [`Paxos::propose`]; collect output with
/// [`Paxos::ready`] and acknowledge it with [`Paxos::advance`].
pub struct Paxos {
    id: NodeId,
    options: Options,
    rng: SplitMix64,
    // Durable state, mirrored by the caller from `Ready`.
    promised: Ballot,
    decided: u64,
    log: BTreeMap<u64, LogEntry>,
    snapshot: Option<Snapshot>,
    // Derived from the durable state.
    config: Option<Config>,
    /// Configuration in force after each slot that changed it (and at the snapshot).
    configs: BTreeMap<u64, Config>,
    // Volatile state.
    applied: u64,
    now: u64,
    leadership: Option<Leadership>,
    leader: Option<NodeId>,
    leader_heard_tick: u64,
    known_decided: u64,
    election_deadline: u64,
    heartbeat_due: u64,
    catch_up_sent: Option<u64>,
    catch_up_from: Option<NodeId>,
    join_sent: Option<u64>,
    join_replies: BTreeMap<String, bool>,
    cluster_exists: bool,
    round_seen: u64,
    elections_started: u64,
    // Output not yet handed out.
    out_messages: Vec<Message>,
    out_entries: BTreeMap<u64, LogEntry>,
    out_snapshot: Option<SnapshotUpdate>,
    hard_dirty: bool,
    pending_accept: Vec<u64>,
    commit_dirty: bool,
    out_change_replies: Vec<(u64, Result<(), Error>)>,
    /// Members whose removal this leader just decided: they get one last
    /// `Commit`, so they learn of it (the new configuration no longer
    /// includes them in heartbeats).
    farewells: Vec<NodeId>,
}

impl Paxos {
    /// A node with an empty data directory.
    pub fn new(options: Options) -> Paxos {
        Paxos::restore(options, Stored::default())
    }

    /// A node restarting from what it stored. The caller restores its
    /// application state from `stored.snapshot`; decided entries after it are
    /// delivered again in the first `Ready`.
    pub fn restore(options: Options, stored: Stored) -> Paxos {
        let hard = stored.hard_state.unwrap_or_default();
        let snapshot_index = stored.snapshot.as_ref().map_or(0, |s| s.index);
        let log: BTreeMap<u64, LogEntry> = stored
            .entries
            .into_iter()
            .filter(|(slot, _)| *slot > snapshot_index)
            .collect();
        // An accepted entry implies a promise at least as high, even if the
        // hard-state write after it was lost in a crash.
        let promised = log
            .values()
            .map(|e| e.ballot.clone())
            .chain(std::iter::once(hard.promised))
            .max()
            .unwrap_or_default();
        let mut node = Paxos {
            id: options.id.clone(),
            rng: SplitMix64::new(options.seed),
            promised,
            decided: snapshot_index,
            log,
            config: stored.snapshot.as_ref().map(|s| s.config.clone()),
            configs: stored
                .snapshot
                .as_ref()
                .map(|s| BTreeMap::from([(s.index, s.config.clone())]))
                .unwrap_or_default(),
            snapshot: stored.snapshot,
            applied: snapshot_index,
            now: 0,
            leadership: None,
            leader: None,
            leader_heard_tick: 0,
            known_decided: 0,
            election_deadline: 0,
            heartbeat_due: 0,
            catch_up_sent: None,
            catch_up_from: None,
            join_sent: None,
            join_replies: BTreeMap::new(),
            cluster_exists: false,
            round_seen: 0,
            elections_started: 0,
            out_messages: Vec::new(),
            out_entries: BTreeMap::new(),
            out_snapshot: None,
            hard_dirty: false,
            pending_accept: Vec::new(),
            commit_dirty: false,
            out_change_replies: Vec::new(),
            farewells: Vec::new(),
            options,
        };
        // Replay the decided prefix that is actually stored; a decided index
        // beyond a gap (a lost write) falls back to the gap.
        let target = hard.decided.max(snapshot_index);
        if node.config.is_some() {
            let mut slot = snapshot_index;
            while slot < target && node.log.contains_key(&(slot + 1)) {
                slot += 1;
            }
            node.advance_decided(slot);
        }
        node.hard_dirty = false;
        node.reset_election_deadline();
        node
    }

    /// This node's identity.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The configuration after the decided prefix, once this node has one.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Decided index.
    pub fn decided(&self) -> u64 {
        self.decided
    }

    /// The leader this node follows, if any.
    pub fn leader(&self) -> Option<&NodeId> {
        self.leader.as_ref()
    }

    /// Whether this node leads (phase 1 done for its ballot).
    pub fn is_leader(&self) -> bool {
        self.leadership.as_ref().is_some_and(|l| l.established)
    }

    /// Whether this node is a voter in its configuration.
    pub fn is_voter(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.is_voter(&self.id))
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.now += 1;
        if self
            .catch_up_sent
            .is_some_and(|t| self.now - t >= CATCH_UP_RETRY_TICKS)
        {
            self.catch_up_sent = None;
            let target = self
                .leader
                .clone()
                .filter(|l| *l != self.id)
                .or_else(|| self.catch_up_from.clone());
            if self.known_decided > self.decided
                && let Some(target) = target
            {
                self.request_catch_up(target);
            }
        }
        if self.config.is_none() {
            self.tick_joining();
            return;
        }
        let (established, leading) = match &self.leadership {
            Some(l) => (l.established, true),
            None => (false, false),
        };
        if !leading {
            if self.is_voter() && self.now >= self.election_deadline {
                self.start_election();
            }
        } else if !established {
            if self.now >= self.election_deadline {
                self.start_election();
            } else if self.now >= self.heartbeat_due {
                self.heartbeat();
            }
        } else {
            if self.now >= self.heartbeat_due {
                self.heartbeat();
                self.membership_step();
            }
            self.check_quorum();
        }
    }

    /// Handles one message. Messages for another node or incarnation are dropped.
    pub fn step(&mut self, msg: Message) {
        if msg.to.name != self.id.name || msg.from == self.id {
            return;
        }
        let discovery = matches!(
            msg.body,
            Body::Join { .. } | Body::JoinReply { .. } | Body::Invite
        );
        if msg.to.incarnation != self.id.incarnation && !(discovery && msg.to.incarnation == 0) {
            return;
        }
        let from = msg.from;
        match msg.body {
            Body::Prepare { ballot, from_slot } => self.on_prepare(from, ballot, from_slot),
            Body::Promise {
                ballot,
                decided,
                entries,
            } => self.on_promise(from, ballot, decided, entries),
            Body::Accept {
                ballot,
                entries,
                decided,
            } => self.on_accept(from, ballot, entries, decided),
            Body::Accepted {
                ballot,
                slots,
                decided,
            } => self.on_accepted(from, ballot, slots, decided),
            Body::Reject { promised } => self.on_reject(promised),
            Body::Commit { ballot, decided } => self.on_commit(from, ballot, decided),
            Body::CommitAck { ballot, decided } => self.on_commit_ack(from, ballot, decided),
            Body::CatchUpRequest {
                from_slot,
                has_base,
            } => self.on_catch_up_request(from, from_slot, has_base),
            Body::CatchUp { entries, decided } => self.on_catch_up(from, entries, decided),
            Body::InstallSnapshot { snapshot } => self.on_install_snapshot(from, snapshot),
            Body::Forward { data } => {
                if self.is_leader() {
                    // The forwarding node learns the outcome from the log;
                    // a full queue just drops the proposal like a lost message.
                    let _ = self.propose_value(Value::Command(data));
                }
            }
            Body::ChangeRequest { request, change } => {
                let refusal = if self.is_leader() {
                    self.take_member_request(change).err().map(Refusal::from)
                } else {
                    Some(Refusal::NotLeader)
                };
                self.send(from, Body::ChangeReply { request, refusal });
            }
            Body::ChangeReply { request, refusal } => {
                let outcome = match refusal {
                    None => Ok(()),
                    Some(refusal) => Err(refusal.into_error(self.leader.clone())),
                };
                // Bounded like the inbox: replies only answer requests this
                // node sent, and the caller drains them with every `ready`.
                if self.out_change_replies.len() < CHANGE_REPLIES_MAX {
                    self.out_change_replies.push((request, outcome));
                }
            }
            Body::Join { hops } => self.on_join(from, hops),
            Body::JoinReply { has_config } => self.on_join_reply(from, has_config),
            Body::Invite => {
                if !self.config.as_ref().is_some_and(|c| c.is_member(&self.id)) {
                    self.send(from, Body::Join { hops: 0 });
                } else {
                    // Only a leader whose configuration lacks this node
                    // invites it, so ours is stale: a removed node hears no
                    // more commits. Learning the decided entries (its
                    // removal among them) lets it answer the next invite.
                    self.request_catch_up(from);
                }
            }
        }
    }

    /// Proposes an application command. On the leader it gets a slot (or is
    /// queued); on a follower it is forwarded to the leader.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Proposal, Error> {
        if !self.config.as_ref().is_some_and(|c| c.is_member(&self.id)) {
            return Err(Error::NotMember);
        }
        if self.is_leader() {
            return self.propose_value(Value::Command(data));
        }
        match self.leader.clone() {
            Some(leader) if leader != self.id => {
                self.send(leader.clone(), Body::Forward { data });
                Ok(Proposal::Forwarded(leader))
            }
            _ => Err(Error::NoLeader),
        }
    }

    /// Proposes a membership change (leader only, one change at a time).
    pub fn propose_change(&mut self, change: ConfigChange) -> Result<Proposal, Error> {
        let Some(l) = self.leadership.as_ref().filter(|l| l.established) else {
            return Err(Error::NotLeader {
                leader: self.leader.clone(),
            });
        };
        // A change that can never apply says so before one that must wait.
        self.config
            .as_ref()
            .expect("a leader has a configuration")
            .check(&change)?;
        if self.change_pending(l) {
            return Err(Error::ChangeInProgress);
        }
        self.propose_value(Value::Change(change))
    }

    /// Asks for a membership change from any member. The leader takes it up
    /// at once (see [`Paxos::propose_change`] and [`Paxos::invite`]); a
    /// follower passes it to the leader it follows and returns
    /// `Forwarded`: the leader's answer comes back in
    /// [`Ready::change_replies`] under `request`, and the decision, if any,
    /// in the log. Without a known leader: `NoLeader`.
    pub fn request_change(
        &mut self,
        request: u64,
        change: MemberRequest,
    ) -> Result<Proposal, Error> {
        if !self.config.as_ref().is_some_and(|c| c.is_member(&self.id)) {
            return Err(Error::NotMember);
        }
        if self.is_leader() {
            return self.take_member_request(change);
        }
        match self.leader.clone() {
            Some(leader) if leader != self.id => {
                self.send(leader.clone(), Body::ChangeRequest { request, change });
                Ok(Proposal::Forwarded(leader))
            }
            _ => Err(Error::NoLeader),
        }
    }

    /// The leader's side of a member request, local or forwarded. An
    /// invitation is `Queued`: the change follows once the node asks to join.
    fn take_member_request(&mut self, change: MemberRequest) -> Result<Proposal, Error> {
        match change {
            MemberRequest::Remove(id) => {
                // The same request again (a copy sent because the answer
                // was slow, or asked twice) is the change under way or
                // already decided, not a conflicting or invalid one.
                let config = self.config.as_ref().expect("a leader has a configuration");
                let removed_before =
                    !config.is_member(&id) && self.configs.values().any(|c| c.is_member(&id));
                let change = ConfigChange::Remove(id);
                if self.is_pending(&change) || removed_before {
                    return Ok(Proposal::Queued);
                }
                self.propose_change(change)
            }
            MemberRequest::Add(name) => {
                let config = self.config.as_ref().expect("a leader has a configuration");
                if config
                    .member_named(&name)
                    .is_some_and(|id| config.is_voter(id))
                {
                    // Already a voter: nothing to change, and the requester
                    // sees it in its configuration.
                    return Ok(Proposal::Queued);
                }
                self.invite(&name).map(|()| Proposal::Queued)
            }
        }
    }

    /// Asks the node running under `name` to join (leader only). Useful for
    /// re-adding a node that was removed; a fresh node joins by itself.
    pub fn invite(&mut self, name: &str) -> Result<(), Error> {
        let Some(l) = self.leadership.as_mut().filter(|l| l.established) else {
            return Err(Error::NotLeader {
                leader: self.leader.clone(),
            });
        };
        if l.invites.len() >= JOINS_PENDING_MAX {
            return Err(Error::Busy);
        }
        l.invites.insert(name.to_string());
        Ok(())
    }

    /// Replaces the log up to `index` (already applied) by a snapshot of the
    /// application state `data` taken at `index`.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), Error> {
        let base = self.snapshot.as_ref().map_or(0, |s| s.index);
        if self.config.is_none() || index <= base {
            return Err(Error::Compact {
                index,
                reason: "not after the current snapshot",
            });
        }
        if index > self.applied {
            return Err(Error::Compact {
                index,
                reason: "not applied yet",
            });
        }
        if self.out_snapshot.is_some() {
            return Err(Error::Compact {
                index,
                reason: "a snapshot is waiting to be stored",
            });
        }
        let config = self.config_at(index);
        let snapshot = Snapshot {
            index,
            config: config.clone(),
            data,
        };
        self.log.retain(|slot, _| *slot > index);
        self.out_entries.retain(|slot, _| *slot > index);
        self.configs.retain(|slot, _| *slot > index);
        self.configs.insert(index, config);
        self.snapshot = Some(snapshot.clone());
        self.out_snapshot = Some(SnapshotUpdate::Compacted(snapshot));
        Ok(())
    }

    /// Whether `ready` would return anything.
    pub fn has_ready(&self) -> bool {
        !self.out_messages.is_empty()
            || !self.out_entries.is_empty()
            || self.out_snapshot.is_some()
            || self.hard_dirty
            || self.applied < self.decided
            || !self.pending_accept.is_empty()
            || self.commit_dirty
            || !self.out_change_replies.is_empty()
    }

    /// Takes the output accumulated since the last call. See [`Ready`] for
    /// the order in which the caller must handle it.
    pub fn ready(&mut self) -> Ready {
        self.flush_accepts();
        if std::mem::take(&mut self.commit_dirty) && self.is_leader() {
            self.broadcast_commit();
        }
        let committed = (self.applied + 1..=self.decided)
            .map(|slot| {
                let entry = self
                    .log
                    .get(&slot)
                    .expect("decided slots after the applied index are in the log");
                (slot, entry.value.clone())
            })
            .collect();
        self.applied = self.decided;
        Ready {
            snapshot: self.out_snapshot.take(),
            entries: std::mem::take(&mut self.out_entries).into_iter().collect(),
            hard_state: std::mem::take(&mut self.hard_dirty).then(|| HardState {
                promised: self.promised.clone(),
                decided: self.decided,
            }),
            messages: std::mem::take(&mut self.out_messages),
            committed,
            change_replies: std::mem::take(&mut self.out_change_replies),
        }
    }

    /// Acknowledges that `ready` was stored, sent and applied.
    pub fn advance(&mut self, ready: Ready) {
        debug_assert!(
            ready
                .committed
                .last()
                .is_none_or(|(s, _)| *s <= self.applied),
            "advance with a Ready this node did not produce"
        );
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> Status {
        let role = match (&self.config, &self.leadership) {
            (None, _) => Role::Joining,
            (_, Some(l)) if l.established => Role::Leader,
            (_, Some(_)) => Role::Candidate,
            (Some(c), None) if c.is_voter(&self.id) => Role::Follower,
            (Some(_), None) => Role::Learner,
        };
        let progress = self.leadership.as_ref().filter(|l| l.established);
        let members = self
            .config
            .iter()
            .flat_map(|c| {
                c.members().map(|id| {
                    let known = progress.and_then(|l| l.progress.get(id));
                    let (decided, heard) = if *id == self.id {
                        (Some(self.decided), Some(0))
                    } else if let Some(p) = known {
                        (Some(p.decided), Some(self.now - p.heard_tick))
                    } else if Some(id) == self.leader.as_ref() {
                        (
                            Some(self.known_decided),
                            Some(self.now - self.leader_heard_tick),
                        )
                    } else {
                        (None, None)
                    };
                    MemberStatus {
                        id: id.clone(),
                        voter: c.is_voter(id),
                        decided,
                        last_heard_ticks: heard,
                    }
                })
            })
            .collect();
        Status {
            id: self.id.clone(),
            role,
            leader: self.leader.clone(),
            ballot: self.promised.clone(),
            epoch: self.config.as_ref().map_or(0, |c| c.epoch),
            decided: self.decided,
            members,
            elections_started: self.elections_started,
        }
    }

    // ----- Joining and bootstrap -----

    fn tick_joining(&mut self) {
        let peers: Vec<String> = self
            .options
            .peers
            .iter()
            .filter(|p| **p != self.id.name)
            .cloned()
            .collect();
        if peers.is_empty() {
            self.bootstrap();
            return;
        }
        if self
            .join_sent
            .is_none_or(|t| self.now - t >= JOIN_INTERVAL_TICKS)
        {
            self.join_sent = Some(self.now);
            for peer in peers {
                self.send(NodeId::any(peer), Body::Join { hops: 0 });
            }
            if let Some(leader) = self.leader.clone() {
                self.send(leader, Body::Join { hops: 0 });
            }
        }
    }

    fn on_join(&mut self, from: NodeId, hops: u8) {
        let Some(config) = self.config.clone() else {
            if hops == 0 {
                self.send(from, Body::JoinReply { has_config: false });
            }
            return;
        };
        if from.incarnation == 0 || config.is_member(&from) {
            return;
        }
        if hops == 0 {
            self.send(from.clone(), Body::JoinReply { has_config: true });
        }
        if let Some(l) = self.leadership.as_mut().filter(|l| l.established) {
            if from.name != self.id.name
                && (l.joins.len() < JOINS_PENDING_MAX || l.joins.contains_key(&from.name))
            {
                l.joins.insert(from.name.clone(), from);
            }
            return;
        }
        if hops >= JOIN_HOPS_MAX {
            return;
        }
        // Passed on towards the leader on the joiner's behalf (the joiner's
        // seed list may name only nodes that left). Without a known leader,
        // every voter this node knows of gets it, by name: this node's
        // configuration may be old, and whoever runs under the name now may
        // know the leader.
        let targets: Vec<NodeId> = match self.leader.clone().filter(|l| *l != self.id) {
            Some(leader) => vec![leader],
            None => config
                .voters
                .iter()
                .filter(|v| v.name != self.id.name && v.name != from.name)
                .map(|v| NodeId::any(v.name.clone()))
                .collect(),
        };
        for to in targets {
            self.out_messages.push(Message {
                from: from.clone(),
                to,
                body: Body::Join { hops: hops + 1 },
            });
        }
    }

    fn on_join_reply(&mut self, from: NodeId, has_config: bool) {
        if self.config.is_some() {
            return;
        }
        self.cluster_exists |= has_config;
        self.join_replies.insert(from.name, has_config);
        // Bootstrap rule: the seed-list node with the smallest name creates the
        // cluster, and only once every other seed-list node said it has none.
        let is_seed = self.options.peers.iter().all(|p| self.id.name <= *p);
        let all_empty = self
            .options
            .peers
            .iter()
            .filter(|p| **p != self.id.name)
            .all(|p| self.join_replies.get(p) == Some(&false));
        if is_seed && all_empty && !self.cluster_exists {
            self.bootstrap();
        }
    }

    fn bootstrap(&mut self) {
        let snapshot = Snapshot {
            index: 0,
            config: Config::bootstrap(self.id.clone()),
            data: Vec::new(),
        };
        self.install(snapshot);
        self.start_election();
    }

    // ----- Elections (phase 1) -----

    fn start_election(&mut self) {
        if !self.is_voter() {
            return;
        }
        let round = self.promised.round.max(self.round_seen) + 1;
        let ballot = Ballot {
            round,
            leader: self.id.clone(),
        };
        self.leadership = None;
        self.set_promised(ballot.clone());
        self.elections_started += 1;
        self.leader = None;
        self.leadership = Some(Leadership {
            ballot,
            established: false,
            phase1: None,
            next_slot: self.decided + 1,
            stop_sign: None,
            inflight: BTreeMap::new(),
            queue: VecDeque::new(),
            progress: BTreeMap::new(),
            joins: BTreeMap::new(),
            invites: BTreeSet::new(),
            quorum_check_tick: self.now,
        });
        self.reset_election_deadline();
        self.heartbeat_due = self.now + self.options.heartbeat_ticks;
        self.begin_phase1(self.decided + 1);
    }

    fn begin_phase1(&mut self, from_slot: u64) {
        let config = self.config.clone().expect("a voter has a configuration");
        let own: Vec<(u64, LogEntry)> = self
            .log
            .range(from_slot..)
            .map(|(s, e)| (*s, e.clone()))
            .collect();
        let l = self
            .leadership
            .as_mut()
            .expect("phase 1 runs while leading");
        let ballot = l.ballot.clone();
        let targets: Vec<NodeId> = config
            .voters
            .iter()
            .filter(|v| **v != self.id)
            .cloned()
            .collect();
        l.phase1 = Some(Phase1 {
            from_slot,
            config,
            promises: BTreeMap::from([(self.id.clone(), own)]),
        });
        for to in targets {
            self.send(
                to,
                Body::Prepare {
                    ballot: ballot.clone(),
                    from_slot,
                },
            );
        }
        self.check_phase1();
    }

    fn on_prepare(&mut self, from: NodeId, ballot: Ballot, from_slot: u64) {
        if ballot.leader != from {
            return;
        }
        self.round_seen = self.round_seen.max(ballot.round);
        if ballot < self.promised {
            self.send(
                from,
                Body::Reject {
                    promised: self.promised.clone(),
                },
            );
            return;
        }
        // Leader stickiness: while a leader is alive, ignore candidates, so a
        // node cut off from the leader alone cannot depose it.
        if ballot > self.promised
            && self.leader_is_alive()
            && self.leader.as_ref() != Some(&ballot.leader)
        {
            return;
        }
        self.set_promised(ballot.clone());
        self.reset_election_deadline();
        let entries = if self.decided >= from_slot {
            Vec::new()
        } else {
            // Every entry, never a prefix: a leader fills slots missing from
            // the promises with no-ops, so a cut-off report could overwrite a
            // chosen value. The set is small: entries past this acceptor's
            // decided index, which leaders keep within their in-flight window.
            self.log
                .range(from_slot..)
                .map(|(s, e)| (*s, e.clone()))
                .collect()
        };
        self.send(
            from,
            Body::Promise {
                ballot,
                decided: self.decided,
                entries,
            },
        );
    }

    fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        decided: u64,
        entries: Vec<(u64, LogEntry)>,
    ) {
        let now = self.now;
        let Some(l) = self.leadership.as_mut().filter(|l| l.ballot == ballot) else {
            return;
        };
        let Some(p) = l.phase1.as_mut() else {
            return;
        };
        if !p.config.is_voter(&from) {
            return;
        }
        let progress = l.progress.entry(from.clone()).or_default();
        progress.decided = decided;
        progress.heard_tick = now;
        if decided > self.decided {
            // The acceptor knows decisions this node does not: learn them
            // first rather than lead with a stale configuration.
            self.fall_behind(from, decided);
            return;
        }
        p.promises.insert(from, entries);
        self.check_phase1();
    }

    fn check_phase1(&mut self) {
        let Some(l) = self.leadership.as_mut() else {
            return;
        };
        let Some(p) = l.phase1.as_ref() else {
            return;
        };
        if p.promises.len() < p.config.quorum() {
            return;
        }
        let p = l.phase1.take().expect("checked above");
        // The value each slot must carry: the one accepted in the highest ballot.
        let mut best: BTreeMap<u64, LogEntry> = BTreeMap::new();
        for (slot, entry) in p.promises.into_values().flatten() {
            if slot < p.from_slot {
                continue;
            }
            match best.get(&slot) {
                Some(known) if known.ballot >= entry.ballot => {}
                _ => {
                    best.insert(slot, entry);
                }
            }
        }
        let last = best.keys().next_back().copied().unwrap_or(0);
        l.established = true;
        l.next_slot = p.from_slot;
        l.quorum_check_tick = self.now;
        self.leader = Some(self.id.clone());
        self.leader_heard_tick = self.now;
        for slot in p.from_slot..=last {
            let value = best.remove(&slot).map_or(Value::Noop, |e| e.value);
            let is_change = matches!(value, Value::Change(_));
            self.propose_at(slot, value);
            if is_change {
                // Stop-sign: slots after it belong to the next configuration,
                // whose own phase 1 recovers them.
                self.leadership.as_mut().expect("leading").stop_sign = Some(slot);
                break;
            }
        }
        self.commit_dirty = true;
        self.try_decide();
        self.drain_queue();
    }

    // ----- Proposals (phase 2) -----

    /// Whether `change` is proposed and not decided yet, or queued.
    fn is_pending(&self, change: &ConfigChange) -> bool {
        let Some(l) = &self.leadership else {
            return false;
        };
        let wanted = Value::Change(change.clone());
        l.stop_sign
            .and_then(|slot| l.inflight.get(&slot))
            .is_some_and(|i| i.value == wanted)
            || l.queue.contains(&wanted)
    }

    fn change_pending(&self, l: &Leadership) -> bool {
        l.stop_sign.is_some() || l.queue.iter().any(|v| matches!(v, Value::Change(_)))
    }

    fn can_propose_now(&self) -> bool {
        self.leadership.as_ref().is_some_and(|l| {
            l.established
                && l.phase1.is_none()
                && l.stop_sign.is_none()
                && l.inflight.len() < PROPOSALS_IN_FLIGHT_MAX
        })
    }

    fn propose_value(&mut self, value: Value) -> Result<Proposal, Error> {
        let Some(l) = self.leadership.as_ref().filter(|l| l.established) else {
            return Err(Error::NotLeader {
                leader: self.leader.clone(),
            });
        };
        if l.queue.is_empty() && self.can_propose_now() {
            let slot = l.next_slot;
            let is_change = matches!(value, Value::Change(_));
            self.propose_at(slot, value);
            if is_change {
                self.leadership.as_mut().expect("leading").stop_sign = Some(slot);
            }
            self.try_decide();
            return Ok(Proposal::Slot(slot));
        }
        let l = self.leadership.as_mut().expect("leading");
        if l.queue.len() >= PROPOSAL_QUEUE_MAX {
            return Err(Error::Busy);
        }
        l.queue.push_back(value);
        Ok(Proposal::Queued)
    }

    fn drain_queue(&mut self) {
        while self.can_propose_now() {
            let l = self.leadership.as_mut().expect("leading");
            let Some(value) = l.queue.pop_front() else {
                return;
            };
            let slot = l.next_slot;
            if let Value::Change(change) = &value {
                let config = self.config.as_ref().expect("a leader has a configuration");
                if config.check(change).is_err() {
                    continue;
                }
                self.propose_at(slot, value);
                self.leadership.as_mut().expect("leading").stop_sign = Some(slot);
            } else {
                self.propose_at(slot, value);
            }
            self.try_decide();
        }
    }

    fn propose_at(&mut self, slot: u64, value: Value) {
        let l = self.leadership.as_mut().expect("only a leader proposes");
        debug_assert!(slot > self.decided, "proposing a decided slot");
        let entry = LogEntry {
            ballot: l.ballot.clone(),
            value: value.clone(),
        };
        l.inflight.insert(
            slot,
            Inflight {
                value,
                accepted: BTreeSet::from([self.id.clone()]),
            },
        );
        l.next_slot = slot + 1;
        self.log.insert(slot, entry.clone());
        self.out_entries.insert(slot, entry);
        self.pending_accept.push(slot);
    }

    fn flush_accepts(&mut self) {
        let slots = std::mem::take(&mut self.pending_accept);
        let Some(l) = self.leadership.as_ref().filter(|l| l.established) else {
            return;
        };
        let entries: Vec<(u64, Value)> = slots
            .iter()
            .filter_map(|s| l.inflight.get(s).map(|i| (*s, i.value.clone())))
            .collect();
        if entries.is_empty() {
            return;
        }
        let ballot = l.ballot.clone();
        let voters: Vec<NodeId> = self
            .config
            .as_ref()
            .expect("a leader has a configuration")
            .voters
            .iter()
            .filter(|v| **v != self.id)
            .cloned()
            .collect();
        for to in voters {
            self.send(
                to,
                Body::Accept {
                    ballot: ballot.clone(),
                    entries: entries.clone(),
                    decided: self.decided,
                },
            );
        }
    }

    fn on_accept(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(u64, Value)>,
        decided: u64,
    ) {
        if ballot < self.promised {
            self.send(
                from,
                Body::Reject {
                    promised: self.promised.clone(),
                },
            );
            return;
        }
        if ballot.leader != from {
            return;
        }
        self.set_promised(ballot.clone());
        self.observe_leader(from.clone(), decided);
        let base = self.snapshot.as_ref().map_or(0, |s| s.index);
        let mut slots = Vec::with_capacity(entries.len());
        for (slot, value) in entries {
            if slot <= base {
                continue;
            }
            // A decided slot keeps its value. A leader re-proposing it sends the
            // same value (and may count this vote); a stale leader with a lower
            // ballot than the deciding one may not, and gets no vote.
            if slot <= self.decided && self.log.get(&slot).is_some_and(|e| e.value != value) {
                continue;
            }
            let entry = LogEntry {
                ballot: ballot.clone(),
                value,
            };
            self.log.insert(slot, entry.clone());
            self.out_entries.insert(slot, entry);
            slots.push(slot);
        }
        self.send(
            from,
            Body::Accepted {
                ballot: ballot.clone(),
                slots,
                decided: self.decided,
            },
        );
        self.follow_commit(&ballot, decided);
    }

    fn on_accepted(&mut self, from: NodeId, ballot: Ballot, slots: Vec<u64>, decided: u64) {
        let now = self.now;
        let Some(l) = self
            .leadership
            .as_mut()
            .filter(|l| l.established && l.ballot == ballot)
        else {
            return;
        };
        let progress = l.progress.entry(from.clone()).or_default();
        progress.decided = progress.decided.max(decided);
        progress.heard_tick = now;
        if decided > self.decided {
            self.fall_behind(from, decided);
            return;
        }
        if !self.config.as_ref().is_some_and(|c| c.is_voter(&from)) {
            return;
        }
        for slot in slots {
            if let Some(inflight) = l.inflight.get_mut(&slot) {
                inflight.accepted.insert(from.clone());
            }
        }
        self.try_decide();
        self.drain_queue();
    }

    fn try_decide(&mut self) {
        loop {
            let Some(l) = self.leadership.as_mut().filter(|l| l.established) else {
                return;
            };
            let config = self.config.as_ref().expect("a leader has a configuration");
            let slot = self.decided + 1;
            let Some(inflight) = l.inflight.get(&slot) else {
                return;
            };
            let votes = inflight
                .accepted
                .iter()
                .filter(|id| config.is_voter(id))
                .count();
            if votes < config.quorum() {
                return;
            }
            l.inflight.remove(&slot);
            self.commit_dirty = true;
            self.advance_decided(slot);
        }
    }

    /// Marks every stored slot up to `slot` decided and applies configuration
    /// changes among them.
    fn advance_decided(&mut self, slot: u64) {
        let mut changed = false;
        while self.decided < slot {
            let next = self.decided + 1;
            let Some(entry) = self.log.get(&next) else {
                break;
            };
            if let Value::Change(change) = &entry.value {
                if let ConfigChange::Remove(removed) = change
                    && *removed != self.id
                    && self.is_leader()
                    && self.farewells.len() < JOINS_PENDING_MAX
                {
                    self.farewells.push(removed.clone());
                }
                let config = self
                    .config
                    .as_ref()
                    .expect("a node deciding slots has a configuration")
                    .apply(change);
                self.configs.insert(next, config.clone());
                self.config = Some(config);
                changed = true;
            }
            self.decided = next;
            self.hard_dirty = true;
        }
        self.known_decided = self.known_decided.max(self.decided);
        if changed {
            self.on_config_changed();
        }
    }

    fn on_config_changed(&mut self) {
        if !self.is_voter() {
            // Removed (or never promoted): a non-voter neither leads nor stands.
            if self.leadership.is_some() {
                self.step_down();
            }
            return;
        }
        let decided = self.decided;
        let Some(l) = self.leadership.as_mut() else {
            return;
        };
        if !l.established {
            self.step_down();
            return;
        }
        if l.stop_sign.is_some_and(|s| s <= decided) {
            l.stop_sign = None;
            // The next configuration decides the slots after the stop-sign:
            // run its phase 1 with the same ballot before proposing there.
            self.begin_phase1(decided + 1);
        }
    }

    // ----- Learning decisions -----

    fn observe_leader(&mut self, leader: NodeId, decided: u64) {
        self.leader = Some(leader);
        self.leader_heard_tick = self.now;
        self.known_decided = self.known_decided.max(decided);
        self.reset_election_deadline();
    }

    fn on_commit(&mut self, from: NodeId, ballot: Ballot, decided: u64) {
        if ballot < self.promised {
            self.send(
                from,
                Body::Reject {
                    promised: self.promised.clone(),
                },
            );
            return;
        }
        if ballot.leader != from {
            return;
        }
        self.round_seen = self.round_seen.max(ballot.round);
        if self.leadership.as_ref().is_some_and(|l| l.ballot < ballot) {
            self.step_down();
        }
        self.observe_leader(from.clone(), decided);
        self.follow_commit(&ballot, decided);
        self.send(
            from,
            Body::CommitAck {
                ballot,
                decided: self.decided,
            },
        );
    }

    /// A slot this node accepted in the leader's ballot holds the value the
    /// leader decided, since a ballot proposes one value per slot; anything
    /// else is fetched.
    fn follow_commit(&mut self, ballot: &Ballot, upto: u64) {
        if self.leadership.is_some() || self.config.is_none() {
            if self.config.is_none() && upto > self.decided {
                self.request_catch_up(ballot.leader.clone());
            }
            return;
        }
        while self.decided < upto {
            match self.log.get(&(self.decided + 1)) {
                Some(entry) if entry.ballot == *ballot => self.advance_decided(self.decided + 1),
                _ => break,
            }
        }
        if self.decided < upto {
            self.request_catch_up(ballot.leader.clone());
        }
    }

    fn request_catch_up(&mut self, to: NodeId) {
        if self.catch_up_sent.is_some() {
            return;
        }
        self.catch_up_sent = Some(self.now);
        self.catch_up_from = Some(to.clone());
        self.send(
            to,
            Body::CatchUpRequest {
                from_slot: self.decided + 1,
                has_base: self.snapshot.is_some(),
            },
        );
    }

    fn on_catch_up_request(&mut self, from: NodeId, from_slot: u64, has_base: bool) {
        let Some(snapshot) = &self.snapshot else {
            return;
        };
        if !has_base || from_slot <= snapshot.index {
            let snapshot = snapshot.clone();
            self.send(from, Body::InstallSnapshot { snapshot });
            return;
        }
        if from_slot > self.decided {
            return;
        }
        let last = self
            .decided
            .min(from_slot + CATCH_UP_ENTRIES_MAX as u64 - 1);
        let entries = (from_slot..=last)
            .map_while(|s| self.log.get(&s).map(|e| (s, e.clone())))
            .collect();
        self.send(
            from,
            Body::CatchUp {
                entries,
                decided: self.decided,
            },
        );
    }

    /// Leaders never learn decisions from others: a leader's decided prefix
    /// past its election comes only from its own quorums, which is what makes
    /// `follow_commit`'s ballot match sound.
    fn may_learn(&mut self) -> bool {
        match &self.leadership {
            Some(l) if l.established => false,
            Some(_) => {
                self.step_down();
                true
            }
            None => true,
        }
    }

    fn on_catch_up(&mut self, from: NodeId, entries: Vec<(u64, LogEntry)>, decided: u64) {
        if self.config.is_none() || !self.may_learn() {
            return;
        }
        self.catch_up_sent = None;
        self.known_decided = self.known_decided.max(decided);
        for (slot, entry) in entries {
            if slot != self.decided + 1 {
                continue;
            }
            self.log.insert(slot, entry.clone());
            self.out_entries.insert(slot, entry);
            self.advance_decided(slot);
        }
        if self.decided < decided {
            self.request_catch_up(from);
        }
    }

    fn on_install_snapshot(&mut self, from: NodeId, snapshot: Snapshot) {
        if !self.may_learn() {
            return;
        }
        self.catch_up_sent = None;
        if self.config.is_some() && snapshot.index <= self.decided {
            return;
        }
        self.known_decided = self.known_decided.max(snapshot.index);
        self.install(snapshot);
        if self.known_decided > self.decided {
            self.request_catch_up(from);
        }
    }

    fn install(&mut self, snapshot: Snapshot) {
        let index = snapshot.index;
        self.log.retain(|slot, _| *slot > index);
        self.out_entries.retain(|slot, _| *slot > index);
        self.decided = index;
        self.applied = index;
        self.known_decided = self.known_decided.max(index);
        self.config = Some(snapshot.config.clone());
        self.configs = BTreeMap::from([(index, snapshot.config.clone())]);
        self.snapshot = Some(snapshot.clone());
        self.out_snapshot = Some(SnapshotUpdate::Installed(snapshot));
        self.hard_dirty = true;
    }

    fn config_at(&self, index: u64) -> Config {
        self.configs
            .range(..=index)
            .next_back()
            .map(|(_, c)| c.clone())
            .expect("the snapshot's configuration is always recorded")
    }

    // ----- Leader upkeep -----

    fn heartbeat(&mut self) {
        self.heartbeat_due = self.now + self.options.heartbeat_ticks;
        let id = self.id.clone();
        let decided = self.decided;
        let Some(l) = self.leadership.as_mut() else {
            return;
        };
        let ballot = l.ballot.clone();
        let mut out = Vec::new();
        if let Some(p) = &l.phase1 {
            for voter in p
                .config
                .voters
                .iter()
                .filter(|v| !p.promises.contains_key(*v))
            {
                out.push((
                    voter.clone(),
                    Body::Prepare {
                        ballot: ballot.clone(),
                        from_slot: p.from_slot,
                    },
                ));
            }
        }
        if l.established {
            let config = self.config.as_ref().expect("a leader has a configuration");
            for member in config.members().filter(|m| **m != id) {
                out.push((
                    member.clone(),
                    Body::Commit {
                        ballot: ballot.clone(),
                        decided,
                    },
                ));
            }
            for voter in config.voters.iter().filter(|v| **v != id) {
                let entries: Vec<(u64, Value)> = l
                    .inflight
                    .iter()
                    .filter(|(_, i)| !i.accepted.contains(voter))
                    .take(RESEND_ENTRIES_MAX)
                    .map(|(s, i)| (*s, i.value.clone()))
                    .collect();
                if !entries.is_empty() {
                    out.push((
                        voter.clone(),
                        Body::Accept {
                            ballot: ballot.clone(),
                            entries,
                            decided,
                        },
                    ));
                }
            }
            l.invites.retain(|name| config.member_named(name).is_none());
            for name in &l.invites {
                out.push((NodeId::any(name.clone()), Body::Invite));
            }
        }
        for (to, body) in out {
            self.send(to, body);
        }
    }

    fn broadcast_commit(&mut self) {
        let Some(l) = self.leadership.as_ref() else {
            return;
        };
        let ballot = l.ballot.clone();
        let config = self.config.as_ref().expect("a leader has a configuration");
        let mut targets: Vec<NodeId> = config
            .members()
            .filter(|m| **m != self.id)
            .cloned()
            .collect();
        targets.append(&mut self.farewells);
        for to in targets {
            self.send(
                to,
                Body::Commit {
                    ballot: ballot.clone(),
                    decided: self.decided,
                },
            );
        }
    }

    /// Drives joins and promotions, one configuration change at a time.
    fn membership_step(&mut self) {
        if !self.can_propose_now() {
            return;
        }
        let config = self.config.clone().expect("a leader has a configuration");
        let l = self.leadership.as_mut().expect("leading");
        if l.queue.iter().any(|v| matches!(v, Value::Change(_))) {
            return;
        }
        l.joins.retain(|_, id| !config.is_member(id));
        let change = if let Some(joiner) = l.joins.values().next() {
            Some(match config.member_named(&joiner.name) {
                // The name came back with a new disk: the old incarnation is
                // gone for good and leaves before the new one enters.
                Some(old) => ConfigChange::Remove(old.clone()),
                None => ConfigChange::AddLearner(joiner.clone()),
            })
        } else {
            let now = self.now;
            let decided = self.decided;
            let election_ticks = self.options.election_ticks;
            config
                .learners
                .iter()
                .find(|learner| {
                    l.progress.get(*learner).is_some_and(|p| {
                        p.decided + PROMOTE_LAG_MAX_SLOTS >= decided
                            && now - p.heard_tick < election_ticks
                    })
                })
                .map(|learner| ConfigChange::Promote(learner.clone()))
        };
        if let Some(change) = change
            && config.check(&change).is_ok()
        {
            let _ = self.propose_value(Value::Change(change));
        }
    }

    /// A leader that has not heard from a quorum for an election timeout
    /// steps down, so clients learn quickly that it cannot decide.
    fn check_quorum(&mut self) {
        let now = self.now;
        let election_ticks = self.options.election_ticks;
        let Some(l) = self.leadership.as_mut() else {
            return;
        };
        if now < l.quorum_check_tick + 2 * election_ticks {
            return;
        }
        let since = l.quorum_check_tick;
        l.quorum_check_tick = now;
        let config = self.config.as_ref().expect("a leader has a configuration");
        let heard = config
            .voters
            .iter()
            .filter(|v| **v == self.id || l.progress.get(*v).is_some_and(|p| p.heard_tick > since))
            .count();
        if heard < config.quorum() {
            self.step_down();
        }
    }

    fn on_commit_ack(&mut self, from: NodeId, ballot: Ballot, decided: u64) {
        let now = self.now;
        if let Some(l) = self
            .leadership
            .as_mut()
            .filter(|l| l.established && l.ballot == ballot)
        {
            let progress = l.progress.entry(from.clone()).or_default();
            progress.decided = decided;
            progress.heard_tick = now;
            if decided > self.decided {
                self.fall_behind(from, decided);
            }
        }
    }

    /// A member decided slots this leader has not: they were decided under
    /// an earlier leader, and the member may have compacted them, so it can
    /// no longer vote for them. A leader never learns decisions from others,
    /// so it steps down, catches up as a follower, and may stand again.
    fn fall_behind(&mut self, ahead: NodeId, decided: u64) {
        self.step_down();
        self.known_decided = self.known_decided.max(decided);
        self.request_catch_up(ahead);
    }

    fn on_reject(&mut self, promised: Ballot) {
        self.round_seen = self.round_seen.max(promised.round);
        if self
            .leadership
            .as_ref()
            .is_some_and(|l| l.ballot < promised)
        {
            self.step_down();
        }
    }

    // ----- Utilities -----

    fn leader_is_alive(&self) -> bool {
        if self.is_leader() {
            return true;
        }
        self.leader.as_ref().is_some_and(|l| *l != self.id)
            && self.now < self.leader_heard_tick + self.options.election_ticks
    }

    fn set_promised(&mut self, ballot: Ballot) {
        if ballot > self.promised {
            self.round_seen = self.round_seen.max(ballot.round);
            self.promised = ballot;
            self.hard_dirty = true;
            if self
                .leadership
                .as_ref()
                .is_some_and(|l| l.ballot < self.promised)
            {
                self.step_down();
            }
        }
    }

    fn step_down(&mut self) {
        self.leadership = None;
        if self.leader.as_ref() == Some(&self.id) {
            self.leader = None;
        }
        self.pending_accept.clear();
        self.farewells.clear();
        self.reset_election_deadline();
    }

    fn reset_election_deadline(&mut self) {
        let base = self.options.election_ticks.max(1);
        self.election_deadline = self.now + base + self.rng.below(base);
    }

    fn send(&mut self, to: NodeId, body: Body) {
        self.out_messages.push(Message {
            from: self.id.clone(),
            to,
            body,
        });
    }
}

impl From<Error> for Refusal {
    fn from(err: Error) -> Refusal {
        match err {
            Error::ChangeInProgress => Refusal::ChangeInProgress,
            Error::Busy => Refusal::Busy,
            Error::InvalidChange(reason) => Refusal::Invalid(reason),
            Error::NotLeader { .. } | Error::NoLeader | Error::NotMember => Refusal::NotLeader,
            err @ Error::Compact { .. } => Refusal::Invalid(err.to_string()),
        }
    }
}

impl Refusal {
    /// The error a requester reports for this refusal; `leader` is the
    /// leader it follows now.
    fn into_error(self, leader: Option<NodeId>) -> Error {
        match self {
            Refusal::NotLeader => Error::NotLeader { leader },
            Refusal::ChangeInProgress => Error::ChangeInProgress,
            Refusal::Invalid(reason) => Error::InvalidChange(reason),
            Refusal::Busy => Error::Busy,
        }
    }
}
