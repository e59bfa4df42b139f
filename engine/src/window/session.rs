//! Session windows: per key, events less than `gap` apart share a window that ends `gap`
//! after its last event; an event that bridges two sessions merges them.

use std::collections::{BTreeMap, HashMap};

use smallvec::SmallVec;

use super::store::{Acc, Extra};
use super::{GroupKey, WindowRange};
use crate::aggregate::{Aggregates, Inputs};

/// A closed session: its window, key, count and other aggregates' state.
pub(crate) type ClosedSession = (WindowRange, GroupKey, Acc, Option<Box<Extra>>);
use crate::record::Position;

type Hasher = foldhash::fast::RandomState;

/// One open session of one key.
#[derive(Debug, Clone)]
pub struct Session {
    /// First event time.
    pub start: i64,
    /// Last event time + gap.
    pub end: i64,
    /// The count.
    pub acc: Acc,
    /// Other aggregates' state, when configured.
    pub extra: Option<Box<Extra>>,
    /// Lowest source offset that fed it (its partition is `acc.partition`).
    pub min_offset: u64,
    /// The end under which the close index lists it.
    indexed_end: i64,
}

/// Open sessions by key, plus an index by end time so closing costs O(closed sessions).
#[derive(Debug)]
pub struct SessionStore {
    gap: i64,
    sessions: HashMap<GroupKey, SmallVec<[Session; 1]>, Hasher>,
    /// end -> keys with a session indexed at that end (entries may be stale; checked).
    index: BTreeMap<i64, Vec<GroupKey>>,
    entries: usize,
    track_dirty: bool,
    dirty: Vec<GroupKey>,
}

impl SessionStore {
    /// An empty store for sessions with inactivity `gap` (ms).
    pub fn new(gap: i64, track_dirty: bool) -> Self {
        SessionStore {
            gap,
            sessions: HashMap::with_hasher(Hasher::default()),
            index: BTreeMap::new(),
            entries: 0,
            track_dirty,
            dirty: Vec::new(),
        }
    }

    /// Adds an event at `t` for `key`, merging every session it touches.
    pub fn add(&mut self, key: &[u8], t: i64, pos: Position, aggs: &Aggregates, inputs: &Inputs) {
        let (lo, hi) = (t, t.saturating_add(self.gap));
        let list = self.sessions.entry(GroupKey::from_slice(key)).or_default();
        // Sessions overlapping [t, t + gap) merge with the event.
        let mut merged: Option<Session> = None;
        let mut i = 0;
        while i < list.len() {
            let s = &list[i];
            if s.start < hi && lo < s.end {
                let s = list.remove(i);
                self.entries -= 1;
                merged = Some(match merged {
                    None => s,
                    Some(mut m) => {
                        m.start = m.start.min(s.start);
                        m.end = m.end.max(s.end);
                        m.min_offset = m.min_offset.min(s.min_offset);
                        m.indexed_end = m.indexed_end.min(s.indexed_end);
                        m.acc.add(s.acc.count());
                        if let (Some(a), Some(b)) = (m.extra.as_mut(), s.extra) {
                            Aggregates::merge(&mut a.0, b.0);
                        }
                        m
                    }
                });
            } else {
                i += 1;
            }
        }
        let fresh = merged.is_none();
        let mut s = merged.unwrap_or_else(|| Session {
            start: lo,
            end: hi,
            acc: Acc::new(pos.partition, false),
            extra: aggs.has_state().then(|| Box::new(Extra(aggs.init()))),
            min_offset: pos.offset,
            indexed_end: hi,
        });
        s.start = s.start.min(lo);
        s.end = s.end.max(hi);
        s.min_offset = s.min_offset.min(pos.offset);
        s.acc.add(1);
        if let Some(e) = s.extra.as_mut() {
            aggs.apply(&mut e.0, inputs);
        }
        if self.track_dirty && !s.acc.is_dirty() {
            s.acc.set_dirty(true);
            self.dirty.push(key.into());
        }
        if fresh {
            self.index
                .entry(s.indexed_end)
                .or_default()
                .push(key.into());
        }
        let at = list
            .iter()
            .position(|o| o.start > s.start)
            .unwrap_or(list.len());
        list.insert(at, s);
        self.entries += 1;
    }

    /// Removes and returns every session whose `end + grace <= watermark`.
    pub fn close_until(&mut self, watermark: i64, grace: i64) -> Vec<ClosedSession> {
        let mut out = Vec::new();
        while let Some(entry) = self.index.first_entry() {
            let at = *entry.key();
            if at.saturating_add(grace) > watermark {
                break;
            }
            let keys = entry.remove();
            for key in keys {
                let Some(list) = self.sessions.get_mut(&key) else {
                    continue;
                };
                let mut i = 0;
                let mut reindex = Vec::new();
                while i < list.len() {
                    if list[i].end.saturating_add(grace) <= watermark {
                        let s = list.remove(i);
                        self.entries -= 1;
                        out.push((
                            WindowRange {
                                start: s.start,
                                end: s.end,
                            },
                            key.clone(),
                            s.acc,
                            s.extra,
                        ));
                    } else {
                        if list[i].indexed_end == at {
                            list[i].indexed_end = list[i].end;
                            reindex.push(list[i].end);
                        }
                        i += 1;
                    }
                }
                if list.is_empty() {
                    self.sessions.remove(&key);
                }
                for end in reindex {
                    self.index.entry(end).or_default().push(key.clone());
                }
            }
        }
        out.sort_by_key(|(w, ..)| (w.end, w.start));
        out
    }

