//! A Kafka producer as a [`Sink`]: records are handed to librdkafka (which batches,
//! compresses and retries per `[brokers.kafka.producer]`), and their delivery reports are
//! counted per sink. The runtime calls `submit` per batch and `flush` before a commit, so
//! producing overlaps with consuming and processing the next batches; `send` is `submit`
//! then `flush`.
//!
//! Delivery reports arrive on the producer's polling thread ([`SinkContext::delivery`]):
//! each decrements its sink's outstanding count; a failed record is copied back out of
//! librdkafka's message, so nothing has to be kept per record while it is in flight, and
//! the next `flush` sends it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use weir_engine::{OutRecord, Result, Sink};

use crate::error::KafkaError;
use crate::message::HEADER_NULL_HEADERS;
use crate::txn::Txn;

/// The producer every sink of a [`crate::KafkaBroker`] shares.
pub(crate) type SinkProducer = ThreadedProducer<SinkContext>;

/// Routes librdkafka's logs to `tracing` and delivery reports to their sink's count.
#[derive(Default)]
pub struct SinkContext;

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::message::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        tracing::warn!(%error, "kafka producer: {reason}");
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<Outstanding>;

    fn delivery(&self, result: &DeliveryResult<'_>, sink: Arc<Outstanding>) {
        if let Err((e, m)) = result {
            let back = OutRecord {
                key: m.key().map(Bytes::copy_from_slice),
                payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                headers: crate::message::headers_of(m),
                timestamp: m.timestamp().to_millis(),
            };
            sink.failed.lock().unwrap_or_else(|e| e.into_inner()).push((
                e.clone(),
                m.partition(),
                back,
            ));
        }
        // One read-modify-write per report; a `flush` waiting for the last one is woken.
        let reported = sink.reported.fetch_add(1, Ordering::SeqCst) + 1;
        if reported >= sink.awaited.load(Ordering::SeqCst) {
            sink.done.notify_waiters();
        }
    }
}

/// One sink's delivery reports. What it submitted is counted by the sink itself (on the
/// pipeline's thread), so a record costs the reporting thread one atomic add.
pub struct Outstanding {
    /// Delivery reports received (`Sink::acknowledged`).
    reported: AtomicU64,
    /// The report count a `flush` waits for (`u64::MAX`: none waits).
    awaited: AtomicU64,
    /// Records whose delivery failed, with the partition each was sent to.
    failed: Mutex<Vec<(RdError, i32, OutRecord)>>,
    done: tokio::sync::Notify,
}

impl Default for Outstanding {
    fn default() -> Self {
        Outstanding {
            reported: AtomicU64::new(0),
            awaited: AtomicU64::new(u64::MAX),
            failed: Mutex::default(),
            done: tokio::sync::Notify::new(),
        }
    }
}

