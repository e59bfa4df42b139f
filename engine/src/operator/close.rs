//! Closing windows: every window a task's watermark has passed (or all of them, at the
//! end), and in `update` mode the entries a batch changed, encoded as results.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::task::State;
use super::WindowOperator;
use crate::config::EmitMode;
use crate::outcome::Emitted;
use crate::output::{ResultEncoder, WindowText};
use crate::window::{Acc, ClosedSession, Extra, Pane, WindowRange};

impl WindowOperator {
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
                        out.windows_closed += u64::from(self.closed.first(window));
                        out.closed_at.get_or_insert(now);
                        out.results.reserve(pane.groups.len());
                        Self::encode_pane(&self.encoder, window, pane, out);
                    }
                }
                State::Sessions(sessions) => {
                    let closed = sessions.close_until(wm, self.grace);
                    if !closed.is_empty() {
                        out.closed_at.get_or_insert(now);
                    }
                    Self::encode_sessions(&self.encoder, closed, out);
                }
            }
        }
        // A window every task's time has passed is closed wherever it was open.
        let lowest = self
            .tasks
            .iter()
            .flatten()
            .map(|t| t.watermarks.current())
            .min();
        self.closed
            .forget_below(lowest.map_or(i64::MAX, |w| w.saturating_sub(self.grace)));
    }

    /// Closes every open window (the input has ended, or an idle exit treats it so). Each
    /// task's watermark then moves past every window it emitted, so that the checkpoint
    /// committed next says they were delivered: a later run counts a straggler of one of
    /// them as late instead of emitting the window a second time with part of its count.
    pub fn close_all(&mut self, out: &mut Emitted) {
        out.closed_at.get_or_insert_with(Instant::now);
        self.emit_updates(out);
        let grace = self.grace;
        for task in self.tasks.iter_mut().flatten() {
            let mut last_end = i64::MIN;
            match &mut task.state {
                State::Fixed(store) => {
                    for (window, pane) in store.drain_all() {
                        out.windows_closed += u64::from(self.closed.first(window));
                        last_end = last_end.max(window.end);
                        Self::encode_pane(&self.encoder, window, pane, out);
                    }
                }
                State::Sessions(sessions) => {
                    let closed = sessions.drain_all();
                    last_end = closed.iter().map(|(w, ..)| w.end).fold(last_end, i64::max);
                    Self::encode_sessions(&self.encoder, closed, out);
                }
            }
            if last_end != i64::MIN {
                task.watermarks.restore(last_end.saturating_add(grace));
            }
        }
    }

    fn encode_pane(encoder: &ResultEncoder, window: WindowRange, pane: Pane, out: &mut Emitted) {
        let text = WindowText::new(window);
        let Pane {
            groups, mut extras, ..
        } = pane;
        let has_extras = !extras.is_empty(); // a count alone keeps none
        encoder.batch(|b| {
            for (key, acc) in groups.into_iter() {
                let extra = has_extras.then(|| extras.remove(&key)).flatten();
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
}

/// Window intervals `[start, end)` closed lately, so that an interval closed by several
/// tasks (one per partition while the input is keyed by the group key) counts once in
/// `windows_closed`: each task emits its own keys of it when its own time passes it.
#[derive(Debug, Default)]
pub(super) struct ClosedWindows {
    /// By (end, start).
    recent: BTreeSet<(i64, i64)>,
}

impl ClosedWindows {
    /// The most intervals remembered: a task lagging further behind than this many
    /// windows counts its closing again.
    const MAX: usize = 4096;

    /// Notes that `w` closed in some task; whether it is the first to close it.
    pub(super) fn first(&mut self, w: WindowRange) -> bool {
        let first = self.recent.insert((w.end, w.start));
        if self.recent.len() > Self::MAX {
            self.recent.pop_first();
        }
        first
    }

    /// Forgets intervals ending at or before `end`: every task's time has passed them, so
    /// none holds them open any more.
    pub(super) fn forget_below(&mut self, end: i64) {
        while self.recent.first().is_some_and(|&(e, _)| e <= end) {
            self.recent.pop_first();
        }
    }
}
