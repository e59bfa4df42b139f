//! Connections and topology declarations shared by sources and sinks.

use std::future::Future;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{AmqpConfig, ExchangeType, QueueType};
use crate::error::{amqp_error, redact, BACKEND};

/// The queue of partition `p` of topic `topic` split into `n` queues: `topic` itself when
/// `n` is 1 (one queue per topic, as before partitions existed), else `topic.p`.
pub fn partition_queue(topic: &str, p: u32, n: u32) -> String {
    if n <= 1 {
        topic.to_string()
    } else {
        format!("{topic}.{p}")
    }
}

/// The partition (0..n) a record with this key goes to: the 64-bit FNV-1a hash of the key's
/// bytes modulo `n` (the hash the embedded broker uses), so any producer can compute it.
/// Records without a key are routed by their payload's hash the same way.
pub fn partition_of(key: &[u8], n: u32) -> u32 {
    (weir_engine::record::fnv1a(key) % u64::from(n.max(1))) as u32
}

/// The topic whose partition `p` of `n` is queue `queue` (see [`partition_queue`]).
pub(crate) fn topic_of(queue: &str, p: u32, n: u32) -> &str {
    if n <= 1 {
        queue
    } else {
        queue.strip_suffix(&format!(".{p}")).unwrap_or(queue)
    }
}

/// Fails when `topic` was read under the other layout: one queue `T` (`partitions = 1`)
/// while it is read with `n > 1` queues now, or queues `T.0`.. while it is read as one
/// queue: the checkpoint queue of the other layout's first queue holds a commit.
pub(crate) async fn check_layout(
    conn: &Connection,
    topic: &str,
    n: u32,
) -> weir_engine::Result<()> {
    let (other, then) = if n <= 1 {
        (
            checkpoint_queue(&partition_queue(topic, 0, 2)),
            "more than 1",
        )
    } else {
        (checkpoint_queue(topic), "1")
    };
    // A passive declare of a missing queue closes its channel: a channel of its own.
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("opening a channel", &e))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(other.as_str().into(), passive, FieldTable::default())
        .await;
    let _ = ch.close(200, "layout checked".into()).await;
    match found {
        Ok(q) if q.message_count() > 0 => Err(weir_engine::EngineError::backend(
            BACKEND,
            format!(
                "topic `{topic}` is read with brokers.amqp.partitions = {n}, but it was read with partitions = {then} before (checkpoint queue `{other}` holds a commit): records left in the queues of the old layout would never be read. Drain the topic with the old setting (`weir run --exit-when-idle`), then delete its `weir.checkpoint.{topic}*` queues; or use a new topic"
            ),
            false,
        )),
        _ => Ok(()),
    }
}

/// The queue holding the last committed position of queue `queue`.
pub fn checkpoint_queue(queue: &str) -> String {
    format!("weir.checkpoint.{queue}")
}

/// How long connecting, or opening a partition queue (channel, declarations, checkpoint
/// read, consume), may take before the connection counts as lost. A node that accepts TCP
/// connections while it boots, or a connection whose peer vanished without a reset, answers
/// nothing: without a bound the pipeline would wait for it forever.
pub(crate) const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// `fut`, or a retryable error saying RabbitMQ did not answer `what` within
/// [`BROKER_TIMEOUT`].
pub(crate) async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = weir_engine::Result<T>>,
) -> weir_engine::Result<T> {
    tokio::time::timeout(BROKER_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(no_answer(what)))
}

/// The error of an operation RabbitMQ did not answer within [`BROKER_TIMEOUT`].
pub(crate) fn no_answer(what: &str) -> weir_engine::EngineError {
    weir_engine::EngineError::backend(
        BACKEND,
        format!(
            "RabbitMQ did not answer {what} within {} s; dropping the connection",
            BROKER_TIMEOUT.as_secs()
        ),
        true,
    )
}

/// Opens a connection named `name` (shown in RabbitMQ's management UI), within
/// [`BROKER_TIMEOUT`].
pub(crate) async fn connect(cfg: &AmqpConfig, name: &str) -> weir_engine::Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let mut uri: AMQPUri = cfg.url.parse().map_err(|e| {
        weir_engine::EngineError::backend(
            BACKEND,
            format!("not a valid AMQP URL {}: {e}", redact(&cfg.url)),
            false,
        )
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(cfg.heartbeat.as_secs().clamp(1, 600) as u16);
    }
    let connected = tokio::time::timeout(BROKER_TIMEOUT, Connection::connect_uri(uri, props));
    match connected.await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(weir_engine::EngineError::backend(
            BACKEND,
            format!("RabbitMQ at {} is not reachable: {e}", redact(&cfg.url)),
            crate::error::is_retryable(&e),
        )),
        Err(_) => Err(no_answer(&format!(
            "a new connection at {}",
            redact(&cfg.url)
        ))),
    }
}

