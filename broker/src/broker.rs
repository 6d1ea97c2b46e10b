//! The broker facade: one [`Broker`] per node holds the metadata (changed
//! only through `meta::Command`s), the runtime queues, the registry of open
//! connections, and the operations the AMQP connections and the management
//! API share (publish, dead-lettering, listing, closing connections).
//!
//! Must not: touch sockets (that is `connection`), or hold the metadata
//! lock while calling into a queue that may call back.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, SystemTime};

use amq_protocol::types::FieldTable;
use tokio::sync::{mpsc, watch};

use crate::auth;
use crate::connection::Outbound;
use crate::exchange::Binding;
use crate::message::Message;
use crate::meta::{
    Command, ExchangeDef, MetaError, Metadata, Outcome, Permissions, QueueDef, User, UserLimit,
    VhostLimit,
};
use crate::metrics::Metrics;
use crate::protocol::{AmqpError, reply};
use crate::queue::{DeadLetter, Enqueued, Queue, QueueArgs, QueueCounts};
use crate::replication::{Decision, Replication};

/// Node-level settings the broker runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (queues' home node).
    pub node_name: String,
    /// The cluster's name, as clients and the management API see it.
    pub cluster_name: String,
    /// Users that may only connect from loopback addresses.
    pub loopback_users: Vec<String>,
    /// Message bytes held in memory above which publishers are blocked
    /// (initial value; [`Broker::set_memory_high_watermark_bytes`] changes it).
    pub memory_high_watermark_bytes: u64,
    /// Free bytes on the data directory's file system below which
    /// publishers are blocked (initial value; [`Broker::set_disk_free_limit_bytes`]
    /// changes it). Checked only when the broker has a durable store.
    pub disk_free_limit_bytes: u64,
    /// The data directory whose file system the disk alarm watches.
    pub data_dir: std::path::PathBuf,
    /// Channels per connection offered in `connection.tune`.
    pub channel_max: u16,
    /// Queues the metadata may hold (all vhosts); `None` is unlimited.
    pub queues_max: Option<u64>,
    /// Consumers one channel may hold; `None` is unlimited.
    pub consumers_per_channel_max: Option<u32>,
    /// Largest message body accepted, in bytes (`--max-message-size`).
    pub message_size_max: u64,
    /// Open AMQP and AMQPS connections allowed at once.
    pub connections_max: usize,
    /// Connections over `connections_max` taken through the handshake at
    /// once to be refused with `530`; beyond, sockets are closed at accept.
    pub connections_refusing_max: usize,
    /// Time a client has to finish the TLS and AMQP handshakes, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Failed logins from one address, within `auth_failure_window_ms`,
    /// after which its authentication replies are delayed.
    pub auth_failures_per_window_max: u32,
    /// Window over which failed logins are counted, in milliseconds.
    pub auth_failure_window_ms: u64,
    /// Delay of each authentication reply to a throttled address, in milliseconds.
    pub auth_failure_delay_ms: u64,
    /// Administrator created instead of `guest` (`--default-user`).
    pub default_user: Option<crate::config::DefaultUser>,
}

impl Settings {
    /// Defaults for a node called `node_name`.
    pub fn new(node_name: &str) -> Settings {
        Settings {
            node_name: node_name.to_string(),
            cluster_name: node_name.to_string(),
            loopback_users: vec!["guest".to_string()],
            memory_high_watermark_bytes: relative_watermark_bytes(
                (crate::limits::MEMORY_HIGH_WATERMARK_FRACTION_DEFAULT * 1_000_000.0) as u32,
            ),
            disk_free_limit_bytes: crate::limits::DISK_FREE_LIMIT_BYTES_DEFAULT,
            data_dir: std::path::PathBuf::from("./synod-data"),
            channel_max: crate::limits::CHANNELS_PER_CONNECTION_MAX,
            queues_max: None,
            consumers_per_channel_max: None,
            message_size_max: crate::limits::MESSAGE_SIZE_MAX,
            connections_max: crate::limits::CONNECTIONS_MAX,
            connections_refusing_max: crate::limits::CONNECTIONS_REFUSING_MAX,
            handshake_timeout_ms: crate::limits::HANDSHAKE_TIMEOUT_MS,
            auth_failures_per_window_max: crate::limits::AUTH_FAILURES_PER_WINDOW_MAX,
            auth_failure_window_ms: crate::limits::AUTH_FAILURE_WINDOW_MS,
            auth_failure_delay_ms: crate::limits::AUTH_FAILURE_DELAY_MS,
            default_user: None,
        }
    }

    /// Defaults for `config`'s node, with the bounds it sets.
    pub fn from_config(config: &crate::config::Config) -> Settings {
        let mut settings = Settings::new(&config.node_name);
        settings.cluster_name = config.cluster_name.clone();
        settings.message_size_max = config.max_message_size;
        settings.connections_max = config.max_connections;
        settings.channel_max = config.channel_max;
        settings.queues_max = config.max_queues;
        settings.consumers_per_channel_max = config.max_consumers_per_channel;
        settings.memory_high_watermark_bytes = match config.memory_high_watermark {
            crate::config::MemoryWatermark::Relative { millionths } => {
                relative_watermark_bytes(millionths)
            }
            crate::config::MemoryWatermark::Absolute { bytes } => bytes,
        };
        settings.disk_free_limit_bytes = config.disk_free_limit_bytes;
        settings.data_dir = config.data_dir.clone();
        settings
    }
}

/// `millionths` of the memory available to the process, or
/// [`crate::limits::MEMORY_HIGH_WATERMARK_BYTES`] when it cannot be read.
fn relative_watermark_bytes(millionths: u32) -> u64 {
    match crate::resources::available_memory_bytes() {
        Some(total) => (u128::from(total) * u128::from(millionths) / 1_000_000) as u64,
        None => crate::limits::MEMORY_HIGH_WATERMARK_BYTES,
    }
}

/// Compiled permissions of a user in a vhost.
#[derive(Debug)]
pub struct CompiledPermissions {
    configure: regex::Regex,
    write: regex::Regex,
    read: regex::Regex,
}

/// Which permission an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Declare / delete.
    Configure,
    /// Publish / bind to.
    Write,
    /// Consume / get / purge / bind from.
    Read,
}

impl CompiledPermissions {
    pub(crate) fn compile(p: &Permissions) -> Option<CompiledPermissions> {
        // As in RabbitMQ the patterns are not anchored: users write `^...$`.
        let compile = |r: &str| regex::Regex::new(r).ok();
        Some(CompiledPermissions {
            configure: compile(&p.configure)?,
            write: compile(&p.write)?,
            read: compile(&p.read)?,
        })
    }

    /// Whether the user may do `access` on `resource`. An empty pattern
    /// allows nothing, as in RabbitMQ.
    pub fn allows(&self, access: Access, resource: &str) -> bool {
        let regex = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        !regex.as_str().is_empty() && regex.is_match(resource)
    }
}

/// A connection as the registry and the management API see it.
#[derive(Debug)]
pub struct ConnectionHandle {
    /// Broker-unique id.
    pub id: u64,
    /// `client_ip:port -> server_ip:port`, as RabbitMQ names connections.
    pub name: String,
    /// Client address.
    pub peer: SocketAddr,
    /// Authenticated user.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// When it opened (seconds since the epoch).
    pub connected_at_s: u64,
    /// Open channels by number.
    pub channels: Mutex<BTreeMap<u16, Arc<ChannelInfo>>>,
    /// Mailbox of the connection task.
    pub sender: mpsc::UnboundedSender<Outbound>,
}

