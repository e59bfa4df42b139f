//! Counters that prove nothing is lost: every event in is windowed, dead-lettered, late,
//! filtered, sent to the retry topic, skipped, a blank input line, or a replay of one whose
//! outcome was already delivered.
//!
//! [`Snapshot::terms`] is the one list of counters every place that shows them renders
//! (the summary line of `weir run`, `/metrics`, the live page), so each shows every term
//! of the balance `events_in = windowed + dead_letters + late + filtered + replayed +
//! retried + skipped + blank_lines`.
//!
//! [`Histogram`] is the lock-free latency histogram they share; the engine keeps one
//! itself, [`Metrics::emit_latency`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

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
    /// Distinct windows closed: an interval `[start, end)` counts once however many
    /// partition tasks close their keys of it (a session window: one key's session).
    pub windows_closed: AtomicU64,
    /// Successful commits of source positions.
    pub commits: AtomicU64,
    /// Open (window, key) entries.
    pub open_entries: AtomicU64,
    /// The pipeline watermark, epoch ms (`i64::MIN` before the first event).
    pub watermark: AtomicI64,
    /// Emit latency: from the moment the operator closes windows (the watermark, or
    /// idleness, passed their end + grace; or the input ended) until the result sink has
    /// acknowledged their results. One observation per closed window, all the windows of
    /// one closing step sharing its one measurement; its count equals `windows_closed`
    /// once their results are acknowledged.
    pub emit_latency: Histogram,
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
            emit_latency: Histogram::default(),
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
    /// See [`Metrics::emit_latency`].
    pub emit_latency: HistogramSnapshot,
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
            Term::new("windows_closed", Other, self.windows_closed, "Distinct windows [start, end) closed, each once however many partitions emit results for it (sessions: one per key's session)."),
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
        let e = &self.emit_latency;
        if e.count() > 0 {
            let _ = write!(
                s,
                "; emit_latency windows={} p50={:.2}ms p99={:.2}ms",
                e.count(),
                e.quantile_ms(0.5),
                e.quantile_ms(0.99)
            );
        }
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
            emit_latency: self.emit_latency.snapshot(),
        }
    }

    /// Adds `n` to counter `a`.
    pub fn add(a: &AtomicU64, n: u64) {
        if n > 0 {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Upper bounds of the [`Histogram`] buckets, in microseconds: 0.1 ms to 10 s, then `+Inf`.
pub const BUCKET_BOUNDS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The number of [`Histogram`] buckets: one per bound and `+Inf`.
const BUCKETS: usize = BUCKET_BOUNDS_MICROS.len() + 1;

/// A histogram of durations with the buckets of [`BUCKET_BOUNDS_MICROS`], in the shape of
/// a Prometheus histogram. Lock-free: an observation is two relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of the same duration.
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKET_BOUNDS_MICROS.partition_point(|&le| le < micros);
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(micros.saturating_mul(n), Ordering::Relaxed);
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// A copy of the buckets.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

/// A [`Histogram`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    pub buckets: [u64; BUCKETS],
    /// The sum of all observations, in microseconds.
    pub sum_micros: u64,
}

impl HistogramSnapshot {
    /// How many observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The cumulative buckets as Prometheus shows them: `(le in seconds, count)`, the
    /// last with `le = +Inf`.
    pub fn cumulative(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let mut total = 0;
        self.buckets.iter().enumerate().map(move |(i, n)| {
            total += n;
            let le = BUCKET_BOUNDS_MICROS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |&us| (us as f64 / 1e6).to_string());
            (le, total)
        })
    }

    /// The `q` quantile (0 ≤ q ≤ 1) in milliseconds, interpolated linearly inside its
    /// bucket as Prometheus' `histogram_quantile` does; a quantile in `+Inf` is shown as
    /// the highest bound (10 s). 0 without observations.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let count = self.count();
        if count == 0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            let Some(&hi) = BUCKET_BOUNDS_MICROS.get(i) else {
                break;
            };
            if n > 0 && (below + n) as f64 >= rank {
                let lo = if i == 0 {
                    0
                } else {
                    BUCKET_BOUNDS_MICROS[i - 1]
                };
                let within = (rank - below as f64).max(0.0) / n as f64;
                return (lo as f64 + (hi - lo) as f64 * within) / 1000.0;
            }
            below += n;
        }
        BUCKET_BOUNDS_MICROS[BUCKETS - 2] as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_puts_each_observation_in_the_first_bucket_at_or_above_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // on a bound: that bucket
        h.observe(Duration::from_micros(101));
        h.observe_n(Duration::from_millis(3), 2); // above 2.5 ms: the 5 ms bucket
        h.observe(Duration::from_secs(20)); // above 10 s: +Inf only
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            [1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!((s.count(), h.count()), (5, 5));
        assert_eq!(s.sum_micros, 100 + 101 + 6_000 + 20_000_000);
        let cum: Vec<(String, u64)> = s.cumulative().collect();
        assert_eq!(cum[0], ("0.0001".to_string(), 1));
        assert_eq!(cum[5], ("0.005".to_string(), 4));
        assert_eq!(cum[15], ("10".to_string(), 4));
        assert_eq!(cum[16], ("+Inf".to_string(), 5));
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile_ms(0.99), 0.0);
        // 98 observations in (1, 2.5] ms, 2 in (25, 50] ms.
        h.observe_n(Duration::from_millis(2), 98);
        h.observe_n(Duration::from_millis(30), 2);
        let s = h.snapshot();
        // p50: rank 50 of the 98 in (1, 2.5]: 1 + 1.5 * 50/98.
        assert!((s.quantile_ms(0.5) - (1.0 + 1.5 * 50.0 / 98.0)).abs() < 1e-9);
        // p99: rank 99, the first of the 2 in (25, 50]: 25 + 25 * 1/2.
        assert!((s.quantile_ms(0.99) - 37.5).abs() < 1e-9);
        assert!((s.quantile_ms(1.0) - 50.0).abs() < 1e-9);
        let line = Snapshot {
            emit_latency: s,
            ..Default::default()
        }
        .summary_line();
        assert!(
            line.ends_with("(balanced); emit_latency windows=100 p50=1.77ms p99=37.50ms"),
            "{line}"
        );
        // Beyond the last bound: shown as 10 s.
        h.observe_n(Duration::from_secs(60), 1_000);
        assert_eq!(h.snapshot().quantile_ms(0.99), 10_000.0);
    }

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
