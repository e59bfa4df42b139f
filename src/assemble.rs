//! From a checked `pipeline.toml` and its backend to a runnable [`Pipeline`]: the part of
//! `weir run` that `weir serve` and the tests share.

use weir_engine::config::{LatePolicy, PipelineConfig};
use weir_engine::jsonl::{JsonLinesSink, JsonLinesSource};
use weir_engine::{Job, Pipeline, Sink, Source};

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
}

impl Parts {
    /// Connects to every topic the pipeline reads or writes (or opens the files of `io`).
    pub async fn open(c: &PipelineConfig, backend: &Backend, io: &FileIo) -> anyhow::Result<Parts> {
        let source: Box<dyn Source> = match &io.input {
            Some(path) => Box::new(JsonLinesSource::open(path).await?),
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
        Ok(Parts {
            job,
            source,
            sink,
            dead_letter,
            late,
        })
    }

    /// The pipeline made of these parts.
    pub fn into_pipeline(self) -> Pipeline {
        let p = Pipeline::new(self.job, self.source, self.sink, self.dead_letter);
        match self.late {
            Some(late) => p.late_output(late),
            None => p,
        }
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
