//! Security of the broker's listeners through real clients on loopback:
//! AMQPS (lapin over rustls) with and without client certificates and SASL
//! EXTERNAL, HTTPS management (reqwest), and the limits a hostile or broken
//! peer meets (message size, channel_max, handshake timeout, connection
//! limit, failed-login throttling). Certificates are made per test by rcgen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use lapin::options::*;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use synod_broker::broker::Settings;
use synod_broker::config::{Args, Config};
use synod_broker::protocol::{Encoder, Frame};
use synod_broker::server::{self, RunningBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use amq_protocol::protocol::{AMQPClass, channel, connection};

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future).await.expect("in time")
}

/// The AMQP reply code carried by a lapin error, if any.
fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

fn install_crypto_provider() {
    // The clients (lapin's rustls-connector, reqwest) use the process-wide
    // provider; pick one explicitly in case several are compiled in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A CA, a server certificate for 127.0.0.1/localhost, and client
/// certificates, written as PEM files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "synod-test-ca");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write CA");
        let pki = Pki {
            dir,
            ca_pem,
            issuer: Issuer::new(ca_params, ca_key),
        };
        let (cert, key) = pki.leaf(
            "synod-test-server",
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(pki.path("server.pem"), cert).expect("write cert");
        std::fs::write(pki.path("server.key"), key).expect("write key");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A certificate (PEM) and its PKCS#8 key (PEM) signed by the CA.
    fn leaf(
        &self,
        common_name: &str,
        names: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn client_identity(&self, common_name: &str) -> OwnedIdentity {
        let (cert, key) = self.leaf(
            common_name,
            Vec::new(),
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        OwnedIdentity::PKCS8 {
            pem: cert.into_bytes(),
            key: key.into_bytes(),
        }
    }
}

fn tls_args(pki: &Pki, mutual: bool) -> Vec<String> {
    let mut argv: Vec<String> = [
        "--tls-cert",
        pki.path("server.pem").to_str().expect("utf-8"),
        "--tls-key",
        pki.path("server.key").to_str().expect("utf-8"),
        "--amqps-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if mutual {
        argv.push("--tls-ca".into());
        argv.push(pki.path("ca.pem").to_str().expect("utf-8").into());
    }
    argv
}

fn config(extra: &[String]) -> Config {
    let mut argv: Vec<String> = [
        "synod-broker",
        "--amqp-listen",
        "127.0.0.1:0",
        "--mgmt-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend_from_slice(extra);
    Config::from_args(Args::try_parse_from(argv).expect("flags")).expect("config")
}

async fn start(extra: &[String], tune: impl FnOnce(&mut Settings)) -> RunningBroker {
    let config = config(extra);
    let mut settings = Settings::from_config(&config);
    tune(&mut settings);
    server::start_serving(config, Some(settings))
        .await
        .expect("broker starts")
}

async fn connect_amqps(
    addr: SocketAddr,
    query: &str,
    tls: OwnedTLSConfig,
) -> Result<Connection, lapin::Error> {
    let uri = format!("amqps://guest:guest@127.0.0.1:{}/%2f{query}", addr.port());
    let runtime = lapin::runtime::default_runtime().expect("runtime");
    within(Connection::connect_with_config(
        &uri,
        ConnectionProperties::default(),
        tls,
        runtime,
    ))
    .await
}

async fn connect_plain(broker: &RunningBroker) -> Connection {
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr);
    within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("connect")
}

/// Declares `queue`, publishes `body` to it and reads it back.
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
    within(async {
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
    let got = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, body);
}

#[tokio::test]
async fn amqps_serves_a_real_client_that_trusts_the_ca() {
    // Goal: lapin over amqps:// (server certificate checked against our CA) publishes and gets.
    install_crypto_provider();
    let pki = Pki::new();
    let broker = start(&tls_args(&pki, false), |_| {}).await;
    let amqps = broker.amqps_addr.expect("AMQPS listener");
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pki.ca_pem.clone()),
    };
    let connection = connect_amqps(amqps, "", tls).await.expect("amqps connect");
    round_trip(&connection, "over-tls", b"secret").await;
    // A client that does not trust the CA refuses the server.
    let untrusting = connect_amqps(amqps, "", OwnedTLSConfig::default()).await;
    assert!(untrusting.is_err(), "unknown CA must fail verification");
    // Plain AMQP on its own port still works alongside.
    round_trip(&connect_plain(&broker).await, "in-clear", b"hello").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_and_external_uses_its_common_name() {
    // Goal: with --tls-ca, no certificate fails the TLS handshake; a CA-signed one logs in by EXTERNAL as its CN.
    install_crypto_provider();
    let pki = Pki::new();
    let broker = start(&tls_args(&pki, true), |_| {}).await;
    let amqps = broker.amqps_addr.expect("AMQPS listener");
    let anonymous = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pki.ca_pem.clone()),
    };
    assert!(
        connect_amqps(amqps, "", anonymous).await.is_err(),
        "a client without certificate is refused"
    );
    let as_guest = OwnedTLSConfig {
        identity: Some(pki.client_identity("guest")),
        cert_chain: Some(pki.ca_pem.clone()),
    };
    let connection = connect_amqps(amqps, "?auth_mechanism=external", as_guest)
        .await
        .expect("EXTERNAL login as guest");
    round_trip(&connection, "by-certificate", b"mtls").await;
    let users: Vec<String> = broker
        .broker
        .list_connections()
        .iter()
        .map(|c| c.user.clone())
        .collect();
    assert_eq!(users, vec!["guest".to_string()]);
    // A verified certificate whose CN is no user is refused with 403.
    let stranger = OwnedTLSConfig {
        identity: Some(pki.client_identity("nobody-here")),
        cert_chain: Some(pki.ca_pem.clone()),
    };
    let err = connect_amqps(amqps, "?auth_mechanism=external", stranger)
        .await
        .expect_err("unknown user");
    assert_eq!(reply_code(&err), Some(403), "{err}");
    // PLAIN still works over mutual TLS.
    let plain = OwnedTLSConfig {
        identity: Some(pki.client_identity("someone")),
        cert_chain: Some(pki.ca_pem.clone()),
    };
    let connection = connect_amqps(amqps, "", plain)
        .await
        .expect("PLAIN over mTLS");
    round_trip(&connection, "plain-over-mtls", b"pw").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn management_api_is_served_over_https_when_tls_is_configured() {
    // Goal: reqwest trusting the CA gets /api/overview over https; plain http to that port gets no answer.
    install_crypto_provider();
    let pki = Pki::new();
    let broker = start(&tls_args(&pki, false), |_| {}).await;
    let mgmt = broker.mgmt_addr.expect("management listener");
    let metrics = broker.metrics_addr.expect("metrics listener");
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA certificate"),
        )
        .build()
        .expect("client");
    let response = within(
        client
            .get(format!("https://127.0.0.1:{}/api/overview", mgmt.port()))
            .basic_auth("guest", Some("guest"))
            .send(),
    )
    .await
    .expect("https request");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let response = within(
        client
            .get(format!("https://127.0.0.1:{}/metrics", metrics.port()))
            .send(),
    )
    .await
    .expect("https metrics");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let cleartext = within(
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/overview", mgmt.port()))
            .send(),
    )
    .await;
    assert!(cleartext.is_err(), "plain HTTP is not answered");
    broker.shutdown().await;
}

