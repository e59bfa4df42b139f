//! The windowed aggregation operator: decodes records, assigns them to windows, keeps
//! watermarks and says which source positions are safe to commit. Synchronous and
//! broker-agnostic; the [`runtime`](crate::runtime) drives it.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AggFn, PipelineConfig, WindowConfig};
use crate::decode::{Decoder, Schema, TimeSource, Val};
use crate::output::{dead_letter, ResultEncoder, WindowText, KEY_SEP};
use crate::record::{OutRecord, Position, Record};
use crate::window::{Pane, Watermarks, WindowKind, WindowRange, WindowStore};

/// What the pipeline computes, independent of where records come from and go.
#[derive(Debug, Clone)]
pub struct Job {
    /// What events must look like.
    pub schema: Schema,
    /// Where event time comes from.
    pub time: TimeSource,
    /// Allowed out-of-orderness (the watermark trails the highest event time by this).
    pub out_of_orderness: Duration,
    /// Window kind, grace and idle timeout.
    pub window: WindowConfig,
    /// Key fields (dotted paths).
    pub group_by: Vec<String>,
    /// Aggregates per (window, key).
    pub compute: Vec<AggFn>,
    /// Most records per batch.
    pub batch_size: usize,
    /// Larger payloads are dead-lettered.
    pub max_payload_bytes: usize,
    /// How often source positions are committed.
    pub commit_interval: Duration,
}

impl Job {
    /// The job a pipeline file describes.
    pub fn from_config(c: &PipelineConfig) -> Self {
        Job {
            schema: c.schema.clone(),
            time: c.time.clone(),
            out_of_orderness: c.out_of_orderness,
            window: c.window,
            group_by: c.aggregate.group_by.clone(),
            compute: c.aggregate.compute.clone(),
            batch_size: c.source.batch_size,
            max_payload_bytes: c.source.max_payload_bytes,
            commit_interval: c.source.commit_interval,
        }
    }

    /// A tumbling count per `key` over the event-time field `time_field`, in windows of
    /// `size`, with no schema beyond those two fields, no grace and a 5 s idle timeout.
    pub fn tumbling_count(key: &str, time_field: &str, size: Duration) -> Self {
        Job {
            schema: Schema::default(),
            time: TimeSource::Field {
                path: time_field.into(),
                format: crate::time::TimeFormat::Auto,
            },
            out_of_orderness: Duration::ZERO,
            window: WindowConfig {
                kind: WindowKind::Tumbling {
                    size: size.as_millis().max(1) as i64,
                },
                grace: Duration::ZERO,
                idle_timeout: Duration::from_secs(5),
            },
            group_by: vec![key.into()],
            compute: vec![AggFn::Count],
            batch_size: 1024,
            max_payload_bytes: 1 << 20,
            commit_interval: Duration::from_secs(1),
        }
    }

    /// The same job with a schema.
    pub fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }

    /// The same job with a grace period.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.window.grace = grace;
        self
    }

    /// The same job with an idle timeout.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.window.idle_timeout = idle;
        self
    }
}

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counted into an open window.
    Windowed,
    /// Invalid; a dead letter was produced.
    Dead,
    /// Its window had closed; a dead letter with reason `late` was produced.
    Late,
    /// A replayed record whose outcome was delivered before the restart; skipped.
    Replayed,
}

/// Per-batch output of the operator.
#[derive(Debug, Default)]
pub struct Emitted {
    /// Window results.
    pub results: Vec<OutRecord>,
    /// Dead letters (invalid and late records).
    pub dead: Vec<OutRecord>,
    /// Windows closed in this step.
    pub windows_closed: u64,
}

/// The windowed aggregation over decoded records.
#[derive(Debug)]
pub struct WindowOperator {
    decoder: Decoder,
    key_slots: Vec<(usize, String)>,
    kind: WindowKind,
    grace: i64,
    time: TimeSource,
    store: WindowStore,
    watermarks: Watermarks,
    encoder: ResultEncoder,
    /// Next offset after the last record seen, by partition.
    next_offset: Vec<Option<u64>>,
    key_buf: Vec<u8>,
    topic: String,
    /// After a restart: by partition, the offset below which records were processed before
    /// the checkpoint, and the watermark of that checkpoint.
    replay: Vec<u64>,
    replay_watermark: i64,
    replay_started: Option<Instant>,
    idle_timeout: std::time::Duration,
}

