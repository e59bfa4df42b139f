//! Tumbling windows over `pipelines/user_activity.toml`: exact counts, dead letters, a
//! crash and restart, idle close, a pipeline started before its data, a future event.

use std::time::Duration;

use async_trait::async_trait;
use weir_engine::{EngineError, Processor, Record, StopReason};

use super::{brokers, lines, oracle, results, results_any_size, Bed};

/// 20,000 seeded events over 50 users: the results are exactly the oracle's counts, and
/// every event is accounted for.
pub async fn counts_match_the_oracle(broker: &str) {
    let bed = Bed::new(broker, "counts", &[]);
    let data = lines(42, 20_000, 50, 0);
    let want = oracle(&data);
    assert_eq!(want.values().sum::<u64>(), 20_000);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    assert_eq!(summary.reason, StopReason::Idle);
    let s = summary.counters;
    assert_eq!(
        (s.events_in, s.windowed, s.dead_letters, s.late),
        (20_000, 20_000, 0, 0),
        "{s:?}"
    );
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// Every kind of bad input goes to the dead-letter topic with its reason and source; the
/// rest is counted exactly; nothing panics.
pub async fn bad_input_goes_to_dead_letters(broker: &str) {
    let bed = Bed::new(broker, "dead", &[]);
    let mut data = lines(7, 2_000, 20, 10);
    let crafted: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe\x00garbage".to_vec(), "not valid UTF-8"),
        (vec![b' '; 70_000].into_iter().chain(*b"{}").collect(), "over the limit of 65536 bytes"),
        (b"{\"user_id\": \"User1\", ".to_vec(), "invalid JSON"),
        (b"[1, 2, 3]".to_vec(), "expected a JSON object"),
        (
            br#"{"event_type":"click","user_id":42,"action":"x","timestamp":"2024-06-27 15:00:01.000000"}"#.to_vec(),
            "`user_id`: expected string",
        ),
        (
            br#"{"event_type":"click","user_id":"User1","action":"x","timestamp":"27/06/2024"}"#.to_vec(),
            "`timestamp`: `27/06/2024` is not a timestamp",
        ),
        (
            br#"{"event_type":"click","action":"x","timestamp":"2024-06-27 15:00:01.000000"}"#.to_vec(),
            "missing field `user_id`",
        ),
    ];
    data.extend(crafted.iter().map(|(p, _)| p.clone()));
    let want = oracle(&data);
    let valid: u64 = want.values().sum();
    let invalid = data.len() as u64 - valid;
    assert_eq!(invalid, 200 + crafted.len() as u64);
    bed.produce(&data).await;
    let summary = bed.run_until_idle().await.expect("run");
    let s = summary.counters;
    assert_eq!(
        (s.windowed, s.dead_letters, s.late),
        (valid, invalid, 0),
        "{s:?}"
    );
    assert!(s.balanced());
    let dead = bed
        .read(
            &bed.config.dead_letter.topic,
            invalid as usize,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dead.len() as u64, invalid);
    let envelopes: Vec<serde_json::Value> = dead
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).expect("dead letter is JSON"))
        .collect();
    for e in &envelopes {
        assert!(!e["error"].as_str().unwrap_or_default().is_empty(), "{e}");
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
        assert!(e["source"]["offset"].is_u64() && e["source"]["partition"].is_u64());
        assert!(e["payload"].is_string());
    }
    for (payload, reason) in &crafted {
        let found = envelopes.iter().any(|e| {
            let p = e["payload"].as_str().unwrap();
            let same = if e["payload_encoding"] == "base64" {
                p == weir_engine::output::base64(payload)
            } else {
                p.as_bytes() == &payload[..]
            };
            same && e["error"].as_str().unwrap().contains(reason)
        });
        assert!(found, "no dead letter with reason {reason:?}");
    }
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
}

/// Fails the run (like a crash: no final commit) after `after` records, once every one of
/// `partitions` partitions delivered some: until then each holds the watermark back, no
/// window closes and nothing is committable (brokers such as Kafka may serve one
/// partition's backlog well before another's).
struct CrashAfter {
    seen: usize,
    after: usize,
    partitions: usize,
    seen_partitions: std::collections::HashSet<u32>,
}

#[async_trait]
impl Processor for CrashAfter {
    fn name(&self) -> &str {
        "crash-after"
    }
    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        _: &mut Vec<weir_engine::Rejected>,
    ) -> weir_engine::Result<()> {
        // Crash only on a batch after the one that completed the set, so that some
        // progress could be committed in between.
        let all_seen_before = self.seen_partitions.len() >= self.partitions;
        self.seen += batch.len();
        self.seen_partitions
            .extend(batch.iter().map(|r| r.position.partition));
        if self.seen >= self.after && all_seen_before {
            return Err(EngineError::Stopped("simulated crash".into()));
        }
        Ok(())
    }
}

/// The pipeline crashes mid-stream and is started again: nothing is lost, duplicates
/// carry the same counts, and the distinct results are exactly the oracle's. The crash
/// left records of windows already emitted above the committed position: the checkpoint
/// (stored beside the positions) recognised and skipped them.
pub async fn restart_loses_nothing(broker: &str) {
    restart_loses_nothing_after(broker, &[], &|_| {}).await
}

