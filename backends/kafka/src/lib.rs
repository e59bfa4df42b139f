//! Weir's Kafka backend (rdkafka over a bundled librdkafka).
//!
//! - [`KafkaSource`]: a consumer in the pipeline's group that commits offsets — with the
//!   engine's [`Checkpoint`](weir_engine::Checkpoint) as commit metadata — only when the
//!   runtime says every output derived from them was acknowledged, and that turns
//!   rebalances into [`Received::Assigned`](weir_engine::Received) /
//!   [`Received::Revoked`](weir_engine::Received).
//! - [`KafkaSink`]: a producer (batching, compression, `acks=all`, idempotence as
//!   configured) whose `send` returns once every record's delivery report arrived.
//! - [`KafkaConfig`]: the `[brokers.kafka]` section.
//! - Exactly-once ([`KafkaBroker::exactly_once`]): one transactional producer shared by
//!   the sinks, offsets and checkpoints sent to its transaction (see `txn.rs`).
//!
//! Broker outages are retryable errors (the runtime retries with backoff and logs);
//! configuration problems are reported when the pipeline file is loaded.

mod checkpoints;
mod config;
mod error;
mod message;
mod poll;
mod rebalance;
mod sink;
mod source;
mod txn;
mod txn_id;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::Offset;
use weir_engine::broker::Broker;
use weir_engine::config::{Diagnostics, TableReader};
use weir_engine::{Result, Sink, Source};

pub use config::{KafkaConfig, CONSUMER_DEFAULTS, DEFAULT_BOOTSTRAP, PRODUCER_DEFAULTS};
pub use error::KafkaError;
pub use rebalance::RebalanceContext;
pub use sink::KafkaSink;
pub use source::KafkaSource;

/// Where a group-less reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The earliest retained record of each partition.
    Beginning,
    /// Only records produced from now on.
    End,
}

/// A configured Kafka cluster: makes sources and sinks. Cloning shares the producer.
#[derive(Clone)]
pub struct KafkaBroker {
    config: Arc<KafkaConfig>,
    producer: Arc<OnceLock<Arc<sink::SinkProducer>>>,
    ensured: Arc<Mutex<HashSet<String>>>,
    /// Exactly-once mode: the transactional producer every sink, the checkpoint topic
    /// and every group source of this broker share (made on first use).
    txn: Option<txn::TxnCell>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .finish()
    }
}

impl KafkaBroker {
    /// A broker client with these settings. Nothing connects until a source or sink is made.
    pub fn new(config: KafkaConfig) -> Self {
        KafkaBroker {
            config: Arc::new(config),
            producer: Arc::default(),
            ensured: Arc::default(),
            txn: None,
        }
    }

    /// This broker in exactly-once mode: its sinks produce in one transaction of a
    /// transactional producer with an id of its own, its group sources add their offsets
    /// and checkpoints to it, and [`Broker::transaction`] commits it (see `txn.rs`).
    pub fn exactly_once(&self) -> Self {
        KafkaBroker {
            config: self.config.clone(),
            producer: Arc::default(),
            ensured: self.ensured.clone(),
            txn: Some(Arc::default()),
        }
    }

    /// The transactional producer (exactly-once mode), registered with the coordinator.
    async fn txn(&self) -> Result<Option<Arc<txn::Txn>>, KafkaError> {
        let Some(cell) = &self.txn else {
            return Ok(None);
        };
        let t = cell
            .get_or_try_init(|| async {
                // An id that comes back when this instance restarts (see `txn_id.rs`).
                let id = txn_id::claim(&self.config.bootstrap_servers);
                let mut cc = self.config.producer_config();
                cc.set("transactional.id", &id.id);
                let prop = |name: &str| self.config.producer.iter().find(|(k, _)| k == name);
                if prop("transaction.timeout.ms").is_none() {
                    // librdkafka wants message.timeout.ms <= transaction.timeout.ms.
                    let messages = prop("message.timeout.ms").and_then(|(_, v)| v.parse().ok());
                    let ms = messages.unwrap_or(0u64).max(MIN_TXN_TIMEOUT_MS);
                    cc.set("transaction.timeout.ms", ms.to_string());
                }
                let p: sink::SinkProducer =
                    cc.create_with_context(sink::SinkContext)
                        .map_err(|source| KafkaError::Client {
                            what: "producer",
                            source,
                        })?;
                txn::Txn::init(Arc::new(p), id).await.map(Arc::new)
            })
            .await?;
        Ok(Some(t.clone()))
    }

