//! Weir's broker-agnostic core: records, the [`Source`], [`Processor`] and [`Sink`]
//! traits, event-time windows and their state store, the windowed aggregation operator,
//! the pipeline runtime and the `pipeline.toml` model. Backends live in their own crates.
#![warn(missing_docs)]

pub mod aggregate;
pub mod backoff;
pub(crate) mod base64;
pub mod broker;
pub mod checkpoint_store;
pub mod config;
pub mod decode;
pub mod enrich;
pub mod error;
pub(crate) mod error_policy;
pub mod generate;
pub mod jsonl;
pub mod metrics;
pub mod operator;
pub mod origin;
pub(crate) mod outcome;
pub mod output;
pub(crate) mod processor;
pub mod record;
pub mod repartition;
pub(crate) mod replay;
pub mod retry;
pub(crate) mod runtime;
pub(crate) mod sink;
pub(crate) mod source;
pub mod time;
pub mod window;

pub use error::{EngineError, Result};
pub use error_policy::{ErrorAction, ErrorEvent};
pub use operator::Job;
pub use processor::{Processor, Rejected};
pub use record::{Checkpoint, OutRecord, Position, Record};
pub use runtime::{Pipeline, StopReason, Summary};
pub use sink::{Sink, Transaction};
pub use source::{Received, Source};
