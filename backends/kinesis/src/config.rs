//! `[brokers.kinesis]` settings.

use std::path::PathBuf;
use std::time::Duration;

use weir_engine::config::{Diagnostics, TableReader, Value};

/// Where a shard without a checkpoint starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still retained (`TRIM_HORIZON`).
    TrimHorizon,
    /// Only records put after the reader starts (`LATEST`).
    Latest,
    /// The first record at or after this time, in ms since the Unix epoch (`AT_TIMESTAMP`).
    AtTimestamp(i64),
}

/// Which credentials the client signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The standard AWS chain: environment, profile files, SSO-less web identity, IMDS.
    Chain,
    /// Fixed dummy credentials, for local emulators only (they accept any signature).
    Emulator,
}

/// Settings of the Kinesis backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisConfig {
    /// AWS region (`us-east-1`).
    pub region: String,
    /// Endpoint override, e.g. `http://127.0.0.1:4567` for an emulator; `None` = AWS.
    pub endpoint_url: Option<String>,
    /// Where credentials come from.
    pub credentials: Credentials,
    /// Create missing streams (with `shards` shards) and wait until they are ACTIVE.
    pub create_streams: bool,
    /// Shard count of streams this backend creates.
    pub shards: u32,
    /// Where shards without a checkpoint start.
    pub start_position: StartPosition,
    /// Folder of the checkpoint files (`<stream>-<group>.json`).
    pub checkpoint_dir: PathBuf,
    /// Pause after a GetRecords call that returned nothing.
    pub poll_interval: Duration,
    /// `Limit` of each GetRecords call (1..=10000).
    pub records_per_get: u32,
    /// Batches buffered per source between the shard readers and `recv`.
    pub buffer_batches: usize,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        KinesisConfig {
            region: "us-east-1".into(),
            endpoint_url: None,
            credentials: Credentials::Chain,
            create_streams: false,
            shards: 1,
            start_position: StartPosition::TrimHorizon,
            checkpoint_dir: PathBuf::from(".weir/kinesis-checkpoints"),
            poll_interval: Duration::from_millis(250),
            records_per_get: 1_000,
            buffer_batches: 8,
        }
    }
}

impl KinesisConfig {
    /// Reads the keys of a `[brokers.kinesis]` section, reporting problems to `d` (the
    /// engine reports unknown keys afterwards).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self {
        let mut c = KinesisConfig::default();
        let loc = &r.loc().clone();
        c.region = r.str_or(d, "region", "us-east-1");
        if c.region.is_empty() {
            d.push(loc, "brokers.kinesis.region", "must not be empty");
        }
        if let Some(n) = r.node("endpoint_url") {
            match &n.value {
                Value::Str(s) if s.starts_with("http://") || s.starts_with("https://") => {
                    c.endpoint_url = Some(s.clone())
                }
                Value::Str(s) => d.push(
                    &n.loc,
                    "brokers.kinesis.endpoint_url",
                    format!("`{s}` is not an http:// or https:// URL"),
                ),
                other => d.push(
                    &n.loc,
                    "brokers.kinesis.endpoint_url",
                    format!("expected a string, found {}", other.type_name()),
                ),
            }
        }
        if let Some(n) = r.node("credentials") {
            match &n.value {
                Value::Str(s) if s == "chain" => c.credentials = Credentials::Chain,
                Value::Str(s) if s == "emulator" => c.credentials = Credentials::Emulator,
                _ => d.push(
                    &n.loc,
                    "brokers.kinesis.credentials",
                    "expected \"chain\" (the standard AWS chain) or \"emulator\" (dummy credentials for a local emulator)",
                ),
            }
        }
        c.create_streams = r.bool_or(d, "create_streams", false);
        c.shards = r.uint_or(d, "shards", 1, 1..=1024) as u32;
        let pos = r.str_or(d, "start_position", "trim_horizon");
        let ts_node = r.node("start_timestamp");
        c.start_position = match pos.to_ascii_lowercase().as_str() {
            "trim_horizon" => StartPosition::TrimHorizon,
            "latest" => StartPosition::Latest,
            "at_timestamp" => match ts_node.map(|n| (&n.value, &n.loc)) {
                Some((Value::Str(s), l)) => match weir_engine::time::parse_datetime(s) {
                    Ok(ms) => StartPosition::AtTimestamp(ms),
                    Err(e) => {
                        d.push(l, "brokers.kinesis.start_timestamp", e);
                        StartPosition::TrimHorizon
                    }
                },
                Some((Value::Int(ms), _)) => StartPosition::AtTimestamp(*ms),
                Some((_, l)) => {
                    d.push(
                        l,
                        "brokers.kinesis.start_timestamp",
                        "expected a timestamp string or epoch milliseconds",
                    );
                    StartPosition::TrimHorizon
                }
                None => {
                    d.push(
                        loc,
                        "brokers.kinesis.start_timestamp",
                        "required when start_position = \"at_timestamp\"",
                    );
                    StartPosition::TrimHorizon
                }
            },
            other => {
                d.push(
                    loc,
                    "brokers.kinesis.start_position",
                    format!("`{other}` is not one of trim_horizon, latest, at_timestamp"),
                );
                StartPosition::TrimHorizon
            }
        };
        if let (Some(n), false) = (
            ts_node,
            matches!(c.start_position, StartPosition::AtTimestamp(_)),
        ) {
            d.push(
                &n.loc,
                "brokers.kinesis.start_timestamp",
                "only used with start_position = \"at_timestamp\"",
            );
        }
        c.checkpoint_dir =
            PathBuf::from(r.str_or(d, "checkpoint_dir", ".weir/kinesis-checkpoints"));
        c.poll_interval = r.duration_or(d, "poll_interval", Duration::from_millis(250));
        c.records_per_get = r.uint_or(d, "records_per_get", 1_000, 1..=10_000) as u32;
        c.buffer_batches = r.uint_or(d, "buffer_batches", 8, 1..=1024) as usize;
        c
    }
}
