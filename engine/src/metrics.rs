//! Counters that prove nothing is lost: every event in is windowed, dead-lettered, late,
//! filtered, sent to the retry topic, skipped, a blank input line, or a replay of one whose
//! outcome was already delivered.
//!
//! [`Snapshot::terms`] is the one list of counters every place that shows them renders
//! (the summary line of `weir run`, `/metrics`, the live page), so each shows every term
//! of the balance `events_in = windowed + dead_letters + late + filtered + replayed +
//! retried + skipped + blank_lines`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Live counters of a running pipeline, shared with whoever reports them.
#[derive(Debug)]
pub struct Metrics {
    /// Records received from the source.
    pub events_in: AtomicU64,
    /// Records counted into a window.
    pub windowed: AtomicU64,
    /// Records sent to the dead-letter output.
    pub dead_letters: AtomicU64,
    /// Records whose windows had all closed.
    pub late: AtomicU64,
    /// (event, window) pairs not counted because that one window had closed while another
    /// window of the same event was open (hopping windows); the event itself was counted.
    pub late_window_misses: AtomicU64,
    /// Records a processor dropped.
    pub filtered: AtomicU64,
    /// Replayed records (after a restart) whose outcome had already been delivered.
    pub replayed: AtomicU64,
    /// Records sent to the retry topic (each trip counts; a record read back from the retry
    /// topic counts in `events_in` again).
    pub retried: AtomicU64,
    /// Failed records dropped by a `skip` error strategy.
    pub skipped: AtomicU64,
    /// Whitespace-only lines of a JSON-lines input (`--input`): counted in `events_in` and
    /// skipped, never decoded.
    pub blank_lines: AtomicU64,
    /// Window results acknowledged by the sink.
    pub results_out: AtomicU64,
    /// Windows closed.
    pub windows_closed: AtomicU64,
    /// Successful commits of source positions.
    pub commits: AtomicU64,
    /// Open (window, key) entries.
    pub open_entries: AtomicU64,
    /// The pipeline watermark, epoch ms (`i64::MIN` before the first event).
    pub watermark: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            events_in: AtomicU64::new(0),
            windowed: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            late: AtomicU64::new(0),
            late_window_misses: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            blank_lines: AtomicU64::new(0),
            results_out: AtomicU64::new(0),
            windows_closed: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            open_entries: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// See [`Metrics::events_in`].
    pub events_in: u64,
    /// See [`Metrics::windowed`].
    pub windowed: u64,
    /// See [`Metrics::dead_letters`].
    pub dead_letters: u64,
    /// See [`Metrics::late`].
    pub late: u64,
    /// See [`Metrics::late_window_misses`].
    pub late_window_misses: u64,
    /// See [`Metrics::filtered`].
    pub filtered: u64,
    /// See [`Metrics::replayed`].
    pub replayed: u64,
    /// See [`Metrics::retried`].
    pub retried: u64,
    /// See [`Metrics::skipped`].
    pub skipped: u64,
    /// See [`Metrics::blank_lines`].
    pub blank_lines: u64,
    /// See [`Metrics::results_out`].
    pub results_out: u64,
    /// See [`Metrics::windows_closed`].
    pub windows_closed: u64,
    /// See [`Metrics::commits`].
    pub commits: u64,
    /// See [`Metrics::open_entries`].
    pub open_entries: u64,
    /// See [`Metrics::watermark`].
    pub watermark: i64,
}

impl Snapshot {
    /// Whether every event in is accounted for.
    pub fn balanced(&self) -> bool {
        self.events_in
            == self.windowed
                + self.dead_letters
                + self.late
                + self.filtered
                + self.replayed
                + self.retried
                + self.skipped
                + self.blank_lines
    }