    /// The settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// A consumer of `topic` in `group` (group mode; commits), or — without a group — a
    /// reader of every partition from the beginning that commits nothing.
    pub async fn source(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> Result<KafkaSource, KafkaError> {
        self.ensure_topic(topic).await?;
        match group {
            Some(g) => {
                let store = match &self.config.checkpoint_topic {
                    Some(t) => {
                        self.ensure_topic_with(t, 1).await?;
                        Some(checkpoints::CheckpointTopic {
                            producer: self.producer().await?,
                            txn: self.txn().await?,
                            config: self.config.clone(),
                            topic: t.clone(),
                            group: g.to_string(),
                            source: topic.to_string(),
                        })
                    }
                    None => None,
                };
                if self.txn.is_some() && self.config.incremental_rebalances() {
                    // A revocation aborts the one transaction, which also holds the outputs
                    // of the partitions an incremental rebalance leaves here; those would
                    // have to be rewound too.
                    return Err(KafkaError::Unsupported(
                        "`guarantee = \"exactly_once\"` needs eager rebalances: remove `group.protocol = \"consumer\"` (or the cooperative `partition.assignment.strategy`) from [brokers.kafka.consumer], or use `at_least_once`".into(),
                    ));
                }
                // End-of-partition events (from fetch responses' high watermark) tell the
                // source which partitions still have a backlog (`Source::has_backlog`).
                let consumer = self
                    .config
                    .consumer_config(g)
                    .set("enable.partition.eof", "true")
                    .create_with_context(RebalanceContext::default())
                    .map_err(|source| KafkaError::Client {
                        what: "consumer",
                        source,
                    })?;
                KafkaSource::subscribed(consumer, topic, store, self.txn().await?)
            }
            None => self.reader(topic, StartAt::Beginning).await,
        }
    }

    /// A group-less reader of every partition of `topic`, from `start`; commits nothing.
    pub async fn reader(&self, topic: &str, start: StartAt) -> Result<KafkaSource, KafkaError> {
        self.reader_with(topic, start, None).await
    }

    /// [`reader`](Self::reader) reading committed records only (`Some(true)`: what
    /// open transactions wrote is held back until they commit, aborted records are
    /// skipped), or every record (`Some(false)`), unless `isolation.level` is set in
    /// `[brokers.kafka.consumer]`; `None`: librdkafka's default (committed only).
    async fn reader_with(
        &self,
        topic: &str,
        start: StartAt,
        committed_only: Option<bool>,
    ) -> Result<KafkaSource, KafkaError> {
        self.ensure_topic(topic).await?;
        let partitions = self.partitions(topic).await?;
        let mut cc = self.config.consumer_config("weir-reader");
        let chosen = self
            .config
            .consumer
            .iter()
            .any(|(k, _)| k == "isolation.level");
        if let (Some(committed), false) = (committed_only, chosen) {
            let level = if committed {
                "read_committed"
            } else {
                "read_uncommitted"
            };
            cc.set("isolation.level", level);
        }
        let consumer = cc
            .create_with_context(RebalanceContext::default())
            .map_err(|source| KafkaError::Client {
                what: "consumer",
                source,
            })?;
        let start = match start {
            StartAt::Beginning => Offset::Beginning,
            StartAt::End => Offset::End,
        };
        KafkaSource::fixed(consumer, topic, partitions, start)
    }

    /// A producer to `topic`. Every sink of this broker shares one librdkafka producer.
    pub async fn sink(&self, topic: &str) -> Result<KafkaSink, KafkaError> {
        self.ensure_topic(topic).await?;
        Ok(KafkaSink::new(
            self.producer().await?,
            topic,
            self.config.max_record_bytes(),
        )
        .in_transaction(self.txn().await?))
    }

    /// The producer every sink and the checkpoint store of this broker share (one client,
    /// one idempotent producer id; in exactly-once mode the transactional one).
    async fn producer(&self) -> Result<Arc<sink::SinkProducer>, KafkaError> {
        if let Some(t) = self.txn().await? {
            return Ok(t.producer.clone());
        }
        if let Some(p) = self.producer.get() {
            return Ok(p.clone());
        }
        let p: sink::SinkProducer = self
            .config
            .producer_config()
            .create_with_context(sink::SinkContext)
            .map_err(|source| KafkaError::Client {
                what: "producer",
                source,
            })?;
        Ok(self.producer.get_or_init(|| Arc::new(p)).clone())
    }

    /// The number of partitions of `topic`. An unreachable broker is a retryable error
    /// after a few seconds (callers retry with the workspace's backoff); a topic whose
    /// partitions are not known yet is waited for briefly.
    pub async fn partitions(&self, topic: &str) -> Result<i32, KafkaError> {
        for _ in 0..10 {
            let n = self.metadata(topic).await?;
            if n > 0 {
                return Ok(n);
            }
            tracing::debug!(topic, "kafka: topic has no partitions yet; asking again");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(KafkaError::Topic {
            topic: topic.to_string(),
            message: format!(
                "has no partitions at {} (missing? set create_topics)",
                self.config.bootstrap_servers
            ),
            retryable: true,
        })
    }

    /// One metadata request: the partition count of `topic` (0 when it does not exist),
    /// or a retryable error when no broker answers within [`METADATA_TIMEOUT`].
    async fn metadata(&self, topic: &str) -> Result<i32, KafkaError> {
        let probe: BaseConsumer = self
            .config
            .consumer_config("weir-metadata")
            .create()
            .map_err(|source| KafkaError::Client {
                what: "consumer",
                source,
            })?;
        let t = topic.to_string();
        let got =
            tokio::task::spawn_blocking(move || probe.fetch_metadata(Some(&t), METADATA_TIMEOUT))
                .await
                .map_err(|e| KafkaError::Topic {
                    topic: topic.to_string(),
                    message: e.to_string(),
                    retryable: true,
                })?;
        match got {
            Ok(md) => Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none())
                .map(|t| t.partitions().len() as i32)
                .unwrap_or(0)),
            Err(e) => Err(KafkaError::Topic {
                topic: topic.to_string(),
                message: format!(
                    "cannot reach Kafka at {}: {e}",
                    self.config.bootstrap_servers
                ),
                retryable: true,
            }),
        }
    }

