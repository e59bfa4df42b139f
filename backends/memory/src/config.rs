//! `[brokers.memory]` settings.

use weir_engine::config::{Diagnostics, Node, TableReader, Value};

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
    /// Reads a `[brokers.memory]` section (absent = defaults), reporting problems to `d`.
    pub fn from_section(section: Option<&Node>, d: &mut Diagnostics) -> Self {
        let mut c = MemoryConfig::default();
        let Some(Node {
            value: Value::Table(t),
            loc,
        }) = section
        else {
            return c;
        };
        let mut r = TableReader::new("brokers.memory", t, loc.clone());
        c.partitions = r.uint_or(d, "partitions", 4, 1..=1024) as u32;
        c.capacity = r.uint_or(d, "capacity", 100_000, 1..=100_000_000) as usize;
        r.finish(d);
        c
    }
}