impl WindowOperator {
    /// An operator for `job`, reading records of `topic` (named in dead letters).
    pub fn new(job: &Job, topic: &str) -> Self {
        let mut decoder = Decoder::new(&job.schema, &job.time, job.max_payload_bytes);
        let key_slots = job
            .group_by
            .iter()
            .map(|k| (decoder.want(k), k.clone()))
            .collect();
        WindowOperator {
            decoder,
            key_slots,
            kind: job.window.kind,
            grace: job.window.grace.as_millis() as i64,
            time: job.time.clone(),
            store: WindowStore::new(),
            watermarks: Watermarks::new(
                job.out_of_orderness.as_millis() as i64,
                job.window.idle_timeout,
            ),
            encoder: ResultEncoder::new(&job.group_by, &job.compute),
            next_offset: Vec::new(),
            key_buf: Vec::with_capacity(64),
            topic: topic.to_string(),
            replay: Vec::new(),
            replay_watermark: i64::MIN,
            replay_started: None,
            idle_timeout: job.window.idle_timeout,
        }
    }

    /// Declares the source partitions assigned to this pipeline, with the checkpoints
    /// committed for them. Records below a checkpoint's `processed` offset are a replay:
    /// those whose window the checkpoint's watermark had closed are skipped (their results
    /// were delivered), the others are counted again, and the watermark stays at the
    /// checkpoint's until the replay is over (or its partitions go idle).
    pub fn assign(
        &mut self,
        partitions: &[(u32, Option<crate::record::Checkpoint>)],
        now: Instant,
    ) {
        let ids: Vec<u32> = partitions.iter().map(|(p, _)| *p).collect();
        self.watermarks.assign(&ids, now);
        let mut restored = None;
        for (p, cp) in partitions {
            let Some(cp) = cp else { continue };
            let i = *p as usize;
            if self.replay.len() <= i {
                self.replay.resize(i + 1, 0);
            }
            self.replay[i] = cp.processed;
            restored = Some(restored.unwrap_or(i64::MAX).min(cp.watermark));
        }
        if let Some(wm) = restored {
            self.replay_watermark = wm;
            self.replay_started = Some(now);
            self.watermarks.restore_and_hold(wm);
            tracing::info!(watermark = %crate::time::format_rfc3339(wm), "restored checkpoint; replaying uncommitted input");
        }
    }

    /// Forgets revoked partitions: their open window state is dropped uncommitted and they
    /// no longer hold the watermark.
    pub fn revoke(&mut self, partitions: &[u32]) {
        for &p in partitions {
            self.store.revoke(p);
            if let Some(n) = self.next_offset.get_mut(p as usize) {
                *n = None;
            }
            if let Some(r) = self.replay.get_mut(p as usize) {
                *r = 0;
            }
        }
        self.watermarks.revoke(partitions);
    }

    /// The checkpoint to store with a commit of `partition`.
    pub fn checkpoint(&self, partition: u32) -> crate::record::Checkpoint {
        crate::record::Checkpoint {
            watermark: if self.watermarks.is_held() {
                self.replay_watermark
            } else {
                self.watermarks.current()
            },
            processed: self
                .next_offset
                .get(partition as usize)
                .copied()
                .flatten()
                .unwrap_or(0)
                .max(self.replay.get(partition as usize).copied().unwrap_or(0)),
        }
    }

    fn end_replay_if_done(&mut self, now: Instant) {
        if !self.watermarks.is_held() {
            return;
        }
        let pending = self.replay.iter().enumerate().any(|(p, &until)| {
            until > 0 && self.next_offset.get(p).copied().flatten().unwrap_or(0) < until
        });
        let timed_out = self.replay_started.is_some_and(|t| {
            now.duration_since(t) >= self.idle_timeout
                && self.next_idle_deadline().is_none_or(|d| d <= now)
        });
        if !pending || timed_out {
            self.replay.clear();
            self.replay_started = None;
            self.watermarks.release();
            tracing::info!("replay finished");
        }
    }

