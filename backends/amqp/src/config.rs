//! `[brokers.amqp]` settings.

use weir_engine::config::{Diagnostics, TableReader, Value};

/// The URL used when `[brokers.amqp]` has no `url`: RabbitMQ's defaults on loopback.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The exchange type topics are published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    /// `topic`: routing key = topic name; users may bind extra queues with patterns.
    Topic,
    /// `direct`: routing key = topic name, exact match.
    Direct,
}

/// The kind of queue a topic's records are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// A classic (mirrored-or-not) durable queue: destructive consumption, order kept on
    /// requeue. The default.
    Classic,
    /// A quorum queue (Raft-replicated).
    Quorum,
    /// A RabbitMQ stream: an append-only log read with `x-stream-offset`; the position
    /// committed by Weir is the stream offset, so a restart resumes (and replays) from it.
    Stream,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// Settings of the RabbitMQ backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost `/` is `%2f`).
    pub url: String,
    /// The exchange every topic is published to (routing key = topic).
    pub exchange: String,
    /// Its type.
    pub exchange_type: ExchangeType,
    /// Whether the exchange and queues survive a broker restart (and messages are
    /// published persistent). Quorum queues and streams are always durable.
    pub durable: bool,
    /// Unacknowledged deliveries the broker may hand the consumer (`basic.qos`). Open
    /// windows hold their deliveries unacked, so size it above the events per window plus
    /// grace (see the README).
    pub prefetch: u16,
    /// Classic, quorum or stream queues.
    pub queue_type: QueueType,
    /// Where a stream consumer starts when no position was committed yet: `first`, `last`
    /// or `next`.
    pub stream_offset: String,
    /// Declare queues with `x-single-active-consumer`: one consumer at a time receives,
    /// the others stand by. Keeps redelivery order, which the checkpoint relies on.
    pub single_active_consumer: bool,
    /// Declare queues with `x-expires`: RabbitMQ deletes a queue (and its records) unused
    /// for this long (streams excepted: RabbitMQ refuses it for them). For throw-away
    /// topics (tests, demos); `None` = queues stay.
    pub queue_expires: Option<std::time::Duration>,
    /// The broker's largest message (RabbitMQ's `max_message_size`, 128 MiB by default):
    /// dead letters and late records larger than this are cut to fit.
    pub max_message_bytes: usize,
    /// Queues per topic: 1 = queue `T`; N > 1 = queues `T.0`..`T.{N-1}`, records routed by
    /// the FNV-1a hash of their key (see [`crate::partition_of`]) and split between the
    /// instances of a pipeline (see the README).
    pub partitions: u32,
    /// The AMQP heartbeat asked for on every connection (a `heartbeat=` in `url` wins).
    /// RabbitMQ closes a connection it hears nothing from for about twice this, so a
    /// frozen instance (SIGSTOP, a stalled VM) loses its queues to the others that fast
    /// instead of after RabbitMQ's default 60 s.
    pub heartbeat: std::time::Duration,
}

/// The default [`AmqpConfig::heartbeat`].
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// The most queues a topic may be split into (`[brokers.amqp] partitions`).
pub const MAX_PARTITIONS: u32 = 1024;

/// RabbitMQ's default `max_message_size` (3.8 and later): 128 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: DEFAULT_URL.to_string(),
            exchange: "weir".to_string(),
            exchange_type: ExchangeType::Topic,
            durable: true,
            prefetch: 10_000,
            queue_type: QueueType::Classic,
            stream_offset: "first".to_string(),
            single_active_consumer: true,
            queue_expires: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            partitions: 1,
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}

