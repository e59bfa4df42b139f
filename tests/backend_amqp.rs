//! The conformance suite on RabbitMQ, plus what only RabbitMQ has: a broker restart in the
//! middle of a run (on a node of the test's own), and `[brokers.amqp]` checking. Needs a running RabbitMQ
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

/// RabbitMQ is stopped and started again while a pipeline runs: a node of this test's own
/// (stopping the machine's node would break every other test and checkout using it),
/// stopped with SIGTERM mid-stream and started again on the same state. Source and sinks
/// reconnect, nothing is lost, and the distinct results are exactly the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_restart_mid_stream_loses_nothing() {
    conformance::init_logs();
    let mut rabbit = PrivateRabbit::start();
    let url = format!("brokers.amqp.url={}", rabbit.url());
    let bed = conformance::Bed::new(
        "amqp",
        "rabbit-restart",
        &[
            &url,
            "source.batch_size=200",
            "source.commit_interval=100ms",
        ],
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
    let _rabbit = tokio::task::spawn_blocking(move || {
        rabbit.stop();
        std::thread::sleep(Duration::from_secs(1));
        rabbit.start_again();
        rabbit
    })
    .await
    .unwrap();
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

/// A peer that accepts the TCP connection and then answers nothing (a node still booting,
/// or one gone without a reset): connecting fails after `BROKER_TIMEOUT` (30 s) with a
/// retryable error saying so, instead of waiting forever. Paused time: no real 30 s.
#[tokio::test(start_paused = true)]
async fn amqp_a_silent_peer_is_an_error_not_a_hang() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let (socket, _) = silent.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(socket);
    });
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let t0 = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(120), weir_amqp::ping(&url))
        .await
        .expect("connecting to a silent peer gives up on its own")
        .expect_err("a silent peer is not a broker");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
    held.join().unwrap();
}

/// A RabbitMQ node of one test's own (`scripts/brokers amqp-serve` in the foreground, on a
/// free loopback port), its state in a temporary directory: [`stop`](Self::stop) and
/// [`start_again`](Self::start_again) restart it with its durable queues; dropped, it stops.
struct PrivateRabbit {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivateRabbit {
    fn start() -> PrivateRabbit {
        // AMQP on the port, Erlang distribution on the next one: both must be free.
        let port = loop {
            let p = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let mut r = PrivateRabbit {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        r.start_again();
        r
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("rabbitmq.log")
    }

    /// Starts the node on its state and waits until it answers AMQP.
    fn start_again(&mut self) {
        assert!(self.child.is_none(), "the private RabbitMQ runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut child =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/brokers"))
                .arg("amqp-serve")
                .arg(self.dir.path().join("node"))
                .arg(self.port.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("scripts/brokers amqp-serve");
        // RabbitMQ opens its AMQP listener last, once it has booted.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                panic!("the private RabbitMQ exited ({status}) before it answered:\n{log}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the private RabbitMQ did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.child = Some(child);
    }

    /// Stops the node (SIGTERM: RabbitMQ's own orderly stop) and waits until it is gone.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The node is the script's child: it is gone once its pid file's process is.
        let pid_file = self.dir.path().join("node/pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            while rustix::process::test_kill_process(pid).is_ok() {
                if std::time::Instant::now() > deadline {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The oracle's counts on quorum queues and on streams, switching only `queue_type`; on a
/// stream, a crash and restart resumes from the stream offset committed with the
/// checkpoint.
async fn counts_on(queue_type: &str, partitions: u32) {
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
