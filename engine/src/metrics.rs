//! Counters that prove nothing is lost: every event in is windowed, dead-lettered, late,
//! filtered, or a replay of one whose outcome was already delivered.

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
            results_out: g(&self.results_out),
            windows_closed: g(&self.windows_closed),
            commits: g(&self.commits),
            open_entries: g(&self.open_entries),
            watermark: self.watermark.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        if n > 0 {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }
}
