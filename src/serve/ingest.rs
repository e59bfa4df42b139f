//! `POST /track`: validating events against the pipeline's schema and publishing them to
//! its source topic through one producer task that batches concurrent requests.
//!
//! Memory stays bounded: at most `[serve] queue` events wait for the broker (a semaphore of
//! that many permits); a request that finds no room is answered 503 at once, and one whose
//! broker has not acknowledged within `publish_timeout` gets 503 too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use weir_engine::config::PipelineConfig;
use weir_engine::decode::{Decoded, Decoder, Val};
use weir_engine::{OutRecord, Sink};

/// Most events sent to the broker in one batch.
const MAX_BATCH: usize = 4096;

/// Why an ingest request was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// The event (or the batch's body) is invalid: every problem.
    Invalid(Vec<String>),
    /// Events of a batch do not match the schema: per invalid event, its index and problems.
    InvalidEvents(Vec<(usize, Vec<String>)>),
    /// The broker is down, slow or the queue is full: try again later.
    Unavailable(String),
}

/// Counters of the ingest API, for `/metrics`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Events acknowledged by the broker.
    pub accepted: AtomicU64,
    /// Requests refused as invalid (422).
    pub invalid: AtomicU64,
    /// Requests refused with 503.
    pub unavailable: AtomicU64,
}

struct Pending {
    records: Vec<OutRecord>,
    done: oneshot::Sender<Result<(), String>>,
    _permit: OwnedSemaphorePermit,
}

/// The validating publisher behind `POST /track` and `POST /track/batch`.
pub struct Ingest {
    decoder: Decoder,
    /// The `group_by` fields and their decoder slots: echoed in answers, the first keys
    /// the record (as `weir produce` does) so one user's events stay in one partition.
    keys: Vec<(String, usize)>,
    tx: mpsc::UnboundedSender<Pending>,
    room: Arc<Semaphore>,
    queue: usize,
    timeout: Duration,
    /// What was accepted and refused.
    pub stats: IngestStats,
}

/// What an accepted event reports back: its `group_by` fields as JSON members.
pub type KeyFields = serde_json::Map<String, serde_json::Value>;

