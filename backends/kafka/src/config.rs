//! `[brokers.kafka]` settings.
//!
//! ```toml
//! [brokers.kafka]
//! bootstrap_servers = "127.0.0.1:19092"
//! create_topics = true          # create missing topics at start (source, sink, dead letters)
//! partitions = 4                # ... with this many partitions
//! replication_factor = 1        # ... and this replication factor
//! session_timeout = "6s"        # consumer-group session timeout (librdkafka's 45 s default
//!                               # makes every group join wait ~23 s)
//! checkpoint_topic = "weir-checkpoints"  # optional: for brokers that drop commit metadata
//!
//! [brokers.kafka.producer]      # any librdkafka producer property, passed through
//! "linger.ms" = "5"
//!
//! [brokers.kafka.consumer]      # any librdkafka consumer property, passed through
//! "fetch.min.bytes" = "1"
//! ```
//!
//! Pass-through keys may be quoted (`"linger.ms" = 5`) or dotted (`linger.ms = 5`, which
//! TOML and `--set brokers.kafka.producer.linger.ms=5` turn into nested tables); both
//! name the librdkafka property `linger.ms`. Values may be strings, integers, floats or
//! booleans. Each property is checked against librdkafka at load time, so a misspelt
//! property or a bad value is reported at its `file:line:col`.

use std::time::Duration;

use rdkafka::ClientConfig;
use weir_engine::config::{Diagnostics, Loc, Node, TableReader, Value};

/// The default bootstrap address: the test bed's Tansu broker on loopback.
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:19092";

/// Producer defaults: durable (all in-sync replicas, idempotent), batched (5 ms linger),
/// compressed with lz4 (built into librdkafka), and a bounded delivery time so a broker
/// outage surfaces as a retryable error instead of a 5-minute silent wait.
pub const PRODUCER_DEFAULTS: [(&str, &str); 5] = [
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("message.timeout.ms", "30000"),
];

/// Consumer defaults: Weir commits itself after acknowledgement (never librdkafka's
/// auto-commit), and a new group reads from the beginning. A partition whose local queue
/// reached `queued.min.messages` is fetched again after 10 ms instead of librdkafka's 1 s:
/// a consumer that processes more slowly than the broker delivers (any pipeline on a
/// backlog) otherwise drains the queue and then stalls for up to a second, each time
/// (measured on the test bed: 220 k events/s with 1 s, 1.3 M/s with 10 ms).
pub const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("enable.auto.commit", "false"),
    ("auto.offset.reset", "earliest"),
    ("enable.partition.eof", "false"),
    ("fetch.queue.backoff.ms", "10"),
];

/// Properties Weir sets itself, or that would break its delivery model; setting them in a
/// pass-through table is a mistake.
const OWNED: [(&str, &str); 4] = [
    (
        "transactional.id",
        "Weir chooses the transactional id itself, one per instance, when `[pipeline] guarantee = \"exactly_once\"` — set that instead and remove the key",
    ),
    ("bootstrap.servers", "use `bootstrap_servers` in [brokers.kafka]"),
    ("group.id", "the consumer group is `source.group`"),
    (
        "enable.auto.commit",
        "Weir commits offsets itself once outputs are acknowledged; auto-commit would break at-least-once",
    ),
];

/// Settings of the Kafka backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Create the pipeline's topics at start when they are missing.
    pub create_topics: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// Consumer-group session timeout.
    pub session_timeout: Duration,
    /// Also keep checkpoints in this one-partition topic, for brokers that do not return
    /// commit metadata (see `checkpoints.rs`). `None`: commit metadata only.
    pub checkpoint_topic: Option<String>,
    /// librdkafka producer properties: defaults, then the `[brokers.kafka.producer]` table.
    pub producer: Vec<(String, String)>,
    /// librdkafka consumer properties: defaults, then the `[brokers.kafka.consumer]` table.
    pub consumer: Vec<(String, String)>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: DEFAULT_BOOTSTRAP.to_string(),
            create_topics: true,
            partitions: 4,
            replication_factor: 1,
            session_timeout: Duration::from_secs(6),
            checkpoint_topic: None,
            producer: PRODUCER_DEFAULTS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            consumer: CONSUMER_DEFAULTS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

