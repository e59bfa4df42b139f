//! Connections and topology declarations shared by sources and sinks.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{AmqpConfig, ExchangeType, QueueType};
use crate::error::{amqp_error, redact, BACKEND};

/// The queue holding the last committed position of queue `queue`.
pub fn checkpoint_queue(queue: &str) -> String {
    format!("weir.checkpoint.{queue}")
}

/// Opens a connection named `name` (shown in RabbitMQ's management UI).
pub(crate) async fn connect(cfg: &AmqpConfig, name: &str) -> weir_engine::Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(&cfg.url, props).await.map_err(|e| {
        weir_engine::EngineError::backend(
            BACKEND,
            format!("RabbitMQ at {} is not reachable: {e}", redact(&cfg.url)),
            crate::error::is_retryable(&e),
        )
    })
}

/// Declares the exchange, queue `topic` and the binding `topic` → queue `topic`.
/// Idempotent: RabbitMQ accepts re-declarations with the same arguments.
pub(crate) async fn declare_topic(
    ch: &Channel,
    cfg: &AmqpConfig,
    topic: &str,
) -> weir_engine::Result<()> {
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
    .map_err(|e| amqp_error(&format!("declaring exchange `{}`", cfg.exchange), &e))?;
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
    if cfg.single_active_consumer && cfg.queue_type != QueueType::Stream {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    let durable = cfg.durable || cfg.queue_type != QueueType::Classic;
    ch.queue_declare(
        topic.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| amqp_error(&format!("declaring queue `{topic}`"), &e))?;
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
    })?;
    Ok(())
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
