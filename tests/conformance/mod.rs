//! The conformance suite: the same dataset, the same `pipelines/user_activity.toml` and the
//! same expected results on every backend; only the broker is switched. Each backend's
//! test file (`backend_memory.rs`, `backend_kafka.rs`, ...) calls these functions.
//!
//! Expected results come from an oracle written independently of the engine: serde_json
//! values, chrono's parser, a HashMap of counts.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use weir::Backend;
use weir_engine::config::{Overrides, PipelineConfig};
use weir_engine::generate::dataset;
use weir_engine::record::HEADER_ID;
use weir_engine::{EngineError, Job, OutRecord, Pipeline, Processor, Received, Record, StopReason};

/// The pipeline every backend runs.
pub fn pipeline_file() -> PathBuf {
    pipeline_named("user_activity")
}

/// `pipelines/NAME.toml`.
pub fn pipeline_named(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("pipelines/{name}.toml"))
}

/// `pipelines/user_activity.toml` copied into `dir` beside `brokers` (the text of the
/// `brokers.toml` it includes, e.g. the shipped one with a mistake in it). Returns the
/// pipeline's path and the included file's.
pub fn pipeline_with_brokers(dir: &Path, brokers: &str) -> (PathBuf, PathBuf) {
    let (pipeline, included) = (dir.join("user_activity.toml"), dir.join("brokers.toml"));
    std::fs::copy(pipeline_file(), &pipeline).unwrap();
    std::fs::write(&included, brokers).unwrap();
    (pipeline, included)
}

/// The text of the shipped `pipelines/brokers.toml`.
pub fn shipped_brokers() -> String {
    std::fs::read_to_string(pipeline_named("brokers")).unwrap()
}

/// A backend under test, with topic names of its own so runs never see each other's data.
pub struct Bed {
    pub config: PipelineConfig,
    pub backend: Backend,
    /// The `--set` overrides that made this bed (for `weir` processes of the same bed).
    pub sets: Vec<String>,
}

static RUN: AtomicUsize = AtomicUsize::new(0);

impl Bed {
    /// Loads the pipeline with `--broker broker`, unique topics and group, plus `extra`
    /// `--set` overrides.
    pub fn new(broker: &str, case: &str, extra: &[&str]) -> Bed {
        Bed::with_file(&pipeline_file(), broker, case, extra)
    }

    /// Like [`Bed::new`] for another pipeline file (its late topic made unique too).
    pub fn with_file(file: &Path, broker: &str, case: &str, extra: &[&str]) -> Bed {
        Bed::build(file, broker, case, extra, true)
    }

    /// Like [`Bed::new`], but RabbitMQ queues get no `x-expires` (the test deletes them),
    /// as a standard consumer declaring them with no arguments expects.
    pub fn without_queue_expiry(broker: &str, case: &str, extra: &[&str]) -> Bed {
        Bed::build(&pipeline_file(), broker, case, extra, false)
    }

    fn build(file: &Path, broker: &str, case: &str, extra: &[&str], expiring: bool) -> Bed {
        let id = format!(
            "{case}-{}-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed),
            weir_engine::time::now_millis() % 1_000_000_000
        );
        let mut sets = vec![
            format!("source.topic=conf-in-{id}"),
            format!("source.group=conf-group-{id}"),
            format!("sink.topic=conf-out-{id}"),
            format!("dead_letter.topic=conf-dlq-{id}"),
        ];
        // Brokers run elsewhere (e.g. docker/compose.yml) are found through the environment.
        if broker == "kafka" {
            if let Ok(addr) = std::env::var("WEIR_KAFKA_BOOTSTRAP") {
                sets.push(format!("brokers.kafka.bootstrap_servers={addr}"));
            }
        }
        if broker == "amqp" {
            if let Ok(url) = std::env::var("WEIR_AMQP_URL") {
                sets.push(format!("brokers.amqp.url={url}"));
            }
            // RabbitMQ deletes the run's queues once they are unused for this long.
            if expiring {
                sets.push("brokers.amqp.queue_expires=10m".to_string());
            }
        }
        // Brokers run elsewhere are found through the environment; checkpoints stay per test.
        if broker == "kinesis" {
            let ep = std::env::var("WEIR_KINESIS_ENDPOINT")
                .unwrap_or_else(|_| "http://127.0.0.1:4567".into());
            sets.push(format!("brokers.kinesis.endpoint_url={ep}"));
            sets.push("brokers.kinesis.credentials=emulator".into());
            sets.push("brokers.kinesis.create_streams=true".into());
            sets.push("brokers.kinesis.shards=4".into());
            let dir = std::env::temp_dir().join(format!("weir-kinesis-checkpoints-{id}"));
            sets.push(format!("brokers.kinesis.checkpoint_dir={}", dir.display()));
        }
        sets.extend(extra.iter().map(|s| s.to_string()));
        let overrides = Overrides {
            sets,
            broker: Some((broker.to_string(), format!("--broker {broker}"))),
        };
        let mut overrides = overrides;
        if std::fs::read_to_string(file)
            .unwrap()
            .contains("[late]\ntopic")
        {
            overrides.sets.push(format!("late.topic=conf-late-{id}"));
        }
        let (config, backend) = match Backend::load(file, &overrides) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(config.broker, broker);
        Bed {
            config,
            backend,
            sets: overrides.sets,
        }
    }

