//! Kafka throughput on the test broker (`scripts/brokers up kafka`, or WEIR_KAFKA_BOOTSTRAP):
//! 1,000,000 seed events over 1,000 users are produced into a fresh 4-partition topic, then
//!
//! (a) raw: an rdkafka `BaseConsumer` assigned to every partition reads them all, touching
//!     each payload and nothing more;
//! (b) Weir: `pipelines/user_activity.toml` on the Kafka backend reads the same topic in a
//!     fresh consumer group, decodes, validates and counts per user in 10 s tumbling
//!     windows, produces every result to a sink topic with acks=all and commits.
//!
//! Both are timed from their first record to their last (Weir: to the end of the run,
//! which includes the final windows' results and commit; the group join before the first
//! record is not counted, and the run ends when the topic is drained, with no idle wait).
//!
//! Each step also prints the CPU time it took, of this process and of the broker (when
//! `scripts/brokers` started it), as cores busy on average: on a 2-core machine that says
//! how much room was left.
//!
//! `cargo bench --bench kafka_throughput` (WEIR_BENCH_EVENTS changes the count;
//! WEIR_BENCH_EVENT_RATE the events per second of event time: 100, the default, is the
//! generator's and gives ~0.63 results per event; 1000 gives ~0.1). With
//! `WEIR_BENCH_SET="pipeline.guarantee=exactly_once"` (b) and (c) run exactly-once (one
//! Kafka transaction per commit interval; `source.commit_interval=…` sets it; the input
//! is produced outside it);
//! `WEIR_BENCH_QUICK=1` stops after (b).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::{Job, OutRecord, Pipeline, Received};

#[path = "support/common.rs"]
mod common;
use common::Drained;