impl Ingest {
    /// Starts the producer task that publishes to `sink` until `stop`.
    pub fn start(c: &PipelineConfig, sink: Box<dyn Sink>, stop: CancellationToken) -> Self {
        let mut decoder = Decoder::new(&c.schema, &c.time, c.source.max_payload_bytes);
        let keys = c
            .aggregate
            .group_by
            .iter()
            .map(|f| (f.clone(), decoder.want(f)))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(sink, rx, c.serve.publish_timeout, stop));
        Ingest {
            decoder,
            keys,
            tx,
            room: Arc::new(Semaphore::new(c.serve.queue)),
            queue: c.serve.queue,
            timeout: c.serve.publish_timeout,
            stats: IngestStats::default(),
        }
    }

    /// Validates one event and publishes it; returns its key fields once acknowledged.
    pub async fn track(&self, body: &[u8]) -> Result<KeyFields, Refused> {
        // A copy: the request's bytes may be a slice of a much larger read buffer, which a
        // record kept by the broker would keep alive whole.
        let (record, fields) = match self.decoder.check(body) {
            Ok(ev) => (
                self.record(&ev, Bytes::copy_from_slice(body)),
                self.key_fields(&ev),
            ),
            Err(problems) => return Err(self.invalid(Refused::Invalid(problems))),
        };
        self.publish(vec![record]).await.map(|()| fields)
    }

    /// Validates a JSON array of events and publishes all of them, or none if any is
    /// invalid; returns how many were acknowledged.
    pub async fn track_batch(&self, body: &[u8]) -> Result<usize, Refused> {
        let events: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(body).map_err(|e| {
                let why = format!("expected a JSON array of events: {e}");
                self.invalid(Refused::Invalid(vec![why]))
            })?;
        let mut records = Vec::with_capacity(events.len());
        let mut problems = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let payload = ev.get().as_bytes();
            match self.decoder.check(payload) {
                Ok(d) => records.push(self.record(&d, Bytes::copy_from_slice(payload))),
                Err(p) => problems.push((i, p)),
            }
        }
        if !problems.is_empty() {
            return Err(self.invalid(Refused::InvalidEvents(problems)));
        }
        let n = records.len();
        if n > 0 {
            self.publish(records).await?;
        }
        Ok(n)
    }

    /// Events waiting for the broker's acknowledgement now.
    pub fn queued(&self) -> usize {
        self.queue - self.room.available_permits().min(self.queue)
    }

    fn invalid(&self, why: Refused) -> Refused {
        self.stats.invalid.fetch_add(1, Ordering::Relaxed);
        why
    }

    fn unavailable(&self, why: String) -> Refused {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Refused::Unavailable(why)
    }

    fn record(&self, ev: &Decoded<'_>, payload: Bytes) -> OutRecord {
        let key = self
            .keys
            .first()
            .and_then(|(_, slot)| match &ev.values[*slot] {
                Val::Str(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
                Val::Missing | Val::Null => None,
                v => {
                    let mut k = Vec::new();
                    v.write_json(&mut k);
                    Some(k.into())
                }
            });
        OutRecord {
            key,
            payload,
            ..Default::default()
        }
    }

    fn key_fields(&self, ev: &Decoded<'_>) -> KeyFields {
        let mut m = KeyFields::new();
        for (name, slot) in &self.keys {
            let v = match &ev.values[*slot] {
                Val::Str(s) => serde_json::Value::String(s.to_string()),
                Val::Int(i) => (*i).into(),
                Val::Float(f) => {
                    serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
                }
                Val::Bool(b) => (*b).into(),
                _ => serde_json::Value::Null,
            };
            m.insert(name.clone(), v);
        }
        m
    }

    async fn publish(&self, records: Vec<OutRecord>) -> Result<(), Refused> {
        let n = records.len();
        let permit = u32::try_from(n)
            .ok()
            .filter(|_| n <= self.queue)
            .and_then(|k| self.room.clone().try_acquire_many_owned(k).ok());
        let Some(permit) = permit else {
            return Err(self.unavailable(format!(
                "the queue to the broker is full ({} events wait for its acknowledgement); retry later",
                self.queued()
            )));
        };
        let (done, ack) = oneshot::channel();
        let pending = Pending {
            records,
            done,
            _permit: permit,
        };
        if self.tx.send(pending).is_err() {
            return Err(self.unavailable("the server is shutting down".into()));
        }
        match tokio::time::timeout(self.timeout, ack).await {
            Ok(Ok(Ok(()))) => {
                self.stats.accepted.fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(self.unavailable(e)),
            Ok(Err(_)) => Err(self.unavailable("the server is shutting down".into())),
            Err(_) => Err(self.unavailable(format!(
                "the broker did not acknowledge within {:?}",
                self.timeout
            ))),
        }
    }
}

/// The producer task: takes what requests queued, sends it as one batch, answers each.
async fn publish(
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        let mut jobs = vec![first];
        let mut n = jobs[0].records.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.records.len();
                    jobs.push(p);
                }
                Err(_) => break,
            }
        }
        batch.clear();
        for j in &mut jobs {
            batch.append(&mut j.records);
        }
        let result = match tokio::time::timeout(timeout, sink.send(&batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(topic = sink.name(), error = %e, "ingest: the broker refused a batch");
                Err(format!("the broker refused the events: {e}"))
            }
            Err(_) => {
                let within = weir_engine::time::human(timeout);
                tracing::warn!(
                    topic = sink.name(),
                    timeout = %within,
                    "ingest: no acknowledgement from the broker"
                );
                Err(format!("the broker did not acknowledge within {within}"))
            }
        };
        for j in jobs {
            let _ = j.done.send(result.clone());
        }
    }
}
