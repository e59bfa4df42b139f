//! The backends of this build, one registry line each, and the one chosen by
//! `pipeline.broker`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_engine::backoff::Backoff;
use weir_engine::broker::{Broker, DynBroker, Registration};
use weir_engine::config::{Diagnostics, Guarantee, PipelineConfig};
use weir_engine::{EngineError, Sink, Source, Transaction};

/// Every backend compiled into this build, each behind its cargo feature. Adding a backend
/// is one line here (and its crate and feature).
const REGISTRY: &[Registration] = &[
    Registration::of::<weir_memory::MemoryBroker>(),
    #[cfg(feature = "kafka")]
    Registration::of::<weir_kafka::KafkaBroker>(),
    #[cfg(feature = "amqp")]
    Registration::of::<weir_amqp::AmqpBroker>(),
    #[cfg(feature = "kinesis")]
    Registration::of::<weir_kinesis::KinesisBroker>(),
];

/// Every backend Weir has, compiled into this build or not: a section of one left out of
/// this build (by its cargo feature) is accepted unread, so one `brokers.toml` serves every
/// build; choosing such a backend is refused.
const KNOWN: &[&str] = &["memory", "kafka", "amqp", "kinesis"];

/// The backends that can repartition (`[source] repartition = true`): Kafka forwards in
/// a transaction of its own, so a crash forwards nothing twice; the memory broker's
/// topics end with the process that forwards.
const REPARTITIONS: &[&str] = &["memory", "kafka"];

/// The backend of a pipeline that names none: the embedded broker, always built.
const DEFAULT: &str = <weir_memory::MemoryBroker as Broker>::NAME;

/// The names of the backends compiled into this build, in registry order.
pub fn available() -> Vec<&'static str> {
    REGISTRY.iter().map(Registration::name).collect()
}

/// A configured backend, ready to make sources and sinks. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Backend {
    broker: Arc<dyn DynBroker>,
    /// The same backend outside any transaction (for an exactly-once pipeline: what
    /// feeds its source topic must be visible at once, whatever its commits do).
    feeder: Arc<dyn DynBroker>,
}

impl Backend {
    /// Reads the chosen backend's `[brokers.NAME]` section, reporting problems to `d`:
    /// an unknown `pipeline.broker` or section name at its `file:line:col`.
    pub fn from_config(c: &PipelineConfig, d: &mut Diagnostics) -> Option<Backend> {
        let names = || available().join(", ");
        for (name, loc, _) in &c.brokers {
            if !KNOWN.contains(&name.as_str()) {
                d.push(
                    loc,
                    &format!("brokers.{name}"),
                    format!("unknown broker section (choose among {})", names()),
                );
            }
        }
        // Sections of backends that are not chosen are still checked, so a typo surfaces
        // before the day someone switches to that broker.
        let wanted = match c.broker.as_str() {
            "" => DEFAULT,
            name => name,
        };
        let mut chosen = None;
        for r in REGISTRY {
            let section = c.brokers.iter().find(|(n, _, _)| n == r.name());
            let broker = r.load(section.map(|(_, _, node)| node), d);
            if r.name() == wanted {
                chosen = Some(Backend {
                    feeder: broker.clone(),
                    broker,
                });
            }
        }
        if let (Some(b), Guarantee::ExactlyOnce) = (chosen.as_mut(), c.guarantee) {
            match b.broker.exactly_once() {
                Some(broker) => b.broker = broker,
                None => d.push(
                    &c.guarantee_loc,
                    "pipeline.guarantee",
                    format!(
                        "the {} backend cannot give `exactly_once` (it has no transactions); use `at_least_once`, whose results carry a deterministic id for deduplication",
                        b.name()
                    ),
                ),
            }
        }
        if let (Some(b), Some(_)) = (chosen.as_ref(), &c.source.repartition) {
            if !REPARTITIONS.contains(&b.name()) {
                d.push(
                    &c.source.repartition_loc,
                    "source.repartition",
                    format!(
                        "the {} backend cannot repartition yet (only {} can: their forwarding is exact); \
                         key the source records by a group-by field, or run a single instance",
                        b.name(),
                        REPARTITIONS.join(" and ")
                    ),
                );
            }
        }
        #[cfg(feature = "kafka")]
        if let (Some(b), Some(_)) = (chosen.as_ref(), &c.source.repartition) {
            if b.get::<weir_kafka::KafkaBroker>()
                .is_some_and(|k| k.config().incremental_rebalances())
            {
                d.push(
                    &c.source.repartition_loc,
                    "source.repartition",
                    "the forwarder writes in a transaction, which needs eager rebalances: remove \
                     `group.protocol = \"consumer\"` (or the cooperative `partition.assignment.strategy`) \
                     from [brokers.kafka.consumer] to repartition",
                );
            }
        }
        // `[sink] type = "postgres"` and the other stores: their keys are checked here too.
        let _ = crate::store::read(c, d);
        if chosen.is_none() {
            let problem = if KNOWN.contains(&wanted) {
                format!(
                    "the `{wanted}` backend is not in this build (built without the cargo feature `{wanted}`); this build has {}",
                    names()
                )
            } else {
                format!("unknown broker `{}` (choose one of {})", c.broker, names())
            };
            d.push(&c.broker_loc, "pipeline.broker", problem);
        }
        chosen
    }

