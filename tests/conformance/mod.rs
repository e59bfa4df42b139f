//! The conformance suite: the same datasets, the same shipped pipelines and the same
//! expected results on every backend; only the broker is switched. Each scenario is one
//! `pub async fn NAME(broker: &str)`; [`suite!`] makes a test of every scenario for a
//! backend, so no backend can leave one out, and what a backend cannot do is said in one
//! place, [`brokers::TestBroker::cannot`], with the reason (its test then checks that it
//! does fail). `tests/backend_NAME.rs` calls `conformance::suite!` and adds the tests only
//! that backend has.
//!
//! Expected results come from oracles written independently of the engine: serde_json
//! values, chrono's parser, a HashMap of counts.

#![allow(dead_code)]

pub mod brokers;
mod instances;
mod oracles;
mod pipelines;
mod repartition;
mod retries;
mod scale;
mod sinks;
#[path = "../stores/mod.rs"]
pub mod stores;
/// Standard third-party clients (confluent-kafka, pika, boto3) from the test venv.
#[path = "../thirdparty/mod.rs"]
pub mod thirdparty;
mod tumbling;
mod windows;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use weir::Backend;
use weir_engine::config::{Overrides, PipelineConfig};
use weir_engine::{Job, OutRecord, Pipeline, Received, Record};

// Each test file uses some of these.
#[allow(unused_imports)]
pub use oracles::*;
#[allow(unused_imports)]
pub use pipelines::shipped_pipelines_run_with_broker_alone;
#[allow(unused_imports)]
pub use repartition::*;
#[allow(unused_imports)]
pub use retries::*;
#[allow(unused_imports)]
pub use scale::*;
#[allow(unused_imports)]
pub use sinks::*;
#[allow(unused_imports)]
pub use tumbling::*;
#[allow(unused_imports)]
pub use windows::*;

