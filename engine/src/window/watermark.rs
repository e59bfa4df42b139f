//! Event time of one task: per-partition watermarks, the task's watermark, and idleness.
//!
//! A task is the unit of window state (see [`crate::operator`]): one source partition when
//! input is keyed by the group key, or every partition together otherwise. Its watermark
//! is the minimum over its partitions that are not idle, minus the allowed
//! out-of-orderness, and never moves back.
//!
//! Idleness is what lets the last window close when input stops, and it must never hide
//! data the broker already holds:
//! - a partition is idle only after `idle_timeout` without a record **and** while its source
//!   does not report a backlog of unread records (a backlogged partition is re-armed);
//! - when every partition of the task was idle and one delivers again (a wake-up), every
//!   partition is re-armed: one that delivers nothing within `idle_timeout` holds the
//!   watermark until then, so the first partition read after a quiet spell (or at start,
//!   before the data came) cannot run ahead of the others;
//! - once every partition is idle, time advances with the wall clock from the highest event
//!   time seen.

use std::time::Duration;

use tokio::time::Instant;

/// What a marker says of a source partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// It delivers records, or did lately.
    Active,
    /// No record for `idle_timeout`, and no backlog.
    Idle,
    /// Its forwarder stopped at the end of its input (idle at once, whatever came last).
    Ended,
}

#[derive(Debug, Clone)]
struct Part {
    /// Highest event time seen (or restored from a checkpoint), `i64::MIN` before any.
    max_event: i64,
    /// When this partition last delivered a record (or was assigned or re-armed).
    last_seen: Instant,
    idle: bool,
    assigned: bool,
}

/// Tracks event time per partition of one task and derives the task's watermark.
#[derive(Debug)]
pub struct Watermarks {
    parts: Vec<Part>,
    out_of_orderness: i64,
    idle_timeout: Duration,
    global: i64,
    last_input: Option<Instant>,
    /// Whether the watermark is held where it is (some partitions of a shared task are
    /// not assigned here yet; by origin: no marker came yet).
    held: bool,
    /// By origin (a repartitioned input, see [`crate::repartition`]): the parts are the
    /// source partitions the records came from, and only markers make them idle, never
    /// the wall clock.
    by_origin: bool,
}

impl Watermarks {
    /// A tracker with the given allowed out-of-orderness (ms) and idle timeout.
    pub fn new(out_of_orderness: i64, idle_timeout: Duration) -> Self {
        Watermarks {
            parts: Vec::new(),
            out_of_orderness,
            idle_timeout,
            global: i64::MIN,
            last_input: None,
            held: false,
            by_origin: false,
        }
    }

    /// Makes this a tracker of a repartitioned input's origins: held until the first
    /// marker says how many there are (see [`mark`](Self::mark)).
    pub fn set_by_origin(&mut self) {
        self.by_origin = true;
        self.held = true;
    }

    /// A marker's news of `origin`, one of the source topic's `count` partitions: its
    /// highest event time `stamp` and whether it is idle (taken only once `idle_timeout`
    /// passed since its last record here, or since the origins were re-armed). The first
    /// marker declares every origin (each holds the watermark until a marker or a record of
    /// it moves it on).
    pub fn mark(&mut self, count: u32, origin: u32, stamp: i64, idle: Activity, now: Instant) {
        for p in 0..count {
            let part = self.part(p, now);
            if !part.assigned {
                part.assigned = true;
                part.idle = false;
            }
        }
        let timeout = self.idle_timeout;
        let part = self.part(origin, now);
        part.max_event = part.max_event.max(stamp);
        if idle == Activity::Active {
            part.idle = false;
        } else if idle == Activity::Ended || now.duration_since(part.last_seen) >= timeout {
            // Markers of different forwarders are not ordered with each other: one that
            // says an origin is idle may have been written before its forwarder saw the
            // records that woke the task. Like a partition, an origin is idle only
            // `idle_timeout` after its last record here (or its re-arming); the next
            // marker says it again.
            part.idle = true;
        }
        self.held = false;
        self.recompute();
    }

    /// Whether some origin still holds the watermark (by origin only): a marker did not
    /// say it is idle, or no marker came yet.
    pub fn waiting(&self) -> bool {
        self.held || self.parts.iter().any(|p| p.assigned && !p.idle)
    }

    fn part(&mut self, p: u32, now: Instant) -> &mut Part {
        let p = p as usize;
        if self.parts.len() <= p {
            self.parts.resize(
                p + 1,
                Part {
                    max_event: i64::MIN,
                    last_seen: now,
                    idle: true,
                    assigned: false,
                },
            );
        }
        &mut self.parts[p]
    }

