//! Where a source's shard positions live between runs: a JSON file per (stream, group),
//! the Kinesis backend's [`CheckpointStore`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, EngineError, Result};

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

/// The checkpoints of one (stream, group): a JSON file in a folder, replaced atomically
/// (temp file + rename). A shard's entry is its [`Committed`]: the partition index Weir
/// gave it (its `name` is the shard id), the sequence number reading resumes after (its
/// `cursor`), the next offset and the engine's checkpoint.
#[derive(Debug, Clone)]
pub struct FileCheckpointStore {
    dir: PathBuf,
    stream: String,
    group: String,
}

impl FileCheckpointStore {
    /// The store of `group` on `stream` in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>, stream: &str, group: &str) -> Self {
        FileCheckpointStore {
            dir: dir.into(),
            stream: stream.to_string(),
            group: group.to_string(),
        }
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

impl FileCheckpointStore {
    async fn read(&self) -> Result<Checkpoints> {
        let path = self.path(&self.stream, &self.group);
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
                stream: self.stream.clone(),
                group: self.group.clone(),
                shards: BTreeMap::new(),
            }),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    async fn write(&self, c: &Checkpoints) -> Result<()> {
        let path = self.path(&c.stream, &c.group);
        let json = serde_json::to_vec_pretty(c).map_err(|e| io_err("encode", &path, e))?;
        let dir = self.dir.clone();
        let tmp = path.with_extension("json.tmp");
        let target = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &target)
        })
        .await
        .map_err(|e| io_err("write", &path, e))?
        .map_err(|e| io_err("write", &path, e))
    }
}

#[async_trait]
impl CheckpointStore for FileCheckpointStore {
    /// Every shard in the file (`partitions` filters by Weir's partition index).
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        Ok(self
            .read()
            .await?
            .shards
            .into_iter()
            .filter(|(_, s)| partitions.is_none_or(|ps| ps.contains(&s.partition)))
            .map(|(id, s)| Committed {
                partition: s.partition,
                name: Some(id),
                offset: Some(s.next_offset),
                cursor: s.sequence_number,
                checkpoint: s.checkpoint.as_deref().and_then(Checkpoint::decode),
            })
            .collect())
    }

    /// Replaces the file's entries of the shards in `commits` (named by their shard id;
    /// entries without one are ignored), keeping the others.
    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let mut c = self.read().await?;
        for k in commits {
            let Some(id) = &k.name else { continue };
            c.shards.insert(
                id.clone(),
                ShardCheckpoint {
                    partition: k.partition,
                    sequence_number: k.cursor.clone(),
                    next_offset: k.offset.unwrap_or(0),
                    checkpoint: k.checkpoint.map(|cp| cp.encode()),
                },
            );
        }
        self.write(&c).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_and_starts_empty() {
        let dir = std::env::temp_dir().join(format!("weir-kinesis-cp-{}", std::process::id()));
        let store = FileCheckpointStore::new(&dir, "s", "g/1");
        assert!(store.load(None).await.unwrap().is_empty());
        let shard = Committed {
            partition: 1,
            name: Some("shardId-000000000001".into()),
            offset: Some(12),
            cursor: Some("4959".into()),
            checkpoint: Checkpoint::decode("weir1:5:12"),
        };
        assert!(shard.checkpoint.is_some());
        store.save(std::slice::from_ref(&shard)).await.unwrap();
        assert!(store.path("s", "g/1").ends_with("s-g_1.json"));
        assert_eq!(store.load(None).await.unwrap(), vec![shard.clone()]);
        assert!(store.load(Some(&[0])).await.unwrap().is_empty());
        // The file keeps its format.
        let text = std::fs::read_to_string(store.path("s", "g/1")).unwrap();
        let c: Checkpoints = serde_json::from_str(&text).unwrap();
        assert_eq!(
            c.shards["shardId-000000000001"].sequence_number.as_deref(),
            Some("4959")
        );
        assert_eq!(
            c.shards["shardId-000000000001"].checkpoint.as_deref(),
            Some("weir1:5:12")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
