//! TLS on the cluster port, certificate reload and `--no-plain-amqp`, with
//! real processes and real clients on loopback: a TLS cluster of three
//! `synod-broker` processes moves messages across nodes; rogue processes
//! (certificate from another CA, wrong secret, no TLS) never get in and the
//! good nodes log why; a running broker picks up new certificate files.
//! Certificates are made per test by rcgen. Must not wait on sleeps.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use lapin::options::*;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::StatusCode;
use serde_json::Value;
use synod_broker::cluster::transport::{Error as TransportError, Transport};
use synod_broker::config::{Args, Config, TlsConfig};
use synod_broker::metrics::Metrics;
use synod_broker::paxos::NodeId;
use synod_broker::server;
use synod_broker::tls::Certificates;

/// Upper bound for any single wait in these tests (cluster formation on a
/// loaded two-core machine included).
const WAIT: Duration = Duration::from_secs(60);

fn install_crypto_provider() {
    // The clients (lapin's rustls-connector, reqwest) use the process-wide
    // provider; pick one explicitly in case several are compiled in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

/// Polls `check` every 100 ms until it holds; fails with `what` after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

/// A CA that signs node certificates for 127.0.0.1 / localhost, valid both
/// as server and as client certificates (nodes are both on the cluster port).
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A node certificate and key (PEM) for `names`.
    fn node(&self, common_name: &str, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA and a fresh node certificate under `dir` as
    /// `ca.pem`, `<name>.pem`, `<name>.key`; returns their paths.
    fn write_node(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.node(name, &["127.0.0.1", "localhost"]);
        let paths = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}-ca.pem")),
        );
        write_atomically(&paths.0, cert.as_bytes());
        write_atomically(&paths.1, key.as_bytes());
        write_atomically(&paths.2, self.pem.as_bytes());
        paths
    }
}

/// Replaces `path` as Kubernetes does: write aside, then rename over it.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, bytes).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

// ----- Processes -----

/// A `synod-broker` process whose stderr is collected for assertions.
struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    amqp: Option<SocketAddr>,
    mgmt: Option<String>,
}

