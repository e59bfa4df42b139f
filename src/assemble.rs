//! From a checked `pipeline.toml` and its backend to a runnable [`Pipeline`]: the part of
//! `weir run` that `weir serve` and the tests share.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_engine::config::{LatePolicy, PipelineConfig};
use weir_engine::enrich::{Enricher, Table};
use weir_engine::jsonl::{JsonLinesSink, JsonLinesSource};
use weir_engine::metrics::Metrics;
use weir_engine::repartition::Forwarder;
use weir_engine::retry::{RetrySink, WithRetries};
use weir_engine::{Job, Pipeline, Processor, Sink, Source, Transaction};

use crate::observe::Observer;
use crate::Backend;

/// Files (or `-` for stdio) that stand in for the pipeline's topics; `None` keeps the topic.
#[derive(Debug, Clone, Default)]
pub struct FileIo {
    /// JSON-lines events to read instead of the source topic.
    pub input: Option<String>,
    /// Where results go instead of the sink topic.
    pub output: Option<String>,
    /// Where dead letters go instead of the dead-letter topic.
    pub dead_letter: Option<String>,
    /// Where late events go instead of the `[late]` topic (or the dead letters).
    pub late: Option<String>,
}

impl FileIo {
    /// Refuses files that would destroy each other: an output (`--output`,
    /// `--dead-letter`, `--late`) that is the input file, or two outputs that are one
    /// file (compared by device and inode, so other names of a file count too; `-` is
    /// standard input or output, as redirected). Standard streams that are not regular
    /// files (a terminal, a pipe) may be shared.
    pub fn check(&self) -> anyhow::Result<()> {
        let outputs = [
            ("--output", &self.output),
            ("--dead-letter", &self.dead_letter),
            ("--late", &self.late),
        ];
        let mut seen: Vec<(&str, &str, (u64, u64))> = Vec::new();
        if let Some(id) = self.input.as_deref().and_then(|p| file_id(p, "/dev/stdin")) {
            seen.push(("--input", self.input.as_deref().unwrap_or_default(), id));
        }
        for (flag, path) in outputs {
            let Some(path) = path.as_deref() else {
                continue;
            };
            let Some(id) = file_id(path, "/dev/stdout") else {
                continue;
            };
            if let Some((other, other_path, _)) = seen.iter().find(|(_, _, i)| *i == id) {
                anyhow::bail!(
                    "{flag} {path} is the same file as {other} {other_path}: writing it would \
                     destroy what {}; name another file",
                    if *other == "--input" {
                        "is being read"
                    } else {
                        "the other writes"
                    }
                );
            }
            seen.push((flag, path, id));
        }
        Ok(())
    }
}

/// Device and inode of the regular file `path` names (`-`: `stdio`, the standard stream
/// as redirected), if it exists and is one.
fn file_id(path: &str, stdio: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(if path == "-" { stdio } else { path }).ok()?;
    m.is_file().then(|| (m.dev(), m.ino()))
}

/// The opened parts of a pipeline. Callers may wrap any of them (e.g. tee the results to a
/// live view) before [`into_pipeline`](Parts::into_pipeline).
pub struct Parts {
    /// The windowed job from the configuration.
    pub job: Job,
    /// The source topic's consumer in the pipeline's group (or the `--input` file).
    pub source: Box<dyn Source>,
    /// Where results go.
    pub sink: Box<dyn Sink>,
    /// Where dead letters go.
    pub dead_letter: Box<dyn Sink>,
    /// Where late events go, when the late policy is an output.
    pub late: Option<Box<dyn Sink>>,
    /// Where retries go, when the pipeline has a retry topic (the source then reads the
    /// retry topic too).
    pub retry: Option<Box<dyn Sink>>,
    /// Processors in order (the enrichment stage, when configured).
    pub processors: Vec<Box<dyn Processor>>,
    /// The pipeline's counters (shared with the `--input` file's reader, which counts
    /// blank lines into them).
    pub metrics: Arc<Metrics>,
    /// The broker transaction of an exactly-once pipeline (`None`: at-least-once).
    pub transaction: Option<Box<dyn Transaction>>,
    /// Stops the tasks the parts started (the enrichment table's follower): cancel it when
    /// the pipeline has stopped.
    pub background: CancellationToken,
    /// `[source] repartition = true`: the stage that forwards the source topic's events to
    /// the internal topic, which `source` then reads (see [`weir_engine::repartition`]).
    /// Run it beside the pipeline.
    pub forwarder: Option<Forwarder>,
    /// Whether `source` is the internal topic of a repartition stage.
    pub repartitioned: bool,
}

