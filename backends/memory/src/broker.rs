//! The in-memory broker, its producer (a [`Sink`]) and its consumer (a [`Source`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;
use weir_engine::record::Header;
use weir_engine::{Checkpoint, OutRecord, Position, Received, Record, Result, Sink, Source};

use crate::MemoryConfig;

/// A retained record. Its key, payload and headers are one slice of the buffer its
/// produced batch was copied into (one allocation per batch, not three per record), laid
/// out as: key, payload, then per header its name's and value's lengths (u32 LE each)
/// followed by the name and the value.
#[derive(Debug, Clone)]
struct Stored {
    data: Bytes,
    /// The key's length, [`NO_KEY`] when there is none.
    key: u32,
    payload: u32,
    headers: u32,
    timestamp: i64,
}

const NO_KEY: u32 = u32::MAX;

impl Stored {
    /// Copies `r` to the end of `buf`; [`Stored::finish`] makes it a record once `buf` is
    /// frozen.
    fn write(buf: &mut BytesMut, r: &OutRecord) -> (usize, u32, u32) {
        let start = buf.len();
        let key = match &r.key {
            Some(k) => {
                buf.extend_from_slice(k);
                k.len() as u32
            }
            None => NO_KEY,
        };
        buf.extend_from_slice(&r.payload);
        for (name, value) in &r.headers {
            buf.put_u32_le(name.len() as u32);
            buf.put_u32_le(value.len() as u32);
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(value);
        }
        (start, key, r.payload.len() as u32)
    }

    /// The bytes [`Stored::write`] needs for `r`.
    fn size(r: &OutRecord) -> usize {
        r.key.as_ref().map_or(0, Bytes::len)
            + r.payload.len()
            + r.headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }

    fn key(&self) -> Option<Bytes> {
        (self.key != NO_KEY).then(|| self.data.slice(..self.key as usize))
    }

    fn key_len(&self) -> usize {
        if self.key == NO_KEY {
            0
        } else {
            self.key as usize
        }
    }

    fn payload(&self) -> Bytes {
        let k = self.key_len();
        self.data.slice(k..k + self.payload as usize)
    }

    fn headers(&self) -> Vec<Header> {
        let mut out = Vec::with_capacity(self.headers as usize);
        let mut at = self.key_len() + self.payload as usize;
        let d = &self.data;
        let u32_at = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]) as usize;
        for _ in 0..self.headers {
            let (n, v) = (u32_at(at), u32_at(at + 4));
            at += 8;
            let name = String::from_utf8_lossy(&d[at..at + n]).into_owned();
            out.push((name, d.slice(at + n..at + n + v)));
            at += n + v;
        }
        out
    }
}

#[derive(Debug, Default)]
struct PartLog {
    /// Offset of `records[0]`.
    base: u64,
    records: VecDeque<Stored>,
    /// Committed offset ("next to read") and checkpoint of every group registered here.
    groups: HashMap<String, (u64, Option<Checkpoint>)>,
    evicted: u64,
}

impl PartLog {
    /// Drops records every group has committed.
    fn trim(&mut self) -> bool {
        let Some(min) = self.groups.values().map(|(o, _)| *o).min() else {
            return false;
        };
        let n = min.saturating_sub(self.base).min(self.records.len() as u64);
        self.records.drain(..n as usize);
        self.base += n;
        n > 0
    }
}

#[derive(Debug)]
struct Topic {
    name: String,
    parts: Vec<Mutex<PartLog>>,
    data: Notify,
    space: Notify,
    capacity: usize,
    round_robin: AtomicU64,
}

