//! The conformance suite on Kinesis (the test bed's kinesalite, or any emulator at
//! WEIR_KINESIS_ENDPOINT), plus what only Kinesis has: checkpoint files, the 1 MiB record
//! limit, and `[brokers.kinesis]` checking; shard leases in DynamoDB are in `kinesis/`.
//!
//! These tests need a running emulator (and dynalite for the leases) and fail (never skip)
//! without one: `scripts/brokers up kinesis`.

#![cfg(feature = "kinesis")]

mod conformance;
mod kinesis;

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
    conformance::brokers::kinesis_wait_active(&client, topic).await;
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
