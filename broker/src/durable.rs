//! Bridges the broker and the [`store`](crate::store): opens and locks the data
//! directory, snapshots the durable topology after each change, restores it and
//! the persistent messages at startup, logs persistent messages of durable
//! queues, and turns store tickets into publisher confirms.
//!
//! Must not: decide routing or queue semantics (that is `broker` and `queue`),
//! or touch sockets (the connection writes the confirms this module reports).
//!
//! Memory bound: each durable queue keeps at most `--queue-memory-max` of
//! ready bodies in memory and pages persistent bodies out to the log beyond
//! that (see `queue`); recovered messages come back paged out, so a restart
//! reads only the bodies that reach the head. Transient bodies stay in
//! memory; the broker's memory watermark (`connection.blocked`) bounds them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::connection::Outbound;
use crate::message::Message;
use crate::meta::{Command, Metadata, QueueDef};
use crate::queue::{Queue, Restored};
use crate::store::{
    self, MessageId, NewMessage, Recovered, Store, StoreMetrics, StoreOptions, Ticket,
};

/// Name of the lock file in the data directory (held for the process lifetime).
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Subdirectory of the data directory holding the store.
pub const STORE_DIR_NAME: &str = "store";
/// Version of the topology snapshot encoding (inside the store's own framing).
pub const SNAPSHOT_VERSION: u32 = 1;
/// While the disk alarm is raised, how often housekeeping probes the disk.
pub const DISK_PROBE_INTERVAL_MS: u64 = 1_000;
/// Publishes awaiting durability per connection before the connection stops
/// handing confirms to the waiter and waits (bounds the waiter's queue).
pub const CONFIRMS_PENDING_MAX: usize = 1_000_000;

