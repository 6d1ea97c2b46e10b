//! Durable storage: an append-only segment log of queue messages, a metadata
//! snapshot, group commit, recovery and compaction. Never sends anything on
//! the network and knows nothing of AMQP beyond opaque property bytes.
//!
//! Map of the module:
//! - [`limits`]: every bound of the store (`*_MAX`).
//! - [`format`]: the byte layout (pure); `FORMAT.md` documents it.
//! - [`backend`]: file operations behind a trait; the real filesystem and a
//!   fault-injecting one.
//! - `recovery`: replays segments at open, truncating a torn tail and refusing
//!   corruption that valid data follows.
//! - `writer`: the group-commit thread, which also compacts.
//! - `metadata`: the topology snapshot, replaced atomically.
//!
//! How the broker uses it: [`Store::open`] returns the store and what it
//! recovered (per-queue ordered messages without bodies). Each publish calls
//! [`Store::enqueue`] and confirms when the returned [`Ticket`] resolves `Ok`;
//! acks call [`Store::remove`]; deliveries call [`Store::mark_delivered`].
//! Bodies may be dropped from memory once confirmed and paged back in with
//! [`Store::read_message`].

pub mod backend;
pub mod format;
pub mod limits;
mod metadata;
mod recovery;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;

use backend::{Backend, BackendFile};
use format::{EnqueueRecord, FLAG_HAS_EXPIRY, FormatError, Record};

/// A message id, assigned by the store and unique within a data directory.
pub type MessageId = u64;

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The data directory was written by an incompatible format version.
    #[error(
        "{path}: store format version {found} is not supported (this build reads version {supported}); \
         use a matching release or move the data directory aside"
    )]
    IncompatibleVersion {
        /// The file carrying the version.
        path: PathBuf,
        /// Version found on disk.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// A file in the data directory is not a store file.
    #[error("{path}: not a Synod store file (bad magic bytes)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Damaged bytes that are not a torn tail: valid data follows them, or they
    /// sit where no crash can leave them.
    #[error("{path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the damage.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment starts later in the batch sequence than the previous one ends:
    /// confirmed batches are gone.
    #[error("{path}: starts at batch {found} but the log before it ends at batch {expected}")]
    MissingBatches {
        /// The segment after the gap.
        path: PathBuf,
        /// The batch sequence number that should come next.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A record the caller asked to store breaks a bound.
    #[error("record rejected: {0}")]
    Invalid(#[from] FormatError),
    /// The write or fsync of the batch holding this record failed; it is not
    /// durable and may or may not survive a crash. The store keeps working.
    #[error("not durable: {0}")]
    NotDurable(Arc<io::Error>),
    /// No durable message with this id (not yet confirmed, or removed).
    #[error("message {0} is not in the store")]
    NotFound(MessageId),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
}

impl Error {
    /// Whether the failure is a full disk (the broker may raise a disk alarm).
    pub fn is_disk_full(&self) -> bool {
        let io_error = match self {
            Error::NotDurable(err) => &**err,
            Error::Io { source, .. } => source,
            _ => return false,
        };
        io_error.kind() == io::ErrorKind::StorageFull
    }

    /// Whether the data directory is of a format this build cannot read
    /// (the binary exits with code 2).
    pub fn is_incompatible_format(&self) -> bool {
        matches!(self, Error::IncompatibleVersion { .. })
    }

    fn io(path: &Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Tunable bounds of one store; `Default` takes them from [`limits`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Size at which a segment is sealed, in bytes.
    pub segment_size_max: u64,
    /// Records per group commit.
    pub group_commit_records_max: usize,
    /// Bytes per group commit.
    pub group_commit_bytes_max: usize,
    /// Submitted but unwritten bytes before submitters wait.
    pub pending_bytes_max: usize,
    /// Bytes relocated per compaction step.
    pub compaction_step_bytes_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_size_max: limits::SEGMENT_SIZE_MAX,
            group_commit_records_max: limits::GROUP_COMMIT_RECORDS_MAX,
            group_commit_bytes_max: limits::GROUP_COMMIT_BYTES_MAX,
            pending_bytes_max: limits::PENDING_BYTES_MAX,
            compaction_step_bytes_max: limits::COMPACTION_STEP_BYTES_MAX,
        }
    }
}

/// The metrics the store updates, taken from the broker's registry.
#[derive(Clone)]
pub struct StoreMetrics {
    /// Observes the duration of each group-commit fsync.
    pub fsync_seconds: Histogram,
    /// Bytes of segment and snapshot files.
    pub bytes: IntGauge,
}

impl StoreMetrics {
    /// The store's families of the broker registry.
    pub fn from_metrics(metrics: &crate::metrics::Metrics) -> StoreMetrics {
        StoreMetrics {
            fsync_seconds: metrics.store_fsync_seconds.clone(),
            bytes: metrics.store_bytes.clone(),
        }
    }

    /// Unregistered metrics, for tests and tools.
    pub fn unregistered() -> StoreMetrics {
        StoreMetrics {
            fsync_seconds: Histogram::with_opts(prometheus::HistogramOpts::new(
                "store_fsync_seconds",
                "fsync duration",
            ))
            .expect("valid metric name"),
            bytes: IntGauge::new("store_bytes", "store size").expect("valid metric name"),
        }
    }
}

/// A message to enqueue.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// Queue name as the broker identifies it (e.g. vhost and name).
    pub queue: &'a str,
    /// Serialized properties, opaque to the store.
    pub properties: &'a [u8],
    /// Body.
    pub body: &'a [u8],
    /// Enqueue time, milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// Expiry deadline, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

/// A message found at recovery. The body stays on disk: page it in with
/// [`Store::read_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Its id.
    pub id: MessageId,
    /// Serialized properties.
    pub properties: Vec<u8>,
    /// Body length in bytes.
    pub body_len: u32,
    /// Enqueue time, milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// Expiry deadline, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    /// Delivered before the restart and not acknowledged.
    pub redelivered: bool,
}

/// What [`Store::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live messages per queue, in enqueue order.
    pub queues: BTreeMap<String, Vec<RecoveredMessage>>,
    /// The last metadata snapshot written, if any.
    pub metadata: Option<Vec<u8>>,
    /// Torn tails cut off during recovery: (file, offset it was cut at).
    pub truncated_tails: Vec<(PathBuf, u64)>,
}

