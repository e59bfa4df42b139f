//! The `Source` trait: where records come from.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::record::{Checkpoint, Position, Record};

/// What one call to [`Source::recv`] produced.
#[derive(Debug)]
pub enum Received {
    /// Up to `max` records, in partition order within each partition. May be empty when
    /// nothing arrived within the wait.
    Batch(Vec<Record>),
    /// The source is finite and has no more records (a file that ended).
    End,
    /// The partitions this source now reads (at start and after a rebalance), each with the
    /// checkpoint committed with its position, if any. Each partition holds the watermark
    /// back until it delivers a record or goes idle.
    Assigned(Vec<(u32, Option<Checkpoint>)>),
    /// These partitions are no longer this source's (a rebalance). Their open window state
    /// is dropped uncommitted; the new owner recomputes it from the committed position.
    /// Sources must not commit positions of revoked partitions after returning this.
    Revoked(Vec<u32>),
}

/// A source of records: a consumer on a topic, a queue, a stream, or a file.
///
/// The runtime calls [`recv`](Source::recv) in a loop and, once every output derived from
/// some records has been acknowledged by its sink, [`commit`](Source::commit)s their
/// positions. A source never commits on its own.
#[async_trait]
pub trait Source: Send {
    /// The topic (or queue, stream, file) name, for dead-letter envelopes and logs.
    fn topic(&self) -> &str;

    /// Receives up to `max` records, waiting at most `wait` for the first one.
    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received>;

    /// Marks everything before each position's offset, in its partition, as done, and stores
    /// the checkpoint beside it (to hand back in [`Received::Assigned`] after a restart).
    ///
    /// Positions are "next offset to read": committing `{partition: 0, offset: 10}` means
    /// records 0..10 of partition 0 need not be delivered again after a restart.
    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()>;

    /// Whether the source asks for a commit now rather than at the next commit interval:
    /// a broker that stops delivering until earlier records are acknowledged (AMQP's
    /// prefetch) is running out of credit. The runtime asks after every batch; a commit
    /// still never passes what is safe. Default: never.
    fn wants_commit(&self) -> bool {
        false
    }

    /// Whether the broker holds records of `partition` that this source has not delivered
    /// yet. A partition with such a backlog is never idle, however long it has been since
    /// its last record: idleness must not close windows that data already in the broker
    /// belongs to. Sources that cannot tell answer `false` (their partitions go idle on the
    /// wall clock alone). Default: `false`.
    fn has_backlog(&self, partition: u32) -> bool {
        let _ = partition;
        false
    }

    /// How many partitions the source's topic has, if the source knows (a consumer-group
    /// member does). While some of them are not assigned to this pipeline, a task shared
    /// by every partition (input not keyed by the group key) holds its watermark: another
    /// member reads the others, or a killed one whose session has not ended yet holds
    /// them, and windows closed without their records would be emitted with part of
    /// their count. Default: `None` (not known; nothing is held).
    fn partition_count(&self) -> Option<u32> {
        None
    }

    /// The partitions whose records `partition` continues, read by this source since it
    /// started: a Kinesis shard's parents after a split or a merge, whose keys now go to
    /// it. The operator counts them in one task (one event time), so a (key, window) that
    /// spans the change is counted in one place; asked at every assignment. Default: none.
    fn continues(&self, partition: u32) -> Vec<u32> {
        let _ = partition;
        Vec::new()
    }

    /// Whether the source holds records it will deliver later (retries waiting for their
    /// time): a run that stops when input goes idle waits for them. Default: never.
    fn pending(&self) -> bool {
        false
    }

    /// Hands back a batch the runtime is done with, so its allocation can hold the next
    /// one (a batch of 1,024 records is ~120 KiB, which the allocator would otherwise return
    /// to the kernel and fault in again every batch). Default: dropped.
    fn recycle(&mut self, batch: Vec<Record>) {
        drop(batch);
    }
}
