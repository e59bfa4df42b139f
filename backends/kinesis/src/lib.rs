//! Weir's AWS Kinesis Data Streams backend (aws-sdk-kinesis).
//!
//! - Shards are the partitions: a shard's partition index is its place in the sorted
//!   ListShards order when first seen, stored with the checkpoints so restarts agree.
//! - The source runs one tokio task per shard (GetShardIterator + GetRecords chaining) that
//!   pushes whole GetRecords batches into one bounded channel; `recv` drains it. A child
//!   shard's reader starts only after its parents' readers reached the shard end.
//! - Each record gets a per-shard offset (a counter resumed from the committed position);
//!   `commit` maps the offset back to the Kinesis sequence number of the last fully handled
//!   record and stores it, with the engine's checkpoint, in a [`CheckpointStore`].
//! - The sink uses PutRecords within the API limits and retries only failed entries.
//! - Kinesis has no headers: dead letters carry their reason inside the JSON envelope;
//!   a window result's `weir.id` header is dropped (it is `key@window_start`, both of which
//!   are in the payload).

mod checkpoint;
mod config;
mod coordinator;
mod error;
pub mod kpl;
mod lease;
mod reader;
mod sink;
mod source;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::types::StreamStatus;
use aws_sdk_kinesis::Client;
use weir_engine::broker::Broker;
use weir_engine::checkpoint_store::{CheckpointStore, InMemoryStore};
use weir_engine::config::{Diagnostics, TableReader};
use weir_engine::{EngineError, Result, Sink, Source};

/// The DynamoDB SDK of the lease table, for callers that look into it.
pub use aws_sdk_dynamodb;
/// The SDK this backend is built on, for callers that need the raw client.
pub use aws_sdk_kinesis;
pub use checkpoint::{Checkpoints, FileCheckpointStore, ShardCheckpoint};
pub use config::{Credentials, KinesisConfig, LeaseConfig, StartPosition};
pub use error::KinesisError;
pub use sink::KinesisSink;
pub use source::KinesisSource;

/// A configured Kinesis backend: one SDK client (made on first use), shared by its sources
/// and sinks.
#[derive(Debug, Clone)]
pub struct KinesisBroker {
    config: Arc<KinesisConfig>,
    client: Arc<tokio::sync::OnceCell<Client>>,
    ready: Arc<Mutex<HashSet<String>>>,
}

