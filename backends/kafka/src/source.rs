//! A Kafka consumer as a [`Source`].
//!
//! **Group mode** (a pipeline's source): the consumer subscribes in `source.group`,
//! librdkafka assigns partitions, and Weir — never librdkafka's auto-commit — commits
//! offsets once the runtime says every output derived from them was acknowledged. The
//! [`Checkpoint`] travels as the commit's metadata string and comes back with
//! [`Received::Assigned`] after a restart or a rebalance.
//!
//! **Rebalances.** librdkafka runs the rebalance callbacks inside our own polls of the
//! consumer queue (in [`KafkaSource::recv`], or the blocking-pool slice it waits in). [`RebalanceContext`] only records them; `recv`
//! turns them into [`Received::Revoked`] / [`Received::Assigned`] before handing out any
//! record that arrived after them, and drops records of revoked partitions that were
//! fetched before the revocation (the new owner reads them again from the committed
//! offset). A revoked partition is never committed afterwards: [`Source::commit`] skips
//! partitions this source does not own. With the default (eager) assignors every
//! rebalance revokes all partitions, so the engine drops all open windows and replays
//! from the committed offsets, skipping what the checkpoints say was already emitted.
//!
//! **Fixed mode** (`weir tail`, test readers): every partition of the topic is assigned
//! directly at the beginning or the end, without a group; nothing is committed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use weir_engine::{Checkpoint, Position, Received, Record, Result, Source};

use crate::checkpoints::CheckpointStore;
use crate::error::KafkaError;

/// A rebalance step, recorded by the callback and handled in `recv`.
#[derive(Debug)]
enum Event {
    Revoke(Vec<i32>),
    Assign(Vec<i32>),
}

/// The consumer's context: routes librdkafka's logs to `tracing` and records rebalances.
#[derive(Default)]
pub struct RebalanceContext {
    events: Mutex<Vec<Event>>,
}

impl RebalanceContext {
    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    fn has_events(&self) -> bool {
        !self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        tracing::warn!(%error, "kafka: {reason}");
    }
}

pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(facility = fac, "librdkafka: {msg}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility = fac, "librdkafka: {msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {msg}"),
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = partitions(tpl);
                if !parts.is_empty() {
                    self.push(Event::Revoke(parts));
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka: rebalance failed"),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Even an empty assignment (more members than partitions) is announced: it
            // ends the wait for the first assignment.
            self.push(Event::Assign(partitions(tpl)));
        }
    }
}

/// A `BaseConsumer`: `recv` drains what librdkafka already fetched with non-blocking polls
/// on the caller's thread, and only waits (in a blocking-pool thread) when nothing is there.
/// (A `StreamConsumer` measured 3-5x slower here: every batch paid a task wake-up.)
pub(crate) type Consumer_ = BaseConsumer<RebalanceContext>;

/// Reads one Kafka topic. See the module documentation.
pub struct KafkaSource {
    consumer: Arc<Consumer_>,
    topic: String,
    /// Whether offsets are committed (group mode).
    group: bool,
    /// Events and batches ready to hand out, in order.
    pending: VecDeque<Received>,
    /// Partitions currently owned (indexed by partition).
    owned: Vec<bool>,
    /// Whether the first assignment arrived. Until then `recv` waits up to
    /// [`JOIN_WAIT`] instead of its `wait`: joining a group takes seconds, and a caller
    /// counting empty batches as idleness must not see the join as an idle topic.
    joined: bool,
    /// Where checkpoints also go, for brokers that drop commit metadata.
    store: Option<CheckpointStore>,
    /// Buffer that received keys and payloads are copied into (see `to_record`).
    arena: BytesMut,
}

const ARENA: usize = 256 * 1024;

/// How long the first `recv` of a group member waits for its partitions.
pub const JOIN_WAIT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish()
    }
}