/// Publishes to one Kafka topic. One producer (and its connections and batches) is shared
/// by every sink of a [`crate::KafkaBroker`].
pub struct KafkaSink {
    producer: Arc<SinkProducer>,
    topic: String,
    outstanding: Arc<Outstanding>,
    /// Records handed to librdkafka since `outstanding` was made.
    submitted: u64,
    /// Records whose delivery failed, sent again to their partitions by the next `flush`.
    again: Vec<(i32, OutRecord)>,
    /// Dead letters and late records larger than this are cut to fit (see
    /// [`KafkaConfig::max_record_bytes`](crate::KafkaConfig::max_record_bytes)).
    max_record_bytes: usize,
    /// Exactly-once: the transaction its records are produced in, and the number of its
    /// aborts when this sink last looked (records submitted before an abort are gone).
    txn: Option<(Arc<Txn>, u64)>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaSink {
    pub(crate) fn new(producer: Arc<SinkProducer>, topic: &str, max_record_bytes: usize) -> Self {
        KafkaSink {
            producer,
            topic: topic.to_string(),
            outstanding: Arc::default(),
            submitted: 0,
            again: Vec::new(),
            max_record_bytes,
            txn: None,
        }
    }

    /// This sink producing in `txn` (exactly-once mode; `producer` must be its).
    pub(crate) fn in_transaction(mut self, txn: Option<Arc<Txn>>) -> Self {
        self.txn = txn.map(|t| {
            let epoch = t.epoch();
            (t, epoch)
        });
        self
    }

    /// Exactly-once: forgets what an abort since the last call threw away (records whose
    /// reports are still due count into a fresh tally). Whether there was one.
    fn forget_aborted(&mut self) -> bool {
        let Some((txn, seen)) = &mut self.txn else {
            return false;
        };
        if txn.epoch() == *seen {
            return false;
        }
        *seen = txn.epoch();
        self.outstanding = Arc::default();
        self.submitted = 0;
        self.again.clear();
        true
    }

    /// Exactly-once: [`forget_aborted`](Self::forget_aborted), then begins a transaction
    /// unless one is open.
    fn in_open_transaction(&mut self) -> Result<(), KafkaError> {
        self.forget_aborted();
        match &self.txn {
            Some((txn, _)) => txn.begin(),
            None => Ok(()),
        }
    }

    fn delivery_error(&self, source: RdError) -> KafkaError {
        KafkaError::Delivery {
            topic: self.topic.clone(),
            source,
        }
    }

    /// Hands one record to librdkafka; its report is counted in `outstanding`.
    async fn enqueue(&mut self, r: &OutRecord, partition: Option<i32>) -> Result<(), KafkaError> {
        // A dead letter or late record never fails for its size: it is cut to fit.
        let fitted = weir_engine::output::fit_to(r, self.max_record_bytes);
        if fitted.is_some() {
            tracing::warn!(topic = %self.topic, bytes = weir_engine::output::record_size(r), limit = self.max_record_bytes, "record cut to fit the producer's message.max.bytes (payload_truncated in its envelope)");
        }
        let r = fitted.as_ref().unwrap_or(r);
        let mut rec: BaseRecord<'_, [u8], [u8], Arc<Outstanding>> =
            BaseRecord::with_opaque_to(&self.topic, self.outstanding.clone())
                .payload(&r.payload[..]);
        if let Some(k) = &r.key {
            rec = rec.key(&k[..]);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(ts) = r.timestamp {
            rec = rec.timestamp(ts);
        }
        if !r.headers.is_empty() {
            // Headers that were null when read from Kafka are written back as null.
            let nulls: Vec<String> = r
                .headers
                .iter()
                .find(|(n, _)| n == HEADER_NULL_HEADERS)
                .and_then(|(_, v)| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                if name == HEADER_NULL_HEADERS {
                    continue;
                }
                let null = value.is_empty() && nulls.iter().any(|n| n == name);
                h = h.insert(Header {
                    key: name,
                    value: (!null).then_some(&value[..]),
                });
            }
            rec = rec.headers(h);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => {
                    self.submitted += 1;
                    return Ok(());
                }
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's local queue (queue.buffering.max.*) is full: this is
                    // what bounds the records in flight. Wait for deliveries to drain it.
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(self.delivery_error(e)),
            }
        }
    }

    /// The records whose delivery failed since the last call, with their errors.
    fn take_failed(&self) -> Vec<(RdError, i32, OutRecord)> {
        std::mem::take(
            &mut *self
                .outstanding
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Waits until every record handed to librdkafka has its delivery report.
    async fn settle(&self) {
        let o = &self.outstanding;
        loop {
            let done = o.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            // Sequentially consistent with the reporting thread's add and load: either it
            // sees this count and wakes us, or we see its report here.
            o.awaited.store(self.submitted, Ordering::SeqCst);
            if o.reported.load(Ordering::SeqCst) >= self.submitted {
                o.awaited.store(u64::MAX, Ordering::SeqCst);
                return;
            }
            done.await;
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.topic
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.submit(batch).await?;
        let res = self.flush().await;
        // The caller sends the whole batch again after an error.
        self.again.clear();
        res
    }

    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.submit_in(batch, None).await
    }

    async fn submit_to(&mut self, partition: u32, batch: &[OutRecord]) -> Result<()> {
        self.submit_in(batch, Some(partition as i32)).await
    }

    async fn partition_count(&mut self) -> Result<Option<u32>> {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let md = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
        })
        .await
        .map_err(|e| weir_engine::EngineError::Stopped(e.to_string()))?
        .map_err(|e| self.delivery_error(e))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|&n| n > 0))
    }

    fn acknowledged(&self) -> (u64, u64) {
        let o = &self.outstanding;
        (o.reported.load(Ordering::Acquire), self.submitted)
    }

    async fn flush(&mut self) -> Result<()> {
        if let Some((txn, _)) = &self.txn {
            return self.flush_in(txn.clone()).await;
        }
        let mut again = std::mem::take(&mut self.again);
        for (i, (p, r)) in again.iter().enumerate() {
            if let Err(e) = self.enqueue(r, Some(*p)).await {
                again.drain(..i);
                self.again = again;
                return Err(e.into());
            }
        }
        self.settle().await;
        let failed = self.take_failed();
        let mut first = None;
        for (e, p, r) in failed {
            first.get_or_insert(e);
            self.again.push((p, r));
        }
        match first {
            None => Ok(()),
            Some(e) => Err(self.delivery_error(e).into()),
        }
    }
}

