//! The runtime keeps processing while a sink's acknowledgements are outstanding
//! (`Sink::submit`), but a commit never covers input whose outputs were not acknowledged:
//! every commit comes after a `flush` of every sink.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use weir_engine::{
    Checkpoint, Job, OutRecord, Pipeline, Position, Received, Record, Result, Sink, Source,
};

#[derive(Default)]
struct Ledger {
    /// Records submitted and not yet acknowledged, over all sinks.
    unacked: usize,
    acked: usize,
    submits: usize,
    commits: usize,
    /// Commits that found unacknowledged outputs.
    violations: usize,
}

/// Events `{"user": "uN", "t": ms}`, a few per batch, then the end.
struct Events {
    batches: Vec<Vec<Record>>,
    ledger: Arc<Mutex<Ledger>>,
}

#[async_trait]
impl Source for Events {
    fn topic(&self) -> &str {
        "in"
    }
    async fn recv(&mut self, _max: usize, _wait: Duration) -> Result<Received> {
        Ok(match self.batches.pop() {
            Some(b) => Received::Batch(b),
            None => Received::End,
        })
    }
    async fn commit(&mut self, _: &[(Position, Checkpoint)]) -> Result<()> {
        let mut l = self.ledger.lock().unwrap();
        l.commits += 1;
        if l.unacked > 0 {
            l.violations += 1;
        }
        Ok(())
    }
}

/// Acknowledges submitted records only when flushed.
struct Deferred {
    pending: usize,
    ledger: Arc<Mutex<Ledger>>,
}

#[async_trait]
impl Sink for Deferred {
    fn name(&self) -> &str {
        "deferred"
    }
    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.ledger.lock().unwrap().acked += batch.len();
        Ok(())
    }
    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.pending += batch.len();
        let mut l = self.ledger.lock().unwrap();
        l.unacked += batch.len();
        l.submits += 1;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        let mut l = self.ledger.lock().unwrap();
        l.unacked -= self.pending;
        l.acked += std::mem::take(&mut self.pending);
        Ok(())
    }
}

#[tokio::test]
async fn commits_wait_for_every_submitted_output() {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // 200 batches of 5 events, one second of event time per batch: every batch closes the
    // windows (1 s, no grace) of the one before, so results are in flight at most commits.
    let mut batches: Vec<Vec<Record>> = (0..200u64)
        .map(|b| {
            (0..5u64)
                .map(|i| Record {
                    payload: Bytes::from(format!(
                        r#"{{"user": "u{i}", "t": {}}}"#,
                        1_700_000_000_000 + b * 1000 + i
                    )),
                    position: Position {
                        partition: 0,
                        offset: b * 5 + i,
                    },
                    ..Default::default()
                })
                .collect()
        })
        .collect();
    // Bad input: dead letters go through the second sink the same way.
    batches[7][2].payload = Bytes::from_static(b"not json");
    batches.reverse();
    let mut job = Job::tumbling_count("user", "t", Duration::from_secs(1));
    job.commit_interval = Duration::ZERO; // commit after every batch
    let summary = Pipeline::new(
        job,
        Box::new(Events {
            batches,
            ledger: ledger.clone(),
        }),
        Box::new(Deferred {
            pending: 0,
            ledger: ledger.clone(),
        }),
        Box::new(Deferred {
            pending: 0,
            ledger: ledger.clone(),
        }),
    )
    .run()
    .await
    .unwrap();
    let l = ledger.lock().unwrap();
    assert_eq!(summary.counters.dead_letters, 1);
    assert_eq!(
        summary.counters.results_out, 999,
        "5 users x 200 windows, minus the bad one"
    );
    assert!(l.submits > 100, "outputs were submitted batch by batch");
    assert!(l.commits > 100, "commits followed batches: {}", l.commits);
    assert_eq!(l.violations, 0, "a commit found unacknowledged outputs");
    assert_eq!(
        (l.unacked, l.acked),
        (0, 1000),
        "everything acknowledged at the end"
    );
}
