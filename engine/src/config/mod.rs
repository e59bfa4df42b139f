//! The pipeline configuration (`pipeline.toml`): its model, and loading it with every
//! problem reported at its `file:line:col`.

mod reader;
mod tree;

use std::time::Duration;

pub use reader::{ConfigErrors, Diagnostics, Problem, TableReader};
pub use tree::{Loc, Node, Table, Value};

use crate::decode::{FieldSpec, FieldType, Schema, TimeSource};
pub use crate::enrich::EnrichConfig;
pub use crate::errors::ErrorAction;
pub use crate::retry::RetryConfig;
use crate::time::TimeFormat;
use crate::window::WindowKind;

/// How far ahead of the wall clock an event may be dated unless `[event_time] max_future`
/// says otherwise. Client clocks (phones, browsers) are often minutes off; a producer that
/// writes local time in the wrong zone is whole hours off and is caught. An event within
/// the limit is counted, and cannot make others late (its time moves the watermark no
/// further than the wall clock); its window simply stays open until its time comes, which
/// the limit bounds.
pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(3600);

/// A whole pipeline, validated.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// A name for logs; also the default consumer group.
    pub name: String,
    /// The chosen backend, after `--broker` / `WEIR_BROKER` overrides.
    pub broker: String,
    /// Where the `broker` setting came from.
    pub broker_loc: Loc,
    /// `[pipeline] give_up_after`: how long an unreachable broker is retried (with a log
    /// line per attempt) before the command fails with exit 1; zero fails at once.
    pub give_up_after: Duration,
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
    /// Where window results go.
    pub sink: TopicConfig,
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

pub use crate::aggregate::AggFn;

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

/// `[serve]`: the HTTP ingest API and live view of `weir serve`.
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
    /// How long a connection may stay open without a request in progress.
    pub idle_timeout: Duration,
    /// Most open connections; past it the longest-idle connection is closed to make room.
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

/// Options that come from the command line rather than the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--set PATH=VALUE` arguments, in order.
    pub sets: Vec<String>,
    /// `--broker NAME` or `WEIR_BROKER`, and how to name it in errors.
    pub broker: Option<(String, String)>,
}

/// A parsed configuration plus the problems found so far; backends add their own before
/// [`finish`](Loaded::finish) reports everything at once.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration (meaningful only if no problems are reported).
    pub config: PipelineConfig,
    /// Problems found so far.
    pub diagnostics: Diagnostics,
    /// The file name used in messages.
    pub file: String,
}

impl Loaded {
    /// The configuration, or every problem found.
    pub fn finish(self) -> Result<PipelineConfig, ConfigErrors> {
        self.diagnostics.into_result(&self.file)?;
        Ok(self.config)
    }
}

/// Reads a pipeline file's text. `file` names it in messages.
pub fn load_str(file: &str, text: &str, overrides: &Overrides) -> Loaded {
    let mut d = Diagnostics::default();
    let lines = tree::LineIndex::new(text);
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    for e in errors {
        let loc = e.span().map(|s| lines.loc(s.start)).unwrap_or(Loc::Nowhere);
        let msg = e.message().trim().replace('\n', " ");
        d.push(&loc, "", format!("TOML syntax: {msg}"));
    }
    let mut root = tree::from_de(doc.get_ref(), &lines);
    for arg in &overrides.sets {
        let loc = Loc::Arg(format!("--set {arg}"));
        match arg.split_once('=') {
            Some((path, raw)) if !path.trim().is_empty() => {
                let node = tree::parse_override_value(raw.trim(), &format!("--set {arg}"));
                if let Err(e) = tree::set_path(&mut root, path.trim(), node) {
                    d.push(&loc, path.trim(), e);
                }
            }
            _ => d.push(&loc, "", "expected PATH=VALUE, e.g. window.grace=5s"),
        }
    }
    if let Some((name, origin)) = &overrides.broker {
        let node = Node {
            value: Value::Str(name.clone()),
            loc: Loc::Arg(origin.clone()),
        };
        let _ = tree::set_path(&mut root, "pipeline.broker", node);
    }
    let config = read_pipeline(&root, &mut d);
    Loaded {
        config,
        diagnostics: d,
        file: file.to_string(),
    }
}

