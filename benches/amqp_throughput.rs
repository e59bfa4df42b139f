//! RabbitMQ throughput: raw lapin consume + ack versus Weir's RabbitMQ → window → RabbitMQ
//! pipeline over the same data on the same server.
//!
//! ```text
//! scripts/brokers up amqp
//! cargo bench --bench amqp_throughput            # N = 200000; WEIR_BENCH_N=... to change
//! ```
//!
//! Both runs read the same N seed events (published beforehand, persistent, with confirms,
//! into two queues) with the same prefetch. The raw consumer acks with `multiple` every
//! 1,000 deliveries and does nothing else; Weir decodes, validates, windows, publishes the
//! results with confirms and acks when they are confirmed. Weir's time is from start to
//! the last event received and its windows' results confirmed, without the idle wait that
//! ends a bounded run.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::{
    Checkpoint, Job, OutRecord, Pipeline, Position, Received, Sink, Source, StopReason,
};

/// Where the pipeline's time goes: nanoseconds in the backend's calls, and call counts.
#[derive(Default)]
struct Times {
    recv: AtomicU64,
    recvs: AtomicU64,
    commit: AtomicU64,
    commits: AtomicU64,
    send: AtomicU64,
    sends: AtomicU64,
}

struct Timed<T>(T, Arc<Times>);

#[async_trait]
impl Source for Timed<Box<dyn Source>> {
    fn topic(&self) -> &str {
        self.0.topic()
    }
    async fn recv(&mut self, max: usize, wait: Duration) -> weir_engine::Result<Received> {
        let t = Instant::now();
        let r = self.0.recv(max, wait).await;
        if matches!(&r, Ok(Received::Batch(b)) if !b.is_empty()) {
            self.1
                .recv
                .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            self.1.recvs.fetch_add(1, Relaxed);
        }
        r
    }
    fn wants_commit(&self) -> bool {
        self.0.wants_commit()
    }
    fn has_backlog(&self, partition: u32) -> bool {
        self.0.has_backlog(partition)
    }
    async fn commit(&mut self, p: &[(Position, Checkpoint)]) -> weir_engine::Result<()> {
        let t = Instant::now();
        let r = self.0.commit(p).await;
        self.1
            .commit
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        self.1.commits.fetch_add(1, Relaxed);
        r
    }
}

#[async_trait]
impl Sink for Timed<Box<dyn Sink>> {
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn send(&mut self, batch: &[OutRecord]) -> weir_engine::Result<()> {
        let t = Instant::now();
        let r = self.0.send(batch).await;
        self.1
            .send
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        self.1.sends.fetch_add(1, Relaxed);
        r
    }
}

