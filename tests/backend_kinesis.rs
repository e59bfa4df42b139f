//! The conformance suite on Kinesis (the test bed's kinesalite, or any emulator at
//! WEIR_KINESIS_ENDPOINT), plus what only Kinesis has: checkpoint files, the 1 MiB record
//! limit, and `[brokers.kinesis]` checking.
//!
//! These tests need a running emulator and fail (never skip) without one:
//! `scripts/brokers up kinesis`.

#![cfg(feature = "kinesis")]

mod conformance;

use std::time::Duration;

use bytes::Bytes;
use conformance::Bed;
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::{OutRecord, Received};

conformance::suite!(kinesis_suite: "kinesis");

/// Panics with instructions unless something answers at the emulator's address.
fn require_kinesis() {
    conformance::brokers::require(conformance::brokers::get("kinesis"));
}

/// Deletes the streams and checkpoint folders of the beds this test made (kinesalite
/// keeps every stream in memory).
async fn clean_up(_case: &str) {
    conformance::brokers::get("kinesis")
        .clean_up(&conformance::take_bed_ids())
        .await;
}

/// A record over Kinesis' 1 MiB limit fails the send clearly (not retryable); records
/// within it round-trip with key, payload and an arrival timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_sink_limits_and_round_trip() {
    require_kinesis();
    let bed = Bed::new("kinesis", "limits", &[]);
    let topic = &bed.config.sink.topic;
    let mut sink = bed.backend.sink(topic).await.expect("sink");
    let big = OutRecord {
        key: Some(Bytes::from_static(b"k")),
        payload: Bytes::from(vec![b'x'; 1024 * 1024]),
        ..Default::default()
    };
    let err = sink.send(&[big]).await.expect_err("over 1 MiB");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("over Kinesis' limit"), "{err}");
    // 1,200 records of ~5 KiB: more than one PutRecords request by count and by size.
    let batch: Vec<OutRecord> = (0..1200)
        .map(|i| OutRecord {
            key: Some(Bytes::from(format!("key{}", i % 7))),
            payload: Bytes::from(format!("{i:05}{}", "p".repeat(5000))),
            ..Default::default()
        })
        .collect();
    let before = weir_engine::time::now_millis() - 60_000;
    sink.send(&batch).await.expect("send");
    let got = bed.read(topic, 1200, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1200);
    let mut seen: Vec<usize> = got
        .iter()
        .map(|r| {
            let i: usize = std::str::from_utf8(&r.payload[..5])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(r.key.as_deref(), Some(format!("key{}", i % 7).as_bytes()));
            assert!(r.timestamp.is_some_and(|t| t > before), "{:?}", r.timestamp);
            i
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..1200).collect::<Vec<_>>());
    clean_up("limits").await;
}

/// Committing writes the checkpoint file; a new source of the same group resumes after
/// the committed sequence number with the same partition indexes and gets its checkpoint
/// back in `Assigned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_source_resumes_from_the_checkpoint_file() {
    require_kinesis();
    let bed = Bed::new("kinesis", "resume", &[]);
    let topic = bed.config.source.topic.clone();
    put_numbers(&bed, &topic, 100).await;

    let mut first = bed.backend.source(&topic, Some("g")).await.unwrap();
    let (assigned, recs) = read_all(&mut *first).await;
    assert_eq!(assigned.len(), 4, "{assigned:?}");
    assert!(assigned.iter().all(|(_, cp)| cp.is_none()));
    assert_eq!(recs.len(), 100);
    // Commit the first half of each partition.
    let mut positions = Vec::new();
    let mut expect_rest = 0;
    for p in 0..4u32 {
        let offs: Vec<u64> = recs
            .iter()
            .filter(|r| r.position.partition == p)
            .map(|r| r.position.offset)
            .collect();
        assert_eq!(offs, (0..offs.len() as u64).collect::<Vec<_>>());
        let half = offs.len() as u64 / 2;
        expect_rest += offs.len() as u64 - half;
        positions.push((
            weir_engine::Position {
                partition: p,
                offset: half,
            },
            weir_engine::Checkpoint {
                watermark: 1000 + p as i64,
                processed: offs.len() as u64,
            },
        ));
    }
    first.commit(&positions).await.unwrap();
    drop(first);

    let mut second = bed.backend.source(&topic, Some("g")).await.unwrap();
    let (assigned, rest) = read_all(&mut *second).await;
    let mut assigned = assigned;
    assigned.sort_by_key(|(p, _)| *p);
    for ((p, cp), (pos, want)) in assigned.iter().zip(&positions) {
        assert_eq!(*p, pos.partition);
        assert_eq!(cp.as_ref(), Some(want));
    }
    assert_eq!(rest.len() as u64, expect_rest);
    for r in &rest {
        let pos = positions[r.position.partition as usize].0;
        assert!(r.position.offset >= pos.offset, "{:?}", r.position);
        let same = recs
            .iter()
            .find(|o| o.position == r.position)
            .expect("same offsets after restart");
        assert_eq!(same.payload, r.payload);
    }
    clean_up("resume").await;
}

