//! Every bound of the storage engine in one place. Names end in their unit or
//! `_max`. Nothing here performs I/O; other store modules read these values.

/// Size at which the active segment is sealed and a new one started, in bytes.
/// A segment may exceed it by at most one group-commit batch.
pub const SEGMENT_SIZE_MAX: u64 = 64 * 1024 * 1024;
/// Records written by one group commit (one `write` + one fsync).
pub const GROUP_COMMIT_RECORDS_MAX: usize = 4_096;
/// Bytes written by one group commit. A batch always takes at least one record,
/// so a single record larger than this forms a batch of its own.
pub const GROUP_COMMIT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes of submitted but not yet written records. Submitters wait beyond it,
/// so a slow disk slows publishers instead of growing memory.
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest properties blob of one message, in bytes (AMQP content headers fit in a frame).
pub const PROPERTIES_SIZE_MAX: usize = 1024 * 1024;
/// Largest queue name stored in a record, in bytes (it is length-prefixed by a `u16`).
pub const QUEUE_NAME_SIZE_MAX: usize = u16::MAX as usize;
/// Largest record payload, in bytes: a maximal message plus its properties and names.
pub const RECORD_SIZE_MAX: usize =
    crate::limits::MESSAGE_SIZE_MAX as usize + PROPERTIES_SIZE_MAX + QUEUE_NAME_SIZE_MAX + 64;
/// Largest batch body recovery accepts, in bytes: a full batch plus one maximal record.
pub const BATCH_SIZE_MAX: usize = GROUP_COMMIT_BYTES_MAX + RECORD_SIZE_MAX + 64;
/// Bytes of live records compaction relocates per step, so publishers never
/// wait behind a whole segment being copied.
pub const COMPACTION_STEP_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Compaction starts when the log is larger than this many times its live bytes
/// (plus two segments of slack).
pub const COMPACTION_GARBAGE_RATIO_MAX: u64 = 2;
/// Largest metadata snapshot, in bytes.
pub const METADATA_SIZE_MAX: u64 = 256 * 1024 * 1024;