impl AmqpConfig {
    /// Reads the keys of a `[brokers.amqp]` section, reporting problems to `d` (the
    /// engine reports unknown keys afterwards).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self {
        let mut c = AmqpConfig::default();
        if let Some(n) = r.node("url") {
            match &n.value {
                Value::Str(s) if s.starts_with("amqp://") || s.starts_with("amqps://") => {
                    match s.parse::<lapin::uri::AMQPUri>() {
                        Ok(_) => c.url = s.clone(),
                        Err(e) => d.push(
                            &n.loc,
                            "brokers.amqp.url",
                            format!("not a valid AMQP URL: {e}"),
                        ),
                    }
                }
                Value::Str(s) => d.push(
                    &n.loc,
                    "brokers.amqp.url",
                    format!("`{s}` is not an AMQP URL (expected amqp://user:pass@host:port/vhost)"),
                ),
                other => d.push(
                    &n.loc,
                    "brokers.amqp.url",
                    format!("expected a string, found {}", other.type_name()),
                ),
            }
        }
        let exchange_loc = r.node("exchange").map(|n| n.loc.clone());
        c.exchange = r.str_or(d, "exchange", "weir");
        if c.exchange.is_empty() || c.exchange.starts_with("amq.") || c.exchange.len() > 255 {
            if let Some(loc) = &exchange_loc {
                d.push(
                    loc,
                    "brokers.amqp.exchange",
                    "must be 1..=255 bytes and not start with `amq.` (reserved by RabbitMQ)",
                );
            }
        }
        c.exchange_type = match one_of(r, d, "exchange_type", &["topic", "direct"]).as_deref() {
            Some("direct") => ExchangeType::Direct,
            _ => ExchangeType::Topic,
        };
        let durable_loc = r
            .node("durable")
            .map_or_else(|| r.loc().clone(), |n| n.loc.clone());
        c.durable = r.bool_or(d, "durable", true);
        c.prefetch = r.uint_or(d, "prefetch", 10_000, 1..=65_535) as u16;
        c.queue_type = match one_of(r, d, "queue_type", &["classic", "quorum", "stream"]).as_deref()
        {
            Some("quorum") => QueueType::Quorum,
            Some("stream") => QueueType::Stream,
            _ => QueueType::Classic,
        };
        if let Some(s) = one_of(r, d, "stream_offset", &["first", "last", "next"]) {
            c.stream_offset = s;
        }
        c.single_active_consumer = r.bool_or(d, "single_active_consumer", true);
        c.partitions = r.uint_or(d, "partitions", 1, 1..=MAX_PARTITIONS as u64) as u32;
        c.max_message_bytes = r.uint_or(
            d,
            "max_message_bytes",
            DEFAULT_MAX_MESSAGE_BYTES as u64,
            4096..=DEFAULT_MAX_MESSAGE_BYTES as u64 * 4,
        ) as usize;
        if let Some(loc) = r.node("queue_expires").map(|n| n.loc.clone()) {
            let e = r.duration_or(d, "queue_expires", std::time::Duration::ZERO);
            if e.as_millis() == 0 || e.as_millis() > u32::MAX as u128 {
                d.push(
                    &loc,
                    "brokers.amqp.queue_expires",
                    "must be between 1ms and 49 days",
                );
            } else {
                c.queue_expires = Some(e);
            }
        }
        if let Some(loc) = r.node("heartbeat").map(|n| n.loc.clone()) {
            let h = r.duration_or(d, "heartbeat", DEFAULT_HEARTBEAT);
            if h < std::time::Duration::from_secs(1) || h > std::time::Duration::from_secs(600) {
                d.push(
                    &loc,
                    "brokers.amqp.heartbeat",
                    "must be between 1s and 600s (whole seconds)",
                );
            } else {
                c.heartbeat = h;
            }
        }
        if !c.durable && c.queue_type != QueueType::Classic {
            d.push(
                &durable_loc,
                "brokers.amqp.durable",
                format!(
                    "{} queues are always durable; remove `durable = false`",
                    c.queue_type.as_str()
                ),
            );
        }
        c
    }
}

/// A string setting restricted to `allowed`; `None` when absent or invalid (reported).
fn one_of(
    r: &mut TableReader<'_>,
    d: &mut Diagnostics,
    key: &'static str,
    allowed: &[&str],
) -> Option<String> {
    let loc = r.node(key).map(|n| n.loc.clone())?;
    let s = r.str(d, key)?;
    if allowed.contains(&s) {
        Some(s.to_string())
    } else {
        d.push(
            &loc,
            &r.key_path(key),
            format!("`{s}` is not one of {}", allowed.join(", ")),
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_engine::config::{load_str, Overrides};

    fn read(text: &str) -> (AmqpConfig, Diagnostics) {
        let loaded = load_str("p.toml", text, &Overrides::default());
        let mut d = Diagnostics::default();
        let section = loaded
            .config
            .brokers
            .iter()
            .find(|(n, _, _)| n == "amqp")
            .map(|(_, _, n)| n);
        let c = weir_engine::broker::read_section::<crate::AmqpBroker>(section, &mut d);
        (c, d)
    }

    #[test]
    fn defaults_and_values() {
        let (c, d) = read(
            "[brokers.amqp]\nprefetch = 500\nqueue_type = \"quorum\"\nexchange_type = \"direct\"\npartitions = 4\n",
        );
        assert!(d.is_empty(), "{:?}", d.problems());
        assert_eq!(c.partitions, 4);
        assert_eq!(AmqpConfig::default().partitions, 1);
        assert_eq!(c.prefetch, 500);
        assert_eq!(c.queue_type, QueueType::Quorum);
        assert_eq!(c.exchange_type, ExchangeType::Direct);
        assert_eq!(c.url, DEFAULT_URL);
        assert_eq!(c.heartbeat, DEFAULT_HEARTBEAT);
        let (c, d) = read("[brokers.amqp]\nheartbeat = \"2s\"\n");
        assert!(d.is_empty(), "{:?}", d.problems());
        assert_eq!(c.heartbeat, std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_heartbeat_out_of_range_is_reported_at_its_line_and_column() {
        for bad in ["0s", "500ms", "11m"] {
            let (c, d) = read(&format!("[brokers.amqp]\nheartbeat = \"{bad}\"\n"));
            assert_eq!(d.problems().len(), 1, "{bad}: {:?}", d.problems());
            let p = &d.problems()[0];
            assert_eq!(p.key, "brokers.amqp.heartbeat");
            assert!(
                matches!(
                    p.loc,
                    weir_engine::config::Loc::File {
                        line: 2,
                        col: 13,
                        ..
                    }
                ),
                "{p:?}"
            );
            assert_eq!(c.heartbeat, DEFAULT_HEARTBEAT);
        }
    }

    #[test]
    fn every_problem_has_a_location() {
        let (_, d) = read(
            "[brokers.amqp]\nprefetch = 0\nqueue_type = \"lazy\"\nurl = \"http://x\"\nprefech = 3\ndurable = false\nstream_offset = \"first\"\n",
        );
        let keys: Vec<&str> = d.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(d.problems().len(), 4, "{:?}", d.problems());
        assert!(keys.contains(&"brokers.amqp.prefetch"));
        assert!(keys.contains(&"brokers.amqp.queue_type"));
        assert!(keys.contains(&"brokers.amqp.url"));
        assert!(keys.contains(&"brokers.amqp.prefech"));
        for p in d.problems() {
            assert!(
                matches!(p.loc, weir_engine::config::Loc::File { .. }),
                "{p:?}"
            );
        }
    }
}
