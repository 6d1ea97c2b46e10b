//! Durable Paxos state in `<data-dir>/paxos/`: the incarnation id and an
//! append-only log of checksummed records. Blocking file I/O; callers run it
//! off the async threads. Knows nothing of sockets or of the protocol's rules.
//!
//! Files:
//! - `incarnation`: `synod-incarnation 1\n` then 16 hex digits and `\n`;
//!   written (and fsynced) once, when the directory is created.
//! - `log`: header `SYNODPX\0` + format version byte (1), then records:
//!   `len: u32 LE` (of kind + payload), `crc32c: u32 LE` (of kind + payload),
//!   `kind: u8` (1 snapshot, 2 entry, 3 hard state), payload (see `codec`;
//!   an entry is `slot: u64` then the entry). Replay applies records in
//!   order; a later entry for a slot replaces an earlier one; a snapshot drops
//!   entries up to its index. A torn or corrupt tail (short record or bad
//!   checksum) is what a crash mid-write leaves: it is cut off on open.
//!   Storing a snapshot rewrites the file (`log.tmp`, fsync, rename, fsync dir).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::codec::{Reader, Writer};
use crate::paxos::{HardState, LogEntry, Snapshot, Stored};

const LOG_MAGIC: &[u8; 8] = b"SYNODPX\0";
const LOG_VERSION: u8 = 1;
const INCARNATION_HEADER: &str = "synod-incarnation 1\n";
const KIND_SNAPSHOT: u8 = 1;
const KIND_ENTRY: u8 = 2;
const KIND_HARD_STATE: u8 = 3;
/// Largest record accepted on replay (a snapshot can be big).
const RECORD_BYTES_MAX: u32 = 1 << 30;

/// Storage failures; the node cannot continue safely after one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The files are not in a format this version reads.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The open Paxos directory.
pub struct Storage {
    dir: PathBuf,
    log: File,
    /// Incarnation id of this data directory.
    pub incarnation: u64,
    /// Bytes in the log file.
    pub log_bytes: u64,
    /// What the files hold, kept to rewrite the log when a snapshot is stored.
    mirror: Stored,
}

/// The durable part of one `Ready`.
#[derive(Default)]
pub struct Batch {
    /// Snapshot to store first.
    pub snapshot: Option<Snapshot>,
    /// Entries to store next.
    pub entries: Vec<(u64, LogEntry)>,
    /// Hard state to store last.
    pub hard_state: Option<HardState>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

impl Storage {
    /// Opens `<data_dir>/paxos/`, creating it (with a new random incarnation)
    /// when absent, and returns what was stored.
    pub fn open(data_dir: &Path) -> Result<(Storage, Stored), Error> {
        let dir = data_dir.join("paxos");
        let incarnation_path = dir.join("incarnation");
        let incarnation = if incarnation_path.exists() {
            read_incarnation(&incarnation_path)?
        } else {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            // Never 0: 0 addresses "any incarnation" in discovery messages.
            let incarnation = rand::random::<u64>().max(1);
            let tmp = dir.join("incarnation.tmp");
            write_synced(
                &tmp,
                format!("{INCARNATION_HEADER}{incarnation:016x}\n").as_bytes(),
            )?;
            fs::rename(&tmp, &incarnation_path).map_err(io(&incarnation_path))?;
            sync_dir(&dir)?;
            incarnation
        };
        let log_path = dir.join("log");
        if !log_path.exists() {
            let mut header = LOG_MAGIC.to_vec();
            header.push(LOG_VERSION);
            let tmp = dir.join("log.tmp");
            write_synced(&tmp, &header)?;
            fs::rename(&tmp, &log_path).map_err(io(&log_path))?;
            sync_dir(&dir)?;
        }
        let mut bytes = Vec::new();
        File::open(&log_path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&log_path))?;
        let (stored, good_len) = replay(&log_path, &bytes)?;
        let log = OpenOptions::new()
            .write(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        if good_len < bytes.len() as u64 {
            tracing::warn!(
                path = %log_path.display(),
                cut = bytes.len() as u64 - good_len,
                "cutting a torn tail off the paxos log"
            );
            log.set_len(good_len).map_err(io(&log_path))?;
            log.sync_all().map_err(io(&log_path))?;
        }
        let mut storage = Storage {
            dir,
            log,
            incarnation,
            log_bytes: good_len,
            mirror: stored.clone(),
        };
        storage.seek_end()?;
        Ok((storage, stored))
    }

