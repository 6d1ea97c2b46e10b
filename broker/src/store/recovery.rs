//! Replays the segment log at open. A torn tail (a batch the crash cut short,
//! with no valid batch after it) is truncated and logged; damage that valid
//! data follows, sequence gaps and foreign versions are errors with file and
//! offset. Never guesses: nothing damaged becomes a message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::backend::{Backend, BackendFile, OpenMode};
use super::format::{
    self, BATCH_HEADER_LEN, BATCH_MAGIC, FLAG_DELIVERED, FLAG_HAS_EXPIRY, FORMAT_VERSION,
    FormatError, Record, SEGMENT_HEADER_LEN, SegmentHeader,
};
use super::{Error, MessageId, SegmentState, parse_segment_file_name};

/// A live message as replay leaves it.
pub(crate) struct ReplayedMessage {
    pub(crate) queue: u32,
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) delivered: bool,
    pub(crate) properties: Vec<u8>,
    pub(crate) body_len: u32,
    pub(crate) enqueued_at_ms: u64,
    pub(crate) expires_at_ms: Option<u64>,
}

/// The state of the log after replay.
#[derive(Default)]
pub(crate) struct Replayed {
    pub(crate) segments: Vec<(u64, SegmentState)>,
    pub(crate) messages: HashMap<MessageId, ReplayedMessage>,
    pub(crate) queue_ids: HashMap<String, u32>,
    pub(crate) queue_names: Vec<String>,
    pub(crate) next_message_id: u64,
    pub(crate) next_batch_seq: u64,
    pub(crate) next_segment_id: u64,
    pub(crate) truncated_tails: Vec<(PathBuf, u64)>,
}

impl Replayed {
    fn intern(&mut self, queue: &str) -> u32 {
        if let Some(&id) = self.queue_ids.get(queue) {
            return id;
        }
        let id = u32::try_from(self.queue_names.len()).expect("fewer than 2^32 queue names");
        self.queue_names.push(queue.to_string());
        self.queue_ids.insert(queue.to_string(), id);
        id
    }

    fn apply(&mut self, record: Record<'_>, segment: u64, offset: u64, len: usize) {
        match record {
            Record::Enqueue(e) => {
                self.next_message_id = self.next_message_id.max(e.message_id + 1);
                let queue = self.intern(e.queue);
                // A compaction copy of a message seen before keeps its delivered mark.
                let delivered_before = self
                    .messages
                    .get(&e.message_id)
                    .is_some_and(|m| m.delivered);
                self.messages.insert(
                    e.message_id,
                    ReplayedMessage {
                        queue,
                        segment,
                        offset,
                        len: u32::try_from(len).expect("records are bounded below 4 GiB"),
                        delivered: delivered_before || e.flags & FLAG_DELIVERED != 0,
                        properties: e.properties.to_vec(),
                        body_len: u32::try_from(e.body.len()).expect("bodies are bounded"),
                        enqueued_at_ms: e.enqueued_at_ms,
                        expires_at_ms: (e.flags & FLAG_HAS_EXPIRY != 0).then_some(e.expires_at_ms),
                    },
                );
            }
            Record::Remove { message_id, .. } => {
                self.next_message_id = self.next_message_id.max(message_id + 1);
                self.messages.remove(&message_id);
            }
            Record::Delivered { message_id, .. } => {
                self.next_message_id = self.next_message_id.max(message_id + 1);
                if let Some(message) = self.messages.get_mut(&message_id) {
                    message.delivered = true;
                }
            }
            Record::DropQueue { queue } => {
                if let Some(&queue) = self.queue_ids.get(queue) {
                    self.messages.retain(|_, m| m.queue != queue);
                }
            }
        }
    }
}

/// Replays every segment of `dir` in order.
pub(crate) fn replay(backend: &dyn Backend, dir: &Path) -> Result<Replayed, Error> {
    let names = backend.list(dir).map_err(|err| Error::Io {
        path: dir.to_path_buf(),
        source: err,
    })?;
    let mut ids: Vec<u64> = names
        .iter()
        .filter_map(|name| parse_segment_file_name(name))
        .collect();
    ids.sort_unstable();
    let mut replayed = Replayed::default();
    // The batch sequence number the next segment may start at, at the latest.
    let mut expected_seq: Option<u64> = None;
    for (i, &id) in ids.iter().enumerate() {
        let is_last = i + 1 == ids.len();
        let path = dir.join(super::segment_file_name(id));
        let Some((segment, next_seq)) = replay_segment(
            backend,
            dir,
            &path,
            id,
            is_last,
            expected_seq,
            &mut replayed,
        )?
        else {
            continue;
        };
        expected_seq = Some(next_seq);
        replayed.next_batch_seq = next_seq;
        replayed.segments.push((id, segment));
    }
    replayed.next_segment_id = ids.last().map_or(0, |last| last + 1);
    Ok(replayed)
}

