//! What repartitioning costs: events/s of `pipelines/user_activity.toml` over a source of
//! 4 partitions, one instance, for the same seed events written two ways and run in
//! alternating pairs:
//!
//! - **keyed**: each record keyed by its `user_id`, read as it is (one task per partition);
//! - **repartitioned**: no key, `[source] repartition = true`: the forwarder reads the
//!   source, decodes each event's key and time and writes it to the internal topic (on
//!   Kafka in a transaction with its offsets), which the windowing stage reads.
//!
//! The time is from the start of the run until the windowing stage has counted every event
//! (its `events_in`), without the idle wait that ends a bounded run. The events are written
//! beforehand (not timed). The median of the per-pair ratios is printed.
//!
//! ```text
//! cargo bench --bench repartition                       # memory, 200,000 events, 5 pairs
//! WEIR_BENCH_BROKER=kafka cargo bench --bench repartition   # scripts/brokers up kafka
//! ```
//! (`WEIR_BENCH_EVENTS`, `WEIR_BENCH_ROUNDS` to change the size.)

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::assemble::{spawn_forwarder, FileIo, Parts};
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::metrics::Metrics;
use weir_engine::OutRecord;

#[path = "support/common.rs"]
mod common;

fn main() {
    let n = common::events(200_000);
    let rounds = common::env_number("WEIR_BENCH_ROUNDS", 5);
    let broker = std::env::var("WEIR_BENCH_BROKER").unwrap_or_else(|_| "memory".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let events = common::seed_events(47, n, 1_000, 1_000);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let keyed = rt.block_on(run(&broker, &events, false, round));
        let shuffled = rt.block_on(run(&broker, &events, true, round));
        let ratio = shuffled.as_secs_f64() / keyed.as_secs_f64();
        eprintln!(
            "{broker} round {round}: keyed {:.0} events/s ({keyed:.2?}), repartitioned {:.0} events/s ({shuffled:.2?}): {ratio:.2}x the time",
            n as f64 / keyed.as_secs_f64(),
            n as f64 / shuffled.as_secs_f64(),
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "{broker}: repartitioned / keyed wall time, median of {rounds} pairs over {n} events: {:.2}x",
        ratios[ratios.len() / 2]
    );
}

/// One run over fresh topics: the time until every event was counted.
async fn run(broker: &str, events: &[Bytes], repartition: bool, round: usize) -> Duration {
    let id = format!("{}-{round}-{repartition}", std::process::id());
    let mut sets = vec![
        format!("source.topic=bench-rp-in-{id}"),
        format!("source.group=bench-rp-{id}"),
        format!("sink.topic=bench-rp-out-{id}"),
        format!("dead_letter.topic=bench-rp-dlq-{id}"),
        format!("brokers.memory.capacity={}", events.len() * 2),
        "brokers.kafka.partitions=4".into(),
        format!("source.repartition={repartition}"),
    ];
    if let Ok(b) = std::env::var("WEIR_KAFKA_BOOTSTRAP") {
        sets.push(format!("brokers.kafka.bootstrap_servers={b}"));
    }
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/user_activity.toml");
    let overrides = Overrides {
        sets,
        broker: Some((broker.to_string(), format!("--broker {broker}"))),
    };
    let (c, backend) =
        Backend::load(std::path::Path::new(file), &overrides).unwrap_or_else(|e| panic!("{e}"));
    let mut sink = backend.feeder(&c.source.topic).await.expect("sink");
    for chunk in events.chunks(5_000) {
        let batch: Vec<OutRecord> = chunk
            .iter()
            .map(|e| OutRecord {
                key: (!repartition).then(|| user_of(e)),
                payload: e.clone(),
                ..Default::default()
            })
            .collect();
        sink.send(&batch).await.expect("produce");
    }
    let metrics = Arc::new(Metrics::default());
    let t0 = Instant::now();
    let mut parts = Parts::open(&c, &backend, &FileIo::default(), metrics.clone())
        .await
        .expect("parts");
    let stop = tokio_util::sync::CancellationToken::new();
    let idle = Duration::from_secs(2);
    let forwarder = spawn_forwarder(parts.forwarder.take(), &stop, Some(idle));
    let pipeline = tokio::spawn(parts.into_pipeline().exit_when_idle(idle).run());
    let n = events.len() as u64;
    while metrics.events_in.load(Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = t0.elapsed();
    let summary = pipeline.await.expect("join").expect("pipeline");
    if let Some(f) = forwarder {
        f.await.expect("join").expect("forwarder");
    }
    assert!(
        summary.counters.balanced() && summary.counters.late == 0,
        "{:?}",
        summary.counters
    );
    took
}

/// The `user_id` of a seed event.
fn user_of(e: &[u8]) -> Bytes {
    let v: serde_json::Value = serde_json::from_slice(e).expect("a seed event");
    Bytes::from(v["user_id"].as_str().unwrap_or_default().to_string())
}