/// Why the durable state could not be opened or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the data directory.
    #[error("data directory {path} is in use by another process (lock held on {path}/LOCK)")]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock data directory {path}: {source}")]
    Lock {
        /// The data directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The store refused to open or failed.
    #[error("data directory: {0}")]
    Store(#[from] store::Error),
    /// The topology snapshot does not decode.
    #[error("metadata snapshot in {path} does not decode: {reason}")]
    Snapshot {
        /// The data directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Whether the data directory is of a format this build cannot read
    /// (the binary exits with code 2, a configuration problem).
    pub fn is_incompatible_format(&self) -> bool {
        match self {
            Error::Store(err) => err.is_incompatible_format(),
            Error::Snapshot { .. } => true,
            _ => false,
        }
    }
}

/// The durable topology: replayable commands, in dependency order.
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    commands: Vec<Command>,
}

/// The node's durable state: the store, the directory lock, the disk alarm.
#[derive(Debug)]
pub struct Durable {
    store: Arc<Store>,
    dir: PathBuf,
    _lock: File,
    /// Bumped under the broker's metadata write lock, so versions follow
    /// the order changes were applied in.
    snapshot_version: AtomicU64,
    /// Last snapshot written: its version and bytes (the disk probe rewrites it).
    written: Mutex<(u64, Vec<u8>)>,
    disk_alarm: AtomicBool,
    last_probe: Mutex<Instant>,
    /// Set on cluster members: topology snapshots are not written.
    topology_in_log: AtomicBool,
    /// Body bytes each durable queue keeps in memory before paging out.
    queue_memory_max_bytes: AtomicU64,
}

impl Durable {
    /// Locks `data_dir` and opens the store inside it.
    pub fn open(
        data_dir: &Path,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(Arc<Durable>, Recovered), Error> {
        Durable::open_with_backend(data_dir, Arc::new(store::backend::FsBackend), metrics)
    }

    /// [`Durable::open`] over another file backend (fault injection in tests).
    pub fn open_with_backend(
        data_dir: &Path,
        backend: Arc<dyn store::backend::Backend>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(Arc<Durable>, Recovered), Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Lock {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(data_dir.join(LOCK_FILE_NAME))
            .map_err(|source| Error::Lock {
                path: data_dir.to_path_buf(),
                source,
            })?;
        lock_exclusive(&lock).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked {
                    path: data_dir.to_path_buf(),
                }
            } else {
                Error::Lock {
                    path: data_dir.to_path_buf(),
                    source,
                }
            }
        })?;
        let dir = data_dir.join(STORE_DIR_NAME);
        let (store, recovered) = Store::open(
            &dir,
            StoreOptions::default(),
            backend,
            StoreMetrics::from_metrics(metrics),
        )?;
        for (path, offset) in &recovered.truncated_tails {
            tracing::warn!(path = %path.display(), offset, "cut a torn tail left by a crash");
        }
        let durable = Durable {
            store: Arc::new(store),
            dir: data_dir.to_path_buf(),
            _lock: lock,
            snapshot_version: AtomicU64::new(0),
            written: Mutex::new((0, recovered.metadata.clone().unwrap_or_default())),
            disk_alarm: AtomicBool::new(false),
            last_probe: Mutex::new(Instant::now()),
            topology_in_log: AtomicBool::new(false),
            queue_memory_max_bytes: AtomicU64::new(crate::limits::QUEUE_MEMORY_MAX_BYTES_DEFAULT),
        };
        Ok((Arc::new(durable), recovered))
    }

    /// Sets the in-memory budget of queues attached from now on (call
    /// before [`Durable::restore`]).
    pub fn set_queue_memory_max_bytes(&self, bytes: u64) {
        self.queue_memory_max_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Restores the topology and the messages found at open into `broker`,
    /// then attaches the store to it. Call before any listener opens.
    pub fn restore(self: &Arc<Self>, broker: &Broker, recovered: Recovered) -> Result<(), Error> {
        if let Some(bytes) = &recovered.metadata {
            let snapshot: Snapshot =
                serde_json::from_slice(bytes).map_err(|err| Error::Snapshot {
                    path: self.dir.clone(),
                    reason: err.to_string(),
                })?;
            if snapshot.version != SNAPSHOT_VERSION {
                return Err(Error::Snapshot {
                    path: self.dir.clone(),
                    reason: format!(
                        "snapshot version {} is not supported (this build reads {SNAPSHOT_VERSION})",
                        snapshot.version
                    ),
                });
            }
            restore_topology(broker, snapshot.commands);
        }
        broker.attach_durable(self.clone());
        for summary in broker.list_queues() {
            if let Some(queue) = broker.queue(&summary.vhost, &summary.def.name) {
                self.attach(&queue);
            }
        }
        self.restore_messages(broker, recovered.queues)
    }

    /// Keeps the topology out of the store from now on: a cluster member's
    /// topology is the decided Paxos log, which it replays at startup.
    pub fn set_topology_in_log(&self) {
        self.topology_in_log.store(true, Ordering::SeqCst);
    }

    /// Puts the recovered messages back into their queues (which must exist
    /// by now); messages of queues that no longer exist are dropped.
    pub fn restore_messages(
        &self,
        broker: &Broker,
        queues: BTreeMap<String, Vec<store::RecoveredMessage>>,
    ) -> Result<(), Error> {
        let mut n_messages = 0usize;
        for (key, messages) in queues {
            let queue = parse_queue_key(&key).and_then(|(vhost, name)| broker.queue(vhost, name));
            let Some(queue) = queue.filter(|q| q.log().is_some()) else {
                tracing::warn!(queue = %key, "dropping recovered messages of a queue that no longer exists");
                drop(self.store.drop_queue(&key));
                continue;
            };
            let now_ms = now_ms();
            let now = Instant::now();
            // Bodies stay on disk: the queue reads them back as they near
            // its head (a message that no longer decodes is dropped then).
            let entries: Vec<Restored> = messages
                .into_iter()
                .map(|recovered| Restored {
                    store_id: recovered.id,
                    size: u64::from(recovered.body_len),
                    redelivered: recovered.redelivered,
                    expires_at: recovered
                        .expires_at_ms
                        .map(|at| now + Duration::from_millis(at.saturating_sub(now_ms))),
                })
                .collect();
            n_messages += entries.len();
            queue.restore(entries);
        }
        tracing::info!(messages = n_messages, "restored durable state");
        Ok(())
    }

    /// Gives a newly created queue its log when it is durable (exclusive
    /// queues never are).
    pub fn attach(&self, queue: &Queue) {
        if is_durable_queue(&queue.def) {
            queue.attach_log(QueueLog {
                store: self.store.clone(),
                key: queue_key(&queue.vhost, queue.name()),
                memory_max_bytes: self.queue_memory_max_bytes.load(Ordering::Relaxed),
            });
        }
    }

    /// Called with the metadata write lock held, before `command` applies:
    /// whether the change can touch the durable topology.
    pub fn before_command(&self, meta: &Metadata, command: &Command) -> bool {
        !self.topology_in_log.load(Ordering::SeqCst) && changes_durable_topology(meta, command)
    }

    /// Called with the metadata write lock held, after a change that touched
    /// durable topology applied: encodes the snapshot and orders it.
    pub fn snapshot(&self, meta: &Metadata) -> PendingSnapshot {
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            commands: durable_commands(meta),
        };
        PendingSnapshot {
            version: self.snapshot_version.fetch_add(1, Ordering::SeqCst) + 1,
            bytes: serde_json::to_vec(&snapshot).expect("metadata commands always serialize"),
        }
    }

    /// Writes a snapshot unless a newer one was written already. Blocking:
    /// the caller answers the client only after it returns.
    pub fn write_snapshot(&self, pending: PendingSnapshot) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if pending.version <= written.0 {
            return;
        }
        match self.store.write_metadata(&pending.bytes) {
            Ok(()) => *written = (pending.version, pending.bytes),
            Err(err) => {
                tracing::error!(%err, "durable topology change not written");
                if err.is_disk_full() {
                    self.raise_disk_alarm();
                }
            }
        }
    }

    /// Records a full disk: publishers get blocked until a probe succeeds.
    pub fn raise_disk_alarm(&self) {
        if !self.disk_alarm.swap(true, Ordering::SeqCst) {
            tracing::warn!("disk full: blocking publishers until space returns");
        }
    }

    /// Housekeeping: whether the disk alarm is raised. While it is, probes
    /// the disk (rewriting the last snapshot) at most every
    /// [`DISK_PROBE_INTERVAL_MS`] and clears the alarm when that succeeds.
    pub fn disk_alarm(&self) -> bool {
        if !self.disk_alarm.load(Ordering::SeqCst) {
            return false;
        }
        {
            let mut last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_millis(DISK_PROBE_INTERVAL_MS) {
                return true;
            }
            *last = Instant::now();
        }
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match self.store.write_metadata(&written.1) {
            Ok(()) => {
                tracing::info!("disk space is back: unblocking publishers");
                self.disk_alarm.store(false, Ordering::SeqCst);
                false
            }
            Err(_) => true,
        }
    }

    /// Flushes and stops the store (clean shutdown).
    pub fn close(&self) {
        self.store.close();
    }
}

