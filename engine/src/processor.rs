//! The `Processor` trait: user code that sees each batch before validation and windowing.

use async_trait::async_trait;

use crate::error::Result;
use crate::record::Record;

/// A record a processor could not handle, and why.
#[derive(Debug)]
pub struct Rejected {
    /// The record as the processor received it.
    pub record: Record,
    /// Why; it becomes the dead letter's reason.
    pub reason: String,
    /// Whether a later attempt may succeed (e.g. data it needs has not arrived yet). The
    /// stage's error strategy decides what happens; `retry` is meant for these.
    pub recoverable: bool,
}

impl Rejected {
    /// A record that will never pass this processor.
    pub fn new(record: Record, reason: impl Into<String>) -> Self {
        Rejected {
            record,
            reason: reason.into(),
            recoverable: false,
        }
    }

    /// A record that may pass later.
    pub fn recoverable(record: Record, reason: impl Into<String>) -> Self {
        Rejected {
            record,
            reason: reason.into(),
            recoverable: true,
        }
    }
}

/// A batch transformation that runs before the pipeline decodes and windows records.
///
/// A processor may change, drop, reorder within a partition, or reject records. Rejected
/// records are handled by the error strategy of the stage named [`name`](Processor::name)
/// (the dead-letter output with the given reason by default); dropped ones are counted as
/// `filtered`. Positions of records are what the runtime commits, so a processor must keep
/// each record's `position` as it received it.
#[async_trait]
pub trait Processor: Send {
    /// A short name for logs and dead-letter reasons.
    fn name(&self) -> &str;

    /// Processes one batch: `batch` holds the records to keep on return; records moved to
    /// `rejected` go to the stage's error strategy.
    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<()>;
}
