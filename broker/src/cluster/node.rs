//! `ClusterNode`: the tokio task that owns one Paxos instance and drives it
//! with timers, the transport and durable storage, and the API the rest of
//! the broker uses. The protocol's rules live in `paxos`, not here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::Error;
use super::limits::{
    APPLIED_QUEUE_MAX, COMMANDS_MAX, INBOX_BATCH_MAX, INBOX_MESSAGES_MAX, PEERS_TRACKED_MAX,
    PENDING_CHANGES_MAX, PENDING_PROPOSALS_MAX, READY_LAG_MAX_SLOTS,
};
use super::storage::{Batch, Storage};
use super::transport::{Transport, default_advertise};
use crate::metrics::Metrics;
use crate::paxos::{
    self, ConfigChange, MemberRequest, NodeId, Options, Paxos, Role, SnapshotUpdate, Value,
};

/// How a cluster node runs.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name.
    pub node_name: String,
    /// The broker's data directory; Paxos state goes in `paxos/` inside it.
    pub data_dir: PathBuf,
    /// Seed list: node name to `host:port` of its cluster listener.
    pub peers: BTreeMap<String, String>,
    /// Address other nodes should dial; default: this node's seed-list
    /// entry, else the listener's address.
    pub advertise: Option<String>,
    /// Shared secret every peer proves in the handshake.
    pub secret: Vec<u8>,
    /// Length of one Paxos tick.
    pub tick_interval: Duration,
    /// Election timeout base, in ticks (actual: between 1x and 2x).
    pub election_ticks: u64,
    /// Heartbeat interval, in ticks.
    pub heartbeat_ticks: u64,
    /// How long `propose` and membership changes wait for a decision.
    pub request_timeout: Duration,
    /// TLS for every connection on the cluster port (both directions), when
    /// cluster TLS is on; the secret handshake runs inside it.
    pub tls: Option<std::sync::Arc<crate::tls::Certificates>>,
}

impl ClusterConfig {
    /// Defaults: 50 ms ticks, elections after 0.5–1 s, heartbeats every 100 ms.
    pub fn new(node_name: impl Into<String>, data_dir: impl Into<PathBuf>) -> ClusterConfig {
        ClusterConfig {
            node_name: node_name.into(),
            data_dir: data_dir.into(),
            peers: BTreeMap::new(),
            advertise: None,
            secret: Vec::new(),
            tick_interval: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            request_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// The cluster settings of the broker's configuration; reads the secret file.
    pub fn from_broker_config(config: &crate::config::Config) -> Result<ClusterConfig, Error> {
        let mut cluster = ClusterConfig::new(config.node_name.clone(), config.data_dir.clone());
        cluster.peers = config.peers.clone();
        cluster.advertise = config.peers.get(&config.node_name).cloned();
        if let Some(path) = &config.cluster_secret_file {
            let secret = std::fs::read(path).map_err(|source| Error::Secret {
                path: path.clone(),
                source,
            })?;
            // A trailing newline is an editor's, not part of the secret.
            let trimmed = secret.trim_ascii_end().to_vec();
            cluster.secret = trimmed;
        }
        Ok(cluster)
    }
}

/// What the application applies, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Replace the application state with this snapshot's data (empty:
    /// the initial state); entries after `index` follow.
    Snapshot {
        /// Last slot the snapshot covers.
        index: u64,
        /// The application's snapshot bytes.
        data: Vec<u8>,
    },
    /// One decided slot. Application commands are `Value::Command`; the
    /// others (no-ops, membership changes) are informational.
    Entry {
        /// The slot.
        slot: u64,
        /// Its value.
        value: Value,
    },
}

/// One member, as `GET /api/cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Node name.
    pub name: String,
    /// Disk incarnation id (hex).
    pub incarnation: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Whether this node heard from it recently; `None` when it cannot know
    /// (followers only hear from the leader).
    pub alive: Option<bool>,
    /// Slots behind the most advanced decided index this node knows.
    pub lag: Option<u64>,
}