/// A snapshot taken under the metadata lock, to write after releasing it.
#[derive(Debug)]
pub struct PendingSnapshot {
    version: u64,
    bytes: Vec<u8>,
}

/// A durable queue's handle on the store.
#[derive(Debug)]
pub struct QueueLog {
    store: Arc<Store>,
    key: String,
    memory_max_bytes: u64,
}

impl QueueLog {
    /// Body bytes the queue keeps in memory before paging out.
    pub fn memory_max_bytes(&self) -> u64 {
        self.memory_max_bytes
    }

    /// Whether the message is durable, so its body may leave memory.
    pub fn is_durable(&self, id: MessageId) -> bool {
        self.store.is_durable(id)
    }

    /// Reads a paged-out message back (blocking: one positioned read).
    /// `None`, logged, when the log cannot give it back.
    pub fn read(&self, id: MessageId) -> Option<Message> {
        let stored = match self.store.read_message(id) {
            Ok(stored) => stored,
            Err(err) => {
                tracing::error!(queue = %self.key, id, %err, "cannot read a paged-out message back; dropping it");
                return None;
            }
        };
        let message = decode_message(&stored.properties, stored.body);
        if message.is_none() {
            tracing::error!(queue = %self.key, id, "a paged-out message's properties do not decode; dropping it");
        }
        message
    }

    /// Logs a persistent message. Returns its id, and pushes the ticket the
    /// publisher's confirm waits for.
    pub fn persist(
        &self,
        message: &Message,
        ttl_ms: Option<u64>,
        tickets: &mut Vec<Ticket>,
    ) -> Option<MessageId> {
        let properties = encode_properties(message);
        let enqueued_at_ms = now_ms();
        let new = NewMessage {
            queue: &self.key,
            properties: &properties,
            body: &message.body,
            enqueued_at_ms,
            expires_at_ms: ttl_ms.map(|ttl| enqueued_at_ms.saturating_add(ttl)),
        };
        match self.store.enqueue(&new) {
            Ok((id, ticket)) => {
                tickets.push(ticket);
                Some(id)
            }
            Err(err) => {
                tickets.push(Ticket::resolved(Err(err)));
                None
            }
        }
    }

