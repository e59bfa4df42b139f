//! JSON-lines files and standard streams as a source and a sink (`--input`, `--output`,
//! `--dead-letter`). One record per line; the line number is the offset in partition 0.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::error::Result;
use crate::metrics::Metrics;
use crate::record::{Checkpoint, OutRecord, Position, Record};
use crate::sink::Sink;
use crate::source::{Received, Source};

/// Reads JSON lines from a file or standard input. Whitespace-only lines are skipped (but
/// keep their line numbers) and counted in [`Metrics::blank_lines`] (and `events_in`) of the
/// counters given with [`counting_into`](Self::counting_into). Commits are no-ops: a file
/// is re-read from the start on each run.
pub struct JsonLinesSource {
    name: String,
    metrics: Option<Arc<Metrics>>,
    reader: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    line: Vec<u8>,
    next_offset: u64,
    assigned: bool,
    done: bool,
}

impl JsonLinesSource {
    /// Reads `path`, or standard input when `path` is `-`.
    pub async fn open(path: &str) -> Result<Self> {
        let (name, inner): (String, Box<dyn AsyncRead + Send + Unpin>) = if path == "-" {
            ("stdin".into(), Box::new(tokio::io::stdin()))
        } else {
            (
                path.to_string(),
                Box::new(tokio::fs::File::open(Path::new(path)).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot open {path}: {e}"))
                })?),
            )
        };
        Ok(Self::from_reader(name, inner))
    }

    /// Reads from any byte stream, naming it `name`.
    pub fn from_reader(name: String, r: Box<dyn AsyncRead + Send + Unpin>) -> Self {
        JsonLinesSource {
            name,
            metrics: None,
            reader: BufReader::with_capacity(1 << 16, r),
            line: Vec::with_capacity(512),
            next_offset: 0,
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
        if self.done {
            return Ok(Received::End);
        }
        let mut batch = Vec::with_capacity(max.min(4096));
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < max {
            if !batch.is_empty() && self.reader.buffer().is_empty() {
                break;
            }
            // `read_until` keeps partial input in `self.line` if the timeout fires, so no
            // byte is lost between calls. It returns without a newline only at the end.
            let read = match tokio::time::timeout_at(
                deadline,
                self.reader.read_until(b'\n', &mut self.line),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => break,
            };
            if read == 0 {
                self.done = true;
                if self.line.is_empty() {
                    break;
                }
            }
            let mut l = std::mem::take(&mut self.line);
            while matches!(l.last(), Some(b'\n' | b'\r')) {
                l.pop();
            }
            let offset = self.next_offset;
            self.next_offset += 1;
            if l.iter().all(|b| b.is_ascii_whitespace()) {
                if let Some(m) = &self.metrics {
                    Metrics::add(&m.events_in, 1);
                    Metrics::add(&m.blank_lines, 1);
                }
                continue;
            }
            batch.push(Record {
                payload: Bytes::from(l),
                position: Position {
                    partition: 0,
                    offset,
                },
                ..Default::default()
            });
            if self.done {
                break;
            }
        }
        if batch.is_empty() && self.done {
            return Ok(Received::End);
        }
        Ok(Received::Batch(batch))
    }

    async fn commit(&mut self, _positions: &[(Position, Checkpoint)]) -> Result<()> {
        Ok(())
    }
}

/// Writes each record's payload as one line to a file or standard output; a batch is
/// acknowledged once it is flushed.
pub struct JsonLinesSink {
    name: String,
    w: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
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
        let f = tokio::fs::File::create(path)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {path}: {e}")))?;
        Ok(Self::to_writer(path.to_string(), Box::new(f)))
    }

    /// Writes to any byte stream, naming it `name`.
    pub fn to_writer(name: String, w: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        JsonLinesSink {
            name,
            w: BufWriter::with_capacity(1 << 16, w),
        }
    }
}

#[async_trait]
impl Sink for JsonLinesSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        for r in batch {
            self.w.write_all(&r.payload).await?;
            self.w.write_all(b"\n").await?;
        }
        self.w.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_lines_with_offsets_and_ends() {
        let data = b"{\"a\":1}\n\n{\"a\":2}\r\n \t\r\n{\"a\":3}".to_vec();
        let m = Arc::new(Metrics::default());
        let mut s = JsonLinesSource::from_reader("t".into(), Box::new(std::io::Cursor::new(data)))
            .counting_into(m.clone());
        assert!(matches!(
            s.recv(10, Duration::from_secs(1)).await.unwrap(),
            Received::Assigned(_)
        ));
        let Received::Batch(b) = s.recv(10, Duration::from_secs(1)).await.unwrap() else {
            panic!("expected a batch")
        };
        let got: Vec<(&[u8], u64)> = b
            .iter()
            .map(|r| (&r.payload[..], r.position.offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (&b"{\"a\":1}"[..], 0),
                (&b"{\"a\":2}"[..], 2),
                (&b"{\"a\":3}"[..], 4)
            ]
        );
        let c = m.snapshot();
        assert_eq!((c.blank_lines, c.events_in), (2, 2));
        assert!(matches!(
            s.recv(10, Duration::from_secs(1)).await.unwrap(),
            Received::End
        ));
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
