//! Kill schedules beyond random kills: instances killed during joins and takeovers on
//! RabbitMQ with partition queues and on Kinesis with DynamoDB shard leases; a crash at the
//! narrowest point, right after a commit (the `WEIR_CRASH_AFTER_COMMITS` crash point); and
//! a producer that pauses longer than `idle_timeout` between kills, so that windows closed
//! by idleness are among what a restart must not count again or lose.

use std::path::PathBuf;
use std::time::Duration;

use weir_engine::generate::{EventGenerator, Timeline, DEFAULT_START_MS};

use super::conformance::{self, Bed};
use super::{
    check_outputs, final_run, produce_committed, schedule_seed, spawn_env, spawn_idle,
    survives_kill_9_with, Guarantee, Rng,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_partitions_survive_kill_9_mid_stream_during_joins_and_takeovers() {
    survives_kill_9_with(
        "amqp",
        40_000,
        10,
        true,
        Guarantee::AtLeastOnce,
        &["brokers.amqp.partitions=4"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_survive_kill_9_mid_stream_during_joins_and_takeovers() {
    let leases = conformance::brokers::get("kinesis")
        .scale_out()
        .expect("Kinesis scales out with DynamoDB leases");
    let leases: Vec<&str> = leases.iter().map(String::as_str).collect();
    survives_kill_9_with("kinesis", 40_000, 10, true, Guarantee::AtLeastOnce, &leases).await;
}

/// The seed's events in `rounds` chunks, each an hour of event time after the one before:
/// windows never span two chunks, so a window closed by idleness between chunks is
/// complete.
pub(super) fn chunks_an_hour_apart(
    seed: u64,
    rounds: usize,
    per_round: usize,
) -> Vec<Vec<Vec<u8>>> {
    (0..rounds)
        .map(|r| {
            let mut g = EventGenerator::new(seed + r as u64, 300).with_invalid_every(97);
            let start = DEFAULT_START_MS + r as i64 * 3_600_000;
            let mut t = Timeline::new(seed + r as u64, start, 10, 500);
            (0..per_round)
                .map(|_| g.event(t.next_time()).into_bytes())
                .collect()
        })
        .collect()
}

/// Each round's process aborts right after its `k`-th commit (k = 1 or 2): the
/// commit covered results that must already be acknowledged by the broker.
async fn survives_crashes_right_after_commits(broker: &str) {
    let seed = schedule_seed(&format!("{broker} (crash schedule)"));
    let mut rng = Rng(seed);
    let mut sets = vec!["source.commit_interval=200ms"];
    if broker == "kafka" {
        // The producer holds records 200 ms before sending them (5 ms by default): a sink
        // that did not wait for their acknowledgements would lose them at the crash point.
        sets.push("brokers.kafka.producer.linger.ms=200");
    }
    let bed = Bed::new(broker, "crash-commit", &sets);
    let rounds = 8;
    let data: Vec<Vec<u8>> = chunks_an_hour_apart(seed, rounds, 4_000)
        .into_iter()
        .flatten()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("weir.log");
    let mut aborted = 0;
    for part in data.chunks(data.len() / rounds) {
        produce_committed(&bed, part).await;
        let k = (1 + rng.next() % 2).to_string();
        let env = [("WEIR_CRASH_AFTER_COMMITS", k.as_str())];
        let mut p = spawn_env(&conformance::pipeline_file(), &bed, &log, "10s", &[], &env);
        if until_crash_point(&mut p, &log).await {
            aborted += 1;
        }
    }
    assert!(
        aborted * 2 >= rounds,
        "only {aborted} of {rounds} runs reached their crash point"
    );
    final_run(&bed, &log).await;
    check_outputs(&bed, &data, aborted, &log, Guarantee::AtLeastOnce).await;
}

/// Waits up to 15 s for `p` to reach its crash point (`WEIR_CRASH_AFTER_COMMITS`): true
/// when it aborted there, false when it had not (it is killed); fails when it exited.
pub(super) async fn until_crash_point(p: &mut std::process::Child, log: &std::path::Path) -> bool {
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = p.try_wait().expect("wait") {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match status {
        // SIGABRT: the crash point fired.
        Some(s) if s.code().is_none() => true,
        Some(s) => panic!("exited {s} before its crash point\n{}", super::tail(log)),
        None => {
            p.kill().expect("kill");
            let _ = p.wait();
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_survives_crashes_right_after_commits() {
    survives_crashes_right_after_commits("kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_survives_crashes_right_after_commits() {
    survives_crashes_right_after_commits("amqp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_survives_crashes_right_after_commits() {
    survives_crashes_right_after_commits("kinesis").await;
}

/// Each round's data comes, then nothing for longer than `idle_timeout` (2 s): the
/// process closes the round's last windows by idleness, emits and commits them, and is
/// killed at a random moment of that pause or of the next round.
async fn survives_kills_across_idle_pauses(broker: &str) {
    let seed = schedule_seed(&format!("{broker} (idle-pause schedule)"));
    let mut rng = Rng(seed);
    let bed = Bed::new(
        broker,
        "crash-idle",
        &["source.commit_interval=300ms", "window.idle_timeout=2s"],
    );
    let rounds = 6;
    let chunks = chunks_an_hour_apart(seed, rounds, 3_000);
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("weir.log");
    let mut p = spawn_idle(&bed, &log, "60s");
    let mut kills = 0;
    for part in &chunks {
        produce_committed(&bed, part).await;
        // Past idle_timeout: the round's windows close by idleness in this process.
        tokio::time::sleep(rng.ms(2_500, 6_000)).await;
        p.kill().expect("kill");
        let _ = p.wait();
        kills += 1;
        p = spawn_idle(&bed, &log, "60s");
        tokio::time::sleep(rng.ms(0, 1_500)).await;
    }
    p.kill().expect("kill");
    let _ = p.wait();
    final_run(&bed, &log).await;
    let data: Vec<Vec<u8>> = chunks.into_iter().flatten().collect();
    check_outputs(&bed, &data, kills, &log, Guarantee::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_survives_kills_across_idle_pauses() {
    survives_kills_across_idle_pauses("kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_survives_kills_across_idle_pauses() {
    survives_kills_across_idle_pauses("amqp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_survives_kills_across_idle_pauses() {
    survives_kills_across_idle_pauses("kinesis").await;
}

/// Random kills (some during takeovers) mixed with processes left running until their
/// crash point right after the first or second commit, on 100,000 contiguous events (the
/// schedule the PostgreSQL sink's crash test first ran with). **Known gap, ignored**: on
/// Kafka with the sink topic it lost 5 and then 6 of 42,961 windows in two runs of seed
/// 1796406801431 (`WEIR_CRASH_SEED` replays the schedule, not its timing), and with the
/// results in PostgreSQL 1 and 2 windows in two runs of the same seed — each time the
/// last window(s) of a round whose process had idled long enough to close them by
/// idleness (idle_timeout 5 s) and then aborted after a commit: the next owner restored a
/// checkpoint whose watermark had passed those windows, so it skipped their records as
/// already emitted, yet no output of them exists. Run it with `cargo test --test crash --
/// --ignored kafka_survives_kills_mixed_with_crash_points`.
async fn survives_kills_mixed_with_crash_points(broker: &str) {
    let seed = schedule_seed(&format!("{broker} (kills mixed with crash points)"));
    let mut rng = Rng(seed);
    let bed = Bed::new(broker, "crash-mixed", &["source.commit_interval=300ms"]);
    let data: Vec<Vec<u8>> = weir_engine::generate::dataset(seed, 100_000, 500, 97)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("weir.log");
    let file = conformance::pipeline_file();
    let (rounds, mut kills, mut aborted) = (12, 0, 0);
    for (round, part) in data.chunks(data.len().div_ceil(rounds)).enumerate() {
        produce_committed(&bed, part).await;
        if round % 3 == 2 {
            let k = (1 + rng.next() % 2).to_string();
            let env = [("WEIR_CRASH_AFTER_COMMITS", k.as_str())];
            let mut p = spawn_env(&file, &bed, &log, "10s", &[], &env);
            if until_crash_point(&mut p, &log).await {
                aborted += 1;
            }
            continue;
        }
        let mut procs = vec![spawn_env(&file, &bed, &log, "10s", &[], &[])];
        if round % 3 == 1 {
            tokio::time::sleep(rng.ms(200, 2_500)).await;
            procs.push(spawn_env(&file, &bed, &log, "10s", &[], &[]));
            tokio::time::sleep(rng.ms(100, 2_000)).await;
        }
        tokio::time::sleep(rng.ms(300, 4_000)).await;
        for p in &mut procs {
            let _ = p.kill();
            let _ = p.wait();
            kills += 1;
        }
    }
    assert!(
        aborted >= 2,
        "only {aborted} processes reached their crash point"
    );
    final_run(&bed, &log).await;
    check_outputs(&bed, &data, kills + aborted, &log, Guarantee::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known gap: loses windows closed by idleness just before a crash after a commit"]
async fn kafka_survives_kills_mixed_with_crash_points() {
    survives_kills_mixed_with_crash_points("kafka").await;
}