/// A channel's counters for listing.
#[derive(Debug, Default)]
pub struct ChannelInfo {
    /// Channel number.
    pub number: u16,
    /// Consumers on the channel.
    pub consumers: AtomicU32,
    /// Unacknowledged deliveries.
    pub unacked: AtomicU32,
    /// Per-consumer prefetch for new consumers.
    pub prefetch: AtomicU32,
    /// Global prefetch.
    pub global_prefetch: AtomicU32,
    /// 1 in confirm mode.
    pub confirm: AtomicU32,
    /// 1 in tx mode.
    pub transactional: AtomicU32,
}

/// A snapshot of one queue for listing.
#[derive(Debug, Clone)]
pub struct QueueSummary {
    /// Vhost.
    pub vhost: String,
    /// Definition.
    pub def: QueueDef,
    /// Counts.
    pub counts: QueueCounts,
}

/// A snapshot of one channel for listing.
#[derive(Debug, Clone)]
pub struct ChannelSummary {
    /// `connection name (number)`, as RabbitMQ names channels.
    pub name: String,
    /// Connection name.
    pub connection: String,
    /// Channel number.
    pub number: u16,
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Consumers.
    pub consumers: u32,
    /// Unacked deliveries.
    pub unacked: u32,
    /// Per-consumer prefetch.
    pub prefetch: u32,
    /// Confirm mode.
    pub confirm: bool,
    /// Tx mode.
    pub transactional: bool,
}

/// Result of publishing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Queues that accepted it.
    pub n_queues: usize,
    /// Some queue refused it (overflow `reject-publish`).
    pub rejected: bool,
}

#[derive(Debug, Default)]
struct State {
    meta: Metadata,
    queues: HashMap<String, HashMap<String, Arc<Queue>>>,
    /// Queues a draining node is moving here, by (vhost, name): they fill
    /// with the copied messages before the move is decided, and become the
    /// runtime queue when it is (see `drain`).
    staged: HashMap<(String, String), Arc<Queue>>,
}

/// The node's broker.
#[derive(Debug)]
pub struct Broker {
    /// Settings.
    pub settings: Settings,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Failed logins per client address (AMQP and management API).
    pub login_throttle: crate::login_throttle::LoginThrottle,
    state: RwLock<State>,
    connections: Mutex<BTreeMap<u64, Arc<ConnectionHandle>>>,
    next_connection_id: AtomicU64,
    memory_bytes: Arc<AtomicI64>,
    /// Any resource alarm raised (publishers must block).
    alarm: watch::Sender<bool>,
    /// Which alarms are raised, for `connection.blocked`'s reason.
    alarms: Mutex<crate::resources::Alarms>,
    /// Current `--memory-high-watermark`, in bytes.
    memory_high_watermark_bytes: AtomicU64,
    /// Current `--disk-free-limit`, in bytes.
    disk_free_limit_bytes: AtomicU64,
    /// When the free disk space was last read, and whether it was low.
    disk_free_check: Mutex<(Option<Instant>, bool)>,
    /// Queues whose `x-expires` deletion was proposed, and when: proposed
    /// again only after [`crate::limits::EXPIRY_RETRY_MS`], so a cluster
    /// that cannot decide does not collect one proposal per tick.
    expiring: Mutex<HashMap<(String, String), Instant>>,
    /// The durable store, once opened (absent: nothing survives a restart).
    durable: OnceLock<Arc<crate::durable::Durable>>,
    /// The Paxos cluster member, when started with `--peers`.
    cluster: OnceLock<Arc<crate::cluster::ClusterNode>>,
    /// Metadata changes go through the cluster's log once this is set.
    replication: OnceLock<Arc<Replication>>,
    /// Data links to the home nodes of queues homed elsewhere.
    links: OnceLock<Arc<crate::cluster::forward::Links>>,
    /// Woken when this node is marked draining (see `drain::supervise`).
    drain_wakeup: Arc<tokio::sync::Notify>,
}

/// Where a queue lives, as this node sees it.
#[derive(Debug, Clone)]
pub enum QueueAt {
    /// Homed here: the runtime queue.
    Local(Arc<Queue>),
    /// Homed on `def.home_node`: reached through a data link.
    Remote(QueueDef),
}

/// The metadata every node starts from: vhost `/` and user `guest`/`guest`
/// (administrator, full permissions on `/`), or `--default-user` instead
/// of guest. All members of a cluster must
/// start from the same bootstrap, as they apply the same log to it.
fn bootstrap_commands(settings: &Settings) -> Vec<Command> {
    let (user, password) = match &settings.default_user {
        Some(default) => (default.name.clone(), default.password.as_str()),
        None => ("guest".to_string(), "guest"),
    };
    vec![
        Command::AddVhost { name: "/".into() },
        Command::PutUser {
            name: user.clone(),
            password_hash: auth::hash_password(password),
            tags: vec!["administrator".into()],
        },
        Command::SetPermissions {
            vhost: "/".into(),
            user,
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        },
    ]
}

/// Bound on dead-letter hops processed for one operation.
const DEAD_LETTER_HOPS_MAX: usize = 10_000;

impl Broker {
    /// A broker with vhost `/` and one administrator with full permissions
    /// on `/`: `settings.default_user` when given, else `guest`/`guest`, as a
    /// fresh RabbitMQ has (`default_user`/`default_pass`).
    ///
    /// This is the bootstrap of an empty store only: restoring a durable
    /// snapshot afterwards replaces these entities with the stored ones, so a
    /// restart never brings back `guest` or undoes a change made through the
    /// API, and a different `--default-user` on a used data directory is
    /// ignored (again as RabbitMQ does).
    pub fn new(settings: Settings, metrics: Metrics) -> Arc<Broker> {
        let (alarm, _) = watch::channel(false);
        let login_throttle = crate::login_throttle::LoginThrottle::new(
            settings.auth_failures_per_window_max,
            std::time::Duration::from_millis(settings.auth_failure_window_ms),
            std::time::Duration::from_millis(settings.auth_failure_delay_ms),
            crate::limits::AUTH_FAILURE_ADDRESSES_MAX,
        );
        let memory_high_watermark_bytes = AtomicU64::new(settings.memory_high_watermark_bytes);
        let disk_free_limit_bytes = AtomicU64::new(settings.disk_free_limit_bytes);
        let broker = Broker {
            settings,
            metrics,
            login_throttle,
            state: RwLock::new(State::default()),
            connections: Mutex::new(BTreeMap::new()),
            next_connection_id: AtomicU64::new(1),
            memory_bytes: Arc::new(AtomicI64::new(0)),
            alarm,
            alarms: Mutex::new(crate::resources::Alarms::default()),
            memory_high_watermark_bytes,
            disk_free_limit_bytes,
            disk_free_check: Mutex::new((None, false)),
            expiring: Mutex::new(HashMap::new()),
            durable: OnceLock::new(),
            cluster: OnceLock::new(),
            replication: OnceLock::new(),
            links: OnceLock::new(),
            drain_wakeup: Arc::new(tokio::sync::Notify::new()),
        };
        for command in bootstrap_commands(&broker.settings) {
            broker
                .execute(command)
                .expect("bootstrap commands are valid on empty metadata");
        }
        Arc::new(broker)
    }

    /// Makes topology changes and persistent messages durable from now on.
    pub fn attach_durable(&self, durable: Arc<crate::durable::Durable>) {
        let _ = self.durable.set(durable);
    }

    /// Joins this broker to a cluster: the management API reports and
    /// changes membership through `cluster` from now on.
    pub fn attach_cluster(&self, cluster: Arc<crate::cluster::ClusterNode>) {
        let _ = self.cluster.set(cluster);
    }

