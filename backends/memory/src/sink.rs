//! The memory broker's producer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use weir_engine::{OutRecord, Result, Sink};

use crate::log::{lock, partition_of, Chunk, Meta, Topic, CHUNK_BYTES};

/// Publishes to one topic of a [`MemoryBroker`](crate::MemoryBroker). A batch is acknowledged once appended.
#[derive(Debug)]
pub struct MemorySink {
    pub(crate) topic: Arc<Topic>,
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
        self.write(batch, None).await
    }

    async fn submit_to(&mut self, partition: u32, batch: &[OutRecord]) -> Result<()> {
        let n = self.topic.parts.len() as u32;
        if partition >= n {
            return Err(weir_engine::EngineError::Stopped(format!(
                "topic {} has no partition {partition} (it has {n})",
                self.topic.name
            )));
        }
        self.write(batch, Some(partition)).await
    }

    async fn partition_count(&mut self) -> Result<Option<u32>> {
        Ok(Some(self.topic.parts.len() as u32))
    }
}

impl MemorySink {
    /// Appends `batch` to partition `to`, or each record to its key's partition (round
    /// robin without a key).
    async fn write(&self, batch: &[OutRecord], to: Option<u32>) -> Result<()> {
        let n = self.topic.parts.len();
        let now = weir_engine::time::now_millis();
        // Each partition's records of the batch are copied into one buffer of their own, in
        // batch order, back to back: its consumer reads them sequentially, and a partition
        // that is read or trimmed late keeps only its own bytes alive.
        let mut sizes = vec![(0usize, 0usize); n];
        let parts: Vec<u32> = batch
            .iter()
            .map(|r| {
                let p = match (to, &r.key) {
                    (Some(p), _) => p as usize,
                    (None, Some(k)) => partition_of(k, n),
                    (None, None) => {
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