/// Replays one segment; `None` when it was an empty file a crash left while
/// creating it (and has been removed).
fn replay_segment(
    backend: &dyn Backend,
    dir: &Path,
    path: &Path,
    id: u64,
    is_last: bool,
    expected_seq: Option<u64>,
    replayed: &mut Replayed,
) -> Result<Option<(SegmentState, u64)>, Error> {
    let io_error = |err| Error::Io {
        path: path.to_path_buf(),
        source: err,
    };
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let file = backend.open(path, OpenMode::ReadWrite).map_err(io_error)?;
    let len = file.len().map_err(io_error)?;
    let mut header_bytes = [0u8; SEGMENT_HEADER_LEN];
    let header = if len >= SEGMENT_HEADER_LEN as u64 {
        file.read_exact_at(&mut header_bytes, 0).map_err(io_error)?;
        SegmentHeader::decode(&header_bytes)
    } else {
        Err(FormatError::Malformed("segment header"))
    };
    let header = match header {
        Ok(header) => header,
        Err(FormatError::Version { found }) => {
            return Err(Error::IncompatibleVersion {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        // The header is written and fsynced before any batch, so a bad header
        // with nothing after it is a crash during creation of the newest segment.
        Err(err) if is_last && len <= SEGMENT_HEADER_LEN as u64 => {
            tracing::warn!(path = %path.display(), %err, "removing a segment whose creation a crash interrupted");
            drop(file);
            backend.remove(path).map_err(io_error)?;
            backend.sync_dir(dir).map_err(io_error)?;
            return Ok(None);
        }
        Err(FormatError::BadMagic) => {
            return Err(Error::BadMagic {
                path: path.to_path_buf(),
            });
        }
        Err(err) => return Err(corrupt(0, format!("segment header: {err}"))),
    };
    if header.segment_id != id {
        return Err(corrupt(
            16,
            format!(
                "header names segment {} but the file name says {id}",
                header.segment_id
            ),
        ));
    }
    if let Some(expected) = expected_seq
        && header.first_batch_seq > expected
    {
        return Err(Error::MissingBatches {
            path: path.to_path_buf(),
            expected,
            found: header.first_batch_seq,
        });
    }
    replayed.next_message_id = replayed.next_message_id.max(header.first_message_id);

    let mut seq = header.first_batch_seq;
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut body = Vec::new();
    while pos < len {
        let torn = match read_batch(&*file, pos, len, header.salt, &mut body).map_err(io_error)? {
            BatchRead::Valid(batch_header) => {
                if batch_header.seq != seq {
                    return Err(corrupt(
                        pos,
                        format!("batch {} where batch {seq} belongs", batch_header.seq),
                    ));
                }
                let body_start = pos + BATCH_HEADER_LEN as u64;
                let mut at = 0usize;
                let mut count = 0u32;
                while at < body.len() {
                    let offset = body_start + at as u64;
                    let record_len = match format::check_record(&body[at..]) {
                        Ok(Some(record_len)) => record_len,
                        Ok(None) => {
                            return Err(corrupt(
                                offset,
                                "record cut short inside a valid batch".into(),
                            ));
                        }
                        Err(err) => return Err(corrupt(offset, err.to_string())),
                    };
                    let record = format::parse_record(&body[at..at + record_len])
                        .map_err(|err| corrupt(offset, err.to_string()))?;
                    replayed.apply(record, id, offset, record_len);
                    at += record_len;
                    count += 1;
                }
                if count != batch_header.record_count {
                    return Err(corrupt(
                        pos,
                        format!(
                            "batch holds {count} records, its header says {}",
                            batch_header.record_count
                        ),
                    ));
                }
                pos = body_start + body.len() as u64;
                seq += 1;
                None
            }
            BatchRead::Invalid(why) => Some(why),
        };
        if let Some(why) = torn {
            if let Some(valid_at) =
                find_valid_batch(&*file, pos, len, header.salt).map_err(io_error)?
            {
                return Err(corrupt(
                    pos,
                    format!(
                        "{why}, yet a valid batch follows at offset {valid_at}: not a torn write"
                    ),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                offset = pos,
                dropped_bytes = len - pos,
                reason = why,
                "truncating a torn tail left by a crash"
            );
            file.set_len(pos).map_err(io_error)?;
            file.sync_data().map_err(io_error)?;
            replayed.truncated_tails.push((path.to_path_buf(), pos));
            break;
        }
    }
    Ok(Some((
        SegmentState {
            file,
            path: path.to_path_buf(),
            salt: header.salt,
            size: pos,
            live_records: 0,
            live_bytes: 0,
        },
        seq,
    )))
}

enum BatchRead {
    Valid(format::BatchHeader),
    Invalid(&'static str),
}

/// Reads the batch at `pos` into `body` and checks it.
fn read_batch(
    file: &dyn BackendFile,
    pos: u64,
    len: u64,
    salt: u64,
    body: &mut Vec<u8>,
) -> std::io::Result<BatchRead> {
    if len - pos < BATCH_HEADER_LEN as u64 {
        return Ok(BatchRead::Invalid("batch header cut short"));
    }
    let mut header_bytes = [0u8; BATCH_HEADER_LEN];
    file.read_exact_at(&mut header_bytes, pos)?;
    let Some(header) = format::decode_batch_header(&header_bytes) else {
        return Ok(BatchRead::Invalid("bad batch header"));
    };
    let body_start = pos + BATCH_HEADER_LEN as u64;
    if len - body_start < u64::from(header.body_len) {
        return Ok(BatchRead::Invalid("batch extends past the end of the file"));
    }
    body.clear();
    body.resize(header.body_len as usize, 0);
    file.read_exact_at(body, body_start)?;
    if format::batch_crc(salt, &header_bytes[0..20], body) != header.crc {
        return Ok(BatchRead::Invalid("batch checksum mismatch"));
    }
    Ok(BatchRead::Valid(header))
}

/// The offset of the first whole, valid batch after `pos`, if any. Only the
/// segment's salt validates a batch, so message bodies cannot imitate one.
fn find_valid_batch(
    file: &dyn BackendFile,
    pos: u64,
    len: u64,
    salt: u64,
) -> std::io::Result<Option<u64>> {
    let start = pos + 1;
    if start >= len {
        return Ok(None);
    }
    let mut rest = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut rest, start)?;
    let magic = BATCH_MAGIC.to_le_bytes();
    for i in 0..rest.len().saturating_sub(BATCH_HEADER_LEN - 1) {
        if rest[i..i + 4] == magic && format::check_batch(&rest[i..], salt).is_some() {
            return Ok(Some(start + i as u64));
        }
    }
    Ok(None)
}