/// Everything a source delivers within 4 s: partitions assigned and records.
async fn read_all(
    src: &mut dyn weir_engine::Source,
) -> (
    Vec<(u32, Option<weir_engine::Checkpoint>)>,
    Vec<weir_engine::Record>,
) {
    let mut assigned = Vec::new();
    let mut recs = Vec::new();
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        match src.recv(1000, Duration::from_millis(200)).await.unwrap() {
            Received::Assigned(p) => assigned.extend(p),
            Received::Batch(b) => recs.extend(b),
            _ => {}
        }
    }
    (assigned, recs)
}

/// Resharding: records put before a split are all delivered before any record of the
/// children (the parent is read to its end first), the children arrive as newly assigned
/// partitions, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_source_reads_a_parent_shard_before_its_children() {
    require_kinesis();
    let bed = Bed::new("kinesis", "reshard", &["brokers.kinesis.shards=1"]);
    let topic = bed.config.source.topic.clone();
    put_split_put(&bed, &topic).await;

    let mut src = bed.backend.source(&topic, Some("g")).await.unwrap();
    let (assigned, recs) = read_all(&mut *src).await;
    let parts: Vec<u32> = assigned.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        parts,
        vec![0, 0, 1, 2],
        "the parent first, then the whole set: the parent and its two children"
    );
    assert_eq!(recs.len(), 120);
    let first_b = recs
        .iter()
        .position(|r| r.payload.starts_with(b"b"))
        .unwrap();
    assert_eq!(
        first_b, 60,
        "every parent record comes before the children's"
    );
    assert!(recs[..60].iter().all(|r| r.position.partition == 0));
    assert!(recs[60..].iter().all(|r| r.position.partition > 0));
    clean_up("reshard").await;
}

