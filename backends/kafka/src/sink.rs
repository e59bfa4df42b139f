//! A Kafka producer as a [`Sink`]: a batch is handed to librdkafka (which batches,
//! compresses and retries per `[brokers.kafka.producer]`), then every delivery report is
//! awaited before `send` returns.

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
}

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
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).payload(&r.payload[..]);
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
}
