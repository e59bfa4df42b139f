//! `weir produce` and `weir tail`: JSON lines into a pipeline's source topic, and a
//! topic's records out as JSON lines, on any backend whose topics outlive the process
//! (not `memory`: its topics live and die with one process; use `weir run` there).

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use weir::Backend;
use weir_engine::config::PipelineConfig;
use weir_engine::{OutRecord, Received};

use crate::PipelineArgs;

/// `weir produce`.
#[derive(Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Publish to this topic instead of the pipeline's source topic.
    #[arg(long)]
    topic: Option<String>,
}

/// `weir tail`.
#[derive(Args)]
pub struct TailArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Print this topic instead of the pipeline's sink topic.
    #[arg(long)]
    topic: Option<String>,
    /// Start at the oldest retained record instead of only new ones.
    #[arg(long)]
    from_beginning: bool,
    /// Exit 0 once no new record arrived for this long (e.g. `5s`, `500ms`).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration_arg)]
    idle_exit: Option<Duration>,
    /// Show only committed records (Kafka: `isolation.level=read_committed`), as for a
    /// pipeline with `guarantee = "exactly_once"`, which reads this way without the flag.
    /// On a backend without transactions this is an error.
    #[arg(long)]
    read_committed: bool,
}

fn setup(
    p: &PipelineArgs,
    verb: &str,
) -> Result<(PipelineConfig, Backend, tokio::runtime::Runtime), ExitCode> {
    let (c, backend) = crate::load(p).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(2)
    })?;
    if backend.in_process() {
        eprintln!(
            "error: `weir {verb}` needs a broker whose topics outlive this process; the memory \
             backend lives inside one `weir run` (which feeds and prints it itself). Use \
             --broker kafka (or another broker backend)."
        );
        return Err(ExitCode::from(2));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        })?;
    Ok((c, backend, rt))
}