/// Reads a pipeline file from disk.
pub fn load_file(path: &std::path::Path, overrides: &Overrides) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(load_str(&file, &text, overrides)),
        Err(e) => Err(ConfigErrors {
            file,
            problems: vec![Problem {
                loc: Loc::Nowhere,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        }),
    }
}

const MIB: u64 = 1 << 20;

fn read_pipeline(root: &Table, d: &mut Diagnostics) -> PipelineConfig {
    let mut r = TableReader::new("", root, Loc::Nowhere);

    let default_give_up = Duration::from_secs(300);
    let (name, broker, broker_loc, give_up_after) = match r.table(d, "pipeline") {
        Some(mut t) => {
            let name = t.str_or(d, "name", "weir");
            let give_up = t.duration_or(d, "give_up_after", default_give_up);
            let broker_node = t.node("broker");
            let broker = t.str_or(d, "broker", "memory");
            let loc = broker_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
            // The name is checked against the backends of this build by their registry.
            t.finish(d);
            (name, broker, loc, give_up)
        }
        None => (
            "weir".into(),
            "memory".into(),
            Loc::Nowhere,
            default_give_up,
        ),
    };

    let source = match r.table(d, "source") {
        Some(mut t) => {
            let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
            let group = t.str_or(d, "group", &format!("weir-{name}"));
            let batch_size = t.uint_or(d, "batch_size", 1024, 1..=1_000_000) as usize;
            let max_payload_bytes = t.uint_or(d, "max_payload_bytes", MIB, 16..=64 * MIB) as usize;
            let commit_interval = t.duration_or(d, "commit_interval", Duration::from_secs(1));
            t.finish(d);
            SourceConfig {
                topic,
                group,
                batch_size,
                max_payload_bytes,
                commit_interval,
            }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                "source",
                "missing required table [source] (with `topic`)",
            );
            SourceConfig {
                topic: String::new(),
                group: String::new(),
                batch_size: 1024,
                max_payload_bytes: MIB as usize,
                commit_interval: Duration::from_secs(1),
            }
        }
    };

    let schema = match r.table(d, "schema") {
        Some(t) => read_schema(t, d),
        None => Schema::default(),
    };

    let (time, out_of_orderness, max_future) = match r.table(d, "event_time") {
        Some(mut t) => {
            let field_node = t.node("field");
            let field = t.str(d, "field");
            let from = t.str(d, "from");
            let format_node = t.node("format");
            let format = t.str_or(d, "format", "auto");
            let ooo = t.duration_or(d, "max_out_of_orderness", Duration::ZERO);
            let max_future = match t.node("max_future") {
                Some(Node {
                    value: Value::Str(s),
                    ..
                }) if s == "off" => None,
                _ => Some(t.duration_or(d, "max_future", DEFAULT_MAX_FUTURE)),
            };
            let fmt = TimeFormat::from_name(&format).unwrap_or_else(|| {
                if let Some(n) = format_node {
                    d.push(
                        &n.loc,
                        "event_time.format",
                        format!("unknown format `{format}` (choose auto, rfc3339, epoch_millis or epoch_seconds)"),
                    );
                }
                TimeFormat::Auto
            });
            let time = match (from, field) {
                (Some("field") | None, Some(f)) => TimeSource::Field {
                    path: f.to_string(),
                    format: fmt,
                },
                (Some("broker"), None) => TimeSource::Broker,
                (Some("processing"), None) => TimeSource::Processing,
                (Some(other), _) if !matches!(other, "field" | "broker" | "processing") => {
                    let loc = t
                        .node("from")
                        .map(|n| n.loc.clone())
                        .unwrap_or(Loc::Nowhere);
                    d.push(
                        &loc,
                        "event_time.from",
                        format!(
                            "unknown time source `{other}` (choose field, broker or processing)"
                        ),
                    );
                    TimeSource::Processing
                }
                (Some(_), Some(_)) => {
                    let loc = field_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
                    d.push(
                        &loc,
                        "event_time.field",
                        "`field` only applies with from = \"field\"",
                    );
                    TimeSource::Processing
                }
                (_, None) => {
                    d.push(t.loc(), "event_time", "set `field` (the event's timestamp field) or from = \"broker\" / \"processing\"");
                    TimeSource::Processing
                }
            };
            t.finish(d);
            (time, ooo, max_future)
        }
        None => (
            TimeSource::Processing,
            Duration::ZERO,
            Some(DEFAULT_MAX_FUTURE),
        ),
    };

    let window = match r.table(d, "window") {
        Some(mut t) => {
            let kind_node = t.node("type");
            let kind = t.str_or(d, "type", "tumbling");
            let ms = |d: &mut Diagnostics,
                      t: &mut TableReader<'_>,
                      key: &'static str,
                      default: Duration| {
                let node = t.node(key);
                let v = t.duration_or(d, key, default);
                if v.as_millis() == 0 {
                    d.push(
                        &node
                            .map(|n| n.loc.clone())
                            .unwrap_or_else(|| t.loc().clone()),
                        &format!("window.{key}"),
                        "must be at least 1ms",
                    );
                }
                (v.as_millis() as i64).max(1)
            };
            let kind = match kind.as_str() {
                "tumbling" => WindowKind::Tumbling {
                    size: ms(d, &mut t, "size", Duration::from_secs(10)),
                },
                "hopping" | "sliding" => {
                    let size = ms(d, &mut t, "size", Duration::from_secs(10));
                    let advance_node = t.node("advance");
                    let advance = ms(d, &mut t, "advance", Duration::from_secs(5));
                    if advance > size {
                        d.push(
                            &advance_node
                                .map(|n| n.loc.clone())
                                .unwrap_or_else(|| t.loc().clone()),
                            "window.advance",
                            "must not be larger than `size` (events would fall between windows)",
                        );
                    } else if advance_node.is_none() {
                        d.push(
                            t.loc(),
                            "window.advance",
                            "hopping windows need `advance`, e.g. advance = \"5s\"",
                        );
                    }
                    WindowKind::Hopping { size, advance }
                }
                "session" => {
                    if t.node("gap").is_none() {
                        d.push(
                            t.loc(),
                            "window.gap",
                            "session windows need `gap`, e.g. gap = \"30s\"",
                        );
                    }
                    WindowKind::Session {
                        gap: ms(d, &mut t, "gap", Duration::from_secs(30)),
                    }
                }
                other => {
                    d.push(
                        &kind_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        "window.type",
                        format!(
                            "unknown window type `{other}` (choose tumbling, hopping or session)"
                        ),
                    );
                    WindowKind::Tumbling { size: 10_000 }
                }
            };
            // Keys of the other kinds are errors, not silently ignored.
            let allowed: &[&str] = match kind {
                WindowKind::Tumbling { .. } => &["size"],
                WindowKind::Hopping { .. } => &["size", "advance"],
                WindowKind::Session { .. } => &["gap"],
            };
            for key in ["size", "advance", "gap"] {
                if !allowed.contains(&key) {
                    if let Some(n) = t.node(key) {
                        d.push(
                            &n.loc,
                            &format!("window.{key}"),
                            format!(
                                "does not apply to {} windows",
                                match kind {
                                    WindowKind::Tumbling { .. } => "tumbling",
                                    WindowKind::Hopping { .. } => "hopping",
                                    WindowKind::Session { .. } => "session",
                                }
                            ),
                        );
                    }
                }
            }
            let grace = t.duration_or(d, "grace", Duration::ZERO);
            let idle_timeout = t.duration_or(d, "idle_timeout", Duration::from_secs(5));
            if idle_timeout.is_zero() {
                d.push(t.loc(), "window.idle_timeout", "must be more than 0");
            }
            let emit_node = t.node("emit");
            let emit = match t.str_or(d, "emit", "final").as_str() {
                "final" => EmitMode::Final,
                "update" => EmitMode::Update,
                other => {
                    d.push(
                        &emit_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        "window.emit",
                        format!("unknown emit mode `{other}` (choose final or update)"),
                    );
                    EmitMode::Final
                }
            };
            t.finish(d);
            WindowConfig {
                kind,
                grace,
                idle_timeout: idle_timeout.max(Duration::from_millis(1)),
                emit,
            }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                "window",
                "missing required table [window] (with `size`)",
            );
            WindowConfig {
                kind: WindowKind::Tumbling { size: 10_000 },
                grace: Duration::ZERO,
                idle_timeout: Duration::from_secs(5),
                emit: EmitMode::Final,
            }
        }
    };

    // Where `group_by` and `compute` are, for the check against the schema below.
    let mut agg_locs = (Loc::Nowhere, Loc::Nowhere);
    let aggregate = match r.table(d, "aggregate") {
        Some(mut t) => {
            let gb_loc = t.node("group_by").map(|n| n.loc.clone());
            agg_locs.0 = gb_loc.clone().unwrap_or_else(|| t.loc().clone());
            let group_by = t.str_list(d, "group_by").unwrap_or_default();
            if group_by.is_empty() {
                d.push(
                    &gb_loc.unwrap_or_else(|| t.loc().clone()),
                    "aggregate.group_by",
                    "name at least one key field, e.g. group_by = \"user_id\"",
                );
            }
            for g in &group_by {
                if let Some(f) = schema.fields.iter().find(|f| &f.path == g) {
                    if matches!(f.ty, FieldType::Object | FieldType::Array) {
                        d.push(
                            t.loc(),
                            "aggregate.group_by",
                            format!("`{g}` is an {:?} in the schema; keys must be scalars", f.ty)
                                .to_lowercase(),
                        );
                    }
                }
            }
            let compute_node = t.node("compute");
            let names = t
                .str_list(d, "compute")
                .unwrap_or_else(|| vec!["count".into()]);
            let mut compute: Vec<AggFn> = Vec::new();
            let loc = compute_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
            agg_locs.1 = loc.clone();
            for n in &names {
                match AggFn::parse(n) {
                    Ok(f) if compute.contains(&f) => {
                        d.push(&loc, "aggregate.compute", format!("`{n}` is listed twice"))
                    }
                    Ok(f) => compute.push(f),
                    Err(e) => d.push(&loc, "aggregate.compute", e),
                }
            }
            if names.is_empty() {
                d.push(
                    &loc,
                    "aggregate.compute",
                    "name at least one aggregate, e.g. [\"count\"]",
                );
            }
            t.finish(d);
            AggregateConfig { group_by, compute }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                "aggregate",
                "missing required table [aggregate] (with `group_by`)",
            );
            AggregateConfig {
                group_by: Vec::new(),
                compute: vec![AggFn::Count],
            }
        }
    };

    let mut topic_table = |r: &mut TableReader<'_>, key: &'static str| match r.table(d, key) {
        Some(mut t) => {
            let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
            t.finish(d);
            TopicConfig { topic }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                key,
                format!("missing required table [{key}] (with `topic`)"),
            );
            TopicConfig {
                topic: String::new(),
            }
        }
    };
    let sink = topic_table(&mut r, "sink");
    let dead_letter = topic_table(&mut r, "dead_letter");
    let late = match r.table(d, "late") {
        Some(mut t) => {
            let topic = t.str(d, "topic").map(str::to_string);
            let drop_node = t.node("drop");
            let drop = t.bool_or(d, "drop", false);
            let policy = match (topic, drop) {
                (Some(_), true) => {
                    d.push(
                        &drop_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        "late.drop",
                        "choose either `topic` or `drop = true`",
                    );
                    LatePolicy::Drop
                }
                (Some(topic), false) => LatePolicy::Output(topic),
                (None, true) => LatePolicy::Drop,
                (None, false) => {
                    d.push(
                        t.loc(),
                        "late",
                        "set `topic` (a late-events topic) or `drop = true`",
                    );
                    LatePolicy::DeadLetter
                }
            };
            t.finish(d);
            policy
        }
        None => LatePolicy::DeadLetter,
    };

    let retry = r.table(d, "retry").map(|mut t| {
        let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
        let initial = t.duration_or(d, "initial", Duration::from_secs(1));
        let max = t.duration_or(d, "max", Duration::from_secs(60));
        let multiplier = match t.node("multiplier") {
            None => 2.0,
            Some(n) => match n.value {
                Value::Float(f) if f >= 1.0 && f.is_finite() => f,
                Value::Int(i) if i >= 1 => i as f64,
                Value::Float(_) | Value::Int(_) => {
                    d.push(&n.loc, "retry.multiplier", "must be 1 or more");
                    2.0
                }
                _ => {
                    d.push(
                        &n.loc,
                        "retry.multiplier",
                        format!("expected a number, found {}", n.value.type_name()),
                    );
                    2.0
                }
            },
        };
        let max_attempts = t.uint_or(d, "max_attempts", 5, 1..=1_000_000) as u32;
        if initial.is_zero() {
            d.push(t.loc(), "retry.initial", "must be more than 0");
        }
        if max < initial {
            d.push(t.loc(), "retry.max", "must be at least `initial`");
        }
        t.finish(d);
        RetryConfig {
            topic,
            initial,
            multiplier,
            max,
            max_attempts,
        }
    });

    let enrich = r.table(d, "enrich").map(|mut t| {
        let table = t.req_str(d, "table").unwrap_or_default().to_string();
        let key = t.req_str(d, "key").unwrap_or_default().to_string();
        let table_key = t.str_or(d, "table_key", &key);
        let into_loc = t
            .node("into")
            .map_or_else(|| t.loc().clone(), |n| n.loc.clone());
        let into = t.str_or(d, "into", "profile");
        if into.is_empty() || into.contains('.') {
            d.push(
                &into_loc,
                "enrich.into",
                "must be a top-level field name (no dots)",
            );
        }
        t.finish(d);
        EnrichConfig {
            table,
            key,
            table_key,
            into,
        }
    });

    check_fields_against_schema(&schema, enrich.as_ref(), &aggregate, &agg_locs, d);

    let mut errors = Vec::new();
    if let Some(mut t) = r.table(d, "errors") {
        for stage in [crate::errors::STAGE_VALIDATE, crate::errors::STAGE_ENRICH] {
            let Some(n) = t.node(stage) else { continue };
            let path = format!("errors.{stage}");
            let Value::Str(s) = &n.value else {
                d.push(
                    &n.loc,
                    &path,
                    format!("expected a string, found {}", n.value.type_name()),
                );
                continue;
            };
            match ErrorAction::parse(s) {
                None => d.push(
                    &n.loc,
                    &path,
                    format!("unknown strategy `{s}` (choose dead_letter, retry, skip or fail)"),
                ),
                Some(ErrorAction::Retry) if retry.is_none() => d.push(
                    &n.loc,
                    &path,
                    "`retry` needs a [retry] section with the retry topic",
                ),
                Some(_) if stage == crate::errors::STAGE_ENRICH && enrich.is_none() => {
                    d.push(&n.loc, &path, "there is no [enrich] stage")
                }
                Some(a) => errors.push((stage.to_string(), a)),
            }
        }
        t.finish(d);
    }
    // Enrichment misses are what the retry topic is for: with both, they retry unless
    // `[errors] enrich` says otherwise.
    if enrich.is_some()
        && retry.is_some()
        && !errors.iter().any(|(s, _)| s == crate::errors::STAGE_ENRICH)
    {
        errors.push((crate::errors::STAGE_ENRICH.to_string(), ErrorAction::Retry));
    }

    let mut brokers = Vec::new();
    if let Some(mut t) = r.table(d, "brokers") {
        for (k, loc, node) in &t.table_entries() {
            // Section names are checked against the backends of this build by their
            // registry.
            if !matches!(node.value, Value::Table(_)) {
                d.push(&node.loc, &format!("brokers.{k}"), "expected a table");
            } else {
                brokers.push((k.clone(), loc.clone(), node.clone()));
            }
        }
    }

    let demo = match r.table(d, "demo") {
        Some(mut t) => {
            let demo = DemoConfig {
                events: t.uint_or(d, "events", 20, 1..=1_000_000) as usize,
                interval: t.duration_or(d, "interval", Duration::from_secs(3)),
                users: t.uint_or(d, "users", 10, 1..=10_000_000) as usize,
                invalid_every: t.uint_or(d, "invalid_every", 0, 0..=u64::MAX) as usize,
            };
            t.finish(d);
            demo
        }
        None => DemoConfig {
            events: 20,
            interval: Duration::from_secs(3),
            users: 10,
            invalid_every: 0,
        },
    };
    let serve = read_serve(&mut r, d, source.max_payload_bytes);
    let observability = read_observability(&mut r, d);
    r.finish(d);

    PipelineConfig {
        name,
        broker,
        broker_loc,
        give_up_after,
        source,
        schema,
        time,
        out_of_orderness,
        max_future,
        window,
        aggregate,
        sink,
        dead_letter,
        late,
        brokers,
        demo,
        serve,
        observability,
        retry,
        enrich,
        errors,
    }
}