    fn seek_end(&mut self) -> Result<(), Error> {
        use std::io::Seek;
        let path = self.dir.join("log");
        self.log
            .seek(std::io::SeekFrom::End(0))
            .map_err(io(&path))?;
        Ok(())
    }

    /// Writes `batch` durably (returns after fsync).
    pub fn persist(&mut self, batch: &Batch) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(snapshot) = &batch.snapshot {
            self.mirror.entries.retain(|slot, _| *slot > snapshot.index);
            self.mirror.snapshot = Some(snapshot.clone());
        }
        let base = self.mirror.snapshot.as_ref().map_or(0, |s| s.index);
        for (slot, entry) in &batch.entries {
            if *slot > base {
                self.mirror.entries.insert(*slot, entry.clone());
            }
        }
        if let Some(hard) = &batch.hard_state {
            self.mirror.hard_state = Some(hard.clone());
        }
        if batch.snapshot.is_some() {
            // A snapshot rewrites the file: everything it covers goes away.
            return self.rewrite();
        }
        let mut buf = Vec::new();
        for (slot, entry) in &batch.entries {
            append_entry(&mut buf, *slot, entry);
        }
        if let Some(hard) = &batch.hard_state {
            append_hard_state(&mut buf, hard);
        }
        let path = self.dir.join("log");
        self.log.write_all(&buf).map_err(io(&path))?;
        self.log.sync_data().map_err(io(&path))?;
        self.log_bytes += buf.len() as u64;
        Ok(())
    }

    /// Replaces the log with exactly `stored`.
    fn rewrite(&mut self) -> Result<(), Error> {
        let stored = &self.mirror;
        let mut buf = LOG_MAGIC.to_vec();
        buf.push(LOG_VERSION);
        if let Some(snapshot) = &stored.snapshot {
            let mut w = Writer::default();
            w.snapshot(snapshot);
            append_record(&mut buf, KIND_SNAPSHOT, &w.buf);
        }
        for (slot, entry) in &stored.entries {
            append_entry(&mut buf, *slot, entry);
        }
        if let Some(hard) = &stored.hard_state {
            append_hard_state(&mut buf, hard);
        }
        let tmp = self.dir.join("log.tmp");
        let path = self.dir.join("log");
        write_synced(&tmp, &buf)?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        self.log = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        self.seek_end()?;
        self.log_bytes = buf.len() as u64;
        Ok(())
    }
}

fn append_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut body = Vec::with_capacity(payload.len() + 1);
    body.push(kind);
    body.extend_from_slice(payload);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

fn append_entry(buf: &mut Vec<u8>, slot: u64, entry: &LogEntry) {
    let mut w = Writer::default();
    w.u64(slot);
    w.log_entry(entry);
    append_record(buf, KIND_ENTRY, &w.buf);
}

fn append_hard_state(buf: &mut Vec<u8>, hard: &HardState) {
    let mut w = Writer::default();
    w.hard_state(hard);
    append_record(buf, KIND_HARD_STATE, &w.buf);
}

/// Applies the records of `bytes`; returns the state and the length of the
/// valid prefix.
fn replay(path: &Path, bytes: &[u8]) -> Result<(Stored, u64), Error> {
    let format = |reason: &str| Error::Format {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 9 || &bytes[..8] != LOG_MAGIC {
        return Err(format("not a synod paxos log"));
    }
    if bytes[8] != LOG_VERSION {
        return Err(format(&format!("unknown log format version {}", bytes[8])));
    }
    let mut stored = Stored::default();
    let mut at = 9usize;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len == 0 || len > RECORD_BYTES_MAX {
            break;
        }
        let Some(body) = bytes.get(at + 8..at + 8 + len as usize) else {
            break;
        };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let mut r = Reader::new(&body[1..]);
        let applied = match body[0] {
            KIND_SNAPSHOT => r.snapshot().map(|s| {
                stored.entries.retain(|slot, _| *slot > s.index);
                stored.snapshot = Some(s);
            }),
            KIND_ENTRY => r.u64().and_then(|slot| {
                let entry = r.log_entry()?;
                stored.entries.insert(slot, entry);
                Ok(())
            }),
            KIND_HARD_STATE => r.hard_state().map(|h| stored.hard_state = Some(h)),
            _ => return Err(format("unknown record kind")),
        };
        // A record with a good checksum that does not decode was written by a
        // different version: refuse rather than guess.
        if applied.is_err() {
            return Err(format("undecodable record"));
        }
        at += 8 + len as usize;
    }
    Ok((stored, at as u64))
}

