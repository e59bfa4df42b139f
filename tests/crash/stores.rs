//! The crash tests with the results in a store (`[sink] type = "postgres"`, `"redis"`):
//! `weir run`
//! killed with SIGKILL at random moments while the data arrives (during joins and
//! takeovers where the broker has them), and processes aborted by the crash point right
//! after their first or second commit (`WEIR_CRASH_AFTER_COMMITS`), the narrowest moment
//! at which a committed position could cover a result not yet in the table; then one run
//! to the end. The table (the Redis hashes) must equal the independent count: one row
//! (hash) per window (0 duplicates), none missing, every count exact; every invalid event
//! dead-lettered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_engine::generate::dataset;

use super::conformance::stores::{pg, redis};
use super::conformance::{self, oracle, Bed};
use super::schedules::{chunks_an_hour_apart, until_crash_point};
use super::{final_run_with, kill_rounds, produce_committed, schedule_seed, spawn_env, tail, Rng};

/// Where a store bed's results are read back from.
enum Store {
    Postgres(tokio_postgres::Client),
    Redis(::redis::aio::MultiplexedConnection),
}

/// A bed on `broker` whose `weir run`s write their results to a fresh table (key prefix).
struct StoreBed {
    bed: Bed,
    store: Store,
    /// The table, or the key prefix.
    name: String,
    file: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl StoreBed {
    async fn new(store: &str, broker: &str, case: &str, sets: &[&str]) -> StoreBed {
        let name = pg::unique_table(&format!("{case}_{broker}"));
        let dir = tempfile::tempdir().unwrap();
        let (store, file) = match store {
            "postgres" => {
                let url = pg::url();
                let file = pg::pipeline(dir.path(), &url, &name);
                (Store::Postgres(pg::client(&url).await), file)
            }
            _ => {
                let url = redis::url();
                let file = redis::pipeline(dir.path(), &url, &name);
                (Store::Redis(redis::connect(&url).await), file)
            }
        };
        let mut bed = Bed::new(broker, "crash-store", sets);
        // The results go to the store: no sink topic.
        bed.sets.retain(|s| !s.starts_with("sink.topic="));
        StoreBed {
            bed,
            store,
            name,
            file,
            log: dir.path().join("weir.log"),
            _dir: dir,
        }
    }

    /// (user, window start) -> count, and how many rows (hashes) there are.
    async fn read_back(&mut self) -> (std::collections::HashMap<(String, i64), u64>, usize) {
        match &mut self.store {
            Store::Postgres(c) => pg::counts(c, &self.name).await,
            Store::Redis(c) => redis::counts(c, &self.name).await,
        }
    }

    fn spawn(&self, env: &[(&str, &str)]) -> std::process::Child {
        spawn_env(&self.file, &self.bed, &self.log, "10s", &[], env)
    }

    /// One run until idle after the crashes, then the table and the dead letters against
    /// the oracle's count of `data`.
    async fn final_run_and_check(&mut self, data: &[Vec<u8>], crashes: &str) {
        let log: &Path = &self.log.clone();
        final_run_with(log, &|| self.spawn(&[])).await;

        let want = oracle(data);
        let (got, rows) = self.read_back().await;
        let table = &self.name;
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "{} of {} windows missing from {table} after {crashes} (e.g. {:?})\n{}",
            missing.len(),
            want.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            tail(log)
        );
        let wrong = want.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count();
        assert_eq!(
            wrong,
            0,
            "{wrong} windows with a wrong count\n{}",
            tail(log)
        );
        assert_eq!(rows, want.len(), "one row per window, none extra");
        assert_eq!(got, want);

        let invalid: HashSet<Vec<u8>> = data
            .iter()
            .filter(|l| oracle(std::slice::from_ref(*l)).is_empty())
            .cloned()
            .collect();
        let dead = self
            .bed
            .read_all(&self.bed.config.dead_letter.topic, Duration::from_secs(6))
            .await;
        assert!(
            conformance::dead_letter_payloads(&dead) == invalid,
            "every invalid event dead-lettered, and only those"
        );
        eprintln!(
            "{} → {}: {crashes}; {} windows exact in {table}, {rows} rows (0 duplicates, 0 missing); {} dead letters for {} invalid events",
            self.bed.config.broker,
            match self.store {
                Store::Postgres(_) => "postgres",
                Store::Redis(_) => "redis",
            },
            want.len(),
            dead.len(),
            invalid.len()
        );
        if let Store::Postgres(c) = &self.store {
            c.batch_execute(&format!("DROP TABLE {table}"))
                .await
                .unwrap();
        }
    }
}

/// `rounds` processes killed at random moments while the data arrives (with a second
/// instance started beside some of them when `takeover`, and one of the two killed while
/// the other joins or takes over), then one run until idle.
async fn survives_kill_9(store: &str, broker: &str, events: usize, rounds: usize, takeover: bool) {
    let seed = schedule_seed(&format!("{broker} → {store}"));
    let mut rng = Rng(seed);
    let mut b = StoreBed::new(store, broker, "kill", &["source.commit_interval=300ms"]).await;
    let data: Vec<Vec<u8>> = dataset(seed, events, 500, 97)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    assert!(oracle(&data).len() > 1_000);
    let kills = kill_rounds(&b.bed, &data, rounds, takeover, &mut rng, &|| b.spawn(&[])).await;
    b.final_run_and_check(&data, &format!("{kills} kills"))
        .await;
}

/// Each round's process aborts right after its `k`-th commit (k = 1 or 2): every result
/// the commit covered must already be committed in the table.
async fn survives_crashes_right_after_commits(store: &str, broker: &str) {
    let seed = schedule_seed(&format!("{broker} → {store} (crash schedule)"));
    let mut rng = Rng(seed);
    let mut b = StoreBed::new(store, broker, "commit", &["source.commit_interval=200ms"]).await;
    let rounds = 8;
    let data: Vec<Vec<u8>> = chunks_an_hour_apart(seed, rounds, 4_000)
        .into_iter()
        .flatten()
        .collect();
    let mut aborted = 0;
    for part in data.chunks(data.len() / rounds) {
        produce_committed(&b.bed, part).await;
        let k = (1 + rng.next() % 2).to_string();
        let mut p = b.spawn(&[("WEIR_CRASH_AFTER_COMMITS", k.as_str())]);
        if until_crash_point(&mut p, &b.log).await {
            aborted += 1;
        }
    }
    assert!(
        aborted * 2 >= rounds,
        "only {aborted} of {rounds} runs reached their crash point"
    );
    b.final_run_and_check(&data, &format!("{aborted} crashes right after a commit"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_survives_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9("postgres", "kafka", 100_000, 12, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_survives_crashes_right_after_commits() {
    survives_crashes_right_after_commits("postgres", "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_postgres_survives_kill_9_mid_stream_and_during_takeovers() {
    survives_kill_9("postgres", "amqp", 40_000, 12, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_postgres_survives_kill_9_mid_stream() {
    // One instance per (stream, group) on Kinesis: no takeover to kill.
    survives_kill_9("postgres", "kinesis", 40_000, 12, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_redis_survives_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9("redis", "kafka", 100_000, 12, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_redis_survives_crashes_right_after_commits() {
    survives_crashes_right_after_commits("redis", "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_redis_survives_kill_9_mid_stream_and_during_takeovers() {
    survives_kill_9("redis", "amqp", 40_000, 12, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_redis_survives_kill_9_mid_stream() {
    // One instance per (stream, group) on Kinesis: no takeover to kill.
    survives_kill_9("redis", "kinesis", 40_000, 12, false).await;
}
