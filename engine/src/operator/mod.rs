//! The windowed aggregation operator: decodes records, assigns them to windows, keeps
//! watermarks and says which source positions are safe to commit. Synchronous and
//! broker-agnostic; the [`runtime`](crate::runtime) drives it.

mod close;
mod ingest;
mod job;
mod partitions;
mod task;

use std::time::Duration;

use tokio::time::Instant;

use crate::aggregate::{Aggregates, Inputs};
use crate::config::{EmitMode, LatePolicy};
use crate::decode::{Decoder, TimeSource, Val};
use crate::error_policy::{ErrorCallback, ErrorHandler};
use crate::origin::Input;
use crate::output::ResultEncoder;
use crate::record::{Checkpoint, Position, Record};
use crate::replay::{Copies, Offsets};
use crate::window::WindowKind;

pub use crate::outcome::{Emitted, Outcome};
pub(crate) use ingest::{event_time, group_key};
pub use job::Job;
use task::Task;

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
    /// By source partition, the task it counts in while not `shared`: its own index, or
    /// the task of the partitions it continues (see [`WindowOperator::continues`]).
    /// Partitions beyond its end count in their own.
    task_of: Vec<u32>,
    /// By source partition: whether its task exists and holds it (the hot path's check).
    ready: Vec<bool>,
    /// How far each partition was read, and what of it is a replay.
    offsets: Offsets,
    /// Copies of events a crash left behind (the source record read again beside its
    /// retry records): which one counts.
    copies: Copies,
    /// The bound on open (window, key) entries (`window.max_open_entries`).
    max_open: usize,
    /// Open entries, counted up as events open them; at least the true number (closing
    /// windows does not count it down: it is counted again when it nears `max_open`).
    open: usize,
    /// The most entries one event may open.
    per_event: usize,
    /// How many partitions the source topic has, if the source knows: a shared task holds
    /// its watermark while fewer are assigned here.
    expected: Option<u32>,
    /// The source partitions of the last assignment that listed any (kept through a
    /// revocation of all of them): what an eager rebalance's next assignment is compared
    /// with.
    had: Vec<u32>,
    /// Since when a shared task has held its watermark for want of partitions.
    held_since: Option<Instant>,
    /// Why this operator cannot go on exactly (unkeyed input whose partitions another
    /// instance reads): the runtime stops with it.
    conflict: Option<String>,
    /// Window intervals closed lately: one closed by several tasks counts once.
    closed: close::ClosedWindows,
    /// Whether the input is a repartition stage's internal topic (see
    /// [`crate::repartition`]): keyed by the group key, each task's event time kept by
    /// origin, markers taken out of each batch.
    repartitioned: bool,
    /// Repartitioned: the source partition the record being ingested came from.
    from: Option<u32>,
    /// Repartitioned: markers of the batch not applied yet, with their positions.
    markers: Vec<(Position, crate::origin::Marker)>,
}

/// How long a shared task may hold its watermark for want of partitions before the
/// pipeline stops: longer than any broker takes to hand a dead member's partitions over
/// (Kafka's consumer-protocol session timeout is 45 s by default), so that only partitions
/// another live instance reads end the run.
pub const UNKEYED_HOLD_LIMIT: Duration = Duration::from_secs(120);

/// What to do about unkeyed input read by several instances, in the errors that say so.
const UNKEYED_ADVICE: &str =
    "Set `[source] repartition = true` (Kafka and memory) to have Weir key them by the group \
     key itself, key the source records by a group-by field (as `weir produce` and Weir's sinks \
     do), or run a single instance for this input (README, \"Running several instances\").";

