//! Paxos between real `synod-broker` processes on loopback: agreement, a
//! leader killed with SIGKILL, a node cut off by a proxy the test controls,
//! a node that lost its disk, and membership changes asked of followers.
//! Must not: fake a broker, share a process between nodes, or wait on sleeps.
//!
//! Every cluster connection passes through one proxy per destination node
//! (the `--peers` list names the proxies). The proxy reads the dialer's name
//! from the transport's hello frame, so it can cut single directed links.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Upper bound for any single wait in this suite.
const WAIT: Duration = Duration::from_secs(30);
/// A new leader must be elected within this after the old one dies: the
/// election timeout is 0.5–1 s, plus a loaded machine's scheduling delays.
const ELECTION_BOUND: Duration = Duration::from_secs(10);
/// Largest hello frame the proxy reads (a name and an address).
const HELLO_BYTES_MAX: usize = 64 * 1024;
/// Stderr lines kept per process for failure reports.
const LOG_LINES_MAX: usize = 200;

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "synod-processes-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

// ----- The proxy -----

/// What a cut link does to its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// Connections are closed, new ones closed at once: the dialer sees errors.
    Drop,
    /// Connections stay open and everything sent is discarded: the dialer
    /// sees nothing wrong.
    Blackhole,
}

/// The state of every directed link `(from, to)`, by node name; absent = up.
struct Links {
    cuts: Mutex<BTreeMap<(String, String), Cut>>,
    /// Bumped on every change, so open connections re-check their link.
    changed: watch::Sender<u64>,
}

impl Links {
    fn new() -> Arc<Links> {
        Arc::new(Links {
            cuts: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        })
    }

