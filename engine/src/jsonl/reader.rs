//! The reader thread of [`JsonLinesSource`](super::JsonLinesSource): lines out of 256 KiB
//! chunks, lines past the limit cut, and a file that shrinks under it noticed.

use std::io::Read;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{BATCH, CHUNK, CUT_KEEP};
use crate::metrics::Metrics;
use crate::record::{Position, Record};

/// What the reader thread needs besides its input.
pub(super) struct LineReader {
    pub(super) metrics: Option<Arc<Metrics>>,
    pub(super) max_line: usize,
    pub(super) shrink: Option<Shrink>,
}

/// A regular file watched for shrinking under the reader.
pub(super) struct Shrink {
    pub(super) name: String,
    pub(super) file: std::fs::File,
}

impl Shrink {
    /// An error if the file is now shorter than the `read` bytes read from it (or than it
    /// was at the start, `initial`): it was truncated while being read.
    fn check(&self, read: u64, initial: u64) -> std::io::Result<()> {
        let now = self.file.metadata()?.len();
        if now < read.max(initial) {
            return Err(std::io::Error::other(format!(
                "{} was truncated while being read: it is now {now} bytes long, {read} bytes \
                 had been read{}; the events that were in the rest are lost (run again on a \
                 complete file)",
                self.name,
                if initial > read {
                    format!(" of {initial}")
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }
}

/// A line past the limit: its first bytes and its length so far.
struct Cut {
    kept: Vec<u8>,
    len: u64,
    /// Whether the last byte so far is a `\r` (not counted if the line ends there).
    cr: bool,
}

impl Cut {
    fn new(parts: [&[u8]; 2]) -> Self {
        let mut c = Cut {
            kept: Vec::with_capacity(CUT_KEEP),
            len: 0,
            cr: false,
        };
        parts.into_iter().for_each(|p| c.extend(p));
        c
    }

    /// Counts `part`, keeping what is still missing of the first bytes.
    fn extend(&mut self, part: &[u8]) {
        let room = CUT_KEEP - self.kept.len();
        self.kept.extend_from_slice(&part[..part.len().min(room)]);
        self.len += part.len() as u64;
        if let Some(last) = part.last() {
            self.cr = *last == b'\r';
        }
    }

    /// The record for the line: its first bytes, marked cut from its length (without its
    /// line ending).
    fn into_line(self) -> (Bytes, Vec<crate::record::Header>) {
        use crate::record::{HEADER_PAYLOAD_BYTES, HEADER_TRUNCATED};
        let len = self.len - u64::from(self.cr);
        let headers = vec![
            (HEADER_TRUNCATED.into(), Bytes::from_static(b"true")),
            (HEADER_PAYLOAD_BYTES.into(), Bytes::from(len.to_string())),
        ];
        (Bytes::from(self.kept), headers)
    }
}

impl LineReader {
    /// Cuts `input` into lines, numbered from 0, and sends them in batches until the input
    /// ends, a read fails or the file shrank (the error is sent) or the source is dropped.
    pub(super) fn run(
        self,
        mut input: Box<dyn Read + Send>,
        tx: &mpsc::Sender<std::io::Result<Vec<Record>>>,
    ) {
        let metrics = self.metrics.as_deref();
        let initial = match &self.shrink {
            Some(s) => s.file.metadata().map_or(0, |m| m.len()),
            None => 0,
        };
        let mut read = 0u64;
        let mut offset = 0u64;
        // The start of a line that the previous chunk ended in the middle of.
        let mut carry: Vec<u8> = Vec::new();
        // The line being skipped past the limit, if any.
        let mut cut: Option<Cut> = None;
        // A line of at most `max_line` bytes plus its `\r`.
        let limit = self.max_line.saturating_add(1);
        let mut batch = Vec::with_capacity(BATCH);
        let mut push = |(line, headers): (Bytes, Vec<crate::record::Header>),
                        batch: &mut Vec<Record>| {
            let o = offset;
            offset += 1;
            let mut l = line;
            while matches!(l.last(), Some(b'\n' | b'\r')) {
                l.truncate(l.len() - 1);
            }
            if headers.is_empty() && l.iter().all(|b| b.is_ascii_whitespace()) {
                if let Some(m) = metrics {
                    Metrics::add(&m.events_in, 1);
                    Metrics::add(&m.blank_lines, 1);
                }
                return;
            }
            batch.push(Record {
                payload: l,
                headers,
                position: Position {
                    partition: 0,
                    offset: o,
                },
                ..Default::default()
            });
        };
        loop {
            let mut buf = BytesMut::zeroed(CHUNK);
            let n = loop {
                match input.read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            };
            read += n as u64;
            if n == 0 {
                if let Some(c) = cut.take() {
                    push(c.into_line(), &mut batch);
                } else if !carry.is_empty() {
                    push(
                        (Bytes::from(std::mem::take(&mut carry)), Vec::new()),
                        &mut batch,
                    );
                }
                if !batch.is_empty() && tx.blocking_send(Ok(batch)).is_err() {
                    return;
                }
                if let Some(Err(e)) = self.shrink.as_ref().map(|s| s.check(read, initial)) {
                    let _ = tx.blocking_send(Err(e));
                }
                return;
            }
            buf.truncate(n);
            let chunk = buf.freeze();
            let mut from = 0;
            for nl in memchr::memchr_iter(b'\n', &chunk) {
                let line = if let Some(mut c) = cut.take() {
                    c.extend(&chunk[from..nl]);
                    c.into_line()
                } else if carry.len() + (nl - from) > limit {
                    let c = Cut::new([&carry, &chunk[from..nl]]);
                    carry = Vec::new();
                    c.into_line()
                } else if carry.is_empty() {
                    (chunk.slice(from..nl), Vec::new())
                } else {
                    carry.extend_from_slice(&chunk[from..nl]);
                    (Bytes::from(std::mem::take(&mut carry)), Vec::new())
                };
                from = nl + 1;
                push(line, &mut batch);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if tx.blocking_send(Ok(full)).is_err() {
                        return;
                    }
                }
            }
            let rest = &chunk[from..];
            match &mut cut {
                Some(c) => c.extend(rest),
                None if carry.len() + rest.len() > limit => {
                    cut = Some(Cut::new([&carry, rest]));
                    carry = Vec::new();
                }
                None => carry.extend_from_slice(rest),
            }
            // Hand over what this read completed: a pipe's reader sees each line as it comes.
            if !batch.is_empty() {
                let part = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if tx.blocking_send(Ok(part)).is_err() {
                    return;
                }
            } else if tx.is_closed() {
                // Skipping a line without end (`/dev/zero`): stop with the source.
                return;
            }
        }
    }
}