impl KafkaSource {
    /// A source in a consumer group, subscribed to `topic`.
    pub(crate) fn subscribed(
        consumer: Consumer_,
        topic: &str,
        store: Option<CheckpointStore>,
    ) -> Result<Self, KafkaError> {
        consumer
            .subscribe(&[topic])
            .map_err(|source| KafkaError::Client {
                what: "consumer",
                source,
            })?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            group: true,
            pending: VecDeque::new(),
            owned: Vec::new(),
            joined: false,
            store,
            arena: BytesMut::new(),
        })
    }

    /// A source reading partitions `0..partitions` of `topic` from `start`, without a group.
    pub(crate) fn fixed(
        consumer: Consumer_,
        topic: &str,
        partitions: i32,
        start: Offset,
    ) -> Result<Self, KafkaError> {
        let mut tpl = TopicPartitionList::with_capacity(partitions as usize);
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, start)
                .map_err(|source| KafkaError::Client {
                    what: "consumer",
                    source,
                })?;
        }
        consumer.assign(&tpl).map_err(|source| KafkaError::Client {
            what: "consumer",
            source,
        })?;
        let parts: Vec<(u32, Option<Checkpoint>)> =
            (0..partitions as u32).map(|p| (p, None)).collect();
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topic: topic.to_string(),
            group: false,
            pending: VecDeque::from([Received::Assigned(parts)]),
            owned: vec![true; partitions as usize],
            joined: true,
            store: None,
            arena: BytesMut::new(),
        })
    }

    fn set_owned(&mut self, parts: &[i32], owned: bool) {
        for &p in parts {
            let i = p as usize;
            if self.owned.len() <= i {
                self.owned.resize(i + 1, false);
            }
            self.owned[i] = owned;
        }
    }

    fn owns(&self, partition: u32) -> bool {
        self.owned.get(partition as usize).copied().unwrap_or(false)
    }

    /// The checkpoints committed with the offsets of newly assigned partitions. A failed
    /// lookup is logged and yields no checkpoints: records are then counted again from
    /// the committed offsets (still at-least-once, but results of windows that closed
    /// before the restart may be re-emitted with partial counts).
    async fn checkpoints(&self, parts: &[i32]) -> Vec<(u32, Option<Checkpoint>)> {
        let mut tpl = TopicPartitionList::with_capacity(parts.len());
        for &p in parts {
            tpl.add_partition(&self.topic, p);
        }
        let consumer = self.consumer.clone();
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=5 {
            let tpl = tpl.clone();
            let c = consumer.clone();
            let got = tokio::task::spawn_blocking(move || {
                c.committed_offsets(tpl, Duration::from_secs(10))
            })
            .await;
            match got {
                Ok(Ok(list)) => {
                    tracing::debug!(topic = %self.topic, committed = ?list, "kafka: committed offsets at assignment");
                    let mut out: Vec<(u32, Option<Checkpoint>, bool)> = parts
                        .iter()
                        .map(|&p| {
                            let e = list
                                .find_partition(&self.topic, p)
                                .filter(|e| matches!(e.offset(), Offset::Offset(_)));
                            (
                                p as u32,
                                e.as_ref().and_then(|e| Checkpoint::decode(e.metadata())),
                                e.is_some(),
                            )
                        })
                        .collect();
                    let missing: Vec<i32> = out
                        .iter()
                        .filter(|(_, cp, committed)| cp.is_none() && *committed)
                        .map(|(p, _, _)| *p as i32)
                        .collect();
                    if let (Some(store), false) = (&self.store, missing.is_empty()) {
                        match store.read(&self.topic, &missing).await {
                            Ok(found) => {
                                for (p, cp, _) in &mut out {
                                    if cp.is_none() {
                                        *cp = found.get(&(*p as i32)).copied();
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(topic = %self.topic, error = %e, attempt, "cannot read the checkpoint topic; retrying");
                                tokio::time::sleep(delay).await;
                                delay *= 2;
                                continue;
                            }
                        }
                    }
                    return out.into_iter().map(|(p, cp, _)| (p, cp)).collect();
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %self.topic, error = %e, attempt, "cannot read committed checkpoints; retrying")
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "checkpoint lookup task failed")
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        tracing::warn!(topic = %self.topic, "no checkpoints: replayed records are counted again");
        parts.iter().map(|&p| (p as u32, None)).collect()
    }

    /// Turns the rebalance events recorded so far into `pending` entries, dropping
    /// records of revoked partitions from `stale` (records fetched before the events).
    async fn handle_events(&mut self, stale: &mut Vec<Record>) {
        for e in self.consumer.context().take() {
            match e {
                Event::Revoke(parts) => {
                    self.set_owned(&parts, false);
                    let before = stale.len();
                    stale.retain(|r| self.owns(r.position.partition));
                    tracing::debug!(topic = %self.topic, ?parts, dropped = before - stale.len(), "partitions revoked");
                    self.pending
                        .push_back(Received::Revoked(parts.iter().map(|&p| p as u32).collect()));
                }
                Event::Assign(parts) => {
                    self.joined = true;
                    self.set_owned(&parts, true);
                    let cps = self.checkpoints(&parts).await;
                    self.pending.push_back(Received::Assigned(cps));
                }
            }
        }
    }
}

/// Copies a message's headers out of librdkafka's buffer.
pub(crate) fn headers_of(m: &impl rdkafka::message::Message) -> Vec<weir_engine::record::Header> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_string().into(),
                        h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a message out of librdkafka's buffer. Keys and payloads are appended to `arena`
/// and split off as shared slices of it: one allocation per ~256 KiB of records instead of
/// two per record.
fn to_record(m: &BorrowedMessage<'_>, arena: &mut BytesMut) -> Record {
    let mut copy = |b: &[u8]| {
        if arena.capacity() - arena.len() < b.len() {
            *arena = BytesMut::with_capacity(ARENA.max(b.len()));
        }
        // (An exact-size buffer handed in for one record never needs the line above.)
        arena.extend_from_slice(b);
        arena.split().freeze()
    };
    Record {
        key: m.key().map(&mut copy),
        payload: m.payload().map(&mut copy).unwrap_or_default(),
        headers: headers_of(m),
        timestamp: m.timestamp().to_millis(),
        position: Position {
            partition: m.partition() as u32,
            offset: m.offset() as u64,
        },
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if let Some(r) = self.pending.pop_front() {
            return Ok(r);
        }
        let mut batch: Vec<Record> = Vec::with_capacity(max.min(4096));
        // A record that arrived after rebalance events belongs after them.
        let mut fresh: Option<Record> = None;
        let mut error = None;
        let ctx = self.consumer.context();
        // Drain what librdkafka already fetched, without waiting, up to `max`. Each poll
        // serves at most one event, so a rebalance stops the batch right there.
        while batch.len() < max && !ctx.has_events() {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => batch.push(to_record(&m, &mut self.arena)),
                Some(Err(e)) => {
                    error = Some(e);
                    break;
                }
                None => break,
            }
        }
        if batch.is_empty() && error.is_none() && !ctx.has_events() {
            // Nothing fetched yet: wait in the blocking pool, in short slices so that a
            // dropped `recv` (shutdown) leaves no long poll behind. A record that arrives
            // after rebalance events (served inside the same poll) belongs after them.
            let wait = if self.joined {
                wait
            } else {
                wait.max(JOIN_WAIT)
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let slice = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(Duration::from_millis(100));
                let c = self.consumer.clone();
                let got = tokio::task::spawn_blocking(move || {
                    c.poll(slice).map(|r| {
                        r.map(|m| {
                            // One record: an exact-size buffer, not a whole arena.
                            let mut one = BytesMut::with_capacity(
                                m.payload_len() + m.key().map_or(0, <[u8]>::len),
                            );
                            (to_record(&m, &mut one), c.context().has_events())
                        })
                    })
                })
                .await
                .map_err(|e| {
                    weir_engine::EngineError::backend(
                        "kafka",
                        format!("poll task failed: {e}"),
                        true,
                    )
                })?;
                match got {
                    Some(Ok((r, after_events))) => {
                        if after_events {
                            fresh = Some(r);
                        } else {
                            batch.push(r);
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        error = Some(e);
                        break;
                    }
                    None if ctx.has_events() || tokio::time::Instant::now() >= deadline => {
                        if !self.joined && !ctx.has_events() {
                            tracing::warn!(topic = %self.topic, "kafka: no partitions assigned after {JOIN_WAIT:?}; still waiting");
                        }
                        break;
                    }
                    None => {}
                }
            }
            while error.is_none()
                && fresh.is_none()
                && !batch.is_empty()
                && batch.len() < max
                && !ctx.has_events()
            {
                match self.consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => batch.push(to_record(&m, &mut self.arena)),
                    Some(Err(e)) => error = Some(e),
                    None => break,
                }
            }
        }
        if self.consumer.context().has_events() {
            self.handle_events(&mut batch).await;
            if !batch.is_empty() {
                self.pending.push_back(Received::Batch(batch));
            }
            if let Some(r) = fresh {
                self.pending.push_back(Received::Batch(vec![r]));
            }
            return Ok(self
                .pending
                .pop_front()
                .unwrap_or(Received::Batch(Vec::new())));
        }
        if let Some(r) = fresh {
            batch.push(r);
        }
        match error {
            Some(e) if batch.is_empty() => Err(KafkaError::Receive {
                topic: self.topic.clone(),
                source: e,
            }
            .into()),
            Some(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "kafka: receive error after a partial batch");
                Ok(Received::Batch(batch))
            }
            None => Ok(Received::Batch(batch)),
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        if !self.group {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(positions.len());
        for (p, cp) in positions {
            if !self.owns(p.partition) {
                tracing::debug!(topic = %self.topic, partition = p.partition, "not committing a partition this source no longer owns");
                continue;
            }
            let mut e = tpl.add_partition(&self.topic, p.partition as i32);
            e.set_offset(Offset::Offset(p.offset as i64))
                .map_err(|source| KafkaError::Commit {
                    topic: self.topic.clone(),
                    source,
                })?;
            e.set_metadata(cp.encode());
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        if let Some(store) = &self.store {
            // Checkpoints first: one newer than its offset is harmless, one older is not.
            let owned: Vec<(Position, Checkpoint)> = positions
                .iter()
                .filter(|(p, _)| self.owns(p.partition))
                .copied()
                .collect();
            store.write(&self.topic, &owned).await?;
        }
        let consumer = self.consumer.clone();
        let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| {
                weir_engine::EngineError::backend("kafka", format!("commit task failed: {e}"), true)
            })?;
        match res {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, ?positions, "kafka: committed");
                Ok(())
            }
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::RebalanceInProgress
                            | RDKafkaErrorCode::IllegalGeneration
                            | RDKafkaErrorCode::UnknownMemberId
                            | RDKafkaErrorCode::FencedInstanceId
                            | RDKafkaErrorCode::StaleMemberEpoch
                    )
                ) =>
            {
                // The group is rebalancing: these partitions are about to be revoked and the
                // new owner replays from the previous commit. Losing this commit costs
                // replay, not data; retrying it would block the poll that completes the
                // rebalance.
                tracing::warn!(topic = %self.topic, error = %e, "commit refused during a rebalance; the new owner replays from the previous commit");
                Ok(())
            }
            Err(source) => Err(KafkaError::Commit {
                topic: self.topic.clone(),
                source,
            }
            .into()),
        }
    }
}