fn read_incarnation(path: &Path) -> Result<u64, Error> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    text.strip_prefix(INCARNATION_HEADER)
        .and_then(|rest| u64::from_str_radix(rest.trim(), 16).ok())
        .filter(|i| *i != 0)
        .ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            reason: "not a synod incarnation file".into(),
        })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::{Ballot, Config, NodeId, Value};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "synod-paxos-storage-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn entry(round: u64, data: &[u8]) -> LogEntry {
        LogEntry {
            ballot: Ballot {
                round,
                leader: NodeId::new("a", 1),
            },
            value: Value::Command(data.to_vec()),
        }
    }

    #[test]
    fn state_survives_reopen_and_a_torn_tail_is_cut() {
        // Goal: records come back after reopen; a partial last record is dropped, not fatal.
        let dir = temp_dir("reopen");
        let (mut storage, stored) = Storage::open(&dir).expect("open");
        assert!(stored.snapshot.is_none() && stored.entries.is_empty());
        let incarnation = storage.incarnation;
        let batch = Batch {
            snapshot: None,
            entries: vec![(1, entry(1, b"x")), (2, entry(1, b"y"))],
            hard_state: Some(HardState {
                promised: entry(1, b"").ballot,
                decided: 1,
            }),
        };
        storage.persist(&batch).expect("persist");
        drop(storage);
        let log = dir.join("paxos/log");
        let mut bytes = fs::read(&log).expect("read");
        bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2]);
        fs::write(&log, &bytes).expect("write torn tail");
        let (storage, stored) = Storage::open(&dir).expect("reopen");
        assert_eq!(storage.incarnation, incarnation);
        assert_eq!(stored.entries.len(), 2);
        assert_eq!(stored.hard_state.map(|h| h.decided), Some(1));
        assert_eq!(fs::metadata(&log).expect("stat").len(), storage.log_bytes);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_snapshot_rewrites_the_log_and_a_new_dir_gets_a_new_incarnation() {
        // Goal: after a snapshot only later entries remain; two dirs never share an incarnation.
        let dir = temp_dir("snapshot");
        let (mut storage, _) = Storage::open(&dir).expect("open");
        let snapshot = Snapshot {
            index: 5,
            config: Config::bootstrap(NodeId::new("a", 1)),
            data: b"state".to_vec(),
        };
        let before = Batch {
            entries: vec![(5, entry(1, b"y")), (6, entry(2, b"z"))],
            ..Batch::default()
        };
        storage.persist(&before).expect("persist entries");
        let batch = Batch {
            snapshot: Some(snapshot.clone()),
            ..Batch::default()
        };
        storage.persist(&batch).expect("persist snapshot");
        let (_, stored) = Storage::open(&dir).expect("reopen");
        assert_eq!(stored.snapshot, Some(snapshot));
        assert_eq!(stored.entries.keys().copied().collect::<Vec<_>>(), vec![6]);
        let other = temp_dir("other");
        let (other_storage, _) = Storage::open(&other).expect("open other");
        assert_ne!(other_storage.incarnation, storage.incarnation);
        fs::remove_dir_all(&dir).ok();
        fs::remove_dir_all(&other).ok();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn arbitrary_log_bytes_replay_to_state_or_error_never_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flip in proptest::prelude::any::<(usize, u8)>(),
        ) {
            // Goal: a log file of valid records followed by garbage, or with one byte changed, never panics replay.
            let mut good = LOG_MAGIC.to_vec();
            good.push(LOG_VERSION);
            append_entry(&mut good, 1, &entry(1, b"one"));
            append_hard_state(&mut good, &HardState {
                promised: Ballot { round: 2, leader: NodeId::new("a", 1) },
                decided: 1,
            });
            let path = Path::new("fuzz.log");
            let mut with_tail = good.clone();
            with_tail.extend_from_slice(&tail);
            let (stored, valid) = replay(path, &with_tail).expect("valid prefix replays");
            proptest::prop_assert!(valid as usize >= good.len());
            proptest::prop_assert!(!stored.entries.is_empty());
            let mut flipped = good.clone();
            let at = flip.0 % flipped.len();
            flipped[at] ^= flip.1 | 1;
            let _ = replay(path, &flipped);
            let _ = replay(path, &tail);
        }
    }
}
