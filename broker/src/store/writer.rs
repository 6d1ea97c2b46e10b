//! The group-commit writer: one thread that takes every submitted record
//! queued since its last fsync, writes them as one batch, fsyncs once, then
//! updates the index and resolves the tickets. Between batches it compacts.
//! It is the only code that writes segments; it never blocks on callers.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::backend::{BackendFile, OpenMode};
use super::format::{
    self, BATCH_HEADER_LEN, EnqueueRecord, FLAG_DELIVERED, Record, SEGMENT_HEADER_LEN,
    SegmentHeader,
};
use super::limits::COMPACTION_GARBAGE_RATIO_MAX;
use super::{Change, Error, Index, Op, SegmentState, Shared, segment_file_name};

/// The segment being appended to.
struct Active {
    id: u64,
    file: Arc<dyn BackendFile>,
    salt: u64,
    /// Durable length: everything before it is fsynced.
    size: u64,
}

/// How far compaction has copied the oldest segment forward.
#[derive(Debug, Clone, Copy)]
struct CompactionCursor {
    segment: u64,
    offset: u64,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// `None` until the first batch, and after a failed batch could not be cut
    /// off: the next batch then starts a new segment.
    active: Option<Active>,
    next_segment_id: u64,
    next_batch_seq: u64,
    compaction: Option<CompactionCursor>,
    compaction_disabled: bool,
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, next_segment_id: u64, next_batch_seq: u64) -> Writer {
        Writer {
            shared,
            active: None,
            next_segment_id,
            next_batch_seq,
            compaction: None,
            compaction_disabled: false,
            buf: Vec::new(),
        }
    }

    /// Runs until the store is closed and everything submitted is written.
    pub(crate) fn run(mut self) {
        let mut compaction_due = true;
        while let Some(ops) = self.take_batch(!compaction_due) {
            if !ops.is_empty() {
                self.commit(ops);
            }
            compaction_due = self.compact_step();
        }
    }

    /// Takes the next batch: everything queued, up to the count and byte bounds.
    /// `None` once closed and drained; an empty batch when `block` is false and
    /// nothing is queued.
    fn take_batch(&self, block: bool) -> Option<Vec<Op>> {
        let options = &self.shared.options;
        let mut pending = self.shared.pending();
        while pending.ops.is_empty() {
            if pending.closed {
                return None;
            }
            if !block {
                return Some(Vec::new());
            }
            pending = self
                .shared
                .work_ready
                .wait(pending)
                .expect("the pending lock is never poisoned");
        }
        let mut ops = Vec::new();
        let mut bytes = 0;
        while let Some(op) = pending.ops.front() {
            let full = ops.len() >= options.group_commit_records_max
                || bytes + op.record.len() > options.group_commit_bytes_max;
            if !ops.is_empty() && full {
                break;
            }
            bytes += op.record.len();
            ops.push(pending.ops.pop_front().expect("front was Some"));
        }
        pending.bytes -= bytes;
        drop(pending);
        self.shared.space_ready.notify_all();
        Some(ops)
    }

    /// Writes and fsyncs one batch, then publishes it. Returns whether it is durable.
    fn commit(&mut self, ops: Vec<Op>) -> bool {
        match self.write_batch(&ops) {
            Ok((segment, size, offsets)) => {
                {
                    let mut index = self.shared.index();
                    if let Some(state) = index.segments.get_mut(&segment) {
                        state.size = size;
                    }
                    for (op, &offset) in ops.iter().zip(&offsets) {
                        apply(&mut index, op, segment, offset);
                    }
                    self.shared.update_bytes_gauge(&index);
                }
                for op in ops {
                    if let Some(done) = op.done {
                        // The submitter may have stopped waiting; that is its choice.
                        let _ = done.send(Ok(()));
                    }
                }
                true
            }
            Err(err) => {
                tracing::warn!(%err, records = ops.len(), "store batch is not durable; failing its records");
                let err = Arc::new(err);
                for op in ops {
                    if let Some(done) = op.done {
                        let _ = done.send(Err(Error::NotDurable(err.clone())));
                    }
                }
                false
            }
        }
    }

    /// Returns the segment, its new durable size and each record's offset.
    fn write_batch(&mut self, ops: &[Op]) -> io::Result<(u64, u64, Vec<u64>)> {
        let needs_new_segment = self
            .active
            .as_ref()
            .is_none_or(|active| active.size >= self.shared.options.segment_size_max);
        if needs_new_segment {
            self.roll_over()?;
        }
        let active = self
            .active
            .as_mut()
            .expect("roll_over set the active segment");
        self.buf.clear();
        self.buf.resize(BATCH_HEADER_LEN, 0);
        let mut offsets = Vec::with_capacity(ops.len());
        for op in ops {
            offsets.push(active.size + self.buf.len() as u64);
            self.buf.extend_from_slice(&op.record);
        }
        let (header, body) = self.buf.split_at_mut(BATCH_HEADER_LEN);
        let count = u32::try_from(ops.len()).expect("batches are bounded by count");
        format::encode_batch_header(header, active.salt, self.next_batch_seq, count, body);
        let mut result = active.file.write_all_at(&self.buf, active.size);
        if result.is_ok() {
            let started = Instant::now();
            result = active.file.sync_data();
            self.shared
                .metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if let Err(err) = result {
            // Cut the failed batch off so that the next one starts at a known
            // good end. If that fails too, the file's tail is unknown: the next
            // batch goes to a fresh segment and recovery treats this tail as torn.
            let cut = active
                .file
                .set_len(active.size)
                .and_then(|()| active.file.sync_data());
            if let Err(cut_err) = cut {
                tracing::warn!(%cut_err, segment = active.id, "cannot cut off a failed batch; starting a new segment");
                self.active = None;
            }
            return Err(err);
        }
        active.size += self.buf.len() as u64;
        self.next_batch_seq += 1;
        Ok((active.id, active.size, offsets))
    }

    /// Starts a new segment: header written, fsynced, directory fsynced.
    fn roll_over(&mut self) -> io::Result<()> {
        let id = self.next_segment_id;
        let path: PathBuf = self.shared.dir.join(segment_file_name(id));
        let header = SegmentHeader {
            segment_id: id,
            first_batch_seq: self.next_batch_seq,
            first_message_id: self.shared.next_message_id.load(Ordering::SeqCst),
            salt: rand::random(),
        };
        let backend = &self.shared.backend;
        let created = backend
            .open(&path, OpenMode::CreateTruncate)
            .and_then(|file| {
                file.write_all_at(&header.encode(), 0)?;
                file.sync_data()?;
                backend.sync_dir(&self.shared.dir)?;
                Ok(file)
            });
        let file = match created {
            Ok(file) => file,
            Err(err) => {
                // Best effort: a header-only leftover is removed by recovery too.
                let _ = backend.remove(&path);
                return Err(err);
            }
        };
        let mut index = self.shared.index();
        index.segments.insert(
            id,
            SegmentState {
                file: file.clone(),
                path,
                salt: header.salt,
                size: SEGMENT_HEADER_LEN as u64,
                live_records: 0,
                live_bytes: 0,
            },
        );
        self.shared.update_bytes_gauge(&index);
        self.active = Some(Active {
            id,
            file,
            salt: header.salt,
            size: SEGMENT_HEADER_LEN as u64,
        });
        self.next_segment_id += 1;
        Ok(())
    }

    /// One bounded step of compaction. Segments are only ever deleted oldest
    /// first, so a remove record is never deleted while the enqueue it cancels
    /// survives in an older segment. Returns whether more work is waiting.
    fn compact_step(&mut self) -> bool {
        if self.compaction_disabled {
            return false;
        }
        let options = self.shared.options.clone();
        let (head_id, head_file, head_path, head_salt, head_size, head_live) = {
            let index = self.shared.index();
            let Some((&head_id, head)) = index.segments.iter().next() else {
                return false;
            };
            if self.active.as_ref().is_some_and(|a| a.id == head_id) {
                return false;
            }
            let garbage_heavy = index.segment_bytes()
                > COMPACTION_GARBAGE_RATIO_MAX * index.live_bytes() + 2 * options.segment_size_max;
            let in_progress = self.compaction.is_some_and(|c| c.segment == head_id);
            if head.live_records > 0 && !garbage_heavy && !in_progress {
                return false;
            }
            (
                head_id,
                head.file.clone(),
                head.path.clone(),
                head.salt,
                head.size,
                head.live_records,
            )
        };
        if head_live == 0 {
            return self.delete_head(head_id, &head_path);
        }
        let mut pos = self
            .compaction
            .filter(|c| c.segment == head_id)
            .map_or(SEGMENT_HEADER_LEN as u64, |c| c.offset);
        if pos >= head_size {
            tracing::error!(
                segment = head_id,
                live = head_live,
                "compaction scanned a segment and left live records behind; compaction stops"
            );
            debug_assert!(false, "live records not found in their segment");
            self.compaction_disabled = true;
            return false;
        }
        let mut ops = Vec::new();
        let mut relocated_bytes = 0usize;
        let mut scanned_bytes = 0usize;
        let mut body = Vec::new();
        while pos < head_size
            && relocated_bytes < options.compaction_step_bytes_max
            && scanned_bytes < 4 * options.compaction_step_bytes_max
        {
            let batch_len = match read_durable_batch(&*head_file, pos, head_salt, &mut body) {
                Ok(len) => len,
                Err(err) => {
                    tracing::error!(%err, path = %head_path.display(), offset = pos, "compaction cannot read a durable batch; compaction stops");
                    self.compaction_disabled = true;
                    return false;
                }
            };
            let index = self.shared.index();
            let mut at = 0;
            while at < body.len() {
                let offset = pos + (BATCH_HEADER_LEN + at) as u64;
                let Ok(Some(len)) = format::check_record(&body[at..]) else {
                    tracing::error!(path = %head_path.display(), offset, "compaction found a damaged record; compaction stops");
                    self.compaction_disabled = true;
                    return false;
                };
                if let Ok(Record::Enqueue(record)) = format::parse_record(&body[at..at + len])
                    && let Some(entry) = index.messages.get(&record.message_id)
                    && entry.segment == head_id
                    && entry.offset == offset
                {
                    let id = record.message_id;
                    let copy = Record::Enqueue(EnqueueRecord {
                        flags: record.flags | if entry.delivered { FLAG_DELIVERED } else { 0 },
                        ..record
                    });
                    let mut encoded = Vec::with_capacity(len);
                    copy.encode_into(&mut encoded);
                    relocated_bytes += encoded.len();
                    ops.push(Op {
                        change: Change::Relocate {
                            id,
                            from_segment: head_id,
                            from_offset: offset,
                        },
                        record: encoded,
                        done: None,
                    });
                }
                at += len;
            }
            drop(index);
            pos += batch_len;
            scanned_bytes += batch_len as usize;
        }
        // Relocated records go out in batches of the usual bounds.
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for op in ops {
            if !batch.is_empty()
                && (batch.len() >= options.group_commit_records_max
                    || batch_bytes + op.record.len() > options.group_commit_bytes_max)
            {
                if !self.commit(std::mem::take(&mut batch)) {
                    return false;
                }
                batch_bytes = 0;
            }
            batch_bytes += op.record.len();
            batch.push(op);
        }
        if !batch.is_empty() && !self.commit(batch) {
            return false;
        }
        self.compaction = Some(CompactionCursor {
            segment: head_id,
            offset: pos,
        });
        true
    }

    /// Deletes the oldest segment once nothing in it is live.
    fn delete_head(&mut self, head_id: u64, path: &std::path::Path) -> bool {
        let backend = &self.shared.backend;
        if let Err(err) = backend
            .remove(path)
            .and_then(|()| backend.sync_dir(&self.shared.dir))
        {
            // It stays in the index, so no younger segment is deleted before it.
            tracing::warn!(%err, path = %path.display(), "cannot delete a compacted segment; will retry");
            return false;
        }
        let mut index = self.shared.index();
        index.segments.remove(&head_id);
        self.shared.update_bytes_gauge(&index);
        if self.compaction.is_some_and(|c| c.segment == head_id) {
            self.compaction = None;
        }
        true
    }
}