/// Declares the exchange, queue `topic` and the binding `topic` → queue `topic`, for a
/// queue a Weir source reads: with `x-single-active-consumer` (unless turned off), so one
/// instance reads it at a time. Idempotent: RabbitMQ accepts re-declarations with the same
/// arguments. A queue that exists with other arguments fails with an error naming the
/// argument that differs and the setting to change (see [`declare_error`]).
pub(crate) async fn declare_topic(
    ch: &Channel,
    cfg: &AmqpConfig,
    topic: &str,
) -> weir_engine::Result<()> {
    declare_exchange(ch, cfg).await?;
    declare_queue(ch, cfg, topic, true)
        .await
        .map_err(|e| declare_error(topic, &e))?;
    bind(ch, cfg, topic).await
}

/// [`declare_topic`] on a new channel of `conn`, for a source. A queue that already exists
/// without `x-single-active-consumer` (declared by a publisher: a Weir sink, or another
/// client) is used as it is, and the returned flag says to consume it with an exclusive
/// consumer, which keeps the guarantee single active consumer gave: one reader at a time.
pub(crate) async fn declare_consumed_topic(
    conn: &Connection,
    cfg: &AmqpConfig,
    topic: &str,
) -> weir_engine::Result<(Channel, bool)> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", &e))
    };
    let ch = open().await?;
    declare_exchange(&ch, cfg).await?;
    match declare_queue(&ch, cfg, topic, true).await {
        Ok(()) => {
            bind(&ch, cfg, topic).await?;
            Ok((ch, false))
        }
        Err(e)
            if cfg.single_active_consumer
                && inequivalent_arg(&e).as_deref() == Some("x-single-active-consumer") =>
        {
            // The refusal closed the channel.
            let ch = open().await?;
            bind(&ch, cfg, topic).await?;
            tracing::info!(
                queue = topic,
                "queue exists without x-single-active-consumer (declared by a publisher); using it as it is, with an exclusive consumer"
            );
            Ok((ch, true))
        }
        Err(e) => Err(declare_error(topic, &e)),
    }
}

/// Declares the exchange, queue `topic` and the binding, for a queue Weir only publishes
/// to (results, dead letters, late events): a queue that already exists is used as it is
/// (a passive declare, on a channel of its own since a missing queue closes it), whatever
/// its arguments; a new one is declared the way other clients expect — durable, no
/// `x-single-active-consumer` — so that a standard consumer's
/// `queue_declare(queue, durable=True)` finds it equivalent.
pub(crate) async fn declare_published_topic(
    conn: &Connection,
    ch: &Channel,
    cfg: &AmqpConfig,
    topic: &str,
) -> weir_engine::Result<()> {
    declare_exchange(ch, cfg).await?;
    if !queue_exists(conn, topic).await? {
        if let Err(e) = declare_queue(ch, cfg, topic, false).await {
            return Err(declare_error(topic, &e));
        }
    }
    bind(ch, cfg, topic).await
}

/// Declares a server-named, exclusive, auto-delete queue (it goes with the connection)
/// bound to `exchange` with each of `keys`; returns its name.
pub(crate) async fn private_queue(
    ch: &Channel,
    exchange: &str,
    keys: &[&str],
) -> weir_engine::Result<String> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("declaring a private queue", &e))?;
    let name = q.name().to_string();
    for key in keys {
        ch.queue_bind(
            name.as_str().into(),
            exchange.into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&format!("binding a private queue to `{exchange}`"), &e))?;
    }
    Ok(name)
}

/// Whether queue `name` exists: a passive declare on a throwaway channel.
pub(crate) async fn queue_exists(conn: &Connection, name: &str) -> weir_engine::Result<bool> {
    let probe = conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("opening a channel", &e))?;
    let r = probe
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match r {
        Ok(_) => {
            let _ = probe.close(200, "".into()).await;
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(amqp_error(&format!("checking queue `{name}`"), &e)),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)))
}

async fn declare_exchange(ch: &Channel, cfg: &AmqpConfig) -> weir_engine::Result<()> {
    let kind = match cfg.exchange_type {
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Direct => ExchangeKind::Direct,
    };
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        kind,
        ExchangeDeclareOptions {
            durable: cfg.durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error(&format!("declaring exchange `{}`", cfg.exchange), &e))
}

