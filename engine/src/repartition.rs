//! Repartitioning (`[source] repartition = true`): input that is not keyed by the group key
//! read by any number of instances, exactly.
//!
//! Two stages run in each `weir run`:
//!
//! 1. The [`Forwarder`] reads the source topic in a group of its own (`<group>.repartition`),
//!    decodes each record's group key and event time, and writes it, payload and headers
//!    untouched plus a [`HEADER_ORIGIN`] (`partition:offset` in the source topic), to the
//!    internal topic's partition `fnv1a(key) % P` (records it cannot decode go to
//!    `source partition % P`: the windowing stage dead-letters them as it always does). On
//!    Kafka it writes in a transaction of its own that also commits its source offsets, so a
//!    crash forwards nothing twice and the windowing stage reads committed records only.
//! 2. The windowing stage is the ordinary pipeline on the internal topic: every (key,
//!    window) now lives in one partition, so each partition is a task of its own and the
//!    partitions spread over the instances as keyed input does.
//!
//! **Event time.** One internal partition interleaves records of every source partition,
//! some of which may lag: its task keeps one watermark per *origin* (source partition) and
//! takes the lowest, as if it read the source partitions itself. An origin must never go
//! idle in a partition because that partition heard nothing from it (its keys may hash
//! elsewhere; its forwarder may be dead), so idleness comes only from *markers*: at every
//! commit, and right after an assignment, the forwarder writes to **every** internal
//! partition one [`Marker`] with the source topic's partition count and, for each source
//! partition it owns, its highest event time and whether it is idle (no record for
//! `idle_timeout` and no backlog). A task holds its watermark until markers have told it
//! of every origin. Markers are not events: the windowing stage takes them out of each
//! batch before anything counts them.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::decode::{Decoder, TimeSource};
use crate::error::{EngineError, Result};
use crate::operator::{event_time, group_key, Job};
pub use crate::origin::{origin_of, Marker, HEADER_MARKER, HEADER_ORIGIN};
use crate::record::{fnv1a, Checkpoint, OutRecord, Position, Record};
use crate::runtime::retries::{
    commit_with_retry, flush_with_retry, next_delay, recv_with_retry, retry_backoff,
};
use crate::sink::{Sink, Transaction};
use crate::source::{Received, Source};
pub use crate::window::Activity;

/// How long `recv` waits before the forwarder checks idleness and its commit timer.
const TICK: Duration = Duration::from_millis(200);

/// The internal partition of a forwarded event whose group key is `key`.
#[inline]
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (fnv1a(key) % u64::from(partitions.max(1))) as u32
}

/// One source partition as the forwarder sees it.
#[derive(Debug, Clone)]
struct Part {
    owned: bool,
    /// Next offset after the last record forwarded.
    next: Option<u64>,
    /// Highest event time forwarded (no further than the wall clock).
    max_event: i64,
    last_seen: Instant,
    idle: bool,
}

/// How a forwarder's run ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forwarded {
    /// Records forwarded (events and records the windowing stage will dead-letter).
    pub records: u64,
    /// Marker records written.
    pub markers: u64,
}

/// The first stage of a repartitioned pipeline (see the module's documentation).
pub struct Forwarder {
    source: Box<dyn Source>,
    sink: Box<dyn Sink>,
    transaction: Option<Box<dyn Transaction>>,
    decoder: Decoder,
    key_slots: Vec<(usize, String)>,
    time: TimeSource,
    max_future: Option<i64>,
    idle_timeout: Duration,
    commit_interval: Duration,
    batch_size: usize,
    parts: Vec<Part>,
    shutdown: CancellationToken,
    exit_when_idle: Option<Duration>,
    key_buf: Vec<u8>,
    /// By internal partition: what this batch sends there.
    out: Vec<Vec<OutRecord>>,
    done: Forwarded,
}

impl Forwarder {
    /// A forwarder of `job`'s events from `source` (the source topic in the forwarding
    /// group) to `sink` (the internal topic), in `transaction` if the backend has one (its
    /// sink and source must be made in it).
    pub fn new(
        job: &Job,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        transaction: Option<Box<dyn Transaction>>,
    ) -> Self {
        let (decoder, key_slots) = job.key_decoder();
        Forwarder {
            source,
            sink,
            transaction,
            decoder,
            key_slots,
            time: job.time.clone(),
            max_future: job.max_future.map(|d| d.as_millis() as i64),
            idle_timeout: job.window.idle_timeout,
            commit_interval: job.commit_interval,
            batch_size: job.batch_size,
            parts: Vec::new(),
            shutdown: CancellationToken::new(),
            exit_when_idle: None,
            key_buf: Vec::with_capacity(64),
            out: Vec::new(),
            done: Forwarded::default(),
        }
    }