impl Process {
    /// Spawns the broker with `args` and waits until it listens for AMQP
    /// (and, when `want_mgmt`, for management calls).
    fn spawn(name: &str, args: &[String]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
            .args(args)
            .env("SYNOD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn synod-broker");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    log.lock().expect("lock").push(line);
                }
            });
        }
        let mut process = Process {
            child,
            log,
            amqp: None,
            mgmt: None,
        };
        let deadline = Instant::now() + WAIT;
        while process.mgmt.is_none() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("{name} exited ({status}); its log:\n{}", process.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen in time; its log:\n{}",
                process.log_text()
            );
            for line in process.log.lock().expect("lock").iter() {
                if let Some(rest) = line.split("listening amqp=").nth(1) {
                    process.amqp = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                }
                if let Some(rest) = line.split("management API on ").nth(1) {
                    process.mgmt = rest.split([',', ' ']).next().map(str::to_string);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        process
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("lock").join("\n")
    }

    fn log_contains(&self, text: &str) -> bool {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .any(|line| line.contains(text))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of a clustered node on loopback with TLS files `tls`
/// (cert, key, CA) or none.
fn node_args(
    name: &str,
    root: &Path,
    cluster_port: u16,
    peers: &str,
    secret: &Path,
    tls: Option<&(PathBuf, PathBuf, PathBuf)>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--node-name",
        name,
        "--data-dir",
        &path_str(&root.join(name)),
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--cluster-listen",
        &format!("127.0.0.1:{cluster_port}"),
        "--peers",
        peers,
        "--cluster-secret-file",
        &path_str(secret),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some((cert, key, ca)) = tls {
        args.extend([
            "--tls-cert".to_string(),
            path_str(cert),
            "--tls-key".to_string(),
            path_str(key),
            "--tls-ca".to_string(),
            path_str(ca),
            "--amqps-listen".to_string(),
            "127.0.0.1:0".to_string(),
        ]);
    }
    args
}

/// GET `path` over HTTPS on `mgmt` as guest.
async fn get(http: &reqwest::Client, mgmt: &str, path: &str) -> (StatusCode, Value) {
    match http
        .get(format!("https://{mgmt}{path}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
    }
}

/// The names of the members `mgmt`'s node lists, sorted.
async fn members(http: &reqwest::Client, mgmt: &str) -> Vec<String> {
    let (_, view) = get(http, mgmt, "/api/cluster").await;
    let mut names: Vec<String> = view["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn connect_plain(addr: SocketAddr) -> Connection {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("connect")
}

async fn connect_amqps(addr: SocketAddr, ca_pem: &str) -> Result<Connection, lapin::Error> {
    connect_amqps_as(addr, ca_pem, None).await
}

/// AMQPS as guest, presenting the client certificate `identity` (cert and
/// key PEM) when given: a broker with `--tls-ca` requires one.
async fn connect_amqps_as(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<Connection, lapin::Error> {
    let uri = format!("amqps://guest:guest@127.0.0.1:{}/%2f", addr.port());
    let tls = OwnedTLSConfig {
        identity: identity.map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
            pem: cert.into_bytes(),
            key: key.into_bytes(),
        }),
        cert_chain: Some(ca_pem.to_string()),
    };
    let runtime = lapin::runtime::default_runtime().expect("runtime");
    within(Connection::connect_with_config(
        &uri,
        ConnectionProperties::default(),
        tls,
        runtime,
    ))
    .await
}

/// Publishes `body` to `queue` with a confirm, then gets it back.
async fn round_trip(connection: &Connection, queue: &str, body: &[u8]) {
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    let confirm = within(async {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await;
    assert!(confirm.is_ack(), "{confirm:?}");
    let got = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_moves_messages_across_nodes_and_keeps_rogue_nodes_out() {
    // Goal: three TLS + secret processes agree and forward publishes and deliveries across nodes; a wrong-CA, a wrong-secret and a plain node are refused, never listed, and the good node logs why.
    install_crypto_provider();
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cluster test secret\n").expect("secret");
    let wrong_secret = dir.join("wrong-secret");
    std::fs::write(&wrong_secret, "another secret\n").expect("secret");
    let ca = Ca::new("synod-cluster-ca");
    let names = ["n1", "n2", "n3"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let seed = |extra: &[(&str, u16)]| {
        names
            .iter()
            .copied()
            .zip(ports.iter().copied())
            .chain(extra.iter().copied())
            .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let peers = seed(&[]);
    let mut nodes = Vec::new();
    for (name, port) in names.iter().zip(&ports) {
        let tls = ca.write_node(dir, name);
        let args = node_args(name, dir, *port, &peers, &secret, Some(&tls));
        nodes.push(Process::spawn(name, &args));
    }
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).expect("CA"))
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("http client");
    let mgmt: Vec<String> = nodes
        .iter()
        .map(|n| n.mgmt.clone().expect("listening"))
        .collect();
    let all_members: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let started = Instant::now();
    wait_until("the three TLS nodes agree on a leader", || async {
        let mut leaders = Vec::new();
        for m in &mgmt {
            let (ready, _) = get(&http, m, "/api/cluster/ready").await;
            let (_, view) = get(&http, m, "/api/cluster").await;
            let voters = view["members"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["role"] == "voter").count());
            if ready != StatusCode::OK || voters != names.len() {
                return false;
            }
            leaders.push(view["leader"].as_str().map(str::to_string));
        }
        leaders[0].is_some() && leaders.windows(2).all(|p| p[0] == p[1])
    })
    .await;
    eprintln!("TLS cluster of 3 agreed in {:?}", started.elapsed());

    // Declared on n1 (its home), published through n2, consumed through n3:
    // both hops are data links over TLS.
    let on_n1 = connect_plain(nodes[0].amqp.expect("amqp")).await;
    let ch1 = within(on_n1.create_channel()).await.expect("channel");
    within(ch1.queue_declare(
        "across".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare on n1");
    wait_until("n2 and n3 know the queue", || async {
        let mut known = true;
        for m in &mgmt[1..] {
            let (status, _) = get(&http, m, "/api/queues/%2f/across").await;
            known &= status == StatusCode::OK;
        }
        known
    })
    .await;
    let on_n2 = connect_plain(nodes[1].amqp.expect("amqp")).await;
    let ch2 = within(on_n2.create_channel()).await.expect("channel");
    within(ch2.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    for i in 0..10u8 {
        let confirm = within(async {
            ch2.basic_publish(
                "".into(),
                "across".into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm")
        })
        .await;
        assert!(confirm.is_ack(), "publish {i} through n2: {confirm:?}");
    }
    // With --tls-ca, AMQPS is mutual TLS: the client shows a certificate too.
    let n3_amqps = nodes[2]
        .log_text()
        .split("amqps=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("n3's AMQPS address");
    let on_n3 = connect_amqps_as(n3_amqps, &ca.pem, Some(ca.node("client", &[])))
        .await
        .expect("AMQPS to n3");
    let ch3 = within(on_n3.create_channel()).await.expect("channel");
    let mut got = Vec::new();
    while got.len() < 10 {
        let message = within(ch3.basic_get("across".into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("get through n3");
        match message {
            Some(message) => got.push(message.delivery.data[0]),
            None => tokio::task::yield_now().await,
        }
    }
    assert_eq!(got, (0..10).collect::<Vec<u8>>());

    // The rogues: each lists the good nodes and itself, as a node joining.
    let other_ca = Ca::new("someone-else");
    let (rogue_cert, rogue_key, _) = other_ca.write_node(dir, "rogue-ca");
    // It trusts our CA: only its own certificate is wrong.
    let wrong_ca_tls = (rogue_cert, rogue_key, dir.join("n1-ca.pem"));
    let good_cert_tls = ca.write_node(dir, "rogue-secret");
    let rogues = [
        ("rogue-ca", Some(wrong_ca_tls), &secret),
        ("rogue-secret", Some(good_cert_tls), &wrong_secret),
        ("rogue-plain", None, &secret),
    ];
    let mut rogue_processes = Vec::new();
    for (name, tls, secret_file) in &rogues {
        let port = free_port();
        let args = node_args(
            name,
            dir,
            port,
            &seed(&[(name, port)]),
            secret_file,
            tls.as_ref(),
        );
        rogue_processes.push(Process::spawn(name, &args));
    }
    // Each refusal shows in some good node's log, saying why.
    let reasons = [
        ("rogue-ca", "invalid peer certificate"),
        ("rogue-secret", "does not hold this node's cluster secret"),
        ("rogue-plain", "dialed without TLS"),
    ];
    for (rogue, reason) in reasons {
        wait_until(
            &format!("a good node logs why {rogue} is refused"),
            || async { nodes.iter().any(|n| n.log_contains(reason)) },
        )
        .await;
    }
    // The plain rogue's own log says what it met.
    wait_until(
        "the plain rogue logs that the cluster requires TLS",
        || async {
            rogue_processes[2].log_contains("requires cluster TLS, which is off on this node")
        },
    )
    .await;
    for m in &mgmt {
        assert_eq!(members(&http, m).await, all_members, "members seen by {m}");
    }
    // The cluster still works with the rogues knocking.
    round_trip(&on_n1, "after-rogues", b"still here").await;
    drop(rogue_processes);
    drop(nodes);
}

/// A transport that dials `home` as a node named `name`, with `secret` and
/// the TLS files `tls` (cert, key, CA) or none.
fn dialer(
    name: &str,
    home: SocketAddr,
    secret: &[u8],
    tls: Option<&(PathBuf, PathBuf, PathBuf)>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Transport {
    let tls = tls.map(|(cert, key, ca)| {
        let config = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: Some(ca.clone()),
            amqps_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster: true,
        };
        Certificates::load(&config, &Metrics::new()).expect("TLS files")
    });
    Transport::new(
        NodeId::new(name, 1),
        String::new(),
        secret.to_vec(),
        [("home".to_string(), home.to_string())]
            .into_iter()
            .collect(),
        tls,
        shutdown,
    )
}

#[tokio::test]
async fn data_links_need_both_a_certificate_from_the_ca_and_the_secret() {
    // Goal: only a dialer with a CA-signed certificate AND the secret opens a data link to a TLS node; each missing door gives its own error.
    install_crypto_provider();
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path();
    let ca = Ca::new("synod-links-ca");
    let home_tls = ca.write_node(dir, "home");
    let secret = dir.join("secret");
    std::fs::write(&secret, "link secret").expect("secret");
    let port = free_port();
    let argv: Vec<String> = std::iter::once("synod-broker".to_string())
        .chain(node_args(
            "home",
            dir,
            port,
            &format!("home=127.0.0.1:{port}"),
            &secret,
            Some(&home_tls),
        ))
        .collect();
    let config = Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config");
    assert!(config.tls.as_ref().expect("tls").cluster);
    let home = server::start_durable_serving(config, None)
        .await
        .expect("home node starts");
    let cluster_addr = home.broker.cluster().expect("clustered").local_addr();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let other_ca = Ca::new("someone-else");
    let wrong_ca = {
        let (cert, key, _) = other_ca.write_node(dir, "stranger");
        (cert, key, home_tls.2.clone())
    };
    let good = ca.write_node(dir, "friend");

    let outcome = |tls: Option<&(PathBuf, PathBuf, PathBuf)>, secret: &[u8]| {
        let transport = dialer("friend", cluster_addr, secret, tls, shutdown.clone());
        async move {
            within(transport.dial_data_link("home", "/"))
                .await
                .map(|_| ())
        }
    };
    let wrong_cert = outcome(Some(&wrong_ca), b"link secret").await;
    assert!(
        matches!(&wrong_cert, Err(TransportError::Tls(_))),
        "{wrong_cert:?}"
    );
    let wrong_secret = outcome(Some(&good), b"not the secret").await;
    assert!(
        matches!(&wrong_secret, Err(TransportError::Authentication)),
        "{wrong_secret:?}"
    );
    let plain = outcome(None, b"link secret").await;
    assert!(
        matches!(&plain, Err(TransportError::TlsMismatch(_))),
        "{plain:?}"
    );
    // A TLS dialer meeting a node without cluster TLS says so.
    let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let plain_addr = plain_listener.local_addr().expect("addr");
    let plain_node = dialer("plain", plain_addr, b"link secret", None, shutdown.clone());
    let (inbox, _messages) = tokio::sync::mpsc::channel(16);
    let plain_task = plain_node.listen(plain_listener, inbox);
    let to_plain = dialer(
        "friend",
        plain_addr,
        b"link secret",
        Some(&good),
        shutdown.clone(),
    );
    let mismatch = within(to_plain.dial_data_link("home", "/"))
        .await
        .map(|_| ());
    assert!(
        matches!(&mismatch, Err(TransportError::TlsMismatch(_))),
        "{mismatch:?}"
    );
    plain_task.abort();
    // Both doors open: the link is accepted.
    outcome(Some(&good), b"link secret")
        .await
        .expect("a CA-signed certificate with the secret opens a data link");
    // A certificate that does not name the dialed host is refused by the dialer.
    let (cert, key) = ca.node("elsewhere", &["node.example"]);
    write_atomically(&home_tls.0, cert.as_bytes());
    write_atomically(&home_tls.1, key.as_bytes());
    wait_until("the home node reloads its certificate", || async {
        home.broker.metrics.tls_reloads_total.get() >= 1
    })
    .await;
    let misnamed = outcome(Some(&good), b"link secret").await;
    assert!(
        matches!(&misnamed, Err(TransportError::Tls(reason)) if reason.contains("not valid for name")),
        "{misnamed:?}"
    );
    home.shutdown().await;
}

fn single_node_config(extra: &[String]) -> Config {
    let mut argv: Vec<String> = [
        "synod-broker",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--amqps-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend_from_slice(extra);
    Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config")
}

#[tokio::test]
async fn replaced_certificate_files_are_used_for_new_connections_without_a_restart() {
    // Goal: after the files are swapped for a new CA's, a client trusting only the new CA connects within the poll period, an open connection keeps working, and garbage keeps the current certificate.
    install_crypto_provider();
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path();
    let old_ca = Ca::new("old-ca");
    let (cert, key, _) = old_ca.write_node(dir, "server");
    let broker = server::start_serving(
        single_node_config(&[
            "--amqp-listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            path_str(&cert),
            "--tls-key".into(),
            path_str(&key),
        ]),
        None,
    )
    .await
    .expect("broker starts");
    let amqps = broker.amqps_addr.expect("AMQPS");
    let open = connect_amqps(amqps, &old_ca.pem)
        .await
        .expect("client trusting the old CA");
    round_trip(&open, "before", b"old").await;

    let new_ca = Ca::new("new-ca");
    let (new_cert, new_key) = new_ca.node("server", &["127.0.0.1", "localhost"]);
    write_atomically(&key, new_key.as_bytes());
    write_atomically(&cert, new_cert.as_bytes());
    let swapped = Instant::now();
    let mut attempts = 0;
    wait_until("a client trusting only the new CA connects", || {
        attempts += 1;
        let pem = new_ca.pem.clone();
        async move { connect_amqps(amqps, &pem).await.is_ok() }
    })
    .await;
    let took = swapped.elapsed();
    eprintln!("new certificate served {took:?} after the swap ({attempts} attempts)");
    // One poll period plus the scheduling of a loaded machine.
    assert!(
        took < Duration::from_millis(synod_broker::limits::TLS_RELOAD_INTERVAL_MS * 5),
        "reload took {took:?}"
    );
    assert!(broker.broker.metrics.tls_reloads_total.get() >= 1);
    // The connection opened before the swap keeps its session.
    round_trip(&open, "during", b"still old").await;
    assert!(
        connect_amqps(amqps, &old_ca.pem).await.is_err(),
        "new connections no longer present the old certificate"
    );
    // HTTPS follows the same files.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(new_ca.pem.as_bytes()).expect("CA"))
        .build()
        .expect("client");
    let mgmt = broker.mgmt_addr.expect("management");
    let response = within(
        https
            .get(format!("https://127.0.0.1:{}/api/overview", mgmt.port()))
            .basic_auth("guest", Some("guest"))
            .send(),
    )
    .await
    .expect("HTTPS with the new certificate");
    assert_eq!(response.status(), StatusCode::OK);

    // Garbage: counted, logged, and the new certificate stays in use.
    let failures_before = broker.broker.metrics.tls_reload_failures_total.get();
    write_atomically(&cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    wait_until("the broken file is noticed", || async {
        broker.broker.metrics.tls_reload_failures_total.get() > failures_before
    })
    .await;
    let after = connect_amqps(amqps, &new_ca.pem)
        .await
        .expect("the last good certificate is still served");
    round_trip(&after, "after-garbage", b"new").await;
    round_trip(&open, "after-garbage-old", b"old").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn with_no_plain_amqp_only_amqps_listens() {
    // Goal: --no-plain-amqp leaves the --amqp-listen port closed (connect refused) while AMQPS serves clients; without TLS the binary exits 2 naming the flag.
    install_crypto_provider();
    let root = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("only-tls-ca");
    let (cert, key, _) = ca.write_node(root.path(), "server");
    let plain_port = free_port();
    let broker = server::start_serving(
        single_node_config(&[
            "--amqp-listen".into(),
            format!("127.0.0.1:{plain_port}"),
            "--no-plain-amqp".into(),
            "--tls-cert".into(),
            path_str(&cert),
            "--tls-key".into(),
            path_str(&key),
        ]),
        None,
    )
    .await
    .expect("broker starts");
    assert!(!broker.amqp_plain);
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", plain_port)).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|err| err.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the plain AMQP port must be closed"
    );
    let amqps = broker.amqps_addr.expect("AMQPS");
    assert_eq!(broker.amqp_addr, amqps);
    let connection = connect_amqps(amqps, &ca.pem).await.expect("AMQPS serves");
    round_trip(&connection, "tls-only", b"only over TLS").await;
    broker.shutdown().await;

    let output = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
        .args(["--no-plain-amqp", "--data-dir"])
        .arg(root.path().join("data"))
        .output()
        .expect("run synod-broker");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--no-plain-amqp"), "{stderr}");
}
