//! A reader of a topic outside the pipeline's queue, for `weir tail`: it never takes a
//! record away from the queue's consumers.
//!
//! * New records only: a server-named, exclusive, auto-delete queue bound to the exchange
//!   with the routing key of each of the topic's queues receives a copy of everything
//!   published from now on (the routing key tells the partition).
//! * From the beginning: only a stream queue keeps what was read; each of the topic's
//!   queues is consumed from its first offset (stream acknowledgements only grant credit,
//!   they remove nothing).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use weir_engine::{Checkpoint, EngineError, Position, Received, Result, Source};

use crate::config::{AmqpConfig, QueueType};
use crate::error::{amqp_error, BACKEND};
use crate::source::{to_record, STREAM_OFFSET};
use crate::topology;

/// A reader of `topic` that commits nothing (see the module docs).
pub struct AmqpTail {
    topic: String,
    _conn: Connection,
    ch: Channel,
    /// The topic's queues by partition (routing key = queue name).
    queues: Vec<String>,
    /// One consumer (new records: of the tail's own queue, bound to every partition) or
    /// one per partition (streams from the beginning), with the partition it reads (`None`:
    /// the partition is the delivery's routing key).
    consumers: Vec<(Option<u32>, Consumer)>,
    /// Stream deliveries are acknowledged (for credit) as they are read.
    ack: bool,
    /// The next offset by partition (a counter, for queues that have none).
    next: Vec<u64>,
}

impl AmqpTail {
    pub(crate) async fn connect(
        cfg: Arc<AmqpConfig>,
        topic: &str,
        from_beginning: bool,
    ) -> Result<AmqpTail> {
        if from_beginning && cfg.queue_type != QueueType::Stream {
            return Err(EngineError::backend(
                BACKEND,
                format!(
                    "RabbitMQ {} queues forget what was consumed, so `{topic}` cannot be read from the beginning without taking records from its consumers; tail without --from-beginning shows new records, or use queue_type = \"stream\"",
                    cfg.queue_type.as_str()
                ),
                false,
            ));
        }
        let conn = topology::connect(&cfg, &format!("weir tail {topic}")).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", &e))?;
        let n = cfg.partitions;
        let queues: Vec<String> = (0..n)
            .map(|p| topology::partition_queue(topic, p, n))
            .collect();
        // Tail only reads a copy (or a stream from its start): it declares the queues the
        // way a publisher does, leaving existing ones as they are.
        for q in &queues {
            topology::declare_published_topic(&conn, &ch, &cfg, q).await?;
        }
        let mut consumers = Vec::new();
        if from_beginning {
            ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| amqp_error("setting the prefetch (basic.qos)", &e))?;
            for (p, q) in queues.iter().enumerate() {
                let mut args = FieldTable::default();
                args.insert(STREAM_OFFSET.into(), AMQPValue::LongString("first".into()));
                let c = consume(&ch, q, false, args).await?;
                consumers.push((Some(p as u32), c));
            }
        } else {
            let keys: Vec<&str> = queues.iter().map(String::as_str).collect();
            let name = topology::private_queue(&ch, &cfg.exchange, &keys).await?;
            let c = consume(&ch, &name, true, FieldTable::default()).await?;
            consumers.push((None, c));
        }
        Ok(AmqpTail {
            topic: topic.to_string(),
            _conn: conn,
            ch,
            next: vec![0; queues.len()],
            queues,
            consumers,
            ack: from_beginning,
        })
    }

    /// The partition a delivery of consumer `c` belongs to.
    fn partition(&self, c: Option<u32>, d: &Delivery) -> u32 {
        c.unwrap_or_else(|| {
            self.queues
                .iter()
                .position(|q| q.as_str() == d.routing_key.as_str())
                .unwrap_or(0) as u32
        })
    }

    /// The first ready delivery of any consumer, with the consumer's index.
    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<(usize, Option<lapin::Result<Delivery>>)> {
        for (i, (_, c)) in self.consumers.iter_mut().enumerate() {
            if let Poll::Ready(d) = Pin::new(c).poll_next(cx) {
                return Poll::Ready((i, d));
            }
        }
        Poll::Pending
    }
}

async fn consume(ch: &Channel, queue: &str, no_ack: bool, args: FieldTable) -> Result<Consumer> {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| amqp_error(&format!("consuming `{queue}`"), &e))
}

#[async_trait]
impl Source for AmqpTail {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        let first = tokio::time::timeout(wait, std::future::poll_fn(|cx| self.poll_any(cx))).await;
        let mut deliveries = match first {
            Err(_) => return Ok(Received::Batch(Vec::new())),
            Ok((i, Some(Ok(d)))) => vec![(self.consumers[i].0, d)],
            Ok((_, Some(Err(e)))) => return Err(amqp_error("reading for tail", &e)),
            Ok((_, None)) => return Ok(Received::End),
        };
        {
            let mut cx = Context::from_waker(Waker::noop());
            for (p, c) in &mut self.consumers {
                while deliveries.len() < max {
                    match Pin::new(&mut *c).poll_next(&mut cx) {
                        Poll::Ready(Some(Ok(d))) => deliveries.push((*p, d)),
                        _ => break,
                    }
                }
            }
        }
        if self.ack {
            if let Some((_, last)) = deliveries.iter().max_by_key(|(_, d)| d.delivery_tag) {
                self.ch
                    .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| amqp_error("acknowledging stream deliveries", &e))?;
            }
        }
        let records = deliveries
            .into_iter()
            .map(|(c, d)| {
                let partition = self.partition(c, &d);
                let (mut r, stream_offset) = to_record(d);
                let next = &mut self.next[partition as usize];
                r.position = Position {
                    partition,
                    offset: stream_offset.unwrap_or(*next),
                };
                *next = r.position.offset + 1;
                r
            })
            .collect();
        Ok(Received::Batch(records))
    }

    async fn commit(&mut self, _: &[(Position, Checkpoint)]) -> Result<()> {
        Ok(())
    }
}
