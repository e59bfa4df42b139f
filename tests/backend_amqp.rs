//! The conformance suite on RabbitMQ, plus what only RabbitMQ has: a broker restart in the
//! middle of a run, and `[brokers.amqp]` checking. Needs a running RabbitMQ
//! (`scripts/brokers up amqp`; URL from WEIR_AMQP_URL, default loopback guest/guest):
//! these tests fail, never skip, when it is down.
#![cfg(feature = "amqp")]

mod amqp;
mod conformance;

use std::time::Duration;

use weir_engine::config::Overrides;
use weir_engine::StopReason;

fn url() -> String {
    std::env::var("WEIR_AMQP_URL").unwrap_or_else(|_| weir_amqp::DEFAULT_URL.to_string())
}

conformance::suite!(amqp_suite: "amqp");

/// The broker-restart test takes RabbitMQ away: it holds this for writing, every other
/// test that talks to RabbitMQ (the conformance suite's too) holds it for reading.
use conformance::EXCLUSIVE as BROKER;

/// Panics with the way out when RabbitMQ is not there. Also shows the engine's log lines
/// (`WEIR_LOG=info cargo test ... -- --nocapture`).
async fn require_rabbitmq() {
    conformance::init_logs();
    let url = url();
    if let Err(e) = weir_amqp::ping(&url).await {
        panic!(
            "{e}: run scripts/brokers up amqp (RabbitMQ at {})",
            weir_amqp::redact(&url)
        );
    }
}

#[test]
fn a_bad_amqp_key_is_reported_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = conformance::shipped_brokers().replace(
        "prefetch = 10000",
        "prefetch = 10000\nprefech = 5\nqueue_type_ = \"quorum\"",
    );
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let line = text.lines().position(|l| l.starts_with("prefech")).unwrap() + 1;
    let err =
        weir::Backend::load(&path, &Overrides::default()).expect_err("unknown keys are rejected");
    let msg = err.to_string();
    let want = format!(
        "{}:{line}:1: brokers.amqp.prefech: unknown key (did you mean `prefetch`?)",
        included.display()
    );
    assert!(msg.contains(&want), "{msg}");
    assert!(
        msg.contains(&format!(
            "{}:{}:1: brokers.amqp.queue_type_",
            included.display(),
            line + 1
        )),
        "{msg}"
    );
    assert!(msg.contains("2 problems"), "{msg}");
}

/// RabbitMQ is stopped (`rabbitmqctl stop_app`) and started again while a pipeline runs:
/// source and sinks reconnect, nothing is lost, and the distinct results are exactly the
/// oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_restart_mid_stream_loses_nothing() {
    let _alone = BROKER.write().await;
    require_rabbitmq().await;
    let bed = conformance::Bed::new(
        "amqp",
        "rabbit-restart",
        &["source.batch_size=200", "source.commit_interval=100ms"],
    );
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(5, 30_000, 40, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = conformance::oracle(&data);
    bed.produce(&data).await;
    let pipeline = bed.pipeline().await.exit_when_idle(Duration::from_secs(8));
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.run());
    // Let it get going, then take the broker away mid-stream.
    let t0 = std::time::Instant::now();
    while metrics.snapshot().events_in < 3_000 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the pipeline did not start consuming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = metrics.snapshot();
    let started_again = StartAppOnDrop;
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(started_again);
    let summary = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the pipeline finished after the broker came back")
        .unwrap()
        .expect("run");
    assert_eq!(summary.reason, StopReason::Idle);
    let s = summary.counters;
    assert!(
        before.events_in < 30_000,
        "the restart happened mid-stream: {before:?}"
    );
    assert!(
        s.events_in >= 30_000,
        "every record was received at least once: {s:?}"
    );
    assert!(s.balanced(), "{s:?}");
    // Records redelivered after the reconnect are a replay, not late events.
    assert_eq!(s.late, 0, "{s:?}");
    let records = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let got = conformance::results(&records);
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// Starts the RabbitMQ application again when dropped, also when the test panics: the
/// machine's broker is never left stopped.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Best effort; a second panic would abort.
            for args in [["start_app"], ["await_startup"]] {
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(args)
                    .env("PATH", sbin_path())
                    .status();
            }
        } else {
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup"]);
        }
    }
}

