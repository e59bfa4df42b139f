//! The retry topic: records a stage cannot handle *yet* are sent there with their attempt
//! count, a not-before time and the history of their failures, and come back into the
//! pipeline once their time has come.
//!
//! A retry record's payload is an envelope (JSON) that carries the original key, payload,
//! broker timestamp and source position, so it works on brokers without headers (Kinesis).
//! [`WithRetries`] reads the source topic and the retry topic as one source: retry
//! partitions appear as partition [`RETRY_PARTITION_BASE`]` + n`, their records are held
//! until due, and they never move the watermark (a retried event keeps its own event time).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{EngineError, Result};
use crate::output::{base64, dead_letter_from};
use crate::record::{Checkpoint, OutRecord, Position, Record};
use crate::sink::Sink;
use crate::source::{Received, Source};

/// Retry-topic partitions are numbered from here in the merged source.
pub const RETRY_PARTITION_BASE: u32 = 16_384;
/// Header on a record read back from the retry topic: its retry metadata (JSON).
pub const HEADER_RETRY: &str = "weir.retry";
/// How often the retry topic is polled while the source topic keeps the pipeline busy.
const RETRY_POLL: Duration = Duration::from_millis(100);
/// Most retry records held in memory waiting for their time; the retry topic is not read
/// further while this many wait.
const MAX_HELD: usize = 100_000;

/// `[retry]`: where recoverable failures go and when they come back.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// The retry topic.
    pub topic: String,
    /// Delay before the first retry.
    pub initial: Duration,
    /// Each further retry waits this many times longer.
    pub multiplier: f64,
    /// The longest delay.
    pub max: Duration,
    /// Processing attempts in all (the first one included) before the record goes to the
    /// dead letters.
    pub max_attempts: u32,
}

