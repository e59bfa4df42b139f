//! The RabbitMQ sink: persistent publishes with publisher confirms, one batch at a time.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use weir_engine::{EngineError, OutRecord, Result, Sink};

use crate::config::AmqpConfig;
use crate::error::{amqp_error, redact, BACKEND};
use crate::topology;

/// Header carrying the record key (AMQP messages have no key; the routing key is the topic).
pub const HEADER_KEY: &str = "weir.key";
/// Header carrying the record timestamp in milliseconds (the AMQP `timestamp` property only
/// has seconds; it is set too).
pub const HEADER_TIMESTAMP: &str = "weir.timestamp";

struct Live {
    // Kept so the connection lives as long as the channel.
    _conn: Connection,
    ch: Channel,
}

/// Publishes to one topic: exchange `[brokers.amqp] exchange`, routing key = topic (with
/// `partitions = N > 1`: routing key `topic.p`, `p` = [`partition_of`](crate::partition_of)
/// of the record's key, or of its payload when it has none).
///
/// [`send`](Sink::send) publishes the whole batch, then waits for every confirm: it returns
/// `Ok` only when RabbitMQ has taken responsibility for every record (persisted them, for
/// durable queues). While the broker is unreachable it fails with a retryable error and
/// reconnects (and re-declares the topology) on the next call.
pub struct AmqpSink {
    cfg: Arc<AmqpConfig>,
    topic: String,
    /// The topic's queues, by partition (routing key = queue name): `[topic]` with one
    /// partition.
    queues: Vec<String>,
    /// `Some((source topic, delay))` for a retry queue that dead-letters back to it.
    retry: Option<(String, std::time::Duration)>,
    live: Option<Live>,
    failures: u32,
}

impl AmqpSink {
    pub(crate) async fn connect(cfg: Arc<AmqpConfig>, topic: &str) -> Result<AmqpSink> {
        Self::connect_to(cfg, topic.to_string(), None).await
    }

    pub(crate) async fn connect_retry(
        cfg: Arc<AmqpConfig>,
        source_topic: &str,
        delay: std::time::Duration,
    ) -> Result<AmqpSink> {
        let topic = topology::retry_queue(source_topic);
        Self::connect_to(cfg, topic, Some((source_topic.to_string(), delay))).await
    }

    async fn connect_to(
        cfg: Arc<AmqpConfig>,
        topic: String,
        retry: Option<(String, std::time::Duration)>,
    ) -> Result<AmqpSink> {
        if retry.is_some() && cfg.partitions > 1 {
            return Err(EngineError::backend(
                BACKEND,
                "the TTL retry queue dead-letters into one queue, so it needs `brokers.amqp.partitions = 1` (the engine's [retry] topic works with any number)",
                false,
            ));
        }
        let n = cfg.partitions;
        let queues = (0..n)
            .map(|p| topology::partition_queue(&topic, p, n))
            .collect();
        let mut s = AmqpSink {
            cfg,
            topic,
            queues,
            retry,
            live: None,
            failures: 0,
        };
        s.ensure().await?;
        Ok(s)
    }

    async fn open(&self) -> Result<Live> {
        let conn = topology::connect(&self.cfg, &format!("weir sink {}", self.topic)).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", &e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("enabling publisher confirms", &e))?;
        match &self.retry {
            None => {
                for q in &self.queues {
                    topology::declare_published_topic(&conn, &ch, &self.cfg, q).await?
                }
            }
            Some((source, delay)) => {
                topology::declare_retry(&ch, &self.cfg, source, *delay).await?
            }
        }
        Ok(Live { _conn: conn, ch })
    }

    async fn ensure(&mut self) -> Result<()> {
        if self
            .live
            .as_ref()
            .is_some_and(|l| l.ch.status().connected())
        {
            return Ok(());
        }
        if self.live.take().is_some() {
            tracing::warn!(topic = %self.topic, "RabbitMQ sink's channel was closed; reconnecting");
        }
        match topology::bounded("opening a sink's channel", self.open()).await {
            Ok(live) => {
                if self.failures > 0 {
                    tracing::info!(
                        topic = %self.topic,
                        url = %redact(&self.cfg.url),
                        attempts = self.failures + 1,
                        "RabbitMQ sink reconnected; topology re-declared"
                    );
                }
                self.failures = 0;
                self.live = Some(live);
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!(
                    topic = %self.topic,
                    url = %redact(&self.cfg.url),
                    attempt = self.failures,
                    error = %e,
                    "RabbitMQ sink cannot connect; retrying with backoff"
                );
                Err(e)
            }
        }
    }