/// This node's view of the cluster: the data of `GET /api/cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// This node's incarnation (hex).
    pub incarnation: String,
    /// `leader`, `follower`, `candidate`, `learner`, `joining` or `stopped`.
    pub role: String,
    /// Name of the leader this node follows.
    pub leader: Option<String>,
    /// Configuration epoch.
    pub epoch: u64,
    /// Highest decided slot.
    pub decided_index: u64,
    /// Round of the highest ballot promised.
    pub ballot: u64,
    /// True when this node is a caught-up member of the agreed configuration.
    pub ready: bool,
    /// Members of the agreed configuration, voters first.
    pub members: Vec<MemberInfo>,
}

enum Command {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    Remove {
        name: String,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    Add {
        name: String,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    Compact {
        index: u64,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// A running cluster member. Dropping it stops the node.
pub struct ClusterNode {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<ClusterStatus>,
    local_addr: SocketAddr,
    decided_at_start: u64,
    shutdown: watch::Sender<bool>,
    /// Shared with the driver; the data links dial and accept through it.
    transport: Transport,
    // The driver and the listener. Behind a mutex so that a node shared by
    // the broker (`Arc`) can still be stopped and awaited once.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Binds `listen` and starts the node. Decided entries arrive on the
    /// returned receiver; the node waits when it is full, so keep reading it
    /// (or drop it).
    pub async fn start(
        config: ClusterConfig,
        listen: SocketAddr,
        metrics: Metrics,
    ) -> Result<(ClusterNode, mpsc::Receiver<Applied>), Error> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Listen {
                addr: listen,
                source,
            })?;
        ClusterNode::start_with_listener(config, listener, metrics).await
    }

    /// Starts the node on an already bound listener (tests bind `127.0.0.1:0` first).
    pub async fn start_with_listener(
        config: ClusterConfig,
        listener: TcpListener,
        metrics: Metrics,
    ) -> Result<(ClusterNode, mpsc::Receiver<Applied>), Error> {
        let local_addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let data_dir = config.data_dir.clone();
        let (storage, stored) = tokio::task::spawn_blocking(move || Storage::open(&data_dir))
            .await
            .map_err(|_| Error::Stopped)??;
        let id = NodeId::new(config.node_name.clone(), storage.incarnation);
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| default_advertise(local_addr));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let transport = Transport::new(
            id.clone(),
            advertise,
            config.secret.clone(),
            config.peers.clone(),
            config.tls.clone(),
            shutdown_rx.clone(),
        );
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_MESSAGES_MAX);
        // Awaited on stop, so that the port is free once `stop` returns.
        let listen_task = transport.listen(listener, inbox_tx);
        let (applied_tx, applied_rx) = mpsc::channel(APPLIED_QUEUE_MAX);
        // The application restores the stored snapshot; entries after it
        // are delivered again by the first Ready.
        if let Some(snapshot) = &stored.snapshot {
            let _ = applied_tx
                .send(Applied::Snapshot {
                    index: snapshot.index,
                    data: snapshot.data.clone(),
                })
                .await;
        }
        let mut options = Options::new(
            id.clone(),
            config.peers.keys().cloned().collect(),
            rand::random(),
        );
        options.election_ticks = config.election_ticks;
        options.heartbeat_ticks = config.heartbeat_ticks;
        let decided_at_start = stored.hard_state.as_ref().map_or(0, |h| h.decided);
        let paxos = Paxos::restore(options, stored);
        let (status_tx, status_rx) = watch::channel(stopped_status(&id));
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
        let driver = Driver {
            paxos,
            storage: Some(storage),
            transport: transport.clone(),
            metrics,
            applied_tx,
            status_tx,
            pending: Vec::new(),
            pending_changes: Vec::new(),
            elections_counted: 0,
            last_seen: BTreeMap::new(),
            next_request: rand::random(),
            config,
        };
        let task = tokio::spawn(driver.run(inbox_rx, commands_rx, shutdown_rx));
        Ok((
            ClusterNode {
                commands: commands_tx,
                status: status_rx,
                local_addr,
                decided_at_start,
                shutdown: shutdown_tx,
                transport,
                tasks: std::sync::Mutex::new(vec![task, listen_task]),
            },
            applied_rx,
        ))
    }

