//! A topic's storage: partitions as queues of chunks, each chunk one append's records
//! copied into one buffer, and the committed offset + checkpoint of every group.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::record::Header;
use weir_engine::{Checkpoint, OutRecord, Position, Record, Result};

/// Where a retained record lies in its chunk's buffer: key, payload, then per header its
/// name's and value's lengths (u32 LE each) followed by the name and the value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) start: u32,
    /// The key's length, [`NO_KEY`] when there is none.
    pub(crate) key: u32,
    pub(crate) payload: u32,
    pub(crate) headers: u32,
    pub(crate) timestamp: i64,
}

pub(crate) const NO_KEY: u32 = u32::MAX;

/// The most bytes of records one chunk's buffer holds (a bigger record gets its own).
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

impl Meta {
    /// Copies `r` to the end of `buf` and says where it is.
    pub(crate) fn write(buf: &mut BytesMut, r: &OutRecord, now: i64) -> Meta {
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
    pub(crate) fn size(r: &OutRecord) -> usize {
        r.key.as_ref().map_or(0, Bytes::len)
            + r.payload.len()
            + r.headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }

    pub(crate) fn key_len(&self) -> usize {
        if self.key == NO_KEY {
            0
        } else {
            self.key as usize
        }
    }

    /// The record, its bytes sliced out of `data` (no copy).
    pub(crate) fn record(&self, data: &Bytes, position: Position) -> Record {
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

    pub(crate) fn header_list(&self, d: &Bytes, mut at: usize) -> Vec<Header> {
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
pub(crate) struct Chunk {
    pub(crate) data: Bytes,
    pub(crate) metas: Vec<Meta>,
    /// Records at the front already dropped.
    pub(crate) skip: usize,
}

/// A partition's retained records as a queue of chunks, one per append: appending never
/// moves what is already stored, and a record costs 24 bytes beside its own bytes.
#[derive(Debug, Default)]
pub(crate) struct PartLog {
    /// Offset of the first retained record.
    pub(crate) base: u64,
    pub(crate) chunks: VecDeque<Chunk>,
    /// Retained records.
    pub(crate) len: usize,
    /// Committed offset ("next to read") and checkpoint of every group registered here.
    pub(crate) groups: HashMap<String, (u64, Option<Checkpoint>)>,
    pub(crate) evicted: u64,
}

impl PartLog {
    pub(crate) fn push(&mut self, chunk: Chunk) {
        self.len += chunk.metas.len() - chunk.skip;
        self.chunks.push_back(chunk);
    }

    /// Drops the `n` oldest records.
    pub(crate) fn drop_front(&mut self, mut n: usize) {
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
    pub(crate) fn read(&self, from: u64, n: usize, mut f: impl FnMut(&Bytes, &Meta, u64)) {
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
    pub(crate) fn trim(&mut self) -> bool {
        let Some(min) = self.groups.values().map(|(o, _)| *o).min() else {
            return false;
        };
        let n = min.saturating_sub(self.base).min(self.len as u64);
        self.drop_front(n as usize);
        n > 0
    }
}

#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) parts: Vec<Mutex<PartLog>>,
    pub(crate) data: Notify,
    pub(crate) space: Notify,
    pub(crate) capacity: usize,
    pub(crate) round_robin: AtomicU64,
}

pub(crate) fn lock(m: &Mutex<PartLog>) -> MutexGuard<'_, PartLog> {
    // A panic while holding the lock cannot leave the log half-updated in a way that
    // matters more than losing the broker, so poisoned locks are used as they are.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// FNV-1a: stable across runs and versions, so a key always lands in the same partition.
pub(crate) fn partition_of(key: &[u8], n: usize) -> usize {
    (weir_engine::record::fnv1a(key) % n as u64) as usize
}

/// One consumer group's commits on one topic, kept in the topic's partitions: the memory
/// broker's [`CheckpointStore`]. Committing frees what every group has read.
#[derive(Debug, Clone)]
pub(crate) struct GroupTable {
    pub(crate) topic: Arc<Topic>,
    pub(crate) group: String,
}

impl GroupTable {
    /// Registers the group on every partition (it holds retention from now on, starting
    /// at the earliest retained record) and says where it stands on each.
    pub(crate) fn register(&self) -> Vec<(u64, Option<Checkpoint>)> {
        self.topic
            .parts
            .iter()
            .map(|p| {
                let mut log = lock(p);
                let base = log.base;
                *log.groups.entry(self.group.clone()).or_insert((base, None))
            })
            .collect()
    }
}

#[async_trait]
impl CheckpointStore for GroupTable {
    async fn load(&self, partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        let all: Vec<u32> = (0..self.topic.parts.len() as u32).collect();
        let mut out = Vec::new();
        for &p in partitions.unwrap_or(&all) {
            let Some(part) = self.topic.parts.get(p as usize) else {
                continue;
            };
            if let Some(&(offset, checkpoint)) = lock(part).groups.get(&self.group) {
                out.push(Committed {
                    partition: p,
                    offset: Some(offset),
                    checkpoint,
                    ..Committed::default()
                });
            }
        }
        Ok(out)
    }

    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let mut freed = false;
        for c in commits {
            let (Some(part), Some(offset)) = (self.topic.parts.get(c.partition as usize), c.offset)
            else {
                continue;
            };
            let mut log = lock(part);
            log.groups
                .insert(self.group.clone(), (offset, c.checkpoint));
            freed |= log.trim();
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

    fn rec(key: &str, v: &str) -> OutRecord {
        OutRecord {
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            payload: Bytes::copy_from_slice(v.as_bytes()),
            ..Default::default()
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
}
