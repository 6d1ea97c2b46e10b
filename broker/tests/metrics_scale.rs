//! Scrape cost with 10,000 queues, with per-queue series on and off
//! (`--metrics-per-queue false`). Prints the measured times; run with
//! `--nocapture` (and `--release` for production-like numbers) to see them.

mod mgmt_support;

use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;
use mgmt_support::{Harness, start_with_flags};
use synod_broker::meta::{Command, QueueDef};

const N_QUEUES: usize = 10_000;

/// Generous bound for one scrape in an unoptimized test build on a shared
/// machine; the printed numbers are what to look at.
const SCRAPE_DURATION_MAX: Duration = Duration::from_secs(10);

fn declare_queues(h: &Harness) {
    for i in 0..N_QUEUES {
        h.broker
            .broker
            .execute(Command::DeclareQueue {
                vhost: "/".into(),
                queue: QueueDef {
                    name: format!("q-{i:05}"),
                    durable: true,
                    exclusive_owner: None,
                    auto_delete: false,
                    arguments: FieldTable::default(),
                    home_node: "synod@test".into(),
                },
            })
            .expect("declare");
    }
}

/// The fastest of a few scrapes, and the body of the last one.
async fn timed_scrape(h: &Harness) -> (Duration, String) {
    let mut best = Duration::MAX;
    let mut text = String::new();
    for _ in 0..3 {
        let started = Instant::now();
        text = h.scrape().await;
        best = best.min(started.elapsed());
    }
    (best, text)
}

#[tokio::test]
async fn ten_thousand_queues_scrape_quickly_with_per_queue_series_on_or_off() {
    // Goal: with 10k queues a scrape stays bounded; switched off, per-queue series vanish and the scrape shrinks.
    let on = start_with_flags(&[]).await;
    declare_queues(&on);
    let (on_time, on_text) = timed_scrape(&on).await;
    let n_ready_series = on_text
        .lines()
        .filter(|l| l.starts_with("synod_queue_messages_ready{"))
        .count();
    assert_eq!(n_ready_series, N_QUEUES);
    assert!(on_text.contains(&format!("synod_queues {N_QUEUES}")));
    let started = Instant::now();
    let queues = on.get_json("/api/queues").await;
    let list_time = started.elapsed();
    assert_eq!(queues.as_array().map(Vec::len), Some(N_QUEUES));
    on.stop().await;

    let off = start_with_flags(&["--metrics-per-queue", "false"]).await;
    declare_queues(&off);
    let (off_time, off_text) = timed_scrape(&off).await;
    assert!(!off_text.contains("synod_queue_messages_ready"));
    assert!(!off_text.contains("synod_queue_consumers"));
    assert!(off_text.contains(&format!("synod_queues {N_QUEUES}")));
    off.stop().await;

    eprintln!(
        "scrape with {N_QUEUES} queues: per-queue on {on_time:?} ({} bytes), off {off_time:?} ({} bytes); GET /api/queues {list_time:?}",
        on_text.len(),
        off_text.len()
    );
    assert!(
        on_time < SCRAPE_DURATION_MAX,
        "per-queue scrape took {on_time:?}"
    );
    assert!(
        off_time < on_time,
        "switching per-queue series off must make scrapes cheaper"
    );
    assert!(off_text.len() * 100 < on_text.len());
}
