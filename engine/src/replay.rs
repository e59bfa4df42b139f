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

use crate::record::{Checkpoint, Position};

/// Per source partition (retry partitions included): the next offset after the last
/// record seen, the replay mark restored from a checkpoint, and the checkpoint remembered
/// when the partition was revoked.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    /// Next offset after the last record seen, by partition.
    next: Vec<Option<u64>>,
    /// After a restart, by partition: the offset below which records were processed
    /// before the checkpoint (a replay).
    replay: Vec<u64>,
    /// By partition: the checkpoint this pipeline would have committed when the partition
    /// was revoked, used if it comes back without a later one.
    forgotten: Vec<Option<Checkpoint>>,
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
        self.replay
            .get(pos.partition as usize)
            .is_some_and(|&until| pos.offset < until)
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
            .max(self.replay.get(p).copied().unwrap_or(0))
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
            self.replay.resize(i + 1, 0);
        }
        self.replay[i] = cp.processed;
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
            *r = 0;
        }
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

/// The watermark up to which a record's windows count as closed: for a replayed record the
/// highest checkpoint watermark restored into its task (windows closed there were
/// delivered before the restart), otherwise the task's current watermark.
#[inline]
pub(crate) fn closed_at(replaying: bool, replay_watermark: i64, watermark: i64) -> i64 {
    if replaying {
        replay_watermark
    } else {
        watermark
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

    #[test]
    fn replayed_records_are_judged_by_the_checkpoints_watermark() {
        assert_eq!(closed_at(true, 1_000, 5_000), 1_000);
        assert_eq!(closed_at(false, 1_000, 5_000), 5_000);
    }
}