/// Puts 60 records ("a0".."a59"), splits the stream's one shard in two and waits until
/// the stream is ACTIVE again, then puts 60 more ("b0".."b59").
async fn put_split_put(bed: &Bed, topic: &str) {
    let mut sink = bed.backend.sink(topic).await.expect("sink");
    let put = |tag: &'static str| {
        (0..60)
            .map(|i| OutRecord {
                key: Some(Bytes::from(format!("k{i}"))),
                payload: Bytes::from(format!("{tag}{i}")),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    sink.send(&put("a")).await.expect("send before the split");
    let Some(kinesis) = bed.backend.get::<weir_kinesis::KinesisBroker>() else {
        unreachable!()
    };
    let client = kinesis.client().await.unwrap();
    client
        .split_shard()
        .stream_name(topic)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .expect("SplitShard");
    let active = weir_kinesis::aws_sdk_kinesis::types::StreamStatus::Active;
    let start = tokio::time::Instant::now();
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(topic)
            .send()
            .await
            .unwrap();
        if d.stream_description_summary().unwrap().stream_status() == &active {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "split never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.send(&put("b")).await.expect("send after the split");
}

/// An endpoint nobody listens on is a retryable error that names it.
#[tokio::test]
async fn kinesis_unreachable_endpoint_is_a_clear_retryable_error() {
    let bed = Bed::new(
        "kinesis",
        "down",
        &["brokers.kinesis.endpoint_url=http://127.0.0.1:9"],
    );
    let err = bed
        .backend
        .sink("nowhere")
        .await
        .err()
        .expect("nothing listens on port 9");
    let text = err.to_string();
    assert!(
        text.contains("http://127.0.0.1:9 is not reachable"),
        "{text}"
    );
    assert!(err.is_retryable(), "{err}");
}

/// Every problem in `[brokers.kinesis]` is reported with its place, unknown keys included.
#[test]
fn kinesis_config_problems_are_all_reported() {
    let overrides = Overrides {
        sets: vec![
            "brokers.kinesis.shards=0".into(),
            "brokers.kinesis.start_position=sometime".into(),
            "brokers.kinesis.endpoint_url=localhost:4567".into(),
            "brokers.kinesis.credentails=chain".into(),
        ],
        broker: Some(("kinesis".into(), "--broker kinesis".into())),
    };
    let err = Backend::load(&conformance::pipeline_file(), &overrides).expect_err("invalid");
    let text = err.to_string();
    for want in [
        "brokers.kinesis.shards",
        "brokers.kinesis.start_position",
        "brokers.kinesis.endpoint_url",
        "brokers.kinesis.credentails",
        "did you mean `credentials`",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

/// `weir tail`'s reader: from the latest record it sees only what is put after it started;
/// from the trim horizon it sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_tail_reader_from_latest_or_the_beginning() {
    require_kinesis();
    let bed = Bed::new("kinesis", "tail", &[]);
    let topic = bed.config.sink.topic.clone();
    let old: Vec<Vec<u8>> = (0..10)
        .map(|i| format!(r#"{{"user_id":"User{i}","old":true}}"#).into_bytes())
        .collect();
    bed.produce_to(&topic, &old).await;
    let mut latest = bed
        .backend
        .reader(&topic, false)
        .await
        .unwrap()
        .expect("a reader");
    // Let the reader take its shard iterators before anything new is put.
    let mut assigned = false;
    let t0 = std::time::Instant::now();
    while !assigned && t0.elapsed() < Duration::from_secs(20) {
        let r = latest.recv(100, Duration::from_millis(200)).await.unwrap();
        assigned = matches!(r, weir_engine::Received::Assigned(_));
    }
    for _ in 0..3 {
        let r = latest.recv(100, Duration::from_millis(200)).await.unwrap();
        assert!(
            !matches!(&r, weir_engine::Received::Batch(b) if !b.is_empty()),
            "old records seen from the latest position"
        );
    }
    let new: Vec<Vec<u8>> = (0..10)
        .map(|i| format!(r#"{{"user_id":"User{i}","old":false}}"#).into_bytes())
        .collect();
    bed.produce_to(&topic, &new).await;
    let read_all = |mut src: Box<dyn weir_engine::Source>, n: usize| async move {
        let mut seen = Vec::new();
        let t0 = std::time::Instant::now();
        while seen.len() < n && t0.elapsed() < Duration::from_secs(30) {
            if let weir_engine::Received::Batch(b) =
                src.recv(100, Duration::from_millis(200)).await.unwrap()
            {
                seen.extend(b.into_iter().map(|r| r.payload.to_vec()));
            }
        }
        seen.sort();
        seen
    };
    let mut want = new.clone();
    want.sort();
    assert_eq!(read_all(latest, new.len()).await, want);
    let beginning = bed
        .backend
        .reader(&topic, true)
        .await
        .unwrap()
        .expect("a reader");
    let mut want: Vec<Vec<u8>> = old.iter().chain(&new).cloned().collect();
    want.sort();
    assert_eq!(read_all(beginning, want.len()).await, want);
    clean_up("tail").await;
}

/// The DynamoDB emulator of the lease tests: WEIR_DYNAMODB_ENDPOINT, or dynalite where
/// `scripts/brokers up kinesis` starts it. Panics with instructions when nothing answers.
fn dynamodb_endpoint() -> String {
    let ep =
        std::env::var("WEIR_DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4568".into());
    let hp = ep
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok());
    assert!(
        reachable,
        "DynamoDB (dynalite) at {hp} is not reachable: run scripts/brokers up kinesis (or set WEIR_DYNAMODB_ENDPOINT)"
    );
    ep
}

/// A bed whose sources hold shard leases in dynalite (2 s leases, renewed every 667 ms),
/// with `extra` settings.
fn lease_bed(case: &str, extra: &[&str]) -> Bed {
    require_kinesis();
    let ep = format!(
        "brokers.kinesis.dynamodb_endpoint_url={}",
        dynamodb_endpoint()
    );
    let mut sets = vec![
        "brokers.kinesis.leases=dynamodb",
        &ep,
        "brokers.kinesis.create_lease_table=true",
        "brokers.kinesis.lease_duration=2s",
        "brokers.kinesis.poll_interval=100ms",
    ];
    sets.extend(extra);
    Bed::new("kinesis", case, &sets)
}

/// A client of `bed`'s lease table's DynamoDB.
async fn dynamodb(bed: &Bed) -> weir_kinesis::aws_sdk_dynamodb::Client {
    let Some(kinesis) = bed.backend.get::<weir_kinesis::KinesisBroker>() else {
        unreachable!("a kinesis bed has the Kinesis backend")
    };
    kinesis
        .lease_client()
        .await
        .unwrap()
        .expect("leases are configured")
}

/// One source of a group, with what it holds and what it read of the partitions it holds.
struct Member {
    src: Box<dyn weir_engine::Source>,
    parts: std::collections::BTreeMap<u32, Option<weir_engine::Checkpoint>>,
    recs: Vec<weir_engine::Record>,
    revoked: Vec<u32>,
}

impl Member {
    fn new(src: Box<dyn weir_engine::Source>) -> Self {
        Member {
            src,
            parts: Default::default(),
            recs: Vec::new(),
            revoked: Vec::new(),
        }
    }

    /// One `recv`; a revoked partition's records are forgotten (its next owner reads
    /// them again from the committed position).
    async fn poll(&mut self) {
        match self
            .src
            .recv(1000, Duration::from_millis(50))
            .await
            .unwrap()
        {
            // The whole current set; a partition's checkpoint comes when it is new.
            Received::Assigned(ps) => {
                let old = std::mem::take(&mut self.parts);
                for (p, cp) in ps {
                    self.parts.insert(p, cp.or(old.get(&p).copied().flatten()));
                }
            }
            Received::Revoked(ps) => {
                for p in &ps {
                    self.parts.remove(p);
                }
                self.recs.retain(|r| !ps.contains(&r.position.partition));
                self.revoked.extend(ps);
            }
            Received::Batch(b) => {
                assert!(
                    b.iter()
                        .all(|r| self.parts.contains_key(&r.position.partition)),
                    "a record of a partition not held"
                );
                self.recs.extend(b)
            }
            Received::End => panic!("a Kinesis source never ends"),
        }
    }

    fn of(&self, p: u32) -> Vec<&weir_engine::Record> {
        self.recs
            .iter()
            .filter(|r| r.position.partition == p)
            .collect()
    }
}

/// `n` records with keys k0, k1, … and the number as payload.
async fn put_numbers(bed: &Bed, topic: &str, n: usize) {
    let mut sink = bed.backend.sink(topic).await.expect("sink");
    let batch: Vec<OutRecord> = (0..n)
        .map(|i| OutRecord {
            key: Some(Bytes::from(format!("k{i}"))),
            payload: Bytes::from(format!("{i}")),
            ..Default::default()
        })
        .collect();
    sink.send(&batch).await.expect("send");
}

fn numbers<'a>(recs: impl IntoIterator<Item = &'a weir_engine::Record>) -> Vec<usize> {
    let mut v: Vec<usize> = recs
        .into_iter()
        .map(|r| std::str::from_utf8(&r.payload).unwrap().parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

/// Two sources of one group split a 4-shard stream's leases two and two, reading every
/// record once between them. One is dropped (it stops renewing, as if killed): once its
/// leases expire the other takes them and resumes each from its committed checkpoint,
/// with the same offsets and nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_split_shards_and_fail_over() {
    let bed = lease_bed("lease-split", &[]);
    let topic = bed.config.source.topic.clone();
    put_numbers(&bed, &topic, 400).await;
    let mut a = Member::new(bed.backend.source(&topic, Some("g")).await.unwrap());
    let mut b = Member::new(bed.backend.source(&topic, Some("g")).await.unwrap());
    let start = tokio::time::Instant::now();
    let mut settled: Option<tokio::time::Instant> = None;
    loop {
        a.poll().await;
        b.poll().await;
        let done = a.parts.len() == 2 && b.parts.len() == 2 && a.recs.len() + b.recs.len() == 400;
        match (done, settled) {
            (false, _) => settled = None,
            (true, None) => settled = Some(tokio::time::Instant::now()),
            // Stable for two lease durations: balancing is over.
            (true, Some(t)) if t.elapsed() > Duration::from_secs(4) => break,
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no 2 + 2 split: a {:?} ({} records), b {:?} ({} records)",
            a.parts.keys(),
            a.recs.len(),
            b.parts.keys(),
            b.recs.len()
        );
    }
    let mut all: Vec<u32> = a.parts.keys().chain(b.parts.keys()).copied().collect();
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3], "each partition held once");
    assert_eq!(
        numbers(a.recs.iter().chain(&b.recs)),
        (0..400).collect::<Vec<_>>(),
        "every record read once between them"
    );
    for m in [&a, &b] {
        for &p in m.parts.keys() {
            let offs: Vec<u64> = m.of(p).iter().map(|r| r.position.offset).collect();
            assert_eq!(
                offs,
                (0..offs.len() as u64).collect::<Vec<_>>(),
                "partition {p}"
            );
        }
    }

    // A commits all it read; B commits the first half of each of its partitions.
    let cp = |p: u32, n: u64| weir_engine::Checkpoint {
        watermark: 1000 + p as i64,
        processed: n,
    };
    let pos = |partition, offset| weir_engine::Position { partition, offset };
    let mine: Vec<_> = a
        .parts
        .keys()
        .map(|&p| (pos(p, a.of(p).len() as u64), cp(p, a.of(p).len() as u64)))
        .collect();
    a.src.commit(&mine).await.unwrap();
    let halves: Vec<_> = b
        .parts
        .keys()
        .map(|&p| {
            (
                pos(p, b.of(p).len() as u64 / 2),
                cp(p, b.of(p).len() as u64 / 2),
            )
        })
        .collect();
    b.src.commit(&halves).await.unwrap();
    let b_parts: Vec<u32> = b.parts.keys().copied().collect();
    let rest: Vec<(u64, u32, Bytes)> = b
        .recs
        .iter()
        .filter(|r| r.position.offset >= b.of(r.position.partition).len() as u64 / 2)
        .map(|r| (r.position.offset, r.position.partition, r.payload.clone()))
        .collect();
    let a_before = a.recs.len();
    drop(b);
    let dropped = tokio::time::Instant::now();
    let mut taken_after = None;
    while a.parts.len() < 4 || a.recs.len() < a_before + rest.len() {
        a.poll().await;
        if a.parts.len() == 4 && taken_after.is_none() {
            taken_after = Some(dropped.elapsed());
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(20),
            "no takeover: a holds {:?} with {} records",
            a.parts.keys(),
            a.recs.len()
        );
    }
    // A little longer: nothing more (no duplicates) arrives.
    for _ in 0..10 {
        a.poll().await;
    }
    let taken_after = taken_after.unwrap();
    eprintln!("B's leases taken over {taken_after:?} after it stopped (lease_duration 2s)");
    assert!(
        taken_after >= Duration::from_millis(1300),
        "B's leases were taken before they expired ({taken_after:?})"
    );
    assert!(a.revoked.is_empty() || a.revoked.iter().all(|p| b_parts.contains(p)));
    for (p, got) in &a.parts {
        let want = halves
            .iter()
            .find(|(q, _)| q.partition == *p)
            .map(|(_, c)| *c);
        if b_parts.contains(p) {
            assert_eq!(*got, want, "partition {p} resumes with B's checkpoint");
        }
    }
    let mut resumed: Vec<(u64, u32, Bytes)> = a
        .recs
        .iter()
        .filter(|r| b_parts.contains(&r.position.partition))
        .map(|r| (r.position.offset, r.position.partition, r.payload.clone()))
        .collect();
    let mut rest = rest;
    resumed.sort();
    rest.sort();
    assert_eq!(
        resumed, rest,
        "A reads B's partitions from B's committed offsets, with the same offsets"
    );
    assert_eq!(a.recs.len(), a_before + rest.len(), "nothing twice");
    clean_up("lease-split").await;
}

/// A commit by a source whose lease was taken over is refused: the lease keeps the new
/// owner's state and the partition is revoked; its other leases commit normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_lease_commit_by_a_stale_owner_is_refused() {
    use weir_kinesis::aws_sdk_dynamodb::types::AttributeValue;
    let bed = lease_bed("lease-stale", &[]);
    let topic = bed.config.source.topic.clone();
    put_numbers(&bed, &topic, 40).await;
    let mut a = Member::new(bed.backend.source(&topic, Some("g")).await.unwrap());
    let start = tokio::time::Instant::now();
    while a.parts.len() < 4 || a.recs.len() < 40 {
        a.poll().await;
        assert!(start.elapsed() < Duration::from_secs(20), "{:?}", a.parts);
    }
    let ddb = dynamodb(&bed).await;
    let table = format!("weir-leases-{topic}-g");
    let items = ddb
        .scan()
        .table_name(&table)
        .consistent_read(true)
        .send()
        .await
        .expect("scan the lease table");
    let shard_of = |p: u32| -> String {
        items
            .items()
            .iter()
            .find(|i| i.get("weirPartition") == Some(&AttributeValue::N(p.to_string())))
            .and_then(|i| i.get("leaseKey")?.as_s().ok().cloned())
            .expect("a lease per partition")
    };
    let (stolen, kept) = (shard_of(0), shard_of(1));
    // Another worker takes partition 0's lease.
    ddb.update_item()
        .table_name(&table)
        .key("leaseKey", AttributeValue::S(stolen.clone()))
        .update_expression("SET leaseOwner = :o, weirToken = :t ADD leaseCounter :one")
        .expression_attribute_values(":o", AttributeValue::S("intruder".into()))
        .expression_attribute_values(":t", AttributeValue::S("intruder#1".into()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("take over the lease");
    let cp = weir_engine::Checkpoint {
        watermark: 77,
        processed: 5,
    };
    let commit: Vec<_> = [0u32, 1]
        .iter()
        .map(|&p| {
            let n = a.of(p).len() as u64;
            (
                weir_engine::Position {
                    partition: p,
                    offset: n,
                },
                cp,
            )
        })
        .collect();
    a.src
        .commit(&commit)
        .await
        .expect("a refused lease is no error");
    let t = tokio::time::Instant::now();
    while a.parts.contains_key(&0) {
        a.poll().await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "partition 0 not revoked"
        );
    }
    assert_eq!(
        a.revoked,
        vec![0],
        "only the lost lease's partition is revoked"
    );
    let get = |shard: String| {
        let ddb = ddb.clone();
        let table = table.clone();
        async move {
            ddb.get_item()
                .table_name(table)
                .key("leaseKey", AttributeValue::S(shard))
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .item()
                .cloned()
                .unwrap()
        }
    };
    let s = |i: &std::collections::HashMap<String, AttributeValue>, k: &str| {
        i.get(k)
            .map(|v| v.as_s().or_else(|_| v.as_n()).unwrap().clone())
    };
    let lost = get(stolen).await;
    assert_eq!(s(&lost, "leaseOwner").as_deref(), Some("intruder"));
    assert_eq!(
        s(&lost, "weirNextOffset").as_deref(),
        Some("0"),
        "the stale commit is refused"
    );
    assert_eq!(s(&lost, "weirCheckpoint"), None);
    let held = get(kept).await;
    assert_eq!(
        s(&held, "weirNextOffset"),
        Some(a.of(1).len().to_string()),
        "the lease still held is committed"
    );
    assert_eq!(s(&held, "weirCheckpoint"), Some(cp.encode()));
    clean_up("lease-stale").await;
}

/// The lease settings are checked with the others, each problem at its file:line:col.
#[test]
fn kinesis_lease_config_problems_are_reported_at_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("leases = \"dynamodb\"", None),
        ("lease_duration = \"100ms\"", Some("brokers.kinesis.lease_duration: must be between 1s and 1h")),
        ("lease_table = \"a!\"", Some("brokers.kinesis.lease_table: `a!` is not a DynamoDB table name")),
        ("dynamodb_endpoint_url = \"localhost:4568\"", Some("brokers.kinesis.dynamodb_endpoint_url: `localhost:4568` is not an http:// or https:// URL")),
        ("create_lease_table = \"yes\"", Some("brokers.kinesis.create_lease_table: expected true or false")),
    ];
    let lines: Vec<&str> = bad.iter().map(|(l, _)| *l).collect();
    let text = conformance::shipped_brokers().replace(
        "poll_interval = \"250ms\"",
        &format!("poll_interval = \"250ms\"\n{}", lines.join("\n")),
    );
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let overrides = Overrides {
        sets: Vec::new(),
        broker: Some(("kinesis".into(), "--broker kinesis".into())),
    };
    let msg = Backend::load(&path, &overrides)
        .expect_err("invalid")
        .to_string();
    for (line, want) in &bad {
        let Some(want) = want else { continue };
        let n = text.lines().position(|l| l == *line).unwrap() + 1;
        let place = format!("{}:{n}:", included.display());
        assert!(
            msg.lines().any(|l| l.contains(&place) && l.contains(want)),
            "{want:?} at {place} missing from:\n{msg}"
        );
    }
    // Lease keys without leases = "dynamodb" are a mistake too.
    let text = conformance::shipped_brokers().replace(
        "poll_interval = \"250ms\"",
        "poll_interval = \"250ms\"\nleases = \"files\"\nlease_table = \"weir-leases\"",
    );
    let (path, included) = conformance::pipeline_with_brokers(dir.path(), &text);
    let msg = Backend::load(&path, &overrides)
        .expect_err("invalid")
        .to_string();
    let n = text
        .lines()
        .position(|l| l.starts_with("lease_table"))
        .unwrap()
        + 1;
    assert!(
        msg.contains(&format!(
            "{}:{n}:15: brokers.kinesis.lease_table: only used with leases = \"dynamodb\"",
            included.display()
        )),
        "{msg}"
    );
}

/// Resharding under leases: the children's leases are taken only once the parent's lease
/// is finished, which needs every parent record read *and committed*; then the children
/// arrive as new partitions and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_take_children_after_the_parent_is_finished() {
    use weir_kinesis::aws_sdk_dynamodb::types::AttributeValue;
    let bed = lease_bed("lease-reshard", &["brokers.kinesis.shards=1"]);
    let topic = bed.config.source.topic.clone();
    put_split_put(&bed, &topic).await;
    let mut a = Member::new(bed.backend.source(&topic, Some("g")).await.unwrap());
    // Two lease durations: the parent is read to its end, nothing else is leased.
    let t = tokio::time::Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        a.poll().await;
    }
    assert_eq!(a.parts.keys().copied().collect::<Vec<_>>(), vec![0]);
    assert_eq!(a.recs.len(), 60);
    assert!(a.recs.iter().all(|r| r.payload.starts_with(b"a")));
    let cp = weir_engine::Checkpoint {
        watermark: 1,
        processed: 60,
    };
    let end = weir_engine::Position {
        partition: 0,
        offset: 60,
    };
    a.src.commit(&[(end, cp)]).await.unwrap();
    let t = tokio::time::Instant::now();
    while a.parts.len() < 3 || a.recs.len() < 120 {
        a.poll().await;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "children not leased after the parent finished: {:?}, {} records",
            a.parts,
            a.recs.len()
        );
    }
    assert_eq!(a.parts.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(a.revoked, Vec::<u32>::new());
    let b: Vec<&[u8]> = a.recs[60..].iter().map(|r| &r.payload[..]).collect();
    assert!(
        b.iter().all(|p| p.starts_with(b"b")),
        "children after the parent"
    );
    assert_eq!(b.len(), 60);
    let parent = dynamodb(&bed)
        .await
        .get_item()
        .table_name(format!("weir-leases-{topic}-g"))
        .key("leaseKey", AttributeValue::S("shardId-000000000000".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    let item = parent.item().unwrap();
    assert_eq!(
        item.get("checkpoint"),
        Some(&AttributeValue::S("SHARD_END".into()))
    );
    assert_eq!(
        item.get("weirNextOffset"),
        Some(&AttributeValue::N("60".into()))
    );
    clean_up("lease-reshard").await;
}
