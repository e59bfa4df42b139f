//! JSON-lines files and standard streams as a source and a sink (`--input`, `--output`,
//! `--dead-letter`). One record per line; the line number is the offset in partition 0.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::record::{Checkpoint, OutRecord, Position, Record};
use crate::sink::Sink;
use crate::source::{Received, Source};

mod reader;
use reader::{LineReader, Shrink};

/// How much the reader thread reads at a time: the lines of one read share its buffer.
const CHUNK: usize = 256 << 10;
/// The most records the reader thread hands over at once.
const BATCH: usize = 1024;
/// Batches waiting between the reader thread and the pipeline (memory stays flat however
/// large the file: at most this many chunks are held, plus the one being split).
const QUEUED: usize = 4;
/// The longest line kept whole unless [`JsonLinesSource::max_line_bytes`] says otherwise
/// (the default `max_payload_bytes`).
const MAX_LINE: usize = 1 << 20;
/// How much of a line past the limit is kept for its dead letter.
const CUT_KEEP: usize = 1024;

/// Reads JSON lines from a file or standard input. Whitespace-only lines are skipped (but
/// keep their line numbers) and counted in [`Metrics::blank_lines`] (and `events_in`) of the
/// counters given with [`counting_into`](Self::counting_into). Commits are no-ops: a file
/// is re-read from the start on each run.
///
/// A thread of its own reads the input in 256 KiB chunks with plain blocking reads, cuts
/// them into lines (each record's payload is a slice of its chunk, not a copy) and hands
/// them over in batches through a bounded channel: one hand-over per batch rather than a
/// hop through tokio's blocking pool per read.
///
/// Memory stays bounded whatever the input: a line longer than
/// [`max_line_bytes`](Self::max_line_bytes) is not buffered; its first 1 KiB comes as a
/// record marked cut ([`Record::cut_from`]: its length), which the pipeline dead-letters as
/// oversized, and reading goes on at the next newline. A regular file that shrinks while
/// it is read (truncated under the reader) ends the source with an error.
pub struct JsonLinesSource {
    name: String,
    metrics: Option<Arc<Metrics>>,
    /// The input, until the first receive starts the reader thread with it.
    input: Option<Box<dyn Read + Send>>,
    /// The regular file being read, to notice it shrink.
    file: Option<std::fs::File>,
    max_line: usize,
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
        let watched = match f.metadata()?.is_file() {
            true => Some(f.try_clone()?),
            false => None,
        };
        let mut s = Self::from_reader(path.to_string(), Box::new(f));
        s.file = watched;
        Ok(s)
    }

    /// Cuts lines longer than `n` bytes (besides their line ending) instead of buffering
    /// them: the pipeline's `max_payload_bytes`, so no line can take more memory than that.
    pub fn max_line_bytes(mut self, n: usize) -> Self {
        self.max_line = n;
        self
    }

    /// Reads from any byte stream, naming it `name`.
    pub fn from_reader(name: String, r: Box<dyn Read + Send>) -> Self {
        JsonLinesSource {
            name,
            metrics: None,
            input: Some(r),
            file: None,
            max_line: MAX_LINE,
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
            let reader = LineReader {
                metrics: self.metrics.clone(),
                max_line: self.max_line,
                shrink: self.file.take().map(|f| Shrink {
                    name: self.name.clone(),
                    file: f,
                }),
            };
            std::thread::Builder::new()
                .name("weir-input".into())
                .spawn(move || reader.run(input, &tx))?;
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

    /// A line past the limit is not buffered: it comes as its first bytes, marked cut from
    /// its length, and the lines after it come whole, whatever the reads were.
    #[tokio::test]
    async fn a_line_past_the_limit_is_cut_and_reading_goes_on() {
        let long = "x".repeat(3 * CHUNK + 5);
        let data = format!(
            "{{\"a\":1}}\n{long}\n{{\"a\":2}}\n{}\r\n{}\n{}",
            "y".repeat(100),
            "w".repeat(65),
            "z".repeat(2000)
        );
        for step in [7, 4096, CHUNK] {
            let input = Trickle {
                data: data.clone().into_bytes(),
                at: 0,
                step,
            };
            let mut s =
                JsonLinesSource::from_reader("t".into(), Box::new(input)).max_line_bytes(64);
            assert!(matches!(
                s.recv(10, Duration::from_secs(1)).await.unwrap(),
                Received::Assigned(_)
            ));
            let mut got = Vec::new();
            while let Received::Batch(b) = s.recv(10, Duration::from_secs(5)).await.unwrap() {
                got.extend(b);
            }
            let seen: Vec<(u64, usize, Option<u64>)> = got
                .iter()
                .map(|r| (r.position.offset, r.payload.len(), r.cut_from()))
                .collect();
            assert_eq!(
                seen,
                vec![
                    (0, 7, None),
                    (1, CUT_KEEP, Some(3 * CHUNK as u64 + 5)),
                    (2, 7, None),
                    // 100 bytes and a `\r`, which is not counted.
                    (3, 100, Some(100)),
                    // 65 bytes: one past the limit is the decoder's to refuse, with its size.
                    (4, 65, None),
                    (5, CUT_KEEP, Some(2000)),
                ],
                "reads of {step} bytes"
            );
            assert!(got[1].payload.iter().all(|b| *b == b'x'));
            assert_eq!(&got[2].payload[..], b"{\"a\":2}");
        }
    }

    /// A regular file truncated under the reader ends the source with an error that says so.
    #[tokio::test]
    async fn a_file_truncated_while_read_is_an_error() {
        use std::io::Write as _;
        let path = std::env::temp_dir().join(format!("weir-jsonl-shrink-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        let line = format!("{{\"pad\":\"{}\"}}\n", "p".repeat(200));
        for _ in 0..50_000 {
            f.write_all(line.as_bytes()).unwrap();
        }
        drop(f);
        let mut s = JsonLinesSource::open(path.to_str().unwrap()).await.unwrap();
        s.recv(10, Duration::from_secs(1)).await.unwrap();
        assert!(matches!(
            s.recv(10, Duration::from_secs(5)).await.unwrap(),
            Received::Batch(b) if !b.is_empty()
        ));
        // The reader holds a few chunks at most: most of the 10 MB is still to read.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1000)
            .unwrap();
        let err = loop {
            match s.recv(1024, Duration::from_secs(5)).await {
                Ok(Received::Batch(_)) => continue,
                Ok(other) => panic!("ended without an error: {other:?}"),
                Err(e) => break e.to_string(),
            }
        };
        let _ = std::fs::remove_file(&path);
        assert!(
            err.contains("was truncated while being read: it is now 1000 bytes long")
                && err.contains(&format!("of {}", 50_000 * line.len())),
            "{err}"
        );
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
