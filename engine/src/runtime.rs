//! The pipeline runtime: receive a batch, run processors, window it, send results and dead
//! letters, wait for their acknowledgements, then commit what is safe.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod crash_point;
pub(crate) mod retries;

use crate::error::{EngineError, Result};
use crate::metrics::{Metrics, Snapshot};
use crate::operator::{Emitted, Job, Outcome, WindowOperator};
use crate::processor::{Processor, Rejected};
use crate::record::{Checkpoint, Position};
use crate::sink::{Sink, Transaction};
use crate::source::{Received, Source};
use retries::{commit_with_retry, flush_with_retry, recv_with_retry, send_with_retry};

/// How long `recv` waits before the loop checks idleness and the commit timer.
const TICK: Duration = Duration::from_millis(200);

/// How long `recv` waits while results are in flight, before the loop looks at the sink's
/// acknowledgements again (the emit latency's resolution on an idle input).
const EMIT_POLL: Duration = Duration::from_millis(1);

/// A pipeline ready to run: a source, processors, the windowed job, and two sinks.
pub struct Pipeline {
    job: Job,
    source: Box<dyn Source>,
    processors: Vec<Box<dyn Processor>>,
    sink: Box<dyn Sink>,
    dead_letter: Box<dyn Sink>,
    late: Option<Box<dyn Sink>>,
    retry: Option<Box<dyn Sink>>,
    /// Exactly-once: the broker transaction the sinks write in, committed at each commit.
    transaction: Option<Box<dyn Transaction>>,
    on_error: Option<crate::error_policy::ErrorCallback>,
    metrics: Arc<Metrics>,
    /// Closing steps whose results the sink has not acknowledged yet: the sink's
    /// `submitted` count right after their results, when they closed, how many windows.
    emitting: std::collections::VecDeque<(u64, Instant, u64)>,
    shutdown: CancellationToken,
    exit_when_idle: Option<Duration>,
    /// Whether the source is a repartition stage's internal topic.
    repartitioned: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The source ended; every open window was emitted.
    EndOfInput,
    /// Shutdown was requested; open windows were left to be recomputed from uncommitted
    /// input on the next start.
    Shutdown,
    /// No record arrived for the configured idle exit time; every open window was emitted
    /// as at the end of input.
    Idle,
}

/// The result of [`Pipeline::run`].
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Why it stopped.
    pub reason: StopReason,
    /// The counters at the end.
    pub counters: Snapshot,
    /// Windows left open at shutdown (recomputed on restart).
    pub open_windows: usize,
}

impl Pipeline {
    /// A pipeline running `job` from `source` into `sink`, dead letters into `dead_letter`.
    pub fn new(
        job: Job,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        dead_letter: Box<dyn Sink>,
    ) -> Self {
        Pipeline {
            job,
            source,
            processors: Vec::new(),
            sink,
            dead_letter,
            late: None,
            retry: None,
            transaction: None,
            on_error: None,
            metrics: Arc::new(Metrics::default()),
            emitting: std::collections::VecDeque::new(),
            shutdown: CancellationToken::new(),
            exit_when_idle: None,
            repartitioned: false,
        }
    }

    /// Reads a repartition stage's internal topic (see [`crate::repartition`]): its
    /// records are keyed by the group key, their event time is kept by origin, and its
    /// markers are taken out before anything counts them.
    pub fn repartitioned(mut self) -> Self {
        self.repartitioned = true;
        self
    }

    /// Treats `idle` without any record, while no partition has a backlog the broker
    /// reports, as the end of input: emit every open window, commit, return. For bounded
    /// runs over a broker (tests, backfills).
    pub fn exit_when_idle(mut self, idle: Duration) -> Self {
        self.exit_when_idle = Some(idle);
        self
    }

    /// Adds a processor that sees every batch before decoding, in the order added.
    pub fn processor(mut self, p: Box<dyn Processor>) -> Self {
        self.processors.push(p);
        self
    }

    /// Sends late events here (needed when the job's late policy is an output).
    pub fn late_output(mut self, sink: Box<dyn Sink>) -> Self {
        self.late = Some(sink);
        self
    }

    /// Sends records to the retry topic here (needed when the job has a retry topic). The
    /// source should read the retry topic too: see [`crate::retry::WithRetries`].
    pub fn retry_output(mut self, sink: Box<dyn Sink>) -> Self {
        self.retry = Some(sink);
        self
    }