    fn lost(&mut self, what: &str, e: &lapin::Error) -> EngineError {
        let err = amqp_error(what, e);
        if err.is_retryable() {
            tracing::warn!(topic = %self.topic, error = %e, "RabbitMQ sink lost its channel; will reconnect");
            self.live = None;
        }
        err
    }
}

/// The AMQP properties of `r`: persistent (if durable), headers, key and timestamp.
pub(crate) fn properties(r: &OutRecord, persistent: bool) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &r.headers {
        headers.insert(
            k.as_ref().into(),
            AMQPValue::LongString(LongString::from(v.to_vec())),
        );
    }
    if let Some(k) = &r.key {
        headers.insert(
            HEADER_KEY.into(),
            AMQPValue::LongString(LongString::from(k.to_vec())),
        );
    }
    let mut p = BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
    // Results, dead letters and retry envelopes are JSON objects, and so are the events
    // `weir produce` and POST /track publish: say so to standard consumers.
    if r.payload.first() == Some(&b'{') {
        p = p.with_content_type("application/json".into());
    }
    if let Some(ts) = r.timestamp {
        headers.insert(HEADER_TIMESTAMP.into(), AMQPValue::LongLongInt(ts));
        if ts >= 0 {
            p = p.with_timestamp((ts / 1000) as u64);
        }
    }
    p.with_headers(headers)
}

#[async_trait]
impl Sink for AmqpSink {
    fn name(&self) -> &str {
        &self.topic
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.ensure().await?;
        let persistent = self.cfg.durable;
        let ch = self.live.as_ref().map(|l| l.ch.clone()).expect("connected");
        // Each `basic_publish` future hands its frames to lapin's I/O loop when first polled
        // and then waits until they are written. Awaiting them one by one costs a
        // round trip to that thread per record (~80 µs); instead every publish is polled
        // once, in order (so frames and confirms keep the batch order), then all are
        // awaited.
        let exchange = self.cfg.exchange.as_str();
        let n = self.cfg.partitions;
        // A dead letter or late record never fails for its size: it is cut to fit.
        let fitted: Vec<Option<OutRecord>> = batch
            .iter()
            .map(|r| weir_engine::output::fit_to(r, self.cfg.max_message_bytes))
            .collect();
        if fitted.iter().any(Option::is_some) {
            tracing::warn!(topic = %self.topic, limit = self.cfg.max_message_bytes, "record cut to fit brokers.amqp.max_message_bytes (payload_truncated in its envelope)");
        }
        let mut started = Vec::with_capacity(batch.len());
        for (r, fit) in batch.iter().zip(&fitted) {
            let r = fit.as_ref().unwrap_or(r);
            let queue = match n {
                1 => &self.queues[0],
                _ => {
                    let by = r.key.as_deref().unwrap_or(&r.payload);
                    &self.queues[topology::partition_of(by, n) as usize]
                }
            };
            let mut f = Box::pin(ch.basic_publish(
                exchange.into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &r.payload,
                properties(r, persistent),
            ));
            let ready = match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(res) => Some(res),
                Poll::Pending => None,
            };
            started.push((f, ready));
        }
        let mut confirms: Vec<PublisherConfirm> = Vec::with_capacity(batch.len());
        let mut failed = None;
        for (f, ready) in started {
            let res = match ready {
                Some(res) => res,
                None => f.await,
            };
            match res {
                Ok(c) => confirms.push(c),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(self.lost("publishing", &e));
        }
        let mut nacked = 0usize;
        let mut returned = None;
        for c in confirms {
            match c.await {
                Ok(conf) => {
                    if conf.is_nack() {
                        nacked += 1;
                    } else if let Some(m) = conf.take_message() {
                        returned.get_or_insert(m.reply_text.to_string());
                    }
                }
                Err(e) => return Err(self.lost("waiting for publisher confirms", &e)),
            }
        }
        if let Some(why) = returned {
            // Re-declare the queue and binding on the next attempt (someone may have
            // deleted them).
            self.live = None;
            return Err(EngineError::backend(
                BACKEND,
                format!(
                    "records for `{}` were returned unroutable by exchange `{}` ({why}): is queue `{}` bound to it?",
                    self.topic,
                    self.cfg.exchange,
                    self.queues.join("`, `")
                ),
                true,
            ));
        }
        if nacked > 0 {
            return Err(EngineError::backend(
                BACKEND,
                format!(
                    "RabbitMQ refused {nacked} of {} records for `{}` (nack)",
                    batch.len(),
                    self.topic
                ),
                true,
            ));
        }
        Ok(())
    }
}
