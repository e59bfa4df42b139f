//! Stores results can go to instead of the sink topic: `[sink] type = "postgres"`, one
//! arm per store, each behind its cargo feature. The engine keeps such a `[sink]` table
//! raw (`PipelineConfig::sink_store`); its keys are read and checked here, at their
//! `file:line:col`, when the configuration is loaded.

use weir_engine::config::{Diagnostics, PipelineConfig, SinkStore, TableReader, Value};
use weir_engine::Sink;

use crate::Backend;

/// Every `[sink] type` Weir has, built into this one or not.
const KNOWN: &[&str] = &["topic", "postgres", "redis"];

/// A store's checked settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreConfig {
    /// `type = "postgres"`.
    #[cfg(feature = "postgres")]
    Postgres(Box<weir_postgres::PostgresConfig>),
    /// `type = "redis"`.
    #[cfg(feature = "redis")]
    Redis(weir_redis::RedisConfig),
}

/// Reads and checks `c`'s `[sink]` store, if it has one, reporting problems to `d`.
pub fn read(c: &PipelineConfig, d: &mut Diagnostics) -> Option<StoreConfig> {
    let s: &SinkStore = c.sink_store.as_ref()?;
    let Value::Table(table) = &s.table.value else {
        return None;
    };
    let mut r = TableReader::new("sink", table, s.table.loc.clone());
    r.str(d, "type");
    let store = match s.kind.as_str() {
        #[cfg(feature = "postgres")]
        "postgres" => Some(StoreConfig::Postgres(Box::new(
            weir_postgres::PostgresConfig::read(&mut r, d),
        ))),
        #[cfg(feature = "redis")]
        "redis" => Some(StoreConfig::Redis(weir_redis::RedisConfig::read(&mut r, d))),
        kind => {
            let problem = if KNOWN.contains(&kind) {
                format!("the `{kind}` sink is not in this build (built without the cargo feature `{kind}`)")
            } else {
                format!(
                    "unknown sink type `{kind}` (choose among {})",
                    KNOWN.join(", ")
                )
            };
            d.push(&s.kind_loc, "sink.type", problem);
            return None;
        }
    };
    r.finish(d);
    store
}

/// A line naming where results go, for logs and `weir validate`.
pub fn describe(c: &PipelineConfig) -> String {
    match read(c, &mut Diagnostics::default()) {
        #[cfg(feature = "postgres")]
        Some(StoreConfig::Postgres(p)) => format!("postgres table {}", p.table),
        #[cfg(feature = "redis")]
        Some(StoreConfig::Redis(r)) => format!("redis keys {}:*", r.prefix),
        _ => c.sink.topic.clone(),
    }
}

/// Opens the results' store: connects (retrying an unreachable server with the pipeline's
/// `give_up_after`, a log line per attempt), creates its table if missing and checks it.
pub async fn open(c: &PipelineConfig, backend: &Backend) -> anyhow::Result<Box<dyn Sink>> {
    let mut d = Diagnostics::default();
    let store = read(c, &mut d);
    anyhow::ensure!(d.is_empty(), "the [sink] settings were not checked");
    match store {
        #[cfg(feature = "postgres")]
        Some(StoreConfig::Postgres(p)) => {
            let layout = weir_postgres::Layout::of(c);
            let what = format!("opening postgres table {}", p.table);
            let sink = crate::assemble::connect(c, backend, &what, || {
                weir_postgres::PostgresSink::open((*p).clone(), layout.clone())
            })
            .await?;
            Ok(Box::new(sink))
        }
        #[cfg(feature = "redis")]
        Some(StoreConfig::Redis(r)) => {
            let what = format!("opening redis keys {}:*", r.prefix);
            let sink = crate::assemble::connect(c, backend, &what, || {
                weir_redis::RedisSink::open(r.clone())
            })
            .await?;
            Ok(Box::new(sink))
        }
        _ => anyhow::bail!("the pipeline has no [sink] store"),
    }
}
