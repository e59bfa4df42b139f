//! The Kafka source's [`CheckpointStore`]s.
//!
//! [`CommitMetadata`]: Apache Kafka keeps the metadata string of an offset commit and
//! returns it with the committed offset, which is where
//! [`KafkaSource`](crate::KafkaSource) keeps the engine's [`Checkpoint`]: saving is the
//! offset commit itself.
//!
//! [`CheckpointTopic`]: some Kafka-compatible brokers (Tansu's memory storage among them)
//! return an empty metadata string instead. With `checkpoint_topic` set, every commit
//! first publishes its checkpoints to that one-partition topic (key
//! `group␟topic␟partition`, value `Checkpoint::encode`), awaiting the acknowledgement,
//! then commits the offsets; on assignment, partitions whose commit carries no metadata
//! take the latest checkpoint found there. The source combines the two with the engine's
//! [`WithFallback`](weir_engine::checkpoint_store::WithFallback), which writes the
//! fallback first: a checkpoint newer than its committed offset only skips records whose
//! results were already acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, EngineError, OutRecord, Result, Sink as _};

use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::rebalance::Consumer_;
use crate::sink::{KafkaSink, SinkProducer};
use crate::txn::Txn;

const SEP: char = '\u{1f}';

/// Offsets and checkpoints in the consumer group's offset commits (checkpoints as the
/// commits' metadata).
pub(crate) struct CommitMetadata {
    pub(crate) consumer: Arc<Consumer_>,
    /// The source topic.
    pub(crate) topic: String,
    /// Exactly-once: the offsets go into this transaction instead of a plain commit.
    pub(crate) txn: Option<Arc<Txn>>,
    /// The topic's partition count, which the source reads at each assignment before it
    /// loads checkpoints (0: not read yet): written into every commit's metadata.
    pub(crate) partitions: Arc<AtomicU32>,
}

/// What follows the checkpoint in a commit's metadata: the topic's partition count then.
const PARTITIONS: &str = ";partitions=";

/// A commit's metadata: the checkpoint and the partition count it was written under
/// (`None` for commits written before Weir recorded it).
fn parse_metadata(m: &str) -> (Option<Checkpoint>, Option<u32>) {
    match m.split_once(PARTITIONS) {
        Some((cp, n)) => (Checkpoint::decode(cp), n.parse().ok()),
        None => (Checkpoint::decode(m), None),
    }
}

/// The error for checkpoints committed when `topic` had `then` partitions, read now that
/// it has `now`: producers' keys moved to other partitions, so a key's windows open across
/// the change would be counted in pieces, each piece as if it were the whole.
fn partition_count_changed(topic: &str, partition: i32, then: u32, now: u32) -> EngineError {
    EngineError::backend(
        "kafka",
        format!(
            "topic `{topic}` has {now} partitions, but this group's checkpoints were committed when it had {then} (partition {partition}'s): records of one key now arrive on another partition than before, so windows open across the change would be counted in pieces. Weir stops rather than emit partial counts. To go on, start the pipeline under a new `source.group` reading from records produced after the change (the windows open at the change are then not counted), or turn the partition count back"
        ),
        false,
    )
}

impl std::fmt::Debug for CommitMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitMetadata")
            .field("topic", &self.topic)
            .finish()
    }
}

