//! The windowed aggregation operator: decodes records, assigns them to windows, keeps
//! watermarks and says which source positions are safe to commit. Synchronous and
//! broker-agnostic; the [`runtime`](crate::runtime) drives it.

use std::time::Duration;

use tokio::time::Instant;

use crate::aggregate::{AggFn, Aggregates, Inputs};
use crate::config::{EmitMode, LatePolicy, PipelineConfig, WindowConfig};
use crate::decode::{Decoder, Schema, TimeSource, Val};
use crate::errors::{ErrorAction, ErrorCallback, ErrorHandler, STAGE_VALIDATE};
use crate::output::{dead_letter, late_record, ResultEncoder, WindowText, KEY_SEP};
use crate::record::{OutRecord, Position, Record};
use crate::retry::{RetryConfig, RETRY_PARTITION_BASE};
use crate::window::{
    Acc, ClosedSession, Extra, Pane, SessionStore, Watermarks, WindowKind, WindowRange, WindowStore,
};

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
    /// When results are emitted.
    pub emit: EmitMode,
    /// Where events whose window has closed go.
    pub late: LatePolicy,
    /// Most records per batch.
    pub batch_size: usize,
    /// Larger payloads are dead-lettered.
    pub max_payload_bytes: usize,
    /// How often source positions are committed.
    pub commit_interval: Duration,
    /// The error strategy of each stage (`validate`, `enrich`, processors by name); a
    /// stage not listed dead-letters.
    pub errors: Vec<(String, ErrorAction)>,
    /// The retry topic and its backoff, when the pipeline has one.
    pub retry: Option<RetryConfig>,
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
            emit: c.window.emit,
            late: c.late.clone(),
            batch_size: c.source.batch_size,
            max_payload_bytes: c.source.max_payload_bytes,
            commit_interval: c.source.commit_interval,
            errors: c.errors.clone(),
            retry: c.retry.clone(),
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
                emit: EmitMode::Final,
            },
            group_by: vec![key.into()],
            compute: vec![AggFn::Count],
            emit: EmitMode::Final,
            late: LatePolicy::DeadLetter,
            batch_size: 1024,
            max_payload_bytes: 1 << 20,
            commit_interval: Duration::from_secs(1),
            errors: Vec::new(),
            retry: None,
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

    /// The same job with another window kind (tumbling, hopping, session).
    pub fn with_window(mut self, kind: WindowKind) -> Self {
        self.window.kind = kind;
        self
    }

    /// The same job computing these aggregates.
    pub fn with_aggregates(mut self, compute: Vec<AggFn>) -> Self {
        self.compute = compute;
        self
    }

    /// The same job grouped by these fields.
    pub fn with_group_by(mut self, fields: &[&str]) -> Self {
        self.group_by = fields.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The same job with an emit mode.
    pub fn with_emit(mut self, emit: EmitMode) -> Self {
        self.emit = emit;
        self.window.emit = emit;
        self
    }

    /// The same job with a late-event policy.
    pub fn with_late(mut self, late: LatePolicy) -> Self {
        self.late = late;
        self
    }

    /// The same job with an idle timeout.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.window.idle_timeout = idle;
        self
    }

    /// The same job with `action` as the error strategy of `stage`.
    pub fn with_error_strategy(mut self, stage: &str, action: ErrorAction) -> Self {
        self.errors.retain(|(s, _)| s != stage);
        self.errors.push((stage.to_string(), action));
        self
    }

    /// The same job with a retry topic.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
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
    /// Every window it belonged to had closed: it went to the late output (or the
    /// dead-letter output, or was dropped, as configured) and was counted as late.
    Late,
    /// A replayed record whose outcome was delivered before the restart; skipped.
    Replayed,
    /// A stage failed on it and it went to the retry topic.
    Retried,
    /// A stage failed on it and its strategy dropped it.
    Skipped,
    /// A stage failed on it and its strategy stops the pipeline.
    Failed,
}

/// Per-batch output of the operator.
#[derive(Debug, Default)]
pub struct Emitted {
    /// Window results.
    pub results: Vec<OutRecord>,
    /// Dead letters (invalid records, and late ones unless a late output is configured).
    pub dead: Vec<OutRecord>,
    /// Late events for the late output.
    pub late: Vec<OutRecord>,
    /// Records for the retry topic.
    pub retry: Vec<OutRecord>,
    /// Windows closed in this step.
    pub windows_closed: u64,
}

#[derive(Debug)]
enum State {
    Fixed(WindowStore),
    Sessions(SessionStore),
}

