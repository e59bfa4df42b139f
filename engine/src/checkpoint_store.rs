//! Where a source keeps its commits between runs: the committed position of each
//! partition and the engine's [`Checkpoint`] stored with it.
//!
//! Every backend's source commits through a [`CheckpointStore`] and reads it back on
//! assignment: the memory broker's group table, Kafka's commit metadata (with a side
//! topic for brokers that drop it, combined by [`WithFallback`]), RabbitMQ's companion
//! queue, Kinesis' checkpoint files. Each keeps its own format; this is the one
//! interface a fifth backend implements.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::error::Result;
use crate::record::{Checkpoint, Position};

/// What a store keeps of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The partition, as the engine numbers it.
    pub partition: u32,
    /// The broker's own name of the partition, where it has one (a Kinesis shard id).
    pub name: Option<String>,
    /// Weir's offset of the next record to read; `None` where the store keeps
    /// checkpoints only (the broker keeps the offsets).
    pub offset: Option<u64>,
    /// The broker's own position of the last record handled, where offsets are Weir's
    /// numbering and not the broker's (a Kinesis sequence number).
    pub cursor: Option<String>,
    /// The engine's checkpoint stored with the position.
    pub checkpoint: Option<Checkpoint>,
}

impl Committed {
    /// A commit of `position` (the next offset to read) with `checkpoint`.
    pub fn at(position: Position, checkpoint: Checkpoint) -> Self {
        Committed {
            partition: position.partition,
            offset: Some(position.offset),
            checkpoint: Some(checkpoint),
            ..Committed::default()
        }
    }

    /// The commits of the runtime's `positions`.
    pub fn all(positions: &[(Position, Checkpoint)]) -> Vec<Committed> {
        positions
            .iter()
            .map(|(p, cp)| Committed::at(*p, *cp))
            .collect()
    }
}

/// A place a source commits to and reads its commits back from, for one (topic, group).
#[async_trait]
pub trait CheckpointStore: fmt::Debug + Send + Sync {
    /// What was last saved for `partitions` (every partition this store knows with
    /// `None`); partitions with nothing stored are left out.
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>>;

    /// Stores `commits`, replacing what their partitions had; when it returns `Ok` they
    /// are durable (as far as the store is).
    async fn save(&self, commits: &[Committed]) -> Result<()>;
}

/// Commits kept in this process only: group-less readers (nothing outlives them) and tests.
#[derive(Debug, Clone, Default)]
pub struct InMemoryStore {
    entries: Arc<Mutex<BTreeMap<u32, Committed>>>,
}

#[async_trait]
impl CheckpointStore for InMemoryStore {
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(entries
            .values()
            .filter(|c| partitions.is_none_or(|ps| ps.contains(&c.partition)))
            .cloned()
            .collect())
    }

    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for c in commits {
            entries.insert(c.partition, c.clone());
        }
        Ok(())
    }
}

/// A store whose checkpoints may be dropped (`primary`, e.g. Kafka commit metadata on a
/// broker that returns it empty), backed by `fallback`, which keeps the checkpoints too.
///
/// [`save`](CheckpointStore::save) writes `fallback` first and then `primary`: a
/// checkpoint newer than its committed offset only skips records whose results were
/// already acknowledged, an older one would count them again. [`load`](CheckpointStore::load)
/// reads `primary` and takes the checkpoint from `fallback` where a partition has a
/// committed offset but no checkpoint (without a commit there is nothing to replay).
#[derive(Debug)]
pub struct WithFallback<P, F> {
    /// The store that keeps the offsets.
    pub primary: P,
    /// The store that keeps the checkpoints too, if there is one.
    pub fallback: Option<F>,
}

#[async_trait]
impl<P: CheckpointStore, F: CheckpointStore> CheckpointStore for WithFallback<P, F> {
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        let mut found = self.primary.load(partitions).await?;
        let missing: Vec<u32> = found
            .iter()
            .filter(|c| c.offset.is_some() && c.checkpoint.is_none())
            .map(|c| c.partition)
            .collect();
        if let (Some(fallback), false) = (&self.fallback, missing.is_empty()) {
            let backup = fallback.load(Some(&missing)).await?;
            for c in &mut found {
                if c.checkpoint.is_none() {
                    c.checkpoint = backup
                        .iter()
                        .find(|b| b.partition == c.partition)
                        .and_then(|b| b.checkpoint);
                }
            }
        }
        Ok(found)
    }

    async fn save(&self, commits: &[Committed]) -> Result<()> {
        if let Some(fallback) = &self.fallback {
            fallback.save(commits).await?;
        }
        self.primary.save(commits).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary that keeps offsets and drops checkpoints (what Tansu does to Kafka
    /// commit metadata).
    #[derive(Debug, Default)]
    struct DropsCheckpoints(InMemoryStore);

    #[async_trait]
    impl CheckpointStore for DropsCheckpoints {
        async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
            self.0.load(partitions).await
        }
        async fn save(&self, commits: &[Committed]) -> Result<()> {
            let offsets: Vec<Committed> = commits
                .iter()
                .map(|c| Committed {
                    checkpoint: None,
                    ..c.clone()
                })
                .collect();
            self.0.save(&offsets).await
        }
    }

    fn pos(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }

    #[tokio::test]
    async fn the_fallback_fills_in_checkpoints_the_primary_dropped() {
        let cp = Checkpoint {
            watermark: 7,
            processed: 12,
        };
        let store = WithFallback {
            primary: DropsCheckpoints::default(),
            fallback: Some(InMemoryStore::default()),
        };
        assert!(store.load(None).await.unwrap().is_empty());
        store
            .save(&Committed::all(&[(pos(0, 10), cp), (pos(1, 3), cp)]))
            .await
            .unwrap();
        let got = store.load(Some(&[1])).await.unwrap();
        assert_eq!(got, vec![Committed::at(pos(1, 3), cp)]);

        // Without a fallback the dropped checkpoint stays dropped.
        let bare: WithFallback<_, InMemoryStore> = WithFallback {
            primary: DropsCheckpoints::default(),
            fallback: None,
        };
        bare.save(&Committed::all(&[(pos(0, 10), cp)]))
            .await
            .unwrap();
        let got = bare.load(None).await.unwrap();
        assert_eq!((got[0].offset, got[0].checkpoint), (Some(10), None));
    }
}
