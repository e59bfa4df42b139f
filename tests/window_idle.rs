//! Idle close on deterministic (paused) time: when input stops, the idle timeout advances
//! event time by the wall clock so the last window still closes — not before.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use weir_engine::generate::{write_seed_time, DEFAULT_START_MS};
use weir_engine::{Job, OutRecord, Pipeline, Received, Sink, Source};
use weir_memory::{MemoryBroker, MemoryConfig};

fn event(user: &str, t: i64) -> OutRecord {
    let mut ts = String::new();
    write_seed_time(&mut ts, t, 0);
    OutRecord {
        key: Some(Bytes::copy_from_slice(user.as_bytes())),
        payload: Bytes::from(format!(
            r#"{{"event_type":"click","user_id":"{user}","action":"a","timestamp":"{ts}"}}"#
        )),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_last_window_closes_after_the_idle_timeout_and_not_before() {
    let broker = MemoryBroker::new(MemoryConfig {
        partitions: 2,
        capacity: 1000,
    });
    // Ten events between :01 and :09 of one 10 s window, all for partition-spread users.
    let batch: Vec<OutRecord> = (0..10)
        .map(|i| {
            event(
                &format!("User{}", i % 3),
                DEFAULT_START_MS + 1_000 + i * 800,
            )
        })
        .collect();
    broker.sink("in").send(&batch).await.unwrap();

    let job = Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
        .with_grace(Duration::from_secs(2))
        .with_idle_timeout(Duration::from_secs(5));
    let stop = tokio_util::sync::CancellationToken::new();
    let pipeline = Pipeline::new(
        job,
        Box::new(broker.source("in", Some("g"))),
        Box::new(broker.sink("out")),
        Box::new(broker.sink("dlq")),
    )
    .shutdown_on(stop.clone());
    let start = Instant::now();
    let run = tokio::spawn(pipeline.run());

    let mut reader = broker.source("out", None);
    let mut results = Vec::new();
    while results.len() < 3 {
        if let Received::Batch(b) = reader.recv(100, Duration::from_millis(100)).await.unwrap() {
            if results.is_empty() && !b.is_empty() {
                let waited = start.elapsed();
                assert!(
                    waited >= Duration::from_secs(5),
                    "closed before the idle timeout: {waited:?}"
                );
                assert!(waited < Duration::from_secs(6), "closed late: {waited:?}");
            }
            results.extend(b);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the last window never closed"
        );
    }
    let total: u64 = results
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 10);
    stop.cancel();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.open_windows, 0);
    assert!(summary.counters.balanced());
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_closes_on_the_wall_clock() {
    let broker = MemoryBroker::new(MemoryConfig {
        partitions: 1,
        capacity: 100,
    });
    let batch: Vec<OutRecord> = (0..4)
        .map(|i| event("User1", DEFAULT_START_MS + i * 1_000))
        .collect();
    broker.sink("in").send(&batch).await.unwrap();
    // Session gap 10 s, grace 1 s: the session [t0, t0 + 3 s + 10 s) closes once the
    // watermark passes its end + 1 s, i.e. 11 s of wall clock after the last event.
    let job = Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
        .with_window(weir_engine::window::WindowKind::Session { gap: 10_000 })
        .with_grace(Duration::from_secs(1))
        .with_idle_timeout(Duration::from_secs(2));
    let stop = tokio_util::sync::CancellationToken::new();
    let pipeline = Pipeline::new(
        job,
        Box::new(broker.source("in", Some("g"))),
        Box::new(broker.sink("out")),
        Box::new(broker.sink("dlq")),
    )
    .shutdown_on(stop.clone());
    let start = Instant::now();
    let run = tokio::spawn(pipeline.run());
    let mut reader = broker.source("out", None);
    let result = loop {
        if let Received::Batch(b) = reader.recv(10, Duration::from_millis(100)).await.unwrap() {
            if let Some(r) = b.into_iter().next() {
                break r;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the session never closed"
        );
    };
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(11) && waited < Duration::from_secs(12),
        "{waited:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&result.payload).unwrap();
    assert_eq!(v["count"], 4);
    assert_eq!(v["window_end"], "2024-06-27T15:00:13Z");
    stop.cancel();
    run.await.unwrap().unwrap();
}
