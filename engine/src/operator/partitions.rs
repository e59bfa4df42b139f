//! Partitions coming and going: assignments (with their checkpoints) and revocations.

use tokio::time::Instant;

use super::WindowOperator;
use crate::origin::Input;
use crate::record::Checkpoint;

impl WindowOperator {
    /// Declares the source partitions assigned to this pipeline (the whole current set),
    /// with the checkpoints committed for them. Each partition's task starts from its
    /// checkpoint's watermark; records below the checkpoint's `processed` offset are a
    /// replay: those whose window that watermark had closed are skipped (their results
    /// were delivered), the others are counted again.
    pub fn assign(&mut self, partitions: &[(u32, Option<Checkpoint>)], now: Instant) {
        // Only the source topic's partitions hold or move a watermark; an assignment of
        // only another input's (the retry topic's consumer) leaves the source's as they are.
        let ids: Vec<u32> = partitions
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| Input::is_source(*p))
            .collect();
        // An eager rebalance revokes every partition and then assigns this instance's new
        // share: fewer than it read before means another instance took some.
        if self.shared && !ids.is_empty() {
            let taken: Vec<u32> = self
                .had
                .iter()
                .copied()
                .filter(|p| !ids.contains(p))
                .collect();
            if !taken.is_empty() {
                self.split_up(&taken, &ids);
            }
        }
        if !ids.is_empty() {
            self.had = ids.clone();
        }
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
            // Back after this pipeline had it (a reconnect that redelivers, a rebalance that
            // returns it): what it had processed then is a replay too, so its emitted
            // windows are not emitted again and its records are not taken for late ones.
            // The later of that and the committed checkpoint wins.
            let Some(cp) = self.offsets.restore(*p, *cp) else {
                continue;
            };
            if Input::is_source(*p) {
                let ti = self.task_index(*p);
                let grace = self.grace;
                let t = self.task(ti);
                t.watermarks.restore(cp.watermark);
                if cp.watermark > t.replay_watermark {
                    t.replay_watermark = cp.watermark;
                    // Counted while the task's cutoff was lower (a shared task whose
                    // partitions come one by one, the first with an older checkpoint):
                    // these windows were delivered whole before, and must not be again.
                    let forgot = t.state.forget_until(cp.watermark, grace);
                    if forgot > 0 {
                        tracing::info!(
                            partition = p,
                            windows = forgot,
                            "dropped recounted windows that the checkpoint says were delivered"
                        );
                    }
                }
                tracing::info!(
                    partition = p,
                    watermark = %crate::time::format_rfc3339(cp.watermark),
                    replay_until = cp.processed,
                    "restored checkpoint; replaying uncommitted input"
                );
            }
        }
        self.hold_shared();
    }

    /// Forgets revoked partitions: their open window state is dropped uncommitted and they
    /// no longer hold the watermark. Unless `aborted` (the outputs since the last commit
    /// were thrown away with a transaction), what would have been committed now is
    /// remembered for the partition's return.
    pub fn revoke(&mut self, partitions: &[u32], aborted: bool) {
        if self.shared {
            let revoked: Vec<u32> = partitions
                .iter()
                .copied()
                .filter(|p| Input::is_source(*p))
                .collect();
            let kept: Vec<u32> = self.partitions().filter(|p| !revoked.contains(p)).collect();
            if !revoked.is_empty() && !kept.is_empty() {
                self.split_up(&revoked, &kept);
            }
        }
        for &p in partitions {
            let i = p as usize;
            // A retry partition's records count in the tasks of the source partitions they
            // came from, in entries those share: a revocation of it alone cannot take them
            // out again. The windows keep them, and records read again below the mark are
            // skipped when it comes back (a rebalance of the retry topic's own group, such
            // as the end of a killed member's session). Aborted outputs take them along.
            if !Input::is_source(p) && !aborted {
                self.offsets.keep(p);
            }
            let cp = (self.offsets.seen(p) && !aborted).then(|| self.checkpoint(p));
            self.offsets.revoke(p, cp);
            self.copies.revoke(p);
            if Input::is_source(p) {
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
            } else if aborted {
                for t in self.tasks.iter_mut().flatten() {
                    t.state.revoke(p);
                }
            }
        }
        self.hold_shared();
    }
}
