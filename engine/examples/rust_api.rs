//! The seed pipeline built in code: the embedded memory broker as source and sinks, a
//! user-written `Processor`, the 10 s tumbling count per user, dead letters, and an error
//! callback that sees every failure with its stage and chooses what happens to it.
//!
//! Run it with `cargo run -p weir-engine --example rust_api`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use weir_engine::decode::Schema;
use weir_engine::generate::dataset;
use weir_engine::{
    ErrorAction, Job, OutRecord, Pipeline, Processor, Received, Record, Rejected, Sink, Source,
};
use weir_memory::{MemoryBroker, MemoryConfig};

/// A processor of our own: rejects events from crawlers before they are counted (they go
/// to the dead-letter topic with a reason) and passes everything else through.
struct RejectCrawlers;

#[async_trait]
impl Processor for RejectCrawlers {
    fn name(&self) -> &str {
        "reject-crawlers"
    }

    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        rejected: &mut Vec<Rejected>,
    ) -> weir_engine::Result<()> {
        let (keep, crawl): (Vec<Record>, Vec<Record>) = std::mem::take(batch)
            .into_iter()
            .partition(|r| !r.payload.windows(5).any(|w| w == b"Opera"));
        *batch = keep;
        rejected.extend(
            crawl
                .into_iter()
                .map(|r| Rejected::new(r, "Opera user agent looks like a crawler")),
        );
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> weir_engine::Result<()> {
    let broker = MemoryBroker::new(MemoryConfig {
        partitions: 4,
        capacity: 100_000,
    });

    // Feed the source topic with 2,000 seed-shaped events.
    let events: Vec<OutRecord> = dataset(5, 2_000, 8, 0)
        .into_iter()
        .map(|e| OutRecord {
            payload: Bytes::from(e),
            ..Default::default()
        })
        .collect();
    broker.sink("user-activity").send(&events).await?;

    // The job: the seed's schema, a 10 s tumbling count per user_id on `timestamp`.
    let job = Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
        .with_schema(Schema::seed_event())
        .with_grace(Duration::from_secs(2));
    let summary = Pipeline::new(
        job,
        Box::new(broker.source("user-activity", Some("example"))),
        Box::new(broker.sink("user-activity-stats")),
        Box::new(broker.sink("user-activity-errors")),
    )
    .processor(Box::new(RejectCrawlers))
    // Every failure passes through here; this one keeps the configured strategy (dead
    // letters) and could as well return Retry, Skip or Fail.
    .on_error({
        let mut seen = 0u64;
        move |e| {
            seen += 1;
            if seen == 1 {
                eprintln!("first failure: stage {}: {}", e.stage, e.reason);
            }
            match e.configured {
                ErrorAction::DeadLetter => ErrorAction::DeadLetter,
                other => other,
            }
        }
    })
    .exit_when_idle(Duration::from_millis(300))
    .run()
    .await?;

    // Print what landed in the sink topic.
    let mut results = broker.source("user-activity-stats", None);
    let mut total = 0;
    loop {
        let batch = match results.recv(1000, Duration::from_millis(50)).await? {
            Received::Batch(b) if b.is_empty() => break,
            Received::Batch(b) => b,
            _ => continue,
        };
        for r in batch {
            total += 1;
            if total <= 5 {
                println!("{}", String::from_utf8_lossy(&r.payload));
            }
        }
    }
    let c = summary.counters;
    println!(
        "results: {total}; events: {} in = {} counted + {} dead letters + {} late",
        c.events_in, c.windowed, c.dead_letters, c.late
    );
    assert!(c.balanced(), "every event is accounted for");
    Ok(())
}
