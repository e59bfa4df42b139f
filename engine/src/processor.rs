//! The `Processor` trait: user code that sees each batch before validation and windowing.

use async_trait::async_trait;

use crate::error::Result;
use crate::record::Record;

/// A batch transformation that runs before the pipeline decodes and windows records.
///
/// A processor may change, drop, reorder within a partition, or reject records. Rejected
/// records go to the dead-letter output with the given reason; dropped ones are counted as
/// `filtered`. Positions of records are what the runtime commits, so a processor must keep
/// each record's `position` as it received it.
#[async_trait]
pub trait Processor: Send {
    /// A short name for logs and dead-letter reasons.
    fn name(&self) -> &str;

    /// Processes one batch: `batch` holds the records to keep on return; records moved to
    /// `rejected` are dead-lettered with their reason.
    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        rejected: &mut Vec<(Record, String)>,
    ) -> Result<()>;
}
