//! A Kafka consumer as a [`Source`].
//!
//! **Group mode** (a pipeline's source): the consumer subscribes in `source.group`,
//! librdkafka assigns partitions, and Weir — never librdkafka's auto-commit — commits
//! offsets once the runtime says every output derived from them was acknowledged. The
//! [`Checkpoint`] travels as the commit's metadata string and comes back with
//! [`Received::Assigned`] after a restart or a rebalance.
//!
//! **Receiving.** A thread of its own polls librdkafka and copies records into batches,
//! which wait in a short bounded queue for `recv`: consuming overlaps the engine's work on
//! the previous batches instead of alternating with it on one thread. When the queue is
//! full the thread stops polling, so a slow pipeline holds back fetching.
//!
//! **Rebalances.** librdkafka runs the rebalance callbacks inside the poll thread's polls.
//! [`RebalanceContext`] records them; the thread queues them right behind the records
//! fetched before them, and `recv` turns them into [`Received::Revoked`] /
//! [`Received::Assigned`] in that order. A revoked partition is never committed
//! afterwards: [`Source::commit`] skips partitions that librdkafka revoked (as the callback
//! saw it, so even before `recv` reached the event) or that this source has not been
//! told it owns. With the default (eager) assignors every rebalance revokes all
//! partitions, so the engine drops all open windows and replays from the committed
//! offsets, skipping what the checkpoints say was already emitted.
//!
//! **Fixed mode** (`weir tail`, test readers): every partition of the topic is assigned
//! directly at the beginning or the end, without a group; nothing is committed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
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
    /// Whether `events` is non-empty (checked after every poll, so without a lock).
    pending: AtomicBool,
    /// Partitions librdkafka has assigned to this member right now.
    assigned: Mutex<Vec<bool>>,
    /// What the poll thread has read of each partition.
    progress: Mutex<Progress>,
}

/// By partition: the next offset after the last record the poll thread took from
/// librdkafka (-1: none since the assignment), and whether librdkafka reported the end
/// of the partition after it.
#[derive(Debug, Default)]
struct Progress {
    polled: Vec<i64>,
    at_end: Vec<bool>,
}

impl Progress {
    fn slot(&mut self, p: usize) -> (&mut i64, &mut bool) {
        if self.polled.len() <= p {
            self.polled.resize(p + 1, -1);
            self.at_end.resize(p + 1, false);
        }
        (&mut self.polled[p], &mut self.at_end[p])
    }

    fn batch(&mut self, batch: &[Record]) {
        for r in batch {
            let (polled, at_end) = self.slot(r.position.partition as usize);
            *polled = (*polled).max(r.position.offset as i64 + 1);
            *at_end = false;
        }
    }
}

