//! The on-disk byte layout (see `FORMAT.md`): segment headers, batch frames,
//! record frames and the metadata snapshot header. Pure: no I/O, no clock.
//!
//! Decoding happens in two steps, as for network frames: `check_*` validates
//! length and checksum without allocating (an incomplete frame is `Ok(None)`),
//! then `parse_*` builds the value from bytes already known to be whole.

use super::limits::{BATCH_SIZE_MAX, QUEUE_NAME_SIZE_MAX, RECORD_SIZE_MAX};

/// Magic bytes opening every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SYNODSEG";
/// Magic bytes opening the metadata snapshot file.
pub const METADATA_MAGIC: [u8; 8] = *b"SYNODMET";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 56;
/// Magic number opening every batch frame ("SYNB" read as little-endian bytes).
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SYNB");
/// Bytes of a batch header.
pub const BATCH_HEADER_LEN: usize = 24;
/// Bytes of a record header (length, type, checksum).
pub const RECORD_HEADER_LEN: usize = 9;
/// Bytes of the metadata snapshot header.
pub const METADATA_HEADER_LEN: usize = 24;

/// Record type: a message enqueued on a queue.
pub const RECORD_ENQUEUE: u8 = 1;
/// Record type: a message acknowledged or otherwise removed from its queue.
pub const RECORD_REMOVE: u8 = 2;
/// Record type: a message delivered to a consumer (recovers as redelivered).
pub const RECORD_DELIVERED: u8 = 3;
/// Record type: every message of a queue removed (queue deleted or purged).
pub const RECORD_DROP_QUEUE: u8 = 4;

/// Enqueue flag: the message was delivered at least once.
pub const FLAG_DELIVERED: u8 = 0b01;
/// Enqueue flag: `expires_at_ms` holds a deadline.
pub const FLAG_HAS_EXPIRY: u8 = 0b10;

/// Why bytes do not decode. Callers add the file and offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with the expected magic bytes.
    #[error("bad magic bytes")]
    BadMagic,
    /// The file was written by another format version.
    #[error("format version {found} (this build reads version {FORMAT_VERSION})")]
    Version {
        /// The version found in the header.
        found: u16,
    },
    /// A stored checksum does not match the bytes it covers.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum read from disk.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A length field exceeds its bound.
    #[error("{what} length {len} exceeds the maximum {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// Value found.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A record type this version does not know.
    #[error("unknown record type {0}")]
    UnknownType(u8),
    /// The payload ends before its fields do, or has bytes left over.
    #[error("malformed {0} payload")]
    Malformed(&'static str),
}

/// The fixed header of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Segment number; equals the number in the file name.
    pub segment_id: u64,
    /// Sequence number the first batch of this segment carries.
    pub first_batch_seq: u64,
    /// Message ids below this were assigned before the segment was created.
    pub first_message_id: u64,
    /// Random per-segment value mixed into every batch checksum, so bytes
    /// inside a message body can never pass for a batch frame.
    pub salt: u64,
}

impl SegmentHeader {
    /// Encodes the header in its `SEGMENT_HEADER_LEN` bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        // 10..16 reserved, zero.
        out[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_batch_seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_message_id.to_le_bytes());
        out[40..48].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..48]);
        out[48..52].copy_from_slice(&crc.to_le_bytes());
        // 52..56 reserved, zero.
        out
    }

    /// Decodes a header. The version is checked before the checksum so that a
    /// file of another version is reported as such, not as corrupt.
    pub fn decode(bytes: &[u8; SEGMENT_HEADER_LEN]) -> Result<SegmentHeader, FormatError> {
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version { found: version });
        }
        let stored = u32_at(bytes, 48);
        let computed = crc32c::crc32c(&bytes[0..48]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        Ok(SegmentHeader {
            segment_id: u64_at(bytes, 16),
            first_batch_seq: u64_at(bytes, 24),
            first_message_id: u64_at(bytes, 32),
            salt: u64_at(bytes, 40),
        })
    }
}

