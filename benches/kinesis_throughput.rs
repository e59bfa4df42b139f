//! Kinesis throughput on the local emulator (`scripts/brokers up kinesis`, or any at
//! WEIR_KINESIS_ENDPOINT): put N seed events into a 4-shard stream with Weir's sink, then
//!   (a) read them all back with the bare SDK: one task per shard, GetShardIterator
//!       (TRIM_HORIZON) + GetRecords chaining, nothing else;
//!   (b) run Weir's Kinesis -> validate -> 10 s tumbling count -> Kinesis pipeline over the
//!       same stream, stopping as soon as all N events were read (no idle wait).
//!
//! `cargo bench --bench kinesis_throughput` (WEIR_BENCH_EVENTS, default 50,000;
//! WEIR_BENCH_EVENT_RATE, events per second of event time, default both 100 and 1,000).

use std::time::Instant;

use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::{Job, OutRecord, Pipeline};
use weir_kinesis::aws_sdk_kinesis::types::ShardIteratorType;
use weir_kinesis::{KinesisBroker, KinesisConfig};

#[path = "support/common.rs"]
mod common;
use common::Drained;

fn main() {
    let n: usize = common::events(50_000);
    let endpoint =
        std::env::var("WEIR_KINESIS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4567".into());
    // Event-time density decides how many results the windows write back: at 100 events per
    // second of event time (the tests' datasets) ~63 % of the input, at 1,000/s ~10 %.
    let rates: Vec<i64> = match std::env::var("WEIR_BENCH_EVENT_RATE") {
        Ok(r) => vec![r.parse().expect("WEIR_BENCH_EVENT_RATE")],
        Err(_) => vec![100, 1000],
    };
    for rate in rates {
        run(n, rate, &endpoint);
    }
}

fn run(n: usize, rate: i64, endpoint: &str) {
    let endpoint = endpoint.to_string();
    let id = format!(
        "bench-{}-{}",
        std::process::id(),
        weir_engine::time::now_millis()
    );
    let dir = std::env::temp_dir().join(format!("weir-kinesis-bench-{id}"));
    let overrides = Overrides {
        sets: vec![
            format!("source.topic=bench-in-{id}"),
            format!("source.group=bench-{id}"),
            format!("sink.topic=bench-out-{id}"),
            format!("dead_letter.topic=bench-dlq-{id}"),
            format!("brokers.kinesis.endpoint_url={endpoint}"),
            format!("brokers.kinesis.checkpoint_dir={}", dir.display()),
        ],
        broker: Some(("kinesis".into(), "--broker kinesis".into())),
    };
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/user_activity.toml");
    let (config, backend) = Backend::load(&file, &overrides).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let events = common::seed_events(3, n, 1_000, rate);
    let bytes: usize = events.iter().map(|e| e.len()).sum();
    rt.block_on(async {
        let mut sink = backend
            .sink(&config.source.topic)
            .await
            .unwrap_or_else(|e| panic!("Kinesis emulator at {endpoint}: {e} (run scripts/brokers up kinesis)"));
        let t = Instant::now();
        for chunk in events.chunks(5_000) {
            let batch: Vec<OutRecord> = chunk
                .iter()
                .map(|e| OutRecord {
                    key: None,
                    payload: e.clone(),
                    ..Default::default()
                })
                .collect();
            sink.send(&batch).await.expect("put");
        }
        let put = t.elapsed().as_secs_f64();

        // (a) the bare SDK.
        let broker = KinesisBroker::new(KinesisConfig {
            endpoint_url: Some(endpoint.clone()),
            credentials: weir_kinesis::Credentials::Emulator,
            ..KinesisConfig::default()
        });
        let client = broker.client().await.unwrap();
        let mut raw = Vec::new();
        for limit in [1_000, 10_000] {
            let t = Instant::now();
            let shards = client
                .list_shards()
                .stream_name(&config.source.topic)
                .send()
                .await
                .unwrap();
            let mut tasks = Vec::new();
            for s in shards.shards() {
                let (client, stream, shard) = (
                    client.clone(),
                    config.source.topic.clone(),
                    s.shard_id().to_string(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut it = client
                        .get_shard_iterator()
                        .stream_name(stream)
                        .shard_id(shard)
                        .shard_iterator_type(ShardIteratorType::TrimHorizon)
                        .send()
                        .await
                        .unwrap()
                        .shard_iterator()
                        .map(str::to_string);
                    let mut got = 0usize;
                    while let Some(i) = it {
                        let out = client
                            .get_records()
                            .shard_iterator(i)
                            .limit(limit)
                            .send()
                            .await
                            .unwrap();
                        if out.records().is_empty() {
                            break;
                        }
                        got += out.records().len();
                        it = out.next_shard_iterator().map(str::to_string);
                    }
                    got
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            assert_eq!(total, n);
            raw.push((limit, t.elapsed().as_secs_f64()));
        }

        // (b) Weir.
        let c = &config;
        let source = Drained::new(
            backend
                .source(&c.source.topic, Some(&c.source.group))
                .await
                .unwrap(),
            n,
        );
        let pipeline = Pipeline::new(
            Job::from_config(c),
            Box::new(source),
            backend.sink(&c.sink.topic).await.unwrap(),
            backend.sink(&c.dead_letter.topic).await.unwrap(),
        );
        let t = Instant::now();
        let summary = pipeline.run().await.unwrap();
        let weir = t.elapsed().as_secs_f64();
        assert_eq!(summary.counters.windowed, n as u64, "{:?}", summary.counters);

        println!(
            "events: {n} ({} MB) over 1000 users, {rate} per second of event time, 4 shards, emulator at {endpoint}",
            bytes / 1_000_000
        );
        println!(
            "  put with Weir's sink (PutRecords x500):      {:>8.0} events/s ({put:.2} s)",
            n as f64 / put
        );
        for (limit, s) in raw {
            println!(
                "  bare SDK GetRecords, Limit {limit:>5}:           {:>8.0} events/s ({s:.2} s)",
                n as f64 / s
            );
        }
        println!(
            "  weir kinesis -> window -> kinesis:           {:>8.0} events/s ({weir:.2} s, {} results)",
            n as f64 / weir,
            summary.counters.results_out
        );
        // kinesalite keeps every stream in memory: leave nothing behind.
        for stream in [&c.source.topic, &c.sink.topic, &c.dead_letter.topic] {
            let _ = client.delete_stream().stream_name(stream).send().await;
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}