    /// Handles one record; dead letters go to `dead`. `now_ms` is the wall clock used for
    /// processing-time windows.
    #[inline]
    pub fn ingest(
        &mut self,
        rec: &Record,
        now: Instant,
        now_ms: i64,
        dead: &mut Vec<OutRecord>,
    ) -> Outcome {
        self.note_position(rec, now);
        let p = rec.position.partition as usize;
        let replaying = self
            .replay
            .get(p)
            .is_some_and(|&until| rec.position.offset < until);
        // Dead letters of replayed records were delivered before the checkpoint.
        let mut replay_sink = Vec::new();
        let dead = if replaying { &mut replay_sink } else { dead };

        let ev = match self.decoder.decode(&rec.payload) {
            Ok(ev) => ev,
            Err(reason) => {
                dead.push(dead_letter(&self.topic, rec, &reason));
                return if replaying {
                    Outcome::Replayed
                } else {
                    Outcome::Dead
                };
            }
        };
        let t = match (&self.time, ev.time) {
            (TimeSource::Field { .. }, Some(t)) => t,
            (TimeSource::Broker, _) => match rec.timestamp {
                Some(t) => t,
                None => {
                    dead.push(dead_letter(
                        &self.topic,
                        rec,
                        "record has no broker timestamp",
                    ));
                    return if replaying {
                        Outcome::Replayed
                    } else {
                        Outcome::Dead
                    };
                }
            },
            _ => now_ms,
        };
        self.key_buf.clear();
        for (i, (slot, name)) in self.key_slots.iter().enumerate() {
            if i > 0 {
                self.key_buf.push(KEY_SEP);
            }
            let v = &ev.values[*slot];
            match v {
                Val::Str(_) | Val::Int(_) | Val::Float(_) | Val::Bool(_) => {
                    v.write_json(&mut self.key_buf)
                }
                Val::Missing | Val::Null => {
                    dead.push(dead_letter(
                        &self.topic,
                        rec,
                        &format!("missing group-by field `{name}`"),
                    ));
                    return if replaying {
                        Outcome::Replayed
                    } else {
                        Outcome::Dead
                    };
                }
                Val::Object | Val::Array => {
                    dead.push(dead_letter(
                        &self.topic,
                        rec,
                        &format!("group-by field `{name}` must be a string, number or boolean"),
                    ));
                    return if replaying {
                        Outcome::Replayed
                    } else {
                        Outcome::Dead
                    };
                }
            }
        }
        let window = self.kind.assign(t);
        let wm = self.watermarks.observe(rec.position.partition, t);
        if replaying {
            if self.closed(window, self.replay_watermark) {
                return Outcome::Replayed;
            }
            self.store
                .add(window, &self.key_buf, rec.position, |a| a.count += 1);
            return Outcome::Windowed;
        }
        if self.closed(window, wm) {
            let reason = format!(
                "late event: window {}..{} closed at watermark {}",
                crate::time::format_rfc3339(window.start),
                crate::time::format_rfc3339(window.end),
                crate::time::format_rfc3339(wm)
            );
            dead.push(dead_letter(&self.topic, rec, &reason));
            return Outcome::Late;
        }
        self.store
            .add(window, &self.key_buf, rec.position, |a| a.count += 1);
        Outcome::Windowed
    }

    /// Records that `rec` was received (its position becomes committable once the outputs
    /// produced so far are acknowledged), without windowing it.
    #[inline]
    pub fn note_position(&mut self, rec: &Record, now: Instant) {
        let p = rec.position.partition as usize;
        if self.next_offset.len() <= p {
            self.next_offset.resize(p + 1, None);
        }
        self.next_offset[p] = Some(rec.position.offset + 1);
        self.watermarks.touch(rec.position.partition, now);
    }

    #[inline]
    fn closed(&self, window: WindowRange, wm: i64) -> bool {
        // A window whose close time the watermark has reached takes no more events, even
        // if its results have not been emitted yet (that happens at the end of the batch).
        window.end.saturating_add(self.grace) <= wm
    }

    /// Advances idle time and closes every window the watermark has passed.
    pub fn close_ready(&mut self, now: Instant, out: &mut Emitted) {
        self.end_replay_if_done(now);
        let wm = self.watermarks.tick(now);
        let closed = self.store.close_until(wm, self.grace);
        self.encode(closed, out);
    }

    /// Closes every open window (the input has ended).
    pub fn close_all(&mut self, out: &mut Emitted) {
        let closed = self.store.drain_all();
        self.encode(closed, out);
    }

    fn encode(&self, closed: Vec<(WindowRange, Pane)>, out: &mut Emitted) {
        for (window, pane) in closed {
            out.windows_closed += 1;
            out.results.reserve(pane.groups.len());
            let text = WindowText::new(window);
            for (key, acc) in pane.groups.into_iter() {
                out.results
                    .push(self.encoder.encode_with(&text, &key, &acc));
            }
        }
    }

    /// For each partition seen, the position up to which everything is handled once the
    /// outputs produced so far are acknowledged: not past any record still held by an
    /// open window.
    pub fn safe_positions(&self) -> Vec<Position> {
        self.next_offset
            .iter()
            .enumerate()
            .filter_map(|(p, next)| {
                let next = (*next)?;
                let held = self.store.min_offset(p as u32).unwrap_or(u64::MAX);
                Some(Position {
                    partition: p as u32,
                    offset: next.min(held),
                })
            })
            .collect()
    }

    /// The pipeline watermark.
    pub fn watermark(&self) -> i64 {
        self.watermarks.current()
    }

    /// When the next partition goes idle, if any is active.
    pub fn next_idle_deadline(&self) -> Option<Instant> {
        self.watermarks.next_idle_deadline()
    }

    /// Open (window, key) entries.
    pub fn open_entries(&self) -> usize {
        self.store.entries()
    }

    /// Open windows.
    pub fn open_windows(&self) -> usize {
        self.store.windows()
    }
}
