//! A checkpoint side-store for brokers that drop commit metadata.
//!
//! Apache Kafka keeps the metadata string of an offset commit and returns it with the
//! committed offset, which is where [`KafkaSource`](crate::KafkaSource) keeps the engine's
//! [`Checkpoint`]. Some Kafka-compatible brokers (Tansu's memory storage among them)
//! return an empty string instead. With `checkpoint_topic` set, every commit first
//! publishes its checkpoints to that one-partition topic (key `group␟topic␟partition`,
//! value `Checkpoint::encode`), awaiting the acknowledgement, then commits the offsets; on
//! assignment, partitions whose commit carries no metadata take the latest checkpoint
//! found there. Writing first is what keeps this safe: a checkpoint newer than its
//! committed offset only skips records whose results were already acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use weir_engine::{Checkpoint, Position};

use bytes::Bytes;
use weir_engine::{OutRecord, Sink as _};

use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::sink::{KafkaSink, SinkProducer};

const SEP: char = '\u{1f}';

/// Where one group's checkpoints of one source topic are kept.
#[derive(Clone)]
pub(crate) struct CheckpointStore {
    pub(crate) producer: Arc<SinkProducer>,
    pub(crate) config: Arc<KafkaConfig>,
    /// The checkpoint topic.
    pub(crate) topic: String,
    pub(crate) group: String,
}

impl CheckpointStore {
    fn key(&self, source: &str, partition: u32) -> String {
        format!("{}{SEP}{source}{SEP}{partition}", self.group)
    }

    fn err(&self, message: impl std::fmt::Display) -> KafkaError {
        KafkaError::Topic {
            topic: self.topic.clone(),
            message: message.to_string(),
            retryable: true,
        }
    }

    /// Publishes the checkpoints of `positions` and waits for their acknowledgement.
    pub(crate) async fn write(
        &self,
        source: &str,
        positions: &[(Position, Checkpoint)],
    ) -> Result<(), KafkaError> {
        let records: Vec<OutRecord> = positions
            .iter()
            .map(|(p, cp)| OutRecord {
                key: Some(Bytes::from(self.key(source, p.partition))),
                payload: Bytes::from(cp.encode()),
                ..Default::default()
            })
            .collect();
        KafkaSink::new(self.producer.clone(), &self.topic, usize::MAX)
            .send(&records)
            .await
            .map_err(|e| self.err(format!("checkpoint not acknowledged: {e}")))?;
        Ok(())
    }

    /// The latest checkpoint of each of `partitions` of `source`, reading the checkpoint
    /// topic from its beginning to its end.
    pub(crate) async fn read(
        &self,
        source: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let this = self.clone();
        let source = source.to_string();
        let wanted: HashMap<String, i32> = partitions
            .iter()
            .map(|&p| (this.key(&source, p as u32), p))
            .collect();
        tokio::task::spawn_blocking(move || this.scan(&wanted))
            .await
            .map_err(|e| self.err(format!("checkpoint reader failed: {e}")))?
    }

    fn scan(&self, wanted: &HashMap<String, i32>) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let consumer: BaseConsumer = self
            .config
            .consumer_config("weir-checkpoint-reader")
            .create()
            .map_err(|source| KafkaError::Client {
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
                    if let Some(&p) = key.and_then(|k| wanted.get(k)) {
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
