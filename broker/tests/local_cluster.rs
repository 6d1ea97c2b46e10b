//! `synod-broker local-cluster` starts a working 3-node cluster in one
//! command: it prints the connection banner only once the nodes agree, a
//! queue declared through one node is known through another, and SIGTERM
//! stops every node (their ports close).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

const WAIT: Duration = Duration::from_secs(60);

/// A base port whose derived ports (base+i, +10000, +10020, +20000) are free now.
fn free_base() -> u16 {
    for _ in 0..50 {
        let base = 30_000 + rand::random::<u16>() % 9_000;
        let all_free = (0..3u16).all(|i| {
            [
                base + i,
                base + 10_000 + i,
                base + 10_020 + i,
                base + 20_000 + i,
            ]
            .iter()
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        });
        if all_free {
            return base;
        }
    }
    panic!("no free base port found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_starts_an_agreeing_cluster_and_sigterm_stops_it() {
    // Goal: the banner appears, nodes 2 and 3 serve what node 2 declared,
    // and after SIGTERM the command exits 0 with every AMQP port closed.
    let base = free_base();
    let dir = std::env::temp_dir().join(format!(
        "synod-local-cluster-{}-{}",
        std::process::id(),
        base
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_synod-broker"))
        .args([
            "local-cluster",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn local-cluster");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut banner = String::new();
    while !banner.contains("Ctrl-C") {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no banner in time; got: {banner}");
        if let Ok(line) = lines_rx.recv_timeout(left) {
            banner.push_str(&line);
            banner.push('\n');
        }
    }
    assert!(banner.contains("3 nodes agree"), "{banner}");
    assert!(
        banner.contains(&format!("amqp://guest:guest@127.0.0.1:{}/", base + 2)),
        "{banner}"
    );

    let connect = |port: u16| async move {
        let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        Connection::connect(&uri, ConnectionProperties::default())
            .await
            .expect("connect")
    };
    let second = connect(base + 1).await;
    let ch = second.create_channel().await.expect("channel");
    ch.queue_declare(
        "hello".into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare on node 2");
    let third = connect(base + 2).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let ch = third.create_channel().await.expect("channel");
        match ch
            .queue_declare("hello".into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => break,
            Err(err) => assert!(Instant::now() < deadline, "node 3 never saw it: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((second, third));

    // SAFETY: kill(2) on our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "local-cluster did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
    for i in 0..3 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", base + i)).is_err(),
            "node {} still listens",
            i + 1
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
