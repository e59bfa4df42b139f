//! Windows: which windows an event belongs to, the state kept per (window, key), and the
//! watermark that decides when a window closes.

mod session;
mod store;
mod watermark;

pub(crate) use session::ClosedSession;
pub use session::{Session, SessionStore};
pub use store::{Acc, Extra, Pane, WindowStore};
pub use watermark::{Activity, Watermarks};

/// An encoded group key as the window state stores it: keys of up to 16 bytes (a
/// JSON-quoted user id, a small number) sit inline in the entry, with no allocation of
/// their own; longer ones spill to the heap.
pub(crate) type GroupKey = smallvec::SmallVec<[u8; 16]>;

/// The most windows one event may belong to (hopping windows: `size / advance`). A
/// definition past it (a typo such as `advance = "1ms"` for `"1m"`) is refused: its
/// events would each cost that many state entries and as much time.
pub const MAX_WINDOWS_PER_EVENT: u64 = 10_000;

/// The default bound on open (window, key) entries (`window.max_open_entries`).
pub const DEFAULT_MAX_OPEN_ENTRIES: usize = 10_000_000;

/// A half-open window `[start, end)` in epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowRange {
    /// First millisecond inside the window.
    pub start: i64,
    /// First millisecond after the window.
    pub end: i64,
}

/// The kind of window and its sizes, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed-size, non-overlapping windows aligned to the epoch.
    Tumbling {
        /// Window length.
        size: i64,
    },
    /// Fixed-size windows starting every `advance`; an event belongs to every window
    /// covering it (`size / advance` of them).
    Hopping {
        /// Window length.
        size: i64,
        /// Distance between window starts.
        advance: i64,
    },
    /// Per key: events less than `gap` apart share a window, which ends `gap` after its
    /// last event; an event bridging two sessions merges them.
    Session {
        /// Inactivity gap.
        gap: i64,
    },
}

impl WindowKind {
    /// The (first) window an event at `t` belongs to: for hopping windows the one that
    /// ends last; for sessions the event's own `[t, t + gap)` before any merge.
    #[inline]
    pub fn assign(&self, t: i64) -> WindowRange {
        match *self {
            WindowKind::Tumbling { size } => {
                let start = t - t.rem_euclid(size);
                WindowRange {
                    start,
                    end: start + size,
                }
            }
            WindowKind::Hopping { size, advance } => {
                let start = t - t.rem_euclid(advance);
                WindowRange {
                    start,
                    end: start + size,
                }
            }
            WindowKind::Session { gap } => WindowRange {
                start: t,
                end: t.saturating_add(gap),
            },
        }
    }

    /// Calls `f` with every fixed window covering `t`, latest-ending first (one for
    /// tumbling windows). Not for sessions.
    #[inline]
    pub fn for_each(&self, t: i64, mut f: impl FnMut(WindowRange)) {
        match *self {
            WindowKind::Hopping { size, advance } => {
                let mut start = t - t.rem_euclid(advance);
                while start > t - size {
                    f(WindowRange {
                        start,
                        end: start + size,
                    });
                    start -= advance;
                }
            }
            _ => f(self.assign(t)),
        }
    }

    /// How many windows an event belongs to (hopping: `size / advance` rounded up; one
    /// for tumbling windows and sessions).
    pub fn windows_per_event(&self) -> u64 {
        match *self {
            WindowKind::Hopping { size, advance } if advance > 0 => {
                (size.max(1) as u64).div_ceil(advance as u64)
            }
            WindowKind::Hopping { .. } => u64::MAX,
            _ => 1,
        }
    }

    /// Whether this kind keeps windows per key (sessions).
    pub fn is_session(&self) -> bool {
        matches!(self, WindowKind::Session { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_aligns_to_the_epoch_including_before_it() {
        let k = WindowKind::Tumbling { size: 10_000 };
        assert_eq!(
            k.assign(0),
            WindowRange {
                start: 0,
                end: 10_000
            }
        );
        assert_eq!(
            k.assign(9_999),
            WindowRange {
                start: 0,
                end: 10_000
            }
        );
        assert_eq!(k.assign(10_000).start, 10_000);
        assert_eq!(
            k.assign(-1),
            WindowRange {
                start: -10_000,
                end: 0
            }
        );
    }
}
