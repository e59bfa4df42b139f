//! Per-partition watermarks, the pipeline watermark, and idleness.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Part {
    /// Highest event time seen, `i64::MIN` before the first event.
    max_event: i64,
    /// When this partition last delivered a record (or was assigned).
    last_seen: Instant,
    idle: bool,
    assigned: bool,
}

/// Tracks event time per source partition and derives the pipeline watermark.
///
/// A partition's watermark is its highest event time minus the allowed out-of-orderness.
/// The pipeline watermark is the minimum over partitions that are not idle, never moves
/// backwards, and — once every partition has been idle for `idle_timeout` — advances with
/// the wall clock from the highest event time seen, so the last windows still close when
/// input stops.
#[derive(Debug)]
pub struct Watermarks {
    parts: Vec<Part>,
    out_of_orderness: i64,
    idle_timeout: Duration,
    global: i64,
    last_input: Option<Instant>,
    held: bool,
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
        }
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

    /// Declares the partitions a source was assigned: they hold the watermark back until
    /// they deliver or go idle.
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

    /// Stops considering `partitions` (revoked): they no longer hold the watermark.
    pub fn revoke(&mut self, partitions: &[u32]) {
        for &p in partitions {
            if let Some(part) = self.parts.get_mut(p as usize) {
                part.idle = true;
                part.assigned = false;
            }
        }
    }

    /// Records that `partition` delivered a record, at `now`, without an event time yet.
    #[inline]
    pub fn touch(&mut self, partition: u32, now: Instant) {
        let part = self.part(partition, now);
        part.last_seen = now;
        part.idle = false;
        self.last_input = Some(now);
    }

    /// Records an event at `t` from `partition` and returns the pipeline watermark.
    #[inline]
    pub fn observe(&mut self, partition: u32, t: i64) -> i64 {
        let p = partition as usize;
        if let Some(part) = self.parts.get_mut(p) {
            if t > part.max_event {
                part.max_event = t;
                if !self.held {
                    self.recompute();
                }
            }
        }
        self.global
    }

    fn recompute(&mut self) {
        let mut min = i64::MAX;
        let mut any = false;
        for p in &self.parts {
            if !p.idle {
                any = true;
                min = min.min(p.max_event.saturating_sub(self.out_of_orderness));
            }
        }
        if any && min != i64::MAX && min > self.global {
            self.global = min;
        }
    }

    /// Marks partitions idle after `idle_timeout` without records and, if all are idle,
    /// advances the watermark by the wall-clock time since the last record.
    pub fn tick(&mut self, now: Instant) -> i64 {
        if self.held {
            return self.global;
        }
        for p in &mut self.parts {
            if !p.idle && now.duration_since(p.last_seen) >= self.idle_timeout {
                p.idle = true;
            }
        }
        self.recompute();
        if self.parts.iter().all(|p| p.idle) {
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

    /// Restores the watermark of a checkpoint and holds it there (event times are still
    /// recorded) until [`release`](Self::release): replayed records must not close windows
    /// the checkpoint says are still open.
    pub fn restore_and_hold(&mut self, watermark: i64) {
        self.global = self.global.max(watermark);
        self.held = true;
    }

    /// Lets the watermark move again after a replay.
    pub fn release(&mut self) {
        self.held = false;
        self.recompute();
    }

    /// Whether the watermark is held for a replay.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The pipeline watermark (`i64::MIN` before any event).
    pub fn current(&self) -> i64 {
        self.global
    }

    /// When the next partition would go idle, if any is active.
    pub fn next_idle_deadline(&self) -> Option<Instant> {
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
        assert_eq!(w.tick(t0 + Duration::from_secs(1)), i64::MIN);
        // Partition 1 never delivers: idle after 5 s, then partition 0 alone decides.
        assert_eq!(w.tick(t0 + Duration::from_secs(5)), 10_000 + 5_000);
        assert_eq!(w.tick(t0 + Duration::from_secs(8)), 18_000);
        w.touch(1, t0 + Duration::from_secs(9));
        assert_eq!(w.observe(1, 11_000), 18_000, "never backwards");
    }
}
