//! Weir next to the producers and consumers people already run: standard third-party
//! clients (confluent-kafka, pika, boto3 + aws-kinesis-agg, from the venv
//! `scripts/interop-venv` makes) against the real brokers of the test bed. Test names start
//! with the broker's name so `scripts/test` can leave a broker out explicitly.

mod conformance;
#[path = "interop/huge.rs"]
mod huge;
#[path = "interop/support.rs"]
mod support;
use conformance::thirdparty as interop;

use std::time::Duration;

use conformance::{oracle, results, Bed};
use huge::{a_huge_late_event_is_cut_to_fit, huge_event, the_huge_dead_letter_is_cut_to_fit};
use support::{
    assert_results, create_source, delete_amqp_queues, keyed, pika_records, run_counting,
    seed_lines,
};
use weir_engine::StopReason;

/// A topic compressed with zstd by a Java-like producer (librdkafka 2.16 in
/// confluent-kafka, `compression.type=zstd`) is read like any other codec: exactly the
/// oracle's counts. (Before, Weir's librdkafka had no zstd: a WARN every 10 s forever, or
/// the records skipped.)
#[tokio::test]
async fn kafka_reads_zstd_from_a_java_like_producer() {
    let bed = Bed::new("kafka", "zstd", &[]);
    // Weir creates the topic (4 partitions) as for any run.
    create_source(&bed, "topic").await;
    let data = seed_lines(14, 5_000, 20);
    let want = oracle(&data);
    let topic = &bed.config.source.topic;
    let sent = interop::kafka_produce(topic, "zstd", None, keyed(&data)).await;
    assert_eq!(sent.trim(), "5000");
    let summary = run_counting(&bed, (5_000, 5_000, 0)).await;
    assert_eq!(summary.reason, StopReason::Idle);
    assert_results(&bed, &want).await;
}

/// A standard consumer declares the queues Weir published to the way pika's docs do,
/// `queue_declare(queue, durable=True)`, after Weir made them: it works (no
/// `inequivalent arg 'x-single-active-consumer'`), and it reads exactly the oracle's
/// results, as JSON with `content_type` `application/json`, the key in `weir.key` and the
/// id in `weir.id`.
#[tokio::test]
async fn amqp_a_standard_consumer_declares_and_reads_the_results_queue() {
    let bed = Bed::without_queue_expiry("amqp", "pika-after", &[]);
    let mut data = seed_lines(15, 2_000, 20);
    data.push(b"{\"user_id\": \"User1\", not json".to_vec());
    let want = oracle(&data);
    bed.produce(&data).await;
    run_counting(&bed, (2_001, 2_000, 1)).await;
    let c = &bed.config;
    let queues = format!("{},{}", c.sink.topic, c.dead_letter.topic);
    let out = interop::pika_consume(&queues, None, false).await;
    let got = results(&pika_records(&out, &c.sink.topic));
    assert_eq!(got, want);
    let dead = pika_records(&out, &c.dead_letter.topic);
    assert_eq!(dead.len(), 1);
    let env: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert!(
        env["error"].as_str().unwrap().contains("invalid JSON"),
        "{env}"
    );
    assert_eq!(env["payload"], "{\"user_id\": \"User1\", not json");
    delete_amqp_queues(&bed).await;
}

/// Queues a standard client declared first, with arguments Weir does not set, are used as
/// they are: the results queue (`x-max-length`) and the dead-letter queue
/// (`x-message-ttl`) by Weir's sinks, the input queue (no single active consumer) by Weir's
/// source with an exclusive consumer. The counts are the oracle's.
#[tokio::test]
async fn amqp_queues_declared_first_by_another_client_are_used_as_they_are() {
    let bed = Bed::without_queue_expiry("amqp", "pika-first", &[]);
    let c = &bed.config;
    let max_length = r#"{"x-max-length": 100000}"#;
    for (queue, args) in [
        (&c.source.topic, ""),
        (&c.sink.topic, max_length),
        (&c.dead_letter.topic, r#"{"x-message-ttl": 3600000}"#),
    ] {
        interop::pika_consume(queue, Some(args), true).await;
    }
    let data = seed_lines(16, 2_000, 20);
    let want = oracle(&data);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    assert_eq!(summary.counters.windowed, 2_000, "{:?}", summary.counters);
    let out = interop::pika_consume(&c.sink.topic, Some(max_length), false).await;
    assert_eq!(results(&pika_records(&out, &c.sink.topic)), want);
    delete_amqp_queues(&bed).await;
}

/// Where using a queue as it is would not be safe — Weir's source needs a durable queue,
/// and another client declared it transient — the error names the argument that differs
/// and the setting to change.
#[tokio::test]
async fn amqp_an_inequivalent_queue_names_the_argument_and_the_setting() {
    let bed = Bed::without_queue_expiry("amqp", "pika-transient", &[]);
    let topic = bed.config.source.topic.clone();
    const TRANSIENT: &str = r#"
import os, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["URL"]))
conn.channel().queue_declare(os.environ["QUEUES"], durable=False)
conn.close()
"#;
    interop::pika_run(TRANSIENT, &topic).await;
    let err = match bed
        .backend
        .source(&topic, Some(&bed.config.source.group))
        .await
    {
        Ok(mut src) => src
            .recv(10, Duration::from_secs(5))
            .await
            .expect_err("a transient queue cannot be Weir's durable source")
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("inequivalent arg 'durable'"), "{err}");
    assert!(
        err.contains(&format!("queue `{topic}` already exists with another `durable` than Weir declares: change `brokers.amqp.durable`")),
        "{err}"
    );
    delete_amqp_queues(&bed).await;
}

