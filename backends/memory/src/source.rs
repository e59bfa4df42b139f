//! The memory broker's consumer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, Position, Received, Record, Result, Source};

use crate::log::{lock, GroupTable, Topic};

/// Reads every partition of one topic of a [`MemoryBroker`](crate::MemoryBroker), fairly interleaved.
#[derive(Debug)]
pub struct MemorySource {
    pub(crate) topic: Arc<Topic>,
    /// The group's commits (none: a reader that commits nothing).
    pub(crate) table: Option<GroupTable>,
    pub(crate) positions: Vec<u64>,
    pub(crate) checkpoints: Vec<Option<Checkpoint>>,
    pub(crate) assigned: bool,
    pub(crate) next_part: usize,
    /// Records handed out since the last commit.
    pub(crate) since_commit: usize,
    /// A batch the runtime handed back, to fill next.
    pub(crate) spare: Vec<Record>,
}

/// Records a group reads before its source asks for a commit ahead of the commit
/// interval: what the group has committed is freed, and a fast pipeline over a long topic
/// then reuses that memory instead of growing.
pub(crate) const COMMIT_EVERY: usize = 16 * 1024;

impl MemorySource {
    fn take(&mut self, part: usize, max: usize, out: &mut Vec<Record>) -> usize {
        let log = lock(&self.topic.parts[part]);
        let pos = &mut self.positions[part];
        if *pos < log.base {
            tracing::warn!(topic = %self.topic.name, partition = part, skipped = log.base - *pos,
                "records were dropped before this reader got them (retention)");
            *pos = log.base;
        }
        let before = out.len();
        log.read(*pos, max, |data, m, offset| {
            out.push(m.record(
                data,
                Position {
                    partition: part as u32,
                    offset,
                },
            ))
        });
        let n = out.len() - before;
        *pos += n as u64;
        self.since_commit += n;
        n
    }
}

#[async_trait]
impl Source for MemorySource {
    fn topic(&self) -> &str {
        &self.topic.name
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if !self.assigned {
            self.assigned = true;
            return Ok(Received::Assigned(
                self.checkpoints
                    .iter()
                    .enumerate()
                    .map(|(p, cp)| (p as u32, *cp))
                    .collect(),
            ));
        }
        let n = self.topic.parts.len();
        let deadline = tokio::time::Instant::now() + wait;
        let topic = self.topic.clone();
        let mut batch = std::mem::take(&mut self.spare);
        batch.reserve(max.min(8192));
        loop {
            let notified = topic.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A fair share from each partition first, then fill up from any.
            let share = (max / n).max(1);
            for pass in 0..2 {
                for i in 0..n {
                    let part = (self.next_part + i) % n;
                    let room = max - batch.len();
                    if room == 0 {
                        break;
                    }
                    let want = if pass == 0 { share.min(room) } else { room };
                    self.take(part, want, &mut batch);
                }
            }
            self.next_part = (self.next_part + 1) % n;
            if !batch.is_empty() {
                return Ok(Received::Batch(batch));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.spare = batch;
                return Ok(Received::Batch(Vec::new()));
            }
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        self.since_commit = 0;
        match &self.table {
            Some(table) => table.save(&Committed::all(positions)).await,
            None => Ok(()),
        }
    }

    fn wants_commit(&self) -> bool {
        self.table.is_some() && self.since_commit >= COMMIT_EVERY
    }

    fn has_backlog(&self, partition: u32) -> bool {
        let p = partition as usize;
        match (self.topic.parts.get(p), self.positions.get(p)) {
            (Some(part), Some(&pos)) => {
                let log = lock(part);
                log.base + log.len as u64 > pos
            }
            _ => false,
        }
    }

    fn recycle(&mut self, mut batch: Vec<Record>) {
        batch.clear();
        if batch.capacity() > self.spare.capacity() {
            self.spare = batch;
        }
    }
}
