//! The source's poll thread: polls librdkafka and queues batches and rebalance events
//! for `recv`, in the order they happened.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError as RdError;
use tokio::sync::mpsc;
use weir_engine::Record;

use crate::message::to_record;
use crate::rebalance::{Consumer_, Event};

/// What the poll thread hands to `recv`, in the order it happened.
#[derive(Debug)]
pub(crate) enum Item {
    Batch(Vec<Record>),
    Events(Vec<Event>),
    Error(RdError),
}

/// Batches the poll thread may have ready ahead of `recv`.
pub(crate) const QUEUE: usize = 4;

/// Batches the runtime handed back, for the poll thread to fill again.
pub(crate) type Spares = Arc<Mutex<Vec<Vec<Record>>>>;

/// How long one poll of the poll thread blocks, which bounds how long stopping it takes.
pub(crate) const POLL_SLICE: Duration = Duration::from_millis(100);

/// The poll thread: polls `consumer` and queues what it gets, in order, until `stop` is
/// set or `recv`'s side of the queue is gone.
pub(crate) fn poll_loop(
    consumer: Arc<Consumer_>,
    items: mpsc::Sender<Item>,
    max: Arc<AtomicUsize>,
    spares: Spares,
    stop: Arc<AtomicBool>,
) {
    let ctx = consumer.context();
    // Keys and payloads are copied into this buffer (see `to_record`).
    let mut arena = BytesMut::new();
    let send = |item: Item| {
        if let Item::Batch(b) = &item {
            ctx.progress().batch(b);
        }
        items.blocking_send(item).is_ok()
    };
    while !stop.load(Ordering::Relaxed) {
        let limit = max.load(Ordering::Relaxed).max(1);
        let mut batch: Vec<Record> = Vec::new();
        let mut wait = POLL_SLICE;
        loop {
            let got = consumer.poll(wait);
            wait = Duration::ZERO;
            if ctx.has_events() {
                // Rebalance callbacks served inside this poll come before the record it
                // returned, and after the records already batched.
                if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                    return;
                }
                if !send(Item::Events(ctx.take())) {
                    return;
                }
            }
            match got {
                Some(Ok(m)) => {
                    if batch.capacity() == 0 {
                        batch = spares
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pop()
                            .unwrap_or_default();
                        batch.reserve(limit.min(4096));
                    }
                    batch.push(to_record(&m, &mut arena));
                    if batch.len() >= limit {
                        break;
                    }
                }
                Some(Err(RdError::PartitionEOF(p))) => {
                    // Everything fetched so far is behind the records already batched.
                    if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                        return;
                    }
                    *ctx.progress().slot(p.max(0) as usize).1 = true;
                }
                Some(Err(e)) => {
                    if !batch.is_empty() && !send(Item::Batch(std::mem::take(&mut batch))) {
                        return;
                    }
                    if !send(Item::Error(e)) {
                        return;
                    }
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() && !send(Item::Batch(batch)) {
            return;
        }
    }
}