/// The header of one group-commit batch: the unit that is written and fsynced at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Bytes of records following the header.
    pub body_len: u32,
    /// Records in the body.
    pub record_count: u32,
    /// Sequence number; consecutive within a segment and across segments.
    pub seq: u64,
    /// Checksum of salt, header fields and body.
    pub crc: u32,
}

/// Checksum of a batch: covers the segment salt, the first 20 header bytes and the body.
pub fn batch_crc(salt: u64, header_prefix: &[u8], body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&salt.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, header_prefix);
    crc32c::crc32c_append(crc, body)
}

/// Writes a batch header for `body` into the first `BATCH_HEADER_LEN` bytes of `out`.
pub fn encode_batch_header(out: &mut [u8], salt: u64, seq: u64, record_count: u32, body: &[u8]) {
    let body_len = u32::try_from(body.len()).expect("batches are bounded far below 4 GiB");
    out[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    out[8..12].copy_from_slice(&record_count.to_le_bytes());
    out[12..20].copy_from_slice(&seq.to_le_bytes());
    let crc = batch_crc(salt, &out[0..20], body);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a batch header without checking the body. `None` when the magic or
/// the length bound do not hold: such bytes cannot start a batch.
pub fn decode_batch_header(bytes: &[u8; BATCH_HEADER_LEN]) -> Option<BatchHeader> {
    if u32_at(bytes, 0) != BATCH_MAGIC {
        return None;
    }
    let body_len = u32_at(bytes, 4);
    if body_len as usize > BATCH_SIZE_MAX {
        return None;
    }
    Some(BatchHeader {
        body_len,
        record_count: u32_at(bytes, 8),
        seq: u64_at(bytes, 12),
        crc: u32_at(bytes, 20),
    })
}

/// Checks whether `bytes` starts with a whole, valid batch of `salt`, and returns its
/// total length. Used to tell a torn tail from corruption followed by valid data.
pub fn check_batch(bytes: &[u8], salt: u64) -> Option<(BatchHeader, usize)> {
    let header_bytes: &[u8; BATCH_HEADER_LEN] = bytes.get(..BATCH_HEADER_LEN)?.try_into().ok()?;
    let header = decode_batch_header(header_bytes)?;
    let end = BATCH_HEADER_LEN + header.body_len as usize;
    let body = bytes.get(BATCH_HEADER_LEN..end)?;
    (batch_crc(salt, &bytes[0..20], body) == header.crc).then_some((header, end))
}

/// One decoded record, borrowing from the buffer it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A message enqueued on a queue.
    Enqueue(EnqueueRecord<'a>),
    /// A message removed from a queue (acknowledged, expired, dead-lettered).
    Remove {
        /// Queue the message was on.
        queue: &'a str,
        /// The message.
        message_id: u64,
    },
    /// A message delivered to a consumer and not yet acknowledged.
    Delivered {
        /// Queue the message is on.
        queue: &'a str,
        /// The message.
        message_id: u64,
    },
    /// Every message of a queue removed.
    DropQueue {
        /// The queue.
        queue: &'a str,
    },
}

/// The fields of an enqueue record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueueRecord<'a> {
    /// Store-assigned message id, unique in the data directory.
    pub message_id: u64,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// When the message was enqueued, milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// Expiry deadline, milliseconds since the Unix epoch (valid with `FLAG_HAS_EXPIRY`).
    pub expires_at_ms: u64,
    /// Queue name.
    pub queue: &'a str,
    /// Serialized message properties, opaque to the store.
    pub properties: &'a [u8],
    /// Message body.
    pub body: &'a [u8],
}

impl Record<'_> {
    /// The record type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Record::Enqueue(_) => RECORD_ENQUEUE,
            Record::Remove { .. } => RECORD_REMOVE,
            Record::Delivered { .. } => RECORD_DELIVERED,
            Record::DropQueue { .. } => RECORD_DROP_QUEUE,
        }
    }

    /// Bytes the framed record occupies.
    pub fn framed_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Record::Enqueue(e) => {
                8 + 1 + 8 + 8 + 2 + e.queue.len() + 4 + e.properties.len() + 4 + e.body.len()
            }
            Record::Remove { queue, .. } | Record::Delivered { queue, .. } => 8 + 2 + queue.len(),
            Record::DropQueue { queue } => 2 + queue.len(),
        }
    }

    /// Appends the framed record to `out`. The caller has checked the bounds
    /// (`check_bounds`), so every length fits its field.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let payload_len = u32::try_from(self.payload_len()).expect("records are bounded");
        out.extend_from_slice(&payload_len.to_le_bytes());
        out.push(self.kind());
        out.extend_from_slice(&[0; 4]);
        match self {
            Record::Enqueue(e) => {
                out.extend_from_slice(&e.message_id.to_le_bytes());
                out.push(e.flags);
                out.extend_from_slice(&e.enqueued_at_ms.to_le_bytes());
                out.extend_from_slice(&e.expires_at_ms.to_le_bytes());
                put_str(out, e.queue);
                put_blob(out, e.properties);
                put_blob(out, e.body);
            }
            Record::Remove { queue, message_id } | Record::Delivered { queue, message_id } => {
                out.extend_from_slice(&message_id.to_le_bytes());
                put_str(out, queue);
            }
            Record::DropQueue { queue } => put_str(out, queue),
        }
        let crc = crc32c::crc32c(&out[start + 4..start + 5]);
        let crc = crc32c::crc32c_append(crc, &out[start + RECORD_HEADER_LEN..]);
        out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    }

    /// Checks that every field fits its length prefix and the record bounds.
    pub fn check_bounds(&self) -> Result<(), FormatError> {
        let queue = match self {
            Record::Enqueue(e) => {
                if e.properties.len() > super::limits::PROPERTIES_SIZE_MAX {
                    return Err(FormatError::TooLong {
                        what: "properties",
                        len: e.properties.len(),
                        max: super::limits::PROPERTIES_SIZE_MAX,
                    });
                }
                e.queue
            }
            Record::Remove { queue, .. }
            | Record::Delivered { queue, .. }
            | Record::DropQueue { queue } => queue,
        };
        if queue.len() > QUEUE_NAME_SIZE_MAX {
            return Err(FormatError::TooLong {
                what: "queue name",
                len: queue.len(),
                max: QUEUE_NAME_SIZE_MAX,
            });
        }
        if self.payload_len() > RECORD_SIZE_MAX {
            return Err(FormatError::TooLong {
                what: "record",
                len: self.payload_len(),
                max: RECORD_SIZE_MAX,
            });
        }
        Ok(())
    }
}

