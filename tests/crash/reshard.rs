//! Kinesis resharding under `weir run`: a 2-shard stream read while the producer puts
//! events keyed by user (PartitionKey = user_id); half-way shard 0 is split, or the two
//! shards are merged. A (user, window) that spans the change must come out once with its
//! exact count, not twice with two partial ones: the children are counted in their
//! parents' task (checkpoint files: every shard is read, parents first). Then the same
//! with `weir run` killed (SIGKILL) twice around the handover.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_engine::generate::dataset;

use super::conformance::{oracle, Bed};
use super::{check_outputs, schedule_seed, spawn, wait_ok, Guarantee, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Shard 0 split at the middle of its hash range.
    Split,
    /// Shards 0 and 1 merged.
    Merge,
}

/// Splits or merges the stream's first shards and waits until it is ACTIVE again.
async fn reshard(bed: &Bed, change: Change) {
    let topic = &bed.config.source.topic;
    let Some(kinesis) = bed.backend.get::<weir_kinesis::KinesisBroker>() else {
        unreachable!("a Kinesis bed")
    };
    let client = kinesis.client().await.expect("client");
    let shards = client
        .list_shards()
        .stream_name(topic)
        .send()
        .await
        .expect("ListShards");
    let first = &shards.shards()[0];
    assert_eq!(first.shard_id(), "shardId-000000000000");
    match change {
        Change::Split => {
            let range = first.hash_key_range().expect("hash key range");
            let lo: u128 = range.starting_hash_key().parse().unwrap();
            let hi: u128 = range.ending_hash_key().parse().unwrap();
            client
                .split_shard()
                .stream_name(topic)
                .shard_to_split(first.shard_id())
                .new_starting_hash_key((lo + (hi - lo) / 2 + 1).to_string())
                .send()
                .await
                .expect("SplitShard");
        }
        Change::Merge => {
            client
                .merge_shards()
                .stream_name(topic)
                .shard_to_merge("shardId-000000000000")
                .adjacent_shard_to_merge("shardId-000000000001")
                .send()
                .await
                .expect("MergeShards");
        }
    }
    super::conformance::brokers::kinesis_wait_active(&client, topic).await;
    let after = client
        .list_shards()
        .stream_name(topic)
        .send()
        .await
        .expect("ListShards");
    let ids: Vec<&str> = after.shards().iter().map(|s| s.shard_id()).collect();
    eprintln!("{change:?}: shards now {ids:?}");
    assert_eq!(ids.len(), if change == Change::Split { 4 } else { 3 });
}

/// `weir run` reads a 2-shard stream while 30,000 events over 400 users are put in
/// chunks; after the first half the shards are split or merged. With `kills`, the process
/// is killed that many times around the handover (0.2–2.5 s after the change, while the
/// second half arrives) and started again. Every (user, window) must match an
/// independent count of what was put; without kills, each exactly once.
async fn survives_resharding(change: Change, kills: usize) {
    survives_resharding_with(change, kills, Leases::Files).await
}

/// Where the shards' positions live, and how many instances read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leases {
    /// Checkpoint files, one instance.
    Files,
    /// Shard leases in DynamoDB (3 s), with this many instances.
    DynamoDb(usize),
}

async fn survives_resharding_with(change: Change, kills: usize, leases: Leases) {
    let seed = schedule_seed(&format!("kinesis {change:?} {leases:?}"));
    let mut rng = Rng(seed);
    let mut sets = vec![
        "source.commit_interval=300ms".to_string(),
        "brokers.kinesis.shards=2".to_string(),
    ];
    let instances = match leases {
        Leases::Files => 1,
        Leases::DynamoDb(n) => {
            let scale = super::conformance::brokers::get("kinesis")
                .scale_out()
                .expect("Kinesis scales out with DynamoDB leases");
            sets.extend(scale.into_iter().filter(|s| !s.contains(".shards=")));
            n
        }
    };
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let bed = Bed::new("kinesis", "reshard", &sets);
    let data: Vec<Vec<u8>> = dataset(seed, 30_000, 400, 97)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    let dir = tempfile::tempdir().unwrap();
    let log: PathBuf = dir.path().join("weir.log");
    let (before, after) = data.split_at(data.len() / 2);
    let chunks = |d: &'_ [Vec<u8>]| d.chunks(2_500).map(<[_]>::to_vec).collect::<Vec<_>>();
    bed.produce(&before[..1_000]).await;
    let mut others: Vec<_> = (1..instances).map(|_| spawn(&bed, &log)).collect();
    let mut proc = spawn(&bed, &log);
    for c in chunks(&before[1_000..]) {
        bed.produce(&c).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    reshard(&bed, change).await;
    let mut pending = chunks(after).into_iter();
    let mut killed = 0;
    while killed < kills {
        // Kill during the handover: the parents' ends are read, the children start.
        let at = tokio::time::Instant::now() + rng.ms(200, 2_500);
        while tokio::time::Instant::now() < at {
            match pending.next() {
                Some(c) => bed.produce(&c).await,
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        proc.kill().expect("kill");
        let _ = proc.wait();
        killed += 1;
        proc = spawn(&bed, &log);
    }
    for c in pending {
        bed.produce(&c).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The last one started runs to the end (idle for 10 s).
    wait_ok(&mut proc, &log, Duration::from_secs(180)).await;
    for p in &mut others {
        wait_ok(p, &log, Duration::from_secs(60)).await;
    }
    super::keep_log(&log);
    let records = check_outputs(&bed, &data, killed, &log, Guarantee::AtLeastOnce).await;
    handed_over(&log, change);
    if kills == 0 && instances == 1 {
        // (Several instances take leases from each other at the start, and a takeover
        // replays: copies with the same count.)
        assert_eq!(
            records,
            want.len(),
            "without kills, every (user, window) exactly once"
        );
    }
}

/// The log shows the children counted in their parents' task.
fn handed_over(log: &Path, change: Change) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        text.contains("starting shard reader") && text.contains("shard read to its end"),
        "a parent read to its end and its children started:\n{}",
        super::tail(log)
    );
    if change == Change::Merge {
        assert!(
            text.contains("their tasks merge into one"),
            "the merged shards' tasks merged:\n{}",
            super::tail(log)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_split_mid_stream_is_exact() {
    survives_resharding(Change::Split, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_merge_mid_stream_is_exact() {
    survives_resharding(Change::Merge, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_split_survives_kill_9_during_the_handover() {
    survives_resharding(Change::Split, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_merge_survives_kill_9_during_the_handover() {
    survives_resharding(Change::Merge, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_split_mid_stream_is_exact() {
    survives_resharding_with(Change::Split, 0, Leases::DynamoDb(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_merge_mid_stream_is_exact() {
    survives_resharding_with(Change::Merge, 0, Leases::DynamoDb(1)).await;
}

/// Two instances hold one parent each: the holder of the first takes the other over
/// (the other drops its open windows), then the merged child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_merge_of_two_instances_shards_is_exact() {
    survives_resharding_with(Change::Merge, 0, Leases::DynamoDb(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_split_survives_kill_9_during_the_handover() {
    survives_resharding_with(Change::Split, 2, Leases::DynamoDb(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_merge_survives_kill_9_during_the_handover() {
    survives_resharding_with(Change::Merge, 2, Leases::DynamoDb(1)).await;
}

/// The merge of two instances' shards with one of the instances killed twice around
/// the handover (whichever of the two it is: the one that gathers the family or the one
/// that gives its parent up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_merge_of_two_instances_shards_survives_kill_9() {
    survives_resharding_with(Change::Merge, 2, Leases::DynamoDb(2)).await;
}