    /// Publishes seed events to the source topic, keyed by user like `weir produce`.
    pub async fn produce(&self, lines: &[Vec<u8>]) {
        self.produce_with(lines, true).await
    }

    /// Publishes records without a key (the broker spreads them over partitions).
    pub async fn produce_unkeyed(&self, lines: &[Vec<u8>]) {
        self.produce_with(lines, false).await
    }

    async fn produce_with(&self, lines: &[Vec<u8>], keyed: bool) {
        let mut sink = self
            .backend
            .sink(&self.config.source.topic)
            .await
            .expect("sink");
        for chunk in lines.chunks(1000) {
            let batch: Vec<OutRecord> = chunk
                .iter()
                .map(|l| OutRecord {
                    key: user_of(l)
                        .filter(|_| keyed)
                        .map(|u| Bytes::from(u.into_bytes())),
                    payload: Bytes::from(l.clone()),
                    ..Default::default()
                })
                .collect();
            sink.send(&batch).await.expect("produce");
        }
    }

    /// The pipeline over this bed's topics.
    pub async fn pipeline(&self) -> Pipeline {
        let c = &self.config;
        let p = Pipeline::new(
            Job::from_config(c),
            self.backend
                .source(&c.source.topic, Some(&c.source.group))
                .await
                .expect("source"),
            self.backend.sink(&c.sink.topic).await.expect("sink"),
            self.backend
                .sink(&c.dead_letter.topic)
                .await
                .expect("dead-letter sink"),
        );
        match &c.late {
            weir_engine::config::LatePolicy::Output(t) => {
                p.late_output(self.backend.sink(t).await.expect("late sink"))
            }
            _ => p,
        }
    }

    /// Runs the pipeline until its input has been idle for 2 s, emitting every open
    /// window as at the end of input.
    pub async fn run_until_idle(&self) -> weir_engine::Result<weir_engine::Summary> {
        self.pipeline()
            .await
            .exit_when_idle(Duration::from_secs(2))
            .run()
            .await
    }

    /// Reads `topic` from the beginning until `expect` records arrived or `idle` passed
    /// without one (counted from the partition assignment: joining a group takes time).
    pub async fn read(&self, topic: &str, expect: usize, idle: Duration) -> Vec<Record> {
        self.read_with(topic, expect, idle, false).await
    }

    /// Like [`read`](Self::read), committing what it read as it goes: a RabbitMQ queue
    /// stops delivering to a reader that holds `prefetch` unacknowledged messages, so this
    /// is how a topic larger than that is read to its end (and consumed).
    pub async fn read_all(&self, topic: &str, idle: Duration) -> Vec<Record> {
        self.read_with(topic, usize::MAX, idle, true).await
    }

    async fn read_with(
        &self,
        topic: &str,
        expect: usize,
        idle: Duration,
        commit: bool,
    ) -> Vec<Record> {
        let group = format!(
            "conf-reader-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let mut src = self
            .backend
            .source(topic, Some(&group))
            .await
            .expect("reader");
        let mut out = Vec::new();
        let mut last = tokio::time::Instant::now();
        let mut assigned = false;
        let join_limit = Duration::from_secs(30);
        while out.len() < expect
            && (last.elapsed() < idle || (!assigned && last.elapsed() < join_limit))
        {
            match src
                .recv(1000, Duration::from_millis(200))
                .await
                .expect("read")
            {
                Received::Batch(b) if !b.is_empty() => {
                    if commit {
                        let mut next: HashMap<u32, u64> = HashMap::new();
                        for r in &b {
                            let n = next.entry(r.position.partition).or_default();
                            *n = (*n).max(r.position.offset + 1);
                        }
                        let cp = weir_engine::Checkpoint {
                            watermark: i64::MIN,
                            processed: 0,
                        };
                        let positions: Vec<_> = next
                            .into_iter()
                            .map(|(partition, offset)| {
                                (weir_engine::Position { partition, offset }, cp)
                            })
                            .collect();
                        src.commit(&positions).await.expect("reader commit");
                    }
                    out.extend(b);
                    last = tokio::time::Instant::now();
                }
                Received::Assigned(_) => {
                    assigned = true;
                    last = tokio::time::Instant::now();
                }
                _ => {}
            }
        }
        out
    }
}

fn user_of(line: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("user_id")?.as_str().map(str::to_string)
}

/// (user, window start in ms) -> count, computed without the engine.
pub type Counts = HashMap<(String, i64), u64>;

/// The oracle: counts per user per 10 s window of the seed's timestamp, valid events only.
pub fn oracle(lines: &[Vec<u8>]) -> Counts {
    let allowed = ["page_view", "scroll", "click"];
    let mut c = Counts::new();
    for l in lines {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) else {
            continue;
        };
        let (Some(et), Some(user), Some(_), Some(ts)) = (
            v["event_type"].as_str(),
            v["user_id"].as_str(),
            v["action"].as_str(),
            v["timestamp"].as_str(),
        ) else {
            continue;
        };
        if !allowed.contains(&et) || !(v["metadata"].is_object() || v["metadata"].is_null()) {
            continue;
        }
        let Ok(t) = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f") else {
            continue;
        };
        let ms = t.and_utc().timestamp_millis();
        *c.entry((user.to_string(), ms - ms.rem_euclid(10_000)))
            .or_default() += 1;
    }
    c
}

