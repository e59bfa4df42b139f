//! A shard reader: a task of its own chaining GetShardIterator and GetRecords, sending
//! what it reads to its source, retrying failures with the engine's backoff.

use std::time::Duration;

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use weir_engine::backoff::Backoff;
use weir_engine::EngineError;

use crate::error::KinesisError;

/// The delays between a reader's failed calls: 100 ms doubling up to 10 s, forever (a
/// final error stops the reader instead); a successful call starts over.
fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
}

/// One record as a reader task saw it, before the source gives it an offset.
pub(crate) struct Raw {
    pub(crate) data: Bytes,
    pub(crate) key: Bytes,
    pub(crate) sequence: String,
    pub(crate) arrival_ms: Option<i64>,
}

/// What reader tasks tell the source. Each names its shard and the reader's generation
/// (a shard leased again gets a new reader; what the old one sent is dropped).
pub(crate) enum Msg {
    /// Records of one GetRecords call, in shard order, and, if the reader caught up with
    /// the shard's end with them, when that call was made.
    Records(String, u64, Vec<Raw>, Option<Instant>),
    /// An empty GetRecords, made at that time: the reader was at the shard's end.
    CaughtUp(String, u64, Instant),
    /// The shard is closed and was read to its end.
    Ended(String, u64),
    /// A call failed; `retryable` says whether the reader keeps going.
    Failed(EngineError),
}

#[derive(Debug, Clone)]
pub(crate) enum Start {
    After(String),
    TrimHorizon,
    Latest,
    At(i64),
}

pub(crate) struct Reader {
    pub(crate) client: Client,
    pub(crate) endpoint: String,
    pub(crate) stream: String,
    pub(crate) shard: String,
    pub(crate) generation: u64,
    pub(crate) limit: i32,
    pub(crate) poll: Duration,
    pub(crate) tx: mpsc::Sender<Msg>,
}

impl Reader {
    async fn iterator(&self, start: &Start) -> std::result::Result<Option<String>, KinesisError> {
        let mut req = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard);
        req = match start {
            Start::After(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            Start::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Start::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            Start::At(ms) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
        };
        let out = req
            .send()
            .await
            .map_err(|e| KinesisError::from_sdk("GetShardIterator", &self.endpoint, e))?;
        Ok(out.shard_iterator().map(str::to_string))
    }

    /// Reports `e`; false when the reader must stop.
    async fn failed(&self, e: KinesisError, backoff: &mut Backoff) -> bool {
        let retryable = e.is_retryable();
        if matches!(e, KinesisError::Throttled { .. }) {
            tracing::debug!(shard = %self.shard, error = %e, "throttled; backing off");
        } else {
            tracing::warn!(stream = %self.stream, shard = %self.shard, error = %e, attempt = backoff.attempts() + 1, "shard reader failed; retrying with backoff");
            if self.tx.send(Msg::Failed(e.into())).await.is_err() {
                return false;
            }
        }
        if !retryable {
            return false;
        }
        if let Some(delay) = backoff.next_delay() {
            tokio::time::sleep(delay).await;
        }
        true
    }

    pub(crate) async fn run(self, mut start: Start) {
        let mut backoff = backoff();
        'outer: loop {
            let mut it = match self.iterator(&start).await {
                Ok(Some(it)) => it,
                Ok(None) => break,
                Err(e) => {
                    if self.failed(e, &mut backoff).await {
                        continue;
                    }
                    return;
                }
            };
            loop {
                let asked = Instant::now();
                let out = match self
                    .client
                    .get_records()
                    .shard_iterator(&it)
                    .limit(self.limit)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    Err(e) => {
                        let e = KinesisError::from_sdk("GetRecords", &self.endpoint, e);
                        if e.code() == Some("ExpiredIteratorException") {
                            continue 'outer;
                        }
                        if self.failed(e, &mut backoff).await {
                            continue;
                        }
                        return;
                    }
                };
                backoff = self::backoff();
                let recs = out.records();
                let n = recs.len();
                let empty = n == 0;
                if let Some(last) = recs.last() {
                    start = Start::After(last.sequence_number().to_string());
                }
                // A short read means the reader caught up (kinesalite always answers
                // MillisBehindLatest 0, so that alone is not trusted); a full one reads on
                // at once.
                let caught_up = (n < self.limit as usize
                    && out.millis_behind_latest().unwrap_or(0) == 0)
                    .then_some(asked);
                if empty {
                    if self
                        .tx
                        .send(Msg::CaughtUp(self.shard.clone(), self.generation, asked))
                        .await
                        .is_err()
                    {
                        return;
                    }
                } else {
                    let raws = recs
                        .iter()
                        .map(|r| Raw {
                            data: Bytes::from(r.data().as_ref().to_vec()),
                            key: Bytes::from(
                                r.partition_key().unwrap_or_default().as_bytes().to_vec(),
                            ),
                            sequence: r.sequence_number().to_string(),
                            arrival_ms: r
                                .approximate_arrival_timestamp()
                                .and_then(|t| t.to_millis().ok()),
                        })
                        .collect();
                    if self
                        .tx
                        .send(Msg::Records(
                            self.shard.clone(),
                            self.generation,
                            raws,
                            caught_up,
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                match out.next_shard_iterator() {
                    Some(next) => it = next.to_string(),
                    None => break 'outer,
                }
                if n < self.limit as usize {
                    tokio::time::sleep(self.poll).await;
                }
            }
        }
        let _ = self
            .tx
            .send(Msg::Ended(self.shard.clone(), self.generation))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::config::{BehaviorVersion, Region};

    fn reader(tx: mpsc::Sender<Msg>) -> Reader {
        let conf = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build();
        Reader {
            client: Client::from_conf(conf),
            endpoint: "http://127.0.0.1:1".into(),
            stream: "s".into(),
            shard: "shardId-000000000000".into(),
            generation: 0,
            limit: 10,
            poll: Duration::from_millis(10),
            tx,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_reader_backs_off_and_stops_at_a_final_error() {
        let (tx, mut rx) = mpsc::channel(8);
        let r = reader(tx);
        let mut b = backoff();
        let started = Instant::now();
        let throttled = || KinesisError::Throttled {
            op: "GetRecords",
            code: "ProvisionedThroughputExceededException".into(),
        };
        // Throttling is retried quietly: 100 ms, then 200 ms.
        assert!(r.failed(throttled(), &mut b).await);
        assert!(r.failed(throttled(), &mut b).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "throttling is not reported");
        // An unreachable endpoint is reported to the source and retried after 400 ms.
        let unreachable = KinesisError::Unreachable {
            op: "GetRecords",
            endpoint: r.endpoint.clone(),
            detail: "connection refused".into(),
        };
        assert!(r.failed(unreachable, &mut b).await);
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        match rx.try_recv() {
            Ok(Msg::Failed(e)) => assert!(e.is_retryable(), "{e}"),
            _ => panic!("the failure is reported"),
        }
        // A final error is reported and stops the reader at once.
        let gone = KinesisError::Service {
            op: "GetShardIterator",
            code: "ResourceNotFoundException".into(),
            message: "no such stream".into(),
        };
        assert!(!r.failed(gone, &mut b).await);
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        match rx.try_recv() {
            Ok(Msg::Failed(e)) => assert!(!e.is_retryable(), "{e}"),
            _ => panic!("the failure is reported"),
        }
    }
}
