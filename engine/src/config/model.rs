//! The pipeline configuration's model: what `pipeline.toml` says, validated.

use std::time::Duration;

use crate::decode::{Schema, TimeSource};
use crate::window::WindowKind;

use super::tree::{Loc, Node};

pub use crate::aggregate::AggFn;

pub(crate) const MIB: u64 = 1 << 20;

/// How far ahead of the wall clock an event may be dated unless `[event_time] max_future`
/// says otherwise. Client clocks (phones, browsers) are often minutes off; a producer that
/// writes local time in the wrong zone is whole hours off and is caught. An event within
/// the limit is counted, and cannot make others late (its time moves the watermark no
/// further than the wall clock); its window simply stays open until its time comes, which
/// the limit bounds.
pub(crate) const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(3600);

/// `[pipeline] guarantee`: what the outputs promise through crashes and rebalances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Guarantee {
    /// Every output at least once; after a crash a window may be emitted again with the
    /// same count and id (consumers drop duplicates by `weir.id`).
    #[default]
    AtLeastOnce,
    /// Each output visible once to a consumer that reads committed records only: the
    /// outputs of a commit interval, the source positions and the window checkpoint are
    /// committed in one broker transaction (backends that have them: Kafka).
    ExactlyOnce,
}

/// A whole pipeline, validated.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// A name for logs; also the default consumer group.
    pub name: String,
    /// The chosen backend, after `--broker` / `WEIR_BROKER` overrides; empty when neither
    /// the file nor an override names one (the engine names no backend: the binary's
    /// registry then chooses its default, the embedded `memory` broker, and
    /// `weir::Backend::load` fills this in).
    pub broker: String,
    /// Where the `broker` setting came from.
    pub broker_loc: Loc,
    /// `[pipeline] give_up_after`: how long an unreachable broker is retried (with a log
    /// line per attempt) before the command fails with exit 1; zero fails at once.
    pub give_up_after: Duration,
    /// `[pipeline] guarantee`: what a consumer of the outputs may rely on.
    pub guarantee: Guarantee,
    /// Where the `guarantee` setting is (the backend's registry checks it can keep it).
    pub guarantee_loc: Loc,
    /// The input topic and how it is read.
    pub source: SourceConfig,
    /// What events must look like.
    pub schema: Schema,
    /// Where event time comes from.
    pub time: TimeSource,
    /// Allowed out-of-orderness: the watermark trails the highest event time by this much.
    pub out_of_orderness: Duration,
    /// Events dated further than this ahead of the wall clock are dead letters (`None`:
    /// no limit).
    pub max_future: Option<Duration>,
    /// The window and when it closes.
    pub window: WindowConfig,
    /// What is computed per window.
    pub aggregate: AggregateConfig,
    /// Where window results go (its `topic` is empty when `sink_store` is set).
    pub sink: TopicConfig,
    /// `[sink] type = "…"` other than `topic`: results go to a store (a database) that the
    /// binary's registry of stores reads and checks; `None`: the sink topic.
    pub sink_store: Option<SinkStore>,
    /// Where dead letters go.
    pub dead_letter: TopicConfig,
    /// Where events whose window has closed go.
    pub late: LatePolicy,
    /// The raw `[brokers.NAME]` sections (name, where the name is, the table), read by
    /// each backend.
    pub brokers: Vec<(String, Loc, Node)>,
    /// The built-in generator that feeds the demo.
    pub demo: DemoConfig,
    /// `weir serve`'s ingest API and live view.
    pub serve: ServeConfig,
    /// `[observability]`: where `weir run` serves `/metrics` and `/healthz`.
    pub observability: ObservabilityConfig,
    /// `[retry]`: the retry topic and its backoff.
    pub retry: Option<RetryConfig>,
    /// `[enrich]`: the table joined into each event.
    pub enrich: Option<EnrichConfig>,
    /// `[errors]`: the error strategy of each stage that is not the default `dead_letter`.
    pub errors: Vec<(String, ErrorAction)>,
}

/// `[source]`: the input topic.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Topic (queue, stream) to read.
    pub topic: String,
    /// Consumer group whose committed positions survive restarts.
    pub group: String,
    /// Most records handled per batch.
    pub batch_size: usize,
    /// Payloads larger than this are dead-lettered.
    pub max_payload_bytes: usize,
    /// How often positions are committed (also at shutdown).
    pub commit_interval: Duration,
    /// `repartition = true`: the internal topic (`repartition_topic`, by default
    /// `<group>-repartition`) that the source's events are forwarded to, keyed by their
    /// group key, and that the windowing stage reads instead (see
    /// [`crate::repartition`]). `None`: the source is read as it is keyed.
    pub repartition: Option<String>,
    /// Where `repartition` is set, for the problems it makes.
    pub repartition_loc: Loc,
}

/// `[window]`.
#[derive(Debug, Clone, Copy)]
pub struct WindowConfig {
    /// The window kind and size.
    pub kind: WindowKind,
    /// How long after its end (in event time) a window still accepts events.
    pub grace: Duration,
    /// After this long without input, time advances by the wall clock.
    pub idle_timeout: Duration,
    /// When results are emitted.
    pub emit: EmitMode,
    /// The most open (window, key) entries, over all partitions: an event that would open
    /// more is refused as a validation failure (a dead letter by default).
    pub max_open_entries: usize,
}

/// When window results are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitMode {
    /// One result per (key, window) when the window closes.
    Final,
    /// A result after every batch that changed a (key, window), flagged `"final": false`,
    /// then the final one flagged `"final": true`.
    Update,
}

