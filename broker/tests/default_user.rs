//! The `synod-broker` binary with `--default-user`: the configured
//! administrator replaces `guest` over AMQP and the management API, and a
//! restart on the same data directory keeps the stored users whatever the
//! flags say. Runs the real binary on loopback; must not fake the broker.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::StatusCode;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

/// A data directory under the system temp dir, removed on drop.
struct DataDir(PathBuf);

impl DataDir {
    fn new(label: &str) -> DataDir {
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

/// A running broker process and the addresses it reported.
struct Broker {
    child: Child,
    amqp: SocketAddr,
    mgmt: SocketAddr,
}

impl Broker {
    /// Starts the binary on `dir` with `env` set and waits for both listeners.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Broker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_synod-broker"));
        command
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--node-name",
                "default-user-test",
                "--amqp-listen",
                "127.0.0.1:0",
                "--mgmt-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                "127.0.0.1:0",
            ])
            .env("SYNOD_LOG", "info")
            .env_remove("SYNOD_DEFAULT_USER")
            .env_remove("SYNOD_DEFAULT_PASS")
            .env_remove("SYNOD_DEFAULT_PASS_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn synod-broker");
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                // Keep draining after the receiver is gone so the broker never blocks.
                let _ = lines_tx.send(line);
            }
        });
        let address_after = |line: &str, marker: &str| -> Option<SocketAddr> {
            line.split(marker)
                .nth(1)?
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()?
                .parse()
                .ok()
        };
        let deadline = Instant::now() + WAIT;
        let (mut amqp, mut mgmt) = (None, None);
        let mut seen = String::new();
        while amqp.is_none() || mgmt.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "broker did not listen in time: {seen}");
            match lines_rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    amqp = amqp.or(address_after(&line, "listening amqp="));
                    mgmt = mgmt.or(address_after(&line, "management API on "));
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    panic!("broker exited early ({status}): {seen}");
                }
            }
        }
        Broker {
            child,
            amqp: amqp.expect("loop ends with both"),
            mgmt: mgmt.expect("loop ends with both"),
        }
    }

    /// SIGTERM and wait for a clean exit, so the store is closed.
    fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill has no memory effects; the pid is our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "clean shutdown: {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not stop on SIGTERM");
    }

    async fn amqp_login(&self, user: &str, password: &str) -> Result<Connection, lapin::Error> {
        let uri = format!("amqp://{user}:{password}@{}/%2f", self.amqp);
        tokio::time::timeout(
            WAIT,
            Connection::connect(&uri, ConnectionProperties::default()),
        )
        .await
        .expect("AMQP login answered in time")
    }

    async fn get(&self, path: &str, user: &str, password: &str) -> StatusCode {
        http()
            .get(format!("http://{}{path}", self.mgmt))
            .basic_auth(user, Some(password))
            .send()
            .await
            .expect("management API answers")
            .status()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .no_proxy()
        .build()
        .expect("client")
}

#[tokio::test]
async fn the_default_user_replaces_guest_and_survives_restarts_as_stored() {
    // Goal: SYNOD_DEFAULT_USER/PASS make an administrator that works over AMQP and HTTP while guest is refused; a restart with other flags keeps the stored users.
    let dir = DataDir::new("default-user");
    let broker = Broker::start(
        &dir.0,
        &[
            ("SYNOD_DEFAULT_USER", "admin"),
            ("SYNOD_DEFAULT_PASS", "s3cret"),
        ],
    );

    let connection = broker
        .amqp_login("admin", "s3cret")
        .await
        .expect("admin logs in over AMQP");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "kept".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("admin may configure on /");
    channel
        .basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await
        .expect("admin may write on /");
    connection.close(200, "done".into()).await.expect("close");
    assert!(
        broker.amqp_login("guest", "guest").await.is_err(),
        "guest does not exist"
    );
    assert!(broker.amqp_login("admin", "wrong").await.is_err());

    assert_eq!(
        broker.get("/api/users", "admin", "s3cret").await,
        StatusCode::OK
    );
    assert_eq!(
        broker.get("/api/overview", "guest", "guest").await,
        StatusCode::UNAUTHORIZED
    );
    let users: serde_json::Value = http()
        .get(format!("http://{}/api/users", broker.mgmt))
        .basic_auth("admin", Some("s3cret"))
        .send()
        .await
        .expect("users")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = users
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, ["admin"]);

    // A password changed through the API outlives a restart whose flags name
    // another default user: the bootstrap only applies to an empty store.
    let changed = http()
        .put(format!("http://{}/api/users/admin", broker.mgmt))
        .basic_auth("admin", Some("s3cret"))
        .json(&serde_json::json!({"password": "rotated", "tags": "administrator"}))
        .send()
        .await
        .expect("change password");
    assert!(changed.status().is_success(), "{}", changed.status());
    broker.stop();

    let password_file = dir.0.join("other-password");
    std::fs::write(&password_file, "other-pass\n").expect("write password file");
    let restarted = Broker::start(
        &dir.0,
        &[
            ("SYNOD_DEFAULT_USER", "other"),
            (
                "SYNOD_DEFAULT_PASS_FILE",
                password_file.to_str().expect("utf-8 path"),
            ),
        ],
    );
    assert_eq!(
        restarted
            .get("/api/queues/%2F/kept", "admin", "rotated")
            .await,
        StatusCode::OK
    );
    assert_eq!(
        restarted.get("/api/overview", "admin", "s3cret").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        restarted.get("/api/overview", "other", "other-pass").await,
        StatusCode::UNAUTHORIZED
    );
    assert!(restarted.amqp_login("guest", "guest").await.is_err());
    restarted
        .amqp_login("admin", "rotated")
        .await
        .expect("the rotated password works over AMQP after the restart");
    restarted.stop();
}

#[test]
fn an_incomplete_default_user_is_a_configuration_error() {
    // Goal: --default-user without a password exits 2 and names the missing flag.
    let dir = DataDir::new("default-user-bad");
    let output = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["--default-user", "admin", "--amqp-listen", "127.0.0.1:0"])
        .env_remove("SYNOD_DEFAULT_PASS")
        .env_remove("SYNOD_DEFAULT_PASS_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run synod-broker");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--default-pass"), "{stderr}");
}
