//! [`Job`]: what the pipeline computes, from `pipeline.toml` or built in code.

use std::time::Duration;

use crate::aggregate::AggFn;
use crate::config::{EmitMode, ErrorAction, LatePolicy, PipelineConfig, RetryConfig, WindowConfig};
use crate::decode::{Decoder, Schema, TimeSource};
use crate::window::WindowKind;

/// What the pipeline computes, independent of where records come from and go.
#[derive(Debug, Clone)]
pub struct Job {
    /// What events must look like.
    pub schema: Schema,
    /// Where event time comes from.
    pub time: TimeSource,
    /// Allowed out-of-orderness (the watermark trails the highest event time by this).
    pub out_of_orderness: Duration,
    /// Events dated further ahead of the wall clock are dead letters (`None`: no limit).
    pub max_future: Option<Duration>,
    /// Window kind, grace and idle timeout.
    pub window: WindowConfig,
    /// Key fields (dotted paths).
    pub group_by: Vec<String>,
    /// Aggregates per (window, key).
    pub compute: Vec<AggFn>,
    /// When results are emitted.
    pub emit: EmitMode,
    /// Where events whose window has closed go.
    pub late: LatePolicy,
    /// Most records per batch.
    pub batch_size: usize,
    /// Larger payloads are dead-lettered.
    pub max_payload_bytes: usize,
    /// How often source positions are committed.
    pub commit_interval: Duration,
    /// The error strategy of each stage (`validate`, `enrich`, processors by name); a
    /// stage not listed dead-letters.
    pub errors: Vec<(String, ErrorAction)>,
    /// The retry topic and its backoff, when the pipeline has one.
    pub retry: Option<RetryConfig>,
}

impl Job {
    /// The job a pipeline file describes.
    pub fn from_config(c: &PipelineConfig) -> Self {
        Job {
            schema: c.schema.clone(),
            time: c.time.clone(),
            out_of_orderness: c.out_of_orderness,
            max_future: c.max_future,
            window: c.window,
            group_by: c.aggregate.group_by.clone(),
            compute: c.aggregate.compute.clone(),
            emit: c.window.emit,
            late: c.late.clone(),
            batch_size: c.source.batch_size,
            max_payload_bytes: c.source.max_payload_bytes,
            commit_interval: c.source.commit_interval,
            errors: c.errors.clone(),
            retry: c.retry.clone(),
        }
    }

    /// A decoder of this job's events that reads the group-by fields, and their slots with
    /// their names.
    pub(crate) fn key_decoder(&self) -> (Decoder, Vec<(usize, String)>) {
        let mut decoder = Decoder::new(&self.schema, &self.time, self.max_payload_bytes);
        let key_slots = self
            .group_by
            .iter()
            .map(|k| (decoder.want(k), k.clone()))
            .collect();
        (decoder, key_slots)
    }

    /// Why this job cannot run with the outputs given (`late`: a late output,
    /// `retry`: a retry output), or a window definition past the engine's bounds.
    pub fn check(&self, late: bool, retry: bool) -> Result<(), String> {
        if let (LatePolicy::Output(t), false) = (&self.late, late) {
            return Err(format!(
                "late events go to `{t}` but the pipeline has no late output"
            ));
        }
        if let (Some(r), false) = (&self.retry, retry) {
            return Err(format!(
                "retries go to `{}` but the pipeline has no retry output",
                r.topic
            ));
        }
        let per_event = self.window.kind.windows_per_event();
        if per_event > crate::window::MAX_WINDOWS_PER_EVENT {
            return Err(format!(
                "the window puts every event in {per_event} windows; at most {} are allowed",
                crate::window::MAX_WINDOWS_PER_EVENT
            ));
        }
        Ok(())
    }

    /// A tumbling count per `key` over the event-time field `time_field`, in windows of
    /// `size`, with no schema beyond those two fields, no grace and a 5 s idle timeout.
    pub fn tumbling_count(key: &str, time_field: &str, size: Duration) -> Self {
        Job {
            schema: Schema::default(),
            time: TimeSource::Field {
                path: time_field.into(),
                format: crate::time::TimeFormat::Auto,
            },
            out_of_orderness: Duration::ZERO,
            max_future: Some(crate::config::DEFAULT_MAX_FUTURE),
            window: WindowConfig {
                kind: WindowKind::Tumbling {
                    size: size.as_millis().max(1) as i64,
                },
                grace: Duration::ZERO,
                idle_timeout: Duration::from_secs(5),
                emit: EmitMode::Final,
                max_open_entries: crate::window::DEFAULT_MAX_OPEN_ENTRIES,
            },
            group_by: vec![key.into()],
            compute: vec![AggFn::Count],
            emit: EmitMode::Final,
            late: LatePolicy::DeadLetter,
            batch_size: 1024,
            max_payload_bytes: 1 << 20,
            commit_interval: Duration::from_secs(1),
            errors: Vec::new(),
            retry: None,
        }
    }

    /// The same job with a schema.
    pub fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }

    /// The same job with a grace period.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.window.grace = grace;
        self
    }

    /// The same job with another window kind (tumbling, hopping, session).
    pub fn with_window(mut self, kind: WindowKind) -> Self {
        self.window.kind = kind;
        self
    }

    /// The same job computing these aggregates.
    pub fn with_aggregates(mut self, compute: Vec<AggFn>) -> Self {
        self.compute = compute;
        self
    }

    /// The same job grouped by these fields.
    pub fn with_group_by(mut self, fields: &[&str]) -> Self {
        self.group_by = fields.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The same job with an emit mode.
    pub fn with_emit(mut self, emit: EmitMode) -> Self {
        self.emit = emit;
        self.window.emit = emit;
        self
    }

    /// The same job with a late-event policy.
    pub fn with_late(mut self, late: LatePolicy) -> Self {
        self.late = late;
        self
    }

    /// The same job with a limit on how far ahead of the wall clock events may be dated.
    pub fn with_max_future(mut self, max_future: Option<Duration>) -> Self {
        self.max_future = max_future;
        self
    }

    /// The same job with a bound on open (window, key) entries.
    pub fn with_max_open_entries(mut self, n: usize) -> Self {
        self.window.max_open_entries = n;
        self
    }

    /// The same job with an idle timeout.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.window.idle_timeout = idle;
        self
    }

    /// The same job with `action` as the error strategy of `stage`.
    pub fn with_error_strategy(mut self, stage: &str, action: ErrorAction) -> Self {
        self.errors.retain(|(s, _)| s != stage);
        self.errors.push((stage.to_string(), action));
        self
    }

    /// The same job with a retry topic.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }
}