    /// Stops once no record came for `idle` and no owned partition has a backlog (see
    /// [`Pipeline::exit_when_idle`](crate::Pipeline::exit_when_idle)).
    pub fn exit_when_idle(mut self, idle: Duration) -> Self {
        self.exit_when_idle = Some(idle);
        self
    }

    /// Stops (after a last commit) when `token` is cancelled.
    pub fn shutdown_on(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    fn part(&mut self, p: u32, now: Instant) -> &mut Part {
        let i = p as usize;
        if self.parts.len() <= i {
            self.parts.resize(
                i + 1,
                Part {
                    owned: false,
                    next: None,
                    max_event: i64::MIN,
                    last_seen: now,
                    idle: false,
                },
            );
        }
        &mut self.parts[i]
    }

    /// Runs until the source ends, goes idle (with `exit_when_idle`) or shutdown.
    pub async fn run(mut self) -> Result<Forwarded> {
        let partitions = match self.sink.partition_count().await? {
            Some(n) if n > 0 => n,
            _ => {
                return Err(EngineError::Stopped(format!(
                    "cannot tell how many partitions the internal topic {} has",
                    self.sink.name()
                )))
            }
        };
        self.out = (0..partitions).map(|_| Vec::new()).collect();
        tracing::info!(
            topic = self.source.topic(),
            internal = self.sink.name(),
            partitions,
            "repartition: forwarding the source's events by their group key"
        );
        let mut last_commit = Instant::now();
        let mut last_record = Instant::now();
        let mut markers_due = false;
        loop {
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                r = recv_with_retry(&mut *self.source, self.batch_size, TICK, &self.shutdown) => r?,
            };
            let now = Instant::now();
            let mut ended = false;
            match received {
                None => {
                    self.commit(partitions, false).await?;
                    return Ok(self.done);
                }
                Some(Received::End) => ended = true,
                Some(Received::Assigned(assigned)) => {
                    last_record = now;
                    for p in &mut self.parts {
                        p.owned = false;
                    }
                    for (p, cp) in assigned {
                        let part = self.part(p, now);
                        *part = Part {
                            owned: true,
                            next: None,
                            max_event: cp.map_or(i64::MIN, |c| c.watermark),
                            last_seen: now,
                            idle: false,
                        };
                    }
                    markers_due = true;
                }
                Some(Received::Revoked(revoked)) => {
                    last_record = now;
                    for p in revoked {
                        if let Some(part) = self.parts.get_mut(p as usize) {
                            part.owned = false;
                            part.next = None;
                        }
                    }
                    if self.transaction.is_some()
                        && self.parts.iter().any(|p| p.owned && p.next.is_some())
                    {
                        // The backend aborted the transaction, which held what the kept
                        // partitions forwarded since the last commit too; they would have
                        // to be read again from there. A restart does that.
                        return Err(EngineError::Stopped(
                            "repartition: partitions were revoked while others stay (an incremental rebalance) and the \
                             transaction that held their forwarded records was aborted; stopping so that a restart \
                             forwards them again from the committed offsets"
                                .into(),
                        ));
                    }
                }
                Some(Received::Batch(batch)) => {
                    if !batch.is_empty() {
                        last_record = now;
                        self.forward(&batch, partitions, now).await?;
                    }
                    self.source.recycle(batch);
                }
            }
            // Partitions that delivered nothing for idle_timeout and have no backlog go
            // idle: the next markers say so.
            for (i, p) in self.parts.iter_mut().enumerate() {
                if p.owned
                    && !p.idle
                    && now.duration_since(p.last_seen) >= self.idle_timeout
                    && !self.source.has_backlog(i as u32)
                {
                    p.idle = true;
                    markers_due = true;
                }
            }
            let idle_out = self.exit_when_idle.is_some_and(|d| {
                last_record.elapsed() >= d
                    && !self.source.pending()
                    && !self
                        .parts
                        .iter()
                        .enumerate()
                        .any(|(i, p)| p.owned && self.source.has_backlog(i as u32))
            });
            if ended || idle_out {
                // The input ended here: every owned partition is idle from now on.
                self.commit(partitions, true).await?;
                tracing::info!(
                    records = self.done.records,
                    markers = self.done.markers,
                    "repartition: forwarder stopped"
                );
                return Ok(self.done);
            }
            if markers_due
                || last_commit.elapsed() >= self.commit_interval
                || self.source.wants_commit()
            {
                self.commit(partitions, false).await?;
                last_commit = Instant::now();
                markers_due = false;
            }
        }
    }

