//! The per-event hot path, piece by piece: decoding + validating a seed event, the
//! operator's ingest (decode, event time, window assignment, state update), timestamp
//! parsing, and the bare serde_json parse for comparison.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weir_engine::decode::{Decoder, Schema, TimeSource};
use weir_engine::generate::dataset;
use weir_engine::operator::{Emitted, WindowOperator};
use weir_engine::time::{parse_datetime, TimeFormat};
use weir_engine::{Job, Position, Record};

#[path = "support/seed_event.rs"]
mod seed_event;
use seed_event::Event;

fn hot_path(c: &mut Criterion) {
    let events = dataset(3, 10_000, 1_000, 0);
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.measurement_time(Duration::from_secs(3));

    g.bench_function("serde_json_value_parse", |b| {
        b.iter(|| {
            for e in &events {
                black_box(serde_json::from_str::<serde_json::Value>(e).unwrap());
            }
        })
    });

    g.bench_function("serde_json_borrowed_struct_parse", |b| {
        b.iter(|| {
            for e in &events {
                black_box(serde_json::from_slice::<Event>(e.as_bytes()).unwrap());
            }
        })
    });

    let time = TimeSource::Field {
        path: "timestamp".into(),
        format: TimeFormat::Auto,
    };
    let mut decoder = Decoder::new(&Schema::seed_event(), &time, 1 << 20);
    decoder.want("user_id");
    g.bench_function("decode_and_validate", |b| {
        b.iter(|| {
            for e in &events {
                black_box(decoder.decode(e.as_bytes()).unwrap());
            }
        })
    });

    g.bench_function("parse_seed_timestamp", |b| {
        b.iter(|| black_box(parse_datetime(black_box("2024-06-27 15:43:43.315342")).unwrap()))
    });

    let records: Vec<Record> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            payload: Bytes::from(e.clone()),
            position: Position {
                partition: 0,
                offset: i as u64,
            },
            ..Default::default()
        })
        .collect();
    let job = Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
        .with_schema(Schema::seed_event())
        .with_grace(Duration::from_secs(2));
    g.bench_function("operator_ingest_and_close", |b| {
        b.iter(|| {
            let mut op = WindowOperator::new(&job, "bench");
            let now = tokio::time::Instant::now();
            op.assign(&[(0, None)], now);
            let mut out = Emitted::default();
            let now_ms = weir_engine::time::now_millis();
            for r in &records {
                op.ingest(r, now, now_ms, &mut out);
            }
            op.close_all(&mut out);
            black_box(out.results.len())
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
