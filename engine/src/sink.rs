//! The `Sink` trait: where results and dead letters go.

use async_trait::async_trait;

use crate::error::Result;
use crate::record::OutRecord;

/// A destination for records: a topic, an exchange, a stream, or a file.
#[async_trait]
pub trait Sink: Send {
    /// The destination's name, for logs.
    fn name(&self) -> &str;

    /// Sends a batch and returns once the destination has acknowledged every record of it.
    ///
    /// On error none of the batch may be assumed delivered; the runtime will not commit
    /// the positions the batch was derived from.
    async fn send(&mut self, batch: &[OutRecord]) -> Result<()>;

    /// Starts sending a batch without waiting for its acknowledgements; a later
    /// [`flush`](Sink::flush) waits for them. The runtime submits every batch and flushes
    /// before each commit, so it can read and process the next batch while earlier ones
    /// are in flight. An implementation bounds what it keeps in flight (waiting inside
    /// `submit` when it is full) and keeps the records it has not yet seen acknowledged,
    /// so that a failed `flush` can be retried.
    ///
    /// On error none of the batch may be assumed submitted. Default: [`send`](Sink::send).
    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.send(batch).await
    }

    /// Returns once every record submitted so far has been acknowledged. After an error,
    /// the records not acknowledged stay pending and the next `flush` sends them again.
    /// Default: nothing is ever pending.
    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// [`submit`](Sink::submit)s a batch to partition `partition` of the destination,
    /// whatever the records' keys: what a repartition stage writes its internal topic
    /// with (see [`crate::repartition`]), so that each group key and each marker lands
    /// where it chose. Default: not supported.
    async fn submit_to(&mut self, partition: u32, batch: &[OutRecord]) -> Result<()> {
        let _ = (partition, batch);
        Err(crate::error::EngineError::Stopped(format!(
            "{} cannot be written to a chosen partition (a repartition stage needs that)",
            self.name()
        )))
    }

    /// How many partitions the destination has, asking the broker if need be; `None`
    /// when it is not partitioned or cannot tell. Default: `None`.
    async fn partition_count(&mut self) -> Result<Option<u32>> {
        Ok(None)
    }

    /// How far acknowledgements have come, without waiting: `(acknowledged, submitted)`,
    /// counts of records since the sink was made (a record whose delivery failed counts as
    /// acknowledged here; `flush` reports the failure). The runtime times a closing step's
    /// emit latency by the moment `acknowledged` reaches what `submitted` was right after
    /// its results were submitted, so the pipeline never stops to wait for them. Default
    /// `(0, 0)`: a sink whose `submit` returns only once its records are acknowledged.
    fn acknowledged(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// The broker transaction an exactly-once pipeline writes in: every sink of the pipeline
/// produces into it and the source adds its positions and checkpoints to it
/// (`Source::commit`); [`commit`](Transaction::commit) makes all of it visible at once.
/// Made by the backend (`Broker::transaction`), which aborts it itself
/// when partitions are revoked (their outputs are recomputed from the committed
/// positions by their next owner).
#[async_trait]
pub trait Transaction: Send {
    /// Commits what the sinks produced and the source committed since the last call (a
    /// new transaction begins with the next output). A retryable error may be retried; any
    /// other means the transaction was aborted: the pipeline must stop, and a restart
    /// replays from the positions committed before.
    async fn commit(&mut self) -> Result<()>;
}
