//! The conformance suite on Kafka (the test bed's Tansu, or any Kafka at
//! WEIR_KAFKA_BOOTSTRAP), plus what only Kafka has: dead-letter headers, two pipeline
//! instances sharing one consumer group, and `[brokers.kafka]` checking.
//!
//! These tests need a running broker and fail (never skip) without one:
//! `scripts/brokers up kafka`.

mod conformance;

use std::time::Duration;

use bytes::Bytes;
use conformance::{oracle, results, Bed};
use weir_engine::record::{
    HEADER_ERROR, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};
use weir_engine::{OutRecord, StopReason};

conformance::suite!(kafka_suite: "kafka");

/// Panics with instructions unless the Kafka broker answers.
fn require_kafka() {
    conformance::brokers::require(conformance::brokers::get("kafka"));
}

/// A dead letter on Kafka keeps the original key and headers and adds the `weir.*`
/// headers naming the reason and the source record.
#[tokio::test]
async fn kafka_dead_letters_carry_key_and_headers() {
    require_kafka();
    let bed = Bed::new("kafka", "dlq-headers", &[]);
    let bad = OutRecord {
        key: Some(Bytes::from_static(b"User7")),
        payload: Bytes::from_static(b"{\"user_id\": \"User7\", "),
        headers: vec![("trace-id".into(), Bytes::from_static(b"abc-123"))],
        timestamp: None,
    };
    let mut sink = bed
        .backend
        .sink(&bed.config.source.topic)
        .await
        .expect("sink");
    weir_engine::Sink::send(&mut *sink, std::slice::from_ref(&bad))
        .await
        .expect("produce");
    let summary = bed.run_until_idle().await.expect("run");
    assert_eq!(summary.counters.dead_letters, 1, "{:?}", summary.counters);
    let dead = bed
        .read(&bed.config.dead_letter.topic, 1, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.key.as_deref(), Some(&b"User7"[..]));
    let header = |name: &str| {
        d.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| panic!("no header {name} in {:?}", d.headers))
    };
    assert_eq!(header("trace-id"), "abc-123");
    assert!(
        header(HEADER_ERROR).contains("invalid JSON"),
        "{}",
        header(HEADER_ERROR)
    );
    assert_eq!(header(HEADER_SOURCE_TOPIC), bed.config.source.topic);
    assert_eq!(
        header(HEADER_SOURCE_PARTITION).parse::<u32>().unwrap(),
        dead_source_partition(d)
    );
    assert_eq!(header(HEADER_SOURCE_OFFSET), "0");
    let env: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
    assert_eq!(env["payload"], "{\"user_id\": \"User7\", ");
    assert!(d.timestamp.is_some(), "records carry the broker timestamp");
}

fn dead_source_partition(d: &weir_engine::Record) -> u32 {
    let env: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
    env["source"]["partition"].as_u64().unwrap() as u32
}