impl WindowOperator {
    /// An operator for `job`, reading records of `topic` (named in dead letters).
    pub fn new(job: &Job, topic: &str) -> Self {
        let (mut decoder, key_slots) = job.key_decoder();
        let aggs = Aggregates::new(
            job.compute
                .iter()
                .map(|f| (f.clone(), f.field().map_or(0, |p| decoder.want(p))))
                .collect(),
        );
        let copies = Copies::new(crate::replay::run_id());
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
            errors: ErrorHandler::new(job.errors.clone(), job.retry.clone(), topic, copies.run()),
            tasks: Vec::new(),
            shared: false,
            task_of: Vec::new(),
            ready: Vec::new(),
            offsets: Offsets::default(),
            copies,
            max_open: job.window.max_open_entries,
            open: 0,
            per_event: job.window.kind.windows_per_event().min(usize::MAX as u64) as usize,
            expected: None,
            had: Vec::new(),
            held_since: None,
            conflict: None,
            closed: close::ClosedWindows::default(),
            repartitioned: false,
            from: None,
            markers: Vec::new(),
        }
    }

    /// Reads a repartition stage's internal topic (see [`crate::repartition`]): records
    /// are keyed by the group key, each task keeps one event time per origin (source
    /// partition) and takes the lowest, and markers say which origins are idle.
    pub fn repartitioned(&mut self) {
        self.repartitioned = true;
    }

    /// Takes the markers out of `batch` (a repartitioned input's): each is applied to the
    /// task of its partition right before the first record after it there is ingested
    /// (the records before it are what it speaks of), the rest by
    /// [`apply_markers`](Self::apply_markers) after the batch. Their positions count as
    /// read. How many.
    pub fn take_markers(&mut self, batch: &mut Vec<Record>) -> usize {
        if !self.repartitioned {
            return 0;
        }
        let before = batch.len();
        batch.retain(|rec| {
            let Some(marker) = crate::origin::Marker::of(rec) else {
                return true;
            };
            self.offsets.note(rec.position);
            match marker {
                Some(m) if Input::is_source(rec.position.partition) => {
                    self.markers.push((rec.position, m))
                }
                Some(_) => {}
                None => tracing::warn!(
                    partition = rec.position.partition,
                    offset = rec.position.offset,
                    "repartition: a marker that cannot be read was skipped"
                ),
            }
            false
        });
        before - batch.len()
    }

    /// Applies the markers taken out of the batch that come before `pos` in its partition
    /// (`None`: all of them).
    pub fn apply_markers(&mut self, pos: Option<Position>, now: Instant) {
        if self.markers.is_empty() {
            return;
        }
        let mut markers = std::mem::take(&mut self.markers);
        markers.retain(|(at, m)| {
            if pos.is_some_and(|p| p.partition != at.partition || p.offset < at.offset) {
                return true;
            }
            let i = self.ensure_task(at.partition, now);
            let w = &mut self.task(i).watermarks;
            for &(origin, stamp, state) in &m.origins {
                w.mark(m.count, origin, stamp, state, now);
            }
            false
        });
        self.markers = markers;
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
        let mut t = Task::new(
            self.kind,
            self.emit == EmitMode::Update,
            self.out_of_orderness,
            self.idle_timeout,
        );
        if self.repartitioned {
            t.watermarks.set_by_origin();
        }
        t
    }

    /// The task that holds source partition `p`'s windows.
    #[inline]
    fn task_index(&self, p: u32) -> usize {
        if self.shared {
            0
        } else {
            self.task_of.get(p as usize).copied().unwrap_or(p) as usize
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
        let by_origin = self.repartitioned;
        if let Some(t) = self.tasks[i].as_mut().filter(|_| !by_origin) {
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
        self.hold_shared();
    }

    /// Says how many partitions the source topic has, if the source knows (see
    /// [`Source::partition_count`](crate::source::Source::partition_count)).
    pub fn expect_partitions(&mut self, count: Option<u32>) {
        self.expected = count;
        self.hold_shared();
    }

    /// Whether the shared task holds its watermark because some of the source topic's
    /// partitions are not assigned here.
    pub fn holding(&self) -> bool {
        if self.repartitioned {
            // Some origin is not idle yet (or no marker came): its forwarder may still
            // write, or another one take its partitions over.
            return self.tasks.iter().flatten().any(|t| t.watermarks.waiting());
        }
        self.shared
            && self
                .tasks
                .first()
                .and_then(Option::as_ref)
                .is_some_and(|t| t.watermarks.is_held())
    }

    /// A shared task holds its watermark while some partitions of the source topic are not
    /// assigned here: windows closed without their records would be emitted with part of
    /// their count (a restart that joins while the killed instance still holds them).
    fn hold_shared(&mut self) {
        if !self.shared {
            return;
        }
        let assigned = self.partitions().count() as u32;
        let hold = self.expected.is_some_and(|n| assigned < n);
        let Some(task) = self.tasks.first_mut().and_then(Option::as_mut) else {
            return;
        };
        if !hold {
            self.held_since = None;
        } else if self.held_since.is_none() {
            self.held_since = Some(Instant::now());
        }
        if task.watermarks.is_held() != hold {
            if hold {
                tracing::warn!(
                    assigned,
                    partitions = self.expected.unwrap_or(0),
                    "holding windows open: the input is not keyed by the group key, and some partitions are not assigned here \
                     (a killed instance's until its session ends, or another instance's: a single instance must read them all)"
                );
            } else {
                tracing::info!(assigned, "every partition assigned: windows close again");
            }
            task.watermarks.hold(hold);
        }
    }

    /// Why the pipeline cannot go on exactly, if it cannot: the input is not keyed by the
    /// group key and another instance reads some of its partitions. Known at once when
    /// partitions this one read were revoked while others stay (see
    /// [`assign`](Self::assign), [`revoke`](Self::revoke)), or once the shared task has
    /// held its watermark for want of partitions for [`UNKEYED_HOLD_LIMIT`] (instances
    /// that started together).
    pub fn conflict(&mut self, now: Instant) -> Option<String> {
        if self.conflict.is_none() {
            if let Some(since) = self.held_since {
                if now.saturating_duration_since(since) >= UNKEYED_HOLD_LIMIT {
                    let assigned: Vec<u32> = self.partitions().collect();
                    self.conflict = Some(format!(
                        "the input is not keyed by the group key, and for {} this instance was assigned only \
                         partitions {assigned:?} of the {} the topic has: another instance reads the others, \
                         and windows counted in pieces would be wrong. {}",
                        crate::time::format_duration(UNKEYED_HOLD_LIMIT),
                        self.expected.unwrap_or(0),
                        UNKEYED_ADVICE
                    ));
                }
            }
        }
        self.conflict.clone()
    }

    /// Notes that `revoked` source partitions went elsewhere while `kept` stay here, with
    /// a shared task: its windows hold records of both, and can be completed nowhere.
    #[cold]
    fn split_up(&mut self, revoked: &[u32], kept: &[u32]) {
        if self.conflict.is_none() {
            let why = format!(
                "the input is not keyed by the group key, and partitions {revoked:?} were taken from this instance \
                 while it keeps {kept:?} (another instance of the group joined, or their connection was lost): \
                 windows that records of both fed cannot be completed here. Stopping without committing: \
                 restarted, a single instance recounts them from the committed positions. {UNKEYED_ADVICE}"
            );
            self.conflict = Some(why);
        }
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

    /// The watermark of the task that holds `partition` of the merged source (for another
    /// input's partitions, the lowest of all tasks).
    fn watermark_of(&self, partition: u32) -> i64 {
        if Input::is_source(partition) {
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
            processed: self.offsets.processed(partition),
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
        self.offsets.safe_positions(|p| {
            self.tasks
                .iter()
                .flatten()
                .filter_map(|t| t.state.min_offset(p))
                .min()
        })
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

    /// Open windows: distinct intervals `[start, end)` open in any task (a window open in
    /// several partitions' tasks counts once); sessions count one each (a key's session).
    pub fn open_windows(&self) -> usize {
        let mut ranges = std::collections::BTreeSet::new();
        let mut sessions = 0;
        for t in self.tasks.iter().flatten() {
            match &t.state {
                task::State::Fixed(s) => ranges.extend(s.ranges()),
                task::State::Sessions(s) => sessions += s.entries(),
            }
        }
        ranges.len() + sessions
    }
}
