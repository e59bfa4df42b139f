//! A reader of a topic outside the pipeline's queue, for `weir tail`: it never takes a
//! record away from the queue's consumers.
//!
//! * New records only: a server-named, exclusive, auto-delete queue bound to the exchange
//!   with the topic's routing key receives a copy of everything published from now on.
//! * From the beginning: only a stream queue keeps what was read; it is consumed from its
//!   first offset (stream acknowledgements only grant credit, they remove nothing).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
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
    consumer: Consumer,
    /// Stream deliveries are acknowledged (for credit) as they are read.
    ack: bool,
    next: u64,
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
        // Tail only reads a copy (or a stream from its start): it declares the queue the
        // way a publisher does, leaving an existing one as it is.
        topology::declare_published_topic(&conn, &ch, &cfg, topic).await?;
        let (queue, mut args, no_ack) = if from_beginning {
            ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| amqp_error("setting the prefetch (basic.qos)", &e))?;
            let mut args = FieldTable::default();
            args.insert(STREAM_OFFSET.into(), AMQPValue::LongString("first".into()));
            (topic.to_string(), args, false)
        } else {
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| amqp_error("declaring a queue for tail", &e))?;
            let name = q.name().to_string();
            ch.queue_bind(
                name.as_str().into(),
                cfg.exchange.as_str().into(),
                topic.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("binding the tail queue", &e))?;
            (name, FieldTable::default(), true)
        };
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                std::mem::take(&mut args),
            )
            .await
            .map_err(|e| amqp_error(&format!("consuming `{queue}`"), &e))?;
        Ok(AmqpTail {
            topic: topic.to_string(),
            _conn: conn,
            ch,
            consumer,
            ack: !no_ack,
            next: 0,
        })
    }
}

#[async_trait]
impl Source for AmqpTail {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        let consumer = &mut self.consumer;
        let first = tokio::time::timeout(
            wait,
            std::future::poll_fn(|cx| Pin::new(&mut *consumer).poll_next(cx)),
        )
        .await;
        let mut deliveries = match first {
            Err(_) => return Ok(Received::Batch(Vec::new())),
            Ok(Some(Ok(d))) => vec![d],
            Ok(Some(Err(e))) => return Err(amqp_error("reading for tail", &e)),
            Ok(None) => return Ok(Received::End),
        };
        {
            let mut cx = Context::from_waker(Waker::noop());
            while deliveries.len() < max {
                match Pin::new(&mut self.consumer).poll_next(&mut cx) {
                    Poll::Ready(Some(Ok(d))) => deliveries.push(d),
                    _ => break,
                }
            }
        }
        if self.ack {
            if let Some(last) = deliveries.last() {
                self.ch
                    .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| amqp_error("acknowledging stream deliveries", &e))?;
            }
        }
        let records = deliveries
            .into_iter()
            .map(|d| {
                let (mut r, stream_offset) = to_record(d);
                r.position = Position {
                    partition: 0,
                    offset: stream_offset.unwrap_or(self.next),
                };
                self.next = r.position.offset + 1;
                r
            })
            .collect();
        Ok(Received::Batch(records))
    }

    async fn commit(&mut self, _: &[(Position, Checkpoint)]) -> Result<()> {
        Ok(())
    }
}