/// An `IP:PORT` setting.
fn socket_addr(
    t: &mut TableReader<'_>,
    d: &mut Diagnostics,
    key: &'static str,
    path: &str,
) -> Option<std::net::SocketAddr> {
    let node = t.node(key);
    match t.str(d, key).map(str::parse) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            d.push(
                &node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                path,
                "expected IP:PORT, e.g. \"127.0.0.1:9090\"",
            );
            None
        }
    }
}

/// What the schema says about field `path`.
enum Known<'a> {
    /// Declared, with this spec.
    Field(&'a FieldSpec),
    /// Inside a declared object (or `any`) field, or the enrichment's field: its type is
    /// not known before run time.
    Inside,
    /// Neither.
    Unknown,
}

fn known<'a>(schema: &'a Schema, enrich: Option<&EnrichConfig>, path: &str) -> Known<'a> {
    if let Some(f) = schema.fields.iter().find(|f| f.path == path) {
        return Known::Field(f);
    }
    let under = |parent: &str| {
        path.strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    if enrich.is_some_and(|e| under(&e.into))
        || schema
            .fields
            .iter()
            .any(|f| matches!(f.ty, FieldType::Object | FieldType::Any) && under(&f.path))
    {
        return Known::Inside;
    }
    Known::Unknown
}