/// Parses result records, checking their key and id header; duplicates (same id) must
/// carry the same count. Returns the distinct results.
pub fn results(records: &[Record]) -> Counts {
    let mut c = Counts::new();
    for r in records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("result is JSON");
        let user = v["user_id"].as_str().expect("user_id").to_string();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let end = chrono::DateTime::parse_from_rfc3339(v["window_end"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        assert_eq!(end - start, 10_000, "{v}");
        assert_eq!(
            r.key.as_deref(),
            Some(user.as_bytes()),
            "result key is the group key"
        );
        if let Some((_, id)) = r.headers.iter().find(|(k, _)| k == HEADER_ID) {
            assert_eq!(
                std::str::from_utf8(id).unwrap(),
                format!("{user}@{}", v["window_start"].as_str().unwrap())
            );
        }
        let count = v["count"].as_u64().expect("count");
        if let Some(prev) = c.insert((user.clone(), start), count) {
            assert_eq!(
                prev, count,
                "a duplicate result for ({user}, {start}) has another count"
            );
        }
    }
    c
}

fn lines(seed: u64, n: usize, users: u64, invalid_every: u64) -> Vec<Vec<u8>> {
    dataset(seed, n, users, invalid_every)
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

/// 20,000 seeded events over 50 users: the results are exactly the oracle's counts, and
/// every event is accounted for.
pub async fn counts_match_the_oracle(broker: &str) {
    let bed = Bed::new(broker, "counts", &[]);
    let data = lines(42, 20_000, 50, 0);
    let want = oracle(&data);
    assert_eq!(want.values().sum::<u64>(), 20_000);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    assert_eq!(summary.reason, StopReason::Idle);
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.dead_letters, s.late),
        (20_000, 20_000, 0, 0),
        "{s:?}"
    );
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// Every kind of bad input goes to the dead-letter topic with its reason and source; the
/// rest is counted exactly; nothing panics.
pub async fn bad_input_goes_to_dead_letters(broker: &str) {
    let bed = Bed::new(broker, "dead", &[]);
    let mut data = lines(7, 2_000, 20, 10);
    let crafted: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe\x00garbage".to_vec(), "not valid UTF-8"),
        (vec![b' '; 70_000].into_iter().chain(*b"{}").collect(), "over the limit of 65536 bytes"),
        (b"{\"user_id\": \"User1\", ".to_vec(), "invalid JSON"),
        (b"[1, 2, 3]".to_vec(), "expected a JSON object"),
        (
            br#"{"event_type":"click","user_id":42,"action":"x","timestamp":"2024-06-27 15:00:01.000000"}"#.to_vec(),
            "`user_id`: expected string",
        ),
        (
            br#"{"event_type":"click","user_id":"User1","action":"x","timestamp":"27/06/2024"}"#.to_vec(),
            "`timestamp`: `27/06/2024` is not a timestamp",
        ),
        (
            br#"{"event_type":"click","action":"x","timestamp":"2024-06-27 15:00:01.000000"}"#.to_vec(),
            "missing field `user_id`",
        ),
    ];
    data.extend(crafted.iter().map(|(p, _)| p.clone()));
    let want = oracle(&data);
    let valid: u64 = want.values().sum();
    let invalid = data.len() as u64 - valid;
    assert_eq!(invalid, 200 + crafted.len() as u64);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    let s = summary.counters;
    assert_eq!(
        (s.windowed, s.dead_letters, s.late),
        (valid, invalid, 0),
        "{s:?}"
    );
    assert!(s.balanced());
    let dead = bed
        .read(
            &bed.config.dead_letter.topic,
            invalid as usize,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dead.len() as u64, invalid);
    let envelopes: Vec<serde_json::Value> = dead
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).expect("dead letter is JSON"))
        .collect();
    for e in &envelopes {
        assert!(!e["error"].as_str().unwrap_or_default().is_empty(), "{e}");
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
        assert!(e["source"]["offset"].is_u64() && e["source"]["partition"].is_u64());
        assert!(e["payload"].is_string());
    }
    for (payload, reason) in &crafted {
        let found = envelopes.iter().any(|e| {
            let p = e["payload"].as_str().unwrap();
            let same = if e["payload_encoding"] == "base64" {
                p == weir_engine::output::base64(payload)
            } else {
                p.as_bytes() == &payload[..]
            };
            same && e["error"].as_str().unwrap().contains(reason)
        });
        assert!(found, "no dead letter with reason {reason:?}");
    }
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
}