    fn state(&self, from: &str, to: &str) -> Option<Cut> {
        self.cuts
            .lock()
            .expect("lock")
            .get(&(from.to_string(), to.to_string()))
            .copied()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Cuts every link from and to `node`: outgoing ones with `outgoing`,
    /// incoming ones with `incoming`.
    fn isolate(&self, node: &str, all: &[&str], outgoing: Cut, incoming: Cut) {
        {
            let mut cuts = self.cuts.lock().expect("lock");
            for other in all.iter().filter(|o| **o != node) {
                cuts.insert((node.to_string(), other.to_string()), outgoing);
                cuts.insert((other.to_string(), node.to_string()), incoming);
            }
        }
        self.notify();
    }

    fn heal(&self) {
        self.cuts.lock().expect("lock").clear();
        self.notify();
    }
}

/// Forwards connections for one destination node to wherever it listens now.
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(dest: &str, links: Arc<Links>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let target = Arc::new(Mutex::new(None));
        let dest = dest.to_string();
        let task = {
            let target = target.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let to = *target.lock().expect("lock");
                    tokio::spawn(proxy_connection(client, dest.clone(), to, links.clone()));
                }
            })
        };
        Proxy { addr, target, task }
    }

    fn point_at(&self, addr: SocketAddr) {
        *self.target.lock().expect("lock") = Some(addr);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the transport's hello frame (`"SY"`, version, kind, `u32` length,
/// payload starting with the dialer's name as `u32` length + bytes) and
/// returns the frame and the dialer's name.
async fn read_hello(client: &mut TcpStream) -> Option<(Vec<u8>, String)> {
    let mut header = [0u8; 8];
    client.read_exact(&mut header).await.ok()?;
    if &header[..2] != b"SY" {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if !(4..=HELLO_BYTES_MAX).contains(&len) {
        return None;
    }
    let mut frame = vec![0u8; 8 + len];
    frame[..8].copy_from_slice(&header);
    client.read_exact(&mut frame[8..]).await.ok()?;
    let name_len = u32::from_le_bytes(frame[8..12].try_into().ok()?) as usize;
    let name = String::from_utf8(frame.get(12..12 + name_len)?.to_vec()).ok()?;
    Some((frame, name))
}

async fn proxy_connection(
    mut client: TcpStream,
    to: String,
    target: Option<SocketAddr>,
    links: Arc<Links>,
) {
    let mut changed = links.subscribe();
    let Some((hello, from)) = read_hello(&mut client).await else {
        return;
    };
    let Some(target) = target else {
        return;
    };
    match links.state(&from, &to) {
        Some(Cut::Drop) => return,
        Some(Cut::Blackhole) => {
            // Swallow everything until the link changes, then close: the
            // dialer's handshake times out, as behind a dead route.
            let mut sink = [0u8; 4096];
            loop {
                tokio::select! {
                    n = client.read(&mut sink) => if !matches!(n, Ok(n) if n > 0) { return },
                    c = changed.changed() => if c.is_err() || links.state(&from, &to) != Some(Cut::Blackhole) { return },
                }
            }
        }
        None => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    if server.write_all(&hello).await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // Bytes discarded mid-stream leave the frames broken: once a
    // blackholed link heals, its connections are closed and redialed.
    let mut blackholed = false;
    loop {
        tokio::select! {
            n = client_read.read(&mut up) => {
                let Ok(n) = n else { return };
                if n == 0 { return }
                match links.state(&from, &to) {
                    None if !blackholed => {
                        if server_write.write_all(&up[..n]).await.is_err() { return }
                    }
                    Some(Cut::Drop) => return,
                    _ => blackholed = true,
                }
            }
            n = server_read.read(&mut down) => {
                let Ok(n) = n else { return };
                if n == 0 { return }
                match links.state(&from, &to) {
                    None if !blackholed => {
                        if client_write.write_all(&down[..n]).await.is_err() { return }
                    }
                    Some(Cut::Drop) => return,
                    _ => blackholed = true,
                }
            }
            c = changed.changed() => {
                if c.is_err() { return }
                match links.state(&from, &to) {
                    Some(Cut::Drop) => return,
                    Some(Cut::Blackhole) => blackholed = true,
                    None if blackholed => return,
                    None => {}
                }
            }
        }
    }
}

// ----- Broker processes -----

/// One broker process and what the test knows about it.
struct Node {
    name: String,
    data_dir: PathBuf,
    proxy: Proxy,
    child: Option<Child>,
    mgmt: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts the binary and waits until its cluster and management
    /// listeners are up; points this node's proxy at its cluster port.
    fn start(&mut self, peers: &str, secret: &Path) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
            .arg("--node-name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--amqp-listen",
                "127.0.0.1:0",
                "--mgmt-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                "127.0.0.1:0",
                "--peers",
                peers,
            ])
            .arg("--cluster-secret-file")
            .arg(secret)
            .env("SYNOD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn synod-broker");
        let stderr = child.stderr.take().expect("piped stderr");
        // Owned by the node from here on, so a failed start still kills it.
        self.child = Some(child);
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let log = Arc::new(Mutex::new(Vec::new()));
        self.log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                {
                    let mut log = log.lock().expect("lock");
                    if log.len() >= LOG_LINES_MAX {
                        log.remove(0);
                    }
                    log.push(line.clone());
                }
                // The receiver goes away once the node is up; keep draining
                // so the broker never blocks on a full pipe.
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let (mut cluster, mut mgmt) = (None, None);
        while cluster.is_none() || mgmt.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "{} did not start: {:?}\n{}",
                    self.name,
                    self.child.as_mut().map(|c| c.try_wait()),
                    self.log.lock().expect("lock").join("\n")
                ),
            };
            let after = |marker: &str| -> Option<String> {
                let rest = line.split(marker).nth(1)?;
                let addr = rest.split([' ', ',']).next()?;
                Some(addr.to_string())
            };
            if let Some(addr) = after(" listening on ").filter(|_| line.contains("cluster member"))
            {
                cluster = Some(addr.parse::<SocketAddr>().expect("cluster address"));
            }
            if let Some(addr) = after("management API on ") {
                mgmt = Some(addr);
            }
        }
        self.proxy.point_at(cluster.expect("loop ends with it"));
        self.mgmt = format!("http://{}", mgmt.expect("loop ends with it"));
    }

    /// SIGKILL: no shutdown path runs, as when a machine loses power.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("lock");
        let skip = log.len().saturating_sub(20);
        log[skip..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    root: PathBuf,
    nodes: Vec<Node>,
    links: Arc<Links>,
    peers: String,
    secret: PathBuf,
    http: reqwest::Client,
}

