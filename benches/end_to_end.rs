//! End-to-end throughput: 1,000,000 generated seed events over 1,000 users through the
//! memory backend (source topic -> decode + validate -> 10 s tumbling count -> sink topic),
//! on one core, beside a bare loop that only parses the same events with serde_json and
//! counts them in a HashMap. Also prints the emit latency of Weir's last round (see
//! `Metrics::emit_latency`).
//!
//! `cargo bench --bench end_to_end` (set WEIR_BENCH_EVENTS to change the count,
//! WEIR_BENCH_PIPELINE to read another pipeline file).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::{Job, OutRecord, Pipeline, Sink, Source};
use weir_memory::{MemoryBroker, MemoryConfig};

#[path = "support/seed_event.rs"]
mod seed_event;
use seed_event::Event;
#[path = "support/common.rs"]
mod common;
use common::Drained;

/// The bare loop: parse every event into a borrowed struct, count per user.
fn bare(events: &[Bytes]) -> usize {
    let mut counts: HashMap<String, u64> = HashMap::with_capacity(2048);
    for e in events {
        let ev: Event = serde_json::from_slice(e).expect("valid event");
        match counts.get_mut(ev.user_id) {
            Some(c) => *c += 1,
            None => {
                counts.insert(ev.user_id.to_string(), 1);
            }
        }
    }
    counts.len()
}

fn main() {
    let n: usize = common::events(1_000_000);
    let rounds: usize = common::env_number("WEIR_BENCH_ROUNDS", 5);
    // Event-time density decides how much the windows reduce the data: at 1,000 events per
    // second of event time a 10 s window sees ~10 events per user (results ~10 % of input);
    // at 100/s (the tests' datasets) ~1 per user, so results are ~63 % of the input.
    let rates: Vec<i64> = match std::env::var("WEIR_BENCH_EVENT_RATE") {
        Ok(r) => vec![r.parse().expect("WEIR_BENCH_EVENT_RATE")],
        Err(_) => vec![1000, 100],
    };
    for rate in rates {
        run(n, rate, rounds);
    }
}

fn run(n: usize, rate: i64, rounds: usize) {
    let users = 1_000;
    eprintln!(
        "generating {n} events over {users} users at {rate} events per second of event time..."
    );
    let events = common::seed_events(1, n, users, rate);
    let bytes: usize = events.iter().map(|e| e.len()).sum();
    let mut bare_best = f64::MAX;

    // The pipeline as `pipelines/user_activity.toml` describes it, on the memory backend.
    // WEIR_BENCH_PIPELINE=FILE reads another copy.
    let file = std::env::var_os("WEIR_BENCH_PIPELINE").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/user_activity.toml"),
        std::path::PathBuf::from,
    );
    let (config, _) = Backend::load(
        &file,
        &Overrides {
            // WEIR_BENCH_SET="source.batch_size=4096" tries other settings.
            sets: std::env::var("WEIR_BENCH_SET")
                .map(|s| vec![s])
                .unwrap_or_default(),
            broker: None,
        },
    )
    .expect("pipeline file");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut weir_best = f64::MAX;
    let mut results = 0;
    let mut emit = weir_engine::metrics::HistogramSnapshot::default();
    // Bare and Weir rounds alternate so both see the same machine; best of each is kept.
    for _ in 0..rounds {
        let t = Instant::now();
        assert_eq!(bare(&events), users as usize);
        bare_best = bare_best.min(t.elapsed().as_secs_f64());

        let broker = MemoryBroker::new(MemoryConfig {
            partitions: 4,
            capacity: n,
        });
        rt.block_on(async {
            let mut src = broker.source("in", Some("bench"));
            let _ = src.recv(1, Duration::ZERO).await; // registers the group before producing
            let mut sink = broker.sink("in");
            for chunk in events.chunks(10_000) {
                let batch: Vec<OutRecord> = chunk
                    .iter()
                    .map(|e| OutRecord {
                        key: None,
                        payload: e.clone(),
                        ..Default::default()
                    })
                    .collect();
                sink.send(&batch).await.unwrap();
            }
            let source = Drained::new(Box::new(broker.source("in", Some("bench"))), n);
            let pipeline = Pipeline::new(
                Job::from_config(&config),
                Box::new(source),
                Box::new(broker.sink("out")),
                Box::new(broker.sink("dlq")),
            );
            let t = Instant::now();
            let summary = pipeline.run().await.unwrap();
            weir_best = weir_best.min(t.elapsed().as_secs_f64());
            assert_eq!(
                summary.counters.windowed, n as u64,
                "{:?}",
                summary.counters
            );
            results = summary.counters.results_out;
            let c = summary.counters;
            // One emit-latency observation per window closed.
            assert_eq!(c.emit_latency.count(), c.windows_closed, "{c:?}");
            emit = c.emit_latency;
        });
    }
    let (bare_rate, weir_rate) = (n as f64 / bare_best, n as f64 / weir_best);
    println!(
        "events: {n} ({} MB), users: {users}, event-time rate: {rate}/s, results: {results}",
        bytes / 1_000_000
    );
    println!(
        "  bare serde_json parse + HashMap count:       {:>10.0} events/s ({:.3} s)",
        bare_rate, bare_best
    );
    println!(
        "  weir memory -> validate -> window -> memory: {:>10.0} events/s ({:.3} s)",
        weir_rate, weir_best
    );
    println!("  weir / bare: {:.0} %", 100.0 * weir_rate / bare_rate);
    println!(
        "  emit latency (window closed -> results acknowledged), last round: {} windows, p50 {:.3} ms, p99 {:.3} ms",
        emit.count(),
        emit.quantile_ms(0.5),
        emit.quantile_ms(0.99)
    );
}