/// The windowed aggregation over decoded records.
#[derive(Debug)]
pub struct WindowOperator {
    decoder: Decoder,
    key_slots: Vec<(usize, String)>,
    kind: WindowKind,
    grace: i64,
    time: TimeSource,
    state: State,
    aggs: Aggregates,
    inputs: Inputs,
    emit: EmitMode,
    late: LatePolicy,
    /// (event, window) pairs not counted because that window had closed while another
    /// window of the event was still open (hopping windows).
    window_misses: u64,
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
    errors: ErrorHandler,
    /// By partition: the checkpoint this pipeline would have committed when the partition
    /// was revoked, used if it comes back without one (a reconnect that redelivers).
    forgotten: Vec<Option<crate::record::Checkpoint>>,
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
        let aggs = Aggregates::new(
            job.compute
                .iter()
                .map(|f| (f.clone(), f.field().map_or(0, |p| decoder.want(p))))
                .collect(),
        );
        let update = job.emit == EmitMode::Update;
        let state = match job.window.kind {
            WindowKind::Session { gap } => State::Sessions(SessionStore::new(gap, update)),
            _ if update => State::Fixed(WindowStore::tracking_updates()),
            _ => State::Fixed(WindowStore::new()),
        };
        WindowOperator {
            decoder,
            key_slots,
            kind: job.window.kind,
            grace: job.window.grace.as_millis() as i64,
            time: job.time.clone(),
            state,
            aggs,
            inputs: Inputs::default(),
            emit: job.emit,
            late: job.late.clone(),
            window_misses: 0,
            watermarks: Watermarks::new(
                job.out_of_orderness.as_millis() as i64,
                job.window.idle_timeout,
            ),
            encoder: ResultEncoder::new(&job.group_by, &job.compute, job.emit == EmitMode::Update),
            next_offset: Vec::new(),
            key_buf: Vec::with_capacity(64),
            topic: topic.to_string(),
            replay: Vec::new(),
            replay_watermark: i64::MIN,
            replay_started: None,
            idle_timeout: job.window.idle_timeout,
            errors: ErrorHandler::new(job.errors.clone(), job.retry.clone(), topic),
            forgotten: Vec::new(),
        }
    }

    /// Lets `cb` choose the action for every failure (see [`crate::errors`]).
    pub fn set_error_callback(&mut self, cb: ErrorCallback) {
        self.errors.set_callback(cb);
    }

    /// Whether some failure may stop the pipeline (a `fail` strategy or a callback).
    pub fn may_fail(&self) -> bool {
        self.errors.may_fail()
    }

    /// The message to stop with after an [`Outcome::Failed`].
    pub fn failure(&mut self) -> Option<String> {
        self.errors.failure.take()
    }

    /// Handles a record that `stage` (a processor) failed on, by that stage's strategy.
    pub fn reject(
        &mut self,
        stage: &str,
        r: &crate::processor::Rejected,
        now: Instant,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        let rec = &r.record;
        self.note_position(rec, now);
        let replaying = self.replaying(rec);
        let reason = format!("rejected by {stage}: {}", r.reason);
        let o = self
            .errors
            .handle(stage, rec, &reason, r.recoverable, replaying, now_ms, out);
        if o == Outcome::Failed {
            self.unnote(rec);
        }
        o
    }

    fn replaying(&self, rec: &Record) -> bool {
        self.replay
            .get(rec.position.partition as usize)
            .is_some_and(|&until| rec.position.offset < until)
    }

    /// Takes back [`note_position`](Self::note_position) for a record the pipeline stops
    /// on: the next start resumes from it.
    fn unnote(&mut self, rec: &Record) {
        if let Some(n) = self.next_offset.get_mut(rec.position.partition as usize) {
            *n = Some(rec.position.offset);
        }
    }

    fn invalid(
        &mut self,
        rec: &Record,
        reason: &str,
        replaying: bool,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        let o = self
            .errors
            .handle(STAGE_VALIDATE, rec, reason, false, replaying, now_ms, out);
        if o == Outcome::Failed {
            self.unnote(rec);
        }
        o
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
        // Retry-topic partitions never hold or move the watermark; an assignment of only
        // retry partitions (the retry topic's consumer) leaves the source's as they are.
        let ids: Vec<u32> = partitions
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| *p < RETRY_PARTITION_BASE)
            .collect();
        if !ids.is_empty() || partitions.is_empty() {
            self.watermarks.assign(&ids, now);
        }
        let mut restored = None;
        for (p, cp) in partitions {
            let i = *p as usize;
            // Back after this pipeline had it (a reconnect that redelivers, a rebalance that
            // returns it): what it had processed then is a replay too, so its emitted
            // windows are not emitted again and its records are not taken for late ones.
            // The later of that and the committed checkpoint wins.
            let remembered = self.forgotten.get_mut(i).and_then(Option::take);
            let cp = match (*cp, remembered) {
                (Some(c), Some(r)) if r.processed > c.processed => Some(r),
                (c, r) => c.or(r),
            };
            let Some(cp) = cp else {
                continue;
            };
            if self.replay.len() <= i {
                self.replay.resize(i + 1, 0);
            }
            self.replay[i] = cp.processed;
            if *p < RETRY_PARTITION_BASE {
                restored = Some(restored.unwrap_or(i64::MAX).min(cp.watermark));
            }
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
            if self
                .next_offset
                .get(p as usize)
                .copied()
                .flatten()
                .is_some()
            {
                let cp = self.checkpoint(p);
                let i = p as usize;
                if self.forgotten.len() <= i {
                    self.forgotten.resize(i + 1, None);
                }
                self.forgotten[i] = Some(cp);
            }
            match &mut self.state {
                State::Fixed(s) => s.revoke(p),
                State::Sessions(s) => s.revoke(p),
            }
            if let Some(n) = self.next_offset.get_mut(p as usize) {
                *n = None;
            }
            if let Some(r) = self.replay.get_mut(p as usize) {
                *r = 0;
            }
        }
        let ids: Vec<u32> = partitions
            .iter()
            .copied()
            .filter(|p| *p < RETRY_PARTITION_BASE)
            .collect();
        self.watermarks.revoke(&ids);
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
        // Retry partitions hold records back until due: the replay does not wait for them.
        let pending = self.replay.iter().enumerate().any(|(p, &until)| {
            until > 0
                && p < RETRY_PARTITION_BASE as usize
                && self.next_offset.get(p).copied().flatten().unwrap_or(0) < until
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

    /// Handles one record; dead letters and late events go to `out`. `now_ms` is the wall
    /// clock used for processing-time windows.
    #[inline]
    pub fn ingest(
        &mut self,
        rec: &Record,
        now: Instant,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        self.note_position(rec, now);
        let replaying = self.replaying(rec);
        let ev = match self.decoder.decode(&rec.payload) {
            Ok(ev) => ev,
            Err(reason) => return self.invalid(rec, &reason, replaying, now_ms, out),
        };
        let t = match (&self.time, ev.time) {
            (TimeSource::Field { .. }, Some(t)) => t,
            (TimeSource::Broker, _) => match rec.timestamp {
                Some(t) => t,
                None => {
                    return self.invalid(
                        rec,
                        "record has no broker timestamp",
                        replaying,
                        now_ms,
                        out,
                    )
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
                    let reason = format!("missing group-by field `{name}`");
                    return self.invalid(rec, &reason, replaying, now_ms, out);
                }
                Val::Object | Val::Array => {
                    let reason =
                        format!("group-by field `{name}` must be a string, number or boolean");
                    return self.invalid(rec, &reason, replaying, now_ms, out);
                }
            }
        }
        if let Err(reason) = self.aggs.read(&ev.values, &mut self.inputs) {
            return self.invalid(rec, &reason, replaying, now_ms, out);
        }
        let Emitted {
            dead,
            late: late_out,
            ..
        } = out;
        let retried = rec.position.partition >= RETRY_PARTITION_BASE;
        // A retried event keeps its own event time and never moves the watermark.
        let wm = if retried {
            self.watermarks.current()
        } else {
            self.watermarks.observe(rec.position.partition, t)
        };
        // After a restart, a replayed record counts again only where the checkpoint's
        // watermark had not closed its window yet: the rest was delivered before.
        let closed_at = if replaying { self.replay_watermark } else { wm };
        let (aggs, inputs, grace) = (&self.aggs, &self.inputs, self.grace);
        let added = match &mut self.state {
            State::Fixed(store) => {
                let mut added = 0u64;
                let mut missed = 0u64;
                self.kind.for_each(t, |w| {
                    if w.end.saturating_add(grace) <= closed_at {
                        missed += 1;
                    } else {
                        added += 1;
                        store.add(w, &self.key_buf, rec.position, aggs, inputs);
                    }
                });
                if added > 0 && !replaying {
                    self.window_misses += missed;
                }
                added > 0
            }
            // A session event is late once the watermark passed it by more than grace:
            // that also guarantees it can never touch a session already emitted.
            State::Sessions(sessions) if t.saturating_add(grace) >= closed_at => {
                sessions.add(&self.key_buf, t, rec.position, aggs, inputs);
                true
            }
            State::Sessions(_) => false,
        };
        if added {
            return Outcome::Windowed;
        }
        if replaying {
            return Outcome::Replayed;
        }
        let window = self.kind.assign(t);
        match &self.late {
            LatePolicy::DeadLetter => {
                let reason = format!(
                    "late event: window {}..{} closed at watermark {}",
                    crate::time::format_rfc3339(window.start),
                    crate::time::format_rfc3339(window.end),
                    crate::time::format_rfc3339(wm)
                );
                dead.push(dead_letter(&self.topic, rec, &reason));
            }
            LatePolicy::Output(_) => late_out.push(late_record(&self.topic, rec, window, wm)),
            LatePolicy::Drop => {}
        }
        Outcome::Late
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
        if rec.position.partition < RETRY_PARTITION_BASE {
            self.watermarks.touch(rec.position.partition, now);
        }
    }

    /// Advances idle time and closes every window the watermark has passed; in `update`
    /// mode first emits the entries this batch changed.
    pub fn close_ready(&mut self, now: Instant, out: &mut Emitted) {
        self.end_replay_if_done(now);
        let wm = self.watermarks.tick(now);
        self.emit_updates(out);
        match &mut self.state {
            State::Fixed(store) => {
                let closed = store.close_until(wm, self.grace);
                for (window, pane) in closed {
                    out.windows_closed += 1;
                    out.results.reserve(pane.groups.len());
                    Self::encode_pane(&self.encoder, window, pane, out);
                }
            }
            State::Sessions(sessions) => {
                let closed = sessions.close_until(wm, self.grace);
                self.encode_sessions(closed, out);
            }
        }
    }

    /// Closes every open window (the input has ended).
    pub fn close_all(&mut self, out: &mut Emitted) {
        self.emit_updates(out);
        match &mut self.state {
            State::Fixed(store) => {
                for (window, pane) in store.drain_all() {
                    out.windows_closed += 1;
                    Self::encode_pane(&self.encoder, window, pane, out);
                }
            }
            State::Sessions(sessions) => {
                let closed = sessions.drain_all();
                self.encode_sessions(closed, out);
            }
        }
    }

    fn encode_pane(encoder: &ResultEncoder, window: WindowRange, pane: Pane, out: &mut Emitted) {
        let text = WindowText::new(window);
        let Pane { groups, extras, .. } = pane;
        let has_extras = !extras.is_empty(); // a count alone keeps none
        encoder.batch(|b| {
            for (key, acc) in groups.into_iter() {
                let extra = has_extras
                    .then(|| extras.remove(&key).map(|(_, e)| e))
                    .flatten();
                out.results
                    .push(b.encode(&text, &key, &acc, extra.as_ref(), true));
            }
        });
    }

    fn encode_sessions(&self, closed: Vec<ClosedSession>, out: &mut Emitted) {
        out.windows_closed += closed.len() as u64;
        for (w, key, acc, extra) in closed {
            let text = WindowText::new(w);
            out.results.push(
                self.encoder
                    .encode_with(&text, &key, &acc, extra.as_deref(), true),
            );
        }
    }

    fn emit_updates(&mut self, out: &mut Emitted) {
        if self.emit != EmitMode::Update {
            return;
        }
        let enc = &self.encoder;
        let mut push = |w: WindowRange, key: &[u8], acc: &Acc, extra: Option<&Extra>| {
            out.results
                .push(enc.encode_with(&WindowText::new(w), key, acc, extra, false));
        };
        match &mut self.state {
            State::Fixed(s) => s.drain_updates(&mut push),
            State::Sessions(s) => s.drain_updates(&mut push),
        }
    }

    /// Takes the count of (event, window) pairs missed because that window had closed.
    pub fn take_window_misses(&mut self) -> u64 {
        std::mem::take(&mut self.window_misses)
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
                let held = match &self.state {
                    State::Fixed(s) => s.min_offset(p as u32),
                    State::Sessions(s) => s.min_offset(p as u32),
                }
                .unwrap_or(u64::MAX);
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
        match &self.state {
            State::Fixed(s) => s.entries(),
            State::Sessions(s) => s.entries(),
        }
    }

    /// Open windows (sessions count one each).
    pub fn open_windows(&self) -> usize {
        match &self.state {
            State::Fixed(s) => s.windows(),
            State::Sessions(s) => s.entries(),
        }
    }
}
