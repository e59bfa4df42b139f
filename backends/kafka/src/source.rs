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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use weir_engine::backoff::{retry, Backoff};
use weir_engine::checkpoint_store::{CheckpointStore, Committed, WithFallback};
use weir_engine::{Checkpoint, Position, Received, Record, Result, Source};

use crate::checkpoints::{CheckpointTopic, CommitMetadata};
use crate::error::KafkaError;
use crate::poll::{poll_loop, Item, Spares, QUEUE};
use crate::rebalance::{Consumer_, Event};
use crate::txn::Txn;

/// Where a group member commits.
type Store = WithFallback<CommitMetadata, CheckpointTopic>;

/// How long a failing lookup of the checkpoints of newly assigned partitions is retried
/// before the run stops (see `KafkaSource::checkpoints`).
const CHECKPOINT_LOOKUP_LIMIT: Duration = Duration::from_secs(60);

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
    /// Where commits go (group mode): offset commits with the checkpoints as metadata,
    /// and the checkpoint topic too, for brokers that drop commit metadata.
    store: Option<Store>,
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
    /// Exactly-once: the broker's transaction, which commits take the offsets into and a
    /// revocation aborts.
    txn: Option<Arc<Txn>>,
    /// How many partitions the topic had at the last assignment (group mode; 0: not read
    /// yet). The commit store shares it: it writes it into every commit's metadata and
    /// checks the restored checkpoints against it.
    partition_count: Arc<AtomicU32>,
}

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
        checkpoint_topic: Option<CheckpointTopic>,
        txn: Option<Arc<Txn>>,
    ) -> Result<Self, KafkaError> {
        consumer
            .subscribe(&[topic])
            .map_err(|source| KafkaError::Client {
                what: "consumer",
                source,
            })?;
        let mut source = KafkaSource::start(
            consumer,
            topic,
            true,
            VecDeque::new(),
            Vec::new(),
            false,
            checkpoint_topic,
        );
        if let Some(store) = &mut source.store {
            store.primary.txn = txn.clone();
        }
        source.txn = txn;
        Ok(source)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        consumer: Consumer_,
        topic: &str,
        group: bool,
        pending: VecDeque<Received>,
        owned: Vec<bool>,
        joined: bool,
        checkpoint_topic: Option<CheckpointTopic>,
    ) -> Self {
        let consumer = Arc::new(consumer);
        let partition_count = Arc::<AtomicU32>::default();
        let store = group.then(|| WithFallback {
            primary: CommitMetadata {
                consumer: consumer.clone(),
                topic: topic.to_string(),
                txn: None,
                partitions: partition_count.clone(),
            },
            fallback: checkpoint_topic,
        });
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
            txn: None,
            partition_count,
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
    /// lookup is retried with backoff for [`CHECKPOINT_LOOKUP_LIMIT`]; then the run stops
    /// with the error (exit 1): without its checkpoint a partition's replayed records would
    /// be counted again, and windows that closed before the restart re-emitted with part of
    /// their count. A lookup that cannot succeed (the topic's partition count changed under
    /// the checkpoints) is the error at once.
    async fn checkpoints(&self, parts: &[i32]) -> Result<Vec<(u32, Option<Checkpoint>)>> {
        let wanted: Vec<u32> = parts.iter().map(|&p| p as u32).collect();
        let Some(store) = &self.store else {
            return Ok(wanted.iter().map(|&p| (p, None)).collect());
        };
        let what = format!(
            "kafka: reading the checkpoints committed for partitions {wanted:?} of `{}` \
             (without them replayed records would be counted again)",
            self.topic
        );
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
            .give_up_after(Some(CHECKPOINT_LOOKUP_LIMIT));
        let never = tokio_util::sync::CancellationToken::new();
        let found = retry(&what, backoff, &never, || store.load(Some(&wanted)))
            .await?
            .unwrap_or_default();
        Ok(wanted
            .iter()
            .map(|&p| {
                let c = found.iter().find(|c| c.partition == p);
                (p, c.and_then(|c| c.checkpoint))
            })
            .collect())
    }

    /// Exactly-once: aborts the open transaction. A failed abort leaves nothing visible
    /// either (the coordinator aborts it when it times out, or when this producer is
    /// fenced).
    async fn abort(&self, why: &str) {
        if let Some(txn) = &self.txn {
            if let Err(e) = txn.abort(why).await {
                tracing::error!(topic = %self.topic, error = %e, "kafka: aborting the transaction failed");
            }
        }
    }

    /// The topic's partition count from the broker's metadata (`None` if it does not
    /// answer in time: the last one known stays).
    async fn fetch_partition_count(&self) -> Option<u32> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let got = tokio::task::spawn_blocking(move || {
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .ok()?;
            md.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len() as u32)
        })
        .await
        .ok()
        .flatten();
        if got.is_none() {
            tracing::warn!(topic = %self.topic, "kafka: cannot read the topic's partition count at an assignment");
        }
        got
    }

    /// Turns rebalance events into `pending` entries.
    async fn handle_events(&mut self, events: Vec<Event>) -> Result<()> {
        for e in events {
            match e {
                Event::Revoke(parts) => {
                    self.set_owned(&parts, false);
                    self.abort("partitions revoked").await;
                    tracing::debug!(topic = %self.topic, ?parts, "partitions revoked");
                    self.pending
                        .push_back(Received::Revoked(parts.iter().map(|&p| p as u32).collect()));
                }
                Event::Assign(parts) => {
                    self.joined = true;
                    if let Some(n) = self.fetch_partition_count().await {
                        self.partition_count.store(n, Ordering::Relaxed);
                    }
                    self.set_owned(&parts, true);
                    for &p in &parts {
                        let i = p as usize;
                        if self.delivered.len() <= i {
                            self.delivered.resize(i + 1, -1);
                        }
                        self.delivered[i] = -1;
                    }
                    // The engine takes an assignment as the whole set this source reads:
                    // an incremental one (KIP-848, cooperative assignors) adds `parts` to
                    // those it keeps, which come without a checkpoint (nothing to restore).
                    let mut all = self.checkpoints(&parts).await?;
                    for (p, _) in self.owned.iter().enumerate().filter(|(_, o)| **o) {
                        if !parts.contains(&(p as i32)) {
                            all.push((p as u32, None));
                        }
                    }
                    all.sort_unstable_by_key(|(p, _)| *p);
                    self.pending.push_back(Received::Assigned(all));
                }
            }
        }
        Ok(())
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
                self.handle_events(events).await?;
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
    fn partition_count(&self) -> Option<u32> {
        let n = self.partition_count.load(Ordering::Relaxed);
        (n > 0 && self.group).then_some(n)
    }

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
        let Some(store) = &self.store else {
            return Ok(());
        };
        let ctx = self.consumer.context();
        let mut owned = Vec::with_capacity(positions.len());
        for (p, cp) in positions {
            if !self.owns(p.partition) || !ctx.is_assigned(p.partition) {
                tracing::debug!(topic = %self.topic, partition = p.partition, "not committing a partition this source no longer owns");
                if self.txn.is_some() {
                    // Its outputs are in the transaction: none of it may be committed
                    // (the revocation that follows drops the partitions' state).
                    self.abort("a partition was revoked before the commit")
                        .await;
                    return Ok(());
                }
                continue;
            }
            owned.push(Committed::at(*p, *cp));
        }
        if owned.is_empty() {
            return Ok(());
        }
        store.save(&owned).await
    }
}