    /// Forwards one batch: each record to its group key's internal partition.
    async fn forward(&mut self, batch: &[Record], partitions: u32, now: Instant) -> Result<()> {
        let now_ms = crate::time::now_millis();
        for rec in batch {
            let p = rec.position.partition;
            let (q, t) = match self.decoder.decode_record(rec).and_then(|ev| {
                let t = event_time(&self.time, self.max_future, rec, &ev, now_ms)?;
                group_key(&self.key_slots, &ev.values, &mut self.key_buf)?;
                Ok(t)
            }) {
                Ok(t) => (partition_of(&self.key_buf, partitions), Some(t)),
                // The windowing stage dead-letters it, with the same reason.
                Err(_) => (p % partitions, None),
            };
            let key = match t {
                Some(_) => Some(Bytes::copy_from_slice(&self.key_buf)),
                None => rec.key.clone(),
            };
            let mut headers = Vec::with_capacity(rec.headers.len() + 1);
            headers.extend(rec.headers.iter().cloned());
            headers.push((
                HEADER_ORIGIN.into(),
                Bytes::from(format!("{p}:{}", rec.position.offset)),
            ));
            self.out[q as usize].push(OutRecord {
                key,
                payload: rec.payload.clone(),
                headers,
                timestamp: rec.timestamp,
            });
            let part = self.part(p, now);
            part.next = Some(rec.position.offset + 1);
            part.last_seen = now;
            part.idle = false;
            if let Some(t) = t {
                part.max_event = part.max_event.max(t.min(now_ms));
            }
        }
        for q in 0..partitions {
            let records = std::mem::take(&mut self.out[q as usize]);
            if records.is_empty() {
                continue;
            }
            self.submit(q, &records).await?;
            self.done.records += records.len() as u64;
            let mut spare = records;
            spare.clear();
            self.out[q as usize] = spare;
        }
        Ok(())
    }

    /// Submits `records` to internal partition `q`, retrying retryable failures (a failed
    /// submit submitted none of them).
    async fn submit(&mut self, q: u32, records: &[OutRecord]) -> Result<()> {
        let mut backoff = retry_backoff();
        loop {
            match self.sink.submit_to(q, records).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.is_retryable()
                        && self.transaction.is_none()
                        && !self.shutdown.is_cancelled() =>
                {
                    let delay = next_delay(&mut backoff);
                    tracing::warn!(error = %e, retry_in = ?delay, "repartition: forwarding failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes a marker to every internal partition, waits for every forwarded record's
    /// acknowledgement, then commits the source positions (and the transaction). `ended`:
    /// the owned partitions are marked idle (this forwarder stops).
    async fn commit(&mut self, partitions: u32, ended: bool) -> Result<()> {
        let owned: Vec<(u32, i64, Activity)> = self
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.owned)
            .map(|(i, p)| {
                let state = match (ended, p.idle) {
                    (true, _) => Activity::Ended,
                    (false, true) => Activity::Idle,
                    (false, false) => Activity::Active,
                };
                (i as u32, p.max_event, state)
            })
            .collect();
        if !owned.is_empty() {
            let count = self
                .source
                .partition_count()
                .unwrap_or(0)
                .max(owned.iter().map(|(p, _, _)| p + 1).max().unwrap_or(0));
            let marker = OutRecord {
                key: None,
                payload: Marker {
                    count,
                    origins: owned,
                }
                .encode(),
                headers: vec![(HEADER_MARKER.into(), Bytes::from_static(b"1"))],
                timestamp: None,
            };
            for q in 0..partitions {
                self.submit(q, std::slice::from_ref(&marker)).await?;
            }
            self.done.markers += u64::from(partitions);
        }
        flush_with_retry(&mut *self.sink, &self.shutdown).await?;
        let positions: Vec<(Position, Checkpoint)> = self
            .parts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let next = p.next.filter(|_| p.owned)?;
                Some((
                    Position {
                        partition: i as u32,
                        offset: next,
                    },
                    Checkpoint {
                        watermark: p.max_event,
                        processed: next,
                    },
                ))
            })
            .collect();
        commit_with_retry(
            &mut *self.source,
            &positions,
            self.transaction.as_deref_mut(),
            &self.shutdown,
        )
        .await?;
        Ok(())
    }
}
