//! One partition queue a source consumes: its channel (transactional, with its own
//! prefetch), its consumer, its offsets and its unacknowledged deliveries.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, EngineError, Position, Record, Result};

use crate::checkpoint::CheckpointQueue;
use crate::config::{AmqpConfig, QueueType};
use crate::error::{amqp_error, BACKEND};
use crate::source::{to_record, STREAM_OFFSET};
use crate::topology;

/// A partition queue being consumed (actively, or standing by behind another instance's
/// single active consumer).
pub(crate) struct Part {
    /// The partition number (the queue's index in the topic).
    pub(crate) index: u32,
    pub(crate) queue: String,
    /// The topic and its `partitions` setting (written with every checkpoint).
    topic: String,
    partitions: u32,
    pub(crate) ch: Channel,
    consumer: Consumer,
    stream: bool,
    /// The offset the next delivery gets: a counter (stream queues: the stream offset).
    pub(crate) next_offset: u64,
    /// (offset, delivery tag) of deliveries on this channel not yet acked, in order.
    pub(crate) unacked: VecDeque<(u64, u64)>,
    /// The committed position read when consuming started, until the first delivery: a
    /// consumer that stood by (single active consumer) becomes active only when the one
    /// before it is gone, and must then number from what that one committed last.
    standing_by: Option<Option<u64>>,
    /// Ready messages in the queue, as the last passive declare (after a receive that
    /// waited in vain) reported them; deliveries since then mean "not at the end".
    pub(crate) ready: u32,
    /// Deliveries received since the last commit.
    pub(crate) since_commit: usize,
    /// Streams: unacked deliveries that make the source grant credit (half the prefetch).
    credit_every: usize,
}

/// What opening a partition queue gave.
pub(crate) enum Opened {
    /// Consuming, with the checkpoint committed for it.
    Consuming(Box<Part>, Option<Checkpoint>),
    /// Another instance reads the queue with an exclusive consumer (the queue has no
    /// single active consumer): try again later.
    Busy(EngineError),
}