/// Two pipeline instances in one consumer group split the partitions between them and
/// together produce exactly the oracle's results (records are keyed by user, so each
/// (user, window) lives in one partition).
#[tokio::test]
async fn kafka_two_instances_share_one_group() {
    require_kafka();
    // A long idle timeout: partitions that waited for data must still hold the watermark
    // when it arrives, or one partition's burst would make the other's records late.
    let bed = Bed::new(
        "kafka",
        "group",
        &["source.commit_interval=200ms", "window.idle_timeout=60s"],
    );
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(5, 20_000, 40, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    // Both instances join first, so that each owns some partitions when data arrives.
    let idle = Duration::from_secs(12);
    let a = tokio::spawn(bed.pipeline().await.exit_when_idle(idle).run());
    let b = tokio::spawn(bed.pipeline().await.exit_when_idle(idle).run());
    tokio::time::sleep(Duration::from_secs(8)).await;
    bed.produce(&data).await;
    let a = a.await.unwrap().expect("instance a");
    let b = b.await.unwrap().expect("instance b");
    for s in [&a, &b] {
        assert_eq!(s.reason, StopReason::Idle);
        assert!(s.counters.balanced(), "{:?}", s.counters);
        assert!(
            s.counters.events_in > 0,
            "both instances got partitions: {:?} {:?}",
            a.counters,
            b.counters
        );
        assert_eq!(s.counters.late, 0, "{:?}", s.counters);
    }
    let counted = a.counters.windowed + b.counters.windowed;
    assert!(
        counted >= 20_000,
        "every event counted at least once: {counted}"
    );
    let got = results(
        &bed.read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(4))
            .await,
    );
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// A mistake in `[brokers.kafka]` is reported at its file:line:col, and so is a librdkafka
/// property librdkafka does not know, also inside the file a pipeline includes.
#[test]
fn kafka_bad_config_is_reported_at_its_location() {
    let text = conformance::shipped_brokers();
    let text = text.replace(
        "[brokers.kafka]\n",
        "[brokers.kafka]\nbootstrap_server = \"localhost:9092\"\n",
    );
    let text = text.replace(
        "[brokers.kafka.producer]     # librdkafka producer properties, passed through\n",
        "[brokers.kafka.producer]\n\"linger.msec\" = \"5\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let overrides = weir_engine::config::Overrides {
        sets: vec![],
        broker: Some(("kafka".into(), "--broker kafka".into())),
    };
    let err = weir::Backend::load(&path, &overrides)
        .expect_err("bad config must fail")
        .to_string();
    let file = included.display().to_string();
    assert!(
        err.contains(&format!("{file}:{}:1: brokers.kafka.bootstrap_server: unknown key (did you mean `bootstrap_servers`?)", line_of("bootstrap_server "))),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:{}:1: brokers.kafka.producer.\"linger.msec\": librdkafka rejects",
            line_of("\"linger.msec\"")
        )),
        "{err}"
    );
}

/// Adds `key = value` to the shipped brokers file's `[brokers.kafka.TABLE]` (`producer` or
/// `consumer`), runs `weir validate --broker kafka` on a pipeline including it and checks
/// that it exits 2 with `message` at that line of that file.
fn refused_at_its_line(table: &str, key: &str, value: &str, message: &str) {
    let header = format!("[brokers.kafka.{table}]");
    let text = conformance::shipped_brokers().replace(
        &format!("{header}     # librdkafka {table} properties, passed through\n"),
        &format!("{header}\n\"{key}\" = \"{value}\"\n"),
    );
    assert!(text.contains(value));
    let dir = tempfile::tempdir().unwrap();
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let line = text
        .lines()
        .position(|l| l.starts_with(&format!("\"{key}\"")))
        .unwrap()
        + 1;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["validate", path.to_str().unwrap(), "--broker", "kafka"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!(
        "{}:{line}:1: brokers.kafka.{table}.\"{key}\": {message}",
        included.display()
    );
    assert!(err.contains(&want), "{err}\nwanted: {want}");
}

/// Kafka 4's consumer group protocol (KIP-848, `group.protocol = "consumer"`): the broker
/// assigns partitions incrementally. Three instances split the work, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_protocol_instances_split_the_work() {
    require_kafka();
    conformance::instances_split_the_work_with("kafka", &[KIP_848]).await;
}

/// KIP-848: one of two instances killed mid-input; the survivor is given its partitions
/// as an increment beside those it keeps, and finishes them exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_protocol_a_killed_instance_is_taken_over() {
    require_kafka();
    conformance::a_killed_instance_is_taken_over_with("kafka", &[KIP_848]).await;
}

/// KIP-848: a second instance joins one that reads unkeyed input; the first loses
/// partitions as an increment (a revocation of some while it keeps others) and stops with
/// an error; the second gets them all and finishes, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_protocol_unkeyed_input_meets_a_second_instance() {
    require_kafka();
    conformance::unkeyed_input_meets_a_second_instance_with("kafka", &[KIP_848]).await;
}

/// Kafka 4's consumer group protocol for `--set`.
const KIP_848: &str = "brokers.kafka.consumer.group.protocol=consumer";

/// Exactly-once needs eager rebalances (a revocation aborts the one transaction, which
/// also holds the outputs of the partitions an incremental rebalance keeps): the run
/// stops at start saying what to change.
#[tokio::test]
async fn kafka_exactly_once_with_incremental_rebalances_is_refused_at_start() {
    require_kafka();
    for set in [
        KIP_848,
        "brokers.kafka.consumer.partition.assignment.strategy=cooperative-sticky",
    ] {
        let bed = Bed::new(
            "kafka",
            "eos-incremental",
            &[set, "pipeline.guarantee=exactly_once"],
        );
        let source = bed
            .backend
            .source(&bed.config.source.topic, Some(&bed.config.source.group))
            .await;
        let text = source.err().expect("refused").to_string();
        assert!(
            text.contains("needs eager rebalances") && text.contains("group.protocol"),
            "{set}: {text}"
        );
    }
}

