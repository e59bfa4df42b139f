//! Scale-out: several `weir run` instances of `pipelines/user_activity.toml` share one
//! group on a source of 4 partitions (the backend's [`TestBroker::scale_out`] settings)
//! and split its work through the broker's own mechanism. The seeded data, keyed by
//! `user_id`, arrives while they run. The union of what they wrote must be the
//! independent count (a window written twice only with the same count), every invalid
//! event a dead letter, each instance must have read a share of the input and none all of
//! it; and when one is killed with SIGKILL in the middle of its input, the survivor takes
//! its partitions over and finishes them, still exact.
//!
//! [`TestBroker::scale_out`]: super::brokers::TestBroker::scale_out

use std::collections::HashSet;
use std::time::Duration;

use super::instances::{owned_after, wait_until_split, Instance};
use super::{brokers, lines, oracle, results, Bed, Counts};

/// The source's partitions: 3 instances get at least one each.
const PARTITIONS: u32 = 4;

/// How long the instances may take to join and split the partitions.
const JOIN_LIMIT: Duration = Duration::from_secs(40);

/// A bed whose source has [`PARTITIONS`] partitions that instances in one group split.
fn scale_bed(broker: &str, case: &str, more: &[&str]) -> Bed {
    let Some(sets) = brokers::get(broker).scale_out() else {
        panic!("{broker}: several `weir run` processes cannot share its topics");
    };
    let mut extra = vec!["source.commit_interval=300ms".to_string()];
    extra.extend(sets);
    extra.extend(more.iter().map(|s| s.to_string()));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Bed::new(broker, case, &extra)
}