impl Part {
    /// Declares queue `queue` (partition `index`) and its checkpoint queue on a new channel
    /// of `conn`, reads the committed position and starts consuming from it.
    pub(crate) async fn open(
        conn: &Connection,
        cfg: &AmqpConfig,
        queue: String,
        index: u32,
    ) -> Result<Opened> {
        let (ch, exclusive) = topology::declare_consumed_topic(conn, cfg, &queue).await?;
        let ckpt_queue = topology::declare_checkpoint_queue(&ch, cfg, &queue).await?;
        let topic = topology::topic_of(&queue, index, cfg.partitions);
        let stored = CheckpointQueue::new(&ch, ckpt_queue, topic, cfg.partitions)
            .newest()
            .await?;
        if index == 0 && stored.is_none() {
            // Nothing committed under this layout yet: was the topic read under the other?
            topology::check_layout(conn, topic, cfg.partitions).await?;
        }
        ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("setting the prefetch (basic.qos)", &e))?;
        ch.tx_select()
            .await
            .map_err(|e| amqp_error("selecting transactions (tx.select)", &e))?;
        let stream = cfg.queue_type == QueueType::Stream;
        let mut args = FieldTable::default();
        if stream {
            let from = match stored {
                Some((pos, _)) => AMQPValue::LongLongInt(pos as i64),
                None => AMQPValue::LongString(cfg.stream_offset.as_str().into()),
            };
            args.insert(STREAM_OFFSET.into(), from);
        }
        let consumed = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    exclusive,
                    ..Default::default()
                },
                args,
            )
            .await;
        let consumer = match consumed {
            Ok(c) => c,
            Err(e) if exclusive && e.to_string().contains("exclusive") => {
                // Another instance reads the queue: wait for it, as a standby.
                return Ok(Opened::Busy(EngineError::backend(
                    BACKEND,
                    format!(
                        "queue `{queue}` is read by another consumer (exclusively, as the queue has no single active consumer); retrying"
                    ),
                    true,
                )));
            }
            Err(e) => return Err(amqp_error(&format!("consuming queue `{queue}`"), &e)),
        };
        tracing::debug!(queue, partition = index, committed = ?stored, "RabbitMQ source consuming");
        let part = Part {
            index,
            topic: topic.to_string(),
            partitions: cfg.partitions,
            queue,
            ch,
            consumer,
            stream,
            next_offset: stored.map_or(0, |(p, _)| p),
            unacked: VecDeque::new(),
            standing_by: (!stream).then_some(stored.map(|(p, _)| p)),
            ready: u32::MAX,
            since_commit: 0,
            credit_every: (cfg.prefetch as usize / 2).max(1),
        };
        Ok(Opened::Consuming(Box::new(part), stored.map(|(_, cp)| cp)))
    }

    /// Polls the consumer once.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<lapin::Result<Delivery>>> {
        Pin::new(&mut self.consumer).poll_next(cx)
    }

    /// Called before numbering the first deliveries: if this consumer stood by and another
    /// one committed since it read the checkpoint, number from that commit and return its
    /// checkpoint (to hand to the engine before the deliveries).
    pub(crate) async fn took_over(&mut self, conn: &Connection) -> Result<Option<Checkpoint>> {
        let Some(read) = self.standing_by.take() else {
            return Ok(None);
        };
        tracing::info!(queue = %self.queue, partition = self.index, "RabbitMQ source is the active consumer of the partition queue");
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", &e))?;
        let ckpt = topology::checkpoint_queue(&self.queue);
        let stored = CheckpointQueue::new(&ch, ckpt, &self.topic, self.partitions)
            .newest()
            .await;
        let _ = ch.close(200, "checkpoint read".into()).await;
        let Some((pos, cp)) = stored? else {
            return Ok(None);
        };
        if Some(pos) == read {
            return Ok(None);
        }
        tracing::info!(queue = %self.queue, partition = self.index, from = ?read, to = pos, "RabbitMQ source became the active consumer; resuming from the last commit of the one before");
        self.next_offset = pos;
        Ok(Some(cp))
    }

    /// A delivery as a record of this partition, numbered.
    pub(crate) fn record(&mut self, d: Delivery) -> Record {
        let tag = d.delivery_tag;
        let (mut rec, stream_offset) = to_record(d);
        let offset = match stream_offset {
            Some(o) if self.stream => o,
            _ => self.next_offset,
        };
        self.next_offset = offset + 1;
        self.since_commit += 1;
        self.unacked.push_back((offset, tag));
        rec.position = Position {
            partition: self.index,
            offset,
        };
        rec
    }

    /// Streams: acks what was received once half the prefetch is unacked. A stream keeps
    /// its records whatever is acked (an ack only grants the consumer credit for more),
    /// and a restart starts at the stream offset committed in the checkpoint, so an open
    /// window need not hold its deliveries unacked: windows are not bounded by `prefetch`.
    /// The channel is transactional, so the acks are committed at once.
    pub(crate) async fn grant_credit(&mut self) -> std::result::Result<(), lapin::Error> {
        if !self.stream || self.unacked.len() < self.credit_every {
            return Ok(());
        }
        let Some(&(_, tag)) = self.unacked.back() else {
            return Ok(());
        };
        self.ch
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
        self.ch.tx_commit().await?;
        self.unacked.clear();
        Ok(())
    }

    /// Asks the broker how many messages wait in the queue (after a receive that waited in
    /// vain: a consumer standing by, or one out of prefetch credit, sees them here).
    pub(crate) async fn check_backlog(&mut self) -> std::result::Result<(), lapin::Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .ch
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await?;
        self.ready = q.message_count();
        Ok(())
    }

    /// Acks (`multiple`) every delivery below `pos` and stores `pos` with `cp` in the
    /// checkpoint queue, in one AMQP transaction.
    pub(crate) async fn commit(&mut self, pos: Position, cp: Checkpoint) -> Result<()> {
        let upto = self.unacked.partition_point(|&(o, _)| o < pos.offset);
        let ckpt = topology::checkpoint_queue(&self.queue);
        let store = CheckpointQueue::new(&self.ch, ckpt, &self.topic, self.partitions);
        if upto > 0 {
            let tag = self.unacked[upto - 1].1;
            store
                .ch
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| amqp_error("acknowledging deliveries", &e))?;
        }
        // `save` publishes the checkpoint and commits the transaction, acks included.
        let committed = Committed::at(
            Position {
                partition: 0,
                offset: pos.offset,
            },
            cp,
        );
        store.save(&[committed]).await?;
        self.unacked.drain(..upto);
        Ok(())
    }

    /// Stops consuming: closing the channel hands its unacked deliveries back to the queue
    /// (in their order) and lets the next consumer in line become active.
    pub(crate) async fn close(self, why: &str) {
        let _ = self.ch.close(200, why.into()).await;
    }
}
