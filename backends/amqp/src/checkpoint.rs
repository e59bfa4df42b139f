//! The RabbitMQ source's [`CheckpointStore`]: queue `weir.checkpoint.<topic>`, one
//! message per commit (`weir-amqp1:<next offset>:<checkpoint>`), published on the
//! consumer's transactional channel so a commit's acks and its checkpoint are one AMQP
//! transaction.

use async_trait::async_trait;
use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};
use weir_engine::checkpoint_store::{CheckpointStore, Committed};
use weir_engine::{Checkpoint, Result};

use crate::error::amqp_error;

const CHECKPOINT_PREFIX: &str = "weir-amqp1:";

/// The checkpoint queue of one topic, read and written on `ch`.
#[derive(Debug)]
pub(crate) struct CheckpointQueue {
    pub(crate) ch: Channel,
    queue: String,
}

impl CheckpointQueue {
    /// The store of `queue` on `ch` (a clone of the channel handle).
    pub(crate) fn new(ch: &Channel, queue: String) -> Self {
        CheckpointQueue {
            ch: ch.clone(),
            queue,
        }
    }

    /// The newest `(position, checkpoint)` in the queue, left in place.
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
        if parsed.is_none() {
            tracing::warn!(queue, "ignoring an unreadable checkpoint message");
        }
        Ok(parsed)
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
        let payload = encode_checkpoint(offset, &cp);
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

fn encode_checkpoint(position: u64, cp: &Checkpoint) -> String {
    format!("{CHECKPOINT_PREFIX}{position}:{}", cp.encode())
}

fn parse_checkpoint(data: &[u8]) -> Option<(u64, Checkpoint)> {
    let s = std::str::from_utf8(data)
        .ok()?
        .strip_prefix(CHECKPOINT_PREFIX)?;
    let (pos, cp) = s.split_once(':')?;
    Some((pos.parse().ok()?, Checkpoint::decode(cp)?))
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
        let s = encode_checkpoint(40, &cp);
        assert_eq!(parse_checkpoint(s.as_bytes()), Some((40, cp)));
        assert_eq!(parse_checkpoint(b"weir-amqp1:x:weir1:1:2"), None);
    }
}