/// One valid 2 MB event on Kafka (from a producer allowed 3 MB): its dead letter
/// ("payload exceeds max_payload_bytes") is cut to the producer's 1,000,000-byte
/// `message.max.bytes` with its original size in the envelope, instead of failing the run
/// (exit 1, and again on every restart).
#[tokio::test]
async fn kafka_a_2mb_event_becomes_a_dead_letter_cut_to_fit() {
    let bed = Bed::new("kafka", "huge", &[]);
    create_source(&bed, "topic").await;
    let event = huge_event(2_000_000, false);
    let mut input = keyed(&seed_lines(17, 100, 5));
    input.extend_from_slice(b"User1\t");
    input.extend_from_slice(&event);
    input.push(b'\n');
    let topic = &bed.config.source.topic;
    let sent = interop::kafka_produce(topic, "lz4", Some("3000000"), input).await;
    assert_eq!(sent.trim(), "101");
    the_huge_dead_letter_is_cut_to_fit(&bed, &event, 1_000_000).await;
}

/// The same on RabbitMQ with `max_message_bytes` set to 1,000,000 (RabbitMQ's own default
/// is 128 MiB).
#[tokio::test]
async fn amqp_a_2mb_event_becomes_a_dead_letter_cut_to_fit() {
    let bed = Bed::new("amqp", "huge", &["brokers.amqp.max_message_bytes=1000000"]);
    let event = huge_event(2_000_000, false);
    let mut data = seed_lines(17, 100, 5);
    data.push(event.clone());
    bed.produce(&data).await;
    the_huge_dead_letter_is_cut_to_fit(&bed, &event, 1_000_000).await;
}

/// The same on Kinesis, whose records are at most 1 MiB: a valid 900 kB event full of
/// escaped quotes, whose dead-letter envelope would be 1.8 MB.
#[tokio::test]
async fn kinesis_a_900kb_event_becomes_a_dead_letter_cut_to_fit() {
    let bed = Bed::new("kinesis", "huge", &[]);
    let event = huge_event(900_000, true);
    let mut data = seed_lines(17, 100, 5);
    data.push(event.clone());
    bed.produce(&data).await;
    the_huge_dead_letter_is_cut_to_fit(&bed, &event, 1024 * 1024).await;
}

/// Records aggregated by the Kinesis Producer Library's format (aws-kinesis-agg's
/// RecordAggregator, what the KPL writes by default; put with boto3), mixed with plain
/// ones, are de-aggregated into their user records: exactly the oracle's counts, no dead
/// letter. Each user record has its own position: a second run of the same group finds
/// nothing new to count.
#[tokio::test]
async fn kinesis_kpl_aggregated_records_are_deaggregated() {
    let bed = Bed::new("kinesis", "kpl", &[]);
    create_source(&bed, "stream").await;
    let data = seed_lines(18, 3_000, 20);
    let want = oracle(&data);
    let out = interop::kpl_put(&bed.config.source.topic, Some("200"), keyed(&data)).await;
    let (puts, users) = out.trim().split_once(' ').unwrap();
    let (puts, users): (usize, usize) = (puts.parse().unwrap(), users.parse().unwrap());
    assert_eq!(users, 3_000);
    assert!(
        puts < 400,
        "{puts} Kinesis records: the rest must be aggregates"
    );
    run_counting(&bed, (3_000, 3_000, 0)).await;
    assert_results(&bed, &want).await;
    let again = bed.run_until_idle().await.expect("second run");
    let s = again.counters;
    assert_eq!((s.windowed, s.dead_letters, s.late), (0, 0, 0), "{s:?}");
    assert_eq!(s.events_in, s.replayed, "{s:?}");
}