/// Fails the run (like a crash: no final commit) after `after` records, once every one of
/// `partitions` partitions delivered some: until then each holds the watermark back, no
/// window closes and nothing is committable (brokers such as Kafka may serve one
/// partition's backlog well before another's).
struct CrashAfter {
    seen: usize,
    after: usize,
    partitions: usize,
    seen_partitions: std::collections::HashSet<u32>,
}

#[async_trait]
impl Processor for CrashAfter {
    fn name(&self) -> &str {
        "crash-after"
    }
    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        _: &mut Vec<weir_engine::Rejected>,
    ) -> weir_engine::Result<()> {
        // Crash only on a batch after the one that completed the set, so that some
        // progress could be committed in between.
        let all_seen_before = self.seen_partitions.len() >= self.partitions;
        self.seen += batch.len();
        self.seen_partitions
            .extend(batch.iter().map(|r| r.position.partition));
        if self.seen >= self.after && all_seen_before {
            return Err(EngineError::Stopped("simulated crash".into()));
        }
        Ok(())
    }
}

/// The pipeline crashes mid-stream and is started again: nothing is lost, duplicates
/// carry the same counts, and the distinct results are exactly the oracle's.
pub async fn restart_loses_nothing(broker: &str) -> weir_engine::metrics::Snapshot {
    let bed = Bed::new(
        broker,
        "restart",
        &["source.commit_interval=0s", "source.batch_size=500"],
    );
    let data = lines(99, 10_000, 30, 0);
    let want = oracle(&data);
    bed.produce(&data).await;
    let first = bed
        .pipeline()
        .await
        .processor(Box::new(CrashAfter {
            seen: 0,
            after: 4_000,
            // Partitioned backends read pipelines/user_activity.toml's 4 partitions; a
            // RabbitMQ queue is one.
            partitions: if matches!(broker, "memory" | "kafka") {
                4
            } else {
                1
            },
            seen_partitions: Default::default(),
        }))
        .run()
        .await;
    assert!(matches!(first, Err(EngineError::Stopped(_))), "{first:?}");
    let second = bed.run_until_idle().await.expect("second run");
    let s = second.counters;
    assert!(
        s.events_in < 10_000,
        "the second run resumed from committed positions: {s:?}"
    );
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.late, 0, "{s:?}");
    let records = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let got = results(&records);
    assert_eq!(got, want);
    s
}

/// With input stopped, the idle timeout advances time by the wall clock so the last
/// window still closes (a 1 s window here so the test is quick).
pub async fn idle_input_still_closes_the_last_window(broker: &str) {
    let bed = Bed::new(
        broker,
        "idle",
        &[
            "window.size=1s",
            "window.grace=0s",
            "window.idle_timeout=300ms",
        ],
    );
    let now = weir_engine::time::now_millis();
    let data: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let mut ts = String::new();
            weir_engine::generate::write_seed_time(&mut ts, now, 0);
            format!(
                r#"{{"event_type":"click","user_id":"User{}","action":"a","timestamp":"{ts}"}}"#,
                i % 4
            )
            .into_bytes()
        })
        .collect();
    bed.produce(&data).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(bed.pipeline().await.shutdown_on(stop.clone()).run());
    let got = results_any_size(
        &bed.read(&bed.config.sink.topic, 4, Duration::from_secs(10))
            .await,
    );
    stop.cancel();
    let s = run.await.unwrap().expect("run").counters;
    assert_eq!(got.values().sum::<u64>(), 40, "{got:?} {s:?}");
    assert_eq!(got.len(), 4);
}

/// Started before its data: the pipeline waits three idle timeouts on empty partitions,
/// then 20,000 events arrive on every partition at once. Not one is late, every window is
/// exact: partitions that delivered nothing yet (or still hold a backlog) never let the
/// first partition read run ahead.
///
/// `keyed: false` produces the records without keys, so a (key, window) spans partitions
/// and they all share one event time.
pub async fn start_before_data_is_exact(broker: &str, keyed: bool) {
    let case = if keyed { "early" } else { "unkeyed" };
    let bed = Bed::new(broker, case, &["window.idle_timeout=2s"]);
    let data = lines(11, 20_000, 500, 0);
    let want = oracle(&data);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(bed.pipeline().await.shutdown_on(stop.clone()).run());
    tokio::time::sleep(Duration::from_secs(6)).await;
    if keyed {
        bed.produce(&data).await;
    } else {
        bed.produce_unkeyed(&data).await;
    }
    let records = bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(20))
        .await;
    stop.cancel();
    let s = run.await.unwrap().expect("run").counters;
    assert_eq!((s.late, s.dead_letters), (0, 0), "{s:?}");
    let got = results(&records);
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} windows missing; {s:?}",
        want.len()
    );
    assert_eq!(got, want);
}

