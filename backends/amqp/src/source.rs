//! The RabbitMQ source: one queue, manual acknowledgements, commits as AMQP transactions.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, EngineError, Position, Received, Record, Result, Source};

use crate::checkpoint::CheckpointQueue;
use crate::config::{AmqpConfig, QueueType};
use crate::error::{amqp_error, redact, BACKEND};
use crate::sink::{HEADER_KEY, HEADER_TIMESTAMP};
use crate::topology;

pub(crate) const STREAM_OFFSET: &str = "x-stream-offset";

struct Live {
    _conn: Connection,
    ch: Channel,
    consumer: Consumer,
}

/// Consumes queue `topic` as partition 0.
///
/// * Offsets are a counter this source assigns to deliveries in order (stream queues: the
///   stream offset). Delivery tags restart with every channel, offsets do not.
/// * [`commit`](Source::commit) of offset `o` acks (`multiple`) every delivery below `o`
///   that is still unacked on the current channel and stores `o` with the checkpoint in
///   queue `weir.checkpoint.<topic>`, both in one AMQP transaction. A new source reads that
///   back and numbers the redelivered (requeued, in their original order) deliveries from
///   `o` again, so the engine can tell replayed records from new ones.
/// * A lost connection discards the unacked deliveries (RabbitMQ requeues them), returns
///   [`Received::Revoked`]`([0])` so the engine drops the open windows they fed, then
///   reconnects with backoff, re-declares the topology and returns
///   [`Received::Assigned`]`([(0, None)])`.
pub struct AmqpSource {
    cfg: Arc<AmqpConfig>,
    topic: String,
    live: Option<Live>,
    next_offset: u64,
    /// (offset, delivery tag) of deliveries on the current channel not yet acked, in order.
    unacked: VecDeque<(u64, u64)>,
    events: VecDeque<Received>,
    connected_once: bool,
    failures: u32,
    /// Deliveries received since the last commit.
    since_commit: usize,
    /// The committed position read when consuming started, until the first delivery: a
    /// consumer that stood by (single active consumer) becomes active only when the one
    /// before it is gone, and must then number from what that one committed last.
    standing_by: Option<Option<u64>>,
    /// Ready messages in the queue, as the last passive declare (after a receive that
    /// waited in vain) reported them; deliveries since then mean "not at the end".
    ready: u32,
}

impl AmqpSource {
    pub(crate) async fn connect(cfg: Arc<AmqpConfig>, topic: &str) -> Result<AmqpSource> {
        let mut s = AmqpSource {
            cfg,
            topic: topic.to_string(),
            live: None,
            next_offset: 0,
            unacked: VecDeque::new(),
            events: VecDeque::new(),
            connected_once: false,
            failures: 0,
            since_commit: 0,
            standing_by: None,
            ready: u32::MAX,
        };
        s.open().await?;
        Ok(s)
    }

    fn stream(&self) -> bool {
        self.cfg.queue_type == QueueType::Stream
    }

