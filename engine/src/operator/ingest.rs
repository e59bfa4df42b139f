//! One record through the operator, concern by concern: its [`Origin`] is decoded once;
//! its position is noted (replay and commits), and a copy of an event left behind by a
//! crash is dropped (see [`Copies`](crate::replay::Copies)); the event is validated (event
//! time, group key, aggregate inputs); it is routed to its task (whose watermark its time
//! may move); it is counted into its open windows, or else it is late.

use std::time::Duration;

use tokio::time::Instant;

use super::task::State;
use super::WindowOperator;
use crate::config::{LatePolicy, STAGE_VALIDATE};
use crate::decode::{Decoded, TimeSource, Val};
use crate::origin::Origin;
use crate::outcome::{Emitted, Outcome};
use crate::output::{dead_letter, late_record, KEY_SEP};
use crate::record::{Position, Record};
use crate::replay;

impl WindowOperator {
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
        let origin = Origin::of(rec);
        self.note_position(rec, &origin, now);
        if self.offsets.kept(rec.position) || self.copies.superseded(&origin, &self.offsets) {
            return Outcome::Replayed;
        }
        if self.repartitioned {
            self.apply_markers(Some(rec.position), now);
        }
        let replaying = self.replaying(rec);
        let reason = format!("rejected by {stage}: {}", r.reason);
        let o = self.errors.handle(
            stage,
            rec,
            &origin,
            &reason,
            r.recoverable,
            replaying,
            now_ms,
            out,
        );
        if o == Outcome::Failed {
            self.unnote(rec);
        }
        self.ended(&origin, o);
        o
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
        let origin = Origin::of(rec);
        self.note_position(rec, &origin, now);
        if self.offsets.kept(rec.position) || self.copies.superseded(&origin, &self.offsets) {
            return Outcome::Replayed;
        }
        if self.repartitioned {
            self.apply_markers(Some(rec.position), now);
            self.from = crate::origin::origin_of(rec).map(|p| p.partition);
        }
        let o = self.window(rec, &origin, now, now_ms, out);
        self.ended(&origin, o);
        o
    }

    /// Validates the event, routes it to its task and counts it into its windows (or
    /// hands it to the late policy).
    #[inline]
    fn window(
        &mut self,
        rec: &Record,
        origin: &Origin,
        now: Instant,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        let replaying = self.replaying(rec);
        let ev = match self.decoder.decode_record(rec) {
            Ok(ev) => ev,
            Err(reason) => return self.invalid(rec, origin, &reason, replaying, now_ms, out),
        };
        let t = match self.event_time(rec, &ev, now_ms) {
            Ok(t) => t,
            Err(reason) => return self.invalid(rec, origin, &reason, replaying, now_ms, out),
        };
        if let Err(reason) = self.group_key(&ev.values) {
            return self.invalid(rec, origin, &reason, replaying, now_ms, out);
        }
        if let Err(reason) = self.aggs.read(&ev.values, &mut self.inputs) {
            return self.invalid(rec, origin, &reason, replaying, now_ms, out);
        }
        if !self.shared && !self.repartitioned && !self.keyed_by_group(rec, &ev.values) {
            self.share(rec, now);
        }
        let (ti, wm) = self.route(origin, t, now, now_ms);
        // Time moved on (so that windows close and make room) even if the event is refused.
        if self.open.saturating_add(self.per_event) > self.max_open {
            if let Some(reason) = self.state_full(ti, t) {
                return self.invalid(rec, origin, &reason, replaying, now_ms, out);
            }
        }
        let same_order = !self.shared && origin.moves_time();
        if self.count(ti, t, rec.position, (replaying, same_order), wm) {
            return Outcome::Windowed;
        }
        if replaying {
            return Outcome::Replayed;
        }
        self.late(rec, origin, t, wm, out)
    }

    // --- positions: what is committable, what is a replay ---

    /// Records that `rec` (from `origin`) was received: its position becomes committable
    /// once the outputs produced so far are acknowledged, and a record of the source topic
    /// keeps its partition from going idle.
    #[inline]
    fn note_position(&mut self, rec: &Record, origin: &Origin, now: Instant) {
        self.offsets.note(rec.position);
        if let Origin::Source { partition, .. } = *origin {
            let i = self.ensure_task(partition, now);
            if !self.repartitioned {
                self.task(i).watermarks.touch(partition, now);
            }
        }
    }

    /// Whether `rec` was processed before the restored checkpoint (its outcome was
    /// delivered before a restart).
    fn replaying(&self, rec: &Record) -> bool {
        self.offsets.replaying(rec.position)
    }

    /// The record from `origin` reached outcome `o`: if that is an end, a replayed event's
    /// later copies are dropped (see [`Copies`](crate::replay::Copies)).
    #[inline]
    fn ended(&mut self, origin: &Origin, o: Outcome) {
        if matches!(
            o,
            Outcome::Windowed | Outcome::Late | Outcome::Dead | Outcome::Skipped
        ) {
            self.copies.decided(origin, &self.offsets);
        }
    }

    /// Takes back [`note_position`](Self::note_position) for a record the pipeline stops
    /// on: the next start resumes from it.
    fn unnote(&mut self, rec: &Record) {
        self.offsets.unnote(rec.position);
    }

    // --- validation: the event's time, group key and inputs ---

    /// A record the `validate` stage refuses for `reason`.
    fn invalid(
        &mut self,
        rec: &Record,
        origin: &Origin,
        reason: &str,
        replaying: bool,
        now_ms: i64,
        out: &mut Emitted,
    ) -> Outcome {
        let o = self.errors.handle(
            STAGE_VALIDATE,
            rec,
            origin,
            reason,
            false,
            replaying,
            now_ms,
            out,
        );
        if o == Outcome::Failed {
            self.unnote(rec);
        }
        o
    }

    /// The event's time by the job's time source, within `max_future` of the wall clock.
    #[inline]
    fn event_time(&self, rec: &Record, ev: &Decoded<'_>, now_ms: i64) -> Result<i64, String> {
        event_time(&self.time, self.max_future, rec, ev, now_ms)
    }

    /// Encodes the event's group key into `key_buf`.
    #[inline]
    fn group_key(&mut self, values: &[Val<'_>]) -> Result<(), String> {
        group_key(&self.key_slots, values, &mut self.key_buf)
    }

    // --- routing: the task that counts the event, and its watermark ---

    /// The task that counts an event at `t` from `origin`, and that task's watermark after
    /// it. A source record moves its partition's event time (a future-dated one, within
    /// `max_future`, no further than the wall clock); a retried one keeps its own event
    /// time and never moves a watermark.
    #[inline]
    fn route(&mut self, origin: &Origin, t: i64, now: Instant, now_ms: i64) -> (usize, i64) {
        let ti = match origin {
            Origin::Source { partition, .. } => self.ensure_task(*partition, now),
            Origin::Retry(_) => self.retry_task(origin.source_partition(), now),
        };
        let (repartitioned, from) = (self.repartitioned, self.from);
        let watermarks = &mut self.task(ti).watermarks;
        let wm = match (origin, from) {
            // Repartitioned: the event time of the source partition it came from.
            (Origin::Source { .. }, Some(from)) if repartitioned => {
                watermarks.touch(from, now);
                watermarks.observe(from, t.min(now_ms))
            }
            // A record in the internal topic that no forwarder wrote moves no time.
            (Origin::Source { .. }, None) if repartitioned => watermarks.current(),
            (Origin::Source { partition, .. }, _) => watermarks.observe(*partition, t.min(now_ms)),
            (Origin::Retry(_), _) => watermarks.current(),
        };
        (ti, wm)
    }

    /// The task a retried record counts in: the one of the source partition it first came
    /// from, any task if that one is gone.
    fn retry_task(&mut self, source_partition: u32, now: Instant) -> usize {
        let i = self.task_index(source_partition);
        if let Some(Some(_)) = self.tasks.get(i) {
            return i;
        }
        if let Some(i) = self.tasks.iter().position(Option::is_some) {
            return i;
        }
        self.ensure_task(source_partition, now)
    }

    // --- counting: into the task's open windows ---

    /// Counts the event (group key in `key_buf`, inputs read) at `t` into every window of
    /// task `ti` still open at watermark `wm`; whether one was. After a restart, a replayed
    /// record counts again only where the checkpoint's watermark had not closed its window
    /// yet: the rest was delivered before (see [`replay::closed_at`] for `replay`: whether
    /// the record is a replay, and whether it comes in the first run's order).
    #[inline]
    fn count(&mut self, ti: usize, t: i64, pos: Position, replay: (bool, bool), wm: i64) -> bool {
        let (replaying, same_order) = replay;
        let (kind, grace) = (self.kind, self.grace);
        let (aggs, inputs, key) = (&self.aggs, &self.inputs, &self.key_buf);
        let task = self.tasks[ti].as_mut().expect("the task exists");
        let before = task.state.entries();
        let closed_at = replay::closed_at(replaying, same_order, task.replay_watermark, wm);
        let added = match &mut task.state {
            State::Fixed(store) => {
                let mut added = 0u64;
                let mut missed = 0u64;
                kind.for_each(t, |w| {
                    if w.end.saturating_add(grace) <= closed_at {
                        missed += 1;
                    } else {
                        added += 1;
                        store.add(w, key, pos, aggs, inputs);
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
                sessions.add(key, t, pos, aggs, inputs);
                true
            }
            State::Sessions(_) => false,
        };
        self.open += task.state.entries().saturating_sub(before);
        added
    }

    /// Counts the open entries again (windows closed since), and says why the event of
    /// the current group key at `t` is refused if it would take them past `max_open`.
    #[cold]
    fn state_full(&mut self, task: usize, t: i64) -> Option<String> {
        self.open = self.open_entries();
        let state = &self.tasks[task].as_ref()?.state;
        let opens = state.would_open(self.kind, &self.key_buf, t);
        (self.open + opens > self.max_open).then(|| {
            format!(
                "window state is full: {} open (window, key) entries, and this event would open {opens} more \
                 (window.max_open_entries = {})",
                self.open, self.max_open
            )
        })
    }

    // --- late: every window of the event had closed ---

    /// An event at `t` whose windows had all closed at watermark `wm`: to the late policy.
    fn late(
        &mut self,
        rec: &Record,
        origin: &Origin,
        t: i64,
        wm: i64,
        out: &mut Emitted,
    ) -> Outcome {
        let window = self.kind.assign(t);
        match &self.late {
            LatePolicy::DeadLetter => {
                let reason = format!(
                    "late event: window {}..{} closed at watermark {}",
                    crate::time::format_rfc3339(window.start),
                    crate::time::format_rfc3339(window.end),
                    crate::time::format_rfc3339(wm)
                );
                out.dead
                    .push(dead_letter(&self.topic, origin, rec, &reason));
            }
            LatePolicy::Output(_) => {
                out.late
                    .push(late_record(&self.topic, origin, rec, window, wm))
            }
            LatePolicy::Drop => {}
        }
        Outcome::Late
    }
}

/// The time of event `ev` (of `rec`) by `time`, within `max_future` (ms) of the wall
/// clock `now_ms`; else why not.
#[inline]
pub(crate) fn event_time(
    time: &TimeSource,
    max_future: Option<i64>,
    rec: &Record,
    ev: &Decoded<'_>,
    now_ms: i64,
) -> Result<i64, String> {
    let t = match (time, ev.time) {
        (TimeSource::Field { .. }, Some(t)) => t,
        (TimeSource::Broker, _) => rec
            .timestamp
            .ok_or_else(|| "record has no broker timestamp".to_string())?,
        _ => now_ms,
    };
    match max_future {
        Some(limit) if t > now_ms.saturating_add(limit) => Err(format!(
            "event time {} is more than {} ahead of the wall clock ({}; event_time.max_future)",
            crate::time::format_rfc3339(t),
            crate::time::format_duration(Duration::from_millis(limit as u64)),
            crate::time::format_rfc3339(now_ms),
        )),
        _ => Ok(t),
    }
}

/// Encodes the group key of the event whose values are `values` into `buf`: the values
/// of `key_slots` (slot, field name), as JSON, separated by [`KEY_SEP`].
#[inline]
pub(crate) fn group_key(
    key_slots: &[(usize, String)],
    values: &[Val<'_>],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    for (i, (slot, name)) in key_slots.iter().enumerate() {
        if i > 0 {
            buf.push(KEY_SEP);
        }
        let v = &values[*slot];
        match v {
            Val::Str(_) | Val::Int(_) | Val::Float(_) | Val::Bool(_) => v.write_json(buf),
            Val::Missing | Val::Null => {
                return Err(format!("missing group-by field `{name}`"));
            }
            Val::Object | Val::Array => {
                return Err(format!(
                    "group-by field `{name}` must be a string, number or boolean"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::origin::Input;
    use crate::record::Checkpoint;
    use crate::retry::envelope::{unwrap, wrap};
    use crate::Job;

    fn source(offset: u64) -> Record {
        Record {
            key: Some(Bytes::from_static(b"a")),
            payload: Bytes::from(format!(r#"{{"k":"a","t":{}}}"#, 1_000 + offset)),
            position: Position {
                partition: 0,
                offset,
            },
            ..Default::default()
        }
    }

    /// The retry record that run `run` wrote for the source record at `offset`, read back
    /// at offset `at` of the retry topic's partition 0.
    fn retried(offset: u64, run: u64, at: u64) -> Record {
        let rec = source(offset);
        let meta = Origin::of(&rec).retry_meta("t", run);
        let out = wrap(&rec, meta, 0);
        unwrap(Record {
            key: out.key,
            payload: out.payload,
            position: Position {
                partition: Input::Retry.partition(0),
                offset: at,
            },
            ..Default::default()
        })
        .1
    }

    /// An operator restarted from a checkpoint that marks source offsets below `processed`
    /// as processed (the retry partition from its start).
    fn restarted(processed: u64) -> WindowOperator {
        let job = Job::tumbling_count("k", "t", Duration::from_secs(10));
        let mut op = WindowOperator::new(&job, "t");
        let cp = |processed| {
            Some(Checkpoint {
                watermark: i64::MIN,
                processed,
            })
        };
        let now = Instant::now();
        op.assign(&[(Input::Retry.partition(0), cp(0))], now);
        op.assign(&[(0, cp(processed))], now);
        op
    }

    fn counted(op: &mut WindowOperator) -> String {
        let mut out = Emitted::default();
        op.close_all(&mut out);
        out.results
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).to_string())
            .collect()
    }

    #[test]
    fn an_earlier_runs_retry_of_a_source_record_read_again_after_the_checkpoint_is_dropped() {
        let mut op = restarted(5);
        let (now, mut out) = (Instant::now(), Emitted::default());
        // Offset 7 went to the retry topic in the killed run, after its last checkpoint:
        // read again, it is decided anew (its profile has come), and the old retry record
        // is a copy.
        assert_eq!(op.ingest(&source(7), now, 0, &mut out), Outcome::Windowed);
        let old = retried(7, op.copies.run() ^ 1, 0);
        assert_eq!(op.ingest(&old, now, 0, &mut out), Outcome::Replayed);
        // This run's own retry records are not copies.
        let own = retried(8, op.copies.run(), 1);
        assert_eq!(op.ingest(&own, now, 0, &mut out), Outcome::Windowed);
        assert!(counted(&mut op).contains(r#""count":2"#));
    }

    #[test]
    fn a_retry_partition_revoked_and_read_again_is_not_counted_twice() {
        let mut op = restarted(0);
        let (now, mut out) = (Instant::now(), Emitted::default());
        let own = op.copies.run();
        // A source record, then a retried one of the same (key, window): one entry.
        assert_eq!(op.ingest(&source(1), now, 0, &mut out), Outcome::Windowed);
        assert_eq!(
            op.ingest(&retried(2, own, 0), now, 0, &mut out),
            Outcome::Windowed
        );
        // The retry topic's group rebalances: its partition goes and comes back, and the
        // record is read again from the committed position.
        let r = Input::Retry.partition(0);
        op.revoke(&[r], false);
        op.assign(&[(r, None)], now);
        assert_eq!(
            op.ingest(&retried(2, own, 0), now, 0, &mut out),
            Outcome::Replayed
        );
        assert_eq!(
            op.ingest(&retried(3, own, 1), now, 0, &mut out),
            Outcome::Windowed
        );
        assert!(counted(&mut op).contains(r#""count":3"#));
    }

    #[test]
    fn the_first_copy_of_a_replayed_event_to_reach_an_end_counts_and_the_others_are_dropped() {
        let mut op = restarted(10);
        let (now, mut out) = (Instant::now(), Emitted::default());
        let earlier = op.copies.run() ^ 1;
        // The replayed source record first: its retry record is a copy.
        assert_eq!(op.ingest(&source(4), now, 0, &mut out), Outcome::Windowed);
        let copy = retried(4, earlier, 0);
        assert_eq!(op.ingest(&copy, now, 0, &mut out), Outcome::Replayed);
        // The retry record first: the replayed source record is the copy.
        assert_eq!(
            op.ingest(&retried(5, earlier, 1), now, 0, &mut out),
            Outcome::Windowed
        );
        assert_eq!(op.ingest(&source(5), now, 0, &mut out), Outcome::Replayed);
        assert!(counted(&mut op).contains(r#""count":2"#));
    }
}
