//! Events too large for the broker: the scenarios the interop tests of every broker run.

use std::time::Duration;

use crate::conformance::Bed;
use crate::interop;
use crate::support::{create_source, keyed, seed_lines};

/// A valid seed event whose `metadata.user_agent` makes it `size` bytes; with `quotes`,
/// the padding is escaped quotes (`\"`), which a dead letter's envelope doubles.
pub fn huge_event(size: usize, quotes: bool) -> Vec<u8> {
    let head = r#"{"event_type":"click","user_id":"User1","action":"a","timestamp":"2024-06-27 15:00:01.000","metadata":{"user_agent":""#;
    let tail = r#""}}"#;
    let pad = size - head.len() - tail.len();
    let body = if quotes {
        "\\\"".repeat(pad / 2) + &"x".repeat(pad % 2)
    } else {
        "x".repeat(pad)
    };
    let e = format!("{head}{body}{tail}").into_bytes();
    assert_eq!(e.len(), size);
    serde_json::from_slice::<serde_json::Value>(&e).expect("the huge event is valid JSON");
    e
}

/// Runs the bed's pipeline over its source (one huge event and 100 seed events) and checks
/// the huge event's dead letter: it arrived, within `limit` bytes, cut, with the original
/// size and a prefix of the original payload; the run did not fail; the other events
/// were counted.
pub async fn the_huge_dead_letter_is_cut_to_fit(bed: &Bed, event: &[u8], limit: usize) {
    let summary = bed
        .run_until_idle()
        .await
        .expect("a dead letter never fails the run for its size");
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.dead_letters),
        (101, 100, 1),
        "{s:?}"
    );
    let dead = bed
        .read(&bed.config.dead_letter.topic, 1, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert!(d.payload.len() <= limit, "{} > {limit}", d.payload.len());
    let env: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
    assert!(
        env["error"].as_str().unwrap().contains("bytes"),
        "{}",
        env["error"]
    );
    assert_eq!(env["payload_truncated"], true);
    assert_eq!(env["payload_bytes"], event.len());
    let kept = env["payload"].as_str().unwrap();
    assert!(kept.len() > limit / 4, "kept {} bytes", kept.len());
    assert!(event.starts_with(kept.as_bytes()));
    assert_eq!(env["source"]["topic"], bed.config.source.topic);
}

/// A late event too large for the broker (events up to 3 MB allowed, `[late]` topic set):
/// its late record is cut to fit, as an envelope naming the window it missed, with the
/// original size; the run does not fail. One partition/shard so the order is the
/// production order. On Kafka the events come from a confluent-kafka producer allowed
/// 3 MB, while Weir's producer keeps librdkafka's 1,000,000.
pub async fn a_huge_late_event_is_cut_to_fit(
    broker: &str,
    extra: &[&str],
    size: usize,
    limit: Option<usize>,
) {
    let mut sets = vec![
        "source.max_payload_bytes=3000000",
        "brokers.kafka.partitions=1",
        "brokers.kinesis.shards=1",
    ];
    sets.extend_from_slice(extra);
    let late_topic = format!(
        "late-{broker}-{}-{}",
        std::process::id(),
        weir_engine::time::now_millis() % 1_000_000_000
    );
    let late_set = format!("late.topic={late_topic}");
    sets.push(&late_set);
    let bed = Bed::new(broker, "huge-late", &sets);
    assert_eq!(
        bed.config.late,
        weir_engine::config::LatePolicy::Output(late_topic.clone())
    );
    let mut data = seed_lines(20, 100, 5);
    // An hour before the others: its window closed long ago.
    let mut event = huge_event(size, false);
    let at = event
        .windows(13)
        .position(|w| w == b"2024-06-27 15")
        .unwrap();
    event[at..at + 13].copy_from_slice(b"2024-06-27 14");
    data.push(event.clone());
    if broker == "kafka" {
        create_source(&bed, "topic").await;
        let topic = &bed.config.source.topic;
        let sent = interop::kafka_produce(topic, "lz4", Some("3000000"), keyed(&data)).await;
        assert_eq!(sent.trim(), "101");
    } else {
        bed.produce(&data).await;
    }
    let summary = bed
        .run_until_idle()
        .await
        .expect("a late record never fails the run for its size");
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.late, s.dead_letters),
        (101, 100, 1, 0),
        "{s:?}"
    );
    let late = bed.read(&late_topic, 1, Duration::from_secs(5)).await;
    assert_eq!(late.len(), 1);
    let l = &late[0];
    let Some(limit) = limit else {
        // It fits as it is: the original event, unchanged.
        assert_eq!(&l.payload[..], &event[..]);
        return;
    };
    assert!(l.payload.len() <= limit, "{} > {limit}", l.payload.len());
    let env: serde_json::Value = serde_json::from_slice(&l.payload).unwrap();
    assert_eq!(env["payload_truncated"], true, "{}", env["error"]);
    assert_eq!(env["payload_bytes"], size);
    assert_eq!(env["late"]["window_start"], "2024-06-27T14:00:00Z");
    assert_eq!(env["source"]["topic"], bed.config.source.topic);
    let kept = env["payload"].as_str().unwrap();
    assert!(kept.len() > limit / 4 && event.starts_with(kept.as_bytes()));
}
