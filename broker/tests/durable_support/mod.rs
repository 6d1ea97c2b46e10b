//! Shared by the `durable_*` integration tests: runs the real `synod-broker`
//! binary on a temporary data directory (so it can be SIGKILLed and
//! restarted) and connects lapin to it. Must not fake the broker or the disk.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use lapin::{Connection, ConnectionProperties};

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// Fails the test when `future` takes longer than [`WAIT`].
pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

/// A data directory under the system temp dir, removed on drop.
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// A fresh, unique directory.
    pub fn new(label: &str) -> DataDir {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("synod-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker process.
pub struct BrokerProcess {
    child: Child,
    /// Its AMQP address.
    pub addr: SocketAddr,
}

/// How a broker process ended before listening.
#[derive(Debug)]
pub struct Exited {
    /// Exit code.
    pub code: Option<i32>,
    /// Its stderr.
    pub stderr: String,
}

impl BrokerProcess {
    /// Starts the binary on `dir` and waits until it listens.
    pub fn start(dir: &Path) -> BrokerProcess {
        match BrokerProcess::try_start(dir) {
            Ok(broker) => broker,
            Err(exited) => panic!("broker exited early: {exited:?}"),
        }
    }

    /// Starts the binary on `dir`; `Err` when it exits before listening.
    pub fn try_start(dir: &Path) -> Result<BrokerProcess, Exited> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--amqp-listen",
                "127.0.0.1:0",
                // Every listener on an ephemeral port, so tests run in parallel.
                "--mgmt-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                "127.0.0.1:0",
                "--node-name",
                "durable-test",
            ])
            .env("SYNOD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn synod-broker");
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if lines_tx.send(line).is_err() {
                    // Keep draining so the broker never blocks on a full pipe.
                    continue;
                }
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines_rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening amqp=").nth(1) {
                        let addr = rest
                            .split_whitespace()
                            .next()
                            .and_then(|a| a.parse().ok())
                            .expect("address in the listening line");
                        // Later lines are dropped by the reader thread.
                        drop(lines_rx);
                        return Ok(BrokerProcess { child, addr });
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    return Err(Exited {
                        code: status.code(),
                        stderr: seen,
                    });
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                return Err(Exited {
                    code: status.code(),
                    stderr: seen,
                });
            }
            assert!(
                std::time::Instant::now() < deadline,
                "broker did not listen in time: {seen}"
            );
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Connects lapin as guest.
    pub async fn connect(&self) -> Connection {
        let uri = format!("amqp://guest:guest@{}/%2f", self.addr);
        within(Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .expect("connect")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