    /// The cluster transport: the data links (`cluster::forward`) use the
    /// same port and handshake as Paxos traffic.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The address the cluster listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The decided index found on disk at start: the application has
    /// replayed its stored state once it has applied this slot.
    pub fn decided_at_start(&self) -> u64 {
        self.decided_at_start
    }

    /// This node's current view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        self.status.borrow().clone()
    }

    /// A receiver notified whenever the status changes.
    pub fn watch_status(&self) -> watch::Receiver<ClusterStatus> {
        self.status.clone()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Proposes a command; resolves with its slot once it is decided (and
    /// handed to the application receiver) on this node.
    pub async fn propose(&self, data: Vec<u8>) -> Result<u64, Error> {
        self.request(|reply| Command::Propose { data, reply }).await
    }

    /// Adds the node named `name` (it must be running, with this cluster in
    /// its seed list or having been a member); resolves once it is a voter.
    /// Works on any member: a follower passes the request to the leader.
    pub async fn add_member(&self, name: &str) -> Result<u64, Error> {
        let name = name.to_string();
        self.request(|reply| Command::Add { name, reply }).await
    }

    /// Removes the member named `name`; resolves once decided. Works on any
    /// member: a follower passes the request to the leader.
    pub async fn remove_member(&self, name: &str) -> Result<u64, Error> {
        let name = name.to_string();
        self.request(|reply| Command::Remove { name, reply }).await
    }

    /// Replaces the log up to `index` (already applied) by the application's
    /// snapshot `data` of that state.
    pub async fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), Error> {
        self.request(|reply| Command::Compact { index, data, reply })
            .await
    }

    /// Stops the node: closes its listener and connections and waits for
    /// its driver and listener tasks.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    /// Stops the node through a shared reference; later calls return at once.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn stopped_status(id: &NodeId) -> ClusterStatus {
    ClusterStatus {
        node: id.name.clone(),
        incarnation: format!("{:016x}", id.incarnation),
        role: "stopped".into(),
        leader: None,
        epoch: 0,
        decided_index: 0,
        ballot: 0,
        ready: false,
        members: Vec::new(),
    }
}

struct PendingProposal {
    data: Vec<u8>,
    reply: oneshot::Sender<Result<u64, Error>>,
    started: Instant,
    deadline: Instant,
    submitted: bool,
}

enum Awaited {
    /// A removal of this identity.
    Removal(NodeId),
    /// Any identity of this name becoming a voter.
    VoterNamed(String),
}

struct PendingChange {
    awaited: Awaited,
    reply: oneshot::Sender<Result<u64, Error>>,
    deadline: Instant,
    /// Id of the request in the leader's `ChangeReply`.
    request: u64,
    change: MemberRequest,
    /// The leader moved before taking the request up: ask the new one on
    /// the next tick.
    resend: bool,
    /// The leader took the request up; later answers (to copies) are moot.
    answered: bool,
    /// Ticks since the request was last sent; unanswered, it is sent again
    /// (a connection that broke may have lost it).
    ticks_unanswered: u64,
}

struct Driver {
    paxos: Paxos,
    storage: Option<Storage>,
    transport: Transport,
    metrics: Metrics,
    applied_tx: mpsc::Sender<Applied>,
    status_tx: watch::Sender<ClusterStatus>,
    pending: Vec<PendingProposal>,
    pending_changes: Vec<PendingChange>,
    elections_counted: u64,
    /// When a message from each identity last arrived (liveness for status).
    last_seen: BTreeMap<NodeId, Instant>,
    /// Id of the next membership request; starts at a random value so that
    /// a late reply to a request of a previous run matches nothing.
    next_request: u64,
    config: ClusterConfig,
}