#[tokio::test]
async fn bad_tls_files_are_a_configuration_error_naming_the_flag() {
    // Goal: an unreadable --tls-key stops startup with exit code 2 and names the flag.
    let pki = Pki::new();
    let mut argv = tls_args(&pki, false);
    argv[3] = pki.path("missing.key").to_str().expect("utf-8").into();
    let err = server::start_serving(config(&argv), None)
        .await
        .expect_err("must fail");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--tls-key"), "{err}");
}

#[tokio::test]
async fn messages_over_max_message_size_close_the_channel_with_406() {
    // Goal: a body one byte over the bound closes its channel (406); the connection and a body at the bound work.
    let broker = start(&[], |s| s.message_size_max = 1_000).await;
    let connection = connect_plain(&broker).await;
    let ch = within(connection.create_channel()).await.expect("channel");
    within(ch.queue_declare(
        "sized".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    let publish = within(ch.basic_publish(
        "".into(),
        "sized".into(),
        BasicPublishOptions::default(),
        &[7u8; 1_001],
        BasicProperties::default(),
    ))
    .await;
    let confirmed = match publish {
        Ok(confirm) => within(confirm).await.map(|_| ()),
        Err(err) => Err(err),
    };
    let err = confirmed.expect_err("channel closed");
    assert_eq!(reply_code(&err), Some(406), "{err}");
    within(async {
        while ch.status().connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(connection.status().connected(), "only the channel closes");
    round_trip(&connection, "sized", &[1u8; 1_000]).await;
    broker.shutdown().await;
}

/// A hand-driven client for what well-behaved libraries cannot do.
struct Raw {
    socket: TcpStream,
    buf: BytesMut,
    encoder: Encoder,
}

impl Raw {
    async fn connect_from(addr: SocketAddr, source: [u8; 4]) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .expect("bind source");
        let socket = within(socket.connect(addr)).await.expect("connect");
        Raw {
            socket,
            buf: BytesMut::new(),
            encoder: Encoder::default(),
        }
    }

    async fn send(&mut self, channel_id: u16, method: AMQPClass) {
        let mut out = BytesMut::new();
        self.encoder.method(&mut out, channel_id, &method);
        self.socket.write_all(&out).await.expect("write");
    }

    /// The next frame, or None when the server closed the socket.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::parse(&mut self.buf, 1 << 20).expect("valid frames") {
                return Some(frame);
            }
            if self.socket.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Header and start-ok with PLAIN credentials; returns the reply to the
    /// login: `Ok(())` for tune, `Err(code)` for connection.close.
    async fn login(&mut self, user: &str, password: &str) -> Result<(), Option<u16>> {
        self.socket
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("header");
        self.next().await.expect("start");
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: Default::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{user}\0{password}").as_str().into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        match self.next().await {
            Some(Frame::Method(0, method)) => match *method {
                AMQPClass::Connection(connection::AMQPMethod::Tune(_)) => Ok(()),
                AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                    Err(Some(close.reply_code))
                }
                other => panic!("unexpected {other:?}"),
            },
            _ => Err(None),
        }
    }

    /// Finishes the handshake after a successful login, with channel_max 10.
    async fn open(&mut self) {
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max: 4096,
                heartbeat: 0,
            })),
        )
        .await;
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        self.next().await.expect("open-ok");
    }

    /// Waits for connection.close; returns its reply code.
    async fn close_code(&mut self) -> Option<u16> {
        while let Some(frame) = self.next().await {
            if let Frame::Method(0, method) = frame
                && let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = *method
            {
                return Some(close.reply_code);
            }
        }
        None
    }
}