#[async_trait]
impl CheckpointStore for CommitMetadata {
    /// The committed offsets of `partitions` (those assigned now with `None`), with the
    /// checkpoints their metadata carries.
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        let tpl = match partitions {
            Some(ps) => {
                let mut tpl = TopicPartitionList::with_capacity(ps.len());
                for &p in ps {
                    tpl.add_partition(&self.topic, p as i32);
                }
                tpl
            }
            None => self
                .consumer
                .assignment()
                .map_err(|source| KafkaError::Commit {
                    topic: self.topic.clone(),
                    source,
                })?,
        };
        let c = self.consumer.clone();
        let list =
            tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(10)))
                .await
                .map_err(|e| {
                    EngineError::backend(
                        "kafka",
                        format!("checkpoint lookup task failed: {e}"),
                        true,
                    )
                })?
                .map_err(|source| KafkaError::Commit {
                    topic: self.topic.clone(),
                    source,
                })?;
        let now = self.partitions.load(Ordering::Relaxed);
        tracing::debug!(topic = %self.topic, committed = ?list, partitions = now, "kafka: committed offsets at assignment");
        let mut out = Vec::new();
        for e in list.elements_for_topic(&self.topic) {
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            let (checkpoint, then) = parse_metadata(e.metadata());
            if let Some(then) = then.filter(|t| now > 0 && *t != now) {
                return Err(partition_count_changed(
                    &self.topic,
                    e.partition(),
                    then,
                    now,
                ));
            }
            out.push(Committed {
                partition: e.partition() as u32,
                offset: Some(o as u64),
                checkpoint,
                ..Committed::default()
            });
        }
        Ok(out)
    }

    /// Commits the offsets, each with its checkpoint as metadata. A commit the group
    /// refuses because it is rebalancing is dropped (logged): the partitions are about to
    /// be revoked and their new owner replays from the previous commit, which costs
    /// replay, not data; retrying it would block the poll that completes the rebalance.
    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let mut tpl = TopicPartitionList::with_capacity(commits.len());
        for c in commits {
            let Some(offset) = c.offset else { continue };
            let mut e = tpl.add_partition(&self.topic, c.partition as i32);
            e.set_offset(Offset::Offset(offset as i64))
                .map_err(|source| KafkaError::Commit {
                    topic: self.topic.clone(),
                    source,
                })?;
            if let Some(cp) = c.checkpoint {
                let n = self.partitions.load(Ordering::Relaxed);
                if n > 0 {
                    e.set_metadata(format!("{}{PARTITIONS}{n}", cp.encode()));
                } else {
                    e.set_metadata(cp.encode());
                }
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        if let Some(txn) = &self.txn {
            return self.save_in(txn, tpl).await;
        }
        let consumer = self.consumer.clone();
        let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| EngineError::backend("kafka", format!("commit task failed: {e}"), true))?;
        match res {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, ?commits, "kafka: committed");
                Ok(())
            }
            Err(e) if rebalancing(&e) => {
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

impl CommitMetadata {
    /// Exactly-once: adds the offsets (checkpoints as metadata) to the transaction with the
    /// group's metadata, which the coordinator checks against the group's generation (a
    /// zombie is refused). Refused because the group is rebalancing: the transaction is
    /// aborted (its partitions are being revoked; the new owner recomputes their outputs).
    async fn save_in(&self, txn: &Txn, tpl: TopicPartitionList) -> Result<()> {
        let Some(group) = self.consumer.group_metadata() else {
            return Err(EngineError::backend(
                "kafka",
                format!("the consumer of `{}` has no group metadata yet", self.topic),
                true,
            ));
        };
        match txn.send_offsets(tpl, group).await {
            Ok(()) => Ok(()),
            Err(KafkaError::Transaction { ref source, .. }) if rebalancing(source) => {
                txn.abort("the group is rebalancing").await?;
                Ok(())
            }
            Err(e) if e.is_retryable() => Err(e.into()),
            Err(e) => {
                txn.abort("its offsets were refused").await?;
                Err(EngineError::Stopped(format!(
                    "{e}; the transaction was aborted, and a restart replays from the offsets committed before"
                )))
            }
        }
    }
}

/// Whether a commit was refused because this member's generation is over: a rebalance
/// revokes its partitions.
fn rebalancing(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
}

/// One group's checkpoints of one source topic in a checkpoint topic.
#[derive(Clone)]
pub(crate) struct CheckpointTopic {
    pub(crate) producer: Arc<SinkProducer>,
    /// Exactly-once: checkpoints are written in this transaction (`producer` is its).
    pub(crate) txn: Option<Arc<Txn>>,
    pub(crate) config: Arc<KafkaConfig>,
    /// The checkpoint topic.
    pub(crate) topic: String,
    pub(crate) group: String,
    /// The source topic.
    pub(crate) source: String,
}

impl std::fmt::Debug for CheckpointTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointTopic")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish()
    }
}