/// A commit in the middle of a KPL aggregate: the next reader of the group reads the
/// aggregate again from its first user record, with the same offsets, so the engine
/// recognises the ones already handled (their checkpoint says how far it got).
#[tokio::test]
async fn kinesis_a_commit_inside_an_aggregate_resumes_with_the_same_positions() {
    use weir_engine::{Checkpoint, Position, Received, Record};
    let bed = Bed::new("kinesis", "kpl-commit", &[]);
    let topic = bed.config.source.topic.clone();
    let group = bed.config.source.group.clone();
    drop(bed.backend.sink(&topic).await.expect("stream"));
    // One aggregate of 10 user records (one partition key: one shard).
    let data: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect();
    let mut input = Vec::new();
    for d in &data {
        input.extend_from_slice(b"K\t");
        input.extend_from_slice(d);
        input.push(b'\n');
    }
    let out = interop::kpl_put(&topic, None, input).await;
    assert_eq!(out.trim(), "1 10");
    async fn read(src: &mut dyn weir_engine::Source, n: usize) -> Vec<Record> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < n && tokio::time::Instant::now() < deadline {
            if let Received::Batch(b) = src.recv(100, Duration::from_millis(200)).await.unwrap() {
                got.extend(b);
            }
        }
        got
    }
    let mut src = bed.backend.source(&topic, Some(&group)).await.unwrap();
    let first = read(&mut *src, 10).await;
    assert_eq!(first.len(), 10);
    let payloads: Vec<&[u8]> = first.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(payloads, data.iter().map(|d| &d[..]).collect::<Vec<_>>());
    for r in &first {
        // Keyed by the Kinesis record's partition key (what chose the shard); the user
        // record's own key in a header.
        assert_eq!(r.key.as_deref(), Some(&b"K"[..]));
        assert!(
            r.headers
                .iter()
                .any(|(n, v)| n == "weir.kpl.partition_key" && &v[..] == b"K"),
            "{:?}",
            r.headers
        );
    }
    let offsets: Vec<u64> = first.iter().map(|r| r.position.offset).collect();
    assert_eq!(
        offsets,
        (offsets[0]..offsets[0] + 10).collect::<Vec<_>>(),
        "one offset each"
    );
    let p = first[0].position.partition;
    // Handled up to the 4th user record.
    let cp = Checkpoint {
        watermark: 0,
        processed: offsets[4],
    };
    src.commit(&[(
        Position {
            partition: p,
            offset: offsets[4],
        },
        cp,
    )])
    .await
    .unwrap();
    drop(src);
    let mut again = bed.backend.source(&topic, Some(&group)).await.unwrap();
    let second = read(&mut *again, 10).await;
    let got: Vec<(u64, &[u8])> = second
        .iter()
        .map(|r| (r.position.offset, &r.payload[..]))
        .collect();
    let want: Vec<(u64, &[u8])> = first
        .iter()
        .map(|r| (r.position.offset, &r.payload[..]))
        .collect();
    assert_eq!(got, want, "the whole aggregate again, same offsets");
}

/// A Kafka tombstone (null value) from a standard producer is a dead letter that says it
/// is a tombstone, with `"payload": null` and the `weir.null_value` header; an empty value
/// is an "empty payload". Neither is "EOF while parsing".
#[tokio::test]
async fn kafka_a_tombstone_is_told_apart_from_an_empty_value() {
    let bed = Bed::new("kafka", "tombstone", &[]);
    create_source(&bed, "topic").await;
    let mut input = keyed(&seed_lines(19, 10, 3));
    input.extend_from_slice(b"User1\t\\N\nUser2\t\n");
    let sent = interop::kafka_produce(&bed.config.source.topic, "gzip", None, input).await;
    assert_eq!(sent.trim(), "12");
    run_counting(&bed, (12, 10, 2)).await;
    let dead = bed
        .read(&bed.config.dead_letter.topic, 2, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 2);
    let by_key = |k: &[u8]| {
        let d = dead.iter().find(|d| d.key.as_deref() == Some(k)).unwrap();
        let env: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        (d.clone(), env)
    };
    let (t, env) = by_key(b"User1");
    assert!(
        env["error"]
            .as_str()
            .unwrap()
            .starts_with("null value (a Kafka tombstone)"),
        "{env}"
    );
    assert!(env["payload"].is_null(), "{env}");
    assert_eq!(env["key"], "User1");
    assert!(t
        .headers
        .iter()
        .any(|(n, v)| n == "weir.null_value" && &v[..] == b"true"));
    let (_, env) = by_key(b"User2");
    assert_eq!(env["error"], "empty payload: no JSON event");
    assert_eq!(env["payload"], "");
    for (_, env) in [by_key(b"User1"), by_key(b"User2")] {
        assert!(!env["error"].as_str().unwrap().contains("EOF"), "{env}");
    }
}