/// The arguments of a topic's queue: its type, `x-expires` if set, and for a queue a
/// source reads, `x-single-active-consumer`.
fn queue_args(cfg: &AmqpConfig, consumed: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(cfg.queue_type.as_str().into()),
    );
    // RabbitMQ refuses `x-expires` on streams (they have retention instead).
    if let Some(e) = cfg
        .queue_expires
        .filter(|_| cfg.queue_type != QueueType::Stream)
    {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(e.as_millis() as i64),
        );
    }
    if consumed && cfg.single_active_consumer && cfg.queue_type != QueueType::Stream {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

async fn declare_queue(
    ch: &Channel,
    cfg: &AmqpConfig,
    topic: &str,
    consumed: bool,
) -> Result<(), lapin::Error> {
    let durable = cfg.durable || cfg.queue_type != QueueType::Classic;
    ch.queue_declare(
        topic.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        queue_args(cfg, consumed),
    )
    .await
    .map(|_| ())
}

async fn bind(ch: &Channel, cfg: &AmqpConfig, topic: &str) -> weir_engine::Result<()> {
    ch.queue_bind(
        topic.into(),
        cfg.exchange.as_str().into(),
        topic.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| {
        amqp_error(
            &format!("binding queue `{topic}` to exchange `{}`", cfg.exchange),
            &e,
        )
    })
}

/// The argument RabbitMQ names in an `inequivalent arg` refusal, if that is what `e` is.
pub(crate) fn inequivalent_arg(e: &lapin::Error) -> Option<String> {
    let text = e.to_string();
    let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    Some(rest[..rest.find('\'')?].to_string())
}

/// The setting of `[brokers.amqp]` that decides queue argument `arg`.
fn setting_of(arg: &str) -> Option<&'static str> {
    Some(match arg {
        "x-single-active-consumer" => "brokers.amqp.single_active_consumer",
        "x-queue-type" => "brokers.amqp.queue_type",
        "x-expires" => "brokers.amqp.queue_expires",
        "durable" => "brokers.amqp.durable",
        _ => return None,
    })
}

/// A failed queue declaration as an engine error; for a queue that exists with other
/// arguments, the message names the argument and the setting to change.
pub(crate) fn declare_error(queue: &str, e: &lapin::Error) -> weir_engine::EngineError {
    let what = format!("declaring queue `{queue}`");
    let Some(arg) = inequivalent_arg(e) else {
        return amqp_error(&what, e);
    };
    let advice = match setting_of(&arg) {
        Some(setting) => format!(
            "queue `{queue}` already exists with another `{arg}` than Weir declares: change `{setting}` to match the queue, or delete the queue so Weir declares it"
        ),
        None => format!(
            "queue `{queue}` already exists with argument `{arg}`, which Weir does not set: declare the queue without it, or delete it so Weir declares it"
        ),
    };
    weir_engine::EngineError::backend(BACKEND, format!("{what}: {e}. {advice}"), false)
}

/// Declares the checkpoint queue of `queue`: durable, classic, keeping only the newest
/// message.
pub(crate) async fn declare_checkpoint_queue(
    ch: &Channel,
    cfg: &AmqpConfig,
    queue: &str,
) -> weir_engine::Result<String> {
    let name = checkpoint_queue(queue);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    if let Some(e) = cfg.queue_expires {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(e.as_millis() as i64),
        );
    }
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| amqp_error(&format!("declaring checkpoint queue `{name}`"), &e))?;
    Ok(name)
}

/// The retry queue of topic `topic`.
pub fn retry_queue(topic: &str) -> String {
    format!("{topic}.retry")
}

/// Declares the delayed-requeue topology of `source`: queue `<source>.retry`, bound to the
/// exchange with key `<source>.retry`, whose messages expire after `delay`
/// (`x-message-ttl`) and are then dead-lettered to the exchange with routing key `source`,
/// i.e. back into the source queue. RabbitMQ counts the round trips in the `x-death`
/// header. Also declares `source` itself so the requeue is routable.
pub(crate) async fn declare_retry(
    ch: &Channel,
    cfg: &AmqpConfig,
    source: &str,
    delay: std::time::Duration,
) -> weir_engine::Result<()> {
    declare_topic(ch, cfg, source).await?;
    let name = retry_queue(source);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay.as_millis().max(1) as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(cfg.exchange.as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(source.into()),
    );
    if let Some(e) = cfg.queue_expires {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(e.as_millis() as i64),
        );
    }
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| amqp_error(&format!("declaring retry queue `{name}`"), &e))?;
    ch.queue_bind(
        name.as_str().into(),
        cfg.exchange.as_str().into(),
        name.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error(&format!("binding retry queue `{name}`"), &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_and_hash() {
        assert_eq!(partition_queue("t", 0, 1), "t");
        assert_eq!(partition_queue("t", 3, 4), "t.3");
        // FNV-1a 64 test vectors: "" = cbf29ce484222325, "a" = af63dc4c8601ec8c.
        assert_eq!(
            partition_of(b"", 1 << 31),
            (0xcbf2_9ce4_8422_2325u64 % (1 << 31)) as u32
        );
        assert_eq!(
            partition_of(b"a", 1000),
            (0xaf63_dc4c_8601_ec8cu64 % 1000) as u32
        );
        assert_eq!(partition_of(b"anything", 1), 0);
    }
}