fn main() {
    let n: usize = common::events(1_000_000);
    let bootstrap =
        std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    common::require_reachable("Kafka", &bootstrap, "scripts/brokers up kafka");

    let id = weir_engine::time::now_millis();
    // WEIR_BENCH_SET="source.batch_size=8192;brokers.kafka.producer.linger.ms=0" tries
    // other settings.
    let extra: Vec<String> = std::env::var("WEIR_BENCH_SET")
        .map(|s| {
            s.split(';')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let overrides = Overrides {
        sets: vec![
            format!("source.topic=bench-in-{id}"),
            format!("source.group=bench-group-{id}"),
            format!("sink.topic=bench-out-{id}"),
            format!("dead_letter.topic=bench-dlq-{id}"),
            format!("brokers.kafka.bootstrap_servers={bootstrap}"),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect(),
        broker: Some(("kafka".into(), "--broker kafka".into())),
    };
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/user_activity.toml");
    let (c, backend) = Backend::load(&path, &overrides).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "kafka throughput, {n} events over 1,000 users, broker {bootstrap}, settings {extra:?}"
    );
    let rate: i64 = std::env::var("WEIR_BENCH_EVENT_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    println!("  event time: {rate} events per second");
    let events = common::seed_events(7, n, 1_000, rate);
    let bytes: usize = events.iter().map(Bytes::len).sum();
    rt.block_on(async {
        // Outside the pipeline's transaction when it is exactly-once.
        let mut sink = backend.feeder(&c.source.topic).await.expect("sink");
        let t = Instant::now();
        for chunk in events.chunks(10_000) {
            let batch: Vec<OutRecord> = chunk
                .iter()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                    OutRecord {
                        key: v["user_id"].as_str().map(|u| Bytes::from(u.to_string())),
                        payload: l.clone(),
                        ..Default::default()
                    }
                })
                .collect();
            sink.send(&batch).await.expect("produce");
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "  produce (acks=all, idempotent, lz4): {:>10.0} events/s  ({n} in {s:.2} s, {:.0} MB)",
            n as f64 / s,
            bytes as f64 / 1e6
        );
    });
    drop(events);

    // (a) raw rdkafka consume.
    let cpu = Cpu::start();
    let raw = raw_consume(
        &bootstrap,
        &c.source.topic,
        n,
        &format!("bench-raw-{id}"),
        "(a)",
    );
    cpu.report(n as f64 / raw, n, "event");

    // (b) Weir: Kafka -> decode -> window -> Kafka.
    let mut weir_results = 0;
    let cpu = Cpu::start();
    let weir = rt.block_on(async {
        let source = Drained::new(
            backend.source(&c.source.topic, Some(&c.source.group)).await.expect("source"),
            n,
        );
        let first = source.first();
        let pipeline = transactional(
            Pipeline::new(
                Job::from_config(&c),
                Box::new(source),
                backend.sink(&c.sink.topic).await.expect("sink"),
                backend.sink(&c.dead_letter.topic).await.expect("dead-letter sink"),
            ),
            &backend,
        );
        let summary = pipeline.run().await.expect("pipeline");
        let s = first.lock().unwrap().expect("records arrived").elapsed().as_secs_f64();
        let k = summary.counters;
        assert_eq!(k.events_in as usize, n, "{k:?}");
        assert!(k.balanced(), "{k:?}");
        let rate = n as f64 / s;
        weir_results = k.results_out;
        println!(
            "  (b) Weir Kafka -> window -> Kafka:  {rate:>10.0} events/s  ({n} in {s:.2} s; {} results produced, {} late, {} commits)",
            k.results_out, k.late, k.commits
        );
        rate
    });
    cpu.report(n as f64 / weir, n, "event");
    println!("  Weir / raw: {:.0} %", 100.0 * weir / raw);
    if std::env::var("WEIR_BENCH_QUICK").is_ok_and(|v| v == "1") {
        return;
    }

    // (c) Weir with its outputs discarded: the Kafka source and the engine alone (a second
    // fresh group over the same topic), to separate consuming from producing results.
    let cpu = Cpu::start();
    let no_output = rt.block_on(async {
        let source = Drained::new(
            backend
                .source(&c.source.topic, Some(&format!("{}-null", c.source.group)))
                .await
                .expect("source"),
            n,
        );
        let first = source.first();
        let pipeline = transactional(
            Pipeline::new(
                Job::from_config(&c),
                Box::new(source),
                Box::new(Null),
                Box::new(Null),
            ),
            &backend,
        );
        let summary = pipeline.run().await.expect("pipeline");
        let s = first
            .lock()
            .unwrap()
            .expect("records arrived")
            .elapsed()
            .as_secs_f64();
        assert_eq!(summary.counters.events_in as usize, n);
        let rate = n as f64 / s;
        println!(
            "  (c) Weir Kafka -> window -> (discarded): {rate:>10.0} events/s  ({n} in {s:.2} s)"
        );
        rate
    });
    cpu.report(n as f64 / no_output, n, "event");
    println!(
        "  Weir without producing results / raw: {:.0} %",
        100.0 * no_output / raw
    );

    // (d) The Kafka source alone: `recv` in a loop, as the runtime calls it.
    rt.block_on(async {
        let mut src = backend
            .source(&c.source.topic, Some(&format!("{}-src", c.source.group)))
            .await
            .expect("source");
        let (mut got, mut first, mut batches) = (0usize, None, 0usize);
        while got < n {
            if let Received::Batch(b) = src.recv(c.source.batch_size, Duration::from_millis(200)).await.expect("recv") {
                if !b.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    got += b.len();
                    batches += 1;
                }
            }
        }
        let s = first.unwrap().elapsed().as_secs_f64();
        println!(
            "  (d) Weir Kafka source alone:        {:>10.0} events/s  ({n} in {s:.2} s, {:.0} records per batch)",
            n as f64 / s,
            n as f64 / batches as f64
        );
        let mut src = backend.reader(&c.source.topic, true).await.expect("reader").expect("kafka reader");
        let (mut got, mut first) = (0usize, None);
        while got < n {
            if let Received::Batch(b) = src.recv(c.source.batch_size, Duration::from_millis(200)).await.expect("recv") {
                if !b.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    got += b.len();
                }
            }
        }
        let s = first.unwrap().elapsed().as_secs_f64();
        println!("  (e) Weir Kafka reader (no group):   {:>10.0} events/s  ({n} in {s:.2} s)", n as f64 / s);
    });
    raw_consume(
        &bootstrap,
        &c.source.topic,
        n,
        &format!("bench-raw2-{id}"),
        "(f) again:",
    );

    // (g) The broker's produce rate for records shaped like Weir's results, with the
    // pipeline's producer settings: what (b) can reach is at most this divided by the
    // results per event.
    let cpu = Cpu::start();
    let rate = raw_produce(&bootstrap, &format!("bench-rawprod-{id}"), n);
    let per_event = weir_results as f64 / n as f64;
    println!(
        "  (g) raw rdkafka produce, result-sized records, same settings: {rate:>10.0} records/s; \
         at {per_event:.2} results per event (b) is capped near {:.0} events/s = {:.0} % of raw consume",
        rate / per_event.max(f64::MIN_POSITIVE),
        100.0 * rate / per_event.max(f64::MIN_POSITIVE) / raw
    );
    cpu.report(n as f64 / rate, n, "record");
}