/// Reads a batch known to be durable; returns its framed length.
fn read_durable_batch(
    file: &dyn BackendFile,
    pos: u64,
    salt: u64,
    body: &mut Vec<u8>,
) -> io::Result<u64> {
    let mut header_bytes = [0u8; BATCH_HEADER_LEN];
    file.read_exact_at(&mut header_bytes, pos)?;
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "damaged batch");
    let header = format::decode_batch_header(&header_bytes).ok_or_else(invalid)?;
    body.clear();
    body.resize(header.body_len as usize, 0);
    file.read_exact_at(body, pos + BATCH_HEADER_LEN as u64)?;
    if format::batch_crc(salt, &header_bytes[0..20], body) != header.crc {
        return Err(invalid());
    }
    Ok((BATCH_HEADER_LEN + body.len()) as u64)
}

/// Applies a durable record to the index.
fn apply(index: &mut Index, op: &Op, segment: u64, offset: u64) {
    let len = u32::try_from(op.record.len()).expect("records are bounded below 4 GiB");
    let place = |index: &mut Index| {
        let state = index
            .segments
            .get_mut(&segment)
            .expect("the active segment is in the index");
        state.live_records += 1;
        state.live_bytes += u64::from(len);
    };
    match &op.change {
        Change::Enqueue {
            id,
            queue,
            delivered,
        } => {
            let queue = index.intern(queue);
            place(index);
            index.messages.insert(
                *id,
                super::Entry {
                    segment,
                    offset,
                    len,
                    queue,
                    delivered: *delivered,
                },
            );
        }
        Change::Remove { id } => index.remove_message(*id),
        Change::Delivered { id } => {
            if let Some(entry) = index.messages.get_mut(id) {
                entry.delivered = true;
            }
        }
        Change::DropQueue { queue } => {
            if let Some(&queue) = index.queue_ids.get(queue.as_str()) {
                let doomed: Vec<u64> = index
                    .messages
                    .iter()
                    .filter(|(_, entry)| entry.queue == queue)
                    .map(|(&id, _)| id)
                    .collect();
                for id in doomed {
                    index.remove_message(id);
                }
            }
        }
        Change::Relocate {
            id,
            from_segment,
            from_offset,
        } => {
            let Some(&entry) = index.messages.get(id) else {
                return;
            };
            if entry.segment != *from_segment || entry.offset != *from_offset {
                return;
            }
            let old = index
                .segments
                .get_mut(from_segment)
                .expect("a live message's segment is in the index");
            old.live_records -= 1;
            old.live_bytes -= u64::from(entry.len);
            place(index);
            index.messages.insert(
                *id,
                super::Entry {
                    segment,
                    offset,
                    len,
                    ..entry
                },
            );
        }
    }
}