/// Step one of decoding: is there a whole record with a valid checksum at the
/// start of `bytes`? `Ok(None)` when more bytes are needed; `Ok(Some(len))` with
/// the framed length otherwise. Never allocates.
pub fn check_record(bytes: &[u8]) -> Result<Option<usize>, FormatError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let payload_len = u32_at(bytes, 0) as usize;
    if payload_len > RECORD_SIZE_MAX {
        return Err(FormatError::TooLong {
            what: "record",
            len: payload_len,
            max: RECORD_SIZE_MAX,
        });
    }
    let kind = bytes[4];
    if !(RECORD_ENQUEUE..=RECORD_DROP_QUEUE).contains(&kind) {
        return Err(FormatError::UnknownType(kind));
    }
    let end = RECORD_HEADER_LEN + payload_len;
    if bytes.len() < end {
        return Ok(None);
    }
    let stored = u32_at(bytes, 5);
    let computed =
        crc32c::crc32c_append(crc32c::crc32c(&bytes[4..5]), &bytes[RECORD_HEADER_LEN..end]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok(Some(end))
}

/// Step two of decoding: parses a record that `check_record` accepted.
pub fn parse_record(bytes: &[u8]) -> Result<Record<'_>, FormatError> {
    let end = match check_record(bytes)? {
        Some(end) => end,
        None => return Err(FormatError::Malformed("truncated record")),
    };
    let kind = bytes[4];
    let mut cursor = Cursor {
        bytes: &bytes[RECORD_HEADER_LEN..end],
        what: kind_name(kind),
    };
    let record = match kind {
        RECORD_ENQUEUE => Record::Enqueue(EnqueueRecord {
            message_id: cursor.u64()?,
            flags: cursor.u8()?,
            enqueued_at_ms: cursor.u64()?,
            expires_at_ms: cursor.u64()?,
            queue: cursor.str()?,
            properties: cursor.blob()?,
            body: cursor.blob()?,
        }),
        RECORD_REMOVE => Record::Remove {
            message_id: cursor.u64()?,
            queue: cursor.str()?,
        },
        RECORD_DELIVERED => Record::Delivered {
            message_id: cursor.u64()?,
            queue: cursor.str()?,
        },
        RECORD_DROP_QUEUE => Record::DropQueue {
            queue: cursor.str()?,
        },
        other => return Err(FormatError::UnknownType(other)),
    };
    if !cursor.bytes.is_empty() {
        return Err(FormatError::Malformed(cursor.what));
    }
    Ok(record)
}