    /// Makes the pipeline exactly-once: the sinks write in `transaction` (they must be the
    /// same backend's, made in its exactly-once mode), and every commit is a barrier: the
    /// loop takes no input while the outputs of everything processed so far are flushed,
    /// the source adds the positions and checkpoints of that same point to the
    /// transaction, and the transaction is committed. On a revocation the backend aborts
    /// it and the revoked partitions' state is dropped without being remembered.
    pub fn transactional(mut self, transaction: Box<dyn Transaction>) -> Self {
        self.transaction = Some(transaction);
        self
    }

    /// Lets `callback` choose what happens to each record a stage fails on; it sees the
    /// stage's configured strategy and may return another.
    pub fn on_error(
        mut self,
        callback: impl FnMut(&crate::error_policy::ErrorEvent<'_>) -> crate::error_policy::ErrorAction
            + Send
            + 'static,
    ) -> Self {
        self.on_error = Some(Box::new(callback));
        self
    }

    /// Uses `token` to stop: the pipeline finishes its batch, sends, commits and returns.
    pub fn shutdown_on(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Shares these counters (e.g. with a metrics endpoint).
    pub fn with_metrics(mut self, m: Arc<Metrics>) -> Self {
        self.metrics = m;
        self
    }

    /// The live counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until the source ends or shutdown is requested.
    pub async fn run(mut self) -> Result<Summary> {
        let topic = self.source.topic().to_string();
        self.job
            .check(self.late.is_some(), self.retry.is_some())
            .map_err(EngineError::Stopped)?;
        let mut op = WindowOperator::new(&self.job, &topic);
        if self.repartitioned {
            op.repartitioned();
        }
        if let Some(cb) = self.on_error.take() {
            op.set_error_callback(cb);
        }
        let may_fail = op.may_fail();
        let m = self.metrics.clone();
        let mut committed: Vec<Option<(u64, Checkpoint)>> = Vec::new();
        let mut last_commit = Instant::now();
        let mut rejected: Vec<Rejected> = Vec::new();
        let mut last_record = Instant::now();
        let mut reason = StopReason::EndOfInput;
        tracing::info!(%topic, sink = self.sink.name(), dead_letter = self.dead_letter.name(), "pipeline started");
        loop {
            let now = Instant::now();
            let wait = op
                .next_idle_deadline()
                .map(|d| {
                    d.saturating_duration_since(now)
                        .clamp(Duration::from_millis(1), TICK)
                })
                .unwrap_or(TICK)
                // Results in flight: come back soon to note when they are acknowledged, so
                // an idle input does not hold the emit latency's reading until a commit.
                .min(if self.emitting.is_empty() {
                    TICK
                } else {
                    EMIT_POLL
                });
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                r = recv_with_retry(&mut *self.source, self.job.batch_size, wait, &self.shutdown) => r?,
            };
            self.observe_emits(false);
            let Some(received) = received else {
                reason = StopReason::Shutdown;
                break;
            };
            let mut out = Emitted::default();
            let ended = match received {
                Received::End => true,
                Received::Batch(batch)
                    if batch.is_empty()
                        && !self.source.pending()
                        && self
                            .exit_when_idle
                            .is_some_and(|d| last_record.elapsed() >= d)
                        // Records the broker holds for us are not the end of the input.
                        && !op.partitions().any(|p| self.source.has_backlog(p))
                        // Nor are partitions still held by another (or a killed) member.
                        && !op.holding() =>
                {
                    reason = StopReason::Idle;
                    true
                }
                Received::Assigned(parts)
                    if parts
                        .iter()
                        .any(|(p, _)| *p >= crate::window::Acc::MAX_PARTITIONS) =>
                {
                    return Err(EngineError::Stopped(format!(
                        "the source has partition indexes of {} or more, which Weir does not support",
                        crate::window::Acc::MAX_PARTITIONS
                    )));
                }
                Received::Assigned(parts) => {
                    tracing::info!(partitions = ?parts, "partitions assigned");
                    // Idleness counts from the moment there is something to read: joining a
                    // consumer group can take longer than a short idle exit.
                    last_record = Instant::now();
                    op.expect_partitions(self.source.partition_count());
                    for (p, _) in &parts {
                        op.continues(*p, &self.source.continues(*p));
                    }
                    op.assign(&parts, Instant::now());
                    false
                }
                Received::Revoked(parts) => {
                    tracing::info!(partitions = ?parts, "partitions revoked; their open windows are left to the new owner");
                    // A rebalance is under way: wait for the next assignment before idling out.
                    last_record = Instant::now();
                    op.revoke(&parts, self.transaction.is_some());
                    for &p in &parts {
                        if let Some(c) = committed.get_mut(p as usize) {
                            *c = None;
                        }
                    }
                    false
                }
                Received::Batch(mut batch) => {
                    let now = Instant::now();
                    // Markers move time; they are not input.
                    op.take_markers(&mut batch);
                    if !batch.is_empty() {
                        last_record = now;
                    }
                    let now_ms = crate::time::now_millis();
                    // What a commit would cover before this batch: all a failure may commit.
                    let before_batch = may_fail.then(|| committable(&op));
                    Metrics::add(&m.events_in, batch.len() as u64);
                    let mut tally = Tally::default();
                    for p in &mut self.processors {
                        let before = batch.len();
                        p.process(&mut batch, &mut rejected).await?;
                        tally.filtered += (before - batch.len() - rejected.len()) as u64;
                        for r in rejected.drain(..) {
                            let o = op.reject(p.name(), &r, now, now_ms, &mut out);
                            tally.count(o);
                        }
                    }
                    if tally.failed == 0 {
                        for rec in &batch {
                            let o = op.ingest(rec, now, now_ms, &mut out);
                            tally.count(o);
                            if o == Outcome::Failed {
                                break;
                            }
                        }
                    }
                    op.apply_markers(None, now);
                    if tally.failed > 0 {
                        let why = op.failure().unwrap_or_else(|| "a stage failed".into());
                        // This batch's outputs are dropped: everything from the last
                        // commit on is read again after a restart.
                        self.commit_these(before_batch.unwrap_or_default(), &mut committed)
                            .await?;
                        tracing::error!("{why}");
                        return Err(EngineError::Stopped(why));
                    }
                    Metrics::add(&m.filtered, tally.filtered);
                    Metrics::add(&m.replayed, tally.replayed);
                    Metrics::add(&m.late_window_misses, op.take_window_misses());
                    Metrics::add(&m.windowed, tally.windowed);
                    Metrics::add(&m.dead_letters, tally.dead);
                    Metrics::add(&m.late, tally.late);
                    Metrics::add(&m.retried, tally.retried);
                    Metrics::add(&m.skipped, tally.skipped);
                    self.source.recycle(batch);
                    false
                }
            };
            if let Some(why) = op.conflict(Instant::now()) {
                // Nothing more closes or commits: what was emitted so far had all of the
                // topic's partitions; the rest is recounted from the committed positions.
                tracing::error!("{why}");
                self.flush().await?;
                return Err(EngineError::Stopped(why));
            }
            if ended {
                op.close_all(&mut out);
            } else {
                let source = &*self.source;
                op.close_ready(Instant::now(), &|p| source.has_backlog(p), &mut out);
            }
            self.deliver(out, &m).await?;
            m.watermark
                .store(op.watermark(), std::sync::atomic::Ordering::Relaxed);
            m.open_entries.store(
                op.open_entries() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if ended
                || last_commit.elapsed() >= self.job.commit_interval
                || self.source.wants_commit()
            {
                self.commit(&op, &mut committed).await?;
                last_commit = Instant::now();
            }
            if ended {
                break;
            }
        }
        self.flush().await?;
        self.commit(&op, &mut committed).await?;
        let counters = m.snapshot();
        let open_windows = op.open_windows();
        tracing::info!(
            open_windows,
            "pipeline stopped ({reason:?}): {}",
            counters.summary_line()
        );
        Ok(Summary {
            reason,
            counters,
            open_windows,
        })
    }

    async fn deliver(&mut self, out: Emitted, m: &Metrics) -> Result<()> {
        Metrics::add(&m.windows_closed, out.windows_closed);
        if !out.dead.is_empty() {
            send_with_retry(&mut *self.dead_letter, &out.dead, &self.shutdown).await?;
        }
        if !out.retry.is_empty() {
            if let Some(retry) = self.retry.as_mut() {
                send_with_retry(&mut **retry, &out.retry, &self.shutdown).await?;
            }
        }
        if !out.late.is_empty() {
            if let Some(late) = self.late.as_mut() {
                send_with_retry(&mut **late, &out.late, &self.shutdown).await?;
            }
        }
        if !out.results.is_empty() {
            let n = out.results.len() as u64;
            send_with_retry(&mut *self.sink, &out.results, &self.shutdown).await?;
            Metrics::add(&m.results_out, n);
        }
        if let (Some(t), 1..) = (out.closed_at, out.windows_closed) {
            let (_, submitted) = self.sink.acknowledged();
            self.emitting.push_back((submitted, t, out.windows_closed));
        }
        self.observe_emits(false);
        Ok(())
    }

    /// Records the emit latency of the closing steps whose results the sink has
    /// acknowledged by now (all of them after a flush), without waiting for any.
    fn observe_emits(&mut self, flushed: bool) {
        let (acked, _) = self.sink.acknowledged();
        while let Some(&(target, closed_at, windows)) = self.emitting.front() {
            if !flushed && target > acked {
                break;
            }
            self.metrics
                .emit_latency
                .observe_n(closed_at.elapsed(), windows);
            self.emitting.pop_front();
        }
    }

    /// Waits until every sink acknowledged everything submitted to it (see [`Sink::submit`]).
    async fn flush(&mut self) -> Result<()> {
        flush_with_retry(&mut *self.dead_letter, &self.shutdown).await?;
        if let Some(retry) = self.retry.as_mut() {
            flush_with_retry(&mut **retry, &self.shutdown).await?;
        }
        if let Some(late) = self.late.as_mut() {
            flush_with_retry(&mut **late, &self.shutdown).await?;
        }
        flush_with_retry(&mut *self.sink, &self.shutdown).await?;
        self.observe_emits(true);
        Ok(())
    }

    async fn commit(
        &mut self,
        op: &WindowOperator,
        committed: &mut Vec<Option<(u64, Checkpoint)>>,
    ) -> Result<()> {
        self.commit_these(committable(op), committed).await
    }

    async fn commit_these(
        &mut self,
        positions: Vec<(Position, Checkpoint)>,
        committed: &mut Vec<Option<(u64, Checkpoint)>>,
    ) -> Result<()> {
        // Exactly-once commits every position: the transaction holds the outputs of all
        // that was processed, and the checkpoints must travel with them.
        let exactly_once = self.transaction.is_some();
        let changed: Vec<(Position, Checkpoint)> = positions
            .into_iter()
            .filter(|(p, cp)| {
                exactly_once
                    || committed.get(p.partition as usize).copied().flatten()
                        != Some((p.offset, *cp))
            })
            .collect();
        if changed.is_empty() && !exactly_once {
            return Ok(());
        }
        // Every output derived from the positions below was submitted; wait for its acks.
        self.flush().await?;
        // The positions, then (exactly-once) the transaction that holds them.
        commit_with_retry(
            &mut *self.source,
            &changed,
            self.transaction.as_deref_mut(),
            &self.shutdown,
        )
        .await?;
        let committed_any = !changed.is_empty();
        for (p, cp) in changed {
            let i = p.partition as usize;
            if committed.len() <= i {
                committed.resize(i + 1, None);
            }
            committed[i] = Some((p.offset, cp));
        }
        if committed_any {
            Metrics::add(&self.metrics.commits, 1);
            crash_point::committed(
                self.metrics
                    .commits
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        }
        Ok(())
    }
}

/// What the operator says is safe to commit, with the checkpoint of each partition.
fn committable(op: &WindowOperator) -> Vec<(Position, Checkpoint)> {
    op.safe_positions()
        .into_iter()
        .map(|p| (p, op.checkpoint(p.partition)))
        .collect()
}

/// Outcomes of one batch, added to the counters once.
#[derive(Default)]
struct Tally {
    windowed: u64,
    dead: u64,
    late: u64,
    replayed: u64,
    retried: u64,
    skipped: u64,
    filtered: u64,
    failed: u64,
}

impl Tally {
    #[inline]
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Windowed => self.windowed += 1,
            Outcome::Dead => self.dead += 1,
            Outcome::Late => self.late += 1,
            Outcome::Replayed => self.replayed += 1,
            Outcome::Retried => self.retried += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}
