//! The retry source: [`WithRetries`] reads the source topic and the retry topic as one
//! source. Retry partitions appear as the merged source's [`Input::Retry`] partitions, their
//! records are held until due, and they never move the watermark (a retried event keeps
//! its own event time). [`RetrySink`] counts what goes to the retry topic, so that a
//! finite run waits for every retry to come back.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::envelope::unwrap;
use crate::error::{EngineError, Result};
use crate::origin::{Input, RETRY_PARTITION_BASE};
use crate::record::{Checkpoint, OutRecord, Position, Record};
use crate::sink::Sink;
use crate::source::{Received, Source};

/// How often the retry topic is polled while the source topic keeps the pipeline busy.
const RETRY_POLL: Duration = Duration::from_millis(100);
/// Most retry records held in memory waiting for their time; the retry topic is not read
/// further while this many wait.
const MAX_HELD: usize = 100_000;

struct Held {
    due: i64,
    seq: u64,
    rec: Record,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// The source topic and the retry topic read as one source (see the module docs).
pub struct WithRetries {
    main: Box<dyn Source>,
    retry: Box<dyn Source>,
    held: BinaryHeap<Reverse<Held>>,
    seq: u64,
    ctrl: VecDeque<Received>,
    next_poll: Instant,
    main_ended: bool,
    retry_drained: bool,
    /// Retry records the pipeline submitted to the retry topic (see [`RetrySink`]).
    sent: Option<Arc<AtomicU64>>,
    /// Retry records read back from the retry topic.
    read_back: u64,
}

/// The retry topic's sink, counting what it was given so that [`WithRetries`] knows
/// whether retries are still on their way when the source topic ends (`--input`): the
/// pipeline then runs until every retry has come back and reached its end (counted in a
/// window, late, or a dead letter after `max_attempts`), instead of ending with retries
/// still in the topic.
pub struct RetrySink {
    inner: Box<dyn Sink>,
    sent: Arc<AtomicU64>,
}

impl RetrySink {
    /// Wraps the retry topic's sink; give [`counter`](Self::counter) to
    /// [`WithRetries::awaiting`].
    pub fn new(inner: Box<dyn Sink>) -> Self {
        RetrySink {
            inner,
            sent: Arc::default(),
        }
    }

    /// How many retry records were submitted so far.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }
}

#[async_trait]
impl Sink for RetrySink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.inner.send(batch).await?;
        self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.inner.submit(batch).await?;
        self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.inner.flush().await
    }

    fn acknowledged(&self) -> (u64, u64) {
        self.inner.acknowledged()
    }
}

impl WithRetries {
    /// Reads `main` and, held until due, the records of `retry`.
    pub fn new(main: Box<dyn Source>, retry: Box<dyn Source>) -> Self {
        WithRetries {
            main,
            retry,
            held: BinaryHeap::new(),
            seq: 0,
            ctrl: VecDeque::new(),
            next_poll: Instant::now(),
            main_ended: false,
            retry_drained: false,
            sent: None,
            read_back: 0,
        }
    }

    /// When the source topic ends, keeps reading the retry topic until as many retry
    /// records came back as `sent` counts (the counter of the pipeline's [`RetrySink`]).
    /// Without it the merged source ends once the retry topic looks drained.
    pub fn awaiting(mut self, sent: Arc<AtomicU64>) -> Self {
        self.sent = Some(sent);
        self
    }

    /// Retry records submitted but not read back yet.
    fn in_flight(&self) -> u64 {
        self.sent.as_ref().map_or(0, |s| {
            s.load(Ordering::Relaxed).saturating_sub(self.read_back)
        })
    }

    fn min_held_offset(&self, partition: u32) -> Option<u64> {
        self.held
            .iter()
            .filter(|h| h.0.rec.position.partition == partition)
            .map(|h| h.0.rec.position.offset)
            .min()
    }