    /// Sends every metadata change through the cluster's log from now on
    /// (the decided log is applied with [`Broker::execute`]).
    pub fn attach_replication(&self, replication: Arc<Replication>) {
        let _ = self.replication.set(replication);
    }

    /// Makes a metadata change: at once on a single node; on a cluster
    /// member, once the change is decided (an equivalent redeclaration is
    /// answered from this node's copy without a round of Paxos). Every
    /// topology change from clients and the management API comes here.
    pub fn replicate(&self, command: Command) -> Decision {
        if let Err(err) = self.check_queue_limit(&command) {
            return Decision::Now(Err(err));
        }
        let Some(replication) = self.replication.get() else {
            return Decision::Now(self.execute(command));
        };
        if self.read().meta.is_noop(&command) {
            return Decision::Now(Ok(Outcome::default()));
        }
        // Refuse what can never apply before it takes a slot in the log.
        if let Command::DeclareQueue { queue, .. } = &command
            && let Err(reason) = QueueArgs::parse(&queue.arguments)
        {
            return Decision::Now(Err(MetaError::PreconditionFailed(reason)));
        }
        replication.propose(command)
    }

    /// Refuses a declaration of a new queue once the metadata holds
    /// `--max-queues` queues (all vhosts). A node setting, so checked here
    /// before the change is proposed, not when the decided log is applied.
    fn check_queue_limit(&self, command: &Command) -> Result<(), MetaError> {
        let (Some(max), Command::DeclareQueue { vhost, queue }) =
            (self.settings.queues_max, command)
        else {
            return Ok(());
        };
        let state = self.read();
        let exists = state
            .meta
            .vhosts
            .get(vhost)
            .is_some_and(|v| v.queues.contains_key(&queue.name));
        let n_queues: usize = state.meta.vhosts.values().map(|v| v.queues.len()).sum();
        if !exists && n_queues as u64 >= max {
            return Err(MetaError::PreconditionFailed(format!(
                "cannot declare queue '{}' in vhost '{vhost}': node queue limit ({max}) is reached",
                queue.name
            )));
        }
        Ok(())
    }

    /// [`Broker::replicate`], waiting for the outcome.
    pub async fn submit(&self, command: Command) -> Result<Outcome, MetaError> {
        self.replicate(command).wait().await
    }

    /// [`Broker::replicate`] for clean-ups nobody waits for (auto-delete,
    /// exclusive queues of a closed connection, `x-expires`).
    pub fn submit_detached(&self, command: Command) {
        if let Decision::Now(Err(err)) = self.replicate(command) {
            tracing::debug!(%err, "clean-up change not applied");
        }
    }

    /// The whole metadata as commands that rebuild it (compaction snapshots).
    pub fn metadata_commands(&self) -> Vec<Command> {
        self.read().meta.commands_where(|_| true, |_| true)
    }

    /// Queues homed on this node that cannot outlive its process: transient
    /// and exclusive ones, as (vhost, name).
    pub fn stale_local_queues(&self) -> Vec<(String, String)> {
        let state = self.read();
        let mut stale = Vec::new();
        for (vhost_name, vhost) in &state.meta.vhosts {
            for queue in vhost.queues.values() {
                if queue.home_node == self.settings.node_name
                    && (!queue.durable || queue.exclusive_owner.is_some())
                {
                    stale.push((vhost_name.clone(), queue.name.clone()));
                }
            }
        }
        stale
    }

    /// Replaces the metadata by the bootstrap state plus `commands` (a
    /// compaction snapshot) and brings the runtime queues in line: queues
    /// homed here that appeared are created, those that vanished deleted.
    pub fn reset_metadata(&self, commands: Vec<Command>) {
        let mut meta = Metadata::default();
        for command in bootstrap_commands(&self.settings)
            .into_iter()
            .chain(commands)
        {
            if let Err(err) = meta.apply(command) {
                tracing::warn!(%err, "snapshot command did not apply");
            }
        }
        let mut state = self.write();
        let mut removed = Vec::new();
        for (vhost, queues) in state.queues.iter_mut() {
            queues.retain(|name, queue| {
                let kept = meta
                    .vhosts
                    .get(vhost)
                    .and_then(|v| v.queues.get(name))
                    .is_some_and(|def| def.home_node == self.settings.node_name);
                if !kept {
                    removed.push(queue.clone());
                }
                kept
            });
        }
        let mut created = Vec::new();
        for (vhost_name, vhost) in &meta.vhosts {
            for def in vhost.queues.values() {
                let exists = state
                    .queues
                    .get(vhost_name)
                    .is_some_and(|qs| qs.contains_key(&def.name));
                if def.home_node != self.settings.node_name || exists {
                    continue;
                }
                let key = (vhost_name.clone(), def.name.clone());
                if let Some(staged) = state.staged.remove(&key) {
                    created.push((vhost_name.clone(), staged));
                    continue;
                }
                match QueueArgs::parse(&def.arguments) {
                    Ok(args) => created.push((
                        vhost_name.clone(),
                        self.runtime_queue(vhost_name, def.clone(), args),
                    )),
                    Err(err) => {
                        tracing::warn!(%err, queue = %def.name, "queue arguments do not parse");
                    }
                }
            }
        }
        for (vhost, queue) in created {
            state
                .queues
                .entry(vhost)
                .or_default()
                .insert(queue.name().to_string(), queue);
        }
        if meta.is_draining(&self.settings.node_name) {
            self.drain_wakeup.notify_one();
        }
        state.meta = meta;
        drop(state);
        self.cancel_consumers_of(removed);
    }

    /// The home node for a queue declared here with `arguments`: this node,
    /// or with `x-queue-leader-locator: balanced` (or when this node is
    /// draining) the voter that is not draining and holds the fewest queues
    /// (ties to the smallest name). A draining node is never picked.
    pub fn home_for(&self, arguments: &FieldTable) -> String {
        let balanced = QueueArgs::parse(arguments).is_ok_and(|a| a.balanced_home);
        let me = &self.settings.node_name;
        if !balanced && !self.is_draining(me) {
            return me.clone();
        }
        self.least_loaded_home(None).unwrap_or_else(|| me.clone())
    }

    /// The voter, other than `except`, that is not draining and holds the
    /// fewest queues (ties to the smallest name); `None` when there is none
    /// (or no cluster).
    pub fn least_loaded_home(&self, except: Option<&str>) -> Option<String> {
        let cluster = self.cluster()?;
        let state = self.read();
        let mut load: BTreeMap<String, usize> = cluster
            .status()
            .members
            .into_iter()
            .filter(|m| m.role == "voter")
            .filter(|m| !state.meta.is_draining(&m.name) && Some(m.name.as_str()) != except)
            .map(|m| (m.name, 0))
            .collect();
        for vhost in state.meta.vhosts.values() {
            for queue in vhost.queues.values() {
                if let Some(n) = load.get_mut(&queue.home_node) {
                    *n += 1;
                }
            }
        }
        load.into_iter()
            .min_by_key(|(name, n)| (*n, name.clone()))
            .map(|(name, _)| name)
    }

    /// Whether `node` is draining (or was drained and removed).
    pub fn is_draining(&self, node: &str) -> bool {
        self.read().meta.is_draining(node)
    }

    /// Nodes marked draining in the metadata.
    pub fn draining_nodes(&self) -> Vec<String> {
        self.read().meta.draining.iter().cloned().collect()
    }

