//! Where a source's shard positions live between runs: a pluggable store, a JSON file per
//! (stream, group) by default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use weir_engine::{EngineError, Result};

/// One shard's committed state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    /// The partition index Weir gave this shard (stable across restarts).
    pub partition: u32,
    /// Sequence number of the last record fully handled; reading resumes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<String>,
    /// Weir's offset of the next record of this shard (the committed position).
    #[serde(default)]
    pub next_offset: u64,
    /// The engine's checkpoint ([`weir_engine::Checkpoint::encode`]) stored with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Everything a (stream, group) pair has committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    /// Format version (1).
    pub version: u32,
    /// The stream.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// Shard id -> its state.
    pub shards: BTreeMap<String, ShardCheckpoint>,
}

/// A place to keep checkpoints. Implement it to keep them elsewhere (DynamoDB, a database).
#[async_trait]
pub trait CheckpointStore: Send + Sync + std::fmt::Debug {
    /// The checkpoints of `group` on `stream`; empty when there are none yet.
    async fn load(&self, stream: &str, group: &str) -> Result<Checkpoints>;
    /// Replaces the stored checkpoints of `c.group` on `c.stream`, durably.
    async fn save(&self, c: &Checkpoints) -> Result<()>;
}

/// A JSON file per (stream, group) in a folder, replaced atomically (temp file + rename).
#[derive(Debug, Clone)]
pub struct FileCheckpointStore {
    dir: PathBuf,
}

impl FileCheckpointStore {
    /// A store in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileCheckpointStore { dir: dir.into() }
    }

    /// The file of `group` on `stream`.
    pub fn path(&self, stream: &str, group: &str) -> PathBuf {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.dir
            .join(format!("{}-{}.json", clean(stream), clean(group)))
    }
}

fn io_err(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::backend(
        "kinesis",
        format!("checkpoint file {}: {what}: {e}", path.display()),
        false,
    )
}

#[async_trait]
impl CheckpointStore for FileCheckpointStore {
    async fn load(&self, stream: &str, group: &str) -> Result<Checkpoints> {
        let path = self.path(stream, group);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let c: Checkpoints =
                    serde_json::from_slice(&bytes).map_err(|e| io_err("unreadable", &path, e))?;
                if c.version != 1 {
                    return Err(io_err("unsupported version", &path, c.version));
                }
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Checkpoints {
                version: 1,
                stream: stream.into(),
                group: group.into(),
                shards: BTreeMap::new(),
            }),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    async fn save(&self, c: &Checkpoints) -> Result<()> {
        let path = self.path(&c.stream, &c.group);
        let json = serde_json::to_vec_pretty(c).map_err(|e| io_err("encode", &path, e))?;
        let dir = self.dir.clone();
        let tmp = path.with_extension("json.tmp");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| io_err("write", &self.path(&c.stream, &c.group), e))?
        .map_err(|e| io_err("write", &self.path(&c.stream, &c.group), e))
    }
}

/// Checkpoints kept in memory only (sources without a group; tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpointStore {
    inner: Arc<Mutex<BTreeMap<(String, String), Checkpoints>>>,
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn load(&self, stream: &str, group: &str) -> Result<Checkpoints> {
        let m = self.inner.lock().unwrap();
        Ok(m.get(&(stream.to_string(), group.to_string()))
            .cloned()
            .unwrap_or_else(|| Checkpoints {
                version: 1,
                stream: stream.into(),
                group: group.into(),
                shards: BTreeMap::new(),
            }))
    }

    async fn save(&self, c: &Checkpoints) -> Result<()> {
        self.inner
            .lock()
            .unwrap()
            .insert((c.stream.clone(), c.group.clone()), c.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_and_starts_empty() {
        let dir = std::env::temp_dir().join(format!("weir-kinesis-cp-{}", std::process::id()));
        let store = FileCheckpointStore::new(&dir);
        let mut c = store.load("s", "g/1").await.unwrap();
        assert!(c.shards.is_empty());
        c.shards.insert(
            "shardId-000000000001".into(),
            ShardCheckpoint {
                partition: 1,
                sequence_number: Some("4959".into()),
                next_offset: 12,
                checkpoint: Some("weir1:5:12".into()),
            },
        );
        store.save(&c).await.unwrap();
        assert!(store.path("s", "g/1").ends_with("s-g_1.json"));
        assert_eq!(store.load("s", "g/1").await.unwrap(), c);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
