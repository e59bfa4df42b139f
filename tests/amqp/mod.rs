//! `[brokers.amqp] partitions = N` on the real RabbitMQ: routing by key, partitions with
//! their own positions and checkpoints, instances splitting the partitions and taking
//! over from one that leaves or is killed, and the setting's checks.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_engine::config::Overrides;
use weir_engine::{Checkpoint, Position, Received, Record, Source};

use crate::conformance::{self, Bed};

mod frozen;
mod layout;

const PARTS: &str = "brokers.amqp.partitions=4";

/// FNV-1a (64 bit) written again from its definition: what a third-party producer
/// computes to pick the queue (`T.{fnv1a(key) % N}`).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn user(payload: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
    v["user_id"].as_str().expect("user_id").to_string()
}

/// The partition a seed event belongs to: its user's hash.
fn partition_of_line(line: &[u8]) -> u32 {
    (fnv1a(user(line).as_bytes()) % 4) as u32
}

fn lines(seed: u64, n: usize) -> Vec<Vec<u8>> {
    weir_engine::generate::dataset(seed, n, 40, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

/// Takes every message of queue `queue` (basic.get): (key header, payload).
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let key = m.delivery.properties.headers().as_ref().and_then(|h| {
            h.inner().iter().find_map(|(k, v)| match v {
                lapin::types::AMQPValue::LongString(s) if k.as_str() == "weir.key" => {
                    Some(s.as_bytes().to_vec())
                }
                _ => None,
            })
        });
        out.push((key, m.delivery.data.clone()));
    }
    out
}