impl RebalanceContext {
    fn push(&self, e: Event) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        let (parts, now) = match &e {
            Event::Revoke(p) => (p, false),
            Event::Assign(p) => (p, true),
        };
        for &p in parts {
            let i = p as usize;
            if assigned.len() <= i {
                assigned.resize(i + 1, false);
            }
            assigned[i] = now;
        }
        drop(assigned);
        if now {
            let mut progress = self.progress();
            for &p in parts {
                let (polled, at_end) = progress.slot(p as usize);
                *polled = -1;
                *at_end = false;
            }
        }
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
        self.pending.store(true, Ordering::Release);
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_events(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    fn take(&self) -> Vec<Event> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *events)
    }

    /// Whether librdkafka currently has `partition` assigned to this member.
    fn is_assigned(&self, partition: u32) -> bool {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(partition as usize)
            .copied()
            .unwrap_or(false)
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
        // The end of a partition is how the source learns it has no backlog, not an error.
        if matches!(error, RdError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
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

/// A `BaseConsumer`, polled by the source's own thread (see the module documentation).
/// (A `StreamConsumer` measured 3-5x slower here: every batch paid a task wake-up.)
pub(crate) type Consumer_ = BaseConsumer<RebalanceContext>;

/// What the poll thread hands to `recv`, in the order it happened.
#[derive(Debug)]
enum Item {
    Batch(Vec<Record>),
    Events(Vec<Event>),
    Error(RdError),
}

/// Batches the poll thread may have ready ahead of `recv`.
const QUEUE: usize = 4;

/// Batches the runtime handed back, for the poll thread to fill again.
type Spares = Arc<Mutex<Vec<Vec<Record>>>>;

/// Reads one Kafka topic. See the module documentation.
pub struct KafkaSource {
    consumer: Arc<Consumer_>,
    topic: String,
    /// Whether offsets are committed (group mode).
    group: bool,
    /// Events and batches ready to hand out, in order.
    pending: VecDeque<Received>,
    /// Partitions this source has announced as assigned (indexed by partition).
    owned: Vec<bool>,
    /// Whether the first assignment arrived. Until then `recv` waits up to
    /// [`JOIN_WAIT`] instead of its `wait`: joining a group takes seconds, and a caller
    /// counting empty batches as idleness must not see the join as an idle topic.
    joined: bool,
    /// Where checkpoints also go, for brokers that drop commit metadata.
    store: Option<CheckpointStore>,
    /// What the poll thread received.
    items: Option<mpsc::Receiver<Item>>,
    /// The largest batch `recv` was asked for; the poll thread batches up to it.
    max: Arc<AtomicUsize>,
    spares: Spares,
    /// By partition, the next offset after the last record `recv` handed out (-1: none
    /// since the assignment).
    delivered: Vec<i64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const ARENA: usize = 256 * 1024;

/// How long the first `recv` of a group member waits for its partitions.
pub const JOIN_WAIT: Duration = Duration::from_secs(60);

/// How long one poll of the poll thread blocks, which bounds how long stopping it takes.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// The poll thread: polls `consumer` and queues what it gets, in order, until `stop` is
/// set or `recv`'s side of the queue is gone.
fn poll_loop(
    consumer: Arc<Consumer_>,
    items: mpsc::Sender<Item>,
    max: Arc<AtomicUsize>,
    spares: Spares,
    stop: Arc<AtomicBool>,
) {
    let ctx = consumer.context();
    // Keys and payloads are copied into this buffer (see `to_record`).
    let mut arena = BytesMut::new();
    let send = |item: Item| {
        if let Item::Batch(b) = &item {
            ctx.progress().batch(b);
        }
        items.blocking_send(item).is_ok()
    };
    while !stop.load(Ordering::Relaxed) {
        let limit = max.load(Ordering::Relaxed).max(1);
        let mut batch: Vec<Record> = Vec::new();
        let mut wait = POLL_SLICE;
        loop {
            let got = consumer.poll(wait);
            wait = Duration::ZERO;
            if ctx.has_events() {
                // Rebalance callbacks served inside this poll come before the record it
                // returned, and after the records already batched.
                if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                    return;
                }
                if !send(Item::Events(ctx.take())) {
                    return;
                }
            }
            match got {
                Some(Ok(m)) => {
                    if batch.capacity() == 0 {
                        batch = spares
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pop()
                            .unwrap_or_default();
                        batch.reserve(limit.min(4096));
                    }
                    batch.push(to_record(&m, &mut arena));
                    if batch.len() >= limit {
                        break;
                    }
                }
                Some(Err(RdError::PartitionEOF(p))) => {
                    // Everything fetched so far is behind the records already batched.
                    if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                        return;
                    }
                    *ctx.progress().slot(p.max(0) as usize).1 = true;
                }
                Some(Err(e)) => {
                    if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                        return;
                    }
                    if !send(Item::Error(e)) {
                        return;
                    }
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() && !send(Item::Batch(batch)) {
            return;
        }
    }
}

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
        Ok(KafkaSource::start(
            consumer,
            topic,
            true,
            VecDeque::new(),
            Vec::new(),
            false,
            store,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        consumer: Consumer_,
        topic: &str,
        group: bool,
        pending: VecDeque<Received>,
        owned: Vec<bool>,
        joined: bool,
        store: Option<CheckpointStore>,
    ) -> Self {
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(QUEUE);
        let max = Arc::new(AtomicUsize::new(1024));
        let spares = Spares::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumer, max, spares, stop) =
                (consumer.clone(), max.clone(), spares.clone(), stop.clone());
            std::thread::Builder::new()
                .name("weir-kafka-poll".into())
                .spawn(move || poll_loop(consumer, tx, max, spares, stop))
                .ok()
        };
        if thread.is_none() {
            tracing::error!(topic, "kafka: cannot start the poll thread");
        }
        KafkaSource {
            consumer,
            topic: topic.to_string(),
            group,
            pending,
            owned,
            joined,
            store,
            items: Some(rx),
            max,
            spares,
            delivered: Vec::new(),
            stop,
            thread,
        }
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
        Ok(KafkaSource::start(
            consumer,
            topic,
            false,
            VecDeque::from([Received::Assigned(parts)]),
            vec![true; partitions as usize],
            true,
            None,
        ))
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

    /// Turns rebalance events into `pending` entries.
    async fn handle_events(&mut self, events: Vec<Event>) {
        for e in events {
            match e {
                Event::Revoke(parts) => {
                    self.set_owned(&parts, false);
                    tracing::debug!(topic = %self.topic, ?parts, "partitions revoked");
                    self.pending
                        .push_back(Received::Revoked(parts.iter().map(|&p| p as u32).collect()));
                }
                Event::Assign(parts) => {
                    self.joined = true;
                    self.set_owned(&parts, true);
                    for &p in &parts {
                        let i = p as usize;
                        if self.delivered.len() <= i {
                            self.delivered.resize(i + 1, -1);
                        }
                        self.delivered[i] = -1;
                    }
                    let cps = self.checkpoints(&parts).await;
                    self.pending.push_back(Received::Assigned(cps));
                }
            }
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the queue wakes a thread waiting to hand over a batch.
        self.items = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies a message's headers out of librdkafka's buffer.
pub(crate) fn headers_of(m: &impl rdkafka::message::Message) -> Vec<weir_engine::record::Header> {
    let Some(hs) = m.headers() else {
        return Vec::new();
    };
    let mut out: Vec<weir_engine::record::Header> = hs
        .iter()
        .map(|h| {
            (
                h.key.to_string().into(),
                h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
            )
        })
        .collect();
    // Headers without a value (null) would read as empty: name them, so a dead letter
    // written to Kafka gives them back as null (see `crate::sink`).
    let nulls: Vec<&str> = hs
        .iter()
        .filter(|h| h.value.is_none())
        .map(|h| h.key)
        .collect();
    if !nulls.is_empty() {
        out.push((
            crate::sink::HEADER_NULL_HEADERS.into(),
            Bytes::from(serde_json::to_vec(&nulls).unwrap_or_default()),
        ));
    }
    out
}

/// Copies a message out of librdkafka's buffer. Keys and payloads are appended to `arena`
/// and split off as shared slices of it: one allocation per ~256 KiB of records instead of
/// two per record.
fn to_record(m: &BorrowedMessage<'_>, arena: &mut BytesMut) -> Record {
    let mut copy = |b: &[u8]| {
        if arena.capacity() - arena.len() < b.len() {
            *arena = BytesMut::with_capacity(ARENA.max(b.len()));
        }
        arena.extend_from_slice(b);
        arena.split().freeze()
    };
    let mut headers = headers_of(m);
    if m.payload().is_none() {
        // A tombstone: no value, which an empty payload cannot tell.
        headers.push((
            weir_engine::record::HEADER_NULL_VALUE.into(),
            Bytes::from_static(b"true"),
        ));
    }
    Record {
        key: m.key().map(&mut copy),
        payload: m.payload().map(&mut copy).unwrap_or_default(),
        headers,
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
        self.max.store(max, Ordering::Relaxed);
        if let Some(r) = self.pending.pop_front() {
            return Ok(r);
        }
        let wait = if self.joined {
            wait
        } else {
            wait.max(JOIN_WAIT)
        };
        let Some(items) = self.items.as_mut() else {
            return Ok(Received::End);
        };
        let item = match tokio::time::timeout(wait, items.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => {
                return Err(weir_engine::EngineError::backend(
                    "kafka",
                    format!("the poll thread of `{}` stopped", self.topic),
                    false,
                ))
            }
            Err(_) => {
                if !self.joined {
                    tracing::warn!(topic = %self.topic, "kafka: no partitions assigned after {JOIN_WAIT:?}; still waiting");
                }
                return Ok(Received::Batch(Vec::new()));
            }
        };
        match item {
            Item::Batch(mut batch) => {
                // Records of partitions not (or no longer) announced as ours are never
                // handed out; the queue's order makes this a safety net only.
                if batch.iter().any(|r| !self.owns(r.position.partition)) {
                    batch.retain(|r| self.owns(r.position.partition));
                }
                for r in &batch {
                    let p = r.position.partition as usize;
                    if self.delivered.len() <= p {
                        self.delivered.resize(p + 1, -1);
                    }
                    self.delivered[p] = self.delivered[p].max(r.position.offset as i64 + 1);
                }
                Ok(Received::Batch(batch))
            }
            Item::Events(events) => {
                self.handle_events(events).await;
                Ok(self
                    .pending
                    .pop_front()
                    .unwrap_or(Received::Batch(Vec::new())))
            }
            Item::Error(source) if crate::error::is_undecodable(&source) => {
                let e = KafkaError::Undecodable {
                    topic: self.topic.clone(),
                    source,
                };
                tracing::error!(topic = %self.topic, "{e}");
                Err(e.into())
            }
            Item::Error(source) => Err(KafkaError::Receive {
                topic: self.topic.clone(),
                source,
            }
            .into()),
        }
    }

    /// Records of `partition` wait in this source's queue, or librdkafka has not reported
    /// its end since the last record (end-of-partition events compare the position with
    /// the high watermark of fetch responses; Tansu's ListOffsets under-reports that high
    /// watermark, its fetch responses do not). A partition not fetched yet is backlogged.
    fn has_backlog(&self, partition: u32) -> bool {
        if !self.group {
            return false;
        }
        let p = partition as usize;
        let delivered = self.delivered.get(p).copied().unwrap_or(-1);
        let mut progress = self.consumer.context().progress();
        let (polled, at_end) = progress.slot(p);
        *polled > delivered || !*at_end
    }

    fn recycle(&mut self, mut batch: Vec<Record>) {
        batch.clear();
        let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < QUEUE {
            spares.push(batch);
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        if !self.group {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(positions.len());
        let ctx = self.consumer.context();
        for (p, cp) in positions {
            if !self.owns(p.partition) || !ctx.is_assigned(p.partition) {
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
                .filter(|(p, _)| self.owns(p.partition) && ctx.is_assigned(p.partition))
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