impl Driver {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<paxos::Message>,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.config.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = ticker.tick() => {
                    self.paxos.tick();
                    self.on_tick();
                }
                msg = inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.step(msg);
                    for _ in 1..INBOX_BATCH_MAX {
                        match inbox.try_recv() {
                            Ok(msg) => self.step(msg),
                            Err(_) => break,
                        }
                    }
                }
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    self.on_command(command);
                    while let Ok(command) = commands.try_recv() {
                        self.on_command(command);
                    }
                }
            }
            if self.paxos.has_ready()
                && let Err(err) = self.handle_ready().await
            {
                // Continuing after a failed write could break a promise
                // already made; stop instead.
                tracing::error!(%err, "paxos storage failed; stopping the cluster node");
                break;
            }
            self.publish_status();
        }
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(Error::Stopped));
        }
        for c in self.pending_changes.drain(..) {
            let _ = c.reply.send(Err(Error::Stopped));
        }
        let mut status = stopped_status(self.paxos.id());
        status.decided_index = self.paxos.decided();
        self.status_tx.send_replace(status);
        self.metrics.paxos_is_leader.set(0);
    }

    fn step(&mut self, msg: paxos::Message) {
        if self.last_seen.len() < PEERS_TRACKED_MAX || self.last_seen.contains_key(&msg.from) {
            self.last_seen.insert(msg.from.clone(), Instant::now());
        }
        self.paxos.step(msg);
    }

    fn on_command(&mut self, command: Command) {
        let deadline = Instant::now() + self.config.request_timeout;
        match command {
            Command::Propose { data, reply } => {
                if self.pending.len() >= PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(Error::Busy));
                    return;
                }
                let mut pending = PendingProposal {
                    data,
                    reply,
                    started: Instant::now(),
                    deadline,
                    submitted: false,
                };
                match self.paxos.propose(pending.data.clone()) {
                    Ok(_) => pending.submitted = true,
                    Err(paxos::Error::NotMember) => {
                        let _ = pending.reply.send(Err(Error::NotMember));
                        return;
                    }
                    // No leader yet (or the leader is busy): retried on ticks.
                    Err(_) => {}
                }
                self.pending.push(pending);
            }
            Command::Remove { name, reply } => {
                let Some(id) = self
                    .paxos
                    .config()
                    .and_then(|c| c.member_named(&name))
                    .cloned()
                else {
                    let _ = reply.send(Err(Error::UnknownMember(name)));
                    return;
                };
                let change = MemberRequest::Remove(id.clone());
                self.request_change(change, Awaited::Removal(id), reply, deadline);
            }
            Command::Add { name, reply } => {
                if self
                    .paxos
                    .config()
                    .and_then(|c| c.member_named(&name).map(|id| c.is_voter(id)))
                    == Some(true)
                {
                    let _ = reply.send(Ok(self.paxos.decided()));
                    return;
                }
                let change = MemberRequest::Add(name.clone());
                self.request_change(change, Awaited::VoterNamed(name), reply, deadline);
            }
            Command::Compact { index, data, reply } => {
                let _ = reply.send(self.paxos.compact(index, data).map_err(Error::from));
            }
        }
    }

    /// Asks the leader (this node or another) for `change`, then waits for
    /// its decision in the log.
    fn request_change(
        &mut self,
        change: MemberRequest,
        awaited: Awaited,
        reply: oneshot::Sender<Result<u64, Error>>,
        deadline: Instant,
    ) {
        if self.pending_changes.len() >= PENDING_CHANGES_MAX {
            let _ = reply.send(Err(Error::Busy));
            return;
        }
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        match self.paxos.request_change(request, change.clone()) {
            Ok(proposal) => self.pending_changes.push(PendingChange {
                awaited,
                reply,
                deadline,
                request,
                change,
                resend: false,
                answered: !matches!(proposal, paxos::Proposal::Forwarded(_)),
                ticks_unanswered: 0,
            }),
            Err(err) => {
                let _ = reply.send(Err(Error::from(err)));
            }
        }
    }

    /// The leader's answer to a forwarded request: taken up (wait for the
    /// decision), refused (tell the caller why), or sent to a node that no
    /// longer leads (ask again).
    fn on_change_reply(&mut self, request: u64, outcome: Result<(), paxos::Error>) {
        let Some(i) = self
            .pending_changes
            .iter()
            .position(|c| c.request == request)
        else {
            return;
        };
        let c = &mut self.pending_changes[i];
        if c.answered {
            return;
        }
        match outcome {
            Ok(()) => c.answered = true,
            Err(paxos::Error::NotLeader { .. }) => c.resend = true,
            Err(err) => {
                let c = self.pending_changes.swap_remove(i);
                let _ = c.reply.send(Err(Error::from(err)));
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let has_leader = self.paxos.leader().is_some();
        let mut i = 0;
        while i < self.pending.len() {
            if now >= self.pending[i].deadline {
                let p = self.pending.swap_remove(i);
                let err = if p.submitted || has_leader {
                    Error::Timeout
                } else {
                    Error::NoQuorum
                };
                let _ = p.reply.send(Err(err));
                continue;
            }
            if !self.pending[i].submitted
                && self.paxos.propose(self.pending[i].data.clone()).is_ok()
            {
                self.pending[i].submitted = true;
            }
            i += 1;
        }
        let mut i = 0;
        while i < self.pending_changes.len() {
            if now >= self.pending_changes[i].deadline {
                let c = self.pending_changes.swap_remove(i);
                let err = if has_leader {
                    Error::Timeout
                } else {
                    Error::NoQuorum
                };
                let _ = c.reply.send(Err(err));
                continue;
            }
            let c = &mut self.pending_changes[i];
            c.ticks_unanswered += 1;
            if !c.answered && c.ticks_unanswered >= self.config.election_ticks {
                c.resend = true;
            }
            if c.resend {
                c.ticks_unanswered = 0;
                match self.paxos.request_change(c.request, c.change.clone()) {
                    Ok(proposal) => {
                        c.resend = false;
                        c.answered = !matches!(proposal, paxos::Proposal::Forwarded(_));
                    }
                    // Still no leader to ask: keep trying until the deadline.
                    Err(paxos::Error::NoLeader | paxos::Error::NotLeader { .. }) => {}
                    Err(err) => {
                        let c = self.pending_changes.swap_remove(i);
                        let _ = c.reply.send(Err(Error::from(err)));
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    async fn handle_ready(&mut self) -> Result<(), Error> {
        let mut ready = self.paxos.ready();
        let batch = Batch {
            snapshot: ready.snapshot.as_ref().map(|u| u.snapshot().clone()),
            entries: std::mem::take(&mut ready.entries),
            hard_state: ready.hard_state.take(),
        };
        if !batch.is_empty() {
            let mut storage = self
                .storage
                .take()
                .expect("storage is put back after each write");
            let (storage, result) = tokio::task::spawn_blocking(move || {
                let result = storage.persist(&batch);
                (storage, result)
            })
            .await
            .map_err(|_| Error::Stopped)?;
            self.storage = Some(storage);
            result?;
        }
        for msg in &ready.messages {
            self.transport.send(msg);
        }
        if let Some(SnapshotUpdate::Installed(snapshot)) = &ready.snapshot {
            let _ = self
                .applied_tx
                .send(Applied::Snapshot {
                    index: snapshot.index,
                    data: snapshot.data.clone(),
                })
                .await;
        }
        for (request, outcome) in std::mem::take(&mut ready.change_replies) {
            self.on_change_reply(request, outcome);
        }
        for (slot, value) in std::mem::take(&mut ready.committed) {
            self.resolve(slot, &value);
            let _ = self.applied_tx.send(Applied::Entry { slot, value }).await;
        }
        self.paxos.advance(ready);
        Ok(())
    }

    fn resolve(&mut self, slot: u64, value: &Value) {
        match value {
            Value::Command(data) => {
                if let Some(i) = self
                    .pending
                    .iter()
                    .position(|p| p.submitted && p.data == *data)
                {
                    let p = self.pending.swap_remove(i);
                    self.metrics
                        .paxos_commit_latency_seconds
                        .observe(p.started.elapsed().as_secs_f64());
                    let _ = p.reply.send(Ok(slot));
                }
            }
            Value::Change(change) => {
                let done = |awaited: &Awaited| match (awaited, change) {
                    (Awaited::Removal(id), ConfigChange::Remove(removed)) => id == removed,
                    (Awaited::VoterNamed(name), ConfigChange::Promote(id)) => id.name == *name,
                    _ => false,
                };
                let mut i = 0;
                while i < self.pending_changes.len() {
                    if done(&self.pending_changes[i].awaited) {
                        let c = self.pending_changes.swap_remove(i);
                        let _ = c.reply.send(Ok(slot));
                    } else {
                        i += 1;
                    }
                }
            }
            Value::Noop => {}
        }
    }

    fn publish_status(&mut self) {
        let s = self.paxos.status();
        let status = ClusterStatus {
            node: s.id.name.clone(),
            incarnation: format!("{:016x}", s.id.incarnation),
            role: match s.role {
                Role::Joining => "joining",
                Role::Learner => "learner",
                Role::Follower => "follower",
                Role::Candidate => "candidate",
                Role::Leader => "leader",
            }
            .into(),
            leader: s.leader.as_ref().map(|l| l.name.clone()),
            epoch: s.epoch,
            decided_index: s.decided,
            ballot: s.ballot.round,
            ready: false,
            members: Vec::new(),
        };
        let best = s
            .members
            .iter()
            .filter_map(|m| m.decided)
            .max()
            .unwrap_or(s.decided);
        let alive_ticks = 2 * self.config.election_ticks;
        let alive_within = self.config.tick_interval * alive_ticks as u32;
        let members: Vec<MemberInfo> = s
            .members
            .iter()
            .map(|m| MemberInfo {
                name: m.id.name.clone(),
                incarnation: format!("{:016x}", m.id.incarnation),
                role: if m.voter { "voter" } else { "learner" }.into(),
                alive: m.last_heard_ticks.map(|t| t < alive_ticks).or_else(|| {
                    // Followers hear from few peers; what did arrive still counts.
                    self.last_seen
                        .get(&m.id)
                        .map(|seen| seen.elapsed() < alive_within)
                }),
                lag: m.decided.map(|d| best.saturating_sub(d)),
            })
            .collect();
        let is_member = s.members.iter().any(|m| m.id == s.id);
        let ready = is_member
            && s.leader.is_some()
            && best.saturating_sub(s.decided) <= READY_LAG_MAX_SLOTS;
        let status = ClusterStatus {
            ready,
            members,
            ..status
        };
        let elections = s.elections_started;
        if elections > self.elections_counted {
            self.metrics
                .paxos_elections_total
                .inc_by(elections - self.elections_counted);
            self.elections_counted = elections;
        }
        self.metrics
            .paxos_is_leader
            .set(i64::from(s.role == Role::Leader));
        self.metrics.paxos_epoch.set(s.epoch as i64);
        self.metrics.paxos_decided_index.set(s.decided as i64);
        self.metrics.paxos_ballot.set(s.ballot.round as i64);
        self.metrics.cluster_members.set(s.members.len() as i64);
        self.status_tx.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }
}
