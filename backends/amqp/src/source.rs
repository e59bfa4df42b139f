//! The RabbitMQ source: one queue per partition, manual acknowledgements, commits as AMQP
//! transactions, and (with `partitions > 1`) the partitions split between the instances of
//! a pipeline by [`crate::members`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::Connection;
use tokio::time::Instant;
use weir_engine::{Checkpoint, Position, Received, Record, Result, Source};

use crate::config::{AmqpConfig, QueueType};
use crate::error::redact;
use crate::members::{Membership, SETTLE};
use crate::part::{Opened, Part};
use crate::sink::{HEADER_KEY, HEADER_TIMESTAMP};
use crate::topology::{self, BROKER_TIMEOUT};

pub(crate) const STREAM_OFFSET: &str = "x-stream-offset";

/// How often a member looks at the group's view, at most: the longest a receive waits.
const LOOK: Duration = Duration::from_millis(250);
/// How long a member waits before trying again a partition queue another consumer holds
/// exclusively.
const BUSY_RETRY: Duration = Duration::from_millis(500);

/// Which partitions a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Its share in the group of the topic's readers (every partition when alone).
    Share,
    /// Every partition (a table's reader).
    All,
}

/// Consumes the queues of topic `topic`: queue `topic` as partition 0, or with
/// `partitions = N > 1` queues `topic.0`..`topic.{N-1}` as partitions 0..N-1.
///
/// * Offsets are a counter per partition this source assigns to deliveries in order
///   (stream queues: the stream offset). Delivery tags restart with every channel, offsets
///   do not.
/// * [`commit`](Source::commit) of offset `o` of partition `p` acks (`multiple`) every
///   delivery of `p` below `o` still unacked on its channel and stores `o` with the
///   checkpoint in queue `weir.checkpoint.<queue>`, both in one AMQP transaction. A new
///   consumer reads that back and numbers the redelivered (requeued, in their original
///   order) deliveries from `o` again, so the engine can tell replayed records from new ones.
/// * With several partitions, the instances reading the topic agree on an owner per
///   partition (see [`crate::members`]); a partition that changes hands is
///   [`Received::Revoked`] by one (its channel closed: RabbitMQ requeues its unacked
///   deliveries) and [`Received::Assigned`] with its checkpoint to the other.
/// * A lost connection discards the unacked deliveries (RabbitMQ requeues them), returns
///   [`Received::Revoked`] so the engine drops the open windows they fed, then reconnects
///   with backoff, re-declares the topology and returns [`Received::Assigned`] with no
///   checkpoint for those partitions.
pub struct AmqpSource {
    cfg: Arc<AmqpConfig>,
    topic: String,
    conn: Option<Connection>,
    /// The partition queues consumed now, in partition order.
    parts: Vec<Part>,
    /// The partitions this source should consume.
    wanted: Vec<u32>,
    /// The group this source is a member of (`partitions > 1`, [`Claim::Share`]).
    members: Option<Membership>,
    events: VecDeque<Received>,
    connected_once: bool,
    failures: u32,
    /// Partitions whose channel was lost (not handed over): consumed again, they are
    /// assigned without a checkpoint (see the README, "Connection loss").
    lost: Vec<u32>,
    /// When to try again the wanted partitions another consumer holds exclusively.
    retry_at: Option<Instant>,
    /// The part a receive polls first (so that no partition starves another).
    turn: usize,
}

