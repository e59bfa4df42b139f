//! Reading a parsed `pipeline.toml` into the model, one section after another: the
//! `[pipeline]`, `[source]`, `[sink]`, `[dead_letter]`, `[late]`, `[brokers]` and `[demo]`
//! sections here, the others in the files named after them.

use std::time::Duration;

use super::model::*;
use super::reader::{Diagnostics, TableReader};
use super::tree::{Loc, Node, Table, Value};

/// Reads every section of `root`, in the order their problems are reported.
pub(super) fn read_pipeline(root: &Table, d: &mut Diagnostics) -> PipelineConfig {
    let mut r = TableReader::new("", root, Loc::Nowhere);

    let Head {
        name,
        broker,
        broker_loc,
        give_up_after,
        guarantee,
        guarantee_loc,
    } = pipeline(&mut r, d);
    let source = source(&mut r, d, &name);
    let schema = super::schema::schema(&mut r, d);
    let (time, out_of_orderness, max_future) = super::windowing::event_time(&mut r, d);
    let window = super::windowing::window(&mut r, d);
    // Where `group_by` and `compute` are, for the check against the schema below.
    let (aggregate, agg_locs) = super::schema::aggregate(&mut r, d, &schema);
    let (sink, sink_store) = sink(&mut r, d);
    let dead_letter = topic(&mut r, d, "dead_letter");
    let late = late(&mut r, d);
    let retry = super::stages::retry(&mut r, d);
    if guarantee == Guarantee::ExactlyOnce && retry.is_some() {
        d.push(
            &guarantee_loc,
            "pipeline.guarantee",
            "`exactly_once` cannot be combined with a [retry] topic yet: the retry topic is read by a consumer group of its own, and a rebalance of either group aborts the transaction that both write in, which would have to rewind the other too",
        );
    }
    let enrich = super::stages::enrich(&mut r, d);
    super::schema::check_fields_against_schema(&schema, enrich.as_ref(), &aggregate, &agg_locs, d);
    let errors = super::stages::errors(&mut r, d, retry.as_ref(), enrich.as_ref());
    let brokers = brokers(&mut r, d);
    let demo = demo(&mut r, d);
    let serve = super::serve::serve(&mut r, d, source.max_payload_bytes);
    let observability = super::serve::observability(&mut r, d);
    r.finish(d);

    PipelineConfig {
        name,
        broker,
        broker_loc,
        give_up_after,
        guarantee,
        guarantee_loc,
        source,
        schema,
        time,
        out_of_orderness,
        max_future,
        window,
        aggregate,
        sink,
        sink_store,
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

/// What `[pipeline]` says.
struct Head {
    name: String,
    broker: String,
    broker_loc: Loc,
    give_up_after: Duration,
    guarantee: Guarantee,
    guarantee_loc: Loc,
}

/// `[pipeline]`: the name, the broker, how long an unreachable one is retried and the
/// delivery guarantee.
fn pipeline(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Head {
    let default_give_up = Duration::from_secs(300);
    match r.table(d, "pipeline") {
        Some(mut t) => {
            let name = t.str_or(d, "name", "weir");
            let give_up_after = t.duration_or(d, "give_up_after", default_give_up);
            let broker_node = t.node("broker");
            // Absent: empty, and the binary's registry picks its default backend.
            let broker = t.str_or(d, "broker", "");
            let broker_loc = broker_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
            // The name is checked against the backends of this build by their registry.
            let guarantee_loc = t
                .node("guarantee")
                .map(|n| n.loc.clone())
                .unwrap_or(Loc::Nowhere);
            let guarantee = match t.str(d, "guarantee") {
                None | Some("at_least_once") => Guarantee::AtLeastOnce,
                Some("exactly_once") => Guarantee::ExactlyOnce,
                Some(other) => {
                    d.push(
                        &guarantee_loc,
                        "pipeline.guarantee",
                        format!(
                            "unknown guarantee `{other}` (choose at_least_once or exactly_once)"
                        ),
                    );
                    Guarantee::AtLeastOnce
                }
            };
            t.finish(d);
            Head {
                name,
                broker,
                broker_loc,
                give_up_after,
                guarantee,
                guarantee_loc,
            }
        }
        None => Head {
            name: "weir".into(),
            broker: String::new(),
            broker_loc: Loc::Nowhere,
            give_up_after: default_give_up,
            guarantee: Guarantee::AtLeastOnce,
            guarantee_loc: Loc::Nowhere,
        },
    }
}

/// `[source]`: the input topic; the group defaults to `weir-NAME`.
fn source(r: &mut TableReader<'_>, d: &mut Diagnostics, name: &str) -> SourceConfig {
    match r.table(d, "source") {
        Some(mut t) => {
            let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
            let group = t.str_or(d, "group", &format!("weir-{name}"));
            let batch_size = t.uint_or(d, "batch_size", 1024, 1..=1_000_000) as usize;
            let max_payload_bytes = t.uint_or(d, "max_payload_bytes", MIB, 16..=64 * MIB) as usize;
            let commit_interval = t.duration_or(d, "commit_interval", Duration::from_secs(1));
            let repartition_loc = t
                .node("repartition")
                .map_or(Loc::Nowhere, |n| n.loc.clone());
            let repartition = t.bool_or(d, "repartition", false);
            let repartition_topic =
                t.str_or(d, "repartition_topic", &format!("{group}-repartition"));
            t.finish(d);
            SourceConfig {
                topic,
                group,
                batch_size,
                max_payload_bytes,
                commit_interval,
                repartition: repartition.then_some(repartition_topic),
                repartition_loc,
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
                repartition: None,
                repartition_loc: Loc::Nowhere,
            }
        }
    }
}

/// `[sink]`: a destination topic, or with `type` other than `topic`, a store whose keys its
/// own reader checks (the binary's registry of stores).
fn sink(r: &mut TableReader<'_>, d: &mut Diagnostics) -> (TopicConfig, Option<SinkStore>) {
    let Some(node) = r.node("sink") else {
        return (topic(r, d, "sink"), None);
    };
    let kind = match &node.value {
        Value::Table(t) => t.get("type"),
        _ => None,
    };
    match kind {
        Some(Node {
            value: Value::Str(kind),
            loc,
        }) if kind != "topic" => (
            TopicConfig {
                topic: String::new(),
            },
            Some(SinkStore {
                kind: kind.clone(),
                kind_loc: loc.clone(),
                table: node.clone(),
            }),
        ),
        _ => (topic(r, d, "sink"), None),
    }
}

/// `[sink]` (a topic) and `[dead_letter]`: a destination topic.
fn topic(r: &mut TableReader<'_>, d: &mut Diagnostics, key: &'static str) -> TopicConfig {
    match r.table(d, key) {
        Some(mut t) => {
            let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
            if key == "sink" {
                // `type = "topic"`, the default.
                t.str(d, "type");
            }
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
    }
}

/// `[late]`: where events whose window has closed go.
fn late(r: &mut TableReader<'_>, d: &mut Diagnostics) -> LatePolicy {
    match r.table(d, "late") {
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
    }
}

/// `[brokers.NAME]`: the raw sections, each read by its backend.
fn brokers(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Vec<(String, Loc, Node)> {
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
    brokers
}

/// `[demo]`: the generator of `weir run` on the memory backend.
fn demo(r: &mut TableReader<'_>, d: &mut Diagnostics) -> DemoConfig {
    match r.table(d, "demo") {
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
    }
}

impl<'t> TableReader<'t> {
    fn table_entries(&mut self) -> Vec<(String, Loc, Node)> {
        self.entries().to_vec()
    }
}