/// One event dated 2100 among valid ones: it is a dead letter naming its time and the
/// limit, and cannot drag the watermark along, so every valid event is counted.
pub async fn a_future_event_cannot_stop_the_count(broker: &str) {
    let bed = Bed::new(broker, "future", &[]);
    let mut data = lines(5, 2_000, 20, 0);
    let want = oracle(&data);
    let future = br#"{"event_type":"click","user_id":"User1","action":"a","timestamp":"2100-01-01 00:00:00"}"#.to_vec();
    data.insert(10, future.clone());
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!((s.windowed, s.dead_letters, s.late), (2_000, 1, 0), "{s:?}");
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
    let dead = bed
        .read(&bed.config.dead_letter.topic, 1, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    let reason = v["error"].as_str().unwrap();
    assert!(
        reason.contains("2100-01-01T00:00:00Z")
            && reason.contains("max_future")
            && reason.contains("1h"),
        "{reason}"
    );
    assert_eq!(v["payload"].as_str().unwrap().as_bytes(), &future[..]);
}

fn results_any_size(records: &[Record]) -> HashMap<String, u64> {
    records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["user_id"].as_str().unwrap().to_string(),
                v["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// (group key values joined by `|`, window start, window end) -> (count, distinct values).
pub type Windows = HashMap<(String, i64, i64), (u64, u64)>;

fn event_ms(v: &serde_json::Value) -> i64 {
    chrono::NaiveDateTime::parse_from_str(v["timestamp"].as_str().unwrap(), "%Y-%m-%d %H:%M:%S%.f")
        .unwrap()
        .and_utc()
        .timestamp_millis()
}

fn rfc_ms(v: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

/// Final results as (key, start, end) -> (count, the named distinct aggregate).
fn windows_of(records: &[Record], keys: &[&str], distinct: &str) -> Windows {
    let mut w = Windows::new();
    for r in records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        if v["final"] == false {
            continue;
        }
        let key: Vec<&str> = keys.iter().map(|k| v[*k].as_str().unwrap()).collect();
        let k = (
            key.join("|"),
            rfc_ms(&v["window_start"]),
            rfc_ms(&v["window_end"]),
        );
        let val = (v["count"].as_u64().unwrap(), v[distinct].as_u64().unwrap());
        if let Some(prev) = w.insert(k.clone(), val) {
            assert_eq!(prev, val, "duplicate final results for {k:?} differ");
        }
    }
    w
}

/// `pipelines/page_views_hopping.toml`: 60 s windows every 10 s per (page, event type),
/// count and distinct users, against an oracle over the same events.
pub async fn hopping_windows_match_the_oracle(broker: &str) {
    let bed = Bed::with_file(
        &pipeline_named("page_views_hopping"),
        broker,
        "hopping",
        &[],
    );
    let data = lines(5, 6_000, 40, 0);
    let mut want: HashMap<(String, i64, i64), (u64, std::collections::HashSet<String>)> =
        HashMap::new();
    for l in &data {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        let t = event_ms(&v);
        let key = format!(
            "{}|{}",
            v["metadata"]["page"].as_str().unwrap(),
            v["event_type"].as_str().unwrap()
        );
        let mut start = t.div_euclid(10_000) * 10_000;
        while start > t - 60_000 {
            let e = want
                .entry((key.clone(), start, start + 60_000))
                .or_default();
            e.0 += 1;
            e.1.insert(v["user_id"].as_str().unwrap().to_string());
            start -= 10_000;
        }
    }
    let want: Windows = want
        .into_iter()
        .map(|(k, (n, users))| (k, (n, users.len() as u64)))
        .collect();
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!(
        (s.windowed, s.late, s.late_window_misses),
        (6_000, 0, 0),
        "{s:?}"
    );
    let records = bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
        .await;
    assert_eq!(
        windows_of(
            &records,
            &["metadata.page", "event_type"],
            "distinct_user_id"
        ),
        want
    );
}

/// `pipelines/user_sessions.toml`: per-user sessions with a 30 s gap, emitted in update
/// mode; the final results match an oracle, and updates never exceed their final count.
pub async fn session_windows_match_the_oracle(broker: &str) {
    let bed = Bed::with_file(&pipeline_named("user_sessions"), broker, "sessions", &[]);
    // Sparse: one event every 200 ms over 30 users, so a user's gaps often pass 30 s.
    let mut g = weir_engine::generate::EventGenerator::new(8, 30);
    let mut t =
        weir_engine::generate::Timeline::new(8, weir_engine::generate::DEFAULT_START_MS, 200, 500);
    let data: Vec<Vec<u8>> = (0..3_000)
        .map(|_| g.event(t.next_time()).into_bytes())
        .collect();
    let mut by_user: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for l in &data {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        by_user
            .entry(v["user_id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                event_ms(&v),
                v["metadata"]["page"].as_str().unwrap().to_string(),
            ));
    }
    let mut want = Windows::new();
    for (user, mut evs) in by_user {
        evs.sort();
        let mut i = 0;
        while i < evs.len() {
            let (start, mut end) = (evs[i].0, evs[i].0 + 30_000);
            let mut pages = std::collections::HashSet::new();
            let mut n = 0;
            while i < evs.len() && evs[i].0 < end {
                end = end.max(evs[i].0 + 30_000);
                pages.insert(evs[i].1.clone());
                n += 1;
                i += 1;
            }
            want.insert((user.clone(), start, end), (n, pages.len() as u64));
        }
    }
    assert!(
        want.len() > 30,
        "the dataset should split users into several sessions"
    );
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!((s.windowed, s.late), (3_000, 0), "{s:?}");
    let records = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let finals = windows_of(&records, &["user_id"], "distinct_page");
    assert_eq!(finals, want);
    let mut updates = 0;
    for r in &records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        if v["final"] == false {
            updates += 1;
            let user = v["user_id"].as_str().unwrap();
            let (start, count) = (rfc_ms(&v["window_start"]), v["count"].as_u64().unwrap());
            // An update belongs to a session that ends up containing it.
            assert!(
                want.iter().any(|((u, s, e), (n, _))| u == user
                    && *s <= start
                    && start < *e
                    && count <= *n),
                "update {v} matches no final session"
            );
        }
    }
    assert!(updates > 0, "update mode emits intermediate results");
}

impl Bed {
    /// The pipeline as `weir run` assembles it (retry topic, enrichment table and all), and
    /// the token that stops its background tasks.
    pub async fn assembled(&self) -> (Pipeline, tokio_util::sync::CancellationToken) {
        let parts = weir::assemble::Parts::open(
            &self.config,
            &self.backend,
            &weir::assemble::FileIo::default(),
            Default::default(),
        )
        .await
        .expect("open the pipeline's parts");
        let bg = parts.background.clone();
        (parts.into_pipeline(), bg)
    }

    /// Publishes raw lines to `topic`.
    pub async fn produce_to(&self, topic: &str, lines: &[Vec<u8>]) {
        let mut sink = self.backend.sink(topic).await.expect("sink");
        let batch: Vec<OutRecord> = lines
            .iter()
            .map(|l| OutRecord {
                key: user_of(l).map(|u| Bytes::from(u.into_bytes())),
                payload: Bytes::from(l.clone()),
                ..Default::default()
            })
            .collect();
        for chunk in batch.chunks(1000) {
            sink.send(chunk).await.expect("produce");
        }
    }
}

/// A bed for `pipelines/enriched_by_country.toml` with its own table and retry topics, and
/// `extra` overrides; returns it with the table topic's name.
fn enriched_bed(broker: &str, case: &str, extra: &[&str]) -> (Bed, String) {
    let id = format!(
        "{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let table = format!("conf-profiles-{id}");
    let mut sets = vec![
        format!("enrich.table={table}"),
        format!("retry.topic=conf-retry-{id}"),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let bed = Bed::with_file(&pipeline_named("enriched_by_country"), broker, case, &sets);
    (bed, table)
}

/// Polls the counters until `done` holds (at most 60 s).
async fn wait_for(
    metrics: &weir_engine::metrics::Metrics,
    done: impl Fn(&weir_engine::metrics::Snapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&metrics.snapshot()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            metrics.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The country of `UserN` in the enrichment tests.
fn country_of(user: &str) -> &'static str {
    let n: usize = user.trim_start_matches("User").parse().unwrap_or(0);
    ["NL", "DE", "FR", "JP", "BR"][n % 5]
}

fn profile(user: usize) -> Vec<u8> {
    format!(
        r#"{{"user_id": "User{user}", "country": "{}", "plan": "free"}}"#,
        country_of(&format!("User{user}"))
    )
    .into_bytes()
}

/// Enrichment that waits for its data (`pipelines/enriched_by_country.toml`): users 0–9
/// have profiles before the run, users 10–14 get theirs only after their events went to
/// the retry topic, users 15–19 never do. The first two groups are counted exactly per
/// country; the last goes to the dead letters after `max_attempts` with its history.
pub async fn enrichment_retries_until_profiles_arrive(broker: &str) {
    let (bed, table) = enriched_bed(
        broker,
        "enrich",
        &[
            "retry.initial=200ms",
            "retry.multiplier=1.5",
            "retry.max=1s",
            "retry.max_attempts=8",
            // Every window stays open until the run ends, so that whether a retried event
            // is counted does not depend on how fast this machine is.
            "window.size=1h",
            "window.grace=1h",
            "window.idle_timeout=10m",
        ],
    );
    // One event in 50 is invalid: those go to the dead letters at once, never retried.
    let data = lines(11, 3_000, 20, 50);
    // (country, hour) -> count: the oracle's per-user 10 s counts, regrouped.
    let mut want: HashMap<(String, i64), u64> = HashMap::new();
    let (mut never, mut valid) = (0, 0);
    for ((u, start), n) in oracle(&data) {
        valid += n;
        let n_user: usize = u.trim_start_matches("User").parse().unwrap();
        if n_user < 15 {
            let hour = start - start.rem_euclid(3_600_000);
            *want.entry((country_of(&u).to_string(), hour)).or_default() += n;
        } else {
            never += n;
        }
    }
    let invalid = data.len() as u64 - valid;
    assert!(never > 0 && invalid > 0 && want.len() >= 5);

    bed.produce_to(&table, &(0..10).map(profile).collect::<Vec<_>>())
        .await;
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.exit_when_idle(Duration::from_secs(3)).run());
    // The late profiles arrive once some events are waiting in the retry topic.
    wait_for(&metrics, |s| s.retried > 0).await;
    bed.produce_to(&table, &(10..15).map(profile).collect::<Vec<_>>())
        .await;
    let summary = run.await.unwrap().expect("run");
    background.cancel();
    let s = summary.counters;
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.windowed, want.values().sum::<u64>(), "{s:?}");
    assert_eq!((s.dead_letters, s.late), (never + invalid, 0), "{s:?}");
    assert!(s.retried >= never * 7, "{s:?}");

    let mut got: HashMap<(String, i64), u64> = HashMap::new();
    for r in bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let country = v["profile.country"]
            .as_str()
            .or(v["country"].as_str())
            .unwrap_or_else(|| panic!("no country in {v}"))
            .to_string();
        let count = v["count"].as_u64().unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        if let Some(prev) = got.insert((country, start), count) {
            assert_eq!(prev, count, "duplicate result with another count: {v}");
        }
    }
    assert_eq!(got, want);

    let dead = bed
        .read(
            &bed.config.dead_letter.topic,
            (never + invalid) as usize,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dead.len() as u64, never + invalid);
    let (gave_up, rest): (Vec<serde_json::Value>, Vec<serde_json::Value>) = dead
        .iter()
        .map(|d| serde_json::from_slice::<serde_json::Value>(&d.payload).unwrap())
        .partition(|e| e["attempts"].is_array());
    assert_eq!(gave_up.len() as u64, never);
    for e in &rest {
        assert!(!e["error"].as_str().unwrap().contains("gave up"), "{e}");
        // Invalid events are dead-lettered with their original payload, not enriched.
        assert!(!e["payload"].as_str().unwrap().contains("\"plan\""), "{e}");
    }
    for e in &gave_up {
        let why = e["error"].as_str().unwrap();
        assert!(why.starts_with("gave up after 8 attempts: "), "{e}");
        assert!(
            why.contains(&format!("no `{table}` entry for user_id User")),
            "{e}"
        );
        assert_eq!(e["attempts"].as_array().map(Vec::len), Some(8), "{e}");
        assert_eq!(e["attempts"][0]["stage"], "enrich");
        // Reported where it first came from, with its original payload.
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
        let original: serde_json::Value =
            serde_json::from_str(e["payload"].as_str().unwrap()).unwrap();
        let u = original["user_id"].as_str().unwrap();
        assert!(u.trim_start_matches("User").parse::<usize>().unwrap() >= 15);
    }
}

/// `[errors] validate = "fail"`: the first invalid event stops the run with an error and
/// nothing past it is committed; a restart with the strategy switched to dead letters
/// re-reads it (it is dead-lettered once) and the results are exact.
pub async fn fail_stops_and_a_restart_resumes_from_the_failing_record(broker: &str) {
    let bed = Bed::new(broker, "fail", &["errors.validate=fail"]);
    let mut data = lines(5, 2_000, 10, 0);
    let bad = br#"{"event_type":"click","user_id":"User1","action":"x","timestamp":"nope"}"#;
    data.insert(1_000, bad.to_vec());
    let want = oracle(&data);
    bed.produce(&data).await;
    let err = bed
        .run_until_idle()
        .await
        .expect_err("the invalid event stops the run");
    let msg = err.to_string();
    assert!(msg.contains("stage `validate` failed"), "{msg}");
    assert!(msg.contains("is not a timestamp"), "{msg}");

    let mut again = Bed {
        config: bed.config.clone(),
        backend: bed.backend.clone(),
        sets: bed.sets.clone(),
    };
    again.config.errors.clear();
    let summary = again.run_until_idle().await.expect("second run");
    let s = summary.counters;
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.dead_letters, 1, "{s:?}");
    let dead = bed
        .read(&bed.config.dead_letter.topic, 2, Duration::from_secs(3))
        .await;
    assert_eq!(dead.len(), 1, "the failing record was dead-lettered once");
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
}

/// A retried event keeps its own event time: once its profile arrives it is counted in its
/// window if that window is still open, and is late if the window closed meanwhile.
pub async fn retried_events_keep_their_event_time(broker: &str) {
    let (bed, table) = enriched_bed(
        broker,
        "retry-time",
        &[
            "retry.initial=200ms",
            "retry.max=500ms",
            "retry.max_attempts=1000",
            // One partition: User1's events move the watermark for User0's too.
            "brokers.memory.partitions=1",
            "window.grace=0s",
            "window.idle_timeout=10m",
        ],
    );
    let event = |user: &str, second: u32| {
        format!(
            r#"{{"event_type":"click","user_id":"{user}","action":"a","timestamp":"2024-06-27 15:00:{second:02}.000000"}}"#
        )
        .into_bytes()
    };
    // User0 (no profile yet): ten events in window :00–:10 and one in :50–:60. User1 moves
    // the watermark to :50, closing every window before :50.
    let mut data: Vec<Vec<u8>> = (0..10).map(|s| event("User0", s)).collect();
    data.push(event("User0", 55));
    data.extend((0..=50).map(|s| event("User1", s)));
    bed.produce_to(&table, &[profile(1)]).await;
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.exit_when_idle(Duration::from_secs(2)).run());
    wait_for(&metrics, |s| s.windowed >= 51 && s.retried >= 11).await;
    bed.produce_to(&table, &[profile(0)]).await;
    let s = run.await.unwrap().expect("run").counters;
    background.cancel();
    assert!(s.balanced(), "{s:?}");
    assert_eq!((s.windowed, s.late, s.dead_letters), (52, 10, 0), "{s:?}");
    let results = bed
        .read(&bed.config.sink.topic, 7, Duration::from_secs(3))
        .await;
    let nl: Vec<serde_json::Value> = results
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap())
        .filter(|v| v["profile.country"] == "NL")
        .collect();
    assert_eq!(nl.len(), 1, "{nl:?}");
    assert_eq!(nl[0]["window_start"], "2024-06-27T15:00:50Z");
    assert_eq!(nl[0]["count"], 1);
    let late = bed
        .read(&bed.config.dead_letter.topic, 10, Duration::from_secs(3))
        .await;
    assert_eq!(late.len(), 10);
    for r in &late {
        let e: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert!(
            e["error"].as_str().unwrap().starts_with("late event"),
            "{e}"
        );
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
    }
}

