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

/// Acknowledges each submitted batch `delay` after it was submitted, as a broker's delivery
/// reports do, without being asked.
struct Delayed {
    delay: Duration,
    submitted: Vec<(tokio::time::Instant, u64)>,
}

#[async_trait]
impl Sink for Delayed {
    fn name(&self) -> &str {
        "delayed"
    }
    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.submit(batch).await?;
        self.flush().await
    }
    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.submitted
            .push((tokio::time::Instant::now(), batch.len() as u64));
        Ok(())
    }
    fn acknowledged(&self) -> (u64, u64) {
        let due = |at: &tokio::time::Instant| at.elapsed() >= self.delay;
        let acked = self.submitted.iter().filter(|(at, _)| due(at));
        (
            acked.map(|(_, n)| n).sum(),
            self.submitted.iter().map(|(_, n)| n).sum(),
        )
    }
    async fn flush(&mut self) -> Result<()> {
        if let Some((at, _)) = self.submitted.last() {
            tokio::time::sleep_until(*at + self.delay).await;
        }
        Ok(())
    }
}

/// Scripted batches, then empty batches (each after the wait the runtime asked for) for
/// `idle`, then the end.
struct ThenIdle {
    batches: Vec<Vec<Record>>,
    idle_until: Option<tokio::time::Instant>,
    idle: Duration,
}

#[async_trait]
impl Source for ThenIdle {
    fn topic(&self) -> &str {
        "in"
    }
    async fn recv(&mut self, _max: usize, wait: Duration) -> Result<Received> {
        if let Some(b) = self.batches.pop() {
            return Ok(Received::Batch(b));
        }
        let until = *self
            .idle_until
            .get_or_insert_with(|| tokio::time::Instant::now() + self.idle);
        if tokio::time::Instant::now() >= until {
            return Ok(Received::End);
        }
        tokio::time::sleep(wait.min(until - tokio::time::Instant::now())).await;
        Ok(Received::Batch(Vec::new()))
    }
    async fn commit(&mut self, _: &[(Position, Checkpoint)]) -> Result<()> {
        Ok(())
    }
}

/// The emit latency ends when the sink acknowledges a window's results, also when no input
/// follows: the runtime looks at the acknowledgements again within milliseconds while
/// results are in flight, not only after the next batch or commit (here the input is idle
/// for 3 s and no commit is due for a minute).
#[tokio::test(start_paused = true)]
async fn emit_latency_is_read_when_the_sink_acknowledges_on_an_idle_input() {
    let t0 = 1_700_000_000_000u64;
    let event = |t: u64, offset: u64| Record {
        payload: Bytes::from(format!(r#"{{"user": "u{}", "t": {t}}}"#, offset % 5)),
        position: Position {
            partition: 0,
            offset,
        },
        ..Default::default()
    };
    // Five users in one 1 s window, then one event that closes it.
    let first: Vec<Record> = (0..5).map(|i| event(t0 + i, i)).collect();
    let mut batches = vec![first, vec![event(t0 + 1_500, 5)]];
    batches.reverse();
    let mut job = Job::tumbling_count("user", "t", Duration::from_secs(1));
    job.commit_interval = Duration::from_secs(60);
    let delay = Duration::from_millis(20);
    let summary = Pipeline::new(
        job,
        Box::new(ThenIdle {
            batches,
            idle_until: None,
            idle: Duration::from_secs(3),
        }),
        Box::new(Delayed {
            delay,
            submitted: Vec::new(),
        }),
        Box::new(Delayed {
            delay,
            submitted: Vec::new(),
        }),
    )
    .run()
    .await
    .unwrap();
    let c = summary.counters;
    assert_eq!((c.results_out, c.windows_closed), (6, 2), "{c:?}");
    let e = c.emit_latency;
    assert_eq!(e.count(), 2, "{e:?}");
    // The first window: 20 ms of acknowledgement and at most a few ms of looking; the
    // second closes at the end of input, and the final flush waits its 20 ms.
    let total = Duration::from_micros(e.sum_micros);
    assert!(
        total >= 2 * delay && total < 2 * delay + Duration::from_millis(10),
        "emit latency of two windows: {total:?} in all"
    );
}
