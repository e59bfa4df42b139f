//! `[sink] type = "redis"`: its settings, each problem at its `file:line:col`.

use std::time::Duration;

use weir_engine::config::{Diagnostics, TableReader};

/// The settings of a Redis sink.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The server, `redis://[user:password@]host:port/db`.
    pub url: String,
    /// The prefix of every key written (`PREFIX:ID`, `PREFIX:windows`).
    pub prefix: String,
    /// How long one step (connecting, one batch) may take before it counts as failed and
    /// is retried.
    pub timeout: Duration,
}

impl RedisConfig {
    /// Reads `url`, `prefix` and `timeout` from the `[sink]` table (the caller reports the
    /// keys not asked for).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> RedisConfig {
        let url_loc = r.node("url").map(|n| n.loc.clone());
        let url = r.req_str(d, "url").unwrap_or_default().to_string();
        if let Some(loc) = &url_loc {
            match redis::Client::open(url.as_str()) {
                Ok(_) if url.starts_with("rediss://") => d.push(
                    loc,
                    "sink.url",
                    "rediss://: this build has no TLS for Redis (connect over loopback, or use redis://)",
                ),
                Ok(_) => {}
                Err(e) => d.push(
                    loc,
                    "sink.url",
                    format!("not a Redis URL ({e}); e.g. redis://127.0.0.1:6379/0"),
                ),
            }
        }
        let prefix_loc = r.node("prefix").map(|n| n.loc.clone());
        let prefix = r.req_str(d, "prefix").unwrap_or_default().to_string();
        if let Some(loc) = &prefix_loc {
            if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
                d.push(
                    loc,
                    "sink.prefix",
                    format!("`{prefix}`: a key prefix must be non-empty, without spaces or control characters"),
                );
            }
        }
        let timeout = r.duration_or(d, "timeout", Duration::from_secs(30));
        if timeout.is_zero() {
            if let Some(n) = r.node("timeout") {
                d.push(&n.loc, "sink.timeout", "must be more than 0");
            }
        }
        RedisConfig {
            url,
            prefix,
            timeout,
        }
    }
}