/// What happens to an event whose windows have all closed. It is always counted as late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatePolicy {
    /// To the dead-letter output with reason `late event: ...` (when `[late]` is absent).
    DeadLetter,
    /// To this topic (or `--late FILE`), unchanged, with `weir.late.*` headers.
    Output(String),
    /// Dropped.
    Drop,
}

/// `[aggregate]`.
#[derive(Debug, Clone)]
pub struct AggregateConfig {
    /// Dotted paths of the key fields.
    pub group_by: Vec<String>,
    /// The aggregates, in result order.
    pub compute: Vec<AggFn>,
}

/// A destination topic.
#[derive(Debug, Clone)]
pub struct TopicConfig {
    /// Topic (exchange, stream) name.
    pub topic: String,
}

/// `[sink]` naming a store other than a topic (`type = "postgres"`): its raw table, read
/// by that store's own config reader (the engine names no store).
#[derive(Debug, Clone)]
pub struct SinkStore {
    /// The `type` given.
    pub kind: String,
    /// Where the `type` is.
    pub kind_loc: Loc,
    /// The whole `[sink]` table (`type` included).
    pub table: Node,
}

/// `[demo]`: the generator `weir run` starts on the memory backend without `--input`.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Events per tick.
    pub events: usize,
    /// Time between ticks.
    pub interval: Duration,
    /// Distinct users.
    pub users: usize,
    /// One in this many generated events is invalid (0 = none).
    pub invalid_every: usize,
}

/// `[serve]`: the HTTP ingest API and live view of `weir serve`; its limits apply to
/// `weir run`'s metrics endpoint too.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`--listen` overrides it); loopback by default.
    pub listen: std::net::SocketAddr,
    /// Largest body of `POST /track` (413 above it); defaults to `source.max_payload_bytes`.
    pub max_body_bytes: usize,
    /// Largest body of `POST /track/batch`.
    pub max_batch_bytes: usize,
    /// Most events waiting for the broker's acknowledgement; past it requests get 503 at once.
    pub queue: usize,
    /// How long a request waits for the broker's acknowledgement before 503.
    pub publish_timeout: Duration,
    /// Name of the environment variable holding the bearer token that `POST /track*` then
    /// require; unset or empty variable = no token. The token itself never goes in the file.
    pub token_env: String,
    /// How long a client may take to send a request's headers (slow clients are closed).
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body, beyond one second per
    /// `min_body_rate` bytes received (late bodies get 408 and their connection closes).
    pub body_timeout: Duration,
    /// Bytes per second a request body must keep up after `body_timeout`.
    pub min_body_rate: u64,
    /// How long a connection may stay open without a request in progress.
    pub idle_timeout: Duration,
    /// Most open connections; past it the connection idle (or stalled in its request
    /// body) the longest is closed to make room.
    pub max_connections: usize,
}

/// `[observability]`: the metrics and health endpoint of `weir run`.
#[derive(Debug, Clone, Default)]
pub struct ObservabilityConfig {
    /// Where `/metrics` and `/healthz` are served (`--metrics-listen` overrides it); none
    /// by default.
    pub listen: Option<std::net::SocketAddr>,
    /// How long the pipeline may go without a successful receive (an unreachable broker)
    /// before `/healthz` answers 503.
    pub stuck_after: Duration,
}

/// `[enrich]`: which table to join and how.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichConfig {
    /// The topic the table is read from (every record, from the beginning).
    pub table: String,
    /// The event field whose value is looked up (dotted path).
    pub key: String,
    /// The field of the table's records that holds their key (dotted path).
    pub table_key: String,
    /// The field added to each event, holding the table record.
    pub into: String,
}

/// `[retry]`: where recoverable failures go and when they come back.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// The retry topic.
    pub topic: String,
    /// Delay before the first retry.
    pub initial: Duration,
    /// Each further retry waits this many times longer.
    pub multiplier: f64,
    /// The longest delay.
    pub max: Duration,
    /// Processing attempts in all (the first one included) before the record goes to the
    /// dead letters.
    pub max_attempts: u32,
}

impl RetryConfig {
    /// The delay before retry number `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let f = self.multiplier.powi(n.saturating_sub(1).min(1_000) as i32);
        let ms = (self.initial.as_millis() as f64 * f).min(self.max.as_millis() as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }
}

/// The stage that validates and decodes events (`[errors] validate`).
pub(crate) const STAGE_VALIDATE: &str = "validate";
/// The enrichment stage (`[errors] enrich`).
pub(crate) const STAGE_ENRICH: &str = "enrich";

/// What to do with a record a stage failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Send it to the dead-letter topic with the reason (the default).
    DeadLetter,
    /// Send it to the retry topic; after `max_attempts` it goes to the dead letters with
    /// the history of its attempts.
    Retry,
    /// Drop it, counted as `skipped`.
    Skip,
    /// Stop the pipeline with an error, committing nothing past the failing record.
    Fail,
}

impl ErrorAction {
    /// Reads `dead_letter`, `retry`, `skip` or `fail`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "dead_letter" => ErrorAction::DeadLetter,
            "retry" => ErrorAction::Retry,
            "skip" => ErrorAction::Skip,
            "fail" => ErrorAction::Fail,
            _ => return None,
        })
    }

    /// The name used in `pipeline.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::DeadLetter => "dead_letter",
            ErrorAction::Retry => "retry",
            ErrorAction::Skip => "skip",
            ErrorAction::Fail => "fail",
        }
    }
}
