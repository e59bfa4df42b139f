//! What the throughput benches share: the run's size from the environment, the seed
//! events, a check that the broker answers, and a source that ends the run once the topic
//! is drained.

#![allow(dead_code)] // each bench uses its own part of this file

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use weir_engine::{Checkpoint, Position, Received, Record, Source};

/// `WEIR_BENCH_EVENTS` (or `default`).
pub fn events(default: usize) -> usize {
    env_number("WEIR_BENCH_EVENTS", default)
}

/// The whole number in the environment variable `name`, or `default` when it is unset.
pub fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s}: expected a whole number")),
        Err(_) => default,
    }
}

/// `n` seed events over `users` users from generator `seed`, `rate` per second of event
/// time (in order but for the generator's usual disorder).
pub fn seed_events(seed: u64, n: usize, users: u64, rate: i64) -> Vec<Bytes> {
    let mut g = weir_engine::generate::EventGenerator::new(seed, users);
    let mut t = weir_engine::generate::Timeline::new(
        seed,
        weir_engine::generate::DEFAULT_START_MS,
        1000 / rate.max(1),
        500,
    );
    (0..n)
        .map(|_| Bytes::from(g.event(t.next_time())))
        .collect()
}

/// Panics with instructions unless something accepts TCP connections at the first address
/// of `addrs` (`host:port[,host:port…]`).
pub fn require_reachable(what: &str, addrs: &str, start: &str) {
    let first = addrs.split(',').next().unwrap_or_default().trim();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(first)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|sa| {
            std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3)).is_ok()
        });
    assert!(reachable, "{what} at {addrs} is not reachable: run {start}");
}

/// Ends the run once `left` more records were delivered, so the timing holds no wait for
/// input that will never come; notes when the first record arrived. Every other call goes
/// to the wrapped source unchanged.
pub struct Drained {
    inner: Box<dyn Source>,
    left: usize,
    first: Arc<Mutex<Option<Instant>>>,
}

impl Drained {
    /// Wraps `inner`, ending after `total` records.
    pub fn new(inner: Box<dyn Source>, total: usize) -> Drained {
        Drained {
            inner,
            left: total,
            first: Arc::default(),
        }
    }

    /// When the first record arrived (shared, readable after the source moved into a
    /// pipeline).
    pub fn first(&self) -> Arc<Mutex<Option<Instant>>> {
        self.first.clone()
    }
}

#[async_trait]
impl Source for Drained {
    fn topic(&self) -> &str {
        self.inner.topic()
    }
    async fn recv(&mut self, max: usize, wait: Duration) -> weir_engine::Result<Received> {
        if self.left == 0 {
            return Ok(Received::End);
        }
        let r = self.inner.recv(max, wait).await?;
        if let Received::Batch(b) = &r {
            if !b.is_empty() {
                self.first.lock().unwrap().get_or_insert_with(Instant::now);
                self.left = self.left.saturating_sub(b.len());
            }
        }
        Ok(r)
    }
    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> weir_engine::Result<()> {
        self.inner.commit(positions).await
    }
    fn wants_commit(&self) -> bool {
        self.inner.wants_commit()
    }
    fn has_backlog(&self, partition: u32) -> bool {
        self.inner.has_backlog(partition)
    }
    fn pending(&self) -> bool {
        self.inner.pending()
    }
    fn recycle(&mut self, batch: Vec<Record>) {
        self.inner.recycle(batch)
    }
}