    async fn poll_retry(&mut self, max: usize) -> Result<Option<Received>> {
        self.next_poll = Instant::now() + RETRY_POLL;
        if self.held.len() >= MAX_HELD {
            return Ok(None);
        }
        match self.retry.recv(max, Duration::ZERO).await? {
            Received::Batch(b) => {
                self.retry_drained = b.is_empty();
                self.read_back += b.len() as u64;
                for mut r in b {
                    r.position.partition = Input::Retry.partition(r.position.partition);
                    let (due, rec) = unwrap(r);
                    self.seq += 1;
                    self.held.push(Reverse(Held {
                        due,
                        seq: self.seq,
                        rec,
                    }));
                }
                Ok(None)
            }
            Received::End => {
                self.retry_drained = true;
                Ok(None)
            }
            Received::Assigned(parts) => Ok(Some(Received::Assigned(
                parts
                    .into_iter()
                    .map(|(p, cp)| (Input::Retry.partition(p), cp))
                    .collect(),
            ))),
            Received::Revoked(parts) => {
                let shifted: Vec<u32> = parts.iter().map(|p| Input::Retry.partition(*p)).collect();
                let held = std::mem::take(&mut self.held);
                self.held = held
                    .into_iter()
                    .filter(|h| !shifted.contains(&h.0.rec.position.partition))
                    .collect();
                Ok(Some(Received::Revoked(shifted)))
            }
        }
    }
}

#[async_trait]
impl Source for WithRetries {
    fn topic(&self) -> &str {
        self.main.topic()
    }

    fn recycle(&mut self, batch: Vec<Record>) {
        self.main.recycle(batch);
    }

    fn has_backlog(&self, partition: u32) -> bool {
        Input::is_source(partition) && self.main.has_backlog(partition)
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if let Some(c) = self.ctrl.pop_front() {
            return Ok(c);
        }
        if Instant::now() >= self.next_poll {
            if let Some(c) = self.poll_retry(max).await? {
                return Ok(c);
            }
        }
        let now_ms = crate::time::now_millis();
        let mut out = Vec::new();
        while out.len() < max && self.held.peek().is_some_and(|h| h.0.due <= now_ms) {
            if let Some(Reverse(h)) = self.held.pop() {
                out.push(h.rec);
            }
        }
        if self.main_ended {
            if out.is_empty() && self.held.is_empty() && self.retry_drained {
                if self.in_flight() == 0 {
                    return Ok(Received::End);
                }
                // Retries are on their way: poll for them at once.
                self.next_poll = Instant::now();
                self.retry_drained = false;
            }
            if out.is_empty() {
                tokio::time::sleep(wait.min(RETRY_POLL)).await;
            }
            return Ok(Received::Batch(out));
        }
        let main_wait = if !out.is_empty() {
            Duration::ZERO
        } else {
            let until_poll = self.next_poll.saturating_duration_since(Instant::now());
            let until_due = self
                .held
                .peek()
                .map(|h| Duration::from_millis((h.0.due - now_ms).max(0) as u64))
                .unwrap_or(wait);
            wait.min(until_poll).min(until_due)
        };
        match self.main.recv(max - out.len(), main_wait).await? {
            Received::Batch(b) => {
                if out.is_empty() {
                    return Ok(Received::Batch(b));
                }
                out.extend(b);
                Ok(Received::Batch(out))
            }
            Received::Assigned(parts)
                if parts.iter().any(|(p, _)| !Input::is_source(*p)) =>
            {
                Err(EngineError::Stopped(format!(
                    "with a retry topic, source partition indexes must be below {RETRY_PARTITION_BASE}"
                )))
            }
            Received::End => {
                self.main_ended = true;
                Ok(Received::Batch(out))
            }
            c => {
                if out.is_empty() {
                    Ok(c)
                } else {
                    self.ctrl.push_back(c);
                    Ok(Received::Batch(out))
                }
            }
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        let (retry, main): (Vec<_>, Vec<_>) = positions
            .iter()
            .partition(|(p, _)| !Input::is_source(p.partition));
        if !main.is_empty() {
            self.main.commit(&main).await?;
        }
        let retry: Vec<(Position, Checkpoint)> = retry
            .into_iter()
            .map(|(p, cp)| {
                // Not past a record still held for later.
                let offset = self
                    .min_held_offset(p.partition)
                    .map_or(p.offset, |h| h.min(p.offset));
                (
                    Position {
                        partition: Input::of(p.partition).1,
                        offset,
                    },
                    cp,
                )
            })
            .collect();
        if !retry.is_empty() {
            self.retry.commit(&retry).await?;
        }
        Ok(())
    }

    fn wants_commit(&self) -> bool {
        self.main.wants_commit() || self.retry.wants_commit()
    }

    fn pending(&self) -> bool {
        !self.held.is_empty() || self.main.pending() || self.retry.pending()
    }
}