impl KafkaSink {
    /// Hands `batch` to librdkafka, each record to `partition` if given (else its key's).
    async fn submit_in(&mut self, batch: &[OutRecord], partition: Option<i32>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.in_open_transaction()?;
        for r in batch {
            if let Err(e) = self.enqueue(r, partition).await {
                return match &self.txn {
                    // Sending the batch again would put its first records in twice.
                    Some((txn, _)) => Err(self.abandon(txn.clone(), e).await),
                    None => Err(e.into()),
                };
            }
        }
        Ok(())
    }

    /// Exactly-once `flush`: a failed delivery makes the transaction abortable only, so it
    /// is aborted and the pipeline stops (a restart replays from the committed offsets);
    /// records an abort threw away meanwhile are forgotten.
    async fn flush_in(&mut self, txn: Arc<Txn>) -> Result<()> {
        if self.forget_aborted() {
            return Ok(());
        }
        self.settle().await;
        let failed = self.take_failed();
        if self.forget_aborted() {
            return Ok(());
        }
        let Some((source, _, _)) = failed.into_iter().next() else {
            return Ok(());
        };
        Err(self.abandon(txn, self.delivery_error(source)).await)
    }

    /// Exactly-once: what follows a record that could not be sent or delivered. The
    /// transaction can only be aborted; the pipeline stops, and a restart replays from the
    /// committed offsets.
    async fn abandon(&self, txn: Arc<Txn>, e: KafkaError) -> weir_engine::EngineError {
        if let Err(a) = txn.abort("a record was not delivered").await {
            tracing::error!(error = %a, "kafka: the abort failed too");
        }
        weir_engine::EngineError::Stopped(format!(
            "{e}; the transaction was aborted, and a restart replays from the offsets committed before"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;

    fn rec(v: &str) -> OutRecord {
        OutRecord {
            key: Some(Bytes::from_static(b"k")),
            payload: Bytes::copy_from_slice(v.as_bytes()),
            headers: vec![("weir.id".into(), Bytes::from_static(b"k@0"))],
            timestamp: Some(1),
        }
    }

    /// A sink whose producer has no broker: every record times out after 300 ms.
    fn unreachable() -> KafkaSink {
        let producer: SinkProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "300")
            .create_with_context(SinkContext)
            .unwrap();
        KafkaSink::new(Arc::new(producer), "nowhere", 1_000_000)
    }

    /// With no broker, deliveries time out: `flush` reports a retryable error and keeps
    /// the failed records, and the next `flush` sends exactly those again.
    #[tokio::test]
    async fn failed_deliveries_are_kept_and_sent_again() {
        let mut sink = unreachable();
        sink.submit(&[rec("a"), rec("b"), rec("c")]).await.unwrap();
        // Handed over, no report yet (they time out after 300 ms).
        assert_eq!(sink.acknowledged(), (0, 3));
        let e = sink.flush().await.unwrap_err();
        // A failed delivery is a report too: the emit latency ends, `flush` tells the error.
        assert_eq!(sink.acknowledged(), (3, 3));
        assert!(e.is_retryable(), "{e}");
        let mut again: Vec<_> = sink.again.iter().map(|r| r.1.payload.clone()).collect();
        again.sort();
        assert_eq!(again, ["a", "b", "c"]);
        assert_eq!(sink.again[0].1.header("weir.id").unwrap(), "k@0");
        assert_eq!(sink.again[0].1.key.as_deref(), Some(&b"k"[..]));
        // The retry re-sends them (and they fail again, still kept).
        assert!(sink.flush().await.is_err());
        assert_eq!(sink.again.len(), 3);
        assert_eq!(
            sink.outstanding.reported.load(Ordering::Acquire),
            sink.submitted
        );
        // `send` leaves nothing behind: its caller sends the batch again itself.
        assert!(sink.send(&[rec("d")]).await.is_err());
        assert!(sink.again.is_empty());
    }

    /// `flush` returns only once the last record submitted has its report: here the first
    /// two time out (librdkafka scans for timeouts about once a second) before the third
    /// is even submitted.
    #[tokio::test]
    async fn flush_waits_for_the_last_delivery_report() {
        let mut sink = unreachable();
        sink.submit(&[rec("a"), rec("b")]).await.unwrap();
        let t = std::time::Instant::now();
        while sink.acknowledged().0 < 2 {
            assert!(t.elapsed() < Duration::from_secs(10), "no reports");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sink.submit(&[rec("c")]).await.unwrap();
        assert_eq!(sink.acknowledged(), (2, 3));
        assert!(sink.flush().await.is_err());
        assert_eq!(sink.acknowledged(), (3, 3));
        assert_eq!(
            sink.again.len(),
            3,
            "every failed record is kept to send again"
        );
    }
}