/// A message read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Queue name.
    pub queue: String,
    /// Serialized properties.
    pub properties: Vec<u8>,
    /// Body.
    pub body: Vec<u8>,
}

/// Resolves when a submitted record is durable (`Ok`) or failed to be (`Err`).
/// Await it, or call [`Ticket::wait`] outside an async runtime.
#[must_use = "a record is only durable once its ticket resolves Ok"]
pub struct Ticket {
    state: TicketState,
}

enum TicketState {
    Waiting(oneshot::Receiver<Result<(), Error>>),
    Ready(Option<Result<(), Error>>),
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").finish_non_exhaustive()
    }
}

impl Ticket {
    fn ready(result: Result<(), Error>) -> Ticket {
        Ticket {
            state: TicketState::Ready(Some(result)),
        }
    }

    /// A ticket that is already resolved (a record refused before submission).
    pub fn resolved(result: Result<(), Error>) -> Ticket {
        Ticket::ready(result)
    }

    /// Blocks the calling thread until the record is durable or failed.
    /// Must not be called from inside an async runtime.
    pub fn wait(self) -> Result<(), Error> {
        match self.state {
            TicketState::Waiting(receiver) => {
                receiver.blocking_recv().unwrap_or(Err(Error::Closed))
            }
            TicketState::Ready(result) => result.unwrap_or(Err(Error::Closed)),
        }
    }
}

impl Future for Ticket {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            TicketState::Waiting(receiver) => Pin::new(receiver)
                .poll(cx)
                .map(|result| result.unwrap_or(Err(Error::Closed))),
            TicketState::Ready(result) => Poll::Ready(result.take().unwrap_or(Err(Error::Closed))),
        }
    }
}

/// Counters describing the store, for tests and the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Segment files.
    pub segments: usize,
    /// Live (enqueued, not removed) messages.
    pub live_messages: usize,
    /// Bytes of live enqueue records.
    pub live_bytes: u64,
    /// Bytes of all segment files.
    pub segment_bytes: u64,
}