/// Keyed records land in queue `T.{fnv1a(key) % 4}`, keyless ones in `T.{fnv1a(payload) % 4}`:
/// read back from the queues themselves with a plain AMQP client.
#[tokio::test]
async fn amqp_partitions_route_each_key_to_the_queue_of_its_fnv1a_hash() {
    crate::require_rabbitmq().await;
    let bed = Bed::new("amqp", "part-route", &[PARTS]);
    let topic = bed.config.source.topic.clone();
    let keyed = lines(21, 2_000);
    let keyless: Vec<Vec<u8>> = (0..200)
        .map(|i| format!(r#"{{"n":{i}}}"#).into_bytes())
        .collect();
    bed.produce(&keyed).await;
    bed.produce_unkeyed(&keyless).await;
    let conn = lapin::Connection::connect(&crate::url(), Default::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut total = 0;
    let mut per_queue = Vec::new();
    for p in 0..4u64 {
        let got = drain(&ch, &format!("{topic}.{p}")).await;
        for (key, payload) in &got {
            let by = key.as_deref().unwrap_or(payload);
            assert_eq!(fnv1a(by) % 4, p, "{:?}", String::from_utf8_lossy(payload));
            if let Some(k) = key {
                assert_eq!(*k, user(payload).into_bytes(), "the key is the user");
            }
        }
        per_queue.push(got.len());
        total += got.len();
    }
    assert_eq!(total, keyed.len() + keyless.len(), "{per_queue:?}");
    assert!(per_queue.iter().all(|n| *n > 0), "{per_queue:?}");
    // The unpartitioned queue `T` is not part of the topology.
    assert!(!weir_amqp_queue_exists(&conn, &topic).await);
    let _ = conn.close(200, "done".into()).await;
}

async fn weir_amqp_queue_exists(conn: &lapin::Connection, q: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(q.into(), passive, Default::default())
        .await
        .is_ok()
}

/// Reads `src` until `n` records came or nothing came for `idle`; returns the records and
/// every partition's first assignment (with its checkpoint).
async fn read(
    src: &mut Box<dyn Source>,
    n: usize,
    idle: Duration,
) -> (Vec<Record>, BTreeMap<u32, Option<Checkpoint>>) {
    let mut records = Vec::new();
    let mut assigned = BTreeMap::new();
    let mut last = std::time::Instant::now();
    while records.len() < n && last.elapsed() < idle {
        match src
            .recv(1000, Duration::from_millis(200))
            .await
            .expect("recv")
        {
            Received::Assigned(parts) => {
                for (p, cp) in parts {
                    assigned.entry(p).or_insert(cp);
                }
            }
            Received::Batch(b) if !b.is_empty() => {
                records.extend(b);
                last = std::time::Instant::now();
            }
            _ => {}
        }
    }
    (records, assigned)
}

/// Records by partition, in the order read.
fn by_partition(records: &[Record]) -> BTreeMap<u32, Vec<&Record>> {
    let mut m: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        m.entry(r.position.partition).or_default().push(r);
    }
    m
}

/// Each queue is a partition with its own offsets from 0; a commit of partitions 1 and 2
/// stores their positions and checkpoints apart; the next reader gets exactly those back
/// and the uncommitted records of each partition again, numbered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_partitions_have_their_own_positions_and_checkpoints() {
    crate::require_rabbitmq().await;
    let bed = Bed::new("amqp", "part-pos", &[PARTS]);
    let topic = bed.config.source.topic.clone();
    let data = lines(22, 1_000);
    let mut expected = [0usize; 4];
    for l in &data {
        expected[partition_of_line(l) as usize] += 1;
    }
    bed.produce(&data).await;
    let group = Some(bed.config.source.group.as_str());
    let mut src = bed.backend.source(&topic, group).await.expect("source");
    let (first, assigned) = read(&mut src, data.len(), Duration::from_secs(10)).await;
    assert_eq!(
        assigned,
        (0..4).map(|p| (p, None)).collect::<BTreeMap<_, _>>(),
        "a lone reader gets every partition, with nothing committed yet"
    );
    assert_eq!(first.len(), data.len());
    let parts = by_partition(&first);
    for (p, recs) in &parts {
        let offsets: Vec<u64> = recs.iter().map(|r| r.position.offset).collect();
        assert_eq!(
            offsets,
            (0..recs.len() as u64).collect::<Vec<_>>(),
            "partition {p}"
        );
        assert_eq!(recs.len(), expected[*p as usize], "partition {p}");
        assert!(recs.iter().all(|r| partition_of_line(&r.payload) == *p));
    }
    let n2 = parts[&2].len() as u64;
    let cp1 = Checkpoint {
        watermark: 1_111,
        processed: 5,
    };
    let cp2 = Checkpoint {
        watermark: 2_222,
        processed: n2,
    };
    src.commit(&[
        (
            Position {
                partition: 1,
                offset: 5,
            },
            cp1,
        ),
        (
            Position {
                partition: 2,
                offset: n2,
            },
            cp2,
        ),
    ])
    .await
    .expect("commit");
    drop(src);
    let mut again = bed.backend.source(&topic, group).await.expect("source");
    let want = data.len() - 5 - n2 as usize;
    let (second, assigned) = read(&mut again, want, Duration::from_secs(15)).await;
    assert_eq!(
        assigned,
        BTreeMap::from([(0, None), (1, Some(cp1)), (2, Some(cp2)), (3, None)])
    );
    assert_eq!(second.len(), want);
    let redelivered = by_partition(&second);
    assert!(
        !redelivered.contains_key(&2),
        "partition 2 was committed to its end"
    );
    for p in [0u32, 1, 3] {
        let skip = if p == 1 { 5 } else { 0 };
        let was: Vec<(u64, &[u8])> = parts[&p][skip..]
            .iter()
            .map(|r| (r.position.offset, &r.payload[..]))
            .collect();
        let now: Vec<(u64, &[u8])> = redelivered[&p]
            .iter()
            .map(|r| (r.position.offset, &r.payload[..]))
            .collect();
        assert_eq!(now, was, "partition {p}: same records at the same offsets");
    }
}

/// What one reader saw.
#[derive(Default)]
struct Seen {
    records: Vec<Record>,
    owned: Vec<u32>,
    revoked: Vec<u32>,
}

/// Reads `src` in a task, committing all it reads, until `stop`; hands the source back.
fn drive(
    mut src: Box<dyn Source>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Box<dyn Source>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            match src
                .recv(500, Duration::from_millis(100))
                .await
                .expect("recv")
            {
                Received::Assigned(parts) => {
                    seen.lock().unwrap().owned = parts.iter().map(|p| p.0).collect();
                }
                Received::Revoked(parts) => {
                    let mut s = seen.lock().unwrap();
                    s.owned.retain(|p| !parts.contains(p));
                    s.revoked.extend(parts);
                }
                Received::Batch(b) if !b.is_empty() => {
                    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
                    for r in &b {
                        let n = next.entry(r.position.partition).or_default();
                        *n = (*n).max(r.position.offset + 1);
                    }
                    let cp = Checkpoint {
                        watermark: i64::MIN,
                        processed: 0,
                    };
                    let positions: Vec<_> = next
                        .into_iter()
                        .map(|(partition, offset)| (Position { partition, offset }, cp))
                        .collect();
                    src.commit(&positions).await.expect("commit");
                    seen.lock().unwrap().records.extend(b);
                }
                _ => {}
            }
        }
        src
    })
}