/// Encodes the metadata snapshot header for `payload`.
pub fn encode_metadata_header(payload: &[u8]) -> [u8; METADATA_HEADER_LEN] {
    let mut out = [0u8; METADATA_HEADER_LEN];
    out[0..8].copy_from_slice(&METADATA_MAGIC);
    out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out
}

/// Decodes a whole metadata snapshot file and returns its payload.
pub fn decode_metadata(file: &[u8]) -> Result<&[u8], FormatError> {
    if file.len() < METADATA_HEADER_LEN || file[0..8] != METADATA_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u16_at(file, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let len = u64_at(file, 16);
    let payload = usize::try_from(len)
        .ok()
        .and_then(|len| file.get(METADATA_HEADER_LEN..METADATA_HEADER_LEN.checked_add(len)?))
        .ok_or(FormatError::Malformed("metadata"))?;
    if file.len() != METADATA_HEADER_LEN + payload.len() {
        return Err(FormatError::Malformed("metadata"));
    }
    let stored = u32_at(file, 12);
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    Ok(payload)
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        RECORD_ENQUEUE => "enqueue",
        RECORD_REMOVE => "remove",
        RECORD_DELIVERED => "delivered",
        RECORD_DROP_QUEUE => "drop-queue",
        _ => "unknown",
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("queue names are bounded by check_bounds");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_blob(out: &mut Vec<u8>, blob: &[u8]) {
    let len = u32::try_from(blob.len()).expect("blobs are bounded by check_bounds");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(blob);
}

struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < n {
            return Err(FormatError::Malformed(self.what));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn str(&mut self) -> Result<&'a str, FormatError> {
        let len = u16_at(self.take(2)?, 0) as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| FormatError::Malformed(self.what))
    }
    fn blob(&mut self) -> Result<&'a [u8], FormatError> {
        let len = u32_at(self.take(4)?, 0) as usize;
        self.take(len)
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("slice of length 2"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("slice of length 4"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("slice of length 8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enqueue(body: &[u8]) -> Record<'_> {
        Record::Enqueue(EnqueueRecord {
            message_id: 42,
            flags: FLAG_HAS_EXPIRY,
            enqueued_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_000_060_000,
            queue: "/\u{0}orders",
            properties: b"\x01\x02props",
            body,
        })
    }

    #[test]
    fn every_record_type_round_trips() {
        // Goal: encode then check then parse yields the same record, for each type and edge size.
        let big = vec![0xab; 70_000];
        let cases: Vec<Record<'_>> = vec![
            enqueue(b""),
            enqueue(b"hello"),
            enqueue(&big),
            Record::Remove {
                queue: "q",
                message_id: u64::MAX,
            },
            Record::Delivered {
                queue: "",
                message_id: 0,
            },
            Record::DropQueue { queue: "vhost/q" },
        ];
        for record in cases {
            let mut out = Vec::new();
            record.check_bounds().expect("in bounds");
            record.encode_into(&mut out);
            assert_eq!(out.len(), record.framed_len(), "{record:?}");
            assert_eq!(check_record(&out), Ok(Some(out.len())));
            assert_eq!(parse_record(&out).expect("parses"), record);
        }
    }

    #[test]
    fn damaged_records_are_rejected_or_incomplete() {
        // Goal: each kind of damage maps to the expected verdict, never to a different record.
        let mut good = Vec::new();
        enqueue(b"payload").encode_into(&mut good);
        type Damage = fn(&mut Vec<u8>);
        let table: Vec<(&str, Damage, &str)> = vec![
            ("truncated header", |b| b.truncate(5), "incomplete"),
            ("truncated payload", |b| b.truncate(20), "incomplete"),
            (
                "flipped body bit",
                |b| *b.last_mut().expect("non-empty") ^= 1,
                "checksum",
            ),
            ("flipped checksum", |b| b[6] ^= 0x80, "checksum"),
            ("unknown type", |b| b[4] = 9, "type"),
            (
                "type changed to remove",
                |b| b[4] = RECORD_REMOVE,
                "checksum",
            ),
            (
                "huge length",
                |b| b[0..4].copy_from_slice(&u32::MAX.to_le_bytes()),
                "too long",
            ),
            ("zeroed", |b| b.iter_mut().for_each(|x| *x = 0), "type"),
        ];
        for (name, damage, expected) in table {
            let mut bytes = good.clone();
            damage(&mut bytes);
            let verdict = match check_record(&bytes) {
                Ok(None) => "incomplete",
                Ok(Some(_)) => "valid",
                Err(FormatError::Checksum { .. }) => "checksum",
                Err(FormatError::UnknownType(_)) => "type",
                Err(FormatError::TooLong { .. }) => "too long",
                Err(_) => "other",
            };
            assert_eq!(verdict, expected, "case {name}");
        }
    }

    #[test]
    fn segment_header_versions_and_damage() {
        // Goal: a header round-trips; another version is reported as a version, not as corruption.
        let header = SegmentHeader {
            segment_id: 7,
            first_batch_seq: 100,
            first_message_id: 5_000,
            salt: 0xdead_beef_cafe_f00d,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        let mut other_version = bytes;
        other_version[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&other_version),
            Err(FormatError::Version { found: 2 })
        );
        let mut bad_magic = bytes;
        bad_magic[0] = b'X';
        assert_eq!(
            SegmentHeader::decode(&bad_magic),
            Err(FormatError::BadMagic)
        );
        let mut flipped = bytes;
        flipped[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&flipped),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn batches_only_validate_under_their_own_salt() {
        // Goal: a batch checks under its segment's salt and fails under any other, or when cut.
        let mut body = Vec::new();
        enqueue(b"x").encode_into(&mut body);
        let mut batch = vec![0u8; BATCH_HEADER_LEN];
        encode_batch_header(&mut batch, 11, 3, 1, &body);
        batch.extend_from_slice(&body);
        let (header, len) = check_batch(&batch, 11).expect("valid");
        assert_eq!((header.seq, header.record_count, len), (3, 1, batch.len()));
        assert!(check_batch(&batch, 12).is_none());
        assert!(check_batch(&batch[..batch.len() - 1], 11).is_none());
    }

    #[test]
    fn metadata_snapshot_round_trips_and_rejects_damage() {
        // Goal: the snapshot decodes to its payload; truncation, bit flips and versions are caught.
        let payload = b"{\"queues\":[]}";
        let mut file = encode_metadata_header(payload).to_vec();
        file.extend_from_slice(payload);
        assert_eq!(decode_metadata(&file), Ok(&payload[..]));
        assert!(decode_metadata(&file[..file.len() - 1]).is_err());
        let mut flipped = file.clone();
        flipped[30] ^= 4;
        assert!(matches!(
            decode_metadata(&flipped),
            Err(FormatError::Checksum { .. })
        ));
        let mut version = file.clone();
        version[8] = 9;
        assert_eq!(
            decode_metadata(&version),
            Err(FormatError::Version { found: 9 })
        );
    }
}