/// What the writer does to the index once a record is durable.
pub(crate) enum Change {
    Enqueue {
        id: MessageId,
        queue: String,
        delivered: bool,
    },
    Remove {
        id: MessageId,
    },
    Delivered {
        id: MessageId,
    },
    DropQueue {
        queue: String,
    },
    /// A live record copied forward by compaction from its old place.
    Relocate {
        id: MessageId,
        from_segment: u64,
        from_offset: u64,
    },
}

/// One submitted record.
pub(crate) struct Op {
    pub(crate) change: Change,
    pub(crate) record: Vec<u8>,
    pub(crate) done: Option<oneshot::Sender<Result<(), Error>>>,
}

pub(crate) struct Pending {
    pub(crate) ops: std::collections::VecDeque<Op>,
    pub(crate) bytes: usize,
    pub(crate) closed: bool,
}

/// Where a durable enqueue record lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) queue: u32,
    pub(crate) delivered: bool,
}

pub(crate) struct SegmentState {
    pub(crate) file: Arc<dyn BackendFile>,
    pub(crate) path: PathBuf,
    pub(crate) salt: u64,
    /// Durable length: bytes beyond it are never read.
    pub(crate) size: u64,
    pub(crate) live_records: u64,
    pub(crate) live_bytes: u64,
}

/// What is durable: live messages and segments. Only the writer changes it,
/// and only after an fsync succeeded.
#[derive(Default)]
pub(crate) struct Index {
    pub(crate) messages: HashMap<MessageId, Entry>,
    pub(crate) segments: BTreeMap<u64, SegmentState>,
    pub(crate) queue_ids: HashMap<String, u32>,
    pub(crate) queue_names: Vec<String>,
    pub(crate) metadata_bytes: u64,
}

impl Index {
    pub(crate) fn intern(&mut self, queue: &str) -> u32 {
        if let Some(&id) = self.queue_ids.get(queue) {
            return id;
        }
        let id = u32::try_from(self.queue_names.len()).expect("fewer than 2^32 queue names");
        self.queue_names.push(queue.to_string());
        self.queue_ids.insert(queue.to_string(), id);
        id
    }

    pub(crate) fn remove_message(&mut self, id: MessageId) {
        if let Some(entry) = self.messages.remove(&id) {
            let segment = self
                .segments
                .get_mut(&entry.segment)
                .expect("a live message's segment is in the index");
            segment.live_records -= 1;
            segment.live_bytes -= u64::from(entry.len);
        }
    }

    pub(crate) fn segment_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    pub(crate) fn live_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.live_bytes).sum()
    }
}

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) options: StoreOptions,
    pub(crate) metrics: StoreMetrics,
    pub(crate) next_message_id: AtomicU64,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) work_ready: Condvar,
    pub(crate) space_ready: Condvar,
    pub(crate) index: Mutex<Index>,
    pub(crate) metadata_lock: Mutex<()>,
}