/// Waits up to `limit` for `cond`.
async fn until(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn payloads(s: &Mutex<Seen>) -> HashSet<Vec<u8>> {
    s.lock()
        .unwrap()
        .records
        .iter()
        .map(|r| r.payload.to_vec())
        .collect()
}

/// Two readers of one topic split its four partitions two and two (each reads only its
/// own, together everything once); when one goes, the other takes its partitions over and
/// reads what comes to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_two_readers_split_four_partitions_and_one_takes_over() {
    crate::require_rabbitmq().await;
    let bed = Bed::new("amqp", "part-split", &[PARTS]);
    let topic = bed.config.source.topic.clone();
    let group = Some(bed.config.source.group.as_str());
    let (sa, sb) = (Arc::<Mutex<Seen>>::default(), Arc::<Mutex<Seen>>::default());
    let (stop_a, stop_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = bed.backend.source(&topic, group).await.expect("source a");
    let ja = drive(a, sa.clone(), stop_a.clone());
    until(
        "a alone owns every partition",
        Duration::from_secs(15),
        || sa.lock().unwrap().owned == [0, 1, 2, 3],
    )
    .await;
    let b = bed.backend.source(&topic, group).await.expect("source b");
    let jb = drive(b, sb.clone(), stop_b.clone());
    until(
        "a and b own two partitions each",
        Duration::from_secs(20),
        || {
            let (a, b) = (sa.lock().unwrap(), sb.lock().unwrap());
            let mut all: Vec<u32> = a.owned.iter().chain(&b.owned).copied().collect();
            all.sort_unstable();
            a.owned.len() == 2 && b.owned.len() == 2 && all == [0, 1, 2, 3]
        },
    )
    .await;
    let (owned_a, owned_b) = (
        sa.lock().unwrap().owned.clone(),
        sb.lock().unwrap().owned.clone(),
    );
    assert_eq!(
        sa.lock().unwrap().revoked,
        owned_b,
        "a handed b's partitions over"
    );
    let first = lines(23, 2_000);
    bed.produce(&first).await;
    until("a and b read every record", Duration::from_secs(60), || {
        payloads(&sa).len() + payloads(&sb).len() >= first.len()
    })
    .await;
    for (seen, owned) in [(&sa, &owned_a), (&sb, &owned_b)] {
        let s = seen.lock().unwrap();
        assert!(!s.records.is_empty(), "each reader has a share");
        for r in &s.records {
            assert!(owned.contains(&r.position.partition));
            assert_eq!(partition_of_line(&r.payload), r.position.partition);
        }
    }
    let (pa, pb) = (payloads(&sa), payloads(&sb));
    assert!(pa.is_disjoint(&pb), "no record read by both");
    let want: HashSet<Vec<u8>> = first.iter().cloned().collect();
    assert_eq!(pa.union(&pb).cloned().collect::<HashSet<_>>(), want);
    assert_eq!(
        sa.lock().unwrap().records.len() + sb.lock().unwrap().records.len(),
        first.len(),
        "each record read once"
    );
    // a leaves: b takes its partitions over.
    stop_a.store(true, Ordering::Relaxed);
    drop(ja.await.expect("a"));
    until("b owns every partition", Duration::from_secs(15), || {
        sb.lock().unwrap().owned == [0, 1, 2, 3]
    })
    .await;
    let second = lines(24, 2_000);
    bed.produce(&second).await;
    until("b read the new records", Duration::from_secs(60), || {
        let pb = payloads(&sb);
        second.iter().all(|l| pb.contains(l))
    })
    .await;
    let b_parts: HashSet<u32> = sb
        .lock()
        .unwrap()
        .records
        .iter()
        .map(|r| r.position.partition)
        .collect();
    assert!(
        owned_a.iter().all(|p| b_parts.contains(p)),
        "b read a's partitions"
    );
    stop_b.store(true, Ordering::Relaxed);
    drop(jb.await.expect("b"));
}

/// `weir tail`'s reader sees the new records of all four queues, each with its partition,
/// and takes none of them away.
#[tokio::test]
async fn amqp_tail_reads_every_partition() {
    crate::require_rabbitmq().await;
    let bed = Bed::new("amqp", "part-tail", &[PARTS]);
    let topic = bed.config.sink.topic.clone();
    let mut tail = bed
        .backend
        .reader(&topic, false)
        .await
        .unwrap()
        .expect("a reader");
    let data = lines(26, 400);
    bed.produce_to(&topic, &data).await;
    let seen = crate::tail_records(&mut tail, data.len()).await;
    assert_eq!(seen.len(), data.len());
    let parts: HashSet<u32> = seen.iter().map(|r| r.position.partition).collect();
    assert_eq!(parts.len(), 4);
    for r in &seen {
        assert_eq!(partition_of_line(&r.payload), r.position.partition);
    }
    let kept = bed.read(&topic, data.len(), Duration::from_secs(3)).await;
    assert_eq!(kept.len(), data.len(), "the queues still hold every record");
}

/// On streams an open window does not hold its deliveries unacked: with `prefetch = 4`
/// and about ten events per window and partition, the pipeline neither stalls (a classic
/// queue would wait for the idle timeout at every window) nor loses anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_stream_windows_longer_than_prefetch_do_not_stall() {
    crate::require_rabbitmq().await;
    let bed = Bed::new(
        "amqp",
        "part-credit",
        &[
            PARTS,
            "brokers.amqp.queue_type=stream",
            "brokers.amqp.prefetch=4",
        ],
    );
    let data = lines(27, 3_000);
    let want = conformance::oracle(&data);
    bed.produce(&data).await;
    let t0 = std::time::Instant::now();
    let summary = bed.run_until_idle().await.expect("run");
    let took = t0.elapsed();
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.late),
        (3_000, 3_000, 0),
        "{s:?}"
    );
    // ~77 windows: stalling at each for the 5 s idle timeout would take minutes.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let got = conformance::results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
    let c = &bed.config;
    crate::delete_queues(&[&c.source.topic, &c.sink.topic, &c.dead_letter.topic], 4).await;
}

