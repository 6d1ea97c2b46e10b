//! Child processes of the test environment: each runs in its own process
//! group, dies with the test that started it, and is killed group and all.
//! This must not signal any process it did not start.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Puts the child in a new process group (so a shell's children are killed
/// with it) and asks the kernel to kill it if the thread that started it dies,
/// so that an aborted test run leaves nothing behind.
pub fn isolate(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid > 0 {
        // SAFETY: kill has no memory effects; the group is one we created.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Kills the child's process group and reaps the child.
pub fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal_group(child.id(), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Asks the child's group to stop with SIGTERM, then kills it after `grace`.
pub fn stop_group(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        signal_group(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    kill_group(child);
}