/// `transactional.id` in `[brokers.kafka.producer]` is a configuration error naming the key
/// and what to set instead (exit 2 from `weir validate`), not a producer that retries
/// "Erroneous state" forever.
#[test]
fn kafka_transactional_id_is_a_config_error() {
    refused_at_its_line(
        "producer",
        "transactional.id",
        "weir-1",
        "cannot be set here: Weir chooses the transactional id itself, one per instance, when `[pipeline] guarantee = \"exactly_once\"`",
    );
}

/// Exactly-once: a pipeline's results and dead letters are written as it goes but stay
/// invisible to read_committed readers until its commit (here only the last one: the
/// commit interval is an hour), then every window and every dead letter is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_exactly_once_outputs_become_visible_at_the_commit() {
    require_kafka();
    let bed = Bed::new(
        "kafka",
        "eos-visible",
        &[
            "pipeline.guarantee=exactly_once",
            "source.commit_interval=1h",
            "brokers.kafka.consumer.isolation.level=read_committed",
        ],
    );
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(41, 6_000, 40, 29)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    let invalid = data
        .iter()
        .filter(|l| oracle(std::slice::from_ref(*l)).is_empty())
        .count();
    assert!(invalid > 0 && want.len() > 100);
    bed.produce(&data).await;
    let mut input = bed.backend.transaction().expect("an exactly-once backend");
    input.commit().await.expect("input committed");

    let stop = tokio_util::sync::CancellationToken::new();
    let pipeline = bed
        .pipeline()
        .await
        .transactional(bed.backend.transaction().unwrap())
        .shutdown_on(stop.clone());
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.run());
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let c = metrics.snapshot();
        if c.results_out as usize >= want.len() && c.dead_letters as usize >= invalid {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outputs not produced: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (sink, dlq) = (&bed.config.sink.topic, &bed.config.dead_letter.topic);
    let early = bed.read(sink, 1, Duration::from_secs(3)).await;
    assert!(
        early.is_empty(),
        "{} results visible to read_committed before the commit",
        early.len()
    );
    assert!(bed.read(dlq, 1, Duration::from_secs(2)).await.is_empty());
    // They were written: a reader of uncommitted records sees them.
    let raw = Bed::new(
        "kafka",
        "eos-visible-raw",
        &[
            &format!("sink.topic={sink}"),
            "brokers.kafka.consumer.isolation.level=read_uncommitted",
        ],
    );
    let uncommitted = raw.read(sink, want.len(), Duration::from_secs(5)).await;
    assert_eq!(uncommitted.len(), want.len());
    // `weir tail`: committed records only for an exactly-once pipeline or with
    // --read-committed, every record written otherwise.
    let tail = |exactly_once: bool, flag: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.arg("tail").arg(conformance::pipeline_file()).args([
            "--broker",
            "kafka",
            "--from-beginning",
            "--idle-exit",
            "3s",
        ]);
        for set in &bed.sets {
            let eos = set.starts_with("pipeline.guarantee");
            if (exactly_once || !eos) && !set.contains("isolation.level") {
                cmd.arg("--set").arg(set);
            }
        }
        if flag {
            cmd.arg("--read-committed");
        }
        let out = cmd.output().expect("weir tail");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
    };
    assert_eq!(
        tail(false, false),
        want.len(),
        "at-least-once tail: every record"
    );
    assert_eq!(
        tail(false, true),
        0,
        "--read-committed: nothing committed yet"
    );
    assert_eq!(
        tail(true, false),
        0,
        "exactly-once pipeline's tail: nothing committed yet"
    );

    stop.cancel();
    let summary = run.await.unwrap().expect("run");
    assert_eq!(summary.reason, StopReason::Shutdown);
    let records = bed.read(sink, want.len(), Duration::from_secs(5)).await;
    assert_eq!(results(&records), want);
    assert_eq!(records.len(), want.len(), "each window once");
    let dead = bed.read(dlq, invalid, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), invalid, "each invalid event dead-lettered once");
}

