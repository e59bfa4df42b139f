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

/// Where a retained record lies in its chunk's buffer: key, payload, then per header its
/// name's and value's lengths (u32 LE each) followed by the name and the value.
#[derive(Debug, Clone, Copy)]
struct Meta {
    start: u32,
    /// The key's length, [`NO_KEY`] when there is none.
    key: u32,
    payload: u32,
    headers: u32,
    timestamp: i64,
}

const NO_KEY: u32 = u32::MAX;

/// The most bytes of records one chunk's buffer holds (a bigger record gets its own).
const CHUNK_BYTES: usize = 64 * 1024;

impl Meta {
    /// Copies `r` to the end of `buf` and says where it is.
    fn write(buf: &mut BytesMut, r: &OutRecord, now: i64) -> Meta {
        let start = buf.len() as u32;
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
        Meta {
            start,
            key,
            payload: r.payload.len() as u32,
            headers: r.headers.len() as u32,
            timestamp: r.timestamp.unwrap_or(now),
        }
    }

    /// The bytes [`Meta::write`] needs for `r`.
    fn size(r: &OutRecord) -> usize {
        r.key.as_ref().map_or(0, Bytes::len)
            + r.payload.len()
            + r.headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }

    fn key_len(&self) -> usize {
        if self.key == NO_KEY {
            0
        } else {
            self.key as usize
        }
    }

    /// The record, its bytes sliced out of `data` (no copy).
    fn record(&self, data: &Bytes, position: Position) -> Record {
        let start = self.start as usize;
        let payload_at = start + self.key_len();
        Record {
            key: (self.key != NO_KEY).then(|| data.slice(start..payload_at)),
            payload: data.slice(payload_at..payload_at + self.payload as usize),
            headers: if self.headers == 0 {
                Vec::new()
            } else {
                self.header_list(data, payload_at + self.payload as usize)
            },
            timestamp: Some(self.timestamp),
            position,
        }
    }

    fn header_list(&self, d: &Bytes, mut at: usize) -> Vec<Header> {
        let mut out = Vec::with_capacity(self.headers as usize);
        let u32_at = |i: usize| u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]) as usize;
        for _ in 0..self.headers {
            let (n, v) = (u32_at(at), u32_at(at + 4));
            at += 8;
            let name = String::from_utf8_lossy(&d[at..at + n]).into_owned().into();
            out.push((name, d.slice(at + n..at + n + v)));
            at += n + v;
        }
        out
    }
}

/// Records appended together: one buffer holding their bytes, and where each one is.
#[derive(Debug)]
struct Chunk {
    data: Bytes,
    metas: Vec<Meta>,
    /// Records at the front already dropped.
    skip: usize,
}

/// A partition's retained records as a queue of chunks, one per append: appending never
/// moves what is already stored, and a record costs 24 bytes beside its own bytes.
#[derive(Debug, Default)]
struct PartLog {
    /// Offset of the first retained record.
    base: u64,
    chunks: VecDeque<Chunk>,
    /// Retained records.
    len: usize,
    /// Committed offset ("next to read") and checkpoint of every group registered here.
    groups: HashMap<String, (u64, Option<Checkpoint>)>,
    evicted: u64,
}

impl PartLog {
    fn push(&mut self, chunk: Chunk) {
        self.len += chunk.metas.len() - chunk.skip;
        self.chunks.push_back(chunk);
    }