impl Cluster {
    async fn start(names: &[&str]) -> Cluster {
        let root = temp_dir("cluster");
        let secret = root.join("secret");
        std::fs::write(&secret, "processes test secret\n").expect("write secret");
        let links = Links::new();
        let mut nodes = Vec::new();
        for name in names {
            nodes.push(Node {
                name: name.to_string(),
                data_dir: root.join(name),
                proxy: Proxy::start(name, links.clone()).await,
                child: None,
                mgmt: String::new(),
                log: Arc::new(Mutex::new(Vec::new())),
            });
        }
        let peers = nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.proxy.addr))
            .collect::<Vec<_>>()
            .join(",");
        for node in &mut nodes {
            node.start(&peers, &secret);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .no_proxy()
            .build()
            .expect("http client");
        Cluster {
            root,
            nodes,
            links,
            peers,
            secret,
            http,
        }
    }

    /// The last log lines of each node in `names`, for failure reports.
    fn log_tails(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|n| format!("--- {n}:\n{}", self.node(n).log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of the cluster")
    }

    fn restart(&mut self, name: &str) {
        let (peers, secret) = (self.peers.clone(), self.secret.clone());
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of the cluster");
        node.start(&peers, &secret);
    }

    fn kill(&mut self, name: &str) {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of the cluster")
            .kill();
    }

    async fn view(&self, name: &str) -> Option<View> {
        let response = self
            .http
            .get(format!("{}/api/cluster", self.node(name).mgmt))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?;
        View::parse(&response.json().await.ok()?)
    }

    async fn ready(&self, name: &str) -> Option<StatusCode> {
        let response = self
            .http
            .get(format!("{}/api/cluster/ready", self.node(name).mgmt))
            .send()
            .await
            .ok()?;
        Some(response.status())
    }

    /// `DELETE /api/cluster/members/{member}` asked of `on`.
    async fn remove(&self, on: &str, member: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .delete(format!(
                "{}/api/cluster/members/{member}",
                self.node(on).mgmt
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/cluster/members` asked of `on`.
    async fn add(&self, on: &str, member: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/api/cluster/members", self.node(on).mgmt))
            .basic_auth("guest", Some("guest"))
            .json(&json!({"name": member, "address": "unused"}))
            .send()
            .await
            .expect("management API answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until every node in `names` is ready and reports the same
    /// view, whose voters are exactly `voters` (no learners), with a leader
    /// among `names`; returns that view.
    async fn wait_agreed(&self, names: &[&str], voters: &[&str]) -> View {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut views = Vec::new();
            let mut all_ready = true;
            for name in names {
                all_ready &= self.ready(name).await == Some(StatusCode::OK);
                views.push(self.view(name).await);
            }
            let first = views[0].clone();
            if let Some(first) = first
                && all_ready
                && views.iter().all(|v| v.as_ref() == Some(&first))
                && first.voter_names() == voters
                && first.members.len() == voters.len()
                && first.leader.as_deref().is_some_and(|l| names.contains(&l))
            {
                return first;
            }
            if Instant::now() > deadline {
                panic!(
                    "{names:?} did not agree on voters {voters:?} within {WAIT:?}; \
                     ready={all_ready}, views: {views:#?}\n{}",
                    self.log_tails(names)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `condition` holds for `name`'s view; returns the time it took.
    async fn wait_view(
        &self,
        name: &str,
        what: &str,
        bound: Duration,
        condition: impl Fn(&View) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let view = self.view(name).await;
            if view.as_ref().is_some_and(&condition) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < bound,
                "{name}: {what} not within {bound:?}; last view {view:?}\n{}",
                self.node(name).log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/api/cluster/ready` on `name` answers `status`.
    async fn wait_ready_status(&self, name: &str, status: StatusCode) -> Duration {
        let started = Instant::now();
        loop {
            if self.ready(name).await == Some(status) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < WAIT,
                "{name}: /api/cluster/ready never answered {status}\n{}",
                self.node(name).log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What `GET /api/cluster` reports, minus what differs legitimately
/// between nodes (liveness and lag are each node's own observations).
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    /// `(name, incarnation, role)`, sorted.
    members: Vec<(String, String, String)>,
    leader: Option<String>,
    epoch: u64,
    decided_index: u64,
}

impl View {
    fn parse(json: &Value) -> Option<View> {
        let mut members: Vec<(String, String, String)> = json["members"]
            .as_array()?
            .iter()
            .map(|m| {
                Some((
                    m["name"].as_str()?.to_string(),
                    m["incarnation"].as_str()?.to_string(),
                    m["role"].as_str()?.to_string(),
                ))
            })
            .collect::<Option<_>>()?;
        members.sort();
        Some(View {
            members,
            leader: json["leader"].as_str().map(str::to_string),
            epoch: json["epoch"].as_u64()?,
            decided_index: json["decided_index"].as_u64()?,
        })
    }

    fn voter_names(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|(_, _, role)| role == "voter")
            .map(|(name, _, _)| name.as_str())
            .collect()
    }

    fn incarnation(&self, name: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, incarnation, _)| incarnation.as_str())
    }

    fn leader(&self) -> &str {
        self.leader.as_deref().expect("an agreed view has a leader")
    }
}

/// The names in `all` other than those in `not`.
fn others<'a>(all: &[&'a str], not: &[&str]) -> Vec<&'a str> {
    all.iter().copied().filter(|n| !not.contains(n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_kills_partitions_and_disk_loss() {
    // Goal: three broker processes agree; survive a SIGKILLed leader, an isolated node and a wiped disk; and take membership changes from followers, refusing them with precise errors where they cannot be decided.
    let suite = Instant::now();
    let all = ["a", "b", "c"];
    let mut cluster = Cluster::start(&all).await;

    // They agree: same members, leader, epoch and decided index; all ready.
    let agreed = cluster.wait_agreed(&all, &all).await;
    eprintln!("three processes agreed in {:?}", suite.elapsed());

    // Membership requests work on followers; an unknown member is a 404.
    let leader = agreed.leader().to_string();
    let followers = others(&all, &[&leader]);
    let (status, body) = cluster.remove(followers[0], "nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nobody")),
        "{body}"
    );

    // Partition: cut one follower off, dropping what it sends and
    // blackholing what is sent to it.
    let isolated = followers[1];
    let majority = others(&all, &[isolated]);
    cluster
        .links
        .isolate(isolated, &all, Cut::Drop, Cut::Blackhole);
    let cut_at = Instant::now();
    let took = cluster
        .wait_ready_status(isolated, StatusCode::SERVICE_UNAVAILABLE)
        .await;
    eprintln!("isolated node reported not ready after {took:?}");
    // It cannot get a membership change decided, and says why.
    let asked = Instant::now();
    let (status, body) = cluster.remove(isolated, majority[0]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].is_string()
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("quorum") || r.contains("leader")),
        "{body}"
    );
    eprintln!(
        "isolated node refused a membership change in {:?}",
        asked.elapsed()
    );

    // The majority keeps deciding: a follower of the majority removes the
    // isolated node, and the two agree on it.
    let leader = cluster
        .wait_agreed(&majority, &all)
        .await
        .leader()
        .to_string();
    let majority_follower = others(&majority, &[&leader])[0];
    let (status, body) = cluster.remove(majority_follower, isolated).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let shrunk = cluster.wait_agreed(&majority, &majority).await;
    assert!(
        shrunk.decided_index > agreed.decided_index,
        "{shrunk:?} {agreed:?}"
    );
    assert_eq!(shrunk.epoch, agreed.epoch + 1);
    // The isolated node never learned of it.
    let stale = cluster.view(isolated).await.expect("isolated node answers");
    assert!(stale.decided_index < shrunk.decided_index, "{stale:?}");
    eprintln!(
        "majority decided without the isolated node {:?} after the cut",
        cut_at.elapsed()
    );

    // Heal, and add it back through a follower: everyone converges.
    cluster.links.heal();
    let healed_at = Instant::now();
    let leader = shrunk.leader().to_string();
    let majority_follower = others(&majority, &[&leader])[0];
    let (status, body) = cluster.add(majority_follower, isolated).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let rejoined = cluster.wait_agreed(&all, &all).await;
    assert_eq!(rejoined.epoch, shrunk.epoch + 2, "learner, then voter");
    assert_eq!(
        rejoined.incarnation(isolated),
        agreed.incarnation(isolated),
        "same disk, same member"
    );
    eprintln!("healed cluster converged in {:?}", healed_at.elapsed());

    // SIGKILL the leader: the other two elect a new one within the bound.
    let old_leader = rejoined.leader().to_string();
    let survivors = others(&all, &[&old_leader]);
    cluster.kill(&old_leader);
    let killed_at = Instant::now();
    let elected = cluster
        .wait_view(survivors[0], "a new leader", ELECTION_BOUND, |v| {
            v.leader.as_deref().is_some_and(|l| l != old_leader)
        })
        .await;
    eprintln!("new leader elected {elected:?} after SIGKILL of the leader");
    let after_kill = cluster.wait_agreed(&survivors, &all).await;
    assert_ne!(after_kill.leader(), old_leader);
    // Restarted on its data directory, it rejoins as the same member and
    // catches up.
    cluster.restart(&old_leader);
    let back = cluster.wait_agreed(&all, &all).await;
    assert_eq!(
        back.members, rejoined.members,
        "same members and incarnations"
    );
    assert!(back.decided_index >= after_kill.decided_index);
    eprintln!(
        "killed leader rejoined {:?} after SIGKILL",
        killed_at.elapsed()
    );

    // Disk loss: a follower killed and restarted on an empty data directory
    // is a new incarnation; the old one is removed, the new one enters as
    // learner then voter (three decided changes).
    let leader = back.leader().to_string();
    let wiped = others(&all, &[&leader])[0];
    let old_incarnation = back.incarnation(wiped).expect("a member").to_string();
    cluster.kill(wiped);
    std::fs::remove_dir_all(&cluster.node(wiped).data_dir).expect("wipe the data directory");
    let wiped_at = Instant::now();
    cluster.restart(wiped);
    let renewed = cluster.wait_agreed(&all, &all).await;
    let new_incarnation = renewed.incarnation(wiped).expect("a member");
    assert_ne!(new_incarnation, old_incarnation, "{renewed:?}");
    assert!(
        !renewed
            .members
            .iter()
            .any(|(_, inc, _)| *inc == old_incarnation),
        "the old incarnation is gone: {renewed:?}"
    );
    assert_eq!(
        renewed.epoch,
        back.epoch + 3,
        "remove, add learner, promote"
    );
    eprintln!(
        "wiped node rejoined as a new incarnation in {:?}",
        wiped_at.elapsed()
    );

    eprintln!("suite took {:?}", suite.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_steps_down_and_the_healed_cluster_converges() {
    // Goal: a leader cut off from both followers (all its links blackholed) stops reporting ready, the two others elect a new leader and take membership changes, and after healing the old leader follows and catches up to the same decided index.
    let suite = Instant::now();
    let all = ["a", "b", "c"];
    let cluster = Cluster::start(&all).await;
    let agreed = cluster.wait_agreed(&all, &all).await;
    let old_leader = agreed.leader().to_string();
    let majority = others(&all, &[&old_leader]);

    cluster
        .links
        .isolate(&old_leader, &all, Cut::Blackhole, Cut::Blackhole);
    let cut_at = Instant::now();
    // It hears no quorum, so it steps down rather than claim to lead.
    let took = cluster
        .wait_ready_status(&old_leader, StatusCode::SERVICE_UNAVAILABLE)
        .await;
    eprintln!("isolated leader reported not ready after {took:?}");
    let (status, body) = cluster.remove(&old_leader, majority[0]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let elected = cluster.wait_agreed(&majority, &all).await;
    assert_ne!(elected.leader(), old_leader);
    eprintln!(
        "the majority elected {} {:?} after the cut",
        elected.leader(),
        cut_at.elapsed()
    );

    // Heal: the old leader follows the new one without deposing it.
    cluster.links.heal();
    let healed_at = Instant::now();
    let converged = cluster.wait_agreed(&all, &all).await;
    assert_eq!(converged.members, agreed.members);
    eprintln!("healed cluster converged in {:?}", healed_at.elapsed());

    // It decides again with all three. A follower removes itself through
    // its own API: told of the decision although no longer a member, it
    // answers at once and stops reporting ready. The other follower adds
    // it back.
    let leader = converged.leader().to_string();
    let followers = others(&all, &[&leader]);
    let (leaving, staying) = (followers[0], followers[1]);
    let asked = Instant::now();
    let (status, body) = cluster.remove(leaving, leaving).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "{body}\n{}",
        cluster.log_tails(&all)
    );
    eprintln!("a follower removed itself in {:?}", asked.elapsed());
    let outside = cluster.view(leaving).await.expect("it still answers");
    assert!(outside.incarnation(leaving).is_none(), "{outside:?}");
    assert_eq!(
        cluster.ready(leaving).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let two = others(&all, &[leaving]);
    cluster.wait_agreed(&two, &two).await;
    let (status, body) = cluster.add(staying, leaving).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let last = cluster.wait_agreed(&all, &all).await;
    assert_eq!(
        last.epoch,
        converged.epoch + 3,
        "remove, add learner, promote"
    );
    assert!(last.decided_index > converged.decided_index);
    eprintln!("suite took {:?}", suite.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_change_while_one_is_undecided_is_a_conflict() {
    // Goal: while a removal waits for votes that cannot arrive, a second membership change is refused with 409; the accepted removal is decided by the next leader, and the cluster is whole again after healing.
    let all = ["a", "b", "c"];
    let cluster = Arc::new(Cluster::start(&all).await);
    let agreed = cluster.wait_agreed(&all, &all).await;
    let leader = agreed.leader().to_string();
    let followers = others(&all, &[&leader]);

    // The leader still reaches the followers (they keep following it and
    // accept its proposals), but their votes never come back.
    {
        let mut cuts = cluster.links.cuts.lock().expect("lock");
        for follower in &followers {
            cuts.insert((follower.to_string(), leader.clone()), Cut::Blackhole);
        }
    }
    cluster.links.notify();
    // Both asked of the leader at once; whichever arrives second meets the
    // first one undecided.
    let first = {
        let (cluster, leader, victim) = (cluster.clone(), leader.clone(), followers[0]);
        tokio::spawn(async move { cluster.remove(&leader, victim).await })
    };
    let second = {
        let (cluster, leader, victim) = (cluster.clone(), leader.clone(), followers[1]);
        tokio::spawn(async move { cluster.remove(&leader, victim).await })
    };
    let first = first.await.expect("request task");
    let second = second.await.expect("request task");
    let (pending, refused, removed) = match (first.0, second.0) {
        (StatusCode::CONFLICT, _) => (second, first, followers[1]),
        (_, StatusCode::CONFLICT) => (first, second, followers[0]),
        _ => panic!("no 409: {first:?} {second:?}"),
    };
    assert!(
        refused.1["reason"]
            .as_str()
            .is_some_and(|r| r.contains("in progress")),
        "{refused:?}"
    );
    // The other one cannot be decided while the votes are lost.
    assert_eq!(pending.0, StatusCode::SERVICE_UNAVAILABLE, "{pending:?}");

    // Heal: the followers had accepted the removal, so whoever leads next
    // decides it.
    cluster.links.heal();
    let kept = others(&all, &[removed]);
    let shrunk = cluster.wait_agreed(&kept, &kept).await;
    assert_eq!(shrunk.epoch, agreed.epoch + 1);
    let (status, body) = cluster.add(kept[0], removed).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    cluster.wait_agreed(&all, &all).await;
}
