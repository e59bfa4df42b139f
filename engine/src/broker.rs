//! The boundary between the engine and a broker backend.
//!
//! A backend crate implements [`Broker`]: its name, how it reads and checks its own
//! `[brokers.NAME]` section, and what it opens (sources, sinks, readers). Whatever a
//! backend cannot do answers [`EngineError::NotSupported`] by default. The binary keeps
//! one list of [`Registration`]s, one line per backend behind its cargo feature, and
//! works with the erased form, [`DynBroker`]; the engine itself names no backend.
//!
//! Adding a backend: a crate with a `Broker` implementation (and, for its commits, a
//! [`CheckpointStore`](crate::checkpoint_store::CheckpointStore)), one line in the
//! registry of `src/backend.rs`, one cargo feature.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Diagnostics, Node, TableReader, Value};
use crate::error::{EngineError, Result};
use crate::{Sink, Source, Transaction};

/// A broker backend, typed by its settings.
#[async_trait]
pub trait Broker: fmt::Debug + Send + Sync + Sized + 'static {
    /// `pipeline.broker` and the `[brokers.NAME]` section that choose this backend.
    const NAME: &'static str;

    /// The backend's settings, as read from its section (absent: `Default`).
    type Config: Default;

    /// Reads the keys of `[brokers.NAME]` from `r`, reporting problems to `d` at their
    /// `file:line:col`. Keys not asked for are reported as unknown afterwards.
    fn read_config(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self::Config;

    /// The backend with `config`; nothing connects until something is opened.
    fn new(config: Self::Config) -> Self;

    /// Whether its topics live and die with this process (the embedded broker): nothing
    /// outside the process can feed or read them.
    fn in_process(&self) -> bool {
        false
    }

    /// This backend in exactly-once mode (`[pipeline] guarantee = "exactly_once"`): its
    /// sinks produce in one transaction, which its group sources commit their positions
    /// and checkpoints into, and which [`transaction`](Broker::transaction) commits.
    /// `None` (the default): the backend cannot, and the configuration is refused.
    fn exactly_once(&self) -> Option<Self> {
        None
    }

    /// The transaction of a backend made by [`exactly_once`](Broker::exactly_once);
    /// `None` otherwise.
    fn transaction(&self) -> Option<Box<dyn Transaction>> {
        None
    }

    /// A consumer of `topic` in `group` (committing), or, without a group, a reader of
    /// every record from the beginning that commits nothing.
    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>>;

    /// A producer to `topic`.
    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>>;

    /// A reader of every record of `topic`, from the beginning, that commits nothing:
    /// what an enrichment table is loaded from.
    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>> {
        let _ = topic;
        Err(EngineError::not_supported(Self::NAME, "a table reader"))
    }

    /// A reader of `topic` outside any consumer group, from the beginning or only new
    /// records, that commits nothing (`weir tail`).
    async fn tail_reader(&self, topic: &str, from_beginning: bool) -> Result<Box<dyn Source>> {
        let _ = (topic, from_beginning);
        Err(EngineError::not_supported(Self::NAME, "a tail reader"))
    }
}

/// Reads `[brokers.NAME]` for `B`: defaults when the section is absent, else `B`'s keys,
/// with unknown keys reported.
pub fn read_section<B: Broker>(section: Option<&Node>, d: &mut Diagnostics) -> B::Config {
    let Some(Node {
        value: Value::Table(t),
        loc,
    }) = section
    else {
        return B::Config::default();
    };
    let mut r = TableReader::new(&format!("brokers.{}", B::NAME), t, loc.clone());
    let c = B::read_config(&mut r, d);
    r.finish(d);
    c
}

/// A [`Broker`] with its type erased, as the registry hands it out.
#[async_trait]
pub trait DynBroker: fmt::Debug + Send + Sync {
    /// See [`Broker::NAME`].
    fn name(&self) -> &'static str;
    /// See [`Broker::in_process`].
    fn in_process(&self) -> bool;
    /// The concrete backend, for callers that need its own API.
    fn as_any(&self) -> &dyn Any;
    /// See [`Broker::exactly_once`].
    fn exactly_once(&self) -> Option<Arc<dyn DynBroker>>;
    /// See [`Broker::transaction`].
    fn transaction(&self) -> Option<Box<dyn Transaction>>;
    /// See [`Broker::source`].
    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>>;
    /// See [`Broker::sink`].
    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>>;
    /// See [`Broker::table_reader`].
    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>>;
    /// See [`Broker::tail_reader`].
    async fn tail_reader(&self, topic: &str, from_beginning: bool) -> Result<Box<dyn Source>>;
}

#[async_trait]
impl<B: Broker> DynBroker for B {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn in_process(&self) -> bool {
        Broker::in_process(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn exactly_once(&self) -> Option<Arc<dyn DynBroker>> {
        Broker::exactly_once(self).map(|b| Arc::new(b) as Arc<dyn DynBroker>)
    }
    fn transaction(&self) -> Option<Box<dyn Transaction>> {
        Broker::transaction(self)
    }
    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>> {
        Broker::source(self, topic, group).await
    }
    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>> {
        Broker::sink(self, topic).await
    }
    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>> {
        Broker::table_reader(self, topic).await
    }
    async fn tail_reader(&self, topic: &str, from_beginning: bool) -> Result<Box<dyn Source>> {
        Broker::tail_reader(self, topic, from_beginning).await
    }
}

/// One entry of a registry: a backend's name and how to build it from its section.
#[derive(Clone, Copy)]
pub struct Registration {
    name: &'static str,
    load: fn(Option<&Node>, &mut Diagnostics) -> Arc<dyn DynBroker>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Registration").field(&self.name).finish()
    }
}

fn load<B: Broker>(section: Option<&Node>, d: &mut Diagnostics) -> Arc<dyn DynBroker> {
    Arc::new(B::new(read_section::<B>(section, d)))
}

impl Registration {
    /// The entry of backend `B`.
    pub const fn of<B: Broker>() -> Self {
        Registration {
            name: B::NAME,
            load: load::<B>,
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Reads and checks `section` (absent: defaults), reporting to `d`, and builds the
    /// backend (nothing connects yet).
    pub fn load(&self, section: Option<&Node>, d: &mut Diagnostics) -> Arc<dyn DynBroker> {
        (self.load)(section, d)
    }
}
