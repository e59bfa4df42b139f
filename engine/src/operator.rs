//! The windowed aggregation operator: decodes records, assigns them to windows, keeps
//! watermarks and says which source positions are safe to commit. Synchronous and
//! broker-agnostic; the [`runtime`](crate::runtime) drives it.

use std::time::Duration;

use tokio::time::Instant;

use crate::aggregate::{AggFn, Aggregates, Inputs};
use crate::config::{EmitMode, LatePolicy, PipelineConfig, WindowConfig};
use crate::config::{ErrorAction, RetryConfig, STAGE_VALIDATE};
use crate::decode::{Decoder, Schema, TimeSource, Val};
use crate::error_policy::{ErrorCallback, ErrorHandler};
pub use crate::outcome::{Emitted, Outcome};
use crate::output::{dead_letter, late_record, ResultEncoder, WindowText, KEY_SEP};
use crate::record::{Checkpoint, Position, Record};
use crate::retry::envelope::RETRY_PARTITION_BASE;
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
    /// Events dated further ahead of the wall clock are dead letters (`None`: no limit).
    pub max_future: Option<Duration>,
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
            max_future: c.max_future,
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
            max_future: Some(crate::config::DEFAULT_MAX_FUTURE),
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

    /// The same job with a limit on how far ahead of the wall clock events may be dated.
    pub fn with_max_future(mut self, max_future: Option<Duration>) -> Self {
        self.max_future = max_future;
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

#[derive(Debug)]
enum State {
    Fixed(WindowStore),
    Sessions(SessionStore),
}

impl State {
    fn new(kind: WindowKind, update: bool) -> Self {
        match kind {
            WindowKind::Session { gap } => State::Sessions(SessionStore::new(gap, update)),
            _ if update => State::Fixed(WindowStore::tracking_updates()),
            _ => State::Fixed(WindowStore::new()),
        }
    }

    fn revoke(&mut self, partition: u32) {
        match self {
            State::Fixed(s) => s.revoke(partition),
            State::Sessions(s) => s.revoke(partition),
        }
    }

    fn min_offset(&self, partition: u32) -> Option<u64> {
        match self {
            State::Fixed(s) => s.min_offset(partition),
            State::Sessions(s) => s.min_offset(partition),
        }
    }

    fn absorb(&mut self, other: State) {
        match (self, other) {
            (State::Fixed(a), State::Fixed(b)) => a.absorb(b),
            (State::Sessions(a), State::Sessions(b)) => a.absorb(b),
            _ => unreachable!("one job has one window kind"),
        }
    }

    fn entries(&self) -> usize {
        match self {
            State::Fixed(s) => s.entries(),
            State::Sessions(s) => s.entries(),
        }
    }

    fn windows(&self) -> usize {
        match self {
            State::Fixed(s) => s.windows(),
            State::Sessions(s) => s.entries(),
        }
    }
}

/// A unit of window state with an event time of its own: one source partition while the
/// input is keyed by the group key (every (key, window) then lives in one partition, as
/// in Kafka Streams' stream time per task), or every partition together otherwise.
#[derive(Debug)]
struct Task {
    state: State,
    watermarks: Watermarks,
    /// Replayed records (below their partition's `replay` mark) of windows that closed at
    /// or below this watermark were delivered before: the highest checkpoint watermark
    /// restored into this task.
    replay_watermark: i64,
}

impl Task {
    fn absorb(&mut self, other: Task) {
        self.state.absorb(other.state);
        self.watermarks.absorb(other.watermarks);
        self.replay_watermark = self.replay_watermark.max(other.replay_watermark);
    }
}

/// The windowed aggregation over decoded records.
#[derive(Debug)]
pub struct WindowOperator {
    decoder: Decoder,
    key_slots: Vec<(usize, String)>,
    kind: WindowKind,
    grace: i64,
    time: TimeSource,
    aggs: Aggregates,
    inputs: Inputs,
    emit: EmitMode,
    late: LatePolicy,
    /// (event, window) pairs not counted because that window had closed while another
    /// window of the event was still open (hopping windows).
    window_misses: u64,
    encoder: ResultEncoder,
    key_buf: Vec<u8>,
    topic: String,
    out_of_orderness: i64,
    idle_timeout: Duration,
    max_future: Option<i64>,
    errors: ErrorHandler,
    /// Window state and event time, by task: by source partition while `shared` is
    /// false, one task (index 0) once it is true.
    tasks: Vec<Option<Task>>,
    /// Whether the input proved not to be keyed by the group key: then a (key, window)
    /// may span partitions, and all of them share one task.
    shared: bool,
    /// By source partition: whether its task exists and holds it (the hot path's check).
    ready: Vec<bool>,
    /// Next offset after the last record seen, by partition.
    next_offset: Vec<Option<u64>>,
    /// After a restart, by partition: the offset below which records were processed
    /// before the checkpoint (a replay).
    replay: Vec<u64>,
    /// By partition: the checkpoint this pipeline would have committed when the partition
    /// was revoked, used if it comes back without one (a reconnect that redelivers).
    forgotten: Vec<Option<Checkpoint>>,
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
        WindowOperator {
            decoder,
            key_slots,
            kind: job.window.kind,
            grace: job.window.grace.as_millis() as i64,
            time: job.time.clone(),
            aggs,
            inputs: Inputs::default(),
            emit: job.emit,
            late: job.late.clone(),
            window_misses: 0,
            encoder: ResultEncoder::new(&job.group_by, &job.compute, job.emit == EmitMode::Update),
            key_buf: Vec::with_capacity(64),
            topic: topic.to_string(),
            out_of_orderness: job.out_of_orderness.as_millis() as i64,
            idle_timeout: job.window.idle_timeout,
            max_future: job.max_future.map(|d| d.as_millis() as i64),
            errors: ErrorHandler::new(job.errors.clone(), job.retry.clone(), topic),
            tasks: Vec::new(),
            shared: false,
            ready: Vec::new(),
            next_offset: Vec::new(),
            replay: Vec::new(),
            forgotten: Vec::new(),
        }
    }

    /// Lets `cb` choose the action for every failure (see [`crate::error_policy`]).
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

    /// Whether the input proved not to be keyed by the group key, so that every
    /// partition shares one event time.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    fn new_task(&self) -> Task {
        Task {
            state: State::new(self.kind, self.emit == EmitMode::Update),
            watermarks: Watermarks::new(self.out_of_orderness, self.idle_timeout),
            replay_watermark: i64::MIN,
        }
    }

    /// The task that holds source partition `p`'s windows.
    #[inline]
    fn task_index(&self, p: u32) -> usize {
        if self.shared {
            0
        } else {
            p as usize
        }
    }

    /// Makes sure source partition `p` has its task and is one of its partitions (a
    /// source that never announces assignments, such as a file).
    fn ensure_task(&mut self, p: u32, now: Instant) -> usize {
        let i = self.task_index(p);
        if self.ready.get(p as usize).copied().unwrap_or(false) {
            return i;
        }
        if self.tasks.len() <= i {
            self.tasks.resize_with(i + 1, || None);
        }
        if self.tasks[i].is_none() {
            self.tasks[i] = Some(self.new_task());
        }
        if let Some(t) = self.tasks[i].as_mut() {
            t.watermarks.add(&[p], now);
        }
        if self.ready.len() <= p as usize {
            self.ready.resize(p as usize + 1, false);
        }
        self.ready[p as usize] = true;
        i
    }

    fn task(&mut self, i: usize) -> &mut Task {
        self.tasks[i].as_mut().expect("the task exists")
    }

    /// The input is not keyed by the group key: merge every task into one.
    #[cold]
    fn share(&mut self, rec: &Record, now: Instant) {
        self.shared = true;
        let mut tasks = std::mem::take(&mut self.tasks).into_iter().flatten();
        let merged = tasks.next().map(|mut first| {
            let mut n = 1;
            for t in tasks {
                first.absorb(t);
                n += 1;
            }
            if n > 1 {
                tracing::info!(
                    partition = rec.position.partition,
                    offset = rec.position.offset,
                    "records are not keyed by the group key (this one's key is {}): one event time for all partitions, \
                     which a single pipeline instance must read (see README, \"Several instances\")",
                    rec.key.as_deref().map_or("missing".to_string(), |k| format!("`{}`", String::from_utf8_lossy(k)))
                );
            }
            first
        });
        let mut merged = match merged {
            Some(t) => t,
            // Only retried records came so far: the source's partitions join as they
            // deliver.
            None => {
                self.ready.iter_mut().for_each(|r| *r = false);
                self.new_task()
            }
        };
        // Until now each partition went idle on its own: one that delivered nothing yet
        // must hold the merged time as at a wake-up (the first unkeyed record often comes
        // right after a quiet start).
        merged.watermarks.rearm(now);
        self.tasks = vec![Some(merged)];
    }

    /// Whether `rec`'s broker key is one of its group-by values: records keyed that way
    /// put every (key, window) in one partition.
    fn keyed_by_group(&self, rec: &Record, values: &[Val<'_>]) -> bool {
        let Some(k) = rec.key.as_deref() else {
            return false;
        };
        let mut text = Vec::new();
        self.key_slots.iter().any(|(slot, _)| match &values[*slot] {
            Val::Str(s) => s.as_bytes() == k,
            v @ (Val::Int(_) | Val::Float(_) | Val::Bool(_)) => {
                text.clear();
                v.write_json(&mut text);
                text == k
            }
            _ => false,
        })
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

    /// Declares the source partitions assigned to this pipeline (the whole current set),
    /// with the checkpoints committed for them. Each partition's task starts from its
    /// checkpoint's watermark; records below the checkpoint's `processed` offset are a
    /// replay: those whose window that watermark had closed are skipped (their results
    /// were delivered), the others are counted again.
    pub fn assign(&mut self, partitions: &[(u32, Option<Checkpoint>)], now: Instant) {
        // Retry-topic partitions never hold or move the watermark; an assignment of only
        // retry partitions (the retry topic's consumer) leaves the source's as they are.
        let ids: Vec<u32> = partitions
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| *p < RETRY_PARTITION_BASE)
            .collect();
        if !ids.is_empty() || partitions.is_empty() {
            // Partitions no longer listed stop holding their task's watermark.
            for (p, r) in self.ready.iter_mut().enumerate() {
                if *r && !ids.contains(&(p as u32)) {
                    *r = false;
                    let i = if self.shared { 0 } else { p };
                    if let Some(Some(t)) = self.tasks.get_mut(i) {
                        t.watermarks.revoke(&[p as u32]);
                    }
                }
            }
        }
        for &p in &ids {
            self.ensure_task(p, now);
        }
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
                let ti = self.task_index(*p);
                let t = self.task(ti);
                t.watermarks.restore(cp.watermark);
                t.replay_watermark = t.replay_watermark.max(cp.watermark);
                tracing::info!(
                    partition = p,
                    watermark = %crate::time::format_rfc3339(cp.watermark),
                    replay_until = cp.processed,
                    "restored checkpoint; replaying uncommitted input"
                );
            }
        }
    }

    /// Forgets revoked partitions: their open window state is dropped uncommitted and they
    /// no longer hold the watermark.
    pub fn revoke(&mut self, partitions: &[u32]) {
        for &p in partitions {
            let i = p as usize;
            if self.next_offset.get(i).copied().flatten().is_some() {
                let cp = self.checkpoint(p);
                if self.forgotten.len() <= i {
                    self.forgotten.resize(i + 1, None);
                }
                self.forgotten[i] = Some(cp);
            }
            if p < RETRY_PARTITION_BASE {
                let ti = self.task_index(p);
                if let Some(slot) = self.tasks.get_mut(ti) {
                    if let Some(t) = slot.as_mut() {
                        t.state.revoke(p);
                        t.watermarks.revoke(&[p]);
                        // A task whose partitions are all gone and that holds nothing
                        // (retried records stay counted where they are) goes with them.
                        if t.state.entries() == 0 && t.watermarks.assigned().next().is_none() {
                            *slot = None;
                        }
                    }
                }
                if let Some(r) = self.ready.get_mut(i) {
                    *r = false;
                }
            } else {
                for t in self.tasks.iter_mut().flatten() {
                    t.state.revoke(p);
                }
            }
            if let Some(n) = self.next_offset.get_mut(i) {
                *n = None;
            }
            if let Some(r) = self.replay.get_mut(i) {
                *r = 0;
            }
        }
    }

    /// The watermark of the task that holds `partition` (for retry partitions, the
    /// lowest of all tasks).
    fn watermark_of(&self, partition: u32) -> i64 {
        if partition < RETRY_PARTITION_BASE {
            if let Some(Some(t)) = self.tasks.get(self.task_index(partition)) {
                return t.watermarks.current();
            }
        }
        self.watermark()
    }

    /// The checkpoint to store with a commit of `partition`.
    pub fn checkpoint(&self, partition: u32) -> Checkpoint {
        Checkpoint {
            watermark: self.watermark_of(partition),
            processed: self
                .next_offset
                .get(partition as usize)
                .copied()
                .flatten()
                .unwrap_or(0)
                .max(self.replay.get(partition as usize).copied().unwrap_or(0)),
        }
    }

    /// The task a retried record counts in: the one of the partition it first came from.
    fn retry_task(&mut self, rec: &Record, now: Instant) -> usize {
        let origin = crate::retry::envelope::origin_partition(rec).unwrap_or(0);
        let i = self.task_index(origin);
        if let Some(Some(_)) = self.tasks.get(i) {
            return i;
        }
        if let Some(i) = self.tasks.iter().position(Option::is_some) {
            return i;
        }
        self.ensure_task(origin, now)
    }

    /// Handles one record; dead letters and late events go to `out`. `now_ms` is the wall
    /// clock used for processing-time windows and the `max_future` limit.
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
        if let Some(limit) = self.max_future {
            if t > now_ms.saturating_add(limit) {
                let reason = format!(
                    "event time {} is more than {} ahead of the wall clock ({}; event_time.max_future)",
                    crate::time::format_rfc3339(t),
                    crate::time::format_duration(Duration::from_millis(limit as u64)),
                    crate::time::format_rfc3339(now_ms),
                );
                return self.invalid(rec, &reason, replaying, now_ms, out);
            }
        }
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
        if !self.shared && !self.keyed_by_group(rec, &ev.values) {
            self.share(rec, now);
        }
        let retried = rec.position.partition >= RETRY_PARTITION_BASE;
        let ti = if retried {
            self.retry_task(rec, now)
        } else {
            self.ensure_task(rec.position.partition, now)
        };
        let Emitted {
            dead,
            late: late_out,
            ..
        } = out;
        let (kind, grace) = (self.kind, self.grace);
        let (aggs, inputs) = (&self.aggs, &self.inputs);
        let task = self.tasks[ti].as_mut().expect("the task exists");
        // A retried event keeps its own event time and never moves the watermark; a
        // future-dated one (within `max_future`) moves it no further than the wall clock.
        let wm = if retried {
            task.watermarks.current()
        } else {
            task.watermarks
                .observe(rec.position.partition, t.min(now_ms))
        };
        // After a restart, a replayed record counts again only where the checkpoint's
        // watermark had not closed its window yet: the rest was delivered before.
        let closed_at = if replaying { task.replay_watermark } else { wm };
        let added = match &mut task.state {
            State::Fixed(store) => {
                let mut added = 0u64;
                let mut missed = 0u64;
                kind.for_each(t, |w| {
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
            let i = self.ensure_task(rec.position.partition, now);
            self.task(i).watermarks.touch(rec.position.partition, now);
        }
    }

    /// Advances idle time and closes every window its task's watermark has passed; in
    /// `update` mode first emits the entries this batch changed. `backlog(p)` says whether
    /// the broker holds records of partition `p` not delivered yet (it is then not idle).
    pub fn close_ready(&mut self, now: Instant, backlog: &dyn Fn(u32) -> bool, out: &mut Emitted) {
        self.emit_updates(out);
        for task in self.tasks.iter_mut().flatten() {
            let wm = task.watermarks.tick(now, backlog);
            match &mut task.state {
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
                    Self::encode_sessions(&self.encoder, closed, out);
                }
            }
        }
    }

    /// Closes every open window (the input has ended).
    pub fn close_all(&mut self, out: &mut Emitted) {
        self.emit_updates(out);
        for task in self.tasks.iter_mut().flatten() {
            match &mut task.state {
                State::Fixed(store) => {
                    for (window, pane) in store.drain_all() {
                        out.windows_closed += 1;
                        Self::encode_pane(&self.encoder, window, pane, out);
                    }
                }
                State::Sessions(sessions) => {
                    let closed = sessions.drain_all();
                    Self::encode_sessions(&self.encoder, closed, out);
                }
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

    fn encode_sessions(encoder: &ResultEncoder, closed: Vec<ClosedSession>, out: &mut Emitted) {
        out.windows_closed += closed.len() as u64;
        for (w, key, acc, extra) in closed {
            let text = WindowText::new(w);
            out.results
                .push(encoder.encode_with(&text, &key, &acc, extra.as_deref(), true));
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
        for task in self.tasks.iter_mut().flatten() {
            match &mut task.state {
                State::Fixed(s) => s.drain_updates(&mut push),
                State::Sessions(s) => s.drain_updates(&mut push),
            }
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
                let held = self
                    .tasks
                    .iter()
                    .flatten()
                    .filter_map(|t| t.state.min_offset(p as u32))
                    .min()
                    .unwrap_or(u64::MAX);
                Some(Position {
                    partition: p as u32,
                    offset: next.min(held),
                })
            })
            .collect()
    }

    /// The pipeline's watermark: the lowest of its tasks' that saw an event (`i64::MIN`
    /// before any event).
    pub fn watermark(&self) -> i64 {
        self.tasks
            .iter()
            .flatten()
            .map(|t| t.watermarks.current())
            .filter(|&w| w != i64::MIN)
            .min()
            .unwrap_or(i64::MIN)
    }

    /// The source partitions this operator reads now.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.ready
            .iter()
            .enumerate()
            .filter(|(_, r)| **r)
            .map(|(p, _)| p as u32)
    }

    /// When the next partition goes idle, if any is active.
    pub fn next_idle_deadline(&self) -> Option<Instant> {
        self.tasks
            .iter()
            .flatten()
            .filter_map(|t| t.watermarks.next_idle_deadline())
            .min()
    }

    /// Open (window, key) entries.
    pub fn open_entries(&self) -> usize {
        self.tasks.iter().flatten().map(|t| t.state.entries()).sum()
    }

    /// Open windows (sessions count one each; a window open in several tasks counts
    /// once per task).
    pub fn open_windows(&self) -> usize {
        self.tasks.iter().flatten().map(|t| t.state.windows()).sum()
    }
}