    /// Connects, declares, reads the committed position and starts consuming.
    async fn open(&mut self) -> Result<()> {
        let conn = topology::connect(&self.cfg, &format!("weir source {}", self.topic)).await?;
        let (ch, exclusive) =
            topology::declare_consumed_topic(&conn, &self.cfg, &self.topic).await?;
        let ckpt_queue = topology::declare_checkpoint_queue(&ch, &self.cfg, &self.topic).await?;
        let stored = CheckpointQueue::new(&ch, ckpt_queue).newest().await?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("setting the prefetch (basic.qos)", &e))?;
        ch.tx_select()
            .await
            .map_err(|e| amqp_error("selecting transactions (tx.select)", &e))?;
        let mut args = FieldTable::default();
        if self.stream() {
            let from = match stored {
                Some((pos, _)) => AMQPValue::LongLongInt(pos as i64),
                None => AMQPValue::LongString(self.cfg.stream_offset.as_str().into()),
            };
            args.insert(STREAM_OFFSET.into(), from);
        }
        let consumer = ch
            .basic_consume(
                self.topic.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    exclusive,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| {
                if exclusive && e.to_string().contains("exclusive") {
                    // Another instance reads the queue: wait for it, as a standby.
                    EngineError::backend(
                        BACKEND,
                        format!(
                            "queue `{}` is read by another consumer (exclusively, as the queue has no single active consumer); retrying",
                            self.topic
                        ),
                        true,
                    )
                } else {
                    amqp_error(&format!("consuming queue `{}`", self.topic), &e)
                }
            })?;
        self.next_offset = stored.map_or(0, |(p, _)| p);
        self.unacked.clear();
        self.standing_by = (!self.stream()).then_some(stored.map(|(p, _)| p));
        // The first assignment hands the engine the stored checkpoint (a fresh pipeline
        // replays against it); after a reconnect the engine has just dropped the state of
        // the lost channel and counts what is redelivered as new.
        let cp = if self.connected_once {
            None
        } else {
            stored.map(|(_, cp)| cp)
        };
        self.events.push_back(Received::Assigned(vec![(0, cp)]));
        if self.connected_once {
            tracing::info!(
                topic = %self.topic,
                url = %redact(&self.cfg.url),
                attempts = self.failures + 1,
                "RabbitMQ source reconnected; topology re-declared, consuming again (unacked deliveries are redelivered)"
            );
        } else {
            tracing::debug!(topic = %self.topic, committed = ?stored, "RabbitMQ source consuming");
        }
        self.connected_once = true;
        self.failures = 0;
        self.live = Some(Live {
            _conn: conn,
            ch,
            consumer,
        });
        Ok(())
    }

    /// The first delivery arrived: if another consumer committed since this one read the
    /// checkpoint (it stood by while that one was active), number from that commit and
    /// hand its checkpoint to the engine before the deliveries.
    async fn took_over(&mut self, read: Option<u64>) -> Result<Option<Received>> {
        let Some(live) = &self.live else {
            return Ok(None);
        };
        let ch = live
            ._conn
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", &e))?;
        let stored = CheckpointQueue::new(&ch, topology::checkpoint_queue(&self.topic))
            .newest()
            .await;
        let _ = ch.close(200, "checkpoint read".into()).await;
        let Some((pos, cp)) = stored? else {
            return Ok(None);
        };
        if Some(pos) == read {
            return Ok(None);
        }
        tracing::info!(topic = %self.topic, from = ?read, to = pos, "RabbitMQ source became the active consumer; resuming from the last commit of the one before");
        self.next_offset = pos;
        Ok(Some(Received::Assigned(vec![(0, Some(cp))])))
    }

    /// The connection or channel is gone: forget its deliveries and tell the engine.
    fn lost(&mut self, why: &dyn std::fmt::Display) -> Received {
        tracing::warn!(
            topic = %self.topic,
            unacked = self.unacked.len(),
            error = %why,
            "RabbitMQ source lost its channel: unacked deliveries will be redelivered; open windows fed by them are dropped; reconnecting"
        );
        self.live = None;
        self.unacked.clear();
        Received::Revoked(vec![0])
    }

    fn record(&mut self, d: Delivery) -> Record {
        let tag = d.delivery_tag;
        let (mut rec, stream_offset) = to_record(d);
        let offset = match stream_offset {
            Some(o) if self.stream() => o,
            _ => self.next_offset,
        };
        self.next_offset = offset + 1;
        self.since_commit += 1;
        self.unacked.push_back((offset, tag));
        rec.position.offset = offset;
        rec
    }
}

/// A delivery as a record of partition 0 (offset 0), and its stream offset if it has one.
pub(crate) fn to_record(d: Delivery) -> (Record, Option<u64>) {
    let mut key = None;
    let mut timestamp = d.properties.timestamp().map(|s| s as i64 * 1000);
    let mut stream_offset = None;
    let mut headers = Vec::new();
    if let Some(table) = d.properties.headers() {
        headers.reserve(table.inner().len());
        for (k, v) in table {
            match k.as_str() {
                HEADER_KEY => key = Some(Bytes::from(value_bytes(v))),
                HEADER_TIMESTAMP => {
                    if let AMQPValue::LongLongInt(t) = v {
                        timestamp = Some(*t);
                    }
                }
                STREAM_OFFSET => {
                    if let AMQPValue::LongLongInt(o) = v {
                        stream_offset = Some(*o as u64);
                    }
                }
                _ => headers.push((k.to_string().into(), Bytes::from(value_bytes(v)))),
            }
        }
    }
    let rec = Record {
        key,
        payload: Bytes::from(d.data),
        headers,
        timestamp,
        position: Position::default(),
    };
    (rec, stream_offset)
}

/// A header value as bytes: strings as they are, other values in their text form.
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortInt(i) => i.to_string().into_bytes(),
        AMQPValue::ShortUInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongUInt(i) => i.to_string().into_bytes(),
        AMQPValue::LongLongInt(i) => i.to_string().into_bytes(),
        AMQPValue::Timestamp(i) => i.to_string().into_bytes(),
        AMQPValue::Float(f) => f.to_string().into_bytes(),
        AMQPValue::Double(f) => f.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}

