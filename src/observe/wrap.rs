//! The source and sink wrappers that report to an [`Observer`]: when the broker last
//! answered, positions per partition, commit and acknowledgement latency.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use weir_engine::{Checkpoint, OutRecord, Position, Received, Record, Sink, Source};

use super::Observer;

/// A source that reports to an [`Observer`]: when the broker last answered, positions per
/// partition, commit latency. Everything else is the inner source's.
pub struct ObservedSource {
    inner: Box<dyn Source>,
    observer: Arc<Observer>,
}

impl ObservedSource {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Source>, observer: Arc<Observer>) -> Self {
        ObservedSource { inner, observer }
    }
}

#[async_trait]
impl Source for ObservedSource {
    fn topic(&self) -> &str {
        self.inner.topic()
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> weir_engine::Result<Received> {
        let r = self.inner.recv(max, wait).await;
        let o = &self.observer;
        match &r {
            Ok(Received::Batch(b)) => {
                o.ok(&o.source_failing);
                o.source_ok.store(o.now(), Ordering::Relaxed);
                if !b.is_empty() {
                    let bytes: usize = b.iter().map(|r| r.payload.len() + 1).sum();
                    o.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
                    let mut parts = o.partitions.lock().unwrap_or_else(|p| p.into_inner());
                    // One map lookup per run of records of the same partition.
                    // The run's newest record gives the partition's event time (sampled:
                    // one decode per run, not per record).
                    let mut run: Option<(u32, u64, Option<i64>, &Record)> = None;
                    let mut flush = |run: Option<(u32, u64, Option<i64>, &Record)>| {
                        if let Some((p, next, t, last)) = run {
                            let st = parts.entry(p).or_default();
                            st.received = st.received.max(next);
                            st.broker_time = st.broker_time.max(t);
                            st.event_time = st.event_time.max(o.event_time_of(last));
                        }
                    };
                    for rec in b {
                        let (p, next) = (rec.position.partition, rec.position.offset + 1);
                        match &mut run {
                            Some((rp, n, t, last)) if *rp == p => {
                                *n = (*n).max(next);
                                *t = (*t).max(rec.timestamp);
                                *last = rec;
                            }
                            _ => flush(run.replace((p, next, rec.timestamp, rec))),
                        }
                    }
                    flush(run);
                }
            }
            Ok(Received::Revoked(ps)) => {
                o.ok(&o.source_failing);
                let mut parts = o.partitions.lock().unwrap_or_else(|p| p.into_inner());
                for p in ps {
                    parts.remove(p);
                }
            }
            Ok(_) => o.ok(&o.source_failing),
            Err(e) => o.failed(&o.source_failing, e),
        }
        r
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> weir_engine::Result<()> {
        let t = Instant::now();
        let r = self.inner.commit(positions).await;
        let o = &self.observer;
        match &r {
            Ok(()) => {
                o.commit_latency.observe(t.elapsed());
                o.ok(&o.source_failing);
                let mut parts = o.partitions.lock().unwrap_or_else(|p| p.into_inner());
                for (p, _) in positions {
                    parts.entry(p.partition).or_default().committed = p.offset;
                }
            }
            Err(e) => o.failed(&o.source_failing, e),
        }
        r
    }

    fn wants_commit(&self) -> bool {
        self.inner.wants_commit()
    }

    fn pending(&self) -> bool {
        self.inner.pending()
    }

    fn partition_count(&self) -> Option<u32> {
        self.inner.partition_count()
    }

    fn has_backlog(&self, partition: u32) -> bool {
        self.inner.has_backlog(partition)
    }

    fn continues(&self, partition: u32) -> Vec<u32> {
        self.inner.continues(partition)
    }

    fn recycle(&mut self, batch: Vec<Record>) {
        self.inner.recycle(batch)
    }
}

/// A sink that reports to an [`Observer`]: acknowledgement latency and failures.
pub struct ObservedSink {
    inner: Box<dyn Sink>,
    observer: Arc<Observer>,
}

impl ObservedSink {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Sink>, observer: Arc<Observer>) -> Self {
        ObservedSink { inner, observer }
    }

    fn note<T>(&self, r: &weir_engine::Result<T>, started: Option<Instant>) {
        let o = &self.observer;
        match r {
            Ok(_) => {
                o.ok(&o.sink_failing);
                if let Some(t) = started {
                    o.sink_latency.observe(t.elapsed());
                }
            }
            Err(e) => o.failed(&o.sink_failing, e),
        }
    }
}

#[async_trait]
impl Sink for ObservedSink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&mut self, batch: &[OutRecord]) -> weir_engine::Result<()> {
        let t = Instant::now();
        let r = self.inner.send(batch).await;
        self.note(&r, Some(t));
        r
    }

    async fn submit(&mut self, batch: &[OutRecord]) -> weir_engine::Result<()> {
        let r = self.inner.submit(batch).await;
        self.note(&r, None);
        r
    }

    async fn flush(&mut self) -> weir_engine::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.note(&r, Some(t));
        r
    }

    fn acknowledged(&self) -> (u64, u64) {
        self.inner.acknowledged()
    }
}
