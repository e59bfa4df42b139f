//! The closed set of broker backends, chosen by `pipeline.broker`.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_engine::backoff::Backoff;
use weir_engine::config::{Diagnostics, PipelineConfig};
use weir_engine::{EngineError, Sink, Source};
use weir_memory::{MemoryBroker, MemoryConfig};

#[cfg(feature = "amqp")]
use weir_amqp::{AmqpBroker, AmqpConfig};
#[cfg(feature = "kafka")]
pub use weir_kafka::{KafkaBroker, KafkaConfig, StartAt};
#[cfg(feature = "kinesis")]
use weir_kinesis::{KinesisBroker, KinesisConfig};

/// A configured backend, ready to make sources and sinks.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded in-process broker.
    Memory(MemoryBroker),
    /// A Kafka cluster (rdkafka).
    #[cfg(feature = "kafka")]
    Kafka(KafkaBroker),
    /// RabbitMQ over AMQP 0-9-1 (`[brokers.amqp]`).
    #[cfg(feature = "amqp")]
    Amqp(AmqpBroker),
    /// AWS Kinesis Data Streams (or an emulator).
    #[cfg(feature = "kinesis")]
    Kinesis(KinesisBroker),
}

/// The backends compiled into this build.
pub const AVAILABLE: &[&str] = &[
    "memory",
    #[cfg(feature = "kafka")]
    "kafka",
    #[cfg(feature = "amqp")]
    "amqp",
    #[cfg(feature = "kinesis")]
    "kinesis",
];

