//! Resource probes for the alarms that block publishers: the memory
//! available to the process and the free space of the data directory's
//! file system, and the reason `connection.blocked` carries.
//! Must not: decide anything itself (`Broker::tick` raises and clears the
//! alarms) or probe more often than housekeeping asks.

use std::path::Path;

/// The raised resource alarms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    /// Message bytes in memory are above `--memory-high-watermark`.
    pub memory: bool,
    /// Free disk space is below `--disk-free-limit`, or a write hit a full disk.
    pub disk: bool,
}

impl Alarms {
    /// Whether any alarm is raised (publishers must block).
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The `connection.blocked` reason, as RabbitMQ words it.
    pub fn reason(self) -> String {
        let mut reasons = Vec::new();
        if self.memory {
            reasons.push("low on memory");
        }
        if self.disk {
            reasons.push("low on disk");
        }
        reasons.join(" & ")
    }
}

/// The memory available to this process, in bytes: the cgroup limit when
/// one is set (a container), else the machine's physical memory. `None`
/// when neither can be read.
pub fn available_memory_bytes() -> Option<u64> {
    let physical = physical_memory_bytes();
    let cgroup = cgroup_memory_limit_bytes();
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

fn physical_memory_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
}

/// cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`; "max" and the
/// v1 "unlimited" sentinel (a huge number) mean no limit.
fn cgroup_memory_limit_bytes() -> Option<u64> {
    for path in [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ] {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(bytes) = text.trim().parse::<u64>()
            && bytes < (1 << 60)
        {
            return Some(bytes);
        }
    }
    None
}

/// Free bytes available to unprivileged users on the file system holding
/// `path` (`statvfs`'s `f_bavail`), or the error.
pub fn disk_free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = statvfs(path)?;
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Total bytes of the file system holding `path`.
pub fn disk_total_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = statvfs(path)?;
    Ok((stat.f_blocks as u64).saturating_mul(stat.f_frsize as u64))
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled stat.
    Ok(unsafe { stat.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_rabbitmq_writes_them() {
        // Goal: the blocked reason names each raised alarm, joined by " & ".
        let memory = Alarms {
            memory: true,
            disk: false,
        };
        let both = Alarms {
            memory: true,
            disk: true,
        };
        assert_eq!(memory.reason(), "low on memory");
        assert_eq!(both.reason(), "low on memory & low on disk");
        assert!(!Alarms::default().any());
    }

    #[test]
    fn the_temporary_directory_has_free_and_total_space() {
        // Goal: statvfs answers for a real directory and fails for a missing one.
        let dir = std::env::temp_dir();
        let total = disk_total_bytes(&dir).expect("statvfs");
        let free = disk_free_bytes(&dir).expect("statvfs");
        assert!(total > 0 && free <= total, "free {free} total {total}");
        assert!(disk_free_bytes(Path::new("/nonexistent/synod/dir")).is_err());
        assert!(available_memory_bytes().is_some_and(|m| m > 0));
    }
}