/// A `weir run` of the bed's pipeline with its log in `log`.
fn spawn(bed: &Bed, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.arg("run").arg(conformance::pipeline_file());
    cmd.args(["--broker", "amqp", "--exit-when-idle", "15s"]);
    for s in &bed.sets {
        cmd.arg("--set").arg(s);
    }
    let err = std::fs::File::create(log).expect("log file");
    cmd.env("WEIR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("weir run")
}

/// A bed of four partitions for two `weir run`s, committing often, closing idle windows
/// after 2 s.
fn two_instance_bed(case: &str) -> Bed {
    Bed::new(
        "amqp",
        case,
        &[
            PARTS,
            "source.commit_interval=300ms",
            "window.idle_timeout=2s",
        ],
    )
}

/// Starts `a`, then `b` 3 s later, and waits until they split the partitions.
async fn two_instances(bed: &Bed, log_a: &Path, log_b: &Path) -> (Child, Child) {
    let a = spawn(bed, log_a);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = spawn(bed, log_b);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    until("both hold partitions", Duration::from_secs(20), || {
        read(log_b).contains("partitions assigned") && read(log_a).contains("partitions revoked")
    })
    .await;
    (a, b)
}

/// Two `weir run`s share four partitions; one is killed (SIGKILL) while the data arrives:
/// the survivor takes its partitions over and every window is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_two_instances_one_killed_mid_stream_the_other_finishes_exactly() {
    crate::require_rabbitmq().await;
    let bed = two_instance_bed("part-kill");
    let data = lines(25, 30_000);
    let want = conformance::oracle(&data);
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let (mut a, mut b) = two_instances(&bed, &log_a, &log_b).await;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    // a dies while the data arrives and both are reading it.
    let produced = std::sync::atomic::AtomicUsize::new(0);
    let killer = async {
        until(
            "a third of the data is out",
            Duration::from_secs(60),
            || produced.load(Ordering::Relaxed) >= data.len() / 3,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.kill().expect("SIGKILL");
        let _ = a.wait();
        produced.load(Ordering::Relaxed)
    };
    let producer = async {
        for chunk in data.chunks(2_000) {
            bed.produce(chunk).await;
            produced.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    };
    let (killed_at, ()) = tokio::join!(killer, producer);
    assert!(
        killed_at < data.len(),
        "killed mid-stream ({killed_at} produced)"
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = b.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let _ = b.kill();
            panic!("b did not finish:\n{}", read(&log_b));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{status}\n{}", read(&log_b));
    let log = read(&log_b);
    let last = log
        .lines()
        .rfind(|l| l.contains("partitions assigned"))
        .unwrap_or_default()
        .to_string();
    for p in 0..4 {
        assert!(
            last.contains(&format!("({p}, ")),
            "b ended with every partition: {last}"
        );
    }
    // a had committed work on its partitions: b resumed them from a's checkpoints.
    assert!(log.contains("restored checkpoint"), "{log}");
    let got = conformance::results(
        &bed.read_all(&bed.config.sink.topic, Duration::from_secs(6))
            .await,
    );
    assert_eq!(got.len(), want.len(), "{}", read(&log_b));
    assert_eq!(got, want);
}

/// `partitions = 0` is refused at its line and column.
#[test]
fn amqp_zero_partitions_is_reported_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = conformance::shipped_brokers()
        .replace("prefetch = 10000", "prefetch = 10000\npartitions = 0");
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let line = text
        .lines()
        .position(|l| l.starts_with("partitions = 0"))
        .unwrap()
        + 1;
    let err = weir::Backend::load(&path, &Overrides::default()).expect_err("refused");
    let want = format!(
        "{}:{line}:14: brokers.amqp.partitions: 0 is out of range (allowed 1..=1024)",
        included.display()
    );
    assert!(err.to_string().contains(&want), "{err}");
}