/// PATH plus the sbin folders `rabbitmqctl` lives in.
fn sbin_path() -> String {
    format!(
        "{}:/usr/local/sbin:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `rabbitmqctl ARGS` (it lives in /usr/sbin) and asserts it succeeded.
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .env("PATH", sbin_path())
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The oracle's counts on quorum queues and on streams, switching only `queue_type`; on a
/// stream, a crash and restart resumes from the stream offset committed with the
/// checkpoint.
async fn counts_on(queue_type: &str, partitions: u32) {
    let _shared = BROKER.read().await;
    require_rabbitmq().await;
    let qt = format!("brokers.amqp.queue_type={queue_type}");
    let parts = format!("brokers.amqp.partitions={partitions}");
    let bed = conformance::Bed::new(
        "amqp",
        &format!("qt-{queue_type}"),
        &[
            &qt,
            &parts,
            "source.commit_interval=0s",
            "source.batch_size=500",
        ],
    );
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(11, 6_000, 20, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = conformance::oracle(&data);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.late),
        (6_000, 6_000, 0),
        "{s:?}"
    );
    let got = conformance::results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
    // Everything was committed: a new run finds nothing left to do.
    let again = bed
        .pipeline()
        .await
        .exit_when_idle(Duration::from_secs(1))
        .run()
        .await
        .expect("run");
    assert_eq!(again.counters.events_in, 0, "{:?}", again.counters);
    // Streams do not expire like the other test queues: delete them.
    let c = &bed.config;
    delete_queues(
        &[&c.source.topic, &c.sink.topic, &c.dead_letter.topic],
        partitions,
    )
    .await;
}

/// Deletes the queues of these topics (split into `partitions`) and their checkpoint
/// queues.
async fn delete_queues(topics: &[&str], partitions: u32) {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let queues = topics
        .iter()
        .flat_map(|t| (0..partitions).map(|p| weir_amqp::partition_queue(t, p, partitions)));
    for t in queues {
        for q in [t.to_string(), weir_amqp::checkpoint_queue(&t)] {
            ch.queue_delete(q.as_str().into(), Default::default())
                .await
                .expect("queue.delete");
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn amqp_quorum_queues_count_like_the_oracle() {
    counts_on("quorum", 1).await;
}

#[tokio::test]
async fn amqp_streams_count_like_the_oracle_and_resume_from_the_committed_offset() {
    counts_on("stream", 1).await;
}

/// The same with each topic split into four streams (`partitions = 4`).
#[tokio::test]
async fn amqp_partitioned_streams_count_like_the_oracle_and_resume() {
    counts_on("stream", 4).await;
}

/// The TTL retry topology helper (the engine's `[retry]` topic does not need it): a record sent to the retry
/// queue comes back into the source queue after the delay, with its headers (an attempt
/// counter) and RabbitMQ's `x-death` count.
#[tokio::test]
async fn amqp_retry_queue_requeues_after_the_delay() {
    let _shared = BROKER.read().await;
    require_rabbitmq().await;
    let bed = conformance::Bed::new("amqp", "retry", &[]);
    let Some(amqp) = bed.backend.get::<weir_amqp::AmqpBroker>() else {
        unreachable!()
    };
    let topic = &bed.config.source.topic;
    let mut retry = amqp
        .retry_sink(topic, Duration::from_millis(300))
        .await
        .expect("retry sink");
    let sent = std::time::Instant::now();
    weir_engine::Sink::send(
        &mut retry,
        &[weir_engine::OutRecord {
            key: Some("User1".into()),
            payload: "{}".into(),
            headers: vec![("weir.attempt".into(), "1".into())],
            timestamp: None,
        }],
    )
    .await
    .expect("send");
    let got = bed.read(topic, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(sent.elapsed() >= Duration::from_millis(300));
    let r = &got[0];
    assert_eq!(r.key.as_deref(), Some(&b"User1"[..]));
    let header = |n: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("weir.attempt").as_deref(), Some(&b"1"[..]));
    assert!(header("x-death").is_some(), "{:?}", r.headers);
}

/// `weir tail`'s reader on RabbitMQ: it sees new records without taking them from the
/// topic's queue; from the beginning it reads stream queues and refuses classic ones.
#[tokio::test]
async fn amqp_tail_reader_takes_nothing_from_the_queue() {
    let _shared = BROKER.read().await;
    require_rabbitmq().await;
    let bed = conformance::Bed::new("amqp", "tail", &[]);
    let topic = bed.config.sink.topic.clone();
    let err = bed
        .backend
        .reader(&topic, true)
        .await
        .err()
        .expect("classic queues cannot be read from the beginning");
    assert!(
        err.to_string()
            .contains("cannot be read from the beginning"),
        "{err}"
    );
    let mut tail = bed
        .backend
        .reader(&topic, false)
        .await
        .unwrap()
        .expect("a reader");
    let lines: Vec<Vec<u8>> = (0..50)
        .map(|i| format!(r#"{{"user_id":"User{i}","n":{i}}}"#).into_bytes())
        .collect();
    bed.produce_to(&topic, &lines).await;
    assert_eq!(payloads(&tail_records(&mut tail, lines.len()).await), lines);
    // Every record is still in the queue for its consumers.
    let kept = bed.read(&topic, lines.len(), Duration::from_secs(3)).await;
    assert_eq!(kept.len(), lines.len());

    let streams = conformance::Bed::new("amqp", "tail-stream", &["brokers.amqp.queue_type=stream"]);
    let topic = streams.config.sink.topic.clone();
    streams.produce_to(&topic, &lines).await;
    let mut from_start = streams
        .backend
        .reader(&topic, true)
        .await
        .unwrap()
        .expect("a stream reader");
    let seen = tail_records(&mut from_start, lines.len()).await;
    assert_eq!(payloads(&seen), lines);
}

/// What a tail reader shows, until `n` records came (or 20 s passed).
async fn tail_records(
    tail: &mut Box<dyn weir_engine::Source>,
    n: usize,
) -> Vec<weir_engine::Record> {
    let mut seen = Vec::new();
    let t0 = std::time::Instant::now();
    while seen.len() < n && t0.elapsed() < Duration::from_secs(20) {
        if let weir_engine::Received::Batch(b) =
            tail.recv(100, Duration::from_millis(200)).await.unwrap()
        {
            seen.extend(b);
        }
    }
    seen
}

fn payloads(records: &[weir_engine::Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.payload.to_vec()).collect()
}