#[async_trait]
impl CheckpointStore for CheckpointTopic {
    /// The latest checkpoint of each of `partitions` (every partition found with `None`),
    /// reading the checkpoint topic from its beginning to its end.
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        let this = self.clone();
        let wanted: Option<HashMap<String, u32>> =
            partitions.map(|ps| ps.iter().map(|&p| (this.key(p), p)).collect());
        let found = tokio::task::spawn_blocking(move || this.scan(wanted.as_ref()))
            .await
            .map_err(|e| self.err(format!("checkpoint reader failed: {e}")))??;
        Ok(found
            .into_iter()
            .map(|(partition, cp)| Committed {
                partition,
                checkpoint: Some(cp),
                ..Committed::default()
            })
            .collect())
    }

    /// Publishes the checkpoints of `commits` and waits for their acknowledgement.
    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let records: Vec<OutRecord> = commits
            .iter()
            .filter_map(|c| {
                Some(OutRecord {
                    key: Some(Bytes::from(self.key(c.partition))),
                    payload: Bytes::from(c.checkpoint?.encode()),
                    ..Default::default()
                })
            })
            .collect();
        KafkaSink::new(self.producer.clone(), &self.topic, usize::MAX)
            .in_transaction(self.txn.clone())
            .send(&records)
            .await
            .map_err(|e| self.err(format!("checkpoint not acknowledged: {e}")))?;
        Ok(())
    }
}

impl CheckpointTopic {
    fn key(&self, partition: u32) -> String {
        format!("{}{SEP}{}{SEP}{partition}", self.group, self.source)
    }

    /// The partition a key of this group and source names.
    fn partition_of(&self, key: &str) -> Option<u32> {
        let prefix = format!("{}{SEP}{}{SEP}", self.group, self.source);
        key.strip_prefix(&prefix)?.parse().ok()
    }

    fn err(&self, message: impl std::fmt::Display) -> KafkaError {
        KafkaError::Topic {
            topic: self.topic.clone(),
            message: message.to_string(),
            retryable: true,
        }
    }

    fn scan(
        &self,
        wanted: Option<&HashMap<String, u32>>,
    ) -> Result<HashMap<u32, Checkpoint>, KafkaError> {
        let mut cc = self.config.consumer_config("weir-checkpoint-reader");
        if self.txn.is_some() {
            // Only committed checkpoints; the end of what is committed (the last stable
            // offset, below an open transaction) ends a partition's scan.
            cc.set("isolation.level", "read_committed")
                .set("enable.partition.eof", "true");
        }
        let consumer: BaseConsumer = cc.create().map_err(|source| KafkaError::Client {
            what: "consumer",
            source,
        })?;
        let md = consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| self.err(format!("cannot read the checkpoint topic's metadata: {e}")))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0);
        // Where each partition ends now; a key always lands in the same partition, so the
        // last record of a key in its partition is its latest checkpoint.
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                .map_err(|e| {
                    self.err(format!("cannot read the checkpoint topic's offsets: {e}"))
                })?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&self.topic, p, Offset::Beginning)
                    .map_err(|e| self.err(e))?;
            }
        }
        let mut found = HashMap::new();
        if ends.is_empty() {
            return Ok(found);
        }
        tracing::debug!(topic = %self.topic, ?ends, "kafka: reading checkpoints");
        consumer.assign(&tpl).map_err(|e| self.err(e))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(300)) {
                Some(Ok(m)) => {
                    let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
                    let p = match wanted {
                        Some(w) => key.and_then(|k| w.get(k)).copied(),
                        None => key.and_then(|k| self.partition_of(k)),
                    };
                    if let Some(p) = p {
                        tracing::trace!(partition = m.partition(), offset = m.offset(), p, payload = ?m.payload().map(String::from_utf8_lossy), "kafka: checkpoint record");
                        if let Some(cp) = m
                            .payload()
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(Checkpoint::decode)
                        {
                            found.insert(p, cp);
                        }
                    }
                    if ends
                        .get(&m.partition())
                        .is_some_and(|&end| m.offset() + 1 >= end)
                    {
                        ends.remove(&m.partition());
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) => {
                    return Err(self.err(format!("cannot read the checkpoint topic: {e}")))
                }
                // The reported end can trail the last acknowledged record (seen on Tansu),
                // so the scan ends at the first quiet poll past it.
                None if ends.is_empty() => {
                    tracing::debug!(topic = %self.topic, ?found, "kafka: checkpoints read");
                    return Ok(found);
                }
                None => {}
            }
        }
        Err(self.err("timed out reading the checkpoint topic"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_carries_the_partition_count_and_reads_the_older_form() {
        let cp = Checkpoint {
            watermark: 5,
            processed: 12,
        };
        let m = format!("{}{PARTITIONS}4", cp.encode());
        assert_eq!(parse_metadata(&m), (Some(cp), Some(4)));
        assert_eq!(parse_metadata(&cp.encode()), (Some(cp), None));
        assert_eq!(parse_metadata(""), (None, None));
        let e = partition_count_changed("t", 1, 2, 4);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("has 4 partitions"), "{e}");
    }
}