/// `group_by` and every aggregate name fields the schema declares (or fields inside a
/// declared object, or the enrichment's), and numeric aggregates name numeric fields: a
/// pipeline that would dead-letter every event is a configuration error. A pipeline without
/// a `[schema]` checks nothing, so there is nothing to check against.
fn check_fields_against_schema(
    schema: &Schema,
    enrich: Option<&EnrichConfig>,
    aggregate: &AggregateConfig,
    (gb_loc, compute_loc): &(Loc, Loc),
    d: &mut Diagnostics,
) {
    if schema.fields.is_empty() {
        return;
    }
    let declared = || {
        schema
            .fields
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for g in &aggregate.group_by {
        if let Known::Unknown = known(schema, enrich, g) {
            d.push(
                gb_loc,
                "aggregate.group_by",
                format!(
                    "`{g}` is not a field of the schema (declared: {}); every event would be a dead letter",
                    declared()
                ),
            );
        }
    }
    for f in &aggregate.compute {
        let Some(field) = f.field() else { continue };
        let name = f.output_name();
        match known(schema, enrich, field) {
            Known::Unknown => d.push(
                compute_loc,
                "aggregate.compute",
                format!(
                    "`{field}` (in {name}) is not a field of the schema (declared: {})",
                    declared()
                ),
            ),
            Known::Field(spec)
                if f.is_numeric()
                    && !matches!(
                        spec.ty,
                        FieldType::Integer | FieldType::Number | FieldType::Any
                    ) =>
            {
                d.push(
                    compute_loc,
                    "aggregate.compute",
                    format!(
                        "{name} needs a number, but `{field}` is a {} in the schema; every event would be a dead letter",
                        format!("{:?}", spec.ty).to_lowercase()
                    ),
                )
            }
            Known::Field(spec)
                if matches!(spec.ty, FieldType::Object | FieldType::Array) =>
            {
                d.push(
                    compute_loc,
                    "aggregate.compute",
                    format!(
                        "{name} needs a string, number or boolean, but `{field}` is an {} in the schema",
                        format!("{:?}", spec.ty).to_lowercase()
                    ),
                )
            }
            _ => {}
        }
    }
}

fn read_observability(r: &mut TableReader<'_>, d: &mut Diagnostics) -> ObservabilityConfig {
    let stuck_default = Duration::from_secs(30);
    let Some(mut t) = r.table(d, "observability") else {
        return ObservabilityConfig {
            listen: None,
            stuck_after: stuck_default,
        };
    };
    let c = ObservabilityConfig {
        listen: socket_addr(&mut t, d, "listen", "observability.listen"),
        stuck_after: t.duration_or(d, "stuck_after", stuck_default),
    };
    t.finish(d);
    c
}

fn read_serve(r: &mut TableReader<'_>, d: &mut Diagnostics, max_payload: usize) -> ServeConfig {
    let def = ServeConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8000)),
        max_body_bytes: max_payload,
        max_batch_bytes: 4 * MIB as usize,
        queue: 10_000,
        publish_timeout: Duration::from_secs(5),
        token_env: "WEIR_SERVE_TOKEN".into(),
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 512,
    };
    let Some(mut t) = r.table(d, "serve") else {
        return def;
    };
    let listen = socket_addr(&mut t, d, "listen", "serve.listen").unwrap_or(def.listen);
    let u = |t: &mut TableReader<'_>, d: &mut Diagnostics, key, default: usize, max: u64| {
        t.uint_or(d, key, default as u64, 0..=max) as usize
    };
    let c = ServeConfig {
        listen,
        max_body_bytes: u(&mut t, d, "max_body_bytes", def.max_body_bytes, 64 * MIB),
        max_batch_bytes: u(
            &mut t,
            d,
            "max_batch_bytes",
            def.max_batch_bytes,
            1024 * MIB,
        ),
        queue: u(&mut t, d, "queue", def.queue, 10_000_000),
        publish_timeout: t.duration_or(d, "publish_timeout", def.publish_timeout),
        token_env: t.str_or(d, "token_env", &def.token_env),
        header_timeout: t.duration_or(d, "header_timeout", def.header_timeout),
        idle_timeout: t.duration_or(d, "idle_timeout", def.idle_timeout),
        max_connections: u(&mut t, d, "max_connections", def.max_connections, 1_000_000).max(1),
    };
    t.finish(d);
    c
}

