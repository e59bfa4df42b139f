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
            let gone: Vec<u32> = self.partitions().filter(|p| !ids.contains(p)).collect();
            for p in gone {
                self.ready[p as usize] = false;
                let i = self.task_index(p);
                let repartitioned = self.repartitioned;
                if let Some(slot) = self.tasks.get_mut(i) {
                    if repartitioned {
                        // Its origins' time goes with it; back, it waits for markers again.
                        *slot = None;
                    } else if let Some(t) = slot {
                        t.watermarks.revoke(&[p]);
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
                        // (retried records stay counted where they are) goes with them;
                        // a repartitioned one (one partition, its origins' time) always.
                        if self.repartitioned
                            || (t.state.entries() == 0 && t.watermarks.assigned().next().is_none())
                        {
                            *slot = None;
                        }
                    }
                }
                if let Some(r) = self.ready.get_mut(i) {
                    *r = false;
                }
                // Back later, it counts in its own task unless told otherwise again.
                if let Some(t) = self.task_of.get_mut(i) {
                    *t = p;
                }
            } else if aborted {
                for t in self.tasks.iter_mut().flatten() {
                    t.state.revoke(p);
                }
            }
        }
        self.hold_shared();
    }

    /// Declares that source partition `partition` continues `parents` (a Kinesis shard
    /// split or merged: their keys go to it now), before it is assigned: it counts in
    /// their task, so a (key, window) that spans the change is counted once, with every
    /// record of it, and closes on their common event time. Parents in different tasks (a
    /// merge) are merged into one first, as unkeyed input merges every task; the merged
    /// watermark is the lower one. Nothing changes once every partition shares one task.
    pub fn continues(&mut self, partition: u32, parents: &[u32]) {
        if self.shared || !Input::is_source(partition) {
            return;
        }
        let mut family: Vec<usize> = parents
            .iter()
            .filter(|&&p| Input::is_source(p))
            .map(|&p| self.task_index(p))
            .collect();
        if family.is_empty() {
            return;
        }
        let own = self.task_index(partition);
        if matches!(self.tasks.get(own), Some(Some(_))) {
            family.push(own);
        }
        family.sort_unstable();
        family.dedup();
        let into = family[0];
        // Every partition named in the map (a task's index is its first partition's).
        let last = family
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(partition as usize);
        if self.task_of.len() <= last {
            self.task_of.extend(self.task_of.len() as u32..=last as u32);
        }
        if self.tasks.len() <= into {
            self.tasks.resize_with(into + 1, || None);
        }
        for &i in &family[1..] {
            if let Some(t) = self.tasks.get_mut(i).and_then(Option::take) {
                match self.tasks[into].as_mut() {
                    Some(mine) => {
                        tracing::info!(
                            partition,
                            task = into,
                            merged = i,
                            "a partition continues partitions of two tasks (merged shards): their tasks merge into one"
                        );
                        mine.absorb(t);
                    }
                    None => self.tasks[into] = Some(t),
                }
            }
            for slot in self.task_of.iter_mut().filter(|t| **t as usize == i) {
                *slot = into as u32;
            }
        }
        self.task_of[partition as usize] = into as u32;
    }
}
