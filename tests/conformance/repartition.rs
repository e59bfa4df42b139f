//! Repartitioning (`[source] repartition = true`): input that is not keyed by the group
//! key — no key at all, the default of most producers, written by a standard third-party
//! client (confluent-kafka) — read by several `weir run` instances. Each forwards the
//! events of the source partitions it owns to the internal topic, keyed by `user_id`, and
//! counts the internal partitions it owns. The union of what they wrote must be the
//! independent count, every instance must have done work, none may count an event late;
//! also when one is killed with SIGKILL mid-input, and when one source partition lags 30 s
//! of event time behind the others.

use std::time::Duration;

use bytes::Bytes;
use weir_engine::OutRecord;

use super::instances::{wait_until_split, Instance, Stopped};
use super::scale::outputs_are_exact;
use super::{brokers, lines, Bed};

use super::thirdparty;

/// The source's partitions, and the internal topic's (the backend's default count).
const PARTITIONS: u32 = 4;

/// How long the instances may take to join and split the internal partitions.
const JOIN_LIMIT: Duration = Duration::from_secs(60);

/// A bed whose pipeline repartitions, its source of [`PARTITIONS`] partitions.
fn repartition_bed(broker: &str, case: &str) -> Bed {
    let Some(sets) = brokers::get(broker).scale_out() else {
        panic!("{broker}: several `weir run` processes cannot share its topics");
    };
    let mut extra = vec![
        "source.commit_interval=300ms".to_string(),
        "source.repartition=true".to_string(),
    ];
    extra.extend(sets);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Bed::new(broker, case, &extra)
}

/// Starts an instance per name (each stopping after `idle` without input) and waits until
/// they split the internal topic's partitions.
async fn spawn_split(
    bed: &Bed,
    dir: &std::path::Path,
    names: &[&str],
    idle: &str,
) -> Vec<Instance> {
    let mut instances: Vec<Instance> = names
        .iter()
        .map(|n| Instance::spawn(bed, dir, n, idle))
        .collect();
    wait_until_split(&mut instances, PARTITIONS, JOIN_LIMIT).await;
    instances
}

/// Waits for every instance to finish; what each said at its end, and their logs' tails.
async fn finish_all(instances: &mut [Instance]) -> (Vec<Stopped>, Vec<String>) {
    let mut read = Vec::new();
    for i in instances.iter_mut() {
        read.push(i.finish(Duration::from_secs(120)).await);
    }
    (read, instances.iter().map(Instance::tail).collect())
}