impl Shared {
    pub(crate) fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("the index lock is never poisoned")
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .expect("the pending lock is never poisoned")
    }

    pub(crate) fn update_bytes_gauge(&self, index: &Index) {
        let bytes = index.segment_bytes() + index.metadata_bytes;
        self.metrics
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// The durable store of one node. Cheap to share behind an `Arc`; every method
/// takes `&self`.
pub struct Store {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, replays it and starts the writer.
    /// Fails on an incompatible format version, on corruption that is not a
    /// torn tail, and on I/O errors.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        backend: Arc<dyn Backend>,
        metrics: StoreMetrics,
    ) -> Result<(Store, Recovered), Error> {
        backend
            .create_dir_all(dir)
            .map_err(|err| Error::io(dir, err))?;
        let metadata = metadata::read(&*backend, dir)?;
        let replayed = recovery::replay(&*backend, dir)?;
        let mut index = Index {
            queue_ids: replayed.queue_ids,
            queue_names: replayed.queue_names,
            metadata_bytes: metadata.as_ref().map_or(0, |m| m.len() as u64),
            ..Index::default()
        };
        for (id, segment) in replayed.segments {
            index.segments.insert(id, segment);
        }
        let mut by_queue: BTreeMap<String, Vec<RecoveredMessage>> = BTreeMap::new();
        for (id, message) in replayed.messages {
            let segment = index
                .segments
                .get_mut(&message.segment)
                .expect("replayed messages live in replayed segments");
            segment.live_records += 1;
            segment.live_bytes += u64::from(message.len);
            index.messages.insert(
                id,
                Entry {
                    segment: message.segment,
                    offset: message.offset,
                    len: message.len,
                    queue: message.queue,
                    delivered: message.delivered,
                },
            );
            by_queue
                .entry(index.queue_names[message.queue as usize].clone())
                .or_default()
                .push(RecoveredMessage {
                    id,
                    properties: message.properties,
                    body_len: message.body_len,
                    enqueued_at_ms: message.enqueued_at_ms,
                    expires_at_ms: message.expires_at_ms,
                    redelivered: message.delivered,
                });
        }
        for messages in by_queue.values_mut() {
            messages.sort_unstable_by_key(|m| m.id);
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            backend,
            options,
            metrics,
            next_message_id: AtomicU64::new(replayed.next_message_id),
            pending: Mutex::new(Pending {
                ops: Default::default(),
                bytes: 0,
                closed: false,
            }),
            work_ready: Condvar::new(),
            space_ready: Condvar::new(),
            index: Mutex::new(index),
            metadata_lock: Mutex::new(()),
        });
        shared.update_bytes_gauge(&shared.index());
        let writer = writer::Writer::new(
            shared.clone(),
            replayed.next_segment_id,
            replayed.next_batch_seq,
        );
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| Error::io(dir, err))?;
        let recovered = Recovered {
            queues: by_queue,
            metadata,
            truncated_tails: replayed.truncated_tails,
        };
        Ok((
            Store {
                shared,
                writer: Mutex::new(Some(handle)),
            },
            recovered,
        ))
    }

    /// Submits a message. Returns its id at once and a ticket that resolves
    /// when it is durable. Waits only while more than `pending_bytes_max` bytes
    /// are queued for the disk.
    pub fn enqueue(&self, message: &NewMessage<'_>) -> Result<(MessageId, Ticket), Error> {
        let id = self.shared.next_message_id.fetch_add(1, Ordering::SeqCst);
        let record = Record::Enqueue(EnqueueRecord {
            message_id: id,
            flags: if message.expires_at_ms.is_some() {
                FLAG_HAS_EXPIRY
            } else {
                0
            },
            enqueued_at_ms: message.enqueued_at_ms,
            expires_at_ms: message.expires_at_ms.unwrap_or(0),
            queue: message.queue,
            properties: message.properties,
            body: message.body,
        });
        record.check_bounds()?;
        let ticket = self.submit(
            Change::Enqueue {
                id,
                queue: message.queue.to_string(),
                delivered: false,
            },
            &record,
        );
        Ok((id, ticket))
    }

    /// Records that a message left its queue (acknowledged, expired, dropped).
    pub fn remove(&self, queue: &str, id: MessageId) -> Ticket {
        let record = Record::Remove {
            queue,
            message_id: id,
        };
        self.submit_checked(Change::Remove { id }, &record)
    }

    /// Records that a message was delivered, so it recovers as redelivered.
    /// The broker need not wait for the ticket before delivering.
    pub fn mark_delivered(&self, queue: &str, id: MessageId) -> Ticket {
        let record = Record::Delivered {
            queue,
            message_id: id,
        };
        self.submit_checked(Change::Delivered { id }, &record)
    }

    /// Removes every message of a queue (deleted or purged).
    pub fn drop_queue(&self, queue: &str) -> Ticket {
        let record = Record::DropQueue { queue };
        self.submit_checked(
            Change::DropQueue {
                queue: queue.to_string(),
            },
            &record,
        )
    }

    /// Whether a message's enqueue record is durable and live, so that
    /// [`Store::read_message`] can read it back (a queue pages out only such
    /// bodies).
    pub fn is_durable(&self, id: MessageId) -> bool {
        self.shared.index().messages.contains_key(&id)
    }

    /// Reads a durable message back from disk (blocking I/O: call it from a
    /// blocking-capable thread). The checksum is verified.
    pub fn read_message(&self, id: MessageId) -> Result<StoredMessage, Error> {
        let (file, path, entry) = {
            let index = self.shared.index();
            let entry = *index.messages.get(&id).ok_or(Error::NotFound(id))?;
            let segment = index
                .segments
                .get(&entry.segment)
                .expect("a live message's segment is in the index");
            (segment.file.clone(), segment.path.clone(), entry)
        };
        // The handle stays readable even if compaction unlinks the file now.
        let mut bytes = vec![0u8; entry.len as usize];
        file.read_exact_at(&mut bytes, entry.offset)
            .map_err(|err| Error::io(&path, err))?;
        let corrupt = |reason: String| Error::Corrupt {
            path: path.clone(),
            offset: entry.offset,
            reason,
        };
        match format::parse_record(&bytes).map_err(|err| corrupt(err.to_string()))? {
            Record::Enqueue(record) if record.message_id == id => Ok(StoredMessage {
                queue: record.queue.to_string(),
                properties: record.properties.to_vec(),
                body: record.body.to_vec(),
            }),
            other => Err(corrupt(format!(
                "index points at {other:?} instead of message {id}"
            ))),
        }
    }

    /// Replaces the metadata snapshot atomically (write temp, fsync, rename,
    /// fsync directory). Blocking.
    pub fn write_metadata(&self, snapshot: &[u8]) -> Result<(), Error> {
        let _serialized = self
            .shared
            .metadata_lock
            .lock()
            .expect("the metadata lock is never poisoned");
        metadata::write(&*self.shared.backend, &self.shared.dir, snapshot)?;
        let mut index = self.shared.index();
        index.metadata_bytes = (format::METADATA_HEADER_LEN + snapshot.len()) as u64;
        self.shared.update_bytes_gauge(&index);
        Ok(())
    }

    /// Bytes submitted but not yet written; the broker can block publishers
    /// (`connection.blocked`) well before submitters would wait.
    pub fn pending_bytes(&self) -> usize {
        self.shared.pending().bytes
    }

    /// Current counters.
    pub fn stats(&self) -> StoreStats {
        let index = self.shared.index();
        StoreStats {
            segments: index.segments.len(),
            live_messages: index.messages.len(),
            live_bytes: index.live_bytes(),
            segment_bytes: index.segment_bytes(),
        }
    }

    /// Writes what was submitted, stops the writer and waits for it.
    pub fn close(&self) {
        self.shared.pending().closed = true;
        self.shared.work_ready.notify_all();
        self.shared.space_ready.notify_all();
        let handle = self
            .writer
            .lock()
            .expect("the writer handle lock is never poisoned")
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store writer thread panicked");
        }
    }

    fn submit_checked(&self, change: Change, record: &Record<'_>) -> Ticket {
        match record.check_bounds() {
            Ok(()) => self.submit(change, record),
            Err(err) => Ticket::ready(Err(err.into())),
        }
    }

    fn submit(&self, change: Change, record: &Record<'_>) -> Ticket {
        let mut encoded = Vec::with_capacity(record.framed_len());
        record.encode_into(&mut encoded);
        let (sender, receiver) = oneshot::channel();
        let len = encoded.len();
        let mut pending = self.shared.pending();
        // Always admit into an empty queue, so one record larger than the bound still goes through.
        while !pending.closed
            && pending.bytes > 0
            && pending.bytes + len > self.shared.options.pending_bytes_max
        {
            pending = self
                .shared
                .space_ready
                .wait(pending)
                .expect("the pending lock is never poisoned");
        }
        if pending.closed {
            return Ticket::ready(Err(Error::Closed));
        }
        pending.bytes += len;
        pending.ops.push_back(Op {
            change,
            record: encoded,
            done: Some(sender),
        });
        drop(pending);
        self.shared.work_ready.notify_one();
        Ticket {
            state: TicketState::Waiting(receiver),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// File name of segment `id`.
pub(crate) fn segment_file_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The segment id in a file name, if it is a segment file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