impl<'t> TableReader<'t> {
    fn table_entries(&mut self) -> Vec<(String, Loc, Node)> {
        self.entries().to_vec()
    }
}

fn read_schema(mut t: TableReader<'_>, d: &mut Diagnostics) -> Schema {
    let preset_node = t.node("preset");
    let mut schema = match t.str(d, "preset") {
        Some("seed_event") => Schema::seed_event(),
        Some(other) => {
            d.push(
                &preset_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                "schema.preset",
                format!("unknown preset `{other}` (available: seed_event)"),
            );
            Schema::default()
        }
        None => Schema::default(),
    };
    if let Some(fields) = t.table(d, "fields") {
        let mut fields = fields;
        for (name, _loc, node) in fields.entries() {
            let key = format!("schema.fields.{name}");
            let Value::Table(ft) = &node.value else {
                d.push(
                    &node.loc,
                    &key,
                    "expected a table such as { type = \"string\" }",
                );
                continue;
            };
            let mut fr = TableReader::new(&key, ft, node.loc.clone());
            let ty_node = fr.node("type");
            let ty = match fr.req_str(d, "type") {
                Some(s) => FieldType::from_name(s).unwrap_or_else(|| {
                    d.push(
                        &ty_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        &format!("{key}.type"),
                        format!("unknown type `{s}` (choose {})", FieldType::NAMES),
                    );
                    FieldType::Any
                }),
                None => FieldType::Any,
            };
            let required = fr.bool_or(d, "required", true);
            let allowed_node = fr.node("allowed");
            let allowed = fr.str_list(d, "allowed");
            if allowed.is_some() && ty != FieldType::String {
                d.push(
                    &allowed_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                    &format!("{key}.allowed"),
                    "`allowed` applies to string fields only",
                );
            }
            if name.is_empty() || name.split('.').any(|p| p.is_empty()) {
                d.push(
                    &node.loc,
                    &key,
                    "field paths are dotted names such as metadata.page",
                );
            }
            fr.finish(d);
            let spec = FieldSpec {
                path: name.clone(),
                ty,
                required,
                allowed,
            };
            match schema.fields.iter_mut().find(|f| f.path == *name) {
                Some(existing) => *existing = spec,
                None => schema.fields.push(spec),
            }
        }
    }
    t.finish(d);
    schema
}
