//! The file operations the store needs, behind a trait: the real filesystem,
//! and a fault-injecting wrapper for tests (fsync failure, short writes,
//! ENOSPC). Knows nothing of the log format.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write a new file; fails if it exists.
    CreateNew,
    /// Read and write, created or emptied.
    CreateTruncate,
}

/// An open file. Positional reads and writes take `&self`, so one handle is
/// shared by the writer and by readers paging bodies in.
pub trait BackendFile: Send + Sync {
    /// Reads at `offset`; may return fewer bytes than asked (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes at `offset`; may write fewer bytes than given.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Flushes data and the metadata needed to read it (the file length) to stable storage.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, continuing after short writes.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// Directory and file operations of a data directory.
pub trait Backend: Send + Sync + 'static {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn BackendFile>>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and deletions in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsBackend;

struct FsFile(File);

impl BackendFile for FsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Backend for FsBackend {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn BackendFile>> {
        let mut options = OpenOptions::new();
        options.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                options.write(true);
            }
            OpenMode::CreateNew => {
                options.write(true).create_new(true);
            }
            OpenMode::CreateTruncate => {
                options.write(true).create(true).truncate(true);
            }
        }
        Ok(Arc::new(FsFile(options.open(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Faults to inject, shared between a [`FaultyBackend`] and the test driving it.
#[derive(Debug, Default)]
pub struct Faults {
    fsync_failures: AtomicU32,
    short_writes: AtomicU32,
    /// Bytes that may still be written; `None` means unlimited.
    space_left_bytes: Mutex<Option<u64>>,
    fsyncs: AtomicU64,
}

impl Faults {
    /// Makes the next `n` fsyncs fail with `EIO`.
    pub fn fail_next_fsyncs(&self, n: u32) {
        self.fsync_failures.store(n, Ordering::SeqCst);
    }
    /// Makes the next `n` writes write only half of their bytes (at least one).
    pub fn short_next_writes(&self, n: u32) {
        self.short_writes.store(n, Ordering::SeqCst);
    }
    /// Limits the bytes that may still be written (`None`: space returns).
    /// A write that does not fit writes what fits, then writes fail with ENOSPC.
    pub fn set_space_left_bytes(&self, bytes: Option<u64>) {
        *self.space_left_bytes.lock().expect("faults lock") = bytes;
    }
    /// Fsyncs performed successfully so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::SeqCst)
    }

    fn take_one(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// A backend that passes everything to the real filesystem but injects the
/// faults set in its [`Faults`].
#[derive(Debug, Default, Clone)]
pub struct FaultyBackend {
    faults: Arc<Faults>,
}

impl FaultyBackend {
    /// A backend with no faults set yet.
    pub fn new() -> FaultyBackend {
        FaultyBackend::default()
    }
    /// The switchboard of faults.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }
}

/// The error a full disk reports.
pub fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

struct FaultyFile {
    inner: Arc<dyn BackendFile>,
    faults: Arc<Faults>,
}

impl BackendFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut len = buf.len();
        if len > 1 && Faults::take_one(&self.faults.short_writes) {
            len /= 2;
        }
        {
            let mut space = self.faults.space_left_bytes.lock().expect("faults lock");
            if let Some(left) = space.as_mut() {
                if *left == 0 {
                    return Err(enospc());
                }
                len = len.min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= len as u64;
            }
        }
        self.inner.write_at(&buf[..len], offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if Faults::take_one(&self.faults.fsync_failures) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.sync_data()?;
        self.faults.fsyncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl Backend for FaultyBackend {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        FsBackend.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        FsBackend.list(dir)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn BackendFile>> {
        let inner = FsBackend.open(path, mode)?;
        Ok(Arc::new(FaultyFile {
            inner,
            faults: self.faults.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        FsBackend.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        FsBackend.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        FsBackend.sync_dir(dir)
    }
}
