//! The RabbitMQ source's [`CheckpointStore`]: queue `weir.checkpoint.<topic>`, one
//! message per commit (`weir-amqp1:<next offset>:<checkpoint>;partitions=<N>`), published
//! on the consumer's transactional channel so a commit's acks and its checkpoint are one
//! AMQP transaction. `N` is the `partitions` setting it was committed under: a checkpoint
//! read under another setting stops the source (see [`partitions_changed`]).

use async_trait::async_trait;
use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, EngineError, Result};

use crate::error::{amqp_error, BACKEND};

const CHECKPOINT_PREFIX: &str = "weir-amqp1:";

/// What follows the checkpoint: the `partitions` setting it was committed under.
const PARTITIONS: &str = ";partitions=";

/// The error for a topic read with `partitions = now` whose checkpoints (in `queue`) were
/// committed with `then`.
pub(crate) fn partitions_changed(topic: &str, queue: &str, then: u32, now: u32) -> EngineError {
    EngineError::backend(
        BACKEND,
        format!(
            "topic `{topic}` is read with brokers.amqp.partitions = {now}, but its checkpoints were committed with {then} (queue `{queue}`): records of one key would now go to another queue than before, so windows open across the change would be counted in pieces, and records left in queues of the old layout would never be read. Weir stops rather than emit partial counts. Drain the topic with the old setting (`weir run --exit-when-idle`), then delete its `weir.checkpoint.{topic}*` queues; or use a new topic"
        ),
        false,
    )
}

/// The checkpoint queue of one topic, read and written on `ch`.
#[derive(Debug)]
pub(crate) struct CheckpointQueue {
    pub(crate) ch: Channel,
    queue: String,
    /// The topic and its `partitions` setting now.
    topic: String,
    partitions: u32,
}

impl CheckpointQueue {
    /// The store of `queue` on `ch` (a clone of the channel handle), for a partition of
    /// `topic` read with `partitions`.
    pub(crate) fn new(ch: &Channel, queue: String, topic: &str, partitions: u32) -> Self {
        CheckpointQueue {
            ch: ch.clone(),
            queue,
            topic: topic.to_string(),
            partitions,
        }
    }

    /// The newest `(position, checkpoint)` in the queue, left in place. One committed
    /// under another `partitions` setting is an error.
    pub(crate) async fn newest(&self) -> Result<Option<(u64, Checkpoint)>> {
        let queue = self.queue.as_str();
        let got = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| amqp_error(&format!("reading checkpoint queue `{queue}`"), &e))?;
        let Some(msg) = got else { return Ok(None) };
        let parsed = parse_checkpoint(&msg.delivery.data);
        self.ch
            .basic_reject(
                msg.delivery.delivery_tag,
                BasicRejectOptions { requeue: true },
            )
            .await
            .map_err(|e| amqp_error(&format!("returning the checkpoint to `{queue}`"), &e))?;
        match parsed {
            None => {
                tracing::warn!(queue, "ignoring an unreadable checkpoint message");
                Ok(None)
            }
            Some((_, _, Some(then))) if then != self.partitions => Err(partitions_changed(
                &self.topic,
                queue,
                then,
                self.partitions,
            )),
            Some((pos, cp, _)) => Ok(Some((pos, cp))),
        }
    }
}

#[async_trait]
impl CheckpointStore for CheckpointQueue {
    /// The newest commit, as partition 0 (a queue is one partition).
    async fn load(&self, _partitions: Option<&[u32]>) -> Result<Vec<Committed>> {
        Ok(self
            .newest()
            .await?
            .map(|(offset, cp)| Committed {
                partition: 0,
                offset: Some(offset),
                checkpoint: Some(cp),
                ..Committed::default()
            })
            .into_iter()
            .collect())
    }

    /// Publishes the last commit of partition 0 and commits the channel's transaction,
    /// with the acks made on the channel since the last one.
    async fn save(&self, commits: &[Committed]) -> Result<()> {
        let Some((offset, cp)) = commits
            .iter()
            .rev()
            .find(|c| c.partition == 0)
            .and_then(|c| Some((c.offset?, c.checkpoint?)))
        else {
            return Ok(());
        };
        let payload = encode_checkpoint(offset, &cp, self.partitions);
        let committed: std::result::Result<(), lapin::Error> = async {
            self.ch
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    payload.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            self.ch.tx_commit().await
        }
        .await;
        committed.map_err(|e| amqp_error(&format!("committing to `{}`", self.queue), &e))
    }
}

fn encode_checkpoint(position: u64, cp: &Checkpoint, partitions: u32) -> String {
    format!(
        "{CHECKPOINT_PREFIX}{position}:{}{PARTITIONS}{partitions}",
        cp.encode()
    )
}

/// A checkpoint message: position, checkpoint and the `partitions` setting it was
/// committed under (`None` in messages written before it was recorded).
fn parse_checkpoint(data: &[u8]) -> Option<(u64, Checkpoint, Option<u32>)> {
    let s = std::str::from_utf8(data)
        .ok()?
        .strip_prefix(CHECKPOINT_PREFIX)?;
    let (pos, rest) = s.split_once(':')?;
    let (cp, n) = match rest.split_once(PARTITIONS) {
        Some((cp, n)) => (cp, Some(n.parse().ok()?)),
        None => (rest, None),
    };
    Some((pos.parse().ok()?, Checkpoint::decode(cp)?, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip() {
        let cp = Checkpoint {
            watermark: -5,
            processed: 42,
        };
        let s = encode_checkpoint(40, &cp, 4);
        assert_eq!(parse_checkpoint(s.as_bytes()), Some((40, cp, Some(4))));
        // Written before the setting was recorded.
        assert_eq!(
            parse_checkpoint(b"weir-amqp1:40:weir1:-5:42"),
            Some((40, cp, None))
        );
        assert_eq!(parse_checkpoint(b"weir-amqp1:x:weir1:1:2"), None);
        assert!(!partitions_changed("t", "q", 4, 6).is_retryable());
    }
}