impl Backend {
    /// Reads the chosen backend's `[brokers.NAME]` section, reporting problems to `d`.
    pub fn from_config(c: &PipelineConfig, d: &mut Diagnostics) -> Option<Backend> {
        let section = |name: &str| {
            c.brokers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, node)| node)
        };
        // Sections of backends that are not chosen are still checked, so a typo surfaces
        // before the day someone switches to that broker.
        let memory = MemoryConfig::from_section(section("memory"), d);
        #[cfg(feature = "kafka")]
        let kafka = KafkaConfig::from_section(section("kafka"), d);
        #[cfg(feature = "amqp")]
        let amqp = AmqpConfig::from_section(section("amqp"), d);
        #[cfg(feature = "kinesis")]
        let kinesis = KinesisConfig::from_section(section("kinesis"), d);
        match c.broker.as_str() {
            "memory" => Some(Backend::Memory(MemoryBroker::new(memory))),
            #[cfg(feature = "kafka")]
            "kafka" => Some(Backend::Kafka(KafkaBroker::new(kafka))),
            #[cfg(feature = "amqp")]
            "amqp" => Some(Backend::Amqp(AmqpBroker::new(amqp))),
            #[cfg(feature = "kinesis")]
            "kinesis" => Some(Backend::Kinesis(KinesisBroker::new(kinesis))),
            other if !weir_engine::config::BROKERS.contains(&other) => None,
            other => {
                d.push(
                    &c.broker_loc,
                    "pipeline.broker",
                    format!(
                        "the `{other}` backend is not part of this build; available: {}",
                        AVAILABLE.join(", ")
                    ),
                );
                None
            }
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "memory",
            #[cfg(feature = "kafka")]
            Backend::Kafka(_) => "kafka",
            #[cfg(feature = "amqp")]
            Backend::Amqp(_) => "amqp",
            #[cfg(feature = "kinesis")]
            Backend::Kinesis(_) => "kinesis",
        }
    }

    /// Reads and checks the configuration at `path` with `overrides`, then builds the chosen
    /// backend: the configuration, or every problem found.
    pub fn load(
        path: &std::path::Path,
        overrides: &weir_engine::config::Overrides,
    ) -> Result<(PipelineConfig, Backend), weir_engine::config::ConfigErrors> {
        let mut loaded = weir_engine::config::load_file(path, overrides)?;
        let backend = Backend::from_config(&loaded.config, &mut loaded.diagnostics);
        let c = loaded.finish()?;
        Ok((
            c,
            backend.expect("a backend exists when the configuration has no problems"),
        ))
    }

    /// Runs `connect` (one attempt at opening something on this backend) until it
    /// succeeds, retrying an unreachable broker the same way on every backend: a log line
    /// from the first failure, backoff, and an error after `give_up_after` (zero: at once).
    /// `None` when `stop` was cancelled first.
    pub async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        give_up_after: Duration,
        stop: &CancellationToken,
        connect: F,
    ) -> weir_engine::Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = weir_engine::Result<T>>,
    {
        let backoff = Backoff::broker().give_up_after(Some(give_up_after));
        weir_engine::backoff::retry(what, backoff, stop, connect).await
    }

    /// A consumer of `topic` in `group`.
    pub async fn source(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> weir_engine::Result<Box<dyn Source>> {
        match self {
            Backend::Memory(b) => Ok(Box::new(b.source(topic, group))),
            #[cfg(feature = "kafka")]
            Backend::Kafka(b) => Ok(Box::new(
                b.source(topic, group).await.map_err(EngineError::from)?,
            )),
            // In AMQP the queue is the group: consumers of a topic share its queue.
            #[cfg(feature = "amqp")]
            Backend::Amqp(b) => Ok(Box::new(b.source(topic).await?)),
            #[cfg(feature = "kinesis")]
            Backend::Kinesis(b) => Ok(Box::new(b.source(topic, group).await?)),
        }
    }

    /// A producer to `topic`.
    pub async fn sink(&self, topic: &str) -> weir_engine::Result<Box<dyn Sink>> {
        match self {
            Backend::Memory(b) => Ok(Box::new(b.sink(topic))),
            #[cfg(feature = "kafka")]
            Backend::Kafka(b) => Ok(Box::new(b.sink(topic).await.map_err(EngineError::from)?)),
            #[cfg(feature = "amqp")]
            Backend::Amqp(b) => Ok(Box::new(b.sink(topic).await?)),
            #[cfg(feature = "kinesis")]
            Backend::Kinesis(b) => Ok(Box::new(b.sink(topic).await?)),
        }
    }

    /// A reader of every record of `topic`, from the beginning, that commits nothing: what
    /// an enrichment table is loaded from.
    ///
    /// On RabbitMQ a stream queue is read from its first offset. A classic or quorum queue
    /// is read destructively, so the table's queue is consumed without acknowledging
    /// anything: a restart gets every record again. That bounds the table to the queue's
    /// prefetch (`[brokers.amqp] prefetch`, 10,000 by default), and the table queue must
    /// have one reader.
    pub async fn table_reader(&self, topic: &str) -> weir_engine::Result<Box<dyn Source>> {
        match self {
            Backend::Memory(b) => Ok(Box::new(b.source(topic, None))),
            #[cfg(feature = "kafka")]
            Backend::Kafka(b) => Ok(Box::new(
                b.reader(topic, StartAt::Beginning)
                    .await
                    .map_err(EngineError::from)?,
            )),
            #[cfg(feature = "amqp")]
            Backend::Amqp(b) if b.config().queue_type == weir_amqp::QueueType::Stream => {
                Ok(Box::new(b.reader(topic, true).await?))
            }
            #[cfg(feature = "amqp")]
            Backend::Amqp(b) => Ok(Box::new(b.source(topic).await?)),
            #[cfg(feature = "kinesis")]
            Backend::Kinesis(b) => Ok(Box::new(b.source(topic, None).await?)),
        }
    }

    /// A reader of `topic` outside any consumer group, from the beginning or only new
    /// records; it commits nothing (for `weir tail`). `None` when the backend has no such
    /// reader (the in-process memory broker lives and dies with its process).
    pub async fn reader(
        &self,
        topic: &str,
        from_beginning: bool,
    ) -> weir_engine::Result<Option<Box<dyn Source>>> {
        match self {
            Backend::Memory(_) => {
                let _ = (topic, from_beginning);
                Ok(None)
            }
            #[cfg(feature = "amqp")]
            Backend::Amqp(b) => Ok(Some(Box::new(b.reader(topic, from_beginning).await?))),
            #[cfg(feature = "kafka")]
            Backend::Kafka(b) => {
                let start = if from_beginning {
                    StartAt::Beginning
                } else {
                    StartAt::End
                };
                Ok(Some(Box::new(
                    b.reader(topic, start).await.map_err(EngineError::from)?,
                )))
            }
            // Shard iterators at the trim horizon (everything retained) or at the latest
            // record (only new ones); checkpoints stay in memory.
            #[cfg(feature = "kinesis")]
            Backend::Kinesis(b) => {
                let start = if from_beginning {
                    weir_kinesis::StartPosition::TrimHorizon
                } else {
                    weir_kinesis::StartPosition::Latest
                };
                Ok(Some(Box::new(b.reader(topic, start).await?)))
            }
        }
    }
}
