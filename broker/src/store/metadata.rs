//! The metadata snapshot: one opaque blob (durable topology) replaced
//! atomically by write-temp, fsync, rename, fsync-directory. Does not
//! interpret the blob.

use std::path::Path;

use super::Error;
use super::backend::{Backend, OpenMode};
use super::format::{self, FORMAT_VERSION, FormatError, METADATA_HEADER_LEN};
use super::limits::METADATA_SIZE_MAX;

/// File name of the snapshot.
pub(crate) const METADATA_FILE: &str = "metadata.snapshot";
/// File name of a snapshot being written; removed at open if a crash left it.
pub(crate) const METADATA_TEMP_FILE: &str = "metadata.snapshot.tmp";

/// Writes `payload` as the new snapshot. On failure the old snapshot stays.
pub(crate) fn write(backend: &dyn Backend, dir: &Path, payload: &[u8]) -> Result<(), Error> {
    if payload.len() as u64 > METADATA_SIZE_MAX {
        return Err(Error::Invalid(FormatError::TooLong {
            what: "metadata snapshot",
            len: payload.len(),
            max: METADATA_SIZE_MAX as usize,
        }));
    }
    let temp = dir.join(METADATA_TEMP_FILE);
    let target = dir.join(METADATA_FILE);
    let result = (|| {
        let file = backend.open(&temp, OpenMode::CreateTruncate)?;
        let mut bytes = format::encode_metadata_header(payload).to_vec();
        bytes.extend_from_slice(payload);
        file.write_all_at(&bytes, 0)?;
        file.sync_data()?;
        backend.rename(&temp, &target)?;
        backend.sync_dir(dir)
    })();
    result.map_err(|err| {
        // Best effort: a leftover temp file is also removed at the next open.
        let _ = backend.remove(&temp);
        Error::Io {
            path: target,
            source: err,
        }
    })
}

/// Reads the snapshot, if one was ever written, and removes a leftover temp file.
pub(crate) fn read(backend: &dyn Backend, dir: &Path) -> Result<Option<Vec<u8>>, Error> {
    let names = backend.list(dir).map_err(|err| Error::Io {
        path: dir.to_path_buf(),
        source: err,
    })?;
    if names.iter().any(|n| n == METADATA_TEMP_FILE) {
        let temp = dir.join(METADATA_TEMP_FILE);
        backend.remove(&temp).map_err(|err| Error::Io {
            path: temp,
            source: err,
        })?;
    }
    if !names.iter().any(|n| n == METADATA_FILE) {
        return Ok(None);
    }
    let path = dir.join(METADATA_FILE);
    let io_error = |err| Error::Io {
        path: path.clone(),
        source: err,
    };
    let file = backend.open(&path, OpenMode::Read).map_err(io_error)?;
    let len = file.len().map_err(io_error)?;
    if len > METADATA_SIZE_MAX + METADATA_HEADER_LEN as u64 {
        return Err(Error::Corrupt {
            path,
            offset: 0,
            reason: format!("snapshot of {len} bytes exceeds the maximum"),
        });
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
    match format::decode_metadata(&bytes) {
        Ok(payload) => Ok(Some(payload.to_vec())),
        Err(FormatError::Version { found }) => Err(Error::IncompatibleVersion {
            path,
            found,
            supported: FORMAT_VERSION,
        }),
        Err(FormatError::BadMagic) => Err(Error::BadMagic { path }),
        // The rename makes a snapshot whole or absent, so damage here is not a crash.
        Err(err) => Err(Error::Corrupt {
            path,
            offset: 0,
            reason: err.to_string(),
        }),
    }
}
