//! The sink: one MULTI/EXEC per batch, acknowledged after EXEC.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use weir_engine::record::{OutRecord, HEADER_ID};
use weir_engine::{EngineError, Result, Sink};

use crate::config::RedisConfig;
use crate::error::RedisSinkError;

const BACKEND: &str = "redis";

/// Window results written to Redis as one hash per result. [`send`](Sink::send) returns
/// once the batch's EXEC has answered; a failed batch leaves the sink disconnected, and
/// the runtime's retry (the same batch again) reconnects first.
pub struct RedisSink {
    config: RedisConfig,
    client: redis::Client,
    name: String,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("prefix", &self.config.prefix)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl RedisSink {
    /// Connects (one attempt: an unreachable server is a retryable error).
    pub async fn open(config: RedisConfig) -> Result<RedisSink> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            err(RedisSinkError::Redis {
                what: "reading the URL".into(),
                source: e,
            })
        })?;
        let mut sink = RedisSink {
            name: format!("redis keys {}:*", config.prefix),
            config,
            client,
            conn: None,
        };
        sink.connect().await.map_err(err)?;
        tracing::info!(prefix = %sink.config.prefix, "writing results to Redis");
        Ok(sink)
    }

    async fn connect(&mut self) -> std::result::Result<(), RedisSinkError> {
        let mut conn = within(
            self.config.timeout,
            "connecting to Redis",
            self.client.get_multiplexed_async_connection(),
        )
        .await?
        .map_err(|e| RedisSinkError::Redis {
            what: "connecting to Redis".into(),
            source: e,
        })?;
        let _: () = within(
            self.config.timeout,
            "PING",
            redis::cmd("PING").query_async(&mut conn),
        )
        .await?
        .map_err(|e| RedisSinkError::Redis {
            what: "PING".into(),
            source: e,
        })?;
        self.conn = Some(conn);
        Ok(())
    }

    /// The batch as one MULTI/EXEC: `HSET PREFIX:ID field value …` and `ZADD
    /// PREFIX:windows 0 WINDOW_START|ID` per result.
    fn pipeline(
        &self,
        batch: &[OutRecord],
    ) -> std::result::Result<redis::Pipeline, RedisSinkError> {
        let prefix = &self.config.prefix;
        let index = format!("{prefix}:windows");
        let mut pipe = redis::pipe();
        pipe.atomic();
        for rec in batch {
            let id = rec
                .header(HEADER_ID)
                .and_then(|v| std::str::from_utf8(v).ok())
                .ok_or_else(|| RedisSinkError::Result("a result has no weir.id header".into()))?;
            let obj: serde_json::Map<String, Value> = serde_json::from_slice(&rec.payload)
                .map_err(|e| {
                    RedisSinkError::Result(format!("a result is not a JSON object: {e}"))
                })?;
            let cmd = pipe.cmd("HSET").arg(format!("{prefix}:{id}"));
            for (k, v) in &obj {
                match v {
                    Value::String(s) => cmd.arg(k).arg(s),
                    v => cmd.arg(k).arg(v.to_string()),
                };
            }
            cmd.ignore();
            let start = obj
                .get("window_start")
                .and_then(Value::as_str)
                .unwrap_or_default();
            pipe.cmd("ZADD")
                .arg(&index)
                .arg(0)
                .arg(format!("{start}|{id}"))
                .ignore();
        }
        Ok(pipe)
    }

    async fn write(&mut self, pipe: &redis::Pipeline) -> std::result::Result<(), RedisSinkError> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let conn = self.conn.as_mut().expect("connected above");
        // Acknowledged only once EXEC has answered.
        let done: redis::RedisResult<()> = within(
            self.config.timeout,
            "writing a batch of results",
            pipe.query_async(conn),
        )
        .await?;
        done.map_err(|e| RedisSinkError::Redis {
            what: "MULTI/EXEC of a batch of results".into(),
            source: e,
        })
    }
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let pipe = self.pipeline(batch).map_err(err)?;
        let written = self.write(&pipe).await;
        if let Err(e) = &written {
            if weir_engine::error::Retryable::is_retryable(e) {
                self.conn = None;
            }
        }
        written.map_err(err)
    }
}

fn err(e: RedisSinkError) -> EngineError {
    EngineError::from_backend(BACKEND, e)
}

/// `f`, or a retryable timeout after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = T>,
) -> std::result::Result<T, RedisSinkError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| RedisSinkError::Timeout(what.to_string(), limit))
}