/// [`restart_loses_nothing`] with `extra` settings, and `between` done to the broker
/// between the crash and the restart.
pub async fn restart_loses_nothing_after(broker: &str, extra: &[&str], between: &dyn Fn(&Bed)) {
    let mut sets = vec!["source.commit_interval=0s", "source.batch_size=500"];
    sets.extend_from_slice(extra);
    let bed = Bed::new(broker, "restart", &sets);
    let data = lines(99, 10_000, 30, 0);
    let want = oracle(&data);
    bed.produce(&data).await;
    let first = bed
        .pipeline()
        .await
        .processor(Box::new(CrashAfter {
            seen: 0,
            after: 4_000,
            partitions: brokers::get(broker).partitions(),
            seen_partitions: Default::default(),
        }))
        .run()
        .await;
    assert!(matches!(first, Err(EngineError::Stopped(_))), "{first:?}");
    between(&bed);
    let second = bed.run_until_idle().await.expect("second run");
    let s = second.counters;
    assert!(
        s.events_in < 10_000,
        "the second run resumed from committed positions: {s:?}"
    );
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.late, 0, "{s:?}");
    let records = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let got = results(&records);
    assert_eq!(got, want);
    assert!(s.replayed > 0, "{s:?}");
}

/// With input stopped, the idle timeout advances time by the wall clock so the last
/// window still closes (a 1 s window here so the test is quick).
pub async fn idle_input_still_closes_the_last_window(broker: &str) {
    let bed = Bed::new(
        broker,
        "idle",
        &[
            "window.size=1s",
            "window.grace=0s",
            "window.idle_timeout=300ms",
        ],
    );
    let now = weir_engine::time::now_millis();
    let data: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let mut ts = String::new();
            weir_engine::generate::write_seed_time(&mut ts, now, 0);
            format!(
                r#"{{"event_type":"click","user_id":"User{}","action":"a","timestamp":"{ts}"}}"#,
                i % 4
            )
            .into_bytes()
        })
        .collect();
    bed.produce(&data).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(bed.pipeline().await.shutdown_on(stop.clone()).run());
    let got = results_any_size(
        &bed.read(&bed.config.sink.topic, 4, Duration::from_secs(10))
            .await,
    );
    stop.cancel();
    let s = run.await.unwrap().expect("run").counters;
    assert_eq!(got.values().sum::<u64>(), 40, "{got:?} {s:?}");
    assert_eq!(got.len(), 4);
}

/// Started before its data: the pipeline waits three idle timeouts on empty partitions,
/// then 20,000 events arrive on every partition at once. Not one is late, every window is
/// exact: partitions that delivered nothing yet (or still hold a backlog) never let the
/// first partition read run ahead.
///
pub async fn start_before_data_is_exact(broker: &str) {
    start_before_data(broker, true).await
}

/// [`start_before_data_is_exact`] with records produced without keys, so a (key, window)
/// spans partitions and they all share one event time.
pub async fn start_before_unkeyed_data_is_exact(broker: &str) {
    start_before_data(broker, false).await
}

async fn start_before_data(broker: &str, keyed: bool) {
    let case = if keyed { "early" } else { "unkeyed" };
    let bed = Bed::new(broker, case, &["window.idle_timeout=2s"]);
    let data = lines(11, 20_000, 500, 0);
    let want = oracle(&data);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(bed.pipeline().await.shutdown_on(stop.clone()).run());
    tokio::time::sleep(Duration::from_secs(6)).await;
    if keyed {
        bed.produce(&data).await;
    } else {
        bed.produce_unkeyed(&data).await;
    }
    let records = bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(20))
        .await;
    stop.cancel();
    let s = run.await.unwrap().expect("run").counters;
    assert_eq!((s.late, s.dead_letters), (0, 0), "{s:?}");
    let got = results(&records);
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} windows missing; {s:?}",
        want.len()
    );
    assert_eq!(got, want);
}

/// One event dated 2100 among valid ones: it is a dead letter naming its time and the
/// limit, and cannot drag the watermark along, so every valid event is counted.
pub async fn a_future_event_cannot_stop_the_count(broker: &str) {
    let bed = Bed::new(broker, "future", &[]);
    let mut data = lines(5, 2_000, 20, 0);
    let want = oracle(&data);
    let future = br#"{"event_type":"click","user_id":"User1","action":"a","timestamp":"2100-01-01 00:00:00"}"#.to_vec();
    data.insert(10, future.clone());
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!((s.windowed, s.dead_letters, s.late), (2_000, 1, 0), "{s:?}");
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
    let dead = bed
        .read(&bed.config.dead_letter.topic, 1, Duration::from_secs(5))
        .await;
    assert_eq!(dead.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    let reason = v["error"].as_str().unwrap();
    assert!(
        reason.contains("2100-01-01T00:00:00Z")
            && reason.contains("max_future")
            && reason.contains("1h"),
        "{reason}"
    );
    assert_eq!(v["payload"].as_str().unwrap().as_bytes(), &future[..]);
}