/// Headers without a value (null) on a record that becomes a dead letter come back null,
/// not as empty strings, to a standard consumer; empty ones stay empty.
#[tokio::test]
async fn kafka_null_headers_stay_null_on_a_dead_letter() {
    let bed = Bed::new("kafka", "null-headers", &[]);
    create_source(&bed, "topic").await;
    const PRODUCE: &str = r#"
import os
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": os.environ["BOOTSTRAP"]})
p.produce(os.environ["TOPIC"], key=b"User1", value=b"{not json",
          headers=[("h-null", None), ("h-empty", b""), ("h-text", b"x")])
assert p.flush(30) == 0
"#;
    let env = |topic: &str| {
        vec![
            ("BOOTSTRAP".to_string(), interop::kafka_bootstrap()),
            ("TOPIC".to_string(), topic.to_string()),
            ("COUNT".to_string(), "1".to_string()),
        ]
    };
    interop::run_async(PRODUCE, env(&bed.config.source.topic), Vec::new()).await;
    let summary = bed.run_until_idle().await.expect("run");
    assert_eq!(summary.counters.dead_letters, 1, "{:?}", summary.counters);
    let out = interop::run_async(
        interop::KAFKA_CONSUME,
        env(&bed.config.dead_letter.topic),
        Vec::new(),
    )
    .await;
    let d: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let h: Vec<(String, serde_json::Value)> = d["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].clone()))
        .collect();
    let get = |n: &str| {
        h.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {n} in {h:?}"))
    };
    assert!(get("h-null").is_null(), "{h:?}");
    assert_eq!(get("h-empty"), "");
    assert_eq!(get("h-text"), "x");
    assert!(get("weir.error").as_str().unwrap().contains("invalid JSON"));
    assert!(h.iter().all(|(k, _)| k != "weir.null_headers"), "{h:?}");
    assert_eq!(d["key"], "User1");
}

#[tokio::test]
async fn kafka_a_2mb_late_event_is_cut_to_fit() {
    a_huge_late_event_is_cut_to_fit("kafka", &[], 2_000_000, Some(1_000_000)).await;
}

#[tokio::test]
async fn amqp_a_2mb_late_event_is_cut_to_fit() {
    a_huge_late_event_is_cut_to_fit(
        "amqp",
        &["brokers.amqp.max_message_bytes=1000000"],
        2_000_000,
        Some(1_000_000),
    )
    .await;
}

/// On Kinesis a late record is the original record, which fitted as a source record, so
/// it is never over the limit: a 1,040,000-byte late event arrives whole.
#[tokio::test]
async fn kinesis_a_1mb_late_event_arrives_whole() {
    a_huge_late_event_is_cut_to_fit("kinesis", &[], 1_040_000, None).await;
}

/// A record batch librdkafka cannot decode (zstd header, garbage inside; written with a raw
/// ProduceRequest between good records) stops the run with an error naming the topic,
/// instead of being skipped (librdkafka moves past such a batch) with exit 0; and since
/// nothing past it was committed, a restart stops at it again. Apache Kafka validates the
/// batches it is given and refuses this one, so it is written to a broker of the test's
/// own that stores batches as given (Tansu): the broker a corrupted log would stand for.
#[tokio::test]
async fn kafka_an_undecodable_batch_is_a_loud_error_never_a_skip() {
    let tansu = support::PrivateTansu::start();
    let bootstrap = format!("127.0.0.1:{}", tansu.port);
    let at = format!("brokers.kafka.bootstrap_servers={bootstrap}");
    let bed = Bed::new("kafka", "undecodable", &["brokers.kafka.partitions=1", &at]);
    let topic = bed.config.source.topic.clone();
    drop(bed.backend.sink(&topic).await.expect("topic"));
    let produce = |lines: &[Vec<u8>]| {
        interop::kafka_produce_to(&bootstrap, &topic, "zstd", None, keyed(lines))
    };
    let data = seed_lines(21, 100, 5);
    assert_eq!(produce(&data[..50]).await.trim(), "50");
    let err = interop::run_async(
        interop::KAFKA_CORRUPT_ZSTD_BATCH,
        vec![
            ("BOOTSTRAP".into(), bootstrap.clone()),
            ("TOPIC".into(), topic.clone()),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(err.trim(), "0", "the broker stored the batch");
    assert_eq!(produce(&data[50..]).await.trim(), "50");
    for run in ["first run", "restart"] {
        // Not a stall either (librdkafka's error retried forever).
        let e = tokio::time::timeout(Duration::from_secs(60), bed.run_until_idle())
            .await
            .expect("the run must stop, not stall")
            .expect_err("an undecodable batch must stop the run")
            .to_string();
        assert!(
            e.contains(&format!("records of `{topic}` cannot be decoded")),
            "{run}: {e}"
        );
        assert!(
            e.contains("Invalid compressed data") || e.contains("BadCompression"),
            "{run}: {e}"
        );
    }
}