    /// Queues homed on `node`, as (vhost, definition).
    pub fn queues_homed_on(&self, node: &str) -> Vec<(String, QueueDef)> {
        let state = self.read();
        let mut out = Vec::new();
        for (vhost_name, vhost) in &state.meta.vhosts {
            for def in vhost.queues.values() {
                if def.home_node == node {
                    out.push((vhost_name.clone(), def.clone()));
                }
            }
        }
        out
    }

    /// Notified whenever this node is marked draining (a permit is kept
    /// when nobody waits yet).
    pub fn drain_wakeup(&self) -> Arc<tokio::sync::Notify> {
        self.drain_wakeup.clone()
    }

    /// Whether `node` is this node or a member of its cluster.
    pub fn is_member(&self, node: &str) -> bool {
        node == self.settings.node_name
            || self
                .cluster()
                .is_some_and(|c| c.status().members.iter().any(|m| m.name == node))
    }

    /// A queue's definition, wherever its home is.
    pub fn queue_def(&self, vhost: &str, name: &str) -> Option<QueueDef> {
        self.read()
            .meta
            .vhosts
            .get(vhost)?
            .queues
            .get(name)
            .cloned()
    }

    fn runtime_queue(&self, vhost: &str, def: QueueDef, args: QueueArgs) -> Arc<Queue> {
        let queue = Queue::new(
            vhost,
            def,
            args,
            self.metrics.clone(),
            self.memory_bytes.clone(),
        );
        if let Some(durable) = self.durable() {
            durable.attach(&queue);
        }
        queue
    }

    fn cancel_consumers_of(&self, removed: Vec<Arc<Queue>>) {
        for queue in removed {
            let (consumers, _) = queue.mark_deleted();
            for consumer in consumers {
                let _ = consumer.sender.send(Outbound::ConsumerCancelled {
                    channel_id: consumer.channel_id,
                    consumer_tag: consumer.tag.clone(),
                });
            }
        }
    }

