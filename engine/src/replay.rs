//! Replay and offset bookkeeping: how far each source partition was read, what is safe to
//! commit, and which records after a restart are a replay.
//!
//! A commit of `(partition, offset)` means "every record before `offset` is done"; records
//! still held by an open window are not done, so the committable position is the lower of
//! the next offset after the last record seen and the lowest offset an open window holds.
//! Each commit carries a [`Checkpoint`] `{ watermark, processed }`. When the partition is
//! assigned again with it, records below `processed` are a *replay*: those whose window
//! had closed at the checkpoint's watermark were delivered before and are skipped (see
//! [`closed_at`]), the others are counted again. A partition revoked and then assigned back
//! without a newer checkpoint (a reconnect that redelivers) uses the checkpoint this
//! pipeline would have committed when it lost it.

use std::collections::HashSet;

use crate::origin::Origin;
use crate::record::{Checkpoint, Position};

/// Per source partition (retry partitions included): the next offset after the last
/// record seen, the replay mark restored from a checkpoint, and the checkpoint remembered
/// when the partition was revoked.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    /// Next offset after the last record seen, by partition.
    next: Vec<Option<u64>>,
    /// After a restart, by partition: the offset below which records were processed
    /// before the checkpoint (a replay); `None` without a checkpoint.
    replay: Vec<Option<u64>>,
    /// By partition: the checkpoint this pipeline would have committed when the partition
    /// was revoked, used if it comes back without a later one.
    forgotten: Vec<Option<Checkpoint>>,
    /// By partition of another input than the source topic's: the offset below which its
    /// records stay counted in the windows through a revocation (see [`Offsets::keep`]).
    kept: Vec<Option<u64>>,
}

impl Offsets {
    /// Records that the record at `pos` was received.
    #[inline]
    pub(crate) fn note(&mut self, pos: Position) {
        let p = pos.partition as usize;
        if self.next.len() <= p {
            self.next.resize(p + 1, None);
        }
        self.next[p] = Some(pos.offset + 1);
    }

    /// Takes back [`note`](Self::note) for a record the pipeline stops on: the next start
    /// resumes from it.
    pub(crate) fn unnote(&mut self, pos: Position) {
        if let Some(n) = self.next.get_mut(pos.partition as usize) {
            *n = Some(pos.offset);
        }
    }

    /// Whether the record at `pos` was processed before the restored checkpoint.
    #[inline]
    pub(crate) fn replaying(&self, pos: Position) -> bool {
        self.restored(pos.partition)
            .is_some_and(|until| pos.offset < until)
    }

    /// The `processed` mark of the checkpoint `partition` was (last) assigned with, if
    /// any: records below it had their outcome delivered before.
    #[inline]
    pub(crate) fn restored(&self, partition: u32) -> Option<u64> {
        self.replay.get(partition as usize).copied().flatten()
    }

    /// Whether a record of `partition` was received since it was (last) assigned.
    pub(crate) fn seen(&self, partition: u32) -> bool {
        self.next
            .get(partition as usize)
            .copied()
            .flatten()
            .is_some()
    }

    /// How far `partition` was processed: the `processed` of its next checkpoint.
    pub(crate) fn processed(&self, partition: u32) -> u64 {
        let p = partition as usize;
        self.next
            .get(p)
            .copied()
            .flatten()
            .unwrap_or(0)
            .max(self.restored(partition).unwrap_or(0))
    }

    /// `partition` is assigned with its `committed` checkpoint: the later of it and the one
    /// remembered at its revocation sets the replay mark and is returned (its watermark is
    /// the task's to restore).
    pub(crate) fn restore(
        &mut self,
        partition: u32,
        committed: Option<Checkpoint>,
    ) -> Option<Checkpoint> {
        let i = partition as usize;
        let remembered = self.forgotten.get_mut(i).and_then(Option::take);
        let cp = match (committed, remembered) {
            (Some(c), Some(r)) if r.processed > c.processed => Some(r),
            (c, r) => c.or(r),
        }?;
        if self.replay.len() <= i {
            self.replay.resize(i + 1, None);
        }
        self.replay[i] = Some(cp.processed);
        Some(cp)
    }

