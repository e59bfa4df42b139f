//! The in-memory broker: named topics, made on first use.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;
use weir_engine::broker::Broker;
use weir_engine::config::{Diagnostics, TableReader};
use weir_engine::{Result, Sink, Source};

use crate::log::{lock, GroupTable, PartLog, Topic};
use crate::{MemoryConfig, MemorySink, MemorySource};

/// The embedded broker. Cloning shares the same topics.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    topics: Arc<Mutex<HashMap<String, Arc<Topic>>>>,
    config: MemoryConfig,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl MemoryBroker {
    /// A broker whose topics get `config.partitions` partitions of `config.capacity`.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryBroker {
            topics: Arc::default(),
            config,
        }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Topic {
                    name: name.to_string(),
                    parts: (0..self.config.partitions)
                        .map(|_| Mutex::new(PartLog::default()))
                        .collect(),
                    data: Notify::new(),
                    space: Notify::new(),
                    capacity: self.config.capacity,
                    round_robin: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// A producer to `topic` (created on first use).
    pub fn sink(&self, topic: &str) -> MemorySink {
        MemorySink {
            topic: self.topic(topic),
        }
    }

    /// A consumer of `topic` in `group`, starting at the group's committed offsets (the
    /// earliest retained record for a new group). The group holds retention until it
    /// commits. `None` reads from the earliest retained record without a group.
    pub fn source(&self, topic: &str, group: Option<&str>) -> MemorySource {
        let t = self.topic(topic);
        let table = group.map(|g| GroupTable {
            topic: t.clone(),
            group: g.to_string(),
        });
        let (positions, checkpoints) = match &table {
            Some(table) => table.register().into_iter().unzip(),
            None => t.parts.iter().map(|p| (lock(p).base, None)).unzip(),
        };
        MemorySource {
            topic: t,
            table,
            positions,
            checkpoints,
            assigned: false,
            next_part: 0,
            since_commit: 0,
            spare: Vec::new(),
        }
    }

    /// Records currently retained in `topic`, summed over partitions.
    pub fn retained(&self, topic: &str) -> usize {
        self.topic(topic).parts.iter().map(|p| lock(p).len).sum()
    }

    /// Offsets `group` has committed on `topic`, by partition.
    pub fn committed(&self, topic: &str, group: &str) -> Vec<Option<u64>> {
        self.topic(topic)
            .parts
            .iter()
            .map(|p| lock(p).groups.get(group).map(|(o, _)| *o))
            .collect()
    }

    /// Records `topic` dropped to stay within capacity because no group read them.
    pub fn evicted(&self, topic: &str) -> u64 {
        self.topic(topic)
            .parts
            .iter()
            .map(|p| lock(p).evicted)
            .sum()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    const NAME: &'static str = "memory";
    type Config = MemoryConfig;

    fn read_config(r: &mut TableReader<'_>, d: &mut Diagnostics) -> MemoryConfig {
        MemoryConfig::read(r, d)
    }

    fn new(config: MemoryConfig) -> Self {
        MemoryBroker::new(config)
    }

    /// Its topics end with this process.
    fn in_process(&self) -> bool {
        true
    }

    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>> {
        Ok(Box::new(MemoryBroker::source(self, topic, group)))
    }

    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>> {
        Ok(Box::new(MemoryBroker::sink(self, topic)))
    }

    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(MemoryBroker::source(self, topic, None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;
    use weir_engine::{Checkpoint, OutRecord, Position, Received, Record};

    use crate::source::COMMIT_EVERY;

    const CP: Checkpoint = Checkpoint {
        watermark: 0,
        processed: 0,
    };

    fn rec(key: &str, v: &str) -> OutRecord {
        OutRecord {
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            payload: Bytes::copy_from_slice(v.as_bytes()),
            ..Default::default()
        }
    }

    async fn drain(src: &mut MemorySource) -> Vec<Record> {
        let mut all = Vec::new();
        loop {
            match src.recv(100, Duration::from_millis(20)).await.unwrap() {
                Received::Batch(b) if b.is_empty() => return all,
                Received::Batch(b) => all.extend(b),
                Received::Assigned(_) | Received::Revoked(_) => {}
                Received::End => unreachable!(),
            }
        }
    }

    #[tokio::test]
    async fn a_group_that_read_a_lot_asks_for_a_commit() {
        let b = MemoryBroker::new(MemoryConfig {
            partitions: 2,
            capacity: 2 * COMMIT_EVERY,
        });
        let mut src = b.source("t", Some("g"));
        let mut sink = b.sink("t");
        let batch: Vec<_> = (0..COMMIT_EVERY + 10)
            .map(|i| rec(&i.to_string(), "{}"))
            .collect();
        sink.send(&batch).await.unwrap();
        assert!(!src.wants_commit());
        let got = drain(&mut src).await;
        assert_eq!(got.len(), COMMIT_EVERY + 10);
        assert!(src.wants_commit());
        src.commit(&[]).await.unwrap();
        assert!(!src.wants_commit());
        let mut reader = b.source("t", None);
        drain(&mut reader).await;
        assert!(
            !reader.wants_commit(),
            "a reader without a group commits nothing"
        );
    }

    /// A broker of `partitions` whose topic `t` holds ten records of key `k`.
    async fn ten_records_of_one_key(partitions: u32) -> MemoryBroker {
        let b = MemoryBroker::new(MemoryConfig {
            partitions,
            capacity: 1000,
        });
        let batch: Vec<_> = (0..10).map(|i| rec("k", &i.to_string())).collect();
        b.sink("t").send(&batch).await.unwrap();
        b
    }

    #[tokio::test]
    async fn the_group_table_is_the_checkpoint_store_commits_go_through() {
        use weir_engine::checkpoint_store::{CheckpointStore, Committed};
        let b = ten_records_of_one_key(2).await;
        let mut src = b.source("t", Some("g"));
        let table = src.table.clone().expect("a group has a table");
        let fresh = table.load(None).await.unwrap();
        assert_eq!(fresh.len(), 2, "the group is registered on every partition");
        assert!(fresh
            .iter()
            .all(|c| c.offset == Some(0) && c.checkpoint.is_none()));
        let part = drain(&mut src).await[0].position.partition;
        let at = Position {
            partition: part,
            offset: 4,
        };
        src.commit(&[(at, CP)]).await.unwrap();
        assert_eq!(
            table.load(Some(&[part])).await.unwrap(),
            vec![Committed::at(at, CP)]
        );
        assert_eq!(b.committed("t", "g")[part as usize], Some(4));
        assert_eq!(b.retained("t"), 6, "what every group committed is freed");
        let mut again = b.source("t", Some("g"));
        match again.recv(10, Duration::from_millis(10)).await.unwrap() {
            Received::Assigned(parts) => assert!(parts.contains(&(part, Some(CP)))),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn same_key_same_partition_in_order() {
        let b = MemoryBroker::new(MemoryConfig {
            partitions: 4,
            capacity: 1000,
        });
        let mut src = b.source("t", Some("g"));
        let mut sink = b.sink("t");
        let batch: Vec<_> = (0..50)
            .map(|i| rec(&format!("k{}", i % 5), &i.to_string()))
            .collect();
        sink.send(&batch).await.unwrap();
        let got = drain(&mut src).await;
        assert_eq!(got.len(), 50);
        for k in 0..5 {
            let mine: Vec<_> = got
                .iter()
                .filter(|r| r.key.as_deref() == Some(format!("k{k}").as_bytes()))
                .collect();
            assert!(mine
                .windows(2)
                .all(|w| w[0].position.partition == w[1].position.partition));
            assert!(mine
                .windows(2)
                .all(|w| w[0].position.offset < w[1].position.offset));
        }
    }

    #[tokio::test]
    async fn a_new_consumer_resumes_from_the_committed_offset() {
        let b = ten_records_of_one_key(1).await;
        let mut src = b.source("t", Some("g"));
        assert_eq!(drain(&mut src).await.len(), 10);
        src.commit(&[(
            Position {
                partition: 0,
                offset: 4,
            },
            CP,
        )])
        .await
        .unwrap();
        drop(src);
        let mut again = b.source("t", Some("g"));
        let got = drain(&mut again).await;
        assert_eq!(got.first().unwrap().position.offset, 4);
        assert_eq!(got.len(), 6);
        assert_eq!(b.retained("t"), 6, "committed records are trimmed");
    }

    #[tokio::test]
    async fn producers_wait_for_slow_groups_and_unread_topics_roll_over() {
        let b = MemoryBroker::new(MemoryConfig {
            partitions: 1,
            capacity: 5,
        });
        let mut unread = b.sink("nobody-reads");
        unread
            .send(
                &(0..12)
                    .map(|i| rec("k", &i.to_string()))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        assert_eq!(b.retained("nobody-reads"), 5);
        assert_eq!(b.evicted("nobody-reads"), 7);

        let mut src = b.source("t", Some("g"));
        let mut sink = b.sink("t");
        let send = tokio::spawn(async move {
            sink.send(&(0..8).map(|i| rec("k", &i.to_string())).collect::<Vec<_>>())
                .await
                .unwrap();
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !send.is_finished(),
            "producer must wait: the group has not committed"
        );
        assert_eq!(b.retained("t"), 5);
        let got = drain(&mut src).await;
        src.commit(&[(
            Position {
                partition: 0,
                offset: got.len() as u64,
            },
            CP,
        )])
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(2), send)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(drain(&mut src).await.len(), 3);
    }
}
