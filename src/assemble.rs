//! From a checked `pipeline.toml` and its backend to a runnable [`Pipeline`]: the part of
//! `weir run` that `weir serve` and the tests share.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_engine::config::{LatePolicy, PipelineConfig};
use weir_engine::enrich::{Enricher, Table};
use weir_engine::jsonl::{JsonLinesSink, JsonLinesSource};
use weir_engine::metrics::Metrics;
use weir_engine::retry::{RetrySink, WithRetries};
use weir_engine::{Job, Pipeline, Processor, Sink, Source};

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
    /// Stops the tasks the parts started (the enrichment table's follower): cancel it when
    /// the pipeline has stopped.
    pub background: CancellationToken,
}

impl Parts {
    /// Connects to every topic the pipeline reads or writes (or opens the files of `io`).
    ///
    /// With `[enrich]`, the table is loaded from its topic before this returns and then
    /// followed by a background task until [`background`](Parts::background) is cancelled.
    pub async fn open(c: &PipelineConfig, backend: &Backend, io: &FileIo) -> anyhow::Result<Parts> {
        let metrics = Arc::new(Metrics::default());
        let mut source: Box<dyn Source> = match &io.input {
            Some(path) => Box::new(
                JsonLinesSource::open(path)
                    .await?
                    .counting_into(metrics.clone()),
            ),
            None => {
                backend
                    .source(&c.source.topic, Some(&c.source.group))
                    .await?
            }
        };
        let sink = open_sink(backend, &c.sink.topic, io.output.as_deref()).await?;
        let dead_letter =
            open_sink(backend, &c.dead_letter.topic, io.dead_letter.as_deref()).await?;
        let mut job = Job::from_config(c);
        if io.late.is_some() && c.late == LatePolicy::DeadLetter {
            // A late file asks for a late output even if the file has no [late] section.
            job = job.with_late(LatePolicy::Output("--late".into()));
        }
        let late = match (&c.late, &io.late) {
            (_, Some(path)) => Some(open_sink(backend, "", Some(path)).await?),
            (LatePolicy::Output(topic), None) => Some(backend.sink(topic).await?),
            _ => None,
        };
        let mut retry = None;
        if let Some(r) = &c.retry {
            // A group of its own: one consumer group whose members subscribe to different
            // topics rebalances both consumers whenever either joins (and Tansu never
            // settled such a group under load).
            let group = format!("{}.retry", c.source.group);
            let retries = backend.source(&r.topic, Some(&group)).await?;
            let sink = RetrySink::new(backend.sink(&r.topic).await?);
            source = Box::new(WithRetries::new(source, retries).awaiting(sink.counter()));
            retry = Some(Box::new(sink) as Box<dyn Sink>);
        }
        let background = CancellationToken::new();
        let mut processors: Vec<Box<dyn Processor>> = Vec::new();
        if let Some(e) = &c.enrich {
            let table = Arc::new(Table::default());
            let mut reader = backend.table_reader(&e.table).await?;
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
            job,
            source,
            sink,
            dead_letter,
            late,
            retry,
            processors,
            metrics,
            background,
        })
    }

    /// The pipeline made of these parts.
    pub fn into_pipeline(self) -> Pipeline {
        let mut p = Pipeline::new(self.job, self.source, self.sink, self.dead_letter)
            .with_metrics(self.metrics);
        if let Some(late) = self.late {
            p = p.late_output(late);
        }
        if let Some(retry) = self.retry {
            p = p.retry_output(retry);
        }
        for proc in self.processors {
            p = p.processor(proc);
        }
        p
    }
}

async fn open_sink(
    backend: &Backend,
    topic: &str,
    file: Option<&str>,
) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match file {
        Some(path) => Box::new(JsonLinesSink::create(path).await?),
        None => backend.sink(topic).await?,
    })
}