    /// Every counter, in the order they are shown: the terms of the balance first
    /// (`events_in`, then what each event became), then the other counters. One list for
    /// every place that shows counters, so none can leave a term out.
    pub fn terms(&self) -> [Term; 13] {
        use TermKind::*;
        [
            Term::new("events_in", In, self.events_in, "Records received from the source (each trip back from the retry topic counts again)."),
            Term::new("windowed", Outcome, self.windowed, "Records counted into a window."),
            Term::new("dead_letters", Outcome, self.dead_letters, "Records sent to the dead-letter output."),
            Term::new("late", Outcome, self.late, "Records whose windows had all closed."),
            Term::new("filtered", Outcome, self.filtered, "Records a processor dropped."),
            Term::new("replayed", Outcome, self.replayed, "Replayed records whose outcome had already been delivered before a restart."),
            Term::new("retried", Outcome, self.retried, "Records sent to the retry topic."),
            Term::new("skipped", Outcome, self.skipped, "Failed records dropped by a `skip` error strategy."),
            Term::new("blank_lines", Outcome, self.blank_lines, "Whitespace-only input lines, skipped."),
            Term::new("late_window_misses", Other, self.late_window_misses, "(event, window) pairs not counted because that window had closed while another window of the event was open."),
            Term::new("results_out", Other, self.results_out, "Window results acknowledged by the sink."),
            Term::new("windows_closed", Other, self.windows_closed, "Windows closed."),
            Term::new("commits", Other, self.commits, "Commits of source positions."),
        ]
    }

    /// The one-line summary: `events_in=10 = windowed=7 + dead_letters=1 + … ; results_out=3
    /// …`, with `(balanced)` or `(NOT balanced)`.
    pub fn summary_line(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(256);
        let terms = self.terms();
        let mut outcomes = 0;
        for t in &terms {
            match t.kind {
                TermKind::In => {
                    let _ = write!(s, "{}={} =", t.name, t.value);
                }
                TermKind::Outcome => {
                    if outcomes > 0 {
                        s.push_str(" +");
                    }
                    outcomes += 1;
                    let _ = write!(s, " {}={}", t.name, t.value);
                }
                TermKind::Other => {
                    let _ = write!(s, "; {}={}", t.name, t.value);
                }
            }
        }
        s.push_str(if self.balanced() {
            " (balanced)"
        } else {
            " (NOT balanced)"
        });
        s
    }
}

/// The role of a counter in the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermKind {
    /// The left side: records in.
    In,
    /// A term of the right side: what records became.
    Outcome,
    /// Not part of the balance.
    Other,
}

/// One counter as it is shown: its name (the `/metrics` name is `weir_<name>_total`), its
/// role in the balance, its value and one line of help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// Snake-case name, as in JSON and `/metrics`.
    pub name: &'static str,
    /// Its role in the balance.
    pub kind: TermKind,
    /// Its value.
    pub value: u64,
    /// What it counts.
    pub help: &'static str,
}

impl Term {
    fn new(name: &'static str, kind: TermKind, value: u64, help: &'static str) -> Self {
        Term {
            name,
            kind,
            value,
            help,
        }
    }
}

impl Metrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            events_in: g(&self.events_in),
            windowed: g(&self.windowed),
            dead_letters: g(&self.dead_letters),
            late: g(&self.late),
            late_window_misses: g(&self.late_window_misses),
            filtered: g(&self.filtered),
            replayed: g(&self.replayed),
            retried: g(&self.retried),
            skipped: g(&self.skipped),
            blank_lines: g(&self.blank_lines),
            results_out: g(&self.results_out),
            windows_closed: g(&self.windows_closed),
            commits: g(&self.commits),
            open_entries: g(&self.open_entries),
            watermark: self.watermark.load(Ordering::Relaxed),
        }
    }

    /// Adds `n` to counter `a`.
    pub fn add(a: &AtomicU64, n: u64) {
        if n > 0 {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_every_term_of_the_balance() {
        let s = Snapshot {
            events_in: 45,
            windowed: 1,
            dead_letters: 2,
            late: 3,
            filtered: 4,
            replayed: 5,
            retried: 6,
            skipped: 7,
            blank_lines: 17,
            late_window_misses: 9,
            results_out: 10,
            ..Default::default()
        };
        assert!(s.balanced());
        let line = s.summary_line();
        assert_eq!(
            line,
            "events_in=45 = windowed=1 + dead_letters=2 + late=3 + filtered=4 + replayed=5 + \
             retried=6 + skipped=7 + blank_lines=17; late_window_misses=9; results_out=10; \
             windows_closed=0; commits=0 (balanced)"
        );
        let outcome_sum: u64 = s
            .terms()
            .iter()
            .filter(|t| t.kind == TermKind::Outcome)
            .map(|t| t.value)
            .sum();
        assert_eq!(outcome_sum, s.events_in);
        let off = Snapshot {
            events_in: 1,
            ..Default::default()
        };
        assert!(off.summary_line().ends_with("(NOT balanced)"));
    }
}