    /// The backend a repartition stage forwards with: in a transaction of its own where the
    /// backend has transactions (its source commits into it), else the plain backend.
    pub fn forwarding(&self) -> Arc<dyn DynBroker> {
        self.feeder
            .exactly_once()
            .unwrap_or_else(|| self.feeder.clone())
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.broker.name()
    }

    /// Whether the backend's topics live and die with this process (the embedded broker).
    pub fn in_process(&self) -> bool {
        self.broker.in_process()
    }

    /// The concrete backend when it is a `B`, for callers that need its own API.
    pub fn get<B: Broker>(&self) -> Option<&B> {
        self.broker.as_any().downcast_ref::<B>()
    }

    /// Reads and checks the configuration at `path` with `overrides`, then builds the chosen
    /// backend: the configuration, or every problem found.
    pub fn load(
        path: &std::path::Path,
        overrides: &weir_engine::config::Overrides,
    ) -> Result<(PipelineConfig, Backend), weir_engine::config::ConfigErrors> {
        let mut loaded = weir_engine::config::load_file(path, overrides)?;
        let backend = Backend::from_config(&loaded.config, &mut loaded.diagnostics);
        let mut c = loaded.finish()?;
        let backend = backend.expect("a backend exists when the configuration has no problems");
        c.broker = backend.name().to_string();
        Ok((c, backend))
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

    /// The transaction an exactly-once pipeline on this backend writes in (`None`:
    /// at-least-once). Each call hands out the same transaction.
    pub fn transaction(&self) -> Option<Box<dyn Transaction>> {
        self.broker.transaction()
    }

    /// A consumer of `topic` in `group`.
    pub async fn source(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> weir_engine::Result<Box<dyn Source>> {
        self.broker.source(topic, group).await
    }

    /// A producer to `topic` (in an exactly-once pipeline's transaction: what the
    /// pipeline itself writes).
    pub async fn sink(&self, topic: &str) -> weir_engine::Result<Box<dyn Sink>> {
        self.broker.sink(topic).await
    }

    /// A producer to `topic` outside any transaction, each record visible once
    /// acknowledged: what feeds a pipeline (`weir produce`, the ingest API, the demo
    /// generator). The same as [`sink`](Self::sink) for an at-least-once pipeline.
    pub async fn feeder(&self, topic: &str) -> weir_engine::Result<Box<dyn Sink>> {
        self.feeder.sink(topic).await
    }

    /// A reader of every record of `topic`, from the beginning, that commits nothing: what
    /// an enrichment table is loaded from (see each backend's `Broker::table_reader`).
    pub async fn table_reader(&self, topic: &str) -> weir_engine::Result<Box<dyn Source>> {
        self.broker.table_reader(topic).await
    }

    /// A reader of `topic` outside any consumer group, from the beginning or only new
    /// records; it commits nothing (for `weir tail`). `None` when the backend has no such
    /// reader (the in-process memory broker lives and dies with its process).
    pub async fn reader(
        &self,
        topic: &str,
        from_beginning: bool,
    ) -> weir_engine::Result<Option<Box<dyn Source>>> {
        match self.broker.tail_reader(topic, from_beginning).await {
            Ok(s) => Ok(Some(s)),
            Err(EngineError::NotSupported { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
