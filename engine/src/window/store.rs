//! The window state store: one pane per open window, one accumulator per key in a pane.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::{GroupKey, WindowRange};
use crate::aggregate::{Aggregates, Inputs};
use crate::record::Position;

/// State of the aggregates beyond `count`, kept beside the counts only when configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Extra(pub Box<[crate::aggregate::AggState]>);

/// The count of one (window, key) in one 8-byte word: the count (48 bits), the source
/// partition that fed the entry (15 bits; records keyed by the group key all come from one
/// partition, so a revoked partition's state can be dropped) and a changed-since-last-
/// update flag. Other aggregates live in [`Pane::extras`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acc {
    bits: u64,
}

const COUNT_MASK: u64 = (1 << 48) - 1;
const DIRTY: u64 = 1 << 63;

impl Acc {
    /// Source partitions an entry can name.
    pub const MAX_PARTITIONS: u32 = 1 << 15;

    /// An empty accumulator fed by `partition`.
    pub fn new(partition: u32, dirty: bool) -> Self {
        debug_assert!(partition < Self::MAX_PARTITIONS);
        let part = ((partition % Self::MAX_PARTITIONS) as u64) << 48;
        Acc {
            bits: part | if dirty { DIRTY } else { 0 },
        }
    }

    /// Events counted.
    #[inline]
    pub fn count(&self) -> u64 {
        self.bits & COUNT_MASK
    }

    /// Counts `n` more events (saturating at 2^48 - 1).
    #[inline]
    pub fn add(&mut self, n: u64) {
        let c = (self.count() + n).min(COUNT_MASK);
        self.bits = (self.bits & !COUNT_MASK) | c;
    }

    /// The partition that fed this entry.
    pub fn partition(&self) -> u32 {
        ((self.bits >> 48) & 0x7fff) as u32
    }

    /// Whether it changed since the last update emission.
    pub fn is_dirty(&self) -> bool {
        self.bits & DIRTY != 0
    }

    /// Marks it changed (or not).
    pub fn set_dirty(&mut self, dirty: bool) {
        if dirty {
            self.bits |= DIRTY
        } else {
            self.bits &= !DIRTY
        }
    }
}

type Hasher = foldhash::fast::RandomState;

/// The open state of one window: an accumulator per group key, and for each source
/// partition the lowest offset that contributed (what must not be committed past until
/// this window's results are acknowledged).
#[derive(Debug)]
pub struct Pane {
    /// Accumulators by encoded group key.
    pub groups: HashMap<GroupKey, Acc, Hasher>,
    /// Lowest contributing offset by partition index (`u64::MAX` = none).
    pub min_offsets: Vec<u64>,
    /// Keys changed since the last `update` emission (only tracked in update mode).
    pub dirty: Vec<GroupKey>,
    /// Other aggregates' state by key (empty when only `count` is computed).
    pub extras: HashMap<GroupKey, Extra, Hasher>,
}

impl Pane {
    fn new(capacity: usize) -> Self {
        Pane {
            // One task owns a store (`&mut` access only): a plain table, no locks.
            groups: HashMap::with_capacity_and_hasher(capacity, Hasher::default()),
            min_offsets: Vec::new(),
            dirty: Vec::new(),
            extras: HashMap::with_hasher(Hasher::default()),
        }
    }
}

/// Open windows ordered by end, each with its pane.
#[derive(Debug, Default)]
pub struct WindowStore {
    panes: BTreeMap<(i64, i64), Pane>,
    /// Keys seen in the last closed pane, to pre-size the next one.
    last_size: usize,
    entries: usize,
    track_dirty: bool,
}