/// The checkpoint topic (`brokers.kafka.checkpoint_topic`) is the fallback for brokers that
/// keep committed offsets but drop their metadata (Tansu's memory storage does). Apache
/// Kafka keeps it, so this test drops it itself: between the crash and the restart, a
/// plain consumer of the group commits the same offsets with empty metadata. The restart
/// must still find each partition's checkpoint (in the topic) and emit every window once,
/// with its exact count.
#[tokio::test]
async fn kafka_checkpoint_topic_restores_what_commit_metadata_lost() {
    require_kafka();
    let topic_of_checkpoints = format!("ckpt-{}", std::process::id());
    let set = format!("brokers.kafka.checkpoint_topic={topic_of_checkpoints}");
    conformance::restart_loses_nothing_after("kafka", &[&set], &strip_commit_metadata).await;
}

/// Commits the group's committed offsets again with empty metadata, and checks they now
/// carry none.
fn strip_commit_metadata(bed: &Bed) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let bootstrap =
        std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &bed.config.source.group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topic = &bed.config.source.topic;
    let mut all = TopicPartitionList::new();
    for p in 0..4 {
        all.add_partition(topic, p);
    }
    let t = Duration::from_secs(10);
    let committed = consumer
        .committed_offsets(all.clone(), t)
        .expect("committed");
    let mut stripped = TopicPartitionList::new();
    let mut with_metadata = 0;
    for e in committed.elements() {
        if let Offset::Offset(o) = e.offset() {
            with_metadata += usize::from(!e.metadata().is_empty());
            stripped
                .add_partition_offset(topic, e.partition(), Offset::Offset(o))
                .unwrap();
        }
    }
    assert!(
        with_metadata > 0,
        "the first run committed checkpoints in the metadata: {committed:?}"
    );
    // The crashed run's member may still be leaving the group: retry a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = consumer.commit(&stripped, CommitMode::Sync) {
        assert!(std::time::Instant::now() < deadline, "commit: {e}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let now = consumer.committed_offsets(all, t).expect("committed");
    assert!(
        now.elements().iter().all(|e| e.metadata().is_empty()),
        "metadata stripped: {now:?}"
    );
}

/// Partitions added to a live topic move keys to other partitions: a key's windows open
/// across the change would be counted in pieces. The pipeline that committed checkpoints
/// under 2 partitions stops at once with an error saying so when the topic has 4, and
/// emits nothing; a topic whose count did not change runs as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_partitions_added_to_the_topic_stop_the_pipeline_with_a_clear_error() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::ClientConfig;

    conformance::init_logs();
    let bed = Bed::new("kafka", "grown", &["brokers.kafka.partitions=2"]);
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(43, 4_000, 50, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let (first, second) = data.split_at(2_000);
    bed.produce(first).await;
    let summary = bed.run_until_idle().await.expect("first run");
    assert_eq!(summary.counters.events_in, 2_000);
    // The same count again: runs on.
    bed.produce(&second[..10]).await;
    bed.run_until_idle()
        .await
        .expect("a run on the same partitions");
    let sink = bed.config.sink.topic.clone();
    let emitted = bed
        .read(&sink, usize::MAX, Duration::from_secs(3))
        .await
        .len();
    assert!(emitted > 0);

    let bootstrap =
        std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin client");
    let grown = admin
        .create_partitions(
            &[NewPartitions::new(&bed.config.source.topic, 4)],
            &AdminOptions::new(),
        )
        .await
        .expect("create partitions");
    assert!(grown.iter().all(Result::is_ok), "{grown:?}");
    bed.produce(&second[10..]).await;
    let err = bed
        .run_until_idle()
        .await
        .expect_err("a run after the topic grew stops");
    let msg = err.to_string();
    assert!(!err.is_retryable(), "{msg}");
    assert!(
        msg.contains("has 4 partitions") && msg.contains("when it had 2"),
        "{msg}"
    );
    // Nothing emitted by the run that stopped.
    let after = bed
        .read(&sink, usize::MAX, Duration::from_secs(3))
        .await
        .len();
    assert_eq!(after, emitted);
}