/// `pipeline` in the backend's transaction when the pipeline is exactly-once.
fn transactional(pipeline: Pipeline, backend: &Backend) -> Pipeline {
    match backend.transaction() {
        Some(t) => pipeline.transactional(t),
        None => pipeline,
    }
}

/// Produces `n` result-sized keyed records to a fresh topic with a plain `BaseProducer`
/// (acks=all, idempotence, linger.ms=5, lz4, as `pipelines/user_activity.toml`) and
/// returns records per second, from the first send to the last acknowledgement.
fn raw_produce(bootstrap: &str, topic: &str, n: usize) -> f64 {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    // Let auto-creation and metadata settle before timing.
    let _ = producer.send(BaseRecord::<str, str>::to(topic).key("warm").payload("{}"));
    producer
        .flush(Duration::from_secs(30))
        .expect("warm-up flush");
    let t = Instant::now();
    for i in 0..n {
        let key = format!("User{}", i % 1000);
        let payload = format!(
            "{{\"user_id\":\"{key}\",\"window_start\":\"2024-06-27T15:43:40Z\",\"window_end\":\"2024-06-27T15:43:50Z\",\"count\":{}}}",
            i % 7
        );
        let mut rec = BaseRecord::<str, str>::to(topic)
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    rec = back;
                    producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("raw produce: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    n as f64 / t.elapsed().as_secs_f64()
}

/// Reads `n` records of every partition of `topic` with a plain `BaseConsumer`.
fn raw_consume(bootstrap: &str, topic: &str, n: usize, group: &str, label: &str) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // As Weir's consumer (backends/kafka CONSUMER_DEFAULTS): librdkafka's default 1 s
        // pause once a partition's queue is full stalls even this loop now and then.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let (mut got, mut touched) = (0usize, 0usize);
    let mut first = None;
    while got < n {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                touched += m.payload().map_or(0, <[u8]>::len);
                got += 1;
            }
            Some(Err(e)) => panic!("raw consume: {e}"),
            None => panic!("raw consume: nothing for 10 s after {got} records"),
        }
    }
    let s = first.unwrap().elapsed().as_secs_f64();
    let rate = n as f64 / s;
    println!("  {label} raw rdkafka BaseConsumer:       {rate:>10.0} events/s  ({n} in {s:.2} s, {touched} payload bytes)");
    rate
}

/// CPU time of this process and of the broker `scripts/brokers` started, from `/proc`.
struct Cpu {
    broker: Option<u32>,
    at: (f64, f64),
    wall: Instant,
}

impl Cpu {
    fn start() -> Self {
        let broker = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".brokers/run/kafka.pid"),
        )
        .ok()
        .and_then(|s| s.trim().parse().ok());
        Cpu {
            broker,
            at: Self::now(broker),
            wall: Instant::now(),
        }
    }

    /// CPU seconds (user + system) of this process and of the broker.
    fn now(broker: Option<u32>) -> (f64, f64) {
        let secs = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let f: Vec<f64> = s
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    // utime and stime, fields 14 and 15, in clock ticks (100 per second).
                    Some((f.get(10)? + f.get(11)?) / 100.0)
                })
                .unwrap_or(0.0)
        };
        (secs("self"), broker.map_or(0.0, |p| secs(&p.to_string())))
    }

    /// Prints the cores this step kept busy on average over its `timed` seconds (the CPU is
    /// counted from `start`, so the little spent setting up before the first record counts
    /// too).
    /// Also prints the CPU per `what` (of `n`), of this process and in all.
    fn report(&self, timed: f64, n: usize, what: &str) {
        let (me, broker) = Self::now(self.broker);
        let (me, broker) = (me - self.at.0, broker - self.at.1);
        let per = |s: f64| s * 1e6 / n.max(1) as f64;
        println!(
            "      CPU: {me:.2} s this process + {broker:.2} s broker in {timed:.2} s timed ({:.2} s in all) = {:.2} cores busy; \
             {:.2} µs per {what} ({:.2} µs of this process)",
            self.wall.elapsed().as_secs_f64(),
            (me + broker) / timed,
            per(me + broker),
            per(me)
        );
    }
}

/// A sink that acknowledges everything at once.
struct Null;

#[async_trait]
impl weir_engine::Sink for Null {
    fn name(&self) -> &str {
        "null"
    }
    async fn send(&mut self, _: &[OutRecord]) -> weir_engine::Result<()> {
        Ok(())
    }
}