impl KafkaConfig {
    /// Reads the keys of a `[brokers.kafka]` section, reporting problems to `d` (the
    /// engine reports unknown keys afterwards).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self {
        let mut c = KafkaConfig::default();
        if let Some(node) = r.node("bootstrap_servers") {
            match &node.value {
                Value::Str(s) if s.split(',').all(|h| valid_host_port(h.trim())) => {
                    c.bootstrap_servers = s.clone()
                }
                Value::Str(s) => d.push(
                    &node.loc,
                    &r.key_path("bootstrap_servers"),
                    format!("`{s}` is not a comma-separated list of host:port"),
                ),
                other => d.push(
                    &node.loc,
                    &r.key_path("bootstrap_servers"),
                    format!(
                        "expected a string such as \"127.0.0.1:9092\", found {}",
                        other.type_name()
                    ),
                ),
            }
        }
        c.create_topics = r.bool_or(d, "create_topics", true);
        c.partitions = r.uint_or(d, "partitions", 4, 1..=10_000) as i32;
        c.replication_factor = r.uint_or(d, "replication_factor", 1, 1..=32) as i32;
        c.session_timeout = r.duration_or(d, "session_timeout", Duration::from_secs(6));
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&c.session_timeout) {
            let at = r
                .node("session_timeout")
                .map(|n| n.loc.clone())
                .unwrap_or(Loc::Nowhere);
            d.push(
                &at,
                &r.key_path("session_timeout"),
                "must be between 1s and 1h",
            );
        }
        c.checkpoint_topic = r.str(d, "checkpoint_topic").map(str::to_string);
        if let Some(t) = &c.checkpoint_topic {
            if t.is_empty()
                || t.len() > 249
                || !t
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
            {
                let at = r
                    .node("checkpoint_topic")
                    .map(|n| n.loc.clone())
                    .unwrap_or(Loc::Nowhere);
                d.push(
                    &at,
                    &r.key_path("checkpoint_topic"),
                    format!("`{t}` is not a valid Kafka topic name"),
                );
            }
        }
        if let Some(mut p) = r.table(d, "producer") {
            merge(&mut c.producer, passthrough(&mut p, d));
        }
        if let Some(mut p) = r.table(d, "consumer") {
            merge(&mut c.consumer, passthrough(&mut p, d));
        }
        c
    }

    /// The largest dead letter or late record the sinks send whole: the producer's
    /// `message.max.bytes` (librdkafka's default 1,000,000) less 1 KiB for record framing.
    /// Larger ones are cut to fit.
    pub fn max_record_bytes(&self) -> usize {
        let max = self
            .producer
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(1_000_000);
        max.saturating_sub(1024).max(1024)
    }

    /// The librdkafka configuration of a producer.
    pub fn producer_config(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.producer {
            cc.set(k, v);
        }
        cc
    }

    /// The consumer property `name`, if set.
    fn consumer_prop(&self, name: &str) -> Option<&str> {
        self.consumer
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
    }

    /// Whether the group uses Kafka 4's consumer protocol (KIP-848,
    /// `"group.protocol" = "consumer"`): the broker assigns partitions and owns the session
    /// timeout.
    pub fn consumer_protocol(&self) -> bool {
        self.consumer_prop("group.protocol") == Some("consumer")
    }

    /// Whether rebalances are incremental: each assignment adds partitions and each
    /// revocation takes some away, instead of all being revoked and assigned anew (the
    /// consumer protocol, or a cooperative assignor of the classic one).
    pub fn incremental_rebalances(&self) -> bool {
        self.consumer_protocol()
            || self
                .consumer_prop("partition.assignment.strategy")
                .is_some_and(|v| v.contains("cooperative"))
    }

    /// The librdkafka configuration of a consumer in `group`.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", group);
        if !self.consumer_protocol() {
            // Under the consumer protocol the session timeout is the broker's
            // (`group.consumer.session.timeout.ms`); librdkafka refuses it here.
            cc.set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            );
        }
        for (k, v) in &self.consumer {
            cc.set(k, v);
        }
        cc
    }

    /// The librdkafka configuration of an admin client.
    pub fn admin_config(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.bootstrap_servers);
        cc
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

fn merge(into: &mut Vec<(String, String)>, from: Vec<(String, String)>) {
    for (k, v) in from {
        match into.iter_mut().find(|(x, _)| *x == k) {
            Some(slot) => slot.1 = v,
            None => into.push((k, v)),
        }
    }
}

/// Reads a pass-through table of librdkafka properties, flattening nested tables into
/// dotted names and checking every property with librdkafka itself.
fn passthrough(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let base = r.key_path("");
    let base = base.trim_end_matches('.').to_string();
    flatten(&base, "", r.entries(), d, &mut out);
    out.into_iter()
        .filter_map(|(name, value, loc)| {
            let key_path = format!("{base}.\"{name}\"");
            if let Some((_, why)) = OWNED.iter().find(|(k, _)| *k == name) {
                // Turning auto-commit *off* is harmless; anything else Weir owns is not.
                if !(name == "enable.auto.commit" && value == "false") {
                    d.push(&loc, &key_path, format!("cannot be set here: {why}"));
                    return None;
                }
            }
            let mut probe = ClientConfig::new();
            probe.set(&name, &value);
            if let Err(e) = probe.create_native_config() {
                d.push(
                    &loc,
                    &key_path,
                    format!("librdkafka rejects `{name} = {value}`: {}", describe(&e)),
                );
                return None;
            }
            Some((name, value))
        })
        .collect()
}

fn describe(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        other => other.to_string(),
    }
}

fn flatten(
    base: &str,
    prefix: &str,
    entries: &[(String, Loc, Node)],
    d: &mut Diagnostics,
    out: &mut Vec<(String, String, Loc)>,
) {
    for (k, loc, node) in entries {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let value = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Table(t) => {
                flatten(base, &name, &t.entries, d, out);
                continue;
            }
            other => {
                d.push(
                    loc,
                    &format!("{base}.\"{name}\""),
                    format!(
                        "expected a librdkafka property value (string, number or boolean), found {}",
                        other.type_name()
                    ),
                );
                continue;
            }
        };
        out.push((name, value, loc.clone()));
    }
}