    /// `partition` is revoked: its positions are forgotten, and `checkpoint` (what would
    /// have been committed now, if it was read) is remembered for its return.
    pub(crate) fn revoke(&mut self, partition: u32, checkpoint: Option<Checkpoint>) {
        let i = partition as usize;
        if let Some(cp) = checkpoint {
            if self.forgotten.len() <= i {
                self.forgotten.resize(i + 1, None);
            }
            self.forgotten[i] = Some(cp);
        }
        if let Some(n) = self.next.get_mut(i) {
            *n = None;
        }
        if let Some(r) = self.replay.get_mut(i) {
            *r = None;
        }
    }

    /// `partition` (of the retry topic) is revoked while the windows keep what its records
    /// added: they are shared with the source's partitions, which stay. Read again after
    /// it comes back, its records below the mark are already counted.
    pub(crate) fn keep(&mut self, partition: u32) {
        let i = partition as usize;
        let mark = self.processed(partition);
        if self.kept.len() <= i {
            self.kept.resize(i + 1, None);
        }
        self.kept[i] = Some(self.kept[i].unwrap_or(0).max(mark));
    }

    /// Whether the record at `pos` is already counted in the windows (see
    /// [`keep`](Self::keep)).
    #[inline]
    pub(crate) fn kept(&self, pos: Position) -> bool {
        self.kept
            .get(pos.partition as usize)
            .copied()
            .flatten()
            .is_some_and(|k| pos.offset < k)
    }

    /// For each partition seen, the position up to which everything is handled once the
    /// outputs produced so far are acknowledged: not past `held(p)`, the lowest offset of
    /// partition `p` that an open window still holds.
    pub(crate) fn safe_positions(&self, held: impl Fn(u32) -> Option<u64>) -> Vec<Position> {
        self.next
            .iter()
            .enumerate()
            .filter_map(|(p, next)| {
                let next = (*next)?;
                let held = held(p as u32).unwrap_or(u64::MAX);
                Some(Position {
                    partition: p as u32,
                    offset: next.min(held),
                })
            })
            .collect()
    }
}

/// Copies of one event after a restart. An event that a stage could not handle yet lives
/// on as retry records, one after another, each naming its source record (its
/// [`Origin::Retry`]); a kill -9 can leave such a chain behind while the source record is
/// read again, so the same event could be counted twice. Two rules keep one of them:
///
/// - **Read again after the checkpoint: decided anew.** A source record at or past the
///   `processed` mark its partition was assigned with is processed as new, so the retry
///   records that an earlier run (another `run` id) wrote for it are dropped.
/// - **Replayed: the first copy decides.** For a source record below that mark, the
///   earlier run's decision was delivered, but a replay cannot tell whether it was "count"
///   or "retry": whichever copy (the replayed source record, or one of its retry records)
///   reaches an end first (counted, late, dead-lettered, skipped) is remembered, and later
///   copies are dropped. Only those events are remembered, so the set is bounded by what
///   was uncommitted at the restart; a revoked partition's go with it.
///
/// Both need the source partition's checkpoint: a retry record whose source partition this
/// pipeline was not assigned (another instance's) is handled as it comes.
#[derive(Debug)]
pub(crate) struct Copies {
    /// This run's id, written into its retry records.
    run: u64,
    /// Source positions of replayed events that reached an end in this run.
    decided: HashSet<Position>,
}

impl Copies {
    /// Copies of events for a run with id `run` (not 0: retry records from before run ids
    /// carry 0).
    pub(crate) fn new(run: u64) -> Self {
        Copies {
            run: run.max(1),
            decided: HashSet::new(),
        }
    }

    /// This run's id.
    pub(crate) fn run(&self) -> u64 {
        self.run
    }