impl AmqpSource {
    pub(crate) async fn connect(
        cfg: Arc<AmqpConfig>,
        topic: &str,
        claim: Claim,
    ) -> Result<AmqpSource> {
        let members = (claim == Claim::Share && cfg.partitions > 1)
            .then(|| Membership::join(cfg.clone(), topic));
        let mut s = AmqpSource {
            cfg,
            topic: topic.to_string(),
            conn: None,
            parts: Vec::new(),
            wanted: Vec::new(),
            members,
            events: VecDeque::new(),
            connected_once: false,
            failures: 0,
            lost: Vec::new(),
            retry_at: None,
            turn: 0,
        };
        if let Some(m) = &s.members {
            // Listen for the other members before claiming anything (bounded: without a
            // broker the first receive reports the problem).
            let until = Instant::now() + SETTLE * 4;
            while Instant::now() < until {
                match m.settled_at() {
                    Some(t) => {
                        tokio::time::sleep_until(t).await;
                        break;
                    }
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            tracing::info!(
                topic,
                member = m.id(),
                partitions = s.cfg.partitions,
                "RabbitMQ source joined the group of this topic's readers"
            );
        }
        s.sync().await?;
        Ok(s)
    }

    fn stream(&self) -> bool {
        self.cfg.queue_type == QueueType::Stream
    }

    /// Connects if need be, then makes the consumed partitions the wanted ones: closes
    /// those no longer this source's (queues [`Received::Revoked`]) and opens the new ones
    /// (queues [`Received::Assigned`] with the whole set).
    async fn sync(&mut self) -> Result<()> {
        if self.conn.as_ref().is_some_and(|c| !c.status().connected()) {
            if !self.parts.is_empty() {
                let ev = self.lose_all(&"the connection closed");
                self.events.push_back(ev);
                return Ok(());
            }
            self.conn = None;
        }
        if self.conn.is_none() {
            let name = format!("weir source {}", self.topic);
            match topology::connect(&self.cfg, &name).await {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(
                        topic = %self.topic,
                        url = %redact(&self.cfg.url),
                        attempt = self.failures,
                        error = %e,
                        "RabbitMQ source cannot reconnect; retrying with backoff"
                    );
                    return Err(e);
                }
            }
        }
        let n = self.cfg.partitions;
        match &self.members {
            None => self.wanted = (0..n).collect(),
            Some(m) => {
                if let Some(w) = m.owned(n) {
                    self.wanted = w;
                }
            }
        }
        let gone: Vec<u32> = self
            .parts
            .iter()
            .map(|p| p.index)
            .filter(|p| !self.wanted.contains(p))
            .collect();
        if !gone.is_empty() {
            tracing::info!(topic = %self.topic, partitions = ?gone, "RabbitMQ partitions handed over to another instance: their channels close, their unacked deliveries go back to the queues");
            for part in std::mem::take(&mut self.parts) {
                if gone.contains(&part.index) {
                    part.close("handed over").await;
                } else {
                    self.parts.push(part);
                }
            }
            self.events.push_back(Received::Revoked(gone));
        }
        let due = self.retry_at.is_none_or(|t| Instant::now() >= t);
        let missing: Vec<u32> = self
            .wanted
            .iter()
            .copied()
            .filter(|p| !self.parts.iter().any(|x| x.index == *p))
            .collect();
        if missing.is_empty() || !due {
            return Ok(());
        }
        self.retry_at = None;
        let conn = self.conn.as_ref().expect("connected");
        let mut gained = Vec::new();
        let mut reconnected = false;
        let mut failed = None;
        for p in missing {
            let queue = topology::partition_queue(&self.topic, p, n);
            let opened =
                tokio::time::timeout(BROKER_TIMEOUT, Part::open(conn, &self.cfg, queue, p)).await;
            let Ok(opened) = opened else {
                // The connection answers nothing: drop it (and what it delivered).
                let e = topology::no_answer(&format!("opening partition {p}"));
                if self.parts.is_empty() {
                    self.conn = None;
                } else {
                    let ev = self.lose_all(&e);
                    self.events.push_back(ev);
                }
                failed = Some(e);
                break;
            };
            match opened {
                Ok(Opened::Consuming(part, cp)) => {
                    let was_lost = self.lost.contains(&p);
                    reconnected |= was_lost;
                    let cp = if was_lost { None } else { cp };
                    self.lost.retain(|l| *l != p);
                    let at = self.parts.partition_point(|x| x.index < p);
                    self.parts.insert(at, *part);
                    gained.push((p, cp));
                }
                Ok(Opened::Busy(e)) if self.members.is_none() => {
                    failed = Some(e);
                    break;
                }
                Ok(Opened::Busy(_)) => {
                    tracing::debug!(topic = %self.topic, partition = p, "partition queue still read by another instance; trying again");
                    self.retry_at = Some(Instant::now() + BUSY_RETRY);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if !gained.is_empty() {
            if reconnected {
                tracing::info!(
                    topic = %self.topic,
                    url = %redact(&self.cfg.url),
                    attempts = self.failures + 1,
                    "RabbitMQ source reconnected; topology re-declared, consuming again (unacked deliveries are redelivered)"
                );
            }
            self.connected_once = true;
            self.failures = 0;
            self.events.push_back(self.assignment(&gained));
        }
        match failed {
            Some(e) => {
                self.failures += 1;
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// The whole set of consumed partitions, with the checkpoints in `cps` (the others'
    /// are the engine's already).
    fn assignment(&self, cps: &[(u32, Option<Checkpoint>)]) -> Received {
        Received::Assigned(
            self.parts
                .iter()
                .map(|p| {
                    let cp = cps.iter().find(|(i, _)| *i == p.index).and_then(|c| c.1);
                    (p.index, cp)
                })
                .collect(),
        )
    }

    /// The channel of the part at `i` is gone: forget its deliveries and tell the engine.
    fn lose(&mut self, i: usize, why: &dyn std::fmt::Display) -> Received {
        if self.conn.as_ref().is_none_or(|c| !c.status().connected()) {
            return self.lose_all(why);
        }
        let part = self.parts.remove(i);
        tracing::warn!(
            queue = %part.queue,
            partition = part.index,
            unacked = part.unacked.len(),
            error = %why,
            "RabbitMQ source lost a channel: its unacked deliveries will be redelivered; open windows fed by them are dropped; consuming again"
        );
        self.lost.push(part.index);
        Received::Revoked(vec![part.index])
    }

    /// The connection is gone: forget every delivery and tell the engine.
    fn lose_all(&mut self, why: &dyn std::fmt::Display) -> Received {
        let unacked: usize = self.parts.iter().map(|p| p.unacked.len()).sum();
        tracing::warn!(
            topic = %self.topic,
            unacked,
            error = %why,
            "RabbitMQ source lost its channel: unacked deliveries will be redelivered; open windows fed by them are dropped; reconnecting"
        );
        self.conn = None;
        let gone: Vec<u32> = self.parts.drain(..).map(|p| p.index).collect();
        self.lost.extend(&gone);
        Received::Revoked(gone)
    }

    /// The parts at these indexes failed: lose them (after the batch), highest index first
    /// so the others stay put.
    fn lose_failed(&mut self, mut failed: Vec<(usize, String)>) -> Vec<Received> {
        failed.sort_by_key(|f| std::cmp::Reverse(f.0));
        failed.dedup_by_key(|f| f.0);
        let mut lost = Vec::new();
        for (j, why) in failed {
            if j >= self.parts.len() {
                continue;
            }
            lost.push(self.lose(j, &why));
        }
        lost
    }

    /// The first ready delivery (or end, or error) of any part, polling from `turn`.
    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<(usize, Option<lapin::Result<Delivery>>)> {
        let n = self.parts.len();
        for k in 0..n {
            let i = (self.turn + k) % n;
            if let Poll::Ready(d) = self.parts[i].poll_next(cx) {
                return Poll::Ready((i, d));
            }
        }
        Poll::Pending
    }

    /// Nothing came within the wait: ask how many messages wait in each queue.
    async fn check_backlogs(&mut self) -> Option<Received> {
        if self.stream() {
            return None;
        }
        for i in 0..self.parts.len() {
            let checked = tokio::time::timeout(BROKER_TIMEOUT, self.parts[i].check_backlog());
            match checked.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Some(self.lose(i, &e)),
                Err(_) => return Some(self.lose_all(&topology::no_answer("a queue's backlog"))),
            }
        }
        None
    }
}

/// A delivery as a record (position 0/0: the caller numbers it), and its stream offset if it has one.
pub(crate) fn to_record(d: Delivery) -> (Record, Option<u64>) {
    let mut key = None;
    let mut timestamp = d.properties.timestamp().map(|s| s as i64 * 1000);
    let mut stream_offset = None;
    let mut headers = Vec::new();
    if let Some(table) = d.properties.headers() {
        headers.reserve(table.inner().len());
        for (k, v) in table {
            match k.as_str() {
                HEADER_KEY => key = Some(Bytes::from(value_bytes(v))),
                HEADER_TIMESTAMP => {
                    if let AMQPValue::LongLongInt(t) = v {
                        timestamp = Some(*t);
                    }
                }
                STREAM_OFFSET => {
                    if let AMQPValue::LongLongInt(o) = v {
                        stream_offset = Some(*o as u64);
                    }
                }
                _ => headers.push((k.to_string().into(), Bytes::from(value_bytes(v)))),
            }
        }
    }
    let rec = Record {
        key,
        payload: Bytes::from(d.data),
        headers,
        timestamp,
        position: Position::default(),
    };
    (rec, stream_offset)
}

/// A header value as bytes: strings as they are, other values in their text form.
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortUInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongUInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongLongInt(i) => i.to_string().into_bytes(),
        AMQPValue::Timestamp(i) => i.to_string().into_bytes(),
        AMQPValue::Float(f) => f.to_string().into_bytes(),
        AMQPValue::Double(f) => f.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}

#[async_trait]
impl Source for AmqpSource {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        self.sync().await?;
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        let wait = if self.members.is_some() {
            wait.min(LOOK)
        } else {
            wait
        };
        if self.parts.is_empty() {
            // A member that owns nothing (more members than partitions, or its partitions
            // are still read by the instance before it).
            tokio::time::sleep(wait).await;
            return Ok(Received::Batch(Vec::new()));
        }
        let first = tokio::time::timeout(wait, std::future::poll_fn(|cx| self.poll_any(cx))).await;
        let (i, first) = match first {
            Err(_) => {
                return Ok(self
                    .check_backlogs()
                    .await
                    .unwrap_or(Received::Batch(Vec::new())))
            }
            Ok((i, Some(Ok(d)))) => (i, d),
            Ok((i, Some(Err(e)))) => return Ok(self.lose(i, &e)),
            Ok((i, None)) => return Ok(self.lose(i, &"the broker cancelled the consumer")),
        };
        // Drain what is already there, every part in turn from the one that delivered.
        // A part whose channel fails keeps none of its deliveries (they are redelivered);
        // the others' are all numbered, since a later multiple-ack covers them.
        let n = self.parts.len();
        let mut got: Vec<Vec<Delivery>> = (0..n).map(|_| Vec::new()).collect();
        got[i].push(first);
        let mut total = 1;
        let mut failed: Vec<(usize, String)> = Vec::new();
        {
            let mut cx = Context::from_waker(Waker::noop());
            for k in 0..n {
                let j = (i + k) % n;
                while total < max {
                    match self.parts[j].poll_next(&mut cx) {
                        Poll::Ready(Some(Ok(d))) => {
                            got[j].push(d);
                            total += 1;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            failed.push((j, e.to_string()));
                            break;
                        }
                        Poll::Ready(None) => {
                            failed.push((j, "the broker cancelled the consumer".into()));
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
        }
        self.turn = i + 1;
        let mut took_over = Vec::new();
        let mut records = Vec::with_capacity(total);
        for (j, deliveries) in got.into_iter().enumerate() {
            if deliveries.is_empty() || failed.iter().any(|(f, _)| *f == j) {
                continue;
            }
            let conn = self.conn.as_ref().expect("connected");
            let took = topology::bounded("a checkpoint read", self.parts[j].took_over(conn));
            match took.await {
                Ok(Some(cp)) => took_over.push((self.parts[j].index, Some(cp))),
                Ok(None) => {}
                Err(e) => {
                    failed.push((j, e.to_string()));
                    continue;
                }
            }
            let part = &mut self.parts[j];
            part.ready = u32::MAX;
            records.extend(deliveries.into_iter().map(|d| part.record(d)));
            if let Err(e) = part.grant_credit().await {
                failed.push((j, e.to_string()));
            }
        }
        let lost = self.lose_failed(failed);
        if took_over.is_empty() {
            self.events.extend(lost);
            return Ok(Received::Batch(records));
        }
        let assigned = self.assignment(&took_over);
        self.events.push_back(Received::Batch(records));
        self.events.extend(lost);
        Ok(assigned)
    }

    /// Messages wait in the partition's queue (as the last empty receive found), or
    /// deliveries came since that check. A stream's message count is all it retains, read or
    /// not: streams answer `false` (their partitions go idle on the wall clock alone).
    fn has_backlog(&self, partition: u32) -> bool {
        !self.stream()
            && self
                .parts
                .iter()
                .any(|p| p.index == partition && p.ready > 0)
    }

    /// The topic's partitions, when this source shares them with the group's other
    /// members (an engine reading input that is not keyed by the group holds its windows
    /// while some are read elsewhere).
    fn partition_count(&self) -> Option<u32> {
        self.members.is_some().then_some(self.cfg.partitions)
    }

    /// Asks for a commit once half the prefetch arrived on a partition since the last one:
    /// the broker stops delivering when `prefetch` deliveries are unacked, and acks only
    /// happen at commits, so waiting for the commit interval would cap throughput at
    /// `prefetch / commit_interval`.
    fn wants_commit(&self) -> bool {
        let half = (self.cfg.prefetch as usize / 2).max(1);
        self.parts.iter().any(|p| p.since_commit >= half)
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        for p in &mut self.parts {
            p.since_commit = 0;
        }
        let mut i = self.parts.len();
        while i > 0 {
            i -= 1;
            let index = self.parts[i].index;
            // The last position given for the partition.
            let Some((pos, cp)) = positions.iter().rev().find(|(p, _)| p.partition == index) else {
                continue;
            };
            let committed = topology::bounded("a commit", self.parts[i].commit(*pos, *cp));
            if let Err(e) = committed.await {
                let ev = self.lose(i, &e);
                self.events.push_back(ev);
                // A lost connection took every part.
                i = i.min(self.parts.len());
            }
        }
        for (pos, _) in positions {
            if !self.parts.iter().any(|p| p.index == pos.partition) {
                // Its channel is gone; RabbitMQ redelivers its deliveries.
                tracing::warn!(topic = %self.topic, partition = pos.partition, "commit skipped: the channel was lost; its deliveries are redelivered");
            }
        }
        Ok(())
    }
}
