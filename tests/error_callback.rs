//! The Rust API's error callback: it sees every failure with its stage, record and reason,
//! and its choice is what happens.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use weir_engine::decode::Schema;
use weir_engine::generate::dataset;
use weir_engine::{ErrorAction, Job, OutRecord, Pipeline, Processor, Record, Rejected, Sink};
use weir_memory::{MemoryBroker, MemoryConfig};

/// Rejects User3's events as not ready yet (recoverable).
struct NotUser3;

#[async_trait]
impl Processor for NotUser3 {
    fn name(&self) -> &str {
        "not-user3"
    }
    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        rejected: &mut Vec<Rejected>,
    ) -> weir_engine::Result<()> {
        let (keep, out): (Vec<Record>, Vec<Record>) = std::mem::take(batch)
            .into_iter()
            .partition(|r| !r.payload.windows(7).any(|w| w == b"\"User3\""));
        *batch = keep;
        rejected.extend(
            out.into_iter()
                .map(|r| Rejected::recoverable(r, "User3 is not ready")),
        );
        Ok(())
    }
}

#[tokio::test]
async fn the_callback_sees_every_failure_and_its_choice_is_what_happens() {
    let broker = MemoryBroker::new(MemoryConfig {
        partitions: 2,
        capacity: 100_000,
    });
    let data = dataset(3, 2_000, 8, 10);
    let user3 = data.iter().filter(|l| l.contains("\"User3\"")).count() as u64;
    let events: Vec<OutRecord> = data
        .iter()
        .map(|e| OutRecord {
            payload: Bytes::from(e.clone()),
            ..Default::default()
        })
        .collect();
    broker.sink("in").send(&events).await.unwrap();
    let seen: Arc<Mutex<Vec<(String, bool, ErrorAction)>>> = Arc::default();
    let job = Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
        .with_schema(Schema::seed_event())
        .with_error_strategy("not-user3", ErrorAction::Fail);
    let log = seen.clone();
    let summary = Pipeline::new(
        job,
        Box::new(broker.source("in", Some("g"))),
        Box::new(broker.sink("out")),
        Box::new(broker.sink("dlq")),
    )
    .processor(Box::new(NotUser3))
    .on_error(move |e| {
        log.lock()
            .unwrap()
            .push((e.stage.to_string(), e.recoverable, e.configured));
        // Skip what the processor rejects (instead of its configured `fail`), dead-letter
        // invalid events as configured.
        match e.stage {
            "not-user3" => ErrorAction::Skip,
            _ => e.configured,
        }
    })
    .exit_when_idle(Duration::from_millis(300))
    .run()
    .await
    .expect("the callback chose skip over fail");
    let s = summary.counters;
    let seen = seen.lock().unwrap();
    let rejected = seen.iter().filter(|(s, _, _)| s == "not-user3").count() as u64;
    let invalid = seen.iter().filter(|(s, _, _)| s == "validate").count() as u64;
    assert!(rejected > 0 && invalid > 0);
    assert!(rejected <= user3);
    assert!(seen.iter().all(|(s, rec, cfg)| (s == "not-user3") == *rec
        && *cfg
            == if s == "not-user3" {
                ErrorAction::Fail
            } else {
                ErrorAction::DeadLetter
            }));
    assert_eq!((s.skipped, s.dead_letters), (rejected, invalid), "{s:?}");
    assert!(s.balanced(), "{s:?}");
}