    /// Declares the partitions of this task: they hold the watermark back until they
    /// deliver or go idle. Partitions not listed stop holding it.
    pub fn assign(&mut self, partitions: &[u32], now: Instant) {
        for p in &mut self.parts {
            p.assigned = false;
        }
        for &p in partitions {
            let part = self.part(p, now);
            part.assigned = true;
            part.idle = false;
            part.last_seen = now;
        }
        for p in &mut self.parts {
            if !p.assigned {
                p.idle = true;
            }
        }
    }

    /// Adds partitions to this task (keeping the others).
    pub fn add(&mut self, partitions: &[u32], now: Instant) {
        for &p in partitions {
            let part = self.part(p, now);
            part.assigned = true;
            part.idle = false;
            part.last_seen = now;
        }
    }

    /// Stops considering `partitions` (revoked): they no longer hold the watermark.
    pub fn revoke(&mut self, partitions: &[u32]) {
        for &p in partitions {
            if let Some(part) = self.parts.get_mut(p as usize) {
                part.idle = true;
                part.assigned = false;
            }
        }
    }

    /// The partitions this task holds.
    pub fn assigned(&self) -> impl Iterator<Item = u32> + '_ {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.assigned)
            .map(|(i, _)| i as u32)
    }

    /// Restores a checkpoint's watermark: every window it closed was delivered, so the
    /// task's watermark starts there and none of its partitions holds it below.
    pub fn restore(&mut self, watermark: i64) {
        self.global = self.global.max(watermark);
        let floor = watermark.saturating_add(self.out_of_orderness);
        for p in self.parts.iter_mut().filter(|p| p.assigned) {
            p.max_event = p.max_event.max(floor);
        }
    }

    /// Records that `partition` delivered a record, at `now`, without an event time yet.
    #[inline]
    pub fn touch(&mut self, partition: u32, now: Instant) {
        let part = self.part(partition, now);
        part.last_seen = now;
        if part.idle {
            part.idle = false;
            // By origin too: the others hold until a marker says again which are idle.
            self.wake(partition, now);
        }
        self.last_input = Some(now);
    }

    /// A partition came back from idleness: if all others are idle too, re-arm them.
    #[cold]
    fn wake(&mut self, woken: u32, now: Instant) {
        let others_idle = self
            .parts
            .iter()
            .enumerate()
            .all(|(i, p)| i == woken as usize || p.idle || !p.assigned);
        if others_idle {
            self.rearm(now);
        }
    }

    /// Re-arms every partition of this task: each holds the watermark again until it
    /// delivers or `idle_timeout` passes (tasks just merged: which of their partitions is
    /// idle was judged apart).
    pub fn rearm(&mut self, now: Instant) {
        for p in self.parts.iter_mut().filter(|p| p.assigned) {
            p.idle = false;
            p.last_seen = now;
        }
    }

    /// Records an event at `t` from `partition` and returns the task's watermark.
    #[inline]
    pub fn observe(&mut self, partition: u32, t: i64) -> i64 {
        let p = partition as usize;
        if let Some(part) = self.parts.get_mut(p) {
            if t > part.max_event {
                part.max_event = t;
                self.recompute();
            }
        }
        self.global
    }

    /// Holds the watermark where it is (`true`) or lets it follow the partitions again.
    pub fn hold(&mut self, held: bool) {
        self.held = held;
        self.recompute();
    }

    /// Whether the watermark is held (see [`hold`](Self::hold)).
    pub fn is_held(&self) -> bool {
        self.held
    }

    fn recompute(&mut self) {
        if self.held {
            return;
        }
        let mut min = i64::MAX;
        for p in &self.parts {
            if !p.idle {
                min = min.min(p.max_event.saturating_sub(self.out_of_orderness));
            }
        }
        if min != i64::MAX && min > self.global {
            self.global = min;
        }
    }

    /// Marks partitions idle after `idle_timeout` without records unless `backlog` says
    /// the broker holds unread records of them, and, if all are idle, advances the
    /// watermark by the wall-clock time since the last record.
    pub fn tick(&mut self, now: Instant, backlog: &dyn Fn(u32) -> bool) -> i64 {
        for (i, p) in self.parts.iter_mut().enumerate() {
            if self.by_origin {
                break;
            }
            if !p.idle && now.duration_since(p.last_seen) >= self.idle_timeout {
                if p.assigned && backlog(i as u32) {
                    p.last_seen = now;
                } else {
                    p.idle = true;
                }
            }
        }
        self.recompute();
        if !self.held && self.parts.iter().all(|p| p.idle) {
            if let Some(last) = self.last_input {
                let since = now.duration_since(last);
                if since >= self.idle_timeout {
                    let max = self
                        .parts
                        .iter()
                        .map(|p| p.max_event)
                        .max()
                        .unwrap_or(i64::MIN);
                    if max != i64::MIN {
                        let wm = max
                            .saturating_sub(self.out_of_orderness)
                            .saturating_add(since.as_millis() as i64);
                        self.global = self.global.max(wm);
                    }
                }
            }
        }
        self.global
    }

    /// Takes in another task's partitions and time (tasks merging into one).
    pub fn absorb(&mut self, other: Watermarks) {
        for (i, p) in other.parts.into_iter().enumerate() {
            if !p.assigned {
                continue;
            }
            if self.parts.len() <= i {
                self.parts.resize(i + 1, p.clone());
            }
            self.parts[i] = p;
        }
        self.last_input = self.last_input.max(other.last_input);
        // The merged watermark is the lower one: the slower task's windows are still open.
        self.global = self.global.min(other.global);
    }

    /// The task's watermark (`i64::MIN` before any event).
    pub fn current(&self) -> i64 {
        self.global
    }

    /// When the next partition would go idle, if any is active.
    pub fn next_idle_deadline(&self) -> Option<Instant> {
        if self.by_origin {
            return None;
        }
        self.parts
            .iter()
            .filter(|p| !p.idle)
            .map(|p| p.last_seen + self.idle_timeout)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_BACKLOG: &dyn Fn(u32) -> bool = &|_| false;

    #[test]
    fn minimum_over_active_partitions_and_monotonic() {
        let now = Instant::now();
        let mut w = Watermarks::new(100, Duration::from_secs(5));
        w.assign(&[0, 1], now);
        w.touch(0, now);
        assert_eq!(w.observe(0, 1_000), i64::MIN, "partition 1 holds it back");
        w.touch(1, now);
        assert_eq!(w.observe(1, 500), 400);
        assert_eq!(w.observe(1, 2_000), 900);
        assert_eq!(w.observe(0, 800), 900, "older events never move it back");
    }

    #[test]
    fn idle_partitions_stop_holding_and_wall_clock_advances() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(0, Duration::from_secs(5));
        w.assign(&[0, 1], t0);
        w.touch(0, t0);
        w.observe(0, 10_000);
        assert_eq!(w.tick(t0 + Duration::from_secs(1), NO_BACKLOG), i64::MIN);
        // Partition 1 never delivers: idle after 5 s, then partition 0 alone decides.
        assert_eq!(
            w.tick(t0 + Duration::from_secs(5), NO_BACKLOG),
            10_000 + 5_000
        );
        assert_eq!(w.tick(t0 + Duration::from_secs(8), NO_BACKLOG), 18_000);
        w.touch(1, t0 + Duration::from_secs(9));
        assert_eq!(w.observe(1, 11_000), 18_000, "never backwards");
    }

    #[test]
    fn a_partition_with_a_backlog_is_never_idle() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(0, Duration::from_secs(5));
        w.assign(&[0, 1], t0);
        w.touch(0, t0);
        w.observe(0, 10_000);
        let backlog_on_1: &dyn Fn(u32) -> bool = &|p| p == 1;
        for s in [5, 20, 60] {
            assert_eq!(
                w.tick(t0 + Duration::from_secs(s), backlog_on_1),
                i64::MIN,
                "partition 1 has unread records: it holds the watermark at {s} s"
            );
        }
        w.touch(1, t0 + Duration::from_secs(61));
        assert_eq!(w.observe(1, 3_000), 3_000, "its old records are not late");
    }

    #[test]
    fn a_wake_up_re_arms_every_partition() {
        // Started before the data: both partitions went idle with no event at all.
        let t0 = Instant::now();
        let mut w = Watermarks::new(0, Duration::from_secs(5));
        w.assign(&[0, 1], t0);
        assert_eq!(w.tick(t0 + Duration::from_secs(15), NO_BACKLOG), i64::MIN);
        // Partition 0's data arrives first: partition 1 holds the watermark again.
        let t1 = t0 + Duration::from_secs(16);
        w.touch(0, t1);
        assert_eq!(w.observe(0, 50_000), i64::MIN);
        assert_eq!(w.tick(t1 + Duration::from_secs(1), NO_BACKLOG), i64::MIN);
        w.touch(1, t1 + Duration::from_secs(1));
        assert_eq!(w.observe(1, 20_000), 20_000);
        // A partition that gets nothing more stops holding after idle_timeout.
        w.touch(0, t1 + Duration::from_secs(5));
        assert_eq!(w.tick(t1 + Duration::from_secs(6), NO_BACKLOG), 50_000);
    }

    #[test]
    fn restore_starts_from_the_checkpoint() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(500, Duration::from_secs(5));
        w.assign(&[3], t0);
        w.restore(40_000);
        assert_eq!(w.current(), 40_000);
        w.touch(3, t0);
        assert_eq!(
            w.observe(3, 30_000),
            40_000,
            "replayed records never move it back"
        );
        assert_eq!(w.observe(3, 41_000), 40_500);
    }
}