    /// Serves queues homed on other nodes through `links` from now on, and
    /// accepts the data links other nodes open to this one (as internal
    /// connections, see `connection::serve_internal`).
    pub fn attach_links(self: &Arc<Self>, transport: crate::cluster::transport::Transport) {
        let links = crate::cluster::forward::Links::new(transport.clone(), self.metrics.clone());
        if self.links.set(links).is_err() {
            return;
        }
        let broker = Arc::downgrade(self);
        let shutdown = transport.shutdown_signal();
        transport.set_data_link_handler(Arc::new(move |peer, vhost, socket, addr| {
            let Some(broker) = broker.upgrade() else {
                return;
            };
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(err) =
                    crate::connection::serve_internal(broker, socket, addr, &peer, vhost, shutdown)
                        .await
                {
                    tracing::debug!(%peer, %err, "data link from peer ended");
                }
            });
        }));
    }

    /// The data links, once attached.
    pub fn links(&self) -> Option<&Arc<crate::cluster::forward::Links>> {
        self.links.get()
    }

    /// The cluster member, when the broker runs with `--peers`.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::ClusterNode>> {
        self.cluster.get()
    }

    /// The durable store, when the broker has one.
    pub fn durable(&self) -> Option<&Arc<crate::durable::Durable>> {
        self.durable.get()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a metadata command and brings the runtime queues in line.
    /// The single entry point for every topology change.
    pub fn execute(&self, command: Command) -> Result<Outcome, MetaError> {
        // A queue's arguments are checked before anything changes.
        let declared = match &command {
            Command::DeclareQueue { vhost, queue } => {
                let args =
                    QueueArgs::parse(&queue.arguments).map_err(MetaError::PreconditionFailed)?;
                Some((vhost.clone(), queue.clone(), args))
            }
            _ => None,
        };
        let moved = match &command {
            Command::MoveQueue { vhost, name, home } => {
                Some((vhost.clone(), name.clone(), home.clone()))
            }
            _ => None,
        };
        let drain_me = matches!(&command, Command::SetDraining { node, draining: true } if *node == self.settings.node_name);
        let mut state = self.write();
        let old_home = moved.as_ref().and_then(|(vhost, name, _)| {
            Some(
                state
                    .meta
                    .vhosts
                    .get(vhost)?
                    .queues
                    .get(name)?
                    .home_node
                    .clone(),
            )
        });
        let durable = self
            .durable()
            .filter(|d| d.before_command(&state.meta, &command));
        let outcome = state.meta.apply(command)?;
        let snapshot = durable.map(|d| d.snapshot(&state.meta));
        // Only the home node holds a queue's messages; the others know its
        // definition from the metadata.
        if let Some((vhost, def, args)) = declared
            && outcome.created
            && def.home_node == self.settings.node_name
        {
            let queue = self.runtime_queue(&vhost, def, args);
            state
                .queues
                .entry(vhost)
                .or_default()
                .insert(queue.name().to_string(), queue);
        }
        let mut moved_away = None;
        if let (Some((vhost, name, home)), Some(old_home)) = (moved, old_home)
            && outcome.created
        {
            moved_away = self.apply_move(&mut state, &vhost, &name, &old_home, &home);
        }
        let mut removed = Vec::new();
        for (vhost, name) in &outcome.deleted_queues {
            if let Some(queue) = state.queues.get_mut(vhost).and_then(|qs| qs.remove(name)) {
                removed.push(queue);
            }
            if let Some(staged) = state.staged.remove(&(vhost.clone(), name.clone())) {
                removed.push(staged);
            }
        }
        drop(state);
        if let (Some(durable), Some(snapshot)) = (durable, snapshot) {
            durable.write_snapshot(snapshot);
        }
        self.cancel_consumers_of(removed);
        if let Some(queue) = moved_away {
            // Consumers re-consume from the new home; the draining node
            // copies what is left here (see `drain`).
            for consumer in queue.take_consumers() {
                let _ = consumer.sender.send(Outbound::ConsumerCancelled {
                    channel_id: consumer.channel_id,
                    consumer_tag: consumer.tag.clone(),
                });
            }
        }
        if drain_me && outcome.created {
            self.drain_wakeup.notify_one();
        }
        Ok(outcome)
    }

    /// Brings the runtime queues in line with a decided move of
    /// `vhost`/`name` from `old_home` to `home`: the new home adopts the
    /// staged queue (or starts an empty one); the old home detaches its
    /// runtime queue and returns it (its messages are still to be copied).
    fn apply_move(
        &self,
        state: &mut State,
        vhost: &str,
        name: &str,
        old_home: &str,
        home: &str,
    ) -> Option<Arc<Queue>> {
        let me = self.settings.node_name.as_str();
        if home == me {
            let key = (vhost.to_string(), name.to_string());
            let queue = match state.staged.remove(&key) {
                Some(staged) => staged,
                None => {
                    let def = state.meta.vhosts.get(vhost)?.queues.get(name)?.clone();
                    let args = QueueArgs::parse(&def.arguments).ok()?;
                    self.runtime_queue(vhost, def, args)
                }
            };
            state
                .queues
                .entry(vhost.to_string())
                .or_default()
                .insert(name.to_string(), queue);
            return None;
        }
        if old_home == me {
            return state.queues.get_mut(vhost).and_then(|qs| qs.remove(name));
        }
        None
    }

    /// The runtime queue `vhost`/`name`.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<Arc<Queue>> {
        self.read().queues.get(vhost)?.get(name).cloned()
    }

    /// Where queue `vhost`/`name` lives: here, or on its home node.
    pub fn locate_queue(&self, vhost: &str, name: &str) -> Option<QueueAt> {
        let state = self.read();
        if let Some(queue) = state.queues.get(vhost).and_then(|qs| qs.get(name)) {
            return Some(QueueAt::Local(queue.clone()));
        }
        let def = state.meta.vhosts.get(vhost)?.queues.get(name)?;
        (def.home_node != self.settings.node_name).then(|| QueueAt::Remote(def.clone()))
    }

    /// An exchange's definition.
    pub fn exchange(&self, vhost: &str, name: &str) -> Option<ExchangeDef> {
        Some(
            self.read()
                .meta
                .vhosts
                .get(vhost)?
                .exchanges
                .get(name)?
                .def
                .clone(),
        )
    }

    /// Whether an exchange is internal; `None` when it does not exist.
    /// (The publish path uses this rather than cloning the definition.)
    pub fn exchange_is_internal(&self, vhost: &str, name: &str) -> Option<bool> {
        Some(
            self.read()
                .meta
                .vhosts
                .get(vhost)?
                .exchanges
                .get(name)?
                .def
                .internal,
        )
    }

    /// Whether a vhost exists.
    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.read().meta.vhosts.contains_key(vhost)
    }

    /// Routes and enqueues a message. Errors are channel-level (404 no
    /// exchange). `n_queues == 0` means unroutable.
    pub fn publish(&self, vhost: &str, message: Arc<Message>) -> Result<Published, AmqpError> {
        self.publish_with(vhost, message, &mut Vec::new(), &mut Vec::new())
    }

    /// [`Broker::publish`], pushing the store tickets a confirm must wait for.
    pub fn publish_durable(
        &self,
        vhost: &str,
        message: Arc<Message>,
        tickets: &mut Vec<crate::store::Ticket>,
    ) -> Result<Published, AmqpError> {
        self.publish_with(vhost, message, &mut Vec::new(), tickets)
    }

    /// [`Broker::publish`] with caller-owned scratch lists, so the hot path
    /// allocates nothing per message for routing; pushes the store tickets a
    /// publisher confirm must wait for.
    pub fn publish_with(
        &self,
        vhost: &str,
        message: Arc<Message>,
        targets: &mut Vec<Arc<Queue>>,
        tickets: &mut Vec<crate::store::Ticket>,
    ) -> Result<Published, AmqpError> {
        self.publish_routed(vhost, message, targets, &mut Vec::new(), tickets)
    }

    /// [`Broker::publish_with`] that also lists, in `remote`, the matching
    /// queues homed on other nodes as (home node, queue name), for the
    /// caller to forward; they are not counted in [`Published`].
    pub fn publish_routed(
        &self,
        vhost: &str,
        message: Arc<Message>,
        targets: &mut Vec<Arc<Queue>>,
        remote: &mut Vec<(String, String)>,
        tickets: &mut Vec<crate::store::Ticket>,
    ) -> Result<Published, AmqpError> {
        targets.clear();
        remote.clear();
        {
            let state = self.read();
            let queues = state.queues.get(vhost);
            let defs = state.meta.vhosts.get(vhost).map(|v| &v.queues);
            let found = state.meta.route(
                vhost,
                &message.exchange,
                &message.routing_key,
                message.headers().as_ref(),
                &mut |name| {
                    if let Some(queue) = queues.and_then(|qs| qs.get(name)) {
                        targets.push(queue.clone());
                    } else if let Some(def) = defs.and_then(|d| d.get(name))
                        && def.home_node != self.settings.node_name
                    {
                        remote.push((def.home_node.clone(), name.to_string()));
                    }
                },
            );
            if !found {
                return Err(AmqpError::new(
                    reply::NOT_FOUND,
                    format!("no exchange '{}' in vhost '{vhost}'", message.exchange),
                ));
            }
        }
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut published = Published {
            n_queues: 0,
            rejected: false,
        };
        for queue in targets.drain(..) {
            match queue.publish_durable(message.clone(), now, &mut dead, tickets) {
                Enqueued::Accepted => published.n_queues += 1,
                Enqueued::Rejected => published.rejected = true,
            }
        }
        if !dead.is_empty() {
            self.dead_letter(dead);
        }
        Ok(published)
    }

    /// Enqueues a message forwarded by another node on exactly the named
    /// local queues, without routing (the entry node routed it). A named
    /// queue homed elsewhere is one on the move: a node that is not
    /// draining stages it (it is becoming its home); a draining node lists
    /// it in `remote` as (home node, queue name), for the caller to forward
    /// to its new home. Names of queues that do not exist are skipped.
    pub fn publish_to_queues(
        &self,
        vhost: &str,
        message: Arc<Message>,
        names: &[String],
        remote: &mut Vec<(String, String)>,
        tickets: &mut Vec<crate::store::Ticket>,
    ) -> Published {
        let me = self.settings.node_name.as_str();
        let mut targets: Vec<Arc<Queue>> = Vec::with_capacity(names.len());
        let mut to_stage = Vec::new();
        {
            let state = self.read();
            let queues = state.queues.get(vhost);
            let defs = state.meta.vhosts.get(vhost).map(|v| &v.queues);
            let draining = state.meta.is_draining(me);
            for name in names {
                if let Some(queue) = queues.and_then(|qs| qs.get(name)) {
                    targets.push(queue.clone());
                } else if let Some(def) = defs.and_then(|d| d.get(name))
                    && def.home_node != me
                {
                    if draining {
                        remote.push((def.home_node.clone(), name.clone()));
                    } else if let Some(staged) =
                        state.staged.get(&(vhost.to_string(), name.clone()))
                    {
                        targets.push(staged.clone());
                    } else {
                        to_stage.push(def.clone());
                    }
                }
            }
        }
        if !to_stage.is_empty() {
            let mut state = self.write();
            for mut def in to_stage {
                if let Some(queue) = state.queues.get(vhost).and_then(|qs| qs.get(&def.name)) {
                    targets.push(queue.clone());
                    continue;
                }
                let key = (vhost.to_string(), def.name.clone());
                if let Some(staged) = state.staged.get(&key) {
                    targets.push(staged.clone());
                    continue;
                }
                let Ok(args) = QueueArgs::parse(&def.arguments) else {
                    continue;
                };
                def.home_node = me.to_string();
                let queue = self.runtime_queue(vhost, def, args);
                state.staged.insert(key, queue.clone());
                targets.push(queue);
            }
        }
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut published = Published {
            n_queues: 0,
            rejected: false,
        };
        for queue in targets {
            match queue.publish_durable(message.clone(), now, &mut dead, tickets) {
                Enqueued::Accepted => published.n_queues += 1,
                Enqueued::Rejected => published.rejected = true,
            }
        }
        if !dead.is_empty() {
            self.dead_letter(dead);
        }
        published
    }

    /// Republishes dead letters to their exchanges (and any dead letters
    /// that causes, up to a bound).
    pub fn dead_letter(&self, mut dead: Vec<DeadLetter>) {
        if dead.is_empty() {
            return;
        }
        let mut hops = 0;
        let time_s = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        while let Some(letter) = dead.pop() {
            hops += 1;
            if hops > DEAD_LETTER_HOPS_MAX {
                tracing::warn!(
                    "dead-letter chain exceeded {DEAD_LETTER_HOPS_MAX} hops; dropping the rest"
                );
                return;
            }
            let message = Arc::new(letter.rewrite(time_s));
            let mut targets = Vec::new();
            {
                let state = self.read();
                let queues = state.queues.get(&letter.vhost);
                state.meta.route(
                    &letter.vhost,
                    &message.exchange,
                    &message.routing_key,
                    message.headers().as_ref(),
                    &mut |name| {
                        if !letter.is_cycle_to(name)
                            && let Some(queue) = queues.and_then(|qs| qs.get(name))
                        {
                            targets.push(queue.clone());
                        }
                    },
                );
            }
            let now = Instant::now();
            for queue in targets {
                queue.publish(message.clone(), now, &mut dead);
            }
        }
    }

    /// Checks a queue deletion: refuses (406) when `if_unused` and it has
    /// consumers or `if_empty` and it holds messages. Returns the number of
    /// ready messages it would drop, `None` when there is no such queue here.
    pub fn check_delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<Option<u64>, MetaError> {
        let Some(queue) = self.queue(vhost, name) else {
            return Ok(self.queue_def(vhost, name).map(|_| 0));
        };
        let counts = queue.counts();
        if if_unused && counts.consumers > 0 {
            return Err(MetaError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{vhost}' in use"
            )));
        }
        if if_empty && counts.ready > 0 {
            return Err(MetaError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{vhost}' is not empty"
            )));
        }
        Ok(Some(counts.ready))
    }

    /// Deletes a queue after [`Broker::check_delete_queue`]. Returns the
    /// number of ready messages dropped; a missing queue is not an error
    /// (RabbitMQ).
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, MetaError> {
        let Some(ready) = self.check_delete_queue(vhost, name, if_unused, if_empty)? else {
            return Ok(0);
        };
        match self
            .submit(Command::DeleteQueue {
                vhost: vhost.to_string(),
                name: name.to_string(),
            })
            .await
        {
            Ok(_) | Err(MetaError::NotFound(_)) => Ok(ready),
            Err(err) => Err(err),
        }
    }

    /// Drops a queue's ready messages; returns how many (404 when missing).
    pub fn purge_queue(&self, vhost: &str, name: &str) -> Result<u64, MetaError> {
        let queue = self
            .queue(vhost, name)
            .ok_or_else(|| MetaError::NotFound(format!("no queue '{name}' in vhost '{vhost}'")))?;
        Ok(queue.purge())
    }

    /// Periodic work: message TTL, `x-expires`, the memory alarm.
    pub fn tick(&self) {
        let now = Instant::now();
        let queues: Vec<Arc<Queue>> = self
            .read()
            .queues
            .values()
            .flat_map(|qs| qs.values().cloned())
            .collect();
        let mut dead = Vec::new();
        let mut expired = Vec::new();
        for queue in queues {
            if queue.tick(now, &mut dead) {
                expired.push(queue);
            }
        }
        self.dead_letter(dead);
        for queue in self.due_expirations(now, expired) {
            self.submit_detached(Command::DeleteQueue {
                vhost: queue.vhost.clone(),
                name: queue.name().to_string(),
            });
        }
        let used = self.memory_bytes.load(Ordering::Relaxed).max(0) as u64;
        let memory_alarm = used > self.memory_high_watermark_bytes();
        let disk_full = self.durable().is_some_and(|d| d.disk_alarm());
        let disk_alarm = disk_full || self.disk_free_low(now);
        self.metrics.memory_alarm.set(i64::from(memory_alarm));
        self.metrics.disk_alarm.set(i64::from(disk_alarm));
        let alarms = crate::resources::Alarms {
            memory: memory_alarm,
            disk: disk_alarm,
        };
        {
            let mut current = self.alarms.lock().unwrap_or_else(|p| p.into_inner());
            if *current != alarms {
                tracing::warn!(
                    memory = alarms.memory,
                    disk = alarms.disk,
                    memory_bytes = used,
                    "resource alarms changed"
                );
            }
            *current = alarms;
        }
        // Either alarm blocks publishers (connection.blocked), as in RabbitMQ.
        let alarm = alarms.any();
        self.alarm.send_if_modified(|current| {
            let changed = *current != alarm;
            *current = alarm;
            changed
        });
    }

    /// The queues of `expired` whose deletion is not already on its way:
    /// never proposed, or proposed over `EXPIRY_RETRY_MS` ago (the
    /// proposal failed or is still undecided).
    fn due_expirations(&self, now: Instant, expired: Vec<Arc<Queue>>) -> Vec<Arc<Queue>> {
        let retry = std::time::Duration::from_millis(crate::limits::EXPIRY_RETRY_MS);
        let mut expiring = self.expiring.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of queues that are gone (or came back) age out.
        expiring.retain(|_, proposed| now.duration_since(*proposed) < retry);
        expired
            .into_iter()
            .filter(|queue| {
                let key = (queue.vhost.clone(), queue.name().to_string());
                if expiring.contains_key(&key) {
                    return false;
                }
                expiring.insert(key, now);
                true
            })
            .collect()
    }

    /// Watches the resource alarms (true = publishers must block).
    pub fn memory_alarm(&self) -> watch::Receiver<bool> {
        self.alarm.subscribe()
    }

    /// Which resource alarms are raised, as of the last housekeeping tick.
    pub fn alarms(&self) -> crate::resources::Alarms {
        *self.alarms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The memory high watermark in force, in bytes.
    pub fn memory_high_watermark_bytes(&self) -> u64 {
        self.memory_high_watermark_bytes.load(Ordering::Relaxed)
    }

    /// Changes the memory high watermark at run time (as RabbitMQ's
    /// `rabbitmqctl set_vm_memory_high_watermark`); the next tick applies it.
    pub fn set_memory_high_watermark_bytes(&self, bytes: u64) {
        self.memory_high_watermark_bytes
            .store(bytes, Ordering::Relaxed);
    }

    /// The free disk limit in force, in bytes.
    pub fn disk_free_limit_bytes(&self) -> u64 {
        self.disk_free_limit_bytes.load(Ordering::Relaxed)
    }

    /// Changes the free disk limit at run time (as RabbitMQ's
    /// `rabbitmqctl set_disk_free_limit`); the disk is read again at the next tick.
    pub fn set_disk_free_limit_bytes(&self, bytes: u64) {
        self.disk_free_limit_bytes.store(bytes, Ordering::Relaxed);
        let mut check = self
            .disk_free_check
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        check.0 = None;
    }

    /// Whether the data directory's file system has less free space than
    /// the limit; reads it at most every `DISK_FREE_CHECK_INTERVAL_MS`. A
    /// broker without a durable store writes nothing and never raises it.
    fn disk_free_low(&self, now: Instant) -> bool {
        if self.durable().is_none() {
            return false;
        }
        let mut check = self
            .disk_free_check
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let interval = std::time::Duration::from_millis(crate::limits::DISK_FREE_CHECK_INTERVAL_MS);
        if check.0.is_some_and(|at| now.duration_since(at) < interval) {
            return check.1;
        }
        let limit = self.disk_free_limit_bytes();
        let low = match crate::resources::disk_free_bytes(&self.settings.data_dir) {
            Ok(free) => {
                if (free < limit) != check.1 {
                    tracing::warn!(free, limit, "free disk space crossed --disk-free-limit");
                }
                free < limit
            }
            Err(err) => {
                tracing::debug!(%err, "free disk space unreadable");
                false
            }
        };
        *check = (Some(now), low);
        low
    }

    /// Ready-message bytes held by all queues.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed).max(0) as u64
    }

    /// Checks credentials; counts failures in `auth_failures_total`.
    pub fn authenticate(
        &self,
        username: &str,
        password: &str,
        from_loopback: bool,
    ) -> Result<User, String> {
        let user = self.read().meta.users.get(username).cloned();
        let result = match user {
            Some(user) if auth::verify_password(&user.password_hash, password) => {
                if !from_loopback && self.settings.loopback_users.iter().any(|u| u == username) {
                    Err(format!("user '{username}' can only connect via localhost"))
                } else {
                    Ok(user)
                }
            }
            Some(_) => Err(format!("invalid credentials for user '{username}'")),
            None => Err(format!("user '{username}' does not exist")),
        };
        if result.is_err() {
            self.metrics.auth_failures_total.inc();
        }
        result
    }

    /// Checks a user named by a verified client certificate (SASL
    /// EXTERNAL): it must exist; no password is involved. The loopback-only
    /// rule still applies. Counts failures in `auth_failures_total`.
    pub fn authenticate_external(
        &self,
        username: &str,
        from_loopback: bool,
    ) -> Result<User, String> {
        let user = self.read().meta.users.get(username).cloned();
        let result = match user {
            Some(_)
                if !from_loopback && self.settings.loopback_users.iter().any(|u| u == username) =>
            {
                Err(format!("user '{username}' can only connect via localhost"))
            }
            Some(user) => Ok(user),
            None => Err(format!(
                "user '{username}' (certificate common name) does not exist"
            )),
        };
        if result.is_err() {
            self.metrics.auth_failures_total.inc();
        }
        result
    }

    /// The compiled permissions of `user` in `vhost`, if any.
    pub fn permissions(&self, vhost: &str, user: &str) -> Option<Arc<CompiledPermissions>> {
        let state = self.read();
        let p = state
            .meta
            .permissions
            .get(&(vhost.to_string(), user.to_string()))?;
        CompiledPermissions::compile(p).map(Arc::new)
    }

    /// Allocates a connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds an open connection to the registry.
    pub fn register_connection(&self, handle: Arc<ConnectionHandle>) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle);
    }

    /// Adds an open connection to the registry unless its user's or its
    /// vhost's `max-connections` is reached (counted on this node); `Err`
    /// carries the `connection.close 530` text, RabbitMQ's words.
    pub fn try_register_connection(&self, handle: Arc<ConnectionHandle>) -> Result<(), String> {
        let (user_max, vhost_max) = {
            let state = self.read();
            (
                state
                    .meta
                    .user_limits
                    .get(&handle.user)
                    .and_then(|l| l.get(&UserLimit::MaxConnections))
                    .copied(),
                state
                    .meta
                    .vhosts
                    .get(&handle.vhost)
                    .and_then(|v| v.limits.get(&VhostLimit::MaxConnections))
                    .copied(),
            )
        };
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(max) = vhost_max {
            let open = connections
                .values()
                .filter(|c| c.vhost == handle.vhost)
                .count() as u64;
            if open >= max {
                return Err(format!(
                    "NOT_ALLOWED - access to vhost '{}' refused for user '{}': connection limit ({max}) is reached",
                    handle.vhost, handle.user
                ));
            }
        }
        if let Some(max) = user_max {
            let open = connections
                .values()
                .filter(|c| c.user == handle.user)
                .count() as u64;
            if open >= max {
                return Err(format!(
                    "NOT_ALLOWED - Connection refused for user '{}': user connection limit ({max}) is reached",
                    handle.user
                ));
            }
        }
        connections.insert(handle.id, handle);
        Ok(())
    }

    /// `Some(max)` when `user` has a `max-channels` limit and its
    /// connections on this node hold that many channels already.
    pub fn user_channel_limit_reached(&self, user: &str) -> Option<u64> {
        let max = self
            .read()
            .meta
            .user_limits
            .get(user)?
            .get(&UserLimit::MaxChannels)
            .copied()?;
        let open: usize = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| c.user == user)
            .map(|c| c.channels.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum();
        (open as u64 >= max).then_some(max)
    }

    /// The limits set on users, by user.
    pub fn list_user_limits(&self) -> BTreeMap<String, BTreeMap<UserLimit, u64>> {
        self.read().meta.user_limits.clone()
    }

    /// The limits set on vhosts, by vhost (vhosts without limits left out).
    pub fn list_vhost_limits(&self) -> BTreeMap<String, BTreeMap<VhostLimit, u64>> {
        self.read()
            .meta
            .vhosts
            .iter()
            .filter(|(_, v)| !v.limits.is_empty())
            .map(|(name, v)| (name.clone(), v.limits.clone()))
            .collect()
    }

    /// Removes a connection from the registry.
    pub fn unregister_connection(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Open connections.
    pub fn list_connections(&self) -> Vec<Arc<ConnectionHandle>> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Open channels of every connection.
    pub fn list_channels(&self) -> Vec<ChannelSummary> {
        let mut out = Vec::new();
        for connection in self.list_connections() {
            let channels = connection
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for info in channels.values() {
                out.push(ChannelSummary {
                    name: format!("{} ({})", connection.name, info.number),
                    connection: connection.name.clone(),
                    number: info.number,
                    user: connection.user.clone(),
                    vhost: connection.vhost.clone(),
                    consumers: info.consumers.load(Ordering::Relaxed),
                    unacked: info.unacked.load(Ordering::Relaxed),
                    prefetch: info.prefetch.load(Ordering::Relaxed),
                    confirm: info.confirm.load(Ordering::Relaxed) == 1,
                    transactional: info.transactional.load(Ordering::Relaxed) == 1,
                });
            }
        }
        out
    }

    /// Closes a connection by name with `320 CONNECTION_FORCED`; false when
    /// no such connection is open.
    pub fn close_connection(&self, name: &str, reason: &str) -> bool {
        let Some(handle) = self.list_connections().into_iter().find(|c| c.name == name) else {
            return false;
        };
        handle
            .sender
            .send(Outbound::Close {
                code: reply::CONNECTION_FORCED,
                text: format!("CONNECTION_FORCED - {reason}"),
            })
            .is_ok()
    }

    /// Vhost names.
    pub fn list_vhosts(&self) -> Vec<String> {
        self.read().meta.vhosts.keys().cloned().collect()
    }

    /// Users.
    pub fn list_users(&self) -> Vec<User> {
        self.read().meta.users.values().cloned().collect()
    }

    /// Permissions as (vhost, user, permissions).
    pub fn list_permissions(&self) -> Vec<(String, String, Permissions)> {
        self.read()
            .meta
            .permissions
            .iter()
            .map(|((v, u), p)| (v.clone(), u.clone(), p.clone()))
            .collect()
    }

    /// Exchanges as (vhost, definition).
    pub fn list_exchanges(&self) -> Vec<(String, ExchangeDef)> {
        let state = self.read();
        state
            .meta
            .vhosts
            .iter()
            .flat_map(|(v, vh)| {
                vh.exchanges
                    .values()
                    .map(move |e| (v.clone(), e.def.clone()))
            })
            .collect()
    }

    /// Queues with their counts.
    pub fn list_queues(&self) -> Vec<QueueSummary> {
        let state = self.read();
        let mut out = Vec::new();
        for (vhost_name, vhost) in &state.meta.vhosts {
            let local = state.queues.get(vhost_name);
            for def in vhost.queues.values() {
                out.push(QueueSummary {
                    vhost: vhost_name.clone(),
                    def: def.clone(),
                    // Counts of a queue homed elsewhere are its node's.
                    counts: local
                        .and_then(|qs| qs.get(&def.name))
                        .map(|q| q.counts())
                        .unwrap_or_default(),
                });
            }
        }
        out
    }

    /// Bindings of a vhost as (source exchange, binding).
    pub fn list_bindings(&self, vhost: &str) -> Vec<(String, Binding)> {
        self.read().meta.bindings(vhost)
    }

    /// A server-generated name with `prefix` (`amq.gen-`, `amq.ctag-`).
    pub fn generate_name(prefix: &str) -> String {
        use base64::Engine;
        let bytes: [u8; 16] = rand::random();
        format!(
            "{prefix}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// Empty field table helper for callers building definitions.
    pub fn no_arguments() -> FieldTable {
        FieldTable::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    fn broker() -> Arc<Broker> {
        Broker::new(Settings::new("test@node"), Metrics::new())
    }

    fn queue_def(name: &str, arguments: FieldTable) -> QueueDef {
        QueueDef {
            name: name.into(),
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments,
            home_node: "test@node".into(),
        }
    }

    #[test]
    fn an_expired_queue_is_proposed_for_deletion_once_per_retry_period() {
        // Goal: x-expires proposes a queue's deletion once, not on every
        // tick while the cluster decides (or cannot), and again after the
        // retry period if the queue is still there.
        let broker = broker();
        broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue_def("idle", FieldTable::default()),
            })
            .expect("declare");
        let queue = broker.queue("/", "idle").expect("runtime queue");
        let now = Instant::now();
        let retry = std::time::Duration::from_millis(crate::limits::EXPIRY_RETRY_MS);
        assert_eq!(broker.due_expirations(now, vec![queue.clone()]).len(), 1);
        for ms in [25, 1_000, 4_900] {
            let later = now + std::time::Duration::from_millis(ms);
            assert!(
                broker
                    .due_expirations(later, vec![queue.clone()])
                    .is_empty(),
                "proposed again after {ms} ms"
            );
        }
        assert_eq!(
            broker.due_expirations(now + retry, vec![queue]).len(),
            1,
            "proposed again once the retry period passed"
        );
    }

    #[test]
    fn a_queue_moving_here_is_staged_then_adopted_and_one_moving_away_is_detached() {
        // Goal: a targeted publish for a queue homed elsewhere is staged
        // (not routed to, not listed as local) until MoveQueue makes this
        // node its home, which adopts the staged messages; a queue moving
        // away is removed from the runtime queues and its consumers lose it;
        // once draining, publishes for queues homed elsewhere are listed for
        // forwarding instead of staged.
        let broker = broker();
        let mut def = queue_def("q", FieldTable::default());
        def.home_node = "old@node".into();
        broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: def,
            })
            .expect("declare");
        assert!(broker.queue("/", "q").is_none());
        let message = Arc::new(Message::with_properties(
            "".into(),
            "q".into(),
            &Default::default(),
            bytes::Bytes::from_static(b"copied"),
        ));
        let mut remote = Vec::new();
        let published = broker.publish_to_queues(
            "/",
            message.clone(),
            &["q".into()],
            &mut remote,
            &mut Vec::new(),
        );
        assert_eq!(published.n_queues, 1);
        assert!(remote.is_empty());
        assert!(broker.queue("/", "q").is_none(), "staged, not yet home");
        broker
            .execute(Command::MoveQueue {
                vhost: "/".into(),
                name: "q".into(),
                home: "test@node".into(),
            })
            .expect("move here");
        let queue = broker.queue("/", "q").expect("adopted");
        assert_eq!(queue.counts().ready, 1);

        broker
            .execute(Command::SetDraining {
                node: "test@node".into(),
                draining: true,
            })
            .expect("drain");
        broker
            .execute(Command::MoveQueue {
                vhost: "/".into(),
                name: "q".into(),
                home: "new@node".into(),
            })
            .expect("move away");
        assert!(broker.queue("/", "q").is_none(), "detached");
        assert_eq!(queue.counts().ready, 1, "kept for the drain to copy");
        let published =
            broker.publish_to_queues("/", message, &["q".into()], &mut remote, &mut Vec::new());
        assert_eq!(published.n_queues, 0);
        assert_eq!(remote, [("new@node".to_string(), "q".to_string())]);
    }

    #[test]
    fn guest_is_loopback_only_and_failures_are_counted() {
        // Goal: guest/guest works from loopback only; every refusal increments the counter.
        let broker = broker();
        assert!(broker.authenticate("guest", "guest", true).is_ok());
        assert!(broker.authenticate("guest", "guest", false).is_err());
        assert!(broker.authenticate("guest", "nope", true).is_err());
        assert!(broker.authenticate("nobody", "guest", true).is_err());
        assert_eq!(broker.metrics.auth_failures_total.get(), 3);
    }

    #[test]
    fn a_default_user_replaces_guest_as_the_administrator() {
        // Goal: with settings.default_user that user is an administrator with full rights on `/`, reachable from anywhere, and guest does not exist.
        let mut settings = Settings::new("test@node");
        settings.default_user = Some(crate::config::DefaultUser {
            name: "admin".into(),
            password: "s3cret".into(),
        });
        let broker = Broker::new(settings, Metrics::new());
        let admin = broker
            .authenticate("admin", "s3cret", false)
            .expect("admin logs in from anywhere");
        assert_eq!(admin.tags, vec!["administrator".to_string()]);
        assert!(broker.authenticate("admin", "guest", true).is_err());
        assert!(broker.authenticate("guest", "guest", true).is_err());
        let users: Vec<String> = broker.list_users().into_iter().map(|u| u.name).collect();
        assert_eq!(users, ["admin"]);
        let permissions = broker.list_permissions();
        assert_eq!(permissions.len(), 1);
        assert_eq!(
            (permissions[0].0.as_str(), permissions[0].1.as_str()),
            ("/", "admin")
        );
        assert_eq!(permissions[0].2.configure, ".*");
    }

    #[test]
    fn permissions_are_unanchored_regexes_and_empty_means_none() {
        // Goal: RabbitMQ semantics: patterns match anywhere unless anchored; "" denies.
        let p = CompiledPermissions::compile(&Permissions {
            configure: "".into(),
            write: "^amq\\.".into(),
            read: "logs".into(),
        })
        .expect("valid");
        assert!(!p.allows(Access::Configure, "anything"));
        assert!(p.allows(Access::Write, "amq.direct"));
        assert!(!p.allows(Access::Write, "x.amq.direct"));
        assert!(p.allows(Access::Read, "app-logs-1"));
        assert!(!p.allows(Access::Read, "metrics"));
    }

    #[tokio::test]
    async fn queue_commands_create_runtime_queues_and_checks_apply() {
        // Goal: execute() creates and deletes runtime queues; bad arguments and if-empty refuse.
        let broker = broker();
        let mut bad = FieldTable::default();
        bad.insert("x-max-length".into(), AMQPValue::LongString("ten".into()));
        let err = broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue_def("bad", bad),
            })
            .expect_err("invalid argument");
        assert!(matches!(err, MetaError::PreconditionFailed(_)), "{err}");
        broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue_def("q", FieldTable::default()),
            })
            .expect("declare");
        assert_eq!(broker.metrics.queues.get(), 1);
        let message = Arc::new(Message::with_properties(
            "".into(),
            "q".into(),
            &Default::default(),
            bytes::Bytes::from_static(b"x"),
        ));
        let published = broker.publish("/", message).expect("publish");
        assert_eq!(published.n_queues, 1);
        assert!(broker.delete_queue("/", "q", false, true).await.is_err());
        assert_eq!(broker.list_queues()[0].counts.ready, 1);
        assert_eq!(broker.delete_queue("/", "q", false, false).await, Ok(1));
        assert!(broker.queue("/", "q").is_none());
        assert_eq!(broker.metrics.queues.get(), 0);
        assert_eq!(broker.delete_queue("/", "q", false, false).await, Ok(0));
    }
}