impl Parts {
    /// Connects to every topic the pipeline reads or writes (or opens the files of `io`).
    ///
    /// With `[enrich]`, the table is loaded from its topic before this returns and then
    /// followed by a background task until [`background`](Parts::background) is cancelled.
    /// The pipeline counts into `metrics` (what `/metrics` and the summary read).
    pub async fn open(
        c: &PipelineConfig,
        backend: &Backend,
        io: &FileIo,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Parts> {
        Parts::open_with(c, backend, io, None, metrics).await
    }

    /// [`open`](Parts::open), reading `input` instead of the source topic (or the input
    /// file) when given: what `weir test` feeds its cases through.
    pub async fn open_with(
        c: &PipelineConfig,
        backend: &Backend,
        io: &FileIo,
        input: Option<Box<dyn Source>>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Parts> {
        // Before anything is opened: creating an output truncates it.
        io.check()?;
        let reads_given = input.is_some();
        let mut source: Box<dyn Source> = match (input, &io.input) {
            (Some(input), _) => input,
            (None, Some(path)) => Box::new(
                JsonLinesSource::open(path)
                    .await?
                    .max_line_bytes(c.source.max_payload_bytes)
                    .counting_into(metrics.clone()),
            ),
            (None, None) => {
                // Repartitioned: the windowing stage reads the internal topic.
                let topic = c.source.repartition.as_ref().unwrap_or(&c.source.topic);
                connect(c, backend, &format!("opening topic {topic}"), || {
                    backend.source(topic, Some(&c.source.group))
                })
                .await?
            }
        };
        let forwarder = match (&c.source.repartition, &io.input) {
            (Some(internal), None) if !reads_given => {
                Some(open_forwarder(c, backend, internal).await?)
            }
            _ => None,
        };
        let sink = match (&c.sink_store, &io.output) {
            // `[sink] type = "postgres"` (an --output file still wins).
            (Some(_), None) => crate::store::open(c, backend).await?,
            _ => open_sink(c, backend, &c.sink.topic, io.output.as_deref()).await?,
        };
        let dead_letter =
            open_sink(c, backend, &c.dead_letter.topic, io.dead_letter.as_deref()).await?;
        let mut job = Job::from_config(c);
        if io.late.is_some() && c.late == LatePolicy::DeadLetter {
            // A late file asks for a late output even if the file has no [late] section.
            job = job.with_late(LatePolicy::Output("--late".into()));
        }
        let late = match (&c.late, &io.late) {
            (_, Some(path)) => Some(open_sink(c, backend, "", Some(path)).await?),
            (LatePolicy::Output(topic), None) => Some(open_sink(c, backend, topic, None).await?),
            _ => None,
        };
        let mut retry = None;
        if let Some(r) = &c.retry {
            // A group of its own: one consumer group whose members subscribe to different
            // topics rebalances both consumers whenever either joins (and Tansu never
            // settled such a group under load).
            let group = format!("{}.retry", c.source.group);
            let retries = connect(c, backend, &format!("opening topic {}", r.topic), || {
                backend.source(&r.topic, Some(&group))
            })
            .await?;
            let sink = RetrySink::new(open_sink(c, backend, &r.topic, None).await?);
            source = Box::new(WithRetries::new(source, retries).awaiting(sink.counter()));
            retry = Some(Box::new(sink) as Box<dyn Sink>);
        }
        let background = CancellationToken::new();
        let mut processors: Vec<Box<dyn Processor>> = Vec::new();
        if let Some(e) = &c.enrich {
            let table = Arc::new(Table::default());
            let mut reader = connect(c, backend, &format!("opening table {}", e.table), || {
                backend.table_reader(&e.table)
            })
            .await?;
            weir_engine::enrich::follow(
                table.clone(),
                &mut *reader,
                &e.table_key,
                true,
                &background,
            )
            .await?;
            tracing::info!(table = %e.table, rows = table.len(), "enrichment table loaded");
            let (t, key, stop) = (table.clone(), e.table_key.clone(), background.clone());
            tokio::spawn(async move {
                if let Err(err) =
                    weir_engine::enrich::follow(t, &mut *reader, &key, false, &stop).await
                {
                    tracing::error!(error = %err, "the enrichment table stopped following its topic");
                }
            });
            processors.push(Box::new(Enricher::new(e.clone(), table, &job)));
        }
        Ok(Parts {
            // The backend's sinks write in it (files given instead of topics do not).
            transaction: backend.transaction(),
            job,
            source,
            sink,
            dead_letter,
            late,
            retry,
            processors,
            metrics,
            background,
            repartitioned: forwarder.is_some(),
            forwarder,
        })
    }

    /// These parts reporting to `observer` (`/metrics`, `/healthz`): the source and
    /// every sink wrapped.
    pub fn observed(self, observer: &Arc<Observer>) -> Parts {
        use crate::observe::{ObservedSink, ObservedSource};
        let wrap = |s: Box<dyn Sink>| -> Box<dyn Sink> {
            Box::new(ObservedSink::new(s, observer.clone()))
        };
        Parts {
            source: Box::new(ObservedSource::new(self.source, observer.clone())),
            sink: wrap(self.sink),
            dead_letter: wrap(self.dead_letter),
            late: self.late.map(wrap),
            retry: self.retry.map(wrap),
            ..self
        }
    }

    /// The pipeline made of these parts (its forwarder, if any, is taken out first: see
    /// [`forwarder`](Parts::forwarder)).
    pub fn into_pipeline(self) -> Pipeline {
        let mut p = Pipeline::new(self.job, self.source, self.sink, self.dead_letter)
            .with_metrics(self.metrics);
        if self.repartitioned {
            p = p.repartitioned();
        }
        if let Some(late) = self.late {
            p = p.late_output(late);
        }
        if let Some(retry) = self.retry {
            p = p.retry_output(retry);
        }
        if let Some(t) = self.transaction {
            p = p.transactional(t);
        }
        for proc in self.processors {
            p = p.processor(proc);
        }
        p
    }
}

/// The repartition stage of `c`: a consumer of the source topic in the group
/// `<group>.repartition` and a producer to the internal topic, in a transaction of their own
/// where the backend has them.
async fn open_forwarder(
    c: &PipelineConfig,
    backend: &Backend,
    internal: &str,
) -> anyhow::Result<Forwarder> {
    let b = backend.forwarding();
    let group = format!("{}.repartition", c.source.group);
    let source = connect(
        c,
        backend,
        &format!("opening topic {} to repartition", c.source.topic),
        || b.source(&c.source.topic, Some(&group)),
    )
    .await?;
    let sink = connect(c, backend, &format!("opening topic {internal}"), || {
        b.sink(internal)
    })
    .await?;
    Ok(Forwarder::new(
        &Job::from_config(c),
        source,
        sink,
        b.transaction(),
    ))
}

/// Runs `forwarder` (if any) beside the pipeline until it ends or `shutdown`; an error
/// cancels `shutdown`, so that the pipeline stops too, and is returned by the handle.
pub fn spawn_forwarder(
    forwarder: Option<Forwarder>,
    shutdown: &CancellationToken,
    exit_when_idle: Option<std::time::Duration>,
) -> Option<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut f = forwarder?.shutdown_on(shutdown.clone());
    if let Some(idle) = exit_when_idle {
        f = f.exit_when_idle(idle);
    }
    let stop = shutdown.clone();
    Some(tokio::spawn(async move {
        match f.run().await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "the repartition stage stopped");
                stop.cancel();
                Err(anyhow::anyhow!("repartition: {e}"))
            }
        }
    }))
}

async fn open_sink(
    c: &PipelineConfig,
    backend: &Backend,
    topic: &str,
    file: Option<&str>,
) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match file {
        Some(path) => Box::new(JsonLinesSink::create(path).await?),
        None => {
            connect(c, backend, &format!("opening topic {topic}"), || {
                backend.sink(topic)
            })
            .await?
        }
    })
}

/// Runs `open` until it succeeds, retrying an unreachable broker for the pipeline's
/// `give_up_after` with a log line per attempt (see [`Backend::retrying`]). Cancel it by
/// dropping the future.
pub async fn connect<T, F, Fut>(
    c: &PipelineConfig,
    backend: &Backend,
    what: &str,
    open: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = weir_engine::Result<T>>,
{
    let never = CancellationToken::new();
    backend
        .retrying(what, c.give_up_after, &never, open)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{what}: stopped"))
}