/// Records waiting in the retry topic survive a stop: their positions are not committed
/// while they wait, so the next run reads them again and counts them once.
pub async fn waiting_retries_survive_a_restart(broker: &str) {
    let (bed, table) = enriched_bed(
        broker,
        "retry-restart",
        &[
            "retry.initial=3s",
            "retry.max=3s",
            "window.size=1h",
            "window.grace=1h",
            "window.idle_timeout=10m",
        ],
    );
    let data = lines(21, 600, 5, 0);
    let mut want: HashMap<String, u64> = HashMap::new();
    for l in &data {
        *want
            .entry(country_of(&user_of(l).unwrap()).to_string())
            .or_default() += 1;
    }
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(pipeline.shutdown_on(stop.clone()).run());
    wait_for(&metrics, |s| s.retried >= data.len() as u64).await;
    stop.cancel();
    let first = run.await.unwrap().expect("first run").counters;
    background.cancel();
    assert_eq!(
        (first.windowed, first.retried),
        (0, data.len() as u64),
        "{first:?}"
    );

    bed.produce_to(&table, &(0..5).map(profile).collect::<Vec<_>>())
        .await;
    let (pipeline, background) = bed.assembled().await;
    let second = pipeline
        .exit_when_idle(Duration::from_secs(3))
        .run()
        .await
        .expect("second run")
        .counters;
    background.cancel();
    assert!(second.balanced(), "{second:?}");
    assert_eq!(
        (second.windowed, second.dead_letters, second.late),
        (data.len() as u64, 0, 0),
        "{second:?}"
    );
    let mut got: HashMap<String, u64> = HashMap::new();
    for r in bed
        // One result per country and hour; the data may start just before an hour.
        .read(
            &bed.config.sink.topic,
            2 * want.len(),
            Duration::from_secs(3),
        )
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let c = v["profile.country"].as_str().unwrap().to_string();
        *got.entry(c).or_default() += v["count"].as_u64().unwrap();
    }
    assert_eq!(got, want);
}
