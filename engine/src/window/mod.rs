//! Windows: which windows an event belongs to, the state kept per (window, key), and the
//! watermark that decides when a window closes.

mod store;
mod watermark;

pub use store::{Acc, Pane, WindowStore};
pub use watermark::Watermarks;

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
}

impl WindowKind {
    /// The window an event at `t` belongs to.
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
        }
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