fn lock(m: &Mutex<PartLog>) -> MutexGuard<'_, PartLog> {
    // A panic while holding the lock cannot leave the log half-updated in a way that
    // matters more than losing the broker, so poisoned locks are used as they are.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
        let (positions, checkpoints) = t
            .parts
            .iter()
            .map(|p| {
                let mut log = lock(p);
                let base = log.base;
                match group {
                    Some(g) => *log.groups.entry(g.to_string()).or_insert((base, None)),
                    None => (base, None),
                }
            })
            .unzip();
        MemorySource {
            topic: t,
            group: group.map(str::to_string),
            positions,
            checkpoints,
            assigned: false,
            next_part: 0,
        }
    }

    /// Records currently retained in `topic`, summed over partitions.
    pub fn retained(&self, topic: &str) -> usize {
        self.topic(topic)
            .parts
            .iter()
            .map(|p| lock(p).records.len())
            .sum()
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

/// FNV-1a: stable across runs and versions, so a key always lands in the same partition.
fn partition_of(key: &[u8], n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// Publishes to one topic of a [`MemoryBroker`]. A batch is acknowledged once appended.
#[derive(Debug)]
pub struct MemorySink {
    topic: Arc<Topic>,
}

impl MemorySink {
    /// Appends `recs` (all for partition `part`) in order, waiting while the partition is
    /// full and a consumer group still needs its records.
    async fn append(
        &self,
        part: usize,
        recs: &mut (dyn Iterator<Item = Stored> + Send),
        mut left: usize,
    ) {
        let t = &self.topic;
        while left > 0 {
            let notified = t.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut log = lock(&t.parts[part]);
                let mut room = t.capacity.saturating_sub(log.records.len());
                if room == 0 && log.groups.is_empty() {
                    let n = left.min(log.records.len());
                    log.records.drain(..n);
                    log.base += n as u64;
                    log.evicted += n as u64;
                    room = t.capacity - log.records.len();
                }
                let n = room.min(left);
                if n > 0 {
                    log.records.extend(recs.take(n));
                    left -= n;
                    drop(log);
                    t.data.notify_waiters();
                    continue;
                }
            }
            tracing::debug!(topic = %t.name, partition = part, "partition full; waiting for consumers to commit");
            notified.await;
        }
    }
}

#[async_trait]
impl Sink for MemorySink {
    fn name(&self) -> &str {
        &self.topic.name
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        let n = self.topic.parts.len();
        let now = weir_engine::time::now_millis();
        // Each partition's records of the batch are copied into one buffer of their own, in
        // batch order, back to back: its consumer reads them sequentially, and a partition
        // that is read or trimmed late keeps only its own bytes alive.
        let parts: Vec<u32> = batch
            .iter()
            .map(|r| match &r.key {
                Some(k) => partition_of(k, n) as u32,
                None => (self.topic.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64) as u32,
            })
            .collect();
        for p in 0..n {
            let mine = || {
                batch
                    .iter()
                    .zip(&parts)
                    .filter(move |(_, q)| **q == p as u32)
                    .map(|(r, _)| r)
            };
            let count = mine().count();
            if count == 0 {
                continue;
            }
            let mut buf = BytesMut::with_capacity(mine().map(Stored::size).sum());
            let at: Vec<(usize, u32, u32)> = mine().map(|r| Stored::write(&mut buf, r)).collect();
            let data = buf.freeze();
            let mut recs = mine().zip(at).map(|(r, (start, key, payload))| Stored {
                data: data.slice(start..start + Stored::size(r)),
                key,
                payload,
                headers: r.headers.len() as u32,
                timestamp: r.timestamp.unwrap_or(now),
            });
            self.append(p, &mut recs, count).await;
        }
        Ok(())
    }
}

/// Reads every partition of one topic of a [`MemoryBroker`], fairly interleaved.
#[derive(Debug)]
pub struct MemorySource {
    topic: Arc<Topic>,
    group: Option<String>,
    positions: Vec<u64>,
    checkpoints: Vec<Option<Checkpoint>>,
    assigned: bool,
    next_part: usize,
}

impl MemorySource {
    fn take(&mut self, part: usize, max: usize, out: &mut Vec<Record>) -> usize {
        let log = lock(&self.topic.parts[part]);
        let pos = &mut self.positions[part];
        if *pos < log.base {
            tracing::warn!(topic = %self.topic.name, partition = part, skipped = log.base - *pos,
                "records were dropped before this reader got them (retention)");
            *pos = log.base;
        }
        let from = (*pos - log.base) as usize;
        let n = max.min(log.records.len() - from);
        for (i, s) in log.records.range(from..from + n).enumerate() {
            out.push(Record {
                key: s.key(),
                payload: s.payload(),
                headers: if s.headers == 0 {
                    Vec::new()
                } else {
                    s.headers()
                },
                timestamp: Some(s.timestamp),
                position: Position {
                    partition: part as u32,
                    offset: *pos + i as u64,
                },
            });
        }
        *pos += n as u64;
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
        loop {
            let notified = topic.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut batch = Vec::with_capacity(max.min(8192));
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
                return Ok(Received::Batch(Vec::new()));
            }
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let mut freed = false;
        for (p, cp) in positions {
            if let Some(part) = self.topic.parts.get(p.partition as usize) {
                let mut log = lock(part);
                log.groups.insert(group.clone(), (p.offset, Some(*cp)));
                freed |= log.trim();
            }
        }
        if freed {
            self.topic.space.notify_waiters();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let b = MemoryBroker::new(MemoryConfig {
            partitions: 1,
            capacity: 1000,
        });
        let mut sink = b.sink("t");
        sink.send(
            &(0..10)
                .map(|i| rec("k", &i.to_string()))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
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
