//! `[brokers.kinesis]` settings.

use std::path::PathBuf;
use std::time::Duration;

use weir_engine::config::{Diagnostics, Node, TableReader, Value};

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

/// Shard leases in a DynamoDB table (the Kinesis Client Library's model), for several
/// instances of one pipeline sharing a stream's shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The lease table; `None`: `weir-leases-<stream>-<group>`.
    pub table: Option<String>,
    /// DynamoDB endpoint override (an emulator); `None` = AWS, same region and
    /// credentials as Kinesis.
    pub endpoint_url: Option<String>,
    /// How long a lease whose counter does not move stays its owner's (the KCL's
    /// failover time); owners renew every third of it.
    pub duration: Duration,
    /// Create the lease table when it does not exist.
    pub create_table: bool,
    /// This instance's name in the table; `None`: host name, process id and start time.
    pub worker_id: Option<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            table: None,
            endpoint_url: None,
            duration: Duration::from_secs(10),
            create_table: false,
            worker_id: None,
        }
    }
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
    /// Shard leases in DynamoDB (`leases = "dynamodb"`); `None`: checkpoint files, one
    /// instance per (stream, group).
    pub leases: Option<LeaseConfig>,
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
            leases: None,
        }
    }
}

impl KinesisConfig {
    /// Reads the keys of a `[brokers.kinesis]` section, reporting problems to `d` (the
    /// engine reports unknown keys afterwards).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Self {
        let mut c = KinesisConfig::default();
        let loc = &r.loc().clone();
        let region_loc = r
            .node("region")
            .map_or_else(|| loc.clone(), |n| n.loc.clone());
        c.region = r.str_or(d, "region", "us-east-1");
        if c.region.is_empty() {
            d.push(&region_loc, "brokers.kinesis.region", "must not be empty");
        }
        if let Some(n) = r.node("endpoint_url") {
            c.endpoint_url = url(n, "brokers.kinesis.endpoint_url", d);
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
        let pos_loc = r
            .node("start_position")
            .map_or_else(|| loc.clone(), |n| n.loc.clone());
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
                        &pos_loc,
                        "brokers.kinesis.start_timestamp",
                        "required when start_position = \"at_timestamp\"",
                    );
                    StartPosition::TrimHorizon
                }
            },
            other => {
                d.push(
                    &pos_loc,
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
        c.leases = read_leases(r, d);
        c
    }
}

/// An http:// or https:// URL setting.
fn url(n: &Node, key: &str, d: &mut Diagnostics) -> Option<String> {
    match &n.value {
        Value::Str(s) if s.starts_with("http://") || s.starts_with("https://") => Some(s.clone()),
        Value::Str(s) => {
            d.push(
                &n.loc,
                key,
                format!("`{s}` is not an http:// or https:// URL"),
            );
            None
        }
        other => {
            d.push(
                &n.loc,
                key,
                format!("expected a string, found {}", other.type_name()),
            );
            None
        }
    }
}

/// `leases` and the keys that go with `leases = "dynamodb"`.
fn read_leases(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Option<LeaseConfig> {
    let mode = r.node("leases");
    let dynamodb = match mode.map(|n| (&n.value, &n.loc)) {
        None => false,
        Some((Value::Str(s), _)) if s == "files" => false,
        Some((Value::Str(s), _)) if s == "dynamodb" => true,
        Some((_, l)) => {
            d.push(
                l,
                "brokers.kinesis.leases",
                "expected \"files\" (checkpoint files, one instance) or \"dynamodb\" (shard leases in a DynamoDB table, several instances)",
            );
            false
        }
    };
    let mut c = LeaseConfig::default();
    let mut given = Vec::new();
    if let Some(n) = r.node("lease_table") {
        given.push(("lease_table", n.loc.clone()));
        match &n.value {
            Value::Str(s) if valid_table_name(s) => c.table = Some(s.clone()),
            Value::Str(s) => d.push(
                &n.loc,
                "brokers.kinesis.lease_table",
                format!("`{s}` is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"),
            ),
            other => d.push(
                &n.loc,
                "brokers.kinesis.lease_table",
                format!("expected a string, found {}", other.type_name()),
            ),
        }
    }
    if let Some(n) = r.node("dynamodb_endpoint_url") {
        given.push(("dynamodb_endpoint_url", n.loc.clone()));
        c.endpoint_url = url(n, "brokers.kinesis.dynamodb_endpoint_url", d);
    }
    if let Some(n) = r.node("lease_duration") {
        given.push(("lease_duration", n.loc.clone()));
        c.duration = r.duration_or(d, "lease_duration", c.duration);
        if c.duration < Duration::from_secs(1) || c.duration > Duration::from_secs(3600) {
            d.push(
                &n.loc,
                "brokers.kinesis.lease_duration",
                "must be between 1s and 1h",
            );
        }
    }
    if let Some(n) = r.node("create_lease_table") {
        given.push(("create_lease_table", n.loc.clone()));
        c.create_table = r.bool_or(d, "create_lease_table", false);
    }
    if let Some(n) = r.node("worker_id") {
        given.push(("worker_id", n.loc.clone()));
        match &n.value {
            Value::Str(s) if !s.is_empty() && s.len() <= 256 => c.worker_id = Some(s.clone()),
            _ => d.push(
                &n.loc,
                "brokers.kinesis.worker_id",
                "expected a non-empty string of at most 256 bytes",
            ),
        }
    }
    if dynamodb {
        return Some(c);
    }
    for (key, loc) in given {
        d.push(
            &loc,
            &format!("brokers.kinesis.{key}"),
            "only used with leases = \"dynamodb\"",
        );
    }
    None
}

/// DynamoDB's rule for table names.
pub(crate) fn valid_table_name(s: &str) -> bool {
    (3..=255).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}