    /// The message left the queue for good (acked, expired, dropped, purged).
    pub fn remove(&self, id: MessageId) {
        drop(self.store.remove(&self.key, id));
    }

    /// The message was delivered: a restart brings it back redelivered.
    pub fn delivered(&self, id: MessageId) {
        drop(self.store.mark_delivered(&self.key, id));
    }

    /// The queue was deleted.
    pub fn drop_all(&self) {
        drop(self.store.drop_queue(&self.key));
    }
}

/// Awaits store tickets of one connection's publishes in order and reports
/// each as [`Outbound::Confirmed`] to the connection.
#[derive(Debug)]
pub struct ConfirmWaiter {
    sender: mpsc::UnboundedSender<PendingConfirm>,
}

#[derive(Debug)]
struct PendingConfirm {
    channel: Arc<crate::broker::ChannelInfo>,
    seq: u64,
    tickets: Vec<Ticket>,
    rejected: bool,
}

impl ConfirmWaiter {
    /// Starts the waiter task of a connection; it ends when the waiter is
    /// dropped or the connection's mailbox closes.
    pub fn start(
        durable: Option<Arc<Durable>>,
        outbound: mpsc::UnboundedSender<Outbound>,
    ) -> ConfirmWaiter {
        let (sender, mut receiver) = mpsc::unbounded_channel::<PendingConfirm>();
        tokio::spawn(async move {
            while let Some(pending) = receiver.recv().await {
                let mut ok = !pending.rejected;
                for ticket in pending.tickets {
                    if let Err(err) = ticket.await {
                        if ok {
                            tracing::warn!(%err, "persistent message not durable; nacking");
                        }
                        ok = false;
                        if err.is_disk_full()
                            && let Some(durable) = &durable
                        {
                            durable.raise_disk_alarm();
                        }
                    }
                }
                let confirmed = Outbound::Confirmed {
                    channel: pending.channel,
                    seq: pending.seq,
                    ok,
                };
                if outbound.send(confirmed).is_err() {
                    return;
                }
            }
        });
        ConfirmWaiter { sender }
    }

    /// Queues the confirm of publish `seq`: an ack once every ticket
    /// resolved Ok, otherwise (or when `rejected`) a nack.
    pub fn submit(
        &self,
        channel: Arc<crate::broker::ChannelInfo>,
        seq: u64,
        tickets: Vec<Ticket>,
        rejected: bool,
    ) {
        let _ = self.sender.send(PendingConfirm {
            channel,
            seq,
            tickets,
            rejected,
        });
    }
}

/// Whether a queue's definition makes it durable (exclusive queues never are).
pub fn is_durable_queue(def: &QueueDef) -> bool {
    def.durable && def.exclusive_owner.is_none()
}

/// The store's name of queue `name` in `vhost`: length-prefixed so that no
/// two (vhost, name) pairs collide.
pub fn queue_key(vhost: &str, name: &str) -> String {
    format!("{}:{vhost}{name}", vhost.len())
}

fn parse_queue_key(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len) {
        return None;
    }
    Some(rest.split_at(len))
}

/// Takes an exclusive, non-blocking `flock` on `file`: held until the file is
/// closed, which the kernel does even when the process is killed.
/// `WouldBlock` when another process holds it.
fn lock_exclusive(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for
    // the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Properties as the store keeps them: exchange and routing key (each
/// `u16` big-endian length + bytes), then the raw AMQP property list.
fn encode_properties(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        4 + message.exchange.len() + message.routing_key.len() + message.properties_raw.len(),
    );
    for part in [message.exchange.as_bytes(), message.routing_key.as_bytes()] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&part[..usize::from(len)]);
    }
    out.extend_from_slice(&message.properties_raw);
    out
}

fn decode_message(stored: &[u8], body: Vec<u8>) -> Option<Message> {
    let mut rest = stored;
    let mut take = || -> Option<Arc<str>> {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let bytes = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        std::str::from_utf8(bytes).ok().map(Arc::from)
    };
    let exchange = take()?;
    let routing_key = take()?;
    Message::decode(exchange, routing_key, rest, Bytes::from(body))
}