#[async_trait]
impl Source for AmqpSource {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        if self.live.is_none() {
            if let Err(e) = self.open().await {
                self.failures += 1;
                tracing::warn!(
                    topic = %self.topic,
                    url = %redact(&self.cfg.url),
                    attempt = self.failures,
                    error = %e,
                    "RabbitMQ source cannot reconnect; retrying with backoff"
                );
                return Err(e);
            }
            return Ok(self.events.pop_front().expect("open queues an assignment"));
        }
        let live = self.live.as_mut().expect("connected");
        let first = tokio::time::timeout(
            wait,
            std::future::poll_fn(|cx| Pin::new(&mut live.consumer).poll_next(cx)),
        )
        .await;
        let first = match first {
            Err(_) if self.cfg.queue_type == QueueType::Stream => {
                return Ok(Received::Batch(Vec::new()))
            }
            Err(_) => {
                // Nothing came: ask how many messages wait (a consumer that stands by, or
                // one out of prefetch credit, sees them here).
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                self.ready = match live
                    .ch
                    .queue_declare(self.topic.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(q) => q.message_count(),
                    Err(e) => return Ok(self.lost(&e)),
                };
                return Ok(Received::Batch(Vec::new()));
            }
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Ok(self.lost(&e)),
            Ok(None) => return Ok(self.lost(&"the broker cancelled the consumer")),
        };
        let mut deliveries = Vec::with_capacity(max.min(self.cfg.prefetch as usize).max(1));
        deliveries.push(first);
        {
            let mut cx = Context::from_waker(Waker::noop());
            while deliveries.len() < max {
                match Pin::new(&mut live.consumer).poll_next(&mut cx) {
                    Poll::Ready(Some(Ok(d))) => deliveries.push(d),
                    Poll::Ready(Some(Err(e))) => return Ok(self.lost(&e)),
                    Poll::Ready(None) => return Ok(self.lost(&"the broker cancelled the consumer")),
                    Poll::Pending => break,
                }
            }
        }
        let taken_over = match self.standing_by.take() {
            Some(read) => self.took_over(read).await?,
            None => None,
        };
        self.ready = u32::MAX;
        let records = deliveries.into_iter().map(|d| self.record(d)).collect();
        match taken_over {
            Some(assigned) => {
                self.events.push_back(Received::Batch(records));
                Ok(assigned)
            }
            None => Ok(Received::Batch(records)),
        }
    }

    /// Messages wait in the queue (as the last empty receive found), or deliveries came
    /// since that check. A stream's message count is all it retains, read or not: streams
    /// answer `false` (their partition goes idle on the wall clock alone).
    fn has_backlog(&self, _partition: u32) -> bool {
        !self.stream() && self.ready > 0
    }

    /// Asks for a commit once half the prefetch arrived since the last one: the broker
    /// stops delivering when `prefetch` deliveries are unacked, and acks only happen at
    /// commits, so waiting for the commit interval would cap throughput at
    /// `prefetch / commit_interval`.
    fn wants_commit(&self) -> bool {
        self.since_commit >= (self.cfg.prefetch as usize / 2).max(1)
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        self.since_commit = 0;
        let Some((pos, cp)) = positions.iter().rev().find(|(p, _)| p.partition == 0) else {
            return Ok(());
        };
        let Some(live) = &self.live else {
            // The channel these positions were read on is gone; RabbitMQ redelivers them.
            tracing::warn!(topic = %self.topic, "commit skipped: the channel was lost; its deliveries are redelivered");
            return Ok(());
        };
        let upto = self.unacked.partition_point(|&(o, _)| o < pos.offset);
        let store = CheckpointQueue::new(&live.ch, topology::checkpoint_queue(&self.topic));
        // The acks and the checkpoint are one AMQP transaction: `save` commits it.
        let result: Result<()> = async {
            if upto > 0 {
                let tag = self.unacked[upto - 1].1;
                store
                    .ch
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(|e| amqp_error("acknowledging deliveries", &e))?;
            }
            store.save(&[Committed::at(*pos, *cp)]).await
        }
        .await;
        match result {
            Ok(()) => {
                self.unacked.drain(..upto);
                Ok(())
            }
            Err(e) => {
                let ev = self.lost(&e);
                self.events.push_back(ev);
                Ok(())
            }
        }
    }
}
