//! JSON-lines files and standard streams as a source and a sink (`--input`, `--output`,
//! `--dead-letter`). One record per line; the line number is the offset in partition 0.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::record::{Checkpoint, OutRecord, Position, Record};
use crate::sink::Sink;
use crate::source::{Received, Source};

/// How much the reader thread reads at a time: the lines of one read share its buffer.
const CHUNK: usize = 256 << 10;
/// The most records the reader thread hands over at once.
const BATCH: usize = 1024;
/// Batches waiting between the reader thread and the pipeline (memory stays flat however
/// large the file: at most this many chunks are held, plus the one being split).
const QUEUED: usize = 4;

/// Reads JSON lines from a file or standard input. Whitespace-only lines are skipped (but
/// keep their line numbers) and counted in [`Metrics::blank_lines`] (and `events_in`) of the
/// counters given with [`counting_into`](Self::counting_into). Commits are no-ops: a file
/// is re-read from the start on each run.
///
/// A thread of its own reads the input in 256 KiB chunks with plain blocking reads, cuts
/// them into lines (each record's payload is a slice of its chunk, not a copy) and hands
/// them over in batches through a bounded channel: one hand-over per batch rather than a
/// hop through tokio's blocking pool per read.
pub struct JsonLinesSource {
    name: String,
    metrics: Option<Arc<Metrics>>,
    /// The input, until the first receive starts the reader thread with it.
    input: Option<Box<dyn Read + Send>>,
    lines: Option<mpsc::Receiver<std::io::Result<Vec<Record>>>>,
    /// Records of a batch larger than the last receive's `max`.
    pending: Vec<Record>,
    assigned: bool,
    done: bool,
}

impl JsonLinesSource {
    /// Reads `path`, or standard input when `path` is `-`.
    pub async fn open(path: &str) -> Result<Self> {
        if path == "-" {
            return Ok(Self::from_reader(
                "stdin".into(),
                Box::new(std::io::stdin()),
            ));
        }
        let f = std::fs::File::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open {path}: {e}")))?;
        Ok(Self::from_reader(path.to_string(), Box::new(f)))
    }

    /// Reads from any byte stream, naming it `name`.
    pub fn from_reader(name: String, r: Box<dyn Read + Send>) -> Self {
        JsonLinesSource {
            name,
            metrics: None,
            input: Some(r),
            lines: None,
            pending: Vec::new(),
            assigned: false,
            done: false,
        }
    }

