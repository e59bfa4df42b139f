//! The retry source: [`WithRetries`] reads the source topic and the retry topic as one
//! source. Retry partitions appear as the merged source's [`Input::Retry`] partitions, their
//! records are held until due, and they never move the watermark (a retried event keeps
//! its own event time). [`RetrySink`] counts what goes to the retry topic, so that a
//! finite run waits for every retry to come back.

use std::collections::{BTreeMap, VecDeque};
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

/// Retry records read back and waiting for their not-before time, by retry partition,
/// each partition's in offset order. A partition's records are released in offset order
/// (a record waits behind an earlier one not yet due, at most the retry backoff's `max`),
/// so every record of a retry partition below the operator's position was processed, and
/// the `processed` mark of its checkpoint never covers a record that is still held (after
/// a restart such a record would be taken for a replay and its outcome dropped).
#[derive(Default)]
struct Held {
    by_partition: BTreeMap<u32, VecDeque<(i64, Record)>>,
    len: usize,
}

impl Held {
    fn push(&mut self, due: i64, rec: Record) {
        let q = self.by_partition.entry(rec.position.partition).or_default();
        let offset = rec.position.offset;
        // Records of a partition arrive in offset order; insert in order all the same.
        let at = q.partition_point(|(_, r)| r.position.offset < offset);
        q.insert(at, (due, rec));
        self.len += 1;
    }

    /// The partition whose first record is due soonest, and when.
    fn next_due(&self) -> Option<(u32, i64)> {
        self.by_partition
            .iter()
            .filter_map(|(p, q)| q.front().map(|(due, _)| (*p, *due)))
            .min_by_key(|(_, due)| *due)
    }

    /// Moves records due at `now_ms` to `out`, up to `max` in all.
    fn release(&mut self, now_ms: i64, max: usize, out: &mut Vec<Record>) {
        while out.len() < max {
            let Some((p, _)) = self.next_due().filter(|(_, due)| *due <= now_ms) else {
                return;
            };
            if let Some((_, rec)) = self.by_partition.get_mut(&p).and_then(VecDeque::pop_front) {
                self.len -= 1;
                out.push(rec);
            }
        }
    }

    /// The lowest offset held of `partition`.
    fn min_offset(&self, partition: u32) -> Option<u64> {
        self.by_partition
            .get(&partition)
            .and_then(|q| q.front())
            .map(|(_, r)| r.position.offset)
    }

    /// Drops the records of revoked partitions (their new owner reads them again).
    fn revoke(&mut self, partitions: &[u32]) {
        for p in partitions {
            if let Some(q) = self.by_partition.remove(p) {
                self.len -= q.len();
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The source topic and the retry topic read as one source (see the module docs).
pub struct WithRetries {
    main: Box<dyn Source>,
    retry: Box<dyn Source>,
    held: Held,
    ctrl: VecDeque<Received>,
    next_poll: Instant,
    main_ended: bool,
    /// Whether the source topic has been assigned (or delivered): retry records wait for
    /// it, so that the operator knows the checkpoints of the partitions they came from
    /// before it sees them (see [`Copies`](crate::replay::Copies)).
    main_ready: bool,
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
            held: Held::default(),
            ctrl: VecDeque::new(),
            next_poll: Instant::now(),
            main_ended: false,
            main_ready: false,
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

    async fn poll_retry(&mut self, max: usize) -> Result<Option<Received>> {
        self.next_poll = Instant::now() + RETRY_POLL;
        if self.held.len >= MAX_HELD {
            return Ok(None);
        }
        match self.retry.recv(max, Duration::ZERO).await? {
            Received::Batch(b) => {
                self.retry_drained = b.is_empty();
                self.read_back += b.len() as u64;
                for mut r in b {
                    r.position.partition = Input::Retry.partition(r.position.partition);
                    let (due, rec) = unwrap(r);
                    self.held.push(due, rec);
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
                self.held.revoke(&shifted);
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

    fn partition_count(&self) -> Option<u32> {
        self.main.partition_count()
    }

    fn has_backlog(&self, partition: u32) -> bool {
        Input::is_source(partition) && self.main.has_backlog(partition)
    }

    fn continues(&self, partition: u32) -> Vec<u32> {
        if Input::is_source(partition) {
            self.main.continues(partition)
        } else {
            Vec::new()
        }
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
        if self.main_ready {
            self.held.release(now_ms, max, &mut out);
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
                .next_due()
                .filter(|_| self.main_ready)
                .map(|(_, due)| Duration::from_millis((due - now_ms).max(0) as u64))
                .unwrap_or(wait);
            wait.min(until_poll).min(until_due)
        };
        let received = self.main.recv(max - out.len(), main_wait).await?;
        self.main_ready |= match &received {
            Received::Batch(b) => !b.is_empty(),
            Received::Assigned(_) | Received::End => true,
            Received::Revoked(_) => false,
        };
        match received {
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
                    .held
                    .min_offset(p.partition)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: u32, offset: u64) -> Record {
        Record {
            position: Position { partition, offset },
            ..Default::default()
        }
    }

    #[test]
    fn held_records_of_a_partition_are_released_in_offset_order() {
        let mut held = Held::default();
        held.push(200, rec(1, 0));
        held.push(100, rec(1, 1));
        held.push(150, rec(2, 0));
        let mut out = Vec::new();
        // Offset 1 is due, but waits behind offset 0: a checkpoint must not mark it
        // processed while offset 0 is held.
        held.release(160, 10, &mut out);
        let got: Vec<Position> = out.iter().map(|r| r.position).collect();
        assert_eq!(
            got,
            vec![Position {
                partition: 2,
                offset: 0
            }]
        );
        assert_eq!(held.min_offset(1), Some(0));
        out.clear();
        held.release(200, 10, &mut out);
        let got: Vec<u64> = out.iter().map(|r| r.position.offset).collect();
        assert_eq!(got, vec![0, 1]);
        assert!(held.is_empty());
    }
}