impl WindowStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that remembers which entries changed, for `update` emission.
    pub fn tracking_updates() -> Self {
        WindowStore {
            track_dirty: true,
            ..Self::default()
        }
    }

    /// Counts one event with group key `key` at `pos` into `window`, and applies its
    /// `inputs` to the other aggregates, if any.
    #[inline]
    pub fn add(
        &mut self,
        window: WindowRange,
        key: &[u8],
        pos: Position,
        aggs: &Aggregates,
        inputs: &Inputs,
    ) {
        let last_size = self.last_size;
        let pane = self
            .panes
            .entry((window.end, window.start))
            .or_insert_with(|| Pane::new(last_size));
        let p = pos.partition as usize;
        if pane.min_offsets.len() <= p {
            pane.min_offsets.resize(p + 1, u64::MAX);
        }
        let m = &mut pane.min_offsets[p];
        *m = (*m).min(pos.offset);
        if aggs.has_state() {
            match pane.extras.get_mut(key) {
                Some(e) => aggs.apply(&mut e.0, inputs),
                None => {
                    let mut e = Extra(aggs.init());
                    aggs.apply(&mut e.0, inputs);
                    pane.extras.insert(key.into(), e);
                }
            }
        }
        // One lookup whether the key is new or not (a short key is copied inline, with no
        // allocation, to make the entry's key).
        match pane.groups.entry(GroupKey::from_slice(key)) {
            Entry::Occupied(mut e) => {
                let acc = e.get_mut();
                acc.add(1);
                if self.track_dirty && !acc.is_dirty() {
                    acc.set_dirty(true);
                    pane.dirty.push(key.into());
                }
            }
            Entry::Vacant(e) => {
                let mut acc = Acc::new(pos.partition, self.track_dirty);
                acc.add(1);
                e.insert(acc);
                if self.track_dirty {
                    pane.dirty.push(key.into());
                }
                self.entries += 1;
            }
        }
    }

    /// Counts one event, with no other aggregates.
    pub fn count(&mut self, window: WindowRange, key: &[u8], pos: Position) {
        self.add(window, key, pos, &Aggregates::default(), &Inputs::default());
    }

    /// Calls `f` with every entry changed since the last call, and marks it clean.
    pub fn drain_updates(&mut self, mut f: impl FnMut(WindowRange, &[u8], &Acc, Option<&Extra>)) {
        for (&(end, start), pane) in &mut self.panes {
            for key in pane.dirty.drain(..) {
                if let Some(acc) = pane.groups.get_mut(&key) {
                    acc.set_dirty(false);
                    let extra = pane.extras.get(&key);
                    f(WindowRange { start, end }, &key, acc, extra);
                }
            }
        }
    }

    /// Removes and returns, oldest first, every window whose `end + grace <= watermark`.
    pub fn close_until(&mut self, watermark: i64, grace: i64) -> Vec<(WindowRange, Pane)> {
        let mut out = Vec::new();
        while let Some(entry) = self.panes.first_entry() {
            let (end, start) = *entry.key();
            if end.saturating_add(grace) > watermark {
                break;
            }
            let pane = entry.remove();
            self.last_size = pane.groups.len();
            self.entries -= pane.groups.len();
            out.push((WindowRange { start, end }, pane));
        }
        out
    }

    /// Removes and returns every open window, oldest first.
    pub fn drain_all(&mut self) -> Vec<(WindowRange, Pane)> {
        self.close_until(i64::MAX, 0)
    }

    /// The lowest offset of `partition` held by any open window.
    pub fn min_offset(&self, partition: u32) -> Option<u64> {
        self.panes
            .values()
            .filter_map(|p| p.min_offsets.get(partition as usize).copied())
            .filter(|&o| o != u64::MAX)
            .min()
    }

    /// Drops, without emitting, every entry fed by `partition`, and forgets its offsets.
    pub fn revoke(&mut self, partition: u32) {
        let mut dropped = 0;
        for pane in self.panes.values_mut() {
            let before = pane.groups.len();
            pane.groups.retain(|_, acc| acc.partition() != partition);
            pane.dirty.retain(|k| pane.groups.contains_key(k));
            pane.extras.retain(|k, _| pane.groups.contains_key(k));
            dropped += before - pane.groups.len();
            if let Some(m) = pane.min_offsets.get_mut(partition as usize) {
                *m = u64::MAX;
            }
        }
        self.panes.retain(|_, p| !p.groups.is_empty());
        self.entries -= dropped;
    }

    /// Takes in every open window of `other` (tasks merging into one); entries of the
    /// same (window, key) in both are combined.
    pub fn absorb(&mut self, other: WindowStore) {
        self.last_size = self.last_size.max(other.last_size);
        for (at, pane) in other.panes {
            let Some(mine) = self.panes.get_mut(&at) else {
                self.entries += pane.groups.len();
                self.panes.insert(at, pane);
                continue;
            };
            for (i, &m) in pane.min_offsets.iter().enumerate() {
                if mine.min_offsets.len() <= i {
                    mine.min_offsets.resize(i + 1, u64::MAX);
                }
                mine.min_offsets[i] = mine.min_offsets[i].min(m);
            }
            for (key, extra) in pane.extras {
                match mine.extras.get_mut(&key) {
                    Some(e) => Aggregates::merge(&mut e.0, extra.0),
                    None => {
                        mine.extras.insert(key, extra);
                    }
                }
            }
            for (key, acc) in pane.groups {
                match mine.groups.get_mut(&key) {
                    Some(a) => {
                        a.add(acc.count());
                        if acc.is_dirty() {
                            a.set_dirty(true);
                        }
                    }
                    None => {
                        mine.groups.insert(key, acc);
                        self.entries += 1;
                    }
                }
            }
            mine.dirty.extend(pane.dirty);
            mine.dirty.sort_unstable();
            mine.dirty.dedup();
        }
    }

    /// Open (window, key) entries.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Whether `window` has an entry for `key`.
    pub fn contains(&self, window: WindowRange, key: &[u8]) -> bool {
        self.panes
            .get(&(window.end, window.start))
            .is_some_and(|p| p.groups.contains_key(key))
    }

    /// Open windows.
    pub fn windows(&self) -> usize {
        self.panes.len()
    }

    /// The open windows' intervals, by end.
    pub fn ranges(&self) -> impl Iterator<Item = WindowRange> + '_ {
        self.panes
            .keys()
            .map(|&(end, start)| WindowRange { start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn counts_per_key_and_closes_in_order() {
        let mut s = WindowStore::new();
        let w1 = WindowRange { start: 0, end: 10 };
        let w2 = WindowRange { start: 10, end: 20 };
        s.count(w2, b"a", pos(0, 5));
        s.count(w1, b"a", pos(0, 3));
        s.count(w1, b"a", pos(1, 9));
        s.count(w1, b"b", pos(0, 4));
        assert_eq!(s.entries(), 3);
        assert_eq!(s.min_offset(0), Some(3));
        assert_eq!(s.min_offset(1), Some(9));
        assert!(s.close_until(11, 2).is_empty(), "grace holds w1 open");
        let closed = s.close_until(12, 2);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].0, w1);
        assert_eq!(closed[0].1.groups.get(&b"a"[..]).unwrap().count(), 2);
        assert!(closed[0].1.dirty.is_empty(), "no tracking unless asked");
        assert_eq!(s.min_offset(0), Some(5));
        assert_eq!(s.min_offset(1), None);
        assert_eq!(s.entries(), 1);
        assert_eq!(s.drain_all().len(), 1);
        assert_eq!(s.windows(), 0);
    }

    #[test]
    fn revoking_a_partition_drops_its_entries_and_offsets() {
        let mut s = WindowStore::new();
        let w = WindowRange { start: 0, end: 10 };
        s.count(w, b"a", pos(0, 1));
        s.count(w, b"b", pos(1, 7));
        s.revoke(1);
        assert_eq!(s.entries(), 1);
        assert_eq!(s.min_offset(1), None);
        assert_eq!(s.min_offset(0), Some(1));
        s.revoke(0);
        assert_eq!(s.windows(), 0);
    }
}
