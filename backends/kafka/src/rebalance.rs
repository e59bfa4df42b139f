//! The consumer's context: librdkafka's rebalance callbacks recorded as events for
//! `recv`, what librdkafka assigned right now, and how far the poll thread read each
//! partition (for `Source::has_backlog`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use weir_engine::Record;

use crate::message::log_to_tracing;

/// A rebalance step, recorded by the callback and handled in `recv`.
#[derive(Debug)]
pub(crate) enum Event {
    Revoke(Vec<i32>),
    Assign(Vec<i32>),
}

/// The consumer's context: routes librdkafka's logs to `tracing` and records rebalances.
#[derive(Default)]
pub struct RebalanceContext {
    events: Mutex<Vec<Event>>,
    /// Whether `events` is non-empty (checked after every poll, so without a lock).
    pending: AtomicBool,
    /// Partitions librdkafka has assigned to this member right now.
    assigned: Mutex<Vec<bool>>,
    /// What the poll thread has read of each partition.
    progress: Mutex<Progress>,
}

/// By partition: the next offset after the last record the poll thread took from
/// librdkafka (-1: none since the assignment), and whether librdkafka reported the end
/// of the partition after it.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    polled: Vec<i64>,
    at_end: Vec<bool>,
}

impl Progress {
    pub(crate) fn slot(&mut self, p: usize) -> (&mut i64, &mut bool) {
        if self.polled.len() <= p {
            self.polled.resize(p + 1, -1);
            self.at_end.resize(p + 1, false);
        }
        (&mut self.polled[p], &mut self.at_end[p])
    }

    pub(crate) fn batch(&mut self, batch: &[Record]) {
        for r in batch {
            let (polled, at_end) = self.slot(r.position.partition as usize);
            *polled = (*polled).max(r.position.offset as i64 + 1);
            *at_end = false;
        }
    }
}

impl RebalanceContext {
    pub(crate) fn push(&self, e: Event) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        let (parts, now) = match &e {
            Event::Revoke(p) => (p, false),
            Event::Assign(p) => (p, true),
        };
        for &p in parts {
            let i = p as usize;
            if assigned.len() <= i {
                assigned.resize(i + 1, false);
            }
            assigned[i] = now;
        }
        drop(assigned);
        if now {
            let mut progress = self.progress();
            for &p in parts {
                let (polled, at_end) = progress.slot(p as usize);
                *polled = -1;
                *at_end = false;
            }
        }
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
        self.pending.store(true, Ordering::Release);
    }

    pub(crate) fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn has_events(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub(crate) fn take(&self) -> Vec<Event> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *events)
    }

    /// Whether librdkafka currently has `partition` assigned to this member.
    pub(crate) fn is_assigned(&self, partition: u32) -> bool {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(partition as usize)
            .copied()
            .unwrap_or(false)
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        // The end of a partition is how the source learns it has no backlog, not an error.
        if matches!(error, RdError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
        tracing::warn!(%error, "kafka: {reason}");
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = partitions(tpl);
                if !parts.is_empty() {
                    self.push(Event::Revoke(parts));
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka: rebalance failed"),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Even an empty assignment (more members than partitions) is announced: it
            // ends the wait for the first assignment.
            self.push(Event::Assign(partitions(tpl)));
        }
    }
}

/// A `BaseConsumer`, polled by the source's own thread (see the module documentation).
/// (A `StreamConsumer` measured 3-5x slower here: every batch paid a task wake-up.)
pub(crate) type Consumer_ = BaseConsumer<RebalanceContext>;
