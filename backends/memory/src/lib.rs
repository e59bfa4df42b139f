//! Weir's embedded broker: named topics of N partitions held in memory, key-hash
//! partitioning, consumer groups with committed offsets, and bounded memory with
//! backpressure. The default backend: it needs nothing installed.
//!
//! Retention: a partition keeps at most `capacity` records. Records every registered
//! consumer group has committed are dropped. When a partition is full, a producer waits
//! until the slowest group commits (backpressure); a topic no group reads drops its oldest
//! records instead (retention), so a sink topic nobody consumes never blocks a pipeline.

mod broker;
mod config;
mod log;
mod sink;
mod source;

pub use broker::MemoryBroker;
pub use config::MemoryConfig;
pub use sink::MemorySink;
pub use source::MemorySource;
