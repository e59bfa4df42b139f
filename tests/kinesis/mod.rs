//! Shard leases in DynamoDB (`leases = "dynamodb"`) against kinesalite and dynalite: sources
//! splitting a stream's shards and failing over, a stale owner's commit refused, children
//! leased only after their parent is finished, and the settings' checks.

use std::time::Duration;

use bytes::Bytes;
use weir::Backend;
use weir_engine::config::Overrides;
use weir_engine::Received;

use crate::conformance::{self, Bed};
use crate::{clean_up, put_numbers, put_split_put, require_kinesis};

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

pub(crate) fn numbers<'a>(recs: impl IntoIterator<Item = &'a weir_engine::Record>) -> Vec<usize> {
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

/// Resharding under leases: the worker holding the parent takes its children once the
/// parent is read to its end, before its lease is finished (the children count in the
/// parent's task, whose windows still hold parent records); their records come after
/// every parent record, nothing is lost, and the parent's lease is finished once its
/// records are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_leases_take_children_once_the_parent_is_read_to_its_end() {
    use weir_kinesis::aws_sdk_dynamodb::types::AttributeValue;
    let bed = lease_bed("lease-reshard", &["brokers.kinesis.shards=1"]);
    let topic = bed.config.source.topic.clone();
    put_split_put(&bed, &topic).await;
    let mut a = Member::new(bed.backend.source(&topic, Some("g")).await.unwrap());
    let t = tokio::time::Instant::now();
    while a.parts.len() < 3 || a.recs.len() < 120 {
        a.poll().await;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "children not leased after the parent was read: {:?}, {} records",
            a.parts,
            a.recs.len()
        );
    }
    assert_eq!(a.parts.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(a.revoked, Vec::<u32>::new());
    assert!(a.recs[..60].iter().all(|r| r.payload.starts_with(b"a")));
    let b: Vec<&[u8]> = a.recs[60..].iter().map(|r| &r.payload[..]).collect();
    assert!(
        b.iter().all(|p| p.starts_with(b"b")),
        "children after the parent"
    );
    assert_eq!(b.len(), 60);
    let cp = weir_engine::Checkpoint {
        watermark: 1,
        processed: 60,
    };
    let end = weir_engine::Position {
        partition: 0,
        offset: 60,
    };
    a.src.commit(&[(end, cp)]).await.unwrap();
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