/// Publishes `chunk` after `chunk`, a short pause between them: input that keeps
/// arriving while the instances run (pauses well under the pipeline's 5 s idle timeout).
async fn produce_chunk(bed: &Bed, chunk: &[Vec<u8>]) {
    bed.produce(chunk).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Three instances join, then the data arrives: each reads a share, none all of it, and
/// the union of their results is exact.
pub async fn instances_split_the_work(broker: &str) {
    instances_split_the_work_with(broker, &[]).await
}

/// [`instances_split_the_work`] with `extra` settings.
pub async fn instances_split_the_work_with(broker: &str, extra: &[&str]) {
    let bed = scale_bed(broker, "split", extra);
    let data = lines(21, 30_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut instances: Vec<Instance> = ["a", "b", "c"]
        .iter()
        .map(|n| Instance::spawn(&bed, dir.path(), n, "10s"))
        .collect();
    let t0 = std::time::Instant::now();
    wait_until_split(&mut instances, PARTITIONS, JOIN_LIMIT).await;
    let split = t0.elapsed();
    for chunk in data.chunks(3_000) {
        produce_chunk(&bed, chunk).await;
    }
    let mut read = Vec::new();
    for i in &mut instances {
        read.push(i.finish(Duration::from_secs(90)).await);
    }
    let logs: Vec<String> = instances.iter().map(Instance::tail).collect();
    for (i, s) in instances.iter().zip(&read) {
        assert!(
            s.events_in > 0 && (s.events_in as usize) < data.len(),
            "instance {} read {} of the {} events: each must read a share, none all\n{}",
            i.name,
            s.events_in,
            data.len(),
            logs.join("\n")
        );
        assert_eq!(s.late, 0, "instance {}\n{}", i.name, logs.join("\n"));
    }
    let total: u64 = read.iter().map(|s| s.events_in).sum();
    assert!(
        total as usize >= data.len(),
        "together the instances read {total} events, fewer than the {} produced: {read:?}",
        data.len()
    );
    eprintln!(
        "{broker}: 3 instances split the partitions after {split:?}, read {:?} events, done after {:?}",
        read.iter().map(|s| s.events_in).collect::<Vec<_>>(),
        t0.elapsed()
    );
    outputs_are_exact(&bed, &data, &logs.join("\n")).await;
}

/// Two instances join and the data starts; one of them is killed with SIGKILL right after
/// a chunk was produced, once it has read records; the rest arrives. The survivor is
/// assigned the dead one's partitions (after the broker noticed the death: Kafka's
/// session timeout) and finishes them: every window exact.
pub async fn a_killed_instance_is_taken_over(broker: &str) {
    a_killed_instance_is_taken_over_with(broker, &[]).await
}

/// [`a_killed_instance_is_taken_over`] with `extra` settings.
pub async fn a_killed_instance_is_taken_over_with(broker: &str, extra: &[&str]) {
    let bed = scale_bed(broker, "takeover", extra);
    let data = lines(23, 40_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    // Idle long enough for the broker to notice the death and reassign (a Kafka session
    // timeout of 6 s, then a rejoin) after the survivor's own input ended.
    let mut instances: Vec<Instance> = ["a", "b"]
        .iter()
        .map(|n| Instance::spawn(&bed, dir.path(), n, "15s"))
        .collect();
    let t0 = std::time::Instant::now();
    wait_until_split(&mut instances, PARTITIONS, JOIN_LIMIT).await;
    let split = t0.elapsed();
    let chunks: Vec<&[Vec<u8>]> = data.chunks(4_000).collect();
    let mut killed = None;
    for (n, chunk) in chunks.iter().enumerate() {
        if killed.is_some() || n < chunks.len() / 2 {
            produce_chunk(&bed, chunk).await;
            continue;
        }
        // Records are on their way to the victim: kill it now if it has read some.
        bed.produce(chunk).await;
        let read = instances[0].events_in().await;
        if read > 0 {
            let owned = instances[0].owned();
            instances[0].kill();
            killed = Some((read, owned, instances[1].log().len()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let Some((read, owned, log_at_kill)) = killed else {
        panic!(
            "instance a read no record before the input ended\n{}",
            instances[0].tail()
        );
    };
    assert!(!owned.is_empty() && (read as usize) < data.len(), "{read}");
    let s = instances[1].finish(Duration::from_secs(120)).await;
    let log = instances[1].log();
    let tails = format!("{}\n{}", instances[0].tail(), instances[1].tail());
    let after = owned_after(&log, log_at_kill);
    assert!(
        owned.is_subset(&after),
        "the survivor was never assigned the dead instance's partitions {owned:?} (it owns {after:?})\n{tails}"
    );
    assert!(s.events_in > 0 && s.late == 0, "{s:?}\n{tails}");
    eprintln!(
        "{broker}: split after {split:?}; a read {read} events and owned {owned:?} when killed; \
         b read {} and took them over, done after {:?}",
        s.events_in,
        t0.elapsed()
    );
    outputs_are_exact(&bed, &data, &tails).await;
}

/// Input that is not keyed by the group (no key: the default of most producers) meets a
/// second instance. One instance reads it alone, then another joins: the one that loses
/// partitions must stop at once with an error that says why (nothing it emitted is
/// partial: it had every partition until then), and the newcomer, which holds its windows
/// while partitions of the topic are read elsewhere, must get them all and finish: the
/// union exact, no window twice with different counts.
pub async fn unkeyed_input_meets_a_second_instance(broker: &str) {
    unkeyed_input_meets_a_second_instance_with(broker, &[]).await
}

/// [`unkeyed_input_meets_a_second_instance`] with `extra` settings.
pub async fn unkeyed_input_meets_a_second_instance_with(broker: &str, extra: &[&str]) {
    let bed = scale_bed(broker, "unkeyed", extra);
    let data = lines(29, 24_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut a = Instance::spawn(&bed, dir.path(), "a", "15s");
    wait_until_split(std::slice::from_mut(&mut a), PARTITIONS, JOIN_LIMIT).await;
    let (first, rest) = data.split_at(data.len() / 2);
    for chunk in first.chunks(3_000) {
        bed.produce_unkeyed(chunk).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t0 = std::time::Instant::now();
    while a.events_in().await == 0 {
        assert!(
            t0.elapsed() < JOIN_LIMIT,
            "instance a read nothing\n{}",
            a.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut b = Instance::spawn(&bed, dir.path(), "b", "15s");
    let status = a.exit(Duration::from_secs(90)).await;
    let log = a.log();
    assert!(
        !status.success()
            && log.contains("not keyed by the group key")
            && log.contains("`[source] repartition = true`")
            && log.contains("Running several instances"),
        "instance a, which lost partitions of unkeyed input to b, must stop with an error that says so: {status}\n{}",
        a.tail()
    );
    for chunk in rest.chunks(3_000) {
        bed.produce_unkeyed(chunk).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = b.finish(Duration::from_secs(150)).await;
    let tails = format!("{}\n{}", a.tail(), b.tail());
    assert!(
        b.owned() == (0..PARTITIONS).collect(),
        "b ends with every partition\n{tails}"
    );
    assert!(s.events_in > 0 && s.late == 0, "{s:?}\n{tails}");
    eprintln!(
        "{broker}: a stopped ({status}) when b joined; b read {} events and finished after {:?}",
        s.events_in,
        t0.elapsed()
    );
    outputs_are_exact(&bed, &data, &tails).await;
}

/// The sink holds exactly the oracle's windows (copies only with the same count) and the
/// dead-letter topic exactly the invalid events, none late.
pub(super) async fn outputs_are_exact(bed: &Bed, data: &[Vec<u8>], logs: &str) {
    let want = oracle(data);
    let (sink, dead_letters) = (&bed.config.sink.topic, &bed.config.dead_letter.topic);
    let idle = Duration::from_secs(4);
    let (records, dead) = tokio::join!(bed.read_all(sink, idle), bed.read_all(dead_letters, idle));
    // `results` fails on two copies of one window with different counts.
    let got: Counts = results(&records);
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} of {} windows missing (e.g. {:?}), {} extra (e.g. {:?})\n{logs}",
        missing.len(),
        want.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>(),
    );
    assert_eq!(got, want, "counts\n{logs}");
    let invalid: HashSet<Vec<u8>> = data
        .iter()
        .filter(|l| oracle(std::slice::from_ref(*l)).is_empty())
        .map(|l| l.to_vec())
        .collect();
    assert!(!invalid.is_empty());
    let dead_payloads = super::dead_letter_payloads(&dead);
    assert_eq!(
        dead_payloads, invalid,
        "every invalid event dead-lettered, and only those"
    );
    eprintln!(
        "{} windows exact ({} results read), {} dead letters for {} invalid events",
        want.len(),
        records.len(),
        dead.len(),
        invalid.len()
    );
}
