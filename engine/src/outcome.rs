//! What happened to a record ([`Outcome`]) and what a batch produced ([`Emitted`]): the
//! vocabulary the operator, the error policy and the runtime share.

use tokio::time::Instant;

use crate::record::OutRecord;

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counted into an open window.
    Windowed,
    /// Invalid; a dead letter was produced.
    Dead,
    /// Every window it belonged to had closed: it went to the late output (or the
    /// dead-letter output, or was dropped, as configured) and was counted as late.
    Late,
    /// A replayed record whose outcome was delivered before the restart; skipped.
    Replayed,
    /// A stage failed on it and it went to the retry topic.
    Retried,
    /// A stage failed on it and its strategy dropped it.
    Skipped,
    /// A stage failed on it and its strategy stops the pipeline.
    Failed,
}

/// Per-batch output of the operator.
#[derive(Debug, Default)]
pub struct Emitted {
    /// Window results.
    pub results: Vec<OutRecord>,
    /// Dead letters (invalid records, and late ones unless a late output is configured).
    pub dead: Vec<OutRecord>,
    /// Late events for the late output.
    pub late: Vec<OutRecord>,
    /// Records for the retry topic.
    pub retry: Vec<OutRecord>,
    /// Windows closed in this step (an interval another task closed first is not counted
    /// again: see [`Metrics::windows_closed`](crate::metrics::Metrics::windows_closed)).
    pub windows_closed: u64,
    /// When the operator decided to close them (set with the first window closed): where
    /// [`Metrics::emit_latency`](crate::metrics::Metrics::emit_latency) starts.
    pub closed_at: Option<Instant>,
}