impl RetryConfig {
    /// The delay before retry number `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let f = self.multiplier.powi(n.saturating_sub(1).min(1_000) as i32);
        let ms = (self.initial.as_millis() as f64 * f).min(self.max.as_millis() as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// For a record that failed at `stage` with `reason`: its retry record, or, once it used
    /// up `max_attempts`, its dead letter with the history of its attempts.
    pub(crate) fn next(
        &self,
        topic: &str,
        rec: &Record,
        stage: &str,
        reason: &str,
        now_ms: i64,
    ) -> std::result::Result<OutRecord, OutRecord> {
        let mut meta = meta(rec).unwrap_or_else(|| Meta {
            retries: 0,
            source: SourceRef {
                topic: topic.to_string(),
                partition: rec.position.partition,
                offset: rec.position.offset,
            },
            history: Vec::new(),
        });
        let attempt = meta.retries + 1;
        meta.history.push(AttemptLog {
            attempt,
            at: crate::time::format_rfc3339(now_ms),
            stage: stage.to_string(),
            error: reason.to_string(),
        });
        if attempt >= self.max_attempts {
            return Err(dead_letter_from(
                &meta.source.topic,
                meta.source.partition,
                meta.source.offset,
                rec,
                &format!("gave up after {attempt} attempts: {reason}"),
                serde_json::to_value(&meta.history).ok(),
            ));
        }
        meta.retries = attempt;
        let not_before = now_ms.saturating_add(self.delay(attempt).as_millis() as i64);
        let (key, payload, encoding) = match (
            rec.key.as_deref().map(std::str::from_utf8).transpose(),
            std::str::from_utf8(&rec.payload),
        ) {
            (Ok(k), Ok(p)) => (k.map(str::to_string), p.to_string(), None),
            _ => (
                rec.key.as_deref().map(base64),
                base64(&rec.payload),
                Some("base64".to_string()),
            ),
        };
        let env = Envelope {
            meta,
            not_before,
            key,
            timestamp: rec.timestamp,
            payload,
            encoding,
        };
        Ok(OutRecord {
            key: rec.key.clone(),
            payload: Bytes::from(serde_json::to_vec(&env).unwrap_or_default()),
            headers: rec
                .headers
                .iter()
                .filter(|(n, _)| n != HEADER_RETRY)
                .cloned()
                .collect(),
            timestamp: rec.timestamp,
        })
    }
}

/// The source partition a retried record first came from, if it is a retry envelope.
pub(crate) fn origin_partition(rec: &Record) -> Option<u32> {
    meta(rec).map(|m| m.source.partition)
}

/// How many times `rec` went through the retry topic before.
pub fn attempts(rec: &Record) -> u32 {
    meta(rec).map_or(0, |m| m.retries)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SourceRef {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AttemptLog {
    attempt: u32,
    at: String,
    stage: String,
    error: String,
}

/// What a retried record carries: how often it was retried, where it first came from, and
/// every failure so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) retries: u32,
    pub(crate) source: SourceRef,
    pub(crate) history: Vec<AttemptLog>,
}

impl Meta {
    pub(crate) fn history_json(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.history).ok()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    meta: Meta,
    not_before: i64,
    key: Option<String>,
    timestamp: Option<i64>,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
}

/// The retry metadata of a record read back from the retry topic.
pub(crate) fn meta(rec: &Record) -> Option<Meta> {
    if rec.headers.is_empty() {
        return None;
    }
    let (_, v) = rec.headers.iter().find(|(n, _)| n == HEADER_RETRY)?;
    serde_json::from_slice(v).ok()
}

/// Turns a retry-topic record back into the record that failed (with its metadata in the
/// [`HEADER_RETRY`] header) and its not-before time. A record that is not an envelope is
/// passed on as it is, due at once.
fn unwrap(mut rec: Record) -> (i64, Record) {
    let Ok(env) = serde_json::from_slice::<Envelope>(&rec.payload) else {
        return (i64::MIN, rec);
    };
    let b64 = env.encoding.as_deref() == Some("base64");
    let bytes = |s: String| -> Option<Bytes> {
        if b64 {
            unbase64(&s).map(Bytes::from)
        } else {
            Some(Bytes::from(s))
        }
    };
    let (Some(payload), key) = (bytes(env.payload), env.key.map(bytes)) else {
        return (i64::MIN, rec);
    };
    rec.payload = payload;
    rec.key = key.flatten().or(rec.key);
    rec.timestamp = env.timestamp;
    rec.headers.retain(|(n, _)| n != HEADER_RETRY);
    rec.headers.push((
        HEADER_RETRY.into(),
        Bytes::from(serde_json::to_vec(&env.meta).unwrap_or_default()),
    ));
    (env.not_before, rec)
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

struct Held {
    due: i64,
    seq: u64,
    rec: Record,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// The source topic and the retry topic read as one source (see the module docs).
pub struct WithRetries {
    main: Box<dyn Source>,
    retry: Box<dyn Source>,
    held: BinaryHeap<Reverse<Held>>,
    seq: u64,
    ctrl: VecDeque<Received>,
    next_poll: Instant,
    main_ended: bool,
    retry_drained: bool,
    /// Retry records the pipeline submitted to the retry topic (see [`RetrySink`]).
    sent: Option<Arc<AtomicU64>>,
    /// Retry records read back from the retry topic.
    read_back: u64,
}

/// The retry topic's sink, counting what it was given so that [`WithRetries`] knows
/// whether retries are still on their way when the source topic ends (`--input`): the
/// pipeline then runs until every retry has come back and reached its end (counted in a
/// window, late, or a dead letter after `max_attempts`), instead of ending with retries
/// still in the topic.
pub struct RetrySink {
    inner: Box<dyn Sink>,
    sent: Arc<AtomicU64>,
}

impl RetrySink {
    /// Wraps the retry topic's sink; give [`counter`](Self::counter) to
    /// [`WithRetries::awaiting`].
    pub fn new(inner: Box<dyn Sink>) -> Self {
        RetrySink {
            inner,
            sent: Arc::default(),
        }
    }

    /// How many retry records were submitted so far.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }
}

#[async_trait]
impl Sink for RetrySink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.inner.send(batch).await?;
        self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn submit(&mut self, batch: &[OutRecord]) -> Result<()> {
        self.inner.submit(batch).await?;
        self.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.inner.flush().await
    }
}

impl WithRetries {
    /// Reads `main` and, held until due, the records of `retry`.
    pub fn new(main: Box<dyn Source>, retry: Box<dyn Source>) -> Self {
        WithRetries {
            main,
            retry,
            held: BinaryHeap::new(),
            seq: 0,
            ctrl: VecDeque::new(),
            next_poll: Instant::now(),
            main_ended: false,
            retry_drained: false,
            sent: None,
            read_back: 0,
        }
    }

    /// When the source topic ends, keeps reading the retry topic until as many retry
    /// records came back as `sent` counts (the counter of the pipeline's [`RetrySink`]).
    /// Without it the merged source ends once the retry topic looks drained.
    pub fn awaiting(mut self, sent: Arc<AtomicU64>) -> Self {
        self.sent = Some(sent);
        self
    }

    /// Retry records submitted but not read back yet.
    fn in_flight(&self) -> u64 {
        self.sent.as_ref().map_or(0, |s| {
            s.load(Ordering::Relaxed).saturating_sub(self.read_back)
        })
    }

    fn min_held_offset(&self, partition: u32) -> Option<u64> {
        self.held
            .iter()
            .filter(|h| h.0.rec.position.partition == partition)
            .map(|h| h.0.rec.position.offset)
            .min()
    }

    async fn poll_retry(&mut self, max: usize) -> Result<Option<Received>> {
        self.next_poll = Instant::now() + RETRY_POLL;
        if self.held.len() >= MAX_HELD {
            return Ok(None);
        }
        match self.retry.recv(max, Duration::ZERO).await? {
            Received::Batch(b) => {
                self.retry_drained = b.is_empty();
                self.read_back += b.len() as u64;
                for mut r in b {
                    r.position.partition += RETRY_PARTITION_BASE;
                    let (due, rec) = unwrap(r);
                    self.seq += 1;
                    self.held.push(Reverse(Held {
                        due,
                        seq: self.seq,
                        rec,
                    }));
                }
                Ok(None)
            }
            Received::End => {
                self.retry_drained = true;
                Ok(None)
            }
            Received::Assigned(parts) => Ok(Some(Received::Assigned(
                parts
                    .into_iter()
                    .map(|(p, cp)| (p + RETRY_PARTITION_BASE, cp))
                    .collect(),
            ))),
            Received::Revoked(parts) => {
                let shifted: Vec<u32> = parts.iter().map(|p| p + RETRY_PARTITION_BASE).collect();
                let held = std::mem::take(&mut self.held);
                self.held = held
                    .into_iter()
                    .filter(|h| !shifted.contains(&h.0.rec.position.partition))
                    .collect();
                Ok(Some(Received::Revoked(shifted)))
            }
        }
    }
}

#[async_trait]
impl Source for WithRetries {
    fn topic(&self) -> &str {
        self.main.topic()
    }

    fn recycle(&mut self, batch: Vec<Record>) {
        self.main.recycle(batch);
    }

    fn has_backlog(&self, partition: u32) -> bool {
        partition < RETRY_PARTITION_BASE && self.main.has_backlog(partition)
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if let Some(c) = self.ctrl.pop_front() {
            return Ok(c);
        }
        if Instant::now() >= self.next_poll {
            if let Some(c) = self.poll_retry(max).await? {
                return Ok(c);
            }
        }
        let now_ms = crate::time::now_millis();
        let mut out = Vec::new();
        while out.len() < max && self.held.peek().is_some_and(|h| h.0.due <= now_ms) {
            if let Some(Reverse(h)) = self.held.pop() {
                out.push(h.rec);
            }
        }
        if self.main_ended {
            if out.is_empty() && self.held.is_empty() && self.retry_drained {
                if self.in_flight() == 0 {
                    return Ok(Received::End);
                }
                // Retries are on their way: poll for them at once.
                self.next_poll = Instant::now();
                self.retry_drained = false;
            }
            if out.is_empty() {
                tokio::time::sleep(wait.min(RETRY_POLL)).await;
            }
            return Ok(Received::Batch(out));
        }
        let main_wait = if !out.is_empty() {
            Duration::ZERO
        } else {
            let until_poll = self.next_poll.saturating_duration_since(Instant::now());
            let until_due = self
                .held
                .peek()
                .map(|h| Duration::from_millis((h.0.due - now_ms).max(0) as u64))
                .unwrap_or(wait);
            wait.min(until_poll).min(until_due)
        };
        match self.main.recv(max - out.len(), main_wait).await? {
            Received::Batch(b) => {
                if out.is_empty() {
                    return Ok(Received::Batch(b));
                }
                out.extend(b);
                Ok(Received::Batch(out))
            }
            Received::Assigned(parts)
                if parts.iter().any(|(p, _)| *p >= RETRY_PARTITION_BASE) =>
            {
                Err(EngineError::Stopped(format!(
                    "with a retry topic, source partition indexes must be below {RETRY_PARTITION_BASE}"
                )))
            }
            Received::End => {
                self.main_ended = true;
                Ok(Received::Batch(out))
            }
            c => {
                if out.is_empty() {
                    Ok(c)
                } else {
                    self.ctrl.push_back(c);
                    Ok(Received::Batch(out))
                }
            }
        }
    }

    async fn commit(&mut self, positions: &[(Position, Checkpoint)]) -> Result<()> {
        let (retry, main): (Vec<_>, Vec<_>) = positions
            .iter()
            .partition(|(p, _)| p.partition >= RETRY_PARTITION_BASE);
        if !main.is_empty() {
            self.main.commit(&main).await?;
        }
        let retry: Vec<(Position, Checkpoint)> = retry
            .into_iter()
            .map(|(p, cp)| {
                // Not past a record still held for later.
                let offset = self
                    .min_held_offset(p.partition)
                    .map_or(p.offset, |h| h.min(p.offset));
                (
                    Position {
                        partition: p.partition - RETRY_PARTITION_BASE,
                        offset,
                    },
                    cp,
                )
            })
            .collect();
        if !retry.is_empty() {
            self.retry.commit(&retry).await?;
        }
        Ok(())
    }

    fn wants_commit(&self) -> bool {
        self.main.wants_commit() || self.retry.wants_commit()
    }

    fn pending(&self) -> bool {
        !self.held.is_empty() || self.main.pending() || self.retry.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            topic: "r".into(),
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_millis(350),
            max_attempts: 3,
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_max() {
        let c = cfg();
        assert_eq!(c.delay(1), Duration::from_millis(100));
        assert_eq!(c.delay(2), Duration::from_millis(200));
        assert_eq!(c.delay(3), Duration::from_millis(350));
    }

    #[test]
    fn a_record_round_trips_through_the_envelope_and_gives_up_after_max_attempts() {
        let c = cfg();
        let rec = Record {
            key: Some(Bytes::from_static(b"k\xff")),
            payload: Bytes::from_static(b"{\"a\":1}"),
            timestamp: Some(42),
            position: Position {
                partition: 2,
                offset: 7,
            },
            ..Default::default()
        };
        let out = c.next("src", &rec, "enrich", "not yet", 1_000).unwrap();
        let (due, back) = unwrap(Record {
            payload: out.payload.clone(),
            headers: out.headers.clone(),
            position: Position {
                partition: RETRY_PARTITION_BASE,
                offset: 0,
            },
            ..Default::default()
        });
        assert_eq!(due, 1_100);
        assert_eq!(back.payload, rec.payload);
        assert_eq!(back.key, rec.key);
        assert_eq!(back.timestamp, Some(42));
        assert_eq!(attempts(&back), 1);
        let out2 = c.next("src", &back, "enrich", "still not", 2_000).unwrap();
        let (due2, back2) = unwrap(Record {
            payload: out2.payload,
            ..Default::default()
        });
        assert_eq!(due2, 2_200);
        let dead = c.next("src", &back2, "enrich", "never", 3_000).unwrap_err();
        let v: serde_json::Value = serde_json::from_slice(&dead.payload).unwrap();
        assert_eq!(v["error"], "gave up after 3 attempts: never");
        assert_eq!(v["source"]["topic"], "src");
        assert_eq!(v["source"]["partition"], 2);
        assert_eq!(v["source"]["offset"], 7);
        assert_eq!(v["attempts"].as_array().unwrap().len(), 3);
        assert_eq!(v["attempts"][0]["error"], "not yet");
        assert_eq!(v["payload"], "{\"a\":1}");
    }

    #[test]
    fn base64_round_trips() {
        for s in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\x00\xff\x10"] {
            assert_eq!(unbase64(&base64(s)).unwrap(), s);
        }
    }
}