/// Reads JSON lines on stdin and publishes them, keyed by the pipeline's (first)
/// `group_by` field, waiting for every acknowledgement; prints how many were sent.
///
/// SIGINT or SIGTERM stops it cleanly: the batch in flight is waited for (a second signal
/// exits at once), then it prints what was sent — every record of it acknowledged — and
/// the stdin line to resume from, and exits with 128 + the signal's number. Lines are read
/// on a thread of their own, so a signal is seen while stdin waits for more.
pub fn produce(a: ProduceArgs) -> ExitCode {
    let (c, backend, rt) = match setup(&a.p, "produce") {
        Ok(x) => x,
        Err(code) => return code,
    };
    let topic = a.topic.clone().unwrap_or_else(|| c.source.topic.clone());
    let key_field = c.aggregate.group_by.first().cloned();
    let result = rt.block_on(async {
        let (stop, by) = crate::signals::stop_token_and_signal()?;
        let stopped = || Some(by.get().copied().unwrap_or(("a signal", 130)));
        let mut done = Produced {
            sent: 0,
            next_line: 1,
            stopped: None,
        };
        let what = format!("opening topic {topic}");
        let opening = weir::assemble::connect(&c, &backend, &what, || backend.feeder(&topic));
        let mut sink = tokio::select! {
            s = opening => s?,
            _ = stop.cancelled() => {
                done.stopped = stopped();
                return Ok(done);
            }
        };
        let mut lines = read_lines(key_field);
        let mut batch = Vec::with_capacity(PRODUCE_BATCH);
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    done.stopped = stopped();
                    break;
                }
                l = lines.recv() => l,
            };
            let Some(first) = first else { break };
            let mut next_line = first?.push_to(&mut batch);
            while batch.len() < PRODUCE_BATCH {
                match lines.try_recv() {
                    Ok(l) => next_line = l?.push_to(&mut batch),
                    Err(_) => break,
                }
            }
            sink.send(&batch).await?;
            done.sent += batch.len() as u64;
            done.next_line = next_line;
            batch.clear();
        }
        anyhow::Ok(done)
    });
    match result {
        Ok(done) => {
            let n = done.sent;
            let s = if n == 1 { "" } else { "s" };
            println!("sent {n} record{s} to {topic} (all acknowledged)");
            match done.stopped {
                None => ExitCode::SUCCESS,
                Some((name, code)) => {
                    println!(
                        "stopped by {name} before the end of stdin: lines from {} on were not sent",
                        done.next_line
                    );
                    ExitCode::from(code)
                }
            }
        }
        Err(e) => {
            eprintln!("error: {}", crate::one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Records `weir produce` sends at once.
const PRODUCE_BATCH: usize = 1000;

/// What `weir produce` did.
struct Produced {
    /// Records sent, every one acknowledged.
    sent: u64,
    /// The first stdin line (from 1) not sent.
    next_line: u64,
    /// The signal that stopped it before the end of stdin.
    stopped: Option<(&'static str, u8)>,
}

/// A non-blank stdin line as a record, and its line number (from 1).
struct Line {
    record: OutRecord,
    number: u64,
}

impl Line {
    /// Adds the record to `batch`; returns the number of the line after it.
    fn push_to(self, batch: &mut Vec<OutRecord>) -> u64 {
        batch.push(self.record);
        self.number + 1
    }
}

/// Reads stdin on a thread of its own: its non-blank lines as records keyed by
/// `key_field`, a few batches ahead at most. The thread ends at the end of stdin, at a read
/// error (sent as the last item) or when the receiver is dropped.
fn read_lines(key_field: Option<String>) -> tokio::sync::mpsc::Receiver<std::io::Result<Line>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PRODUCE_BATCH * 4);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for (i, line) in stdin.lock().split(b'\n').enumerate() {
            let item = line.map(|mut line| {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                line
            });
            let item = match item {
                Ok(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(line) => Ok(Line {
                    record: OutRecord {
                        key: key_field.as_deref().and_then(|f| key_of(&line, f)),
                        payload: Bytes::from(line),
                        ..Default::default()
                    },
                    number: i as u64 + 1,
                }),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// The key of an event: its `field`, unquoted when it is a string, as JSON text otherwise.
/// Lines that are not JSON objects get no key (the pipeline dead-letters them).
fn key_of(line: &[u8], field: &str) -> Option<Bytes> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    match v.get(field)? {
        serde_json::Value::String(s) => Some(Bytes::from(s.clone().into_bytes())),
        serde_json::Value::Null => None,
        other => Some(Bytes::from(other.to_string().into_bytes())),
    }
}

/// Prints a topic's records (their payloads, one per line) as they arrive.
pub fn tail(mut a: TailArgs) -> ExitCode {
    if a.read_committed {
        // Committed records are what an exactly-once pipeline's readers see.
        a.p.sets.push("pipeline.guarantee=exactly_once".into());
    }
    let (c, backend, rt) = match setup(&a.p, "tail") {
        Ok(x) => x,
        Err(code) => return code,
    };
    let idle = a.idle_exit;
    if a.topic.is_none() && c.sink_store.is_some() {
        eprintln!(
            "error: the results of this pipeline go to {}, not to a topic: read them there (or name a topic with --topic)",
            weir::store::describe(&c)
        );
        return ExitCode::from(2);
    }
    let topic = a.topic.clone().unwrap_or_else(|| c.sink.topic.clone());
    let result = rt.block_on(async {
        let what = format!("opening topic {topic}");
        let reader = weir::assemble::connect(&c, &backend, &what, || {
            backend.reader(&topic, a.from_beginning)
        });
        let stop = crate::signals::first();
        tokio::pin!(stop);
        let reader = tokio::select! {
            r = reader => r?,
            _ = &mut stop => return Ok(()),
        };
        let Some(mut src) = reader else {
            anyhow::bail!("the {} backend has no reader", backend.name());
        };
        let mut last = tokio::time::Instant::now();
        let out = std::io::stdout();
        loop {
            let received = tokio::select! {
                r = src.recv(1000, Duration::from_millis(200)) => r?,
                _ = &mut stop => return Ok(()),
            };
            match received {
                Received::Batch(b) if !b.is_empty() => {
                    let mut buf = Vec::with_capacity(b.len() * 128);
                    for r in &b {
                        buf.extend_from_slice(&r.payload);
                        buf.push(b'\n');
                    }
                    let mut out = out.lock();
                    out.write_all(&buf).and_then(|_| out.flush())?;
                    last = tokio::time::Instant::now();
                }
                Received::End => return Ok(()),
                Received::Assigned(_) => last = tokio::time::Instant::now(),
                _ => {}
            }
            if idle.is_some_and(|d| last.elapsed() >= d) {
                return Ok(());
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::one_line(&e));
            ExitCode::from(1)
        }
    }
}
