//! `[brokers.memory]` settings.

use weir_engine::config::{Diagnostics, TableReader};

/// Settings of the embedded broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Partitions of each topic created on first use.
    pub partitions: u32,
    /// Records kept per partition before producers wait (or oldest records go).
    pub capacity: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            partitions: 4,
            capacity: 100_000,
        }
    }
}

impl MemoryConfig {
    /// Reads the keys of a `[brokers.memory]` section, reporting problems to `d`.
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self {
        let def = MemoryConfig::default();
        MemoryConfig {
            partitions: r.uint_or(d, "partitions", def.partitions.into(), 1..=1024) as u32,
            capacity: r.uint_or(d, "capacity", def.capacity as u64, 1..=100_000_000) as usize,
        }
    }
}