/// Writes `lines` without a key to the bed's source topic with a standard client of the
/// broker (its partitioner spreads them), in chunks with short pauses: input that keeps
/// arriving while the instances run.
async fn produce_unkeyed_elsewhere(bed: &Bed, lines: &[Vec<u8>]) {
    for chunk in lines.chunks(3_000) {
        match bed.config.broker.as_str() {
            "kafka" => {
                let mut input = Vec::new();
                for l in chunk {
                    input.push(b'\t');
                    input.extend_from_slice(l);
                    input.push(b'\n');
                }
                let sent = thirdparty::kafka_produce_to(
                    &thirdparty::kafka_bootstrap(),
                    &bed.config.source.topic,
                    "none",
                    None,
                    input,
                )
                .await;
                assert_eq!(
                    sent.trim(),
                    chunk.len().to_string(),
                    "confluent-kafka: {sent}"
                );
            }
            _ => bed.produce_unkeyed(chunk).await,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Three instances join, then unkeyed input arrives: each counts a share of it, none all,
/// and the union of their results is exact.
pub async fn repartitioned_instances_split_unkeyed_input(broker: &str) {
    let bed = repartition_bed(broker, "rp-split");
    let data = lines(31, 24_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut instances = spawn_split(&bed, dir.path(), &["a", "b", "c"], "15s").await;
    produce_unkeyed_elsewhere(&bed, &data).await;
    let (read, logs) = finish_all(&mut instances).await;
    for (i, s) in instances.iter().zip(&read) {
        assert!(
            s.events_in > 0 && (s.events_in as usize) < data.len(),
            "instance {} counted {} of the {} events: each must count a share, none all\n{}",
            i.name,
            s.events_in,
            data.len(),
            logs.join("\n")
        );
        assert_eq!(s.late, 0, "instance {}\n{}", i.name, logs.join("\n"));
    }
    eprintln!(
        "{broker}: 3 instances repartitioned unkeyed input and counted {:?} events",
        read.iter().map(|s| s.events_in).collect::<Vec<_>>()
    );
    outputs_are_exact(&bed, &data, &logs.join("\n")).await;
}

/// Two instances repartition unkeyed input; one is killed with SIGKILL mid-input (between
/// its forwarding and its commits), then started again: nothing is forwarded or counted
/// twice, nothing is lost, nothing is late.
pub async fn repartitioned_input_survives_a_kill(broker: &str) {
    let bed = repartition_bed(broker, "rp-kill");
    let data = lines(37, 30_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut instances = spawn_split(&bed, dir.path(), &["a", "b"], "20s").await;
    let (first, rest) = data.split_at(data.len() / 2);
    produce_unkeyed_elsewhere(&bed, first).await;
    let t0 = std::time::Instant::now();
    let read = loop {
        let n = instances[0].events_in().await;
        if n > 0 {
            break n;
        }
        assert!(
            t0.elapsed() < JOIN_LIMIT,
            "instance a counted nothing\n{}",
            instances[0].tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    instances[0].kill();
    let mut again = Instance::spawn(&bed, dir.path(), "a-again", "20s");
    produce_unkeyed_elsewhere(&bed, rest).await;
    let s_b = instances[1].finish(Duration::from_secs(150)).await;
    let s_a = again.finish(Duration::from_secs(150)).await;
    let logs = format!(
        "{}\n{}\n{}",
        instances[0].tail(),
        instances[1].tail(),
        again.tail()
    );
    assert!(s_a.late == 0 && s_b.late == 0, "{s_a:?} {s_b:?}\n{logs}");
    eprintln!(
        "{broker}: a counted {read} events before SIGKILL; b counted {}, a again {}",
        s_b.events_in, s_a.events_in
    );
    outputs_are_exact(&bed, &data, &logs).await;
}

/// Two instances repartition unkeyed input; a third joins mid-input, and one of the first
/// two is killed with SIGKILL while the group rebalances for it (between its revocation and
/// the next assignment): the other two take everything over, exact, none late.
pub async fn repartitioned_instance_killed_during_a_join(broker: &str) {
    let bed = repartition_bed(broker, "rp-join");
    let data = lines(53, 30_000, 500, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut instances = spawn_split(&bed, dir.path(), &["a", "b"], "20s").await;
    let (first, rest) = data.split_at(data.len() / 3);
    produce_unkeyed_elsewhere(&bed, first).await;
    let seen = instances[1].log().len();
    instances.push(Instance::spawn(&bed, dir.path(), "c", "20s"));
    let t0 = std::time::Instant::now();
    while !instances[1].log()[seen..].contains("partitions revoked") {
        assert!(
            t0.elapsed() < JOIN_LIMIT,
            "c's join never revoked b's partitions\n{}",
            instances[1].tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    instances[1].kill();
    let killed = instances.remove(1);
    produce_unkeyed_elsewhere(&bed, rest).await;
    let (read, logs) = finish_all(&mut instances).await;
    let logs = format!("{}\n{}", killed.tail(), logs.join("\n"));
    for s in &read {
        assert!(s.events_in > 0 && s.late == 0, "{read:?}\n{logs}");
    }
    outputs_are_exact(&bed, &data, &logs).await;
}

/// Two instances repartition unkeyed input whose source partition 0 lags 30 s of event
/// time behind the others all along (its producer is behind): each internal partition
/// interleaves records of every source partition, so a watermark taken over the records
/// it reads would make partition 0's events late. None may be late, and the union exact.
pub async fn repartition_waits_for_a_lagging_partition(broker: &str) {
    let bed = repartition_bed(broker, "rp-lag");
    let data = lines(41, 16_000, 300, 97);
    let dir = tempfile::tempdir().unwrap();
    let mut instances = spawn_split(&bed, dir.path(), &["a", "b"], "15s").await;
    produce_lagging(&bed, &data, Duration::from_millis(150)).await;
    let (read, logs) = finish_all(&mut instances).await;
    for (i, s) in instances.iter().zip(&read) {
        assert!(
            s.events_in > 0,
            "instance {} counted nothing\n{}",
            i.name,
            logs.join("\n")
        );
        assert_eq!(
            s.late,
            0,
            "instance {}: partition 0's events were taken for late ones\n{}",
            i.name,
            logs.join("\n")
        );
    }
    outputs_are_exact(&bed, &data, &logs.join("\n")).await;
}

/// Writes `data` without a key, round robin over the source's partitions, partition 0's
/// events held back until the others are 30 s of event time ahead of them (its producer
/// lags); `pause` between steps of 400 events.
async fn produce_lagging(bed: &Bed, data: &[Vec<u8>], pause: Duration) {
    // Round robin over the partitions, partition 0's events held back until the others
    // are 30 s of event time ahead of them.
    const LAG_MS: i64 = 30_000;
    let mut order: Vec<(u32, &Vec<u8>)> = Vec::new();
    let mut held: std::collections::VecDeque<(i64, &Vec<u8>)> = Default::default();
    let mut last = i64::MIN;
    for (i, l) in data.iter().enumerate() {
        let t = serde_json::from_slice::<serde_json::Value>(l)
            .ok()
            .and_then(|v| {
                let ts = v["timestamp"].as_str()?.to_string();
                chrono::NaiveDateTime::parse_from_str(&ts, "%Y-%m-%d %H:%M:%S%.f").ok()
            })
            .map_or(last, |t| t.and_utc().timestamp_millis());
        last = last.max(t);
        while held.front().is_some_and(|(h, _)| *h <= last - LAG_MS) {
            order.push((0, held.pop_front().unwrap().1));
        }
        match i as u32 % PARTITIONS {
            0 => held.push_back((t, l)),
            p => order.push((p, l)),
        }
    }
    order.extend(held.into_iter().map(|(_, l)| (0, l)));
    let mut sink = bed
        .backend
        .sink(&bed.config.source.topic)
        .await
        .expect("sink");
    for step in order.chunks(400) {
        for p in 0..PARTITIONS {
            let batch: Vec<OutRecord> = step
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, l)| OutRecord {
                    payload: Bytes::from((*l).clone()),
                    ..Default::default()
                })
                .collect();
            sink.submit_to(p, &batch).await.expect("produce");
        }
        sink.flush().await.expect("produce");
        tokio::time::sleep(pause).await;
    }
}

/// One `weir run`'s repartition stage and windowing stage over unkeyed input whose
/// partition 0 lags 30 s of event time behind the others, in this process (the memory
/// broker's topics live in it): no event late, the results exact.
pub async fn repartition_in_one_process(broker: &str) {
    let bed = Bed::new(broker, "rp-one", &["source.repartition=true"]);
    let data = lines(43, 12_000, 300, 97);
    produce_lagging(&bed, &data, Duration::ZERO).await;
    let mut parts = weir::assemble::Parts::open(
        &bed.config,
        &bed.backend,
        &weir::assemble::FileIo::default(),
        Default::default(),
    )
    .await
    .expect("open the pipeline's parts");
    let stop = tokio_util::sync::CancellationToken::new();
    let idle = Duration::from_secs(3);
    let forwarder = weir::assemble::spawn_forwarder(parts.forwarder.take(), &stop, Some(idle))
        .expect("a repartitioned pipeline has a forwarder");
    let summary = parts
        .into_pipeline()
        .exit_when_idle(idle)
        .run()
        .await
        .expect("the pipeline");
    forwarder.await.expect("join").expect("the forwarder");
    let s = summary.counters;
    assert!(
        s.balanced() && s.late == 0 && s.events_in as usize == data.len(),
        "{s:?}"
    );
    outputs_are_exact(&bed, &data, "").await;
}
