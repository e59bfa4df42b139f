//! Weir's RabbitMQ backend (AMQP 0-9-1, lapin on tokio).
//!
//! Topology: every pipeline topic `T` is a durable queue named `T` (with `[brokers.amqp]
//! partitions = N > 1`: N queues `T.0`..`T.{N-1}`), bound to one exchange (`[brokers.amqp]
//! exchange`, type `topic` or `direct`) with its own name as routing key. Sinks publish to
//! the exchange (to partition [`partition_of`] the record's key); sources consume the
//! queues. Both sides declare the exchange, the queues and the bindings, so records
//! published before any consumer exists are kept, not dropped as unroutable.
//!
//! The source acknowledges deliveries only when the runtime commits their position (after
//! everything derived from them was confirmed by its sink); positions are a counter the
//! source assigns per delivery and partition. Each commit acks and records the position
//! with the engine's checkpoint in a companion queue `weir.checkpoint.<queue>`, in one AMQP
//! transaction, so a restarted pipeline knows which redelivered records were already
//! counted in emitted windows. Instances reading a partitioned topic split its queues
//! between them through a heartbeat group (`members`). The sink publishes persistent messages with publisher
//! confirms and waits for every confirm of a batch.

mod checkpoint;
mod config;
mod error;
mod members;
mod part;
mod sink;
mod source;
mod tail;
mod topology;

use std::sync::Arc;

use async_trait::async_trait;
use weir_engine::broker::Broker;
use weir_engine::config::{Diagnostics, TableReader};
use weir_engine::{Sink, Source};

pub use config::{AmqpConfig, ExchangeType, QueueType, DEFAULT_URL};
pub use error::{is_retryable, redact};
pub use members::members_exchange;
pub use sink::AmqpSink;
pub use source::AmqpSource;
pub use tail::AmqpTail;
pub use topology::{checkpoint_queue, partition_of, partition_queue, retry_queue};

/// Connects to `url` and closes again: `Ok` when RabbitMQ answers.
pub async fn ping(url: &str) -> weir_engine::Result<()> {
    let cfg = AmqpConfig {
        url: url.to_string(),
        ..AmqpConfig::default()
    };
    let conn = topology::connect(&cfg, "weir ping").await?;
    let _ = conn.close(200, "ping".into()).await;
    Ok(())
}

/// A configured RabbitMQ backend: makes sources and sinks on its topology.
#[derive(Debug, Clone)]
pub struct AmqpBroker {
    config: Arc<AmqpConfig>,
}

impl AmqpBroker {
    /// A backend with these settings (nothing is connected yet).
    pub fn new(config: AmqpConfig) -> Self {
        AmqpBroker {
            config: Arc::new(config),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// A consumer of queue `topic`, connected and with its topology declared.
    ///
    /// In AMQP the queue is the consumer group: every consumer of `topic` shares queue
    /// `topic` (one active at a time with `single_active_consumer`). With `partitions > 1`
    /// the consumers of `topic` split its queues `topic.0`.. between them (see the README).
    pub async fn source(&self, topic: &str) -> weir_engine::Result<AmqpSource> {
        AmqpSource::connect(self.config.clone(), topic, source::Claim::Share).await
    }

    /// A publisher to the retry queue of `source_topic` (`<source_topic>.retry`): records
    /// sent to it come back into `source_topic` after `delay` (TTL + dead-letter exchange;
    /// RabbitMQ counts the trips in the `x-death` header, and headers such as an attempt
    /// counter travel with the record). The engine's `[retry]` topic does not use it: it
    /// reads its retry topic like any other and holds records until due, the same way on
    /// every broker.
    pub async fn retry_sink(
        &self,
        source_topic: &str,
        delay: std::time::Duration,
    ) -> weir_engine::Result<AmqpSink> {
        AmqpSink::connect_retry(self.config.clone(), source_topic, delay).await
    }

    /// A reader of `topic` that takes nothing from its queue (for `weir tail`): new records
    /// only, or, on stream queues, everything from the first offset.
    pub async fn reader(&self, topic: &str, from_beginning: bool) -> weir_engine::Result<AmqpTail> {
        AmqpTail::connect(self.config.clone(), topic, from_beginning).await
    }

    /// A publisher to `topic`, connected and with its topology declared.
    pub async fn sink(&self, topic: &str) -> weir_engine::Result<AmqpSink> {
        AmqpSink::connect(self.config.clone(), topic).await
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    const NAME: &'static str = "amqp";
    type Config = AmqpConfig;

    fn read_config(r: &mut TableReader<'_>, d: &mut Diagnostics) -> AmqpConfig {
        AmqpConfig::read(r, d)
    }

    fn new(config: AmqpConfig) -> Self {
        AmqpBroker::new(config)
    }

    /// In AMQP the queue is the group: consumers of a topic share its queue.
    async fn source(
        &self,
        topic: &str,
        _group: Option<&str>,
    ) -> weir_engine::Result<Box<dyn Source>> {
        Ok(Box::new(AmqpBroker::source(self, topic).await?))
    }

    async fn sink(&self, topic: &str) -> weir_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(AmqpBroker::sink(self, topic).await?))
    }

    /// A stream queue is read from its first offset. A classic or quorum queue is read
    /// destructively, so the table's queue is consumed without acknowledging anything: a
    /// restart gets every record again. That bounds the table to the queue's prefetch
    /// (`[brokers.amqp] prefetch`, 10,000 by default), and the table queue must have one
    /// reader.
    async fn table_reader(&self, topic: &str) -> weir_engine::Result<Box<dyn Source>> {
        if self.config.queue_type == QueueType::Stream {
            Ok(Box::new(self.reader(topic, true).await?))
        } else {
            let cfg = self.config.clone();
            let all = source::Claim::All;
            Ok(Box::new(AmqpSource::connect(cfg, topic, all).await?))
        }
    }

    async fn tail_reader(
        &self,
        topic: &str,
        from_beginning: bool,
    ) -> weir_engine::Result<Box<dyn Source>> {
        Ok(Box::new(self.reader(topic, from_beginning).await?))
    }
}