    /// Whether the record from `origin` is a copy of an event this run decides otherwise:
    /// it is dropped, with no output.
    #[inline]
    pub(crate) fn superseded(&self, origin: &Origin, offsets: &Offsets) -> bool {
        let source = origin.source_position();
        let Some(mark) = offsets.restored(source.partition) else {
            return false;
        };
        if source.offset >= mark {
            return matches!(origin, Origin::Retry(r) if r.run != self.run);
        }
        !self.decided.is_empty() && self.decided.contains(&source)
    }

    /// The record from `origin` reached an end (counted, late, dead-lettered, skipped).
    #[inline]
    pub(crate) fn decided(&mut self, origin: &Origin, offsets: &Offsets) {
        let source = origin.source_position();
        if offsets
            .restored(source.partition)
            .is_some_and(|mark| source.offset < mark)
        {
            self.decided.insert(source);
        }
    }

    /// Forgets the events of a revoked source partition.
    pub(crate) fn revoke(&mut self, partition: u32) {
        if !self.decided.is_empty() {
            self.decided.retain(|p| p.partition != partition);
        }
    }

    /// How many events are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.decided.len()
    }
}

/// A fresh id for this run (process and operator): what tells its retry records from an
/// earlier run's.
pub(crate) fn run_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(crate::time::now_millis());
    h.write_u32(std::process::id());
    h.finish()
}