/// Makes `mod $module` with one test per conformance scenario on backend `$broker`, in the
/// manner of tokio's `rt_test!`: the scenario list is here once, for every backend.
#[allow(unused_macros)]
macro_rules! suite {
    ($module:ident : $broker:literal) => {
        mod $module {
            $crate::conformance::suite!(@tests $broker;
                counts_match_the_oracle,
                postgres_holds_the_results,
                bad_input_goes_to_dead_letters,
                restart_loses_nothing,
                idle_input_still_closes_the_last_window,
                start_before_data_is_exact,
                start_before_unkeyed_data_is_exact,
                a_future_event_cannot_stop_the_count,
                hopping_windows_match_the_oracle,
                session_windows_in_update_mode_match_the_oracle,
                late_events_go_to_the_late_topic,
                enrichment_retries_until_profiles_arrive,
                fail_stops_and_a_restart_resumes_from_the_failing_record,
                retried_events_keep_their_event_time,
                waiting_retries_survive_a_restart,
                shipped_pipelines_run_with_broker_alone,
                instances_split_the_work,
                a_killed_instance_is_taken_over,
                unkeyed_input_meets_a_second_instance,
                repartitioned_instances_split_unkeyed_input,
                repartitioned_input_survives_a_kill,
                repartitioned_instance_killed_during_a_join,
                repartition_waits_for_a_lagging_partition,
                repartition_in_one_process,
            );
        }
    };
    (@tests $broker:literal; $($scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                $crate::conformance::run($broker, stringify!($scenario), |b| {
                    Box::pin($crate::conformance::$scenario(b))
                });
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use suite;

/// A scenario's future, made by the [`suite!`] test from the backend's name.
pub type ScenarioFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Runs `scenario` (named `name`) on `broker`: checks that its broker answers, runs it on
/// the backend's runtime and cleans up after it. A scenario the backend cannot do must
/// fail.
pub fn run(broker: &str, name: &str, scenario: impl FnOnce(&'static str) -> ScenarioFuture) {
    let b = brokers::get(broker);
    init_logs();
    brokers::require(b);
    let mut rt = if b.multi_thread() {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(2);
        rt
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = rt.enable_all().build().expect("runtime");
    let cannot = b.cannot().iter().find(|c| c.scenario == name);
    rt.block_on(async {
        let outcome = CatchUnwind(scenario(b.name())).await;
        b.clean_up(&take_bed_ids()).await;
        match (outcome, cannot) {
            (Ok(()), None) => {}
            (Err(panic), None) => std::panic::resume_unwind(panic),
            (Err(panic), Some(c)) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                assert!(
                    msg.contains(c.fails_with),
                    "{name} on {broker} was to fail with {:?} ({}), but failed with: {msg}",
                    c.fails_with,
                    c.why
                );
            }
            (Ok(()), Some(c)) => panic!(
                "{name} passed on {broker}, which the test bed says cannot do it ({}): \
                 remove that entry from tests/conformance/brokers.rs",
                c.why
            ),
        }
    });
}

/// A scenario's outcome: its panic, if it panicked.
struct CatchUnwind(ScenarioFuture);

impl std::future::Future for CatchUnwind {
    type Output = std::thread::Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(())) => std::task::Poll::Ready(Ok(())),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Shows the engine's log lines of a failing test (`WEIR_LOG=info`; warnings otherwise).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

thread_local! {
    /// The ids of the beds this thread's test made, for [`TestBroker::clean_up`].
    static BED_IDS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The prefixes of the topics beds make: `PREFIX` + the bed's id.
pub const TOPIC_PREFIXES: [&str; 6] = [
    "conf-in-",
    "conf-out-",
    "conf-dlq-",
    "conf-late-",
    "conf-retry-",
    "conf-profiles-",
];

/// The ids of the beds this thread's test made since the last call.
pub fn take_bed_ids() -> Vec<String> {
    BED_IDS.with(|ids| std::mem::take(&mut *ids.borrow_mut()))
}

static RUN: AtomicUsize = AtomicUsize::new(0);

/// A name part no other bed (of this or another run) has: `case-PID-N-TIME`. Remembered
/// for the test's clean-up.
pub fn unique_id(case: &str) -> String {
    let id = format!(
        "{case}-{}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed),
        weir_engine::time::now_millis() % 1_000_000_000
    );
    BED_IDS.with(|ids| ids.borrow_mut().push(id.clone()));
    id
}

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

/// Loads `file` with `--broker broker` and `sets`.
fn load(file: &Path, broker: &str, sets: &[String]) -> (PipelineConfig, Backend) {
    let overrides = Overrides {
        sets: sets.to_vec(),
        broker: Some((broker.to_string(), format!("--broker {broker}"))),
    };
    Backend::load(file, &overrides).unwrap_or_else(|e| panic!("{e}"))
}

/// A backend under test, with topic names of its own so runs never see each other's data.
pub struct Bed {
    pub config: PipelineConfig,
    pub backend: Backend,
    /// The `--set` overrides that made this bed (for `weir` processes of the same bed).
    pub sets: Vec<String>,
}

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
        let id = unique_id(case);
        let mut sets = vec![
            format!("source.topic=conf-in-{id}"),
            format!("source.group=conf-group-{id}"),
            format!("dead_letter.topic=conf-dlq-{id}"),
        ];
        // A pipeline whose results go to a store (`[sink] type = "postgres"`) has no topic.
        if load(file, broker, &[]).0.sink_store.is_none() {
            sets.push(format!("sink.topic=conf-out-{id}"));
        }
        let tb = brokers::get(broker);
        // Brokers run elsewhere (e.g. docker/compose.yml) are found through the environment.
        if let Some(a) = tb.address() {
            if let Ok(value) = std::env::var(a.env) {
                sets.push(format!("{}={value}", a.key));
            }
        }
        sets.extend(tb.sets(&id, &brokers::BedOptions { expiring }));
        if let weir_engine::config::LatePolicy::Output(_) = load(file, broker, &[]).0.late {
            sets.push(format!("late.topic=conf-late-{id}"));
        }
        sets.extend(extra.iter().map(|s| s.to_string()));
        let (config, backend) = load(file, broker, &sets);
        assert_eq!(config.broker, broker);
        Bed {
            config,
            backend,
            sets,
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

    /// Publishes `(key, payload)` records to the source topic.
    pub async fn produce_keyed(&self, records: &[(&str, Vec<u8>)]) {
        let mut sink = self
            .backend
            .sink(&self.config.source.topic)
            .await
            .expect("sink");
        let batch: Vec<OutRecord> = records
            .iter()
            .map(|(k, l)| OutRecord {
                key: Some(Bytes::copy_from_slice(k.as_bytes())),
                payload: Bytes::from(l.clone()),
                ..Default::default()
            })
            .collect();
        sink.send(&batch).await.expect("produce");
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