/// Whether applying `command` to `meta` can change the durable topology.
fn changes_durable_topology(meta: &Metadata, command: &Command) -> bool {
    let exchange_durable = |vhost: &str, name: &str| {
        meta.vhosts
            .get(vhost)
            .and_then(|v| v.exchanges.get(name))
            .is_some_and(|e| e.def.durable)
    };
    let queue_durable = |vhost: &str, name: &str| {
        meta.vhosts
            .get(vhost)
            .and_then(|v| v.queues.get(name))
            .is_some_and(is_durable_queue)
    };
    match command {
        Command::AddVhost { name } => !meta.vhosts.contains_key(name),
        Command::DeleteVhost { .. }
        | Command::PutUser { .. }
        | Command::DeleteUser { .. }
        | Command::SetPermissions { .. }
        | Command::ClearPermissions { .. }
        | Command::SetUserLimit { .. }
        | Command::SetVhostLimit { .. } => true,
        Command::DeclareExchange { exchange, .. } => exchange.durable,
        // Deleting anything may auto-delete a durable exchange it fed.
        Command::DeleteExchange { vhost, name, .. } => exchange_durable(vhost, name),
        Command::DeclareQueue { queue, .. } => is_durable_queue(queue),
        Command::DeleteQueue { vhost, name } => queue_durable(vhost, name),
        Command::Bind { vhost, source, .. } | Command::Unbind { vhost, source, .. } => {
            exchange_durable(vhost, source)
        }
        Command::SetDraining { .. } => true,
        Command::MoveQueue { vhost, name, .. } => queue_durable(vhost, name),
    }
}

/// The durable subset of `meta` as commands that rebuild it, in order:
/// vhosts, users, permissions, exchanges, queues, bindings.
fn durable_commands(meta: &Metadata) -> Vec<Command> {
    meta.commands_where(|exchange| exchange.durable, is_durable_queue)
}