const IDLE: Duration = Duration::from_secs(2);

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let n: usize = std::env::var("WEIR_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let url = std::env::var("WEIR_AMQP_URL").unwrap_or_else(|_| weir_amqp::DEFAULT_URL.to_string());
    if let Err(e) = weir_amqp::ping(&url).await {
        panic!("{e}: run scripts/brokers up amqp");
    }
    let id = format!(
        "{}-{}",
        std::process::id(),
        weir_engine::time::now_millis() % 1_000_000_000
    );
    let (raw_q, input, output, dlq) = (
        format!("bench-raw-{id}"),
        format!("bench-in-{id}"),
        format!("bench-out-{id}"),
        format!("bench-dlq-{id}"),
    );
    let pipeline_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/user_activity.toml");
    let mut sets = vec![
        format!("source.topic={input}"),
        format!("sink.topic={output}"),
        format!("dead_letter.topic={dlq}"),
        format!("brokers.amqp.url={url}"),
    ];
    // Extra `--set`s, `;`-separated, e.g. WEIR_BENCH_SET="source.commit_interval=100ms".
    if let Ok(extra) = std::env::var("WEIR_BENCH_SET") {
        sets.extend(
            extra
                .split(';')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    println!("settings: {}", sets[3..].join(" "));
    let overrides = Overrides {
        sets,
        broker: Some(("amqp".into(), "--broker amqp".into())),
    };
    let (config, backend) =
        Backend::load(&pipeline_file, &overrides).unwrap_or_else(|e| panic!("{e}"));
    let Some(amqp) = backend.get::<weir_amqp::AmqpBroker>() else {
        unreachable!()
    };
    let prefetch = amqp.config().prefetch;

    let rounds: usize = std::env::var("WEIR_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let data = weir_engine::generate::dataset(42, n, 50, 0);
    let mut ratios = Vec::new();
    let mut queues = Vec::new();
    for round in 1..=rounds {
        println!("-- round {round} of {rounds}");
        let names = [
            format!("{raw_q}-{round}"),
            format!("{input}-{round}"),
            format!("{output}-{round}"),
            format!("{dlq}-{round}"),
        ];
        let (raw_rate, weir_rate) = round_trip(
            &url,
            &backend,
            &config,
            prefetch,
            &data,
            &names,
            round % 2 == 0,
        )
        .await;
        ratios.push(100.0 * weir_rate / raw_rate);
        queues.extend(names);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "Weir / raw over {rounds} rounds of {n} events: median {:.1} %, min {:.1} %, max {:.1} %",
        (ratios[(ratios.len() - 1) / 2] + ratios[ratios.len() / 2]) / 2.0,
        ratios[0],
        ratios[ratios.len() - 1]
    );

    // Leave nothing behind.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in &queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        let _ = ch
            .queue_delete(
                weir_amqp::checkpoint_queue(q).as_str().into(),
                Default::default(),
            )
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Publishes `data` to two queues, consumes one raw and runs the pipeline over the other;
/// returns both rates in events/s.
async fn round_trip(
    url: &str,
    backend: &Backend,
    config: &weir_engine::config::PipelineConfig,
    prefetch: u16,
    data: &[String],
    [raw_q, input, output, dlq]: &[String; 4],
    weir_first: bool,
) -> (f64, f64) {
    let n = data.len();
    // Seed both queues with the same events.
    let t = Instant::now();
    for topic in [raw_q, input] {
        let mut sink = backend.sink(topic).await.unwrap();
        for chunk in data.chunks(1000) {
            let batch: Vec<OutRecord> = chunk
                .iter()
                .map(|l| OutRecord {
                    payload: Bytes::from(l.clone()),
                    ..Default::default()
                })
                .collect();
            sink.send(&batch).await.unwrap();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "published 2 x {n} events with confirms (Weir's sink, batches of 1000) in {secs:.1} s: {:.0} events/s",
        2.0 * n as f64 / secs
    );

    // Let the broker finish writing what was just published before either run starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Alternate which run goes first, so neither always meets a busier broker.
    let (raw_rate, weir_rate) = if weir_first {
        let w = weir(backend, config, prefetch, n, input, output, dlq).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        (raw(url, prefetch, n, raw_q).await, w)
    } else {
        let r = raw(url, prefetch, n, raw_q).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        (
            r,
            weir(backend, config, prefetch, n, input, output, dlq).await,
        )
    };
    println!("Weir / raw = {:.1} %", 100.0 * weir_rate / raw_rate);
    (raw_rate, weir_rate)
}

/// (a) Raw lapin: consume + ack (multiple, every 1000), nothing else; events/s.
async fn raw(url: &str, prefetch: u16, n: usize, raw_q: &str) -> f64 {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            raw_q.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    let mut got = 0usize;
    let mut bytes = 0usize;
    while got < n {
        let d = std::future::poll_fn(|cx| Pin::new(&mut consumer).poll_next(cx))
            .await
            .expect("consumer open")
            .expect("delivery");
        got += 1;
        bytes += d.data.len();
        if got.is_multiple_of(1000) || got == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let raw = t.elapsed().as_secs_f64();
    let raw_rate = n as f64 / raw;
    println!(
        "(a) raw lapin consume + ack, prefetch {prefetch}: {n} events ({:.1} MB) in {raw:.2} s: {raw_rate:.0} events/s",
        bytes as f64 / 1e6
    );
    drop(consumer);
    let _ = conn.close(200, "done".into()).await;

    raw_rate
}

/// (b) Weir: RabbitMQ -> decode/validate -> 10 s tumbling count -> RabbitMQ; events/s.
async fn weir(
    backend: &Backend,
    config: &weir_engine::config::PipelineConfig,
    prefetch: u16,
    n: usize,
    input: &str,
    output: &str,
    dlq: &str,
) -> f64 {
    let times = Arc::new(Times::default());
    let pipeline = Pipeline::new(
        Job::from_config(config),
        Box::new(Timed(
            backend.source(input, None).await.unwrap(),
            times.clone(),
        )),
        Box::new(Timed(backend.sink(output).await.unwrap(), times.clone())),
        Box::new(Timed(backend.sink(dlq).await.unwrap(), times.clone())),
    )
    .exit_when_idle(IDLE);
    let t = Instant::now();
    let summary = pipeline.run().await.unwrap();
    let total = t.elapsed().as_secs_f64();
    assert_eq!(summary.reason, StopReason::Idle);
    let s = summary.counters;
    assert_eq!(s.events_in as usize, n, "{s:?}");
    assert_eq!(s.windowed as usize, n, "{s:?}");
    let weir = total - IDLE.as_secs_f64();
    let weir_rate = n as f64 / weir;
    println!(
        "(b) Weir RabbitMQ -> window -> RabbitMQ, prefetch {prefetch}, batch {}, commit every {:?}: {n} events, {} results in {weir:.2} s (run {total:.2} s minus {} s idle exit): {weir_rate:.0} events/s",
        config.source.batch_size,
        config.source.commit_interval,
        s.results_out,
        IDLE.as_secs()
    );
    println!(
        "    time in recv {:.2} s ({} calls), in commit {:.2} s ({} commits), in send {:.2} s ({} batches)",
        times.recv.load(Relaxed) as f64 / 1e9,
        times.recvs.load(Relaxed),
        times.commit.load(Relaxed) as f64 / 1e9,
        times.commits.load(Relaxed),
        times.send.load(Relaxed) as f64 / 1e9,
        times.sends.load(Relaxed)
    );

    weir_rate
}