    /// Drops the `n` oldest records.
    fn drop_front(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        self.base += n as u64;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let live = front.metas.len() - front.skip;
            if live <= n {
                n -= live;
                self.chunks.pop_front();
            } else {
                front.skip += n;
                n = 0;
            }
        }
    }

    /// Calls `f` with up to `n` records from offset `from` (at or after `base`) on.
    fn read(&self, from: u64, n: usize, mut f: impl FnMut(&Bytes, &Meta, u64)) {
        let mut skip = (from - self.base) as usize;
        let mut left = n.min(self.len.saturating_sub(skip));
        let mut offset = from;
        for c in &self.chunks {
            if left == 0 {
                break;
            }
            let live = &c.metas[c.skip..];
            if skip >= live.len() {
                skip -= live.len();
                continue;
            }
            for m in live[skip..].iter().take(left) {
                f(&c.data, m, offset);
                offset += 1;
                left -= 1;
            }
            skip = 0;
        }
    }

    /// Drops records every group has committed.
    fn trim(&mut self) -> bool {
        let Some(min) = self.groups.values().map(|(o, _)| *o).min() else {
            return false;
        };
        let n = min.saturating_sub(self.base).min(self.len as u64);
        self.drop_front(n as usize);
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
    /// Appends `metas` (records of partition `part` whose bytes are `data`) in order,
    /// waiting while the partition is full and a consumer group still needs its records.
    async fn append(&self, part: usize, data: Bytes, mut metas: Vec<Meta>) {
        let t = &self.topic;
        while !metas.is_empty() {
            let notified = t.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut log = lock(&t.parts[part]);
                let mut room = t.capacity.saturating_sub(log.len);
                if room == 0 && log.groups.is_empty() {
                    let n = metas.len().min(log.len);
                    log.drop_front(n);
                    log.evicted += n as u64;
                    room = t.capacity - log.len;
                }
                let n = room.min(metas.len());
                if n > 0 {
                    let rest = metas.split_off(n);
                    log.push(Chunk {
                        data: data.clone(),
                        metas,
                        skip: 0,
                    });
                    metas = rest;
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
        let mut sizes = vec![(0usize, 0usize); n];
        let parts: Vec<u32> = batch
            .iter()
            .map(|r| {
                let p = match &r.key {
                    Some(k) => partition_of(k, n),
                    None => {
                        (self.topic.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64) as usize
                    }
                };
                sizes[p].0 += 1;
                sizes[p].1 += Meta::size(r);
                p as u32
            })
            .collect();
        // Buffers of at most CHUNK_BYTES: a long-running broker frees and allocates blocks
        // of one size, which the allocator hands back without fresh pages from the kernel.
        let mut open: Vec<(BytesMut, Vec<Meta>)> =
            (0..n).map(|_| (BytesMut::new(), Vec::new())).collect();
        let mut chunks: Vec<Vec<(Bytes, Vec<Meta>)>> = (0..n).map(|_| Vec::new()).collect();
        for (r, &p) in batch.iter().zip(&parts) {
            let p = p as usize;
            let size = Meta::size(r);
            let (buf, metas) = &mut open[p];
            if buf.capacity() - buf.len() < size {
                let (count, bytes) = sizes[p];
                let fresh = BytesMut::with_capacity(bytes.min(CHUNK_BYTES).max(size));
                let old = std::mem::replace(buf, fresh);
                let more = count.min(buf.capacity() / size.max(1) + 1);
                let full = std::mem::replace(metas, Vec::with_capacity(more));
                if !full.is_empty() {
                    chunks[p].push((old.freeze(), full));
                }
            }
            sizes[p].0 -= 1;
            sizes[p].1 -= size;
            metas.push(Meta::write(buf, r, now));
        }
        for (p, (buf, metas)) in open.into_iter().enumerate() {
            if !metas.is_empty() {
                chunks[p].push((buf.freeze(), metas));
            }
        }
        for (p, list) in chunks.into_iter().enumerate() {
            for (data, metas) in list {
                self.append(p, data, metas).await;
            }
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
    /// Records handed out since the last commit.
    since_commit: usize,
    /// A batch the runtime handed back, to fill next.
    spare: Vec<Record>,
}

/// Records a group reads before its source asks for a commit ahead of the commit
/// interval: what the group has committed is freed, and a fast pipeline over a long topic
/// then reuses that memory instead of growing.
const COMMIT_EVERY: usize = 16 * 1024;

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

    fn wants_commit(&self) -> bool {
        self.group.is_some() && self.since_commit >= COMMIT_EVERY
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

    #[test]
    fn a_log_reads_across_chunks_after_partial_drops() {
        let mut log = PartLog::default();
        for c in 0..3u32 {
            let mut buf = BytesMut::new();
            let metas = (0..4)
                .map(|i| Meta::write(&mut buf, &rec("k", &format!("{c}.{i}")), 0))
                .collect();
            log.push(Chunk {
                data: buf.freeze(),
                metas,
                skip: 0,
            });
        }
        log.drop_front(5);
        assert_eq!((log.base, log.len, log.chunks.len()), (5, 7, 2));
        let mut got = Vec::new();
        log.read(6, 4, |d, m, off| {
            let r = m.record(
                d,
                Position {
                    partition: 0,
                    offset: off,
                },
            );
            got.push((off, String::from_utf8(r.payload.to_vec()).unwrap()));
            assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        });
        let want: Vec<(u64, String)> = [(6, "1.2"), (7, "1.3"), (8, "2.0"), (9, "2.1")]
            .iter()
            .map(|(o, p)| (*o, p.to_string()))
            .collect();
        assert_eq!(got, want);
        let mut n = 0;
        log.read(10, 100, |_, _, _| n += 1);
        assert_eq!(n, 2, "reads stop at the end");
        log.drop_front(100);
        assert_eq!((log.base, log.len, log.chunks.len()), (12, 0, 0));
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