/// Brings a fresh broker's metadata to the snapshot: removes bootstrap
/// entities the snapshot lacks, then replays it.
fn restore_topology(broker: &Broker, commands: Vec<Command>) {
    let mut vhosts = BTreeSet::new();
    let mut users = BTreeSet::new();
    let mut permissions = BTreeMap::new();
    for command in &commands {
        match command {
            Command::AddVhost { name } => {
                vhosts.insert(name.clone());
            }
            Command::PutUser { name, .. } => {
                users.insert(name.clone());
            }
            Command::SetPermissions { vhost, user, .. } => {
                permissions.insert((vhost.clone(), user.clone()), ());
            }
            _ => {}
        }
    }
    let mut resets = Vec::new();
    for (vhost, user, _) in broker.list_permissions() {
        if !permissions.contains_key(&(vhost.clone(), user.clone())) {
            resets.push(Command::ClearPermissions { vhost, user });
        }
    }
    for user in broker.list_users() {
        if !users.contains(&user.name) {
            resets.push(Command::DeleteUser { name: user.name });
        }
    }
    for name in broker.list_vhosts() {
        if !vhosts.contains(&name) {
            resets.push(Command::DeleteVhost { name });
        }
    }
    for command in resets.into_iter().chain(commands) {
        if let Err(err) = broker.execute(command.clone()) {
            tracing::warn!(%err, ?command, "durable topology command not restored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_round_trip_without_collisions() {
        // Goal: distinct (vhost, name) pairs map to distinct keys that parse back.
        let pairs = [
            ("/", "a"),
            ("/a", ""),
            ("", "/a"),
            ("v:1", "q:2"),
            ("é", "ü"),
        ];
        let keys: BTreeSet<String> = pairs.iter().map(|(v, n)| queue_key(v, n)).collect();
        assert_eq!(keys.len(), pairs.len());
        for (vhost, name) in pairs {
            assert_eq!(
                parse_queue_key(&queue_key(vhost, name)),
                Some((vhost, name))
            );
        }
    }

    #[test]
    fn stored_properties_decode_back_to_the_message() {
        // Goal: exchange, routing key and properties survive the store encoding.
        use amq_protocol::protocol::basic::AMQPProperties;
        let properties = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".into());
        let message = Message::with_properties(
            "ex".into(),
            "rk".into(),
            &properties,
            Bytes::from_static(b"body"),
        );
        let decoded =
            decode_message(&encode_properties(&message), b"body".to_vec()).expect("decodes");
        assert_eq!(&*decoded.exchange, "ex");
        assert_eq!(&*decoded.routing_key, "rk");
        assert_eq!(decoded.properties_raw, message.properties_raw);
        assert!(decoded.is_persistent());
        assert_eq!(&decoded.body[..], b"body");
        assert!(decode_message(&[0, 9, 1], Vec::new()).is_none());
    }

    fn temp_dir(label: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        std::env::temp_dir().join(format!(
            "synod-durable-{label}-{}-{nanos}",
            std::process::id()
        ))
    }

    fn open_broker(dir: &Path) -> (Arc<Broker>, Arc<Durable>) {
        let metrics = crate::metrics::Metrics::new();
        let (durable, recovered) = Durable::open(dir, &metrics).expect("open");
        let broker = Broker::new(crate::broker::Settings::new("n"), metrics);
        durable.restore(&broker, recovered).expect("restore");
        (broker, durable)
    }

    fn queue_def(name: &str, durable: bool) -> QueueDef {
        QueueDef {
            name: name.into(),
            durable,
            exclusive_owner: None,
            auto_delete: false,
            arguments: Default::default(),
            home_node: "n".into(),
        }
    }

    #[test]
    fn vhosts_users_and_permissions_survive_reopen_and_deleted_guest_stays_deleted() {
        // Goal: the snapshot restores vhosts, users, permissions and queues, and removes bootstrap entities it lacks.
        let dir = temp_dir("meta");
        {
            let (broker, durable) = open_broker(&dir);
            let commands = [
                Command::AddVhost { name: "v2".into() },
                Command::PutUser {
                    name: "alice".into(),
                    password_hash: crate::auth::hash_password("pw"),
                    tags: vec!["management".into()],
                },
                Command::SetPermissions {
                    vhost: "v2".into(),
                    user: "alice".into(),
                    configure: "".into(),
                    write: "x.*".into(),
                    read: ".*".into(),
                },
                Command::DeleteUser {
                    name: "guest".into(),
                },
                Command::DeclareQueue {
                    vhost: "v2".into(),
                    queue: queue_def("kept", true),
                },
                Command::DeclareQueue {
                    vhost: "v2".into(),
                    queue: queue_def("lost", false),
                },
            ];
            for command in commands {
                broker.execute(command).expect("applies");
            }
            durable.close();
        }
        let (broker, durable) = open_broker(&dir);
        assert_eq!(broker.list_vhosts(), ["/", "v2"]);
        let users: Vec<String> = broker.list_users().into_iter().map(|u| u.name).collect();
        assert_eq!(users, ["alice"]);
        let permissions = broker.list_permissions();
        assert_eq!(permissions.len(), 1);
        assert_eq!(permissions[0].2.write, "x.*");
        assert!(broker.queue("v2", "kept").is_some());
        assert!(broker.queue("v2", "lost").is_none());
        durable.close();
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_queue_ten_times_its_memory_budget_pages_out_and_comes_back_in_order() {
        // Goal: bodies beyond --queue-memory-max leave memory once durable, and every message returns in order, before and after a restart.
        const BUDGET: u64 = 64 * 1024;
        const BODY: usize = 1024;
        const N: usize = 1_500; // 1.5 MiB of bodies: 23 times the budget
        let dir = temp_dir("paging");
        let open = |dir: &Path| {
            let metrics = crate::metrics::Metrics::new();
            let (durable, recovered) = Durable::open(dir, &metrics).expect("open");
            durable.set_queue_memory_max_bytes(BUDGET);
            let broker = Broker::new(crate::broker::Settings::new("n"), metrics);
            durable.restore(&broker, recovered).expect("restore");
            (broker, durable)
        };
        let body = |i: usize| {
            let mut body = vec![(i % 251) as u8; BODY];
            body[..8].copy_from_slice(&(i as u64).to_le_bytes());
            body
        };
        let index_of = |entry: &crate::queue::Entry| {
            let bytes: [u8; 8] = entry.message.body[..8].try_into().expect("8 bytes");
            u64::from_le_bytes(bytes) as usize
        };
        let persistent =
            amq_protocol::protocol::basic::AMQPProperties::default().with_delivery_mode(2);
        let (broker, durable) = open(&dir);
        broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue_def("q", true),
            })
            .expect("declare");
        let mut tickets = Vec::new();
        for i in 0..N {
            let message =
                Message::with_properties("".into(), "q".into(), &persistent, Bytes::from(body(i)));
            broker
                .publish_durable("/", Arc::new(message), &mut tickets)
                .expect("routed");
        }
        for ticket in tickets {
            ticket.wait().expect("durable");
        }
        // Housekeeping pages out what was not yet durable at publish time.
        broker.tick();
        let queue = broker.queue("/", "q").expect("queue");
        let counts = queue.counts();
        assert_eq!(counts.ready, N as u64);
        assert_eq!(counts.ready_bytes, (N * BODY) as u64);
        assert!(
            counts.loaded_bytes <= BUDGET,
            "{} bytes in memory, budget {BUDGET}",
            counts.loaded_bytes
        );
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut most_loaded = 0;
        for i in 0..N / 2 {
            let (entry, _) = queue.get(true, now, &mut dead).expect("a message");
            assert_eq!(index_of(&entry), i);
            assert_eq!(&entry.message.body[..], &body(i)[..]);
            assert!(entry.message.is_persistent());
            most_loaded = most_loaded.max(queue.counts().loaded_bytes);
        }
        assert!(
            most_loaded <= BUDGET,
            "{most_loaded} bytes in memory while draining"
        );
        durable.close();
        drop((broker, durable, queue));
        // After a restart every remaining body is on disk until it is read.
        let (broker, durable) = open(&dir);
        let queue = broker.queue("/", "q").expect("queue restored");
        assert_eq!(queue.counts().ready, (N - N / 2) as u64);
        assert_eq!(queue.counts().loaded_bytes, 0);
        for i in N / 2..N {
            let (entry, _) = queue.get(true, now, &mut dead).expect("a message");
            assert_eq!(index_of(&entry), i);
            assert_eq!(&entry.message.body[..], &body(i)[..]);
        }
        assert!(queue.get(true, now, &mut dead).is_none());
        assert!(dead.is_empty());
        durable.close();
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_full_disk_nacks_persistent_publishes_raises_the_alarm_and_recovers() {
        // Goal: ENOSPC turns into a nack and a publisher block that clears by itself once space returns.
        let dir = temp_dir("full");
        let backend = store::backend::FaultyBackend::new();
        let faults = backend.faults();
        let metrics = crate::metrics::Metrics::new();
        let (durable, recovered) =
            Durable::open_with_backend(&dir, Arc::new(backend), &metrics).expect("open");
        let broker = Broker::new(crate::broker::Settings::new("n"), metrics);
        durable.restore(&broker, recovered).expect("restore");
        broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue_def("q", true),
            })
            .expect("declare");
        let properties =
            amq_protocol::protocol::basic::AMQPProperties::default().with_delivery_mode(2);
        let message = Arc::new(Message::with_properties(
            "".into(),
            "q".into(),
            &properties,
            Bytes::from(vec![7u8; 4096]),
        ));
        faults.set_space_left_bytes(Some(100));
        let mut tickets = Vec::new();
        broker
            .publish_durable("/", message.clone(), &mut tickets)
            .expect("routed");
        assert_eq!(tickets.len(), 1);
        let (outbound, mut inbox) = mpsc::unbounded_channel();
        let waiter = ConfirmWaiter::start(Some(durable.clone()), outbound);
        let channel = Arc::new(crate::broker::ChannelInfo::default());
        waiter.submit(channel, 1, tickets, false);
        let Some(Outbound::Confirmed { seq, ok, .. }) =
            tokio::time::timeout(Duration::from_secs(10), inbox.recv())
                .await
                .expect("in time")
        else {
            panic!("no confirm");
        };
        assert_eq!((seq, ok), (1, false), "a write that hit ENOSPC is nacked");
        let mut alarm = broker.memory_alarm();
        broker.tick();
        assert!(
            *alarm.borrow_and_update(),
            "the disk alarm blocks publishers"
        );
        faults.set_space_left_bytes(None);
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                broker.tick();
                if !*alarm.borrow_and_update() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the alarm clears once space returns");
        let mut tickets = Vec::new();
        broker
            .publish_durable("/", message, &mut tickets)
            .expect("routed");
        for ticket in tickets {
            ticket.await.expect("durable again");
        }
        durable.close();
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