    /// Counts skipped blank lines into `m` (the pipeline's counters): each one in
    /// `events_in` and in `blank_lines`, so the balance still holds.
    pub fn counting_into(mut self, m: Arc<Metrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    /// The receiving end of the reader thread, started on first use.
    fn lines(&mut self) -> std::io::Result<&mut mpsc::Receiver<std::io::Result<Vec<Record>>>> {
        if self.lines.is_none() {
            let input = self.input.take().expect("the input is read once");
            let (tx, rx) = mpsc::channel(QUEUED);
            let metrics = self.metrics.clone();
            std::thread::Builder::new()
                .name("weir-input".into())
                .spawn(move || read_lines(input, &tx, metrics.as_deref()))?;
            self.lines = Some(rx);
        }
        Ok(self.lines.as_mut().expect("started"))
    }

    /// Up to `max` records of `batch`; the rest waits in `pending`.
    fn take(&mut self, mut batch: Vec<Record>, max: usize) -> Received {
        if batch.len() > max {
            self.pending = batch.split_off(max);
        }
        Received::Batch(batch)
    }
}

/// The reader thread: cuts `input` into lines, numbered from 0, and sends them in batches
/// until the input ends, a read fails (the error is sent) or the source is dropped.
fn read_lines(
    mut input: Box<dyn Read + Send>,
    tx: &mpsc::Sender<std::io::Result<Vec<Record>>>,
    metrics: Option<&Metrics>,
) {
    let mut offset = 0u64;
    // The start of a line that the previous chunk ended in the middle of.
    let mut carry: Vec<u8> = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut push = |line: Bytes, batch: &mut Vec<Record>| {
        let o = offset;
        offset += 1;
        let mut l = line;
        while matches!(l.last(), Some(b'\n' | b'\r')) {
            l.truncate(l.len() - 1);
        }
        if l.iter().all(|b| b.is_ascii_whitespace()) {
            if let Some(m) = metrics {
                Metrics::add(&m.events_in, 1);
                Metrics::add(&m.blank_lines, 1);
            }
            return;
        }
        batch.push(Record {
            payload: l,
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
        if n == 0 {
            if !carry.is_empty() {
                push(Bytes::from(std::mem::take(&mut carry)), &mut batch);
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
            return;
        }
        buf.truncate(n);
        let chunk = buf.freeze();
        let mut from = 0;
        for nl in memchr::memchr_iter(b'\n', &chunk) {
            let line = if carry.is_empty() {
                chunk.slice(from..nl)
            } else {
                carry.extend_from_slice(&chunk[from..nl]);
                Bytes::from(std::mem::take(&mut carry))
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
        carry.extend_from_slice(&chunk[from..]);
        // Hand over what this read completed: a pipe's reader sees each line as it comes.
        if !batch.is_empty() {
            let part = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if tx.blocking_send(Ok(part)).is_err() {
                return;
            }
        }
    }
}

#[async_trait]
impl Source for JsonLinesSource {
    fn topic(&self) -> &str {
        &self.name
    }

    async fn recv(&mut self, max: usize, wait: Duration) -> Result<Received> {
        if !self.assigned {
            self.assigned = true;
            return Ok(Received::Assigned(vec![(0, None)]));
        }
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            return Ok(self.take(batch, max));
        }
        if self.done {
            return Ok(Received::End);
        }
        match tokio::time::timeout(wait, self.lines()?.recv()).await {
            Err(_) => Ok(Received::Batch(Vec::new())),
            Ok(None) => {
                self.done = true;
                Ok(Received::End)
            }
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(Some(Ok(batch))) => Ok(self.take(batch, max)),
        }
    }

    async fn commit(&mut self, _positions: &[(Position, Checkpoint)]) -> Result<()> {
        Ok(())
    }
}

/// Writes each record's payload as one line to a file or standard output; a batch is
/// acknowledged once it is flushed.
///
/// A regular file is written with plain blocking writes of up to 64 KiB from the
/// pipeline's own thread (a write to the page cache takes microseconds; a hop through
/// tokio's blocking pool per batch cost more than the write). Standard output and other
/// files (a FIFO, a device), which may block for as long as their reader likes, are
/// written through tokio, so the pipeline still answers signals.
pub struct JsonLinesSink {
    name: String,
    out: Out,
}

enum Out {
    File(std::io::BufWriter<std::fs::File>),
    Stream(BufWriter<Box<dyn AsyncWrite + Send + Unpin>>),
}

impl JsonLinesSink {
    /// Writes to `path` (created or truncated), or standard output when `path` is `-`.
    pub async fn create(path: &str) -> Result<Self> {
        if path == "-" {
            return Ok(Self::to_writer(
                "stdout".into(),
                Box::new(tokio::io::stdout()),
            ));
        }
        let f = std::fs::File::create(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {path}: {e}")))?;
        if !f.metadata()?.is_file() {
            // A FIFO or a device may block: written through tokio, so signals still work.
            return Ok(Self::to_writer(
                path.to_string(),
                Box::new(tokio::fs::File::from_std(f)),
            ));
        }
        Ok(JsonLinesSink {
            name: path.to_string(),
            out: Out::File(std::io::BufWriter::with_capacity(1 << 16, f)),
        })
    }

    /// Writes to any byte stream, naming it `name`.
    pub fn to_writer(name: String, w: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        JsonLinesSink {
            name,
            out: Out::Stream(BufWriter::with_capacity(1 << 16, w)),
        }
    }
}

#[async_trait]
impl Sink for JsonLinesSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        match &mut self.out {
            Out::File(w) => {
                use std::io::Write as _;
                for r in batch {
                    w.write_all(&r.payload)?;
                    w.write_all(b"\n")?;
                }
                w.flush()?;
            }
            Out::Stream(w) => {
                for r in batch {
                    w.write_all(&r.payload).await?;
                    w.write_all(b"\n").await?;
                }
                w.flush().await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record until the end, as (payload, offset), whatever the batches were.
    async fn drain(s: &mut JsonLinesSource) -> Vec<(Vec<u8>, u64)> {
        assert!(matches!(
            s.recv(10, Duration::from_secs(1)).await.unwrap(),
            Received::Assigned(_)
        ));
        let mut got = Vec::new();
        loop {
            match s.recv(10, Duration::from_secs(5)).await.unwrap() {
                Received::Batch(b) => {
                    assert!(b.len() <= 10, "a batch of {} for max 10", b.len());
                    got.extend(b.iter().map(|r| (r.payload.to_vec(), r.position.offset)));
                }
                Received::End => return got,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn reads_lines_with_offsets_and_ends() {
        let data = b"{\"a\":1}\n\n{\"a\":2}\r\n \t\r\n{\"a\":3}".to_vec();
        let m = Arc::new(Metrics::default());
        let mut s = JsonLinesSource::from_reader("t".into(), Box::new(std::io::Cursor::new(data)))
            .counting_into(m.clone());
        assert_eq!(
            drain(&mut s).await,
            vec![
                (b"{\"a\":1}".to_vec(), 0),
                (b"{\"a\":2}".to_vec(), 2),
                (b"{\"a\":3}".to_vec(), 4)
            ]
        );
        let c = m.snapshot();
        assert_eq!((c.blank_lines, c.events_in), (2, 2));
        assert!(matches!(
            s.recv(10, Duration::from_secs(1)).await.unwrap(),
            Received::End
        ));
    }

    /// A reader that returns at most `step` bytes per read, as a pipe may.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// Lines cut by reads of any size, and lines longer than a chunk, arrive whole and in
    /// order with their line numbers.
    #[tokio::test]
    async fn lines_across_reads_and_chunks_arrive_whole() {
        let mut lines: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 300)).into_bytes())
            .collect();
        lines[1234] = format!("{{\"long\":\"{}\"}}", "y".repeat(CHUNK + 17)).into_bytes();
        let data: Vec<u8> = lines
            .iter()
            .flat_map(|l| [&l[..], b"\n"].concat())
            .collect();
        let want: Vec<(Vec<u8>, u64)> = lines.into_iter().zip(0..).collect();
        for step in [7, 4096, CHUNK] {
            let input = Trickle {
                data: data.clone(),
                at: 0,
                step,
            };
            let mut s = JsonLinesSource::from_reader("t".into(), Box::new(input));
            assert!(drain(&mut s).await == want, "reads of {step} bytes");
        }
    }

    #[tokio::test]
    async fn batches_respect_max() {
        let data: Vec<u8> = (0..10)
            .flat_map(|i| format!("{{\"i\":{i}}}\n").into_bytes())
            .collect();
        let mut s = JsonLinesSource::from_reader("t".into(), Box::new(std::io::Cursor::new(data)));
        s.recv(4, Duration::from_secs(1)).await.unwrap();
        let mut n = 0;
        loop {
            match s.recv(4, Duration::from_secs(1)).await.unwrap() {
                Received::Batch(b) => {
                    assert!(b.len() <= 4);
                    n += b.len();
                }
                Received::End => break,
                Received::Assigned(_) | Received::Revoked(_) => unreachable!(),
            }
        }
        assert_eq!(n, 10);
    }
}