    /// Creates `topic` when `create_topics` is on and it is missing. One attempt: an
    /// unreachable broker is a retryable error (callers retry with backoff).
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), KafkaError> {
        self.ensure_topic_with(topic, self.config.partitions).await
    }

    async fn ensure_topic_with(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        if !self.config.create_topics
            || self
                .ensured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(topic)
        {
            return Ok(());
        }
        // A metadata request first: it fails within seconds when no broker answers (the
        // admin request below would take its full timeout), and an existing topic needs
        // no creation.
        if self.metadata(topic).await? == 0 {
            self.create_topic(topic, partitions).await?;
        }
        self.ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string());
        Ok(())
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .admin_config()
            .create()
            .map_err(|source| KafkaError::Client {
                what: "admin client",
                source,
            })?;
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let outcome = match admin.create_topics([&new], &opts).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) => {
                    tracing::info!(
                        topic,
                        partitions,
                        replication_factor = self.config.replication_factor,
                        "kafka: created topic"
                    );
                    Ok(())
                }
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => Ok(()),
                Some(Err((_, code))) => Err((code.to_string(), !error::is_permanent_code(code))),
            },
            Err(e) => Err((e.to_string(), true)),
        };
        outcome.map_err(|(message, retryable)| KafkaError::Topic {
            topic: topic.to_string(),
            message: format!(
                "cannot create it at {}: {message}",
                self.config.bootstrap_servers
            ),
            retryable,
        })
    }
}

/// The shortest transaction timeout of exactly-once producers unless
/// `[brokers.kafka.producer]` sets `transaction.timeout.ms`: how long the broker keeps the
/// open transaction of a crashed instance (and holds read_committed consumers back at it)
/// before aborting it. It is the larger of this (Kafka Streams' 10 s; librdkafka's default
/// is 60 s) and `message.timeout.ms` (30 s by default), which librdkafka requires. Keep
/// `commit_interval` well below it.
const MIN_TXN_TIMEOUT_MS: u64 = 10_000;

/// How long one metadata request waits for a broker: an unreachable cluster is reported
/// (and retried) after this long.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait]
impl Broker for KafkaBroker {
    const NAME: &'static str = "kafka";
    type Config = KafkaConfig;

    fn read_config(r: &mut TableReader<'_>, d: &mut Diagnostics) -> KafkaConfig {
        KafkaConfig::read(r, d)
    }

    fn new(config: KafkaConfig) -> Self {
        KafkaBroker::new(config)
    }

    fn exactly_once(&self) -> Option<Self> {
        Some(KafkaBroker::exactly_once(self))
    }

    fn transaction(&self) -> Option<Box<dyn weir_engine::Transaction>> {
        let cell = self.txn.as_ref()?;
        Some(Box::new(txn::KafkaTransaction(cell.clone())))
    }

    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>> {
        Ok(Box::new(KafkaBroker::source(self, topic, group).await?))
    }

    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>> {
        Ok(Box::new(KafkaBroker::sink(self, topic).await?))
    }

    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(self.reader(topic, StartAt::Beginning).await?))
    }

    async fn tail_reader(&self, topic: &str, from_beginning: bool) -> Result<Box<dyn Source>> {
        let start = if from_beginning {
            StartAt::Beginning
        } else {
            StartAt::End
        };
        // An exactly-once pipeline's outputs are shown once committed; an at-least-once
        // pipeline's as soon as they are written.
        let committed = self.txn.is_some();
        Ok(Box::new(
            self.reader_with(topic, start, Some(committed)).await?,
        ))
    }
}