#[tokio::test]
async fn channels_above_the_negotiated_channel_max_are_a_connection_error() {
    // Goal: channel.open on 11 after tune-ok channel_max 10 closes the connection with 504; 10 is fine.
    let broker = start(&[], |_| {}).await;
    let mut raw = Raw::connect_from(broker.amqp_addr, [127, 0, 0, 1]).await;
    within(raw.login("guest", "guest")).await.expect("login");
    within(raw.open()).await;
    raw.send(
        10,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    assert!(matches!(
        within(raw.next()).await,
        Some(Frame::Method(10, _))
    ));
    raw.send(
        11,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    assert_eq!(within(raw.close_code()).await, Some(504));
    broker.shutdown().await;
}

#[tokio::test]
async fn unfinished_handshakes_are_closed_at_the_timeout() {
    // Goal: silent TCP, a stalled AMQP handshake and a stalled TLS handshake are all dropped after the bound.
    let pki = Pki::new();
    let timeout = Duration::from_millis(400);
    let broker = start(&tls_args(&pki, false), |s| {
        s.handshake_timeout_ms = timeout.as_millis() as u64
    })
    .await;
    let bystander = connect_plain(&broker).await;
    let amqps = broker.amqps_addr.expect("AMQPS listener");
    for (what, addr, header) in [
        ("silent", broker.amqp_addr, false),
        ("after the protocol header", broker.amqp_addr, true),
        ("TLS, silent", amqps, false),
    ] {
        let started = Instant::now();
        let mut raw = Raw::connect_from(addr, [127, 0, 0, 1]).await;
        if header {
            raw.socket
                .write_all(b"AMQP\x00\x00\x09\x01")
                .await
                .expect("header");
        }
        let mut sink = Vec::new();
        let _ = within(raw.socket.read_to_end(&mut sink)).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= timeout && elapsed < timeout * 5,
            "{what}: closed after {elapsed:?}"
        );
    }
    assert!(bystander.status().connected());
    broker.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_without_harming_the_others() {
    // Goal: with connections_max 2 and no refusal slots a third socket is closed at once and counted; a freed slot is reusable (the polite 530 refusal is in limits.rs).
    let broker = start(&[], |s| {
        s.connections_max = 2;
        s.connections_refusing_max = 0;
    })
    .await;
    let first = connect_plain(&broker).await;
    let second = connect_plain(&broker).await;
    let mut third = Raw::connect_from(broker.amqp_addr, [127, 0, 0, 1]).await;
    let mut sink = Vec::new();
    let read = within(third.socket.read_to_end(&mut sink)).await;
    assert!(read.is_err() || sink.is_empty(), "refused before any byte");
    assert_eq!(broker.broker.metrics.connections_refused_total.get(), 1);
    round_trip(&first, "still-served", b"ok").await;
    within(second.close(200, "bye".into()))
        .await
        .expect("close");
    // The slot frees when the second connection's task ends.
    let again = within(async {
        loop {
            let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr);
            if let Ok(c) = Connection::connect(&uri, ConnectionProperties::default()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    round_trip(&again, "after-free", b"ok").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn repeated_failed_logins_slow_down_only_their_address() {
    // Goal: after N failures from 127.0.0.1 its replies wait; 127.0.0.2 logs in at once; 403 each time.
    let delay = Duration::from_millis(1_500);
    let broker = start(&[], |s| {
        s.auth_failures_per_window_max = 2;
        s.auth_failure_delay_ms = delay.as_millis() as u64;
    })
    .await;
    let attacker = [127, 0, 0, 1];
    for attempt in 0..2 {
        let started = Instant::now();
        let mut raw = Raw::connect_from(broker.amqp_addr, attacker).await;
        assert_eq!(within(raw.login("guest", "wrong")).await, Err(Some(403)));
        assert!(
            started.elapsed() < delay,
            "attempt {attempt} is not delayed"
        );
    }
    let started = Instant::now();
    let mut raw = Raw::connect_from(broker.amqp_addr, attacker).await;
    assert_eq!(within(raw.login("guest", "wrong")).await, Err(Some(403)));
    assert!(started.elapsed() >= delay, "third failure is delayed");
    // Another address is not slowed down by the attacker's failures.
    let started = Instant::now();
    let mut raw = Raw::connect_from(broker.amqp_addr, [127, 0, 0, 2]).await;
    within(raw.login("guest", "guest")).await.expect("login");
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());
    assert_eq!(broker.broker.metrics.auth_failures_total.get(), 3);
    broker.shutdown().await;
}

/// Replaces one randomly chosen node of `value` with a hostile value.
fn mutate_json(value: &mut serde_json::Value, rng: &mut rand::rngs::StdRng) {
    use rand::Rng;
    use serde_json::{Value, json};
    let descend = rng.random_range(0..4) != 0;
    match value {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map
                .keys()
                .nth(rng.random_range(0..map.len()))
                .cloned()
                .expect("index in range");
            if rng.random_range(0..8) == 0 {
                map.remove(&key);
            } else if let Some(child) = map.get_mut(&key) {
                mutate_json(child, rng);
            }
            return;
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let at = rng.random_range(0..items.len());
            mutate_json(&mut items[at], rng);
            return;
        }
        _ => {}
    }
    let deep = (0..200).fold(json!(1), |inner, _| json!([inner]));
    let choices = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(u64::MAX),
        json!(1e308),
        json!(""),
        json!("x".repeat(10_000)),
        json!("\u{0}\u{ffff}/%2f../"),
        json!([]),
        json!({}),
        json!({"x-max-length": "many", "x-message-ttl": -5, "x-overflow": 7}),
        deep,
    ];
    *value = choices[rng.random_range(0..choices.len())].clone();
}

#[tokio::test]
async fn hostile_management_json_gets_a_json_4xx_and_never_harms_the_broker() {
    // Goal: random, byte-mutated and structurally mutated JSON to the definitions import and
    // declare endpoints answers 2xx or a JSON 4xx error, never 5xx; the broker keeps serving.
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SYNOD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EC);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let broker = start(&[], |_| {}).await;
    let base = format!("http://{}", broker.mgmt_addr.expect("management listener"));
    let client = reqwest::Client::new();
    let put = |path: &str, body: serde_json::Value| {
        client
            .put(format!("{base}{path}"))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
    };
    // An administrator no definitions document names, so imports cannot lock the test out.
    let admin = within(put(
        "/api/users/fuzz-admin",
        serde_json::json!({"password": "pw", "tags": "administrator"}),
    ))
    .await
    .expect("create user");
    assert!(admin.status().is_success(), "{}", admin.status());
    let perms = within(put(
        "/api/permissions/%2f/fuzz-admin",
        serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
    ))
    .await
    .expect("permissions");
    assert!(perms.status().is_success(), "{}", perms.status());

    let definitions: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/rabbitmq-3.12-definitions.json"
        ))
        .expect("definitions file"),
    )
    .expect("definitions JSON");
    let valid_bodies: Vec<(reqwest::Method, &str, serde_json::Value)> = vec![
        (
            reqwest::Method::POST,
            "/api/definitions",
            definitions.clone(),
        ),
        (
            reqwest::Method::PUT,
            "/api/queues/%2f/fuzzed",
            serde_json::json!({"durable": true, "auto_delete": false, "arguments": {"x-max-length": 10}}),
        ),
        (
            reqwest::Method::PUT,
            "/api/exchanges/%2f/fuzzed",
            serde_json::json!({"type": "topic", "durable": true, "arguments": {}}),
        ),
        (
            reqwest::Method::PUT,
            "/api/users/fuzzed",
            serde_json::json!({"password": "x", "tags": "management"}),
        ),
        (
            reqwest::Method::PUT,
            "/api/permissions/%2f/fuzzed",
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
        (
            reqwest::Method::POST,
            "/api/bindings/%2f/e/amq.topic/q/fuzzed",
            serde_json::json!({"routing_key": "a.#", "arguments": {}}),
        ),
        (
            reqwest::Method::PUT,
            "/api/vhosts/fuzzed",
            serde_json::json!({}),
        ),
    ];
    for round in 0..300 {
        let (method, path, valid) = &valid_bodies[rng.random_range(0..valid_bodies.len())];
        let body: Vec<u8> = match round % 3 {
            0 => (0..rng.random_range(0..256))
                .map(|_| rng.random())
                .collect(),
            1 => {
                let mut bytes = serde_json::to_vec(valid).expect("encode");
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
                bytes
            }
            _ => {
                let mut value = valid.clone();
                for _ in 0..rng.random_range(1..4) {
                    mutate_json(&mut value, &mut rng);
                }
                serde_json::to_vec(&value).expect("encode")
            }
        };
        let response = within(
            client
                .request(method.clone(), format!("{base}{path}"))
                .basic_auth("fuzz-admin", Some("pw"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send(),
        )
        .await
        .expect("an answer");
        let status = response.status();
        let text = within(response.text()).await.expect("body");
        let context = format!(
            "seed {seed} round {round} {method} {path} -> {status}: {text}\nbody: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        assert!(status.is_success() || status.is_client_error(), "{context}");
        if status.is_client_error() {
            let error: serde_json::Value = serde_json::from_str(&text).expect(&context);
            assert!(
                error.get("error").is_some() && error.get("reason").is_some(),
                "{context}"
            );
        }
    }
    let overview = within(
        client
            .get(format!("{base}/api/overview"))
            .basic_auth("fuzz-admin", Some("pw"))
            .send(),
    )
    .await
    .expect("overview");
    assert_eq!(overview.status(), reqwest::StatusCode::OK, "seed {seed}");
    let uri = format!("amqp://fuzz-admin:pw@{}/%2f", broker.amqp_addr);
    let connection = within(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("AMQP still served");
    round_trip(&connection, "after-fuzz", b"alive").await;
    broker.shutdown().await;
}