/// The watermark up to which a record's windows count as closed: for a new record the
/// task's current watermark; for a replayed one the highest checkpoint watermark restored
/// into its task (windows closed there were delivered before the restart) and, when the
/// replay comes in the first run's order (`same_order`: a source record in a task of one
/// partition), the current watermark too: a window this run closed had closed at the same
/// record in the first run, where this one was late (and its late outcome delivered), so it
/// must not reopen the window. Records of a shared task or the retry topic interleave
/// differently in every run: for them a window closed since the restart may still have
/// been open when the first run counted them.
#[inline]
pub(crate) fn closed_at(
    replaying: bool,
    same_order: bool,
    replay_watermark: i64,
    watermark: i64,
) -> i64 {
    match (replaying, same_order) {
        (false, _) => watermark,
        (true, true) => replay_watermark.max(watermark),
        (true, false) => replay_watermark,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }

    fn cp(watermark: i64, processed: u64) -> Checkpoint {
        Checkpoint {
            watermark,
            processed,
        }
    }

    #[test]
    fn safe_positions_follow_the_last_record_seen_unless_a_window_holds_less() {
        let mut o = Offsets::default();
        assert!(o.safe_positions(|_| None).is_empty());
        o.note(pos(0, 4));
        o.note(pos(2, 9));
        assert!(o.seen(0) && !o.seen(1) && o.seen(2));
        let held = |p: u32| (p == 2).then_some(7);
        assert_eq!(o.safe_positions(held), vec![pos(0, 5), pos(2, 7)]);
        assert_eq!(
            o.safe_positions(|p| (p == 0).then_some(100)),
            vec![pos(0, 5), pos(2, 10)]
        );
    }

    #[test]
    fn a_record_the_pipeline_stops_on_is_not_committed() {
        let mut o = Offsets::default();
        o.note(pos(1, 3));
        o.note(pos(1, 4));
        o.unnote(pos(1, 4));
        assert_eq!(o.safe_positions(|_| None), vec![pos(1, 4)]);
        assert_eq!(o.processed(1), 4);
    }

    #[test]
    fn records_below_the_checkpoints_processed_offset_are_a_replay() {
        let mut o = Offsets::default();
        assert!(!o.replaying(pos(0, 0)));
        assert_eq!(o.restore(0, Some(cp(1_000, 10))), Some(cp(1_000, 10)));
        assert!(o.replaying(pos(0, 9)));
        assert!(!o.replaying(pos(0, 10)));
        assert!(!o.replaying(pos(1, 0)), "another partition has no replay");
        // Until it reads past the replay, the partition checkpoints what it had processed.
        o.note(pos(0, 3));
        assert_eq!(o.processed(0), 10);
        o.note(pos(0, 12));
        assert_eq!(o.processed(0), 13);
        assert_eq!(o.restore(3, None), None);
        assert!(!o.replaying(pos(3, 0)));
    }

    #[test]
    fn a_revoked_partition_comes_back_with_the_checkpoint_it_would_have_committed() {
        let mut o = Offsets::default();
        o.note(pos(0, 7));
        o.revoke(0, Some(cp(500, 8)));
        assert!(!o.seen(0));
        assert!(o.safe_positions(|_| None).is_empty());
        // Back without a committed checkpoint (a reconnect that redelivers): the remembered
        // one makes records 0..8 a replay.
        assert_eq!(o.restore(0, None), Some(cp(500, 8)));
        assert!(o.replaying(pos(0, 7)));
        // The remembered checkpoint is used once.
        o.revoke(0, None);
        assert!(!o.replaying(pos(0, 7)), "revoking ends the replay");
        assert_eq!(o.restore(0, None), None);
    }

    #[test]
    fn the_later_of_the_committed_and_the_remembered_checkpoint_wins() {
        let mut o = Offsets::default();
        o.revoke(0, Some(cp(500, 8)));
        assert_eq!(o.restore(0, Some(cp(400, 5))), Some(cp(500, 8)));
        o.revoke(0, Some(cp(500, 8)));
        assert_eq!(o.restore(0, Some(cp(900, 20))), Some(cp(900, 20)));
        assert!(o.replaying(pos(0, 19)));
    }

    fn retried(partition: u32, offset: u64, run: u64) -> Origin {
        Origin::Retry(Box::new(crate::origin::Retried {
            topic: "src".into(),
            partition,
            offset,
            attempts: 1,
            due: 0,
            run,
            history: Vec::new(),
        }))
    }

    #[test]
    fn an_earlier_runs_retry_of_a_record_read_again_after_the_checkpoint_is_dropped() {
        let mut o = Offsets::default();
        let copies = Copies::new(7);
        // Before the source partition's checkpoint is known: as it comes.
        assert!(!copies.superseded(&retried(0, 12, 3), &o));
        o.restore(0, Some(cp(1_000, 10)));
        assert!(
            copies.superseded(&retried(0, 12, 3), &o),
            "read again: decided anew"
        );
        assert!(
            copies.superseded(&retried(0, 10, 0), &o),
            "no run id: an earlier run"
        );
        assert!(
            !copies.superseded(&retried(0, 12, 7), &o),
            "this run's own retry"
        );
        assert!(
            !copies.superseded(&retried(0, 9, 3), &o),
            "replayed: first copy decides"
        );
        assert!(
            !copies.superseded(&retried(1, 12, 3), &o),
            "another partition's"
        );
    }

    #[test]
    fn the_first_copy_of_a_replayed_event_to_reach_an_end_wins() {
        let mut o = Offsets::default();
        o.restore(0, Some(cp(1_000, 10)));
        let mut copies = Copies::new(7);
        let source = Origin::Source {
            partition: 0,
            offset: 4,
        };
        // The replayed source record is counted: its retry records are copies.
        assert!(!copies.superseded(&source, &o));
        copies.decided(&source, &o);
        assert!(copies.superseded(&retried(0, 4, 3), &o));
        assert!(copies.superseded(&retried(0, 4, 7), &o));
        // A retry record counted first: the replayed source record is the copy.
        copies.decided(&retried(0, 5, 3), &o);
        assert!(copies.superseded(
            &Origin::Source {
                partition: 0,
                offset: 5
            },
            &o
        ));
        // Records past the mark are not remembered; a revoked partition's are forgotten.
        copies.decided(&retried(0, 11, 7), &o);
        assert_eq!(copies.len(), 2);
        copies.revoke(0);
        assert_eq!(copies.len(), 0);
    }

    #[test]
    fn replayed_records_are_judged_by_the_checkpoints_watermark() {
        assert_eq!(closed_at(true, false, 1_000, 5_000), 1_000);
        assert_eq!(closed_at(true, true, 1_000, 5_000), 5_000);
        assert_eq!(closed_at(true, true, 6_000, 5_000), 6_000);
        assert_eq!(closed_at(false, false, 1_000, 5_000), 5_000);
    }
}
