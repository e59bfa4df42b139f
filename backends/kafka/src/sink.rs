//! A Kafka producer as a [`Sink`]: a batch is handed to librdkafka (which batches,
//! compresses and retries per `[brokers.kafka.producer]`), then every delivery report is
//! awaited before `send` returns. The runtime uses `submit` and `flush` instead: batches
//! are handed over as they come and their delivery reports are awaited only before a
//! commit, so producing overlaps with consuming and processing the next batches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use weir_engine::{OutRecord, Result, Sink};

use crate::error::KafkaError;

/// Publishes to one Kafka topic. Cloning the producer is cheap; one producer (and its
/// connections and batches) is shared by every sink of a [`crate::KafkaBroker`].
pub struct KafkaSink {
    producer: Arc<FutureProducer>,
    topic: String,
    /// Submitted records whose delivery report is outstanding, oldest first.
    in_flight: VecDeque<(DeliveryFuture, OutRecord)>,
    /// Submitted records whose delivery failed: the next `flush` sends them again.
    failed: Vec<OutRecord>,
    /// The first failure since the last `flush`.
    error: Option<KafkaError>,
}

/// Submitted records kept in flight before `submit` waits for the oldest reports.
const MAX_IN_FLIGHT: usize = 200_000;

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaSink {
    pub(crate) fn new(producer: Arc<FutureProducer>, topic: &str) -> Self {
        KafkaSink {
            producer,
            topic: topic.to_string(),
            in_flight: VecDeque::new(),
            failed: Vec::new(),
            error: None,
        }
    }

    fn delivery_error(&self, source: RdError) -> KafkaError {
        KafkaError::Delivery {
            topic: self.topic.clone(),
            source,
        }
    }

    async fn settle(&self, f: DeliveryFuture) -> Result<(), KafkaError> {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.delivery_error(e)),
            Err(_) => Err(KafkaError::Canceled(self.topic.clone())),
        }
    }

    /// Waits for the oldest submitted record's report; a failed record is kept for a resend.
    async fn settle_oldest(&mut self) -> bool {
        let Some((f, r)) = self.in_flight.pop_front() else {
            return false;
        };
        if let Err(e) = self.settle(f).await {
            self.failed.push(r);
            self.error.get_or_insert(e);
        }
        true
    }

    /// Hands one record to librdkafka, keeping it (and its report) in flight.
    async fn enqueue(&mut self, r: OutRecord) -> Result<(), KafkaError> {
        loop {
            match self.producer.send_result(record(&self.topic, &r)) {
                Ok(f) => {
                    self.in_flight.push_back((f, r));
                    return Ok(());
                }
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // librdkafka's local queue is full: wait for our oldest delivery (or a
                    // moment, if none is ours) and offer the record again.
                    if !self.settle_oldest().await {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err((e, _)) => return Err(self.delivery_error(e)),
            }
        }
    }
}

/// The librdkafka message for `r`.
fn record<'a>(topic: &'a str, r: &'a OutRecord) -> FutureRecord<'a, [u8], [u8]> {
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(&r.payload[..]);
    if let Some(k) = &r.key {
        rec = rec.key(&k[..]);
    }
    if let Some(ts) = r.timestamp {
        rec = rec.timestamp(ts);
    }
    if !r.headers.is_empty() {
        let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            h = h.insert(Header {
                key: name,
                value: Some(&value[..]),
            });
        }
        rec = rec.headers(h);
    }
    rec
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.topic
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::with_capacity(batch.len());
        let mut first_error: Option<KafkaError> = None;
        for r in batch {
            let mut rec = record(&self.topic, r);
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        pending.push_back(f);
                        break;
                    }
                    Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's local queue is full: wait for the oldest delivery
                        // (or a moment, if none is ours) and offer the record again.
                        rec = back;
                        match pending.pop_front() {
                            Some(f) => {
                                if let Err(e) = self.settle(f).await {
                                    first_error.get_or_insert(e);
                                }
                            }
                            None => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    Err((e, _)) => return Err(self.delivery_error(e).into()),
                }
            }
        }
        // Every record must be settled before returning, even after a failure, so that no
        // delivery of this batch is still in flight when the runtime retries it.
        for f in pending {
            if let Err(e) = self.settle(f).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e.into()),
        }
    }

    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        for r in batch {
            self.enqueue(r.clone()).await?;
        }
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.settle_oldest().await;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let mut again = std::mem::take(&mut self.failed).into_iter();
        while let Some(r) = again.next() {
            if let Err(e) = self.enqueue(r.clone()).await {
                self.failed.push(r);
                self.failed.extend(again);
                return Err(e.into());
            }
        }
        while self.settle_oldest().await {}
        match self.error.take() {
            None => Ok(()),
            Some(e) => Err(e.into()),
        }
    }
}
