//! A task: window state with an event time of its own (see [`Task`]).

use std::time::Duration;

use crate::window::{SessionStore, Watermarks, WindowKind, WindowStore};

#[derive(Debug)]
pub(super) enum State {
    Fixed(WindowStore),
    Sessions(SessionStore),
}

impl State {
    pub(super) fn new(kind: WindowKind, update: bool) -> Self {
        match kind {
            WindowKind::Session { gap } => State::Sessions(SessionStore::new(gap, update)),
            _ if update => State::Fixed(WindowStore::tracking_updates()),
            _ => State::Fixed(WindowStore::new()),
        }
    }

    pub(super) fn revoke(&mut self, partition: u32) {
        match self {
            State::Fixed(s) => s.revoke(partition),
            State::Sessions(s) => s.revoke(partition),
        }
    }

    pub(super) fn min_offset(&self, partition: u32) -> Option<u64> {
        match self {
            State::Fixed(s) => s.min_offset(partition),
            State::Sessions(s) => s.min_offset(partition),
        }
    }

    pub(super) fn absorb(&mut self, other: State) {
        match (self, other) {
            (State::Fixed(a), State::Fixed(b)) => a.absorb(b),
            (State::Sessions(a), State::Sessions(b)) => a.absorb(b),
            _ => unreachable!("one job has one window kind"),
        }
    }

    pub(super) fn entries(&self) -> usize {
        match self {
            State::Fixed(s) => s.entries(),
            State::Sessions(s) => s.entries(),
        }
    }

    /// How many entries an event of `key` at `t` would open (at most `kind`'s windows
    /// per event; closed windows it would miss count too, so this is an upper bound).
    pub(super) fn would_open(&self, kind: WindowKind, key: &[u8], t: i64) -> usize {
        match self {
            State::Fixed(s) => {
                let mut n = 0;
                kind.for_each(t, |w| n += usize::from(!s.contains(w, key)));
                n
            }
            State::Sessions(s) => usize::from(!s.joins(key, t)),
        }
    }

    /// Drops, without emitting, every window that a watermark of `wm` closes: a checkpoint
    /// says their results were delivered, so what this task holds of them is a recount.
    /// How many windows (sessions) went.
    pub(super) fn forget_until(&mut self, wm: i64, grace: i64) -> usize {
        match self {
            State::Fixed(s) => s.close_until(wm, grace).len(),
            State::Sessions(s) => s.close_until(wm, grace).len(),
        }
    }
}

/// A unit of window state with an event time of its own: one source partition while the
/// input is keyed by the group key (every (key, window) then lives in one partition, as
/// in Kafka Streams' stream time per task), or every partition together otherwise.
#[derive(Debug)]
pub(super) struct Task {
    pub(super) state: State,
    pub(super) watermarks: Watermarks,
    /// Replayed records (below their partition's `replay` mark) of windows that closed at
    /// or below this watermark were delivered before: the highest checkpoint watermark
    /// restored into this task.
    pub(super) replay_watermark: i64,
}

impl Task {
    /// A task with no windows and no partitions yet.
    pub(super) fn new(
        kind: WindowKind,
        update: bool,
        out_of_orderness: i64,
        idle: Duration,
    ) -> Self {
        Task {
            state: State::new(kind, update),
            watermarks: Watermarks::new(out_of_orderness, idle),
            replay_watermark: i64::MIN,
        }
    }

    pub(super) fn absorb(&mut self, other: Task) {
        self.state.absorb(other.state);
        self.watermarks.absorb(other.watermarks);
        self.replay_watermark = self.replay_watermark.max(other.replay_watermark);
    }
}