    /// Removes and returns every open session.
    pub fn drain_all(&mut self) -> Vec<ClosedSession> {
        let mut out = Vec::new();
        for (key, list) in std::mem::take(&mut self.sessions) {
            for s in list {
                out.push((
                    WindowRange {
                        start: s.start,
                        end: s.end,
                    },
                    key.clone(),
                    s.acc,
                    s.extra,
                ));
            }
        }
        self.index.clear();
        self.dirty.clear();
        self.entries = 0;
        out.sort_by_key(|(w, ..)| (w.end, w.start));
        out
    }

    /// Calls `f` with every session changed since the last call, and marks it clean.
    pub fn drain_updates(&mut self, mut f: impl FnMut(WindowRange, &[u8], &Acc, Option<&Extra>)) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(list) = self.sessions.get_mut(&key) {
                for s in list.iter_mut().filter(|s| s.acc.is_dirty()) {
                    s.acc.set_dirty(false);
                    f(
                        WindowRange {
                            start: s.start,
                            end: s.end,
                        },
                        &key,
                        &s.acc,
                        s.extra.as_deref(),
                    );
                }
            }
        }
    }

    /// The lowest offset of `partition` held by an open session.
    pub fn min_offset(&self, partition: u32) -> Option<u64> {
        self.sessions
            .values()
            .flatten()
            .filter(|s| s.acc.partition() == partition)
            .map(|s| s.min_offset)
            .min()
    }

    /// Drops, without emitting, every session fed by `partition`.
    pub fn revoke(&mut self, partition: u32) {
        let mut dropped = 0;
        self.sessions.retain(|_, list| {
            let before = list.len();
            list.retain(|s| s.acc.partition() != partition);
            dropped += before - list.len();
            !list.is_empty()
        });
        self.entries -= dropped;
    }

    /// Takes in every open session of `other` (tasks merging into one). Tasks hold
    /// disjoint keys until they merge; a key in both keeps the sessions of each.
    pub fn absorb(&mut self, other: SessionStore) {
        for (key, list) in other.sessions {
            self.entries += list.len();
            match self.sessions.get_mut(&key) {
                Some(mine) => {
                    mine.extend(list);
                    mine.sort_by_key(|s| s.start);
                }
                None => {
                    self.sessions.insert(key, list);
                }
            }
        }
        for (end, keys) in other.index {
            self.index.entry(end).or_default().extend(keys);
        }
        self.dirty.extend(other.dirty);
    }

    /// Open sessions.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Whether an event of `key` at `t` joins an open session (rather than opening one).
    pub fn joins(&self, key: &[u8], t: i64) -> bool {
        let (lo, hi) = (t, t.saturating_add(self.gap));
        self.sessions
            .get(key)
            .is_some_and(|list| list.iter().any(|s| s.start < hi && lo < s.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(s: &mut SessionStore, key: &str, t: i64, offset: u64) {
        s.add(
            key.as_bytes(),
            t,
            Position {
                partition: 0,
                offset,
            },
            &Aggregates::default(),
            &Inputs::default(),
        );
    }

    #[test]
    fn sessions_extend_merge_and_close() {
        let mut s = SessionStore::new(10, false);
        add(&mut s, "a", 0, 0);
        add(&mut s, "a", 5, 1); // extends [0, 15)
        add(&mut s, "a", 22, 2); // a second session [22, 32)
        add(&mut s, "b", 3, 3);
        add(&mut s, "a", 40, 5); // 40 - 22 is not less than the gap: a third session
        assert_eq!(s.entries(), 4);
        add(&mut s, "a", 14, 4); // bridges [0, 15) and [22, 32): one session [0, 32)
        assert_eq!(s.entries(), 3);
        assert_eq!(s.min_offset(0), Some(0));
        let closed = s.close_until(20, 0);
        assert_eq!(closed.len(), 1, "only b's [3, 13) closed: {closed:?}");
        assert_eq!(
            (closed[0].0.start, closed[0].0.end, closed[0].2.count()),
            (3, 13, 1)
        );
        let closed = s.close_until(32, 0);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].0.start, closed[0].0.end, closed[0].2.count()),
            (0, 32, 4)
        );
        assert_eq!(s.min_offset(0), Some(5));
        let closed = s.close_until(50, 0);
        assert_eq!(
            (closed[0].0.start, closed[0].0.end, closed[0].2.count()),
            (40, 50, 1)
        );
        assert_eq!(s.entries(), 0);
        assert_eq!(s.min_offset(0), None);
    }
}