impl KinesisBroker {
    /// A backend with `config`, checkpoints in files under `config.checkpoint_dir`.
    pub fn new(config: KinesisConfig) -> Self {
        KinesisBroker {
            config: Arc::new(config),
            client: Arc::new(tokio::sync::OnceCell::new()),
            ready: Arc::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &KinesisConfig {
        &self.config
    }

    /// The endpoint for messages: the override, or "AWS (`region`)".
    pub fn endpoint(&self) -> String {
        self.config
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("AWS ({})", self.config.region))
    }

    /// The SDK client, built on first use.
    pub async fn client(&self) -> Result<Client> {
        self.client
            .get_or_try_init(|| build_client(&self.config))
            .await
            .cloned()
    }

    /// Makes sure `stream` exists and is ACTIVE, creating it when configured to.
    pub async fn ensure_stream(&self, stream: &str) -> Result<()> {
        if self.ready.lock().unwrap().contains(stream) {
            return Ok(());
        }
        let client = self.client().await?;
        let ep = self.endpoint();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut created = false;
        loop {
            let status = match client
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
            {
                Ok(out) => out
                    .stream_description_summary()
                    .map(|s| s.stream_status().clone()),
                Err(e) => {
                    let e = KinesisError::from_sdk("DescribeStreamSummary", &ep, e);
                    if e.code() != Some("ResourceNotFoundException") {
                        return Err(e.into());
                    }
                    if !self.config.create_streams {
                        return Err(EngineError::backend(
                            "kinesis",
                            format!("stream `{stream}` does not exist at {ep} (create it, or set brokers.kinesis.create_streams = true)"),
                            false,
                        ));
                    }
                    if !created {
                        match client
                            .create_stream()
                            .stream_name(stream)
                            .shard_count(self.config.shards as i32)
                            .send()
                            .await
                        {
                            Ok(_) => {
                                tracing::info!(
                                    stream,
                                    shards = self.config.shards,
                                    "created Kinesis stream"
                                )
                            }
                            Err(e) => {
                                let e = KinesisError::from_sdk("CreateStream", &ep, e);
                                if e.code() != Some("ResourceInUseException") {
                                    return Err(e.into());
                                }
                            }
                        }
                        created = true;
                    }
                    None
                }
            };
            match status {
                Some(StreamStatus::Active) | Some(StreamStatus::Updating) => break,
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(EngineError::backend(
                        "kinesis",
                        format!("stream `{stream}` did not become ACTIVE within 120 s"),
                        true,
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        self.ready.lock().unwrap().insert(stream.to_string());
        Ok(())
    }

    /// A DynamoDB client for the lease tables, when leases are configured.
    pub async fn lease_client(&self) -> Result<Option<aws_sdk_dynamodb::Client>> {
        let Some(lc) = &self.config.leases else {
            return Ok(None);
        };
        let sdk = load_sdk(&self.config, lc.endpoint_url.as_deref()).await?;
        Ok(Some(aws_sdk_dynamodb::Client::new(&sdk)))
    }

    /// The lease table of `group` on `stream` (made sure to exist), when leases are
    /// configured.
    async fn lease_table(&self, stream: &str, group: &str) -> Result<Option<lease::LeaseTable>> {
        let (Some(lc), Some(client)) = (&self.config.leases, self.lease_client().await?) else {
            return Ok(None);
        };
        let table = lease::LeaseTable {
            client,
            table: lc
                .table
                .clone()
                .unwrap_or_else(|| default_lease_table(stream, group)),
            endpoint: lc
                .endpoint_url
                .clone()
                .unwrap_or_else(|| format!("DynamoDB ({})", self.config.region)),
        };
        table.ensure(lc.create_table).await?;
        Ok(Some(table))
    }

    /// A reader of `stream`; `group` names its checkpoints (none: kept in memory only).
    /// With `leases = "dynamodb"` a grouped reader reads the shards it holds leases of.
    pub async fn source(&self, stream: &str, group: Option<&str>) -> Result<KinesisSource> {
        self.ensure_stream(stream).await?;
        if let (Some(g), Some(table)) = (
            group,
            match group {
                Some(g) => self.lease_table(stream, g).await?,
                None => None,
            },
        ) {
            let lc = self.config.leases.as_ref().expect("leases configured");
            let owner = lc.worker_id.clone().unwrap_or_else(default_worker_id);
            tracing::info!(stream, group = g, table = %table.table, owner, "shard leases in DynamoDB");
            let leased = source::Leased::new(
                table,
                owner,
                lc.duration,
                coordinator::Stream {
                    client: self.client().await?,
                    name: stream.to_string(),
                    endpoint: self.endpoint(),
                },
            );
            return Ok(KinesisSource::new(
                self.client().await?,
                self.config.clone(),
                self.endpoint(),
                stream.to_string(),
                g.to_string(),
                Arc::new(InMemoryStore::default()),
            )
            .with_leases(leased));
        }
        let (store, group): (Arc<dyn CheckpointStore>, String) = match group {
            Some(g) => (
                Arc::new(FileCheckpointStore::new(
                    self.config.checkpoint_dir.clone(),
                    stream,
                    g,
                )),
                g.to_string(),
            ),
            None => (Arc::new(InMemoryStore::default()), "ungrouped".into()),
        };
        Ok(KinesisSource::new(
            self.client().await?,
            self.config.clone(),
            self.endpoint(),
            stream.to_string(),
            group,
            store,
        ))
    }

    /// A reader of `stream` outside any group, starting at `start` instead of the
    /// configured start position; its checkpoints stay in memory (for `weir tail`).
    pub async fn reader(&self, stream: &str, start: StartPosition) -> Result<KinesisSource> {
        self.ensure_stream(stream).await?;
        let mut config = (*self.config).clone();
        config.start_position = start;
        Ok(KinesisSource::new(
            self.client().await?,
            Arc::new(config),
            self.endpoint(),
            stream.to_string(),
            "ungrouped".into(),
            Arc::new(InMemoryStore::default()),
        ))
    }

    /// A producer to `stream`.
    pub async fn sink(&self, stream: &str) -> Result<KinesisSink> {
        self.ensure_stream(stream).await?;
        Ok(KinesisSink::new(
            self.client().await?,
            self.endpoint(),
            stream.to_string(),
        ))
    }
}

#[async_trait]
impl Broker for KinesisBroker {
    const NAME: &'static str = "kinesis";
    type Config = KinesisConfig;

    fn read_config(r: &mut TableReader<'_>, d: &mut Diagnostics) -> KinesisConfig {
        KinesisConfig::read(r, d)
    }

    fn new(config: KinesisConfig) -> Self {
        KinesisBroker::new(config)
    }

    async fn source(&self, topic: &str, group: Option<&str>) -> Result<Box<dyn Source>> {
        Ok(Box::new(KinesisBroker::source(self, topic, group).await?))
    }

    async fn sink(&self, topic: &str) -> Result<Box<dyn Sink>> {
        Ok(Box::new(KinesisBroker::sink(self, topic).await?))
    }

    async fn table_reader(&self, topic: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(KinesisBroker::source(self, topic, None).await?))
    }

    /// Shard iterators at the trim horizon (everything retained) or at the latest record
    /// (only new ones); checkpoints stay in memory.
    async fn tail_reader(&self, topic: &str, from_beginning: bool) -> Result<Box<dyn Source>> {
        let start = if from_beginning {
            StartPosition::TrimHorizon
        } else {
            StartPosition::Latest
        };
        Ok(Box::new(self.reader(topic, start).await?))
    }
}

/// `weir-leases-<stream>-<group>`, cut to DynamoDB's rules.
fn default_lease_table(stream: &str, group: &str) -> String {
    let name: String = format!("weir-leases-{stream}-{group}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(255)
        .collect();
    debug_assert!(config::valid_table_name(&name));
    name
}

/// This process's name in lease tables: host, process id and start time (ms).
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        weir_engine::time::now_millis()
    )
}

async fn build_client(c: &KinesisConfig) -> Result<Client> {
    let sdk = load_sdk(c, c.endpoint_url.as_deref()).await?;
    Ok(Client::new(&sdk))
}

/// The SDK settings for `endpoint` (`None`: AWS), with `c`'s region and credentials.
async fn load_sdk(c: &KinesisConfig, endpoint: Option<&str>) -> Result<aws_config::SdkConfig> {
    use aws_config::{BehaviorVersion, Region};
    let plain = endpoint.is_some_and(|u| u.starts_with("http://"));
    let http = if plain {
        aws_smithy_http_client::Builder::new().build_http()
    } else {
        https_client()?
    };
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(c.region.clone()))
        .http_client(http);
    if let Some(ep) = endpoint {
        loader = loader.endpoint_url(ep);
    }
    if c.credentials == Credentials::Emulator {
        loader = loader.credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "weir-emulator",
            "weir-emulator",
            None,
            None,
            "weir-emulator",
        ));
    }
    Ok(loader.load().await)
}

#[cfg(feature = "tls")]
fn https_client() -> Result<aws_sdk_kinesis::config::SharedHttpClient> {
    use aws_smithy_http_client::tls;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https())
}

#[cfg(not(feature = "tls"))]
fn https_client() -> Result<aws_sdk_kinesis::config::SharedHttpClient> {
    Err(EngineError::backend(
        "kinesis",
        "this build has no TLS (cargo feature `kinesis-tls`); only http:// endpoint_url values work",
        false,
    ))
}
