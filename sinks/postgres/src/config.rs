//! `[sink] type = "postgres"`: its settings, each problem at its `file:line:col`.

use std::time::Duration;

use weir_engine::config::{Diagnostics, TableReader};

/// The settings of a PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The connection string as given (`postgresql://user@host:port/db` or
    /// `host=… port=… user=… dbname=…`).
    pub url: String,
    /// The parsed connection settings.
    pub connect: tokio_postgres::Config,
    /// The table, `name` or `schema.name` (created if missing).
    pub table: String,
    /// How long one step (connecting, one batch's transaction) may take before it counts
    /// as failed and is retried.
    pub timeout: Duration,
}

impl PostgresConfig {
    /// Reads `url`, `table` and `timeout` from the `[sink]` table (the caller reports the
    /// keys not asked for).
    pub fn read(r: &mut TableReader<'_>, d: &mut Diagnostics) -> PostgresConfig {
        let url_loc = r.node("url").map(|n| n.loc.clone());
        let url = r.req_str(d, "url").unwrap_or_default().to_string();
        let mut connect = tokio_postgres::Config::new();
        if let Some(loc) = &url_loc {
            match url.parse::<tokio_postgres::Config>() {
                Ok(c) if c.get_ssl_mode() == tokio_postgres::config::SslMode::Require => d.push(
                    loc,
                    "sink.url",
                    "sslmode=require: this build has no TLS for PostgreSQL (connect over loopback or a Unix socket, or use sslmode=disable)",
                ),
                Ok(c) => connect = c,
                Err(e) => d.push(
                    loc,
                    "sink.url",
                    format!("not a PostgreSQL connection string ({e}); e.g. postgresql://weir@127.0.0.1:5432/weir"),
                ),
            }
        }
        let table_loc = r.node("table").map(|n| n.loc.clone());
        let table = r.req_str(d, "table").unwrap_or_default().to_string();
        if let Some(loc) = &table_loc {
            if let Err(e) = check_table_name(&table) {
                d.push(loc, "sink.table", e);
            }
        }
        let timeout = r.duration_or(d, "timeout", Duration::from_secs(30));
        if timeout.is_zero() {
            if let Some(n) = r.node("timeout") {
                d.push(&n.loc, "sink.timeout", "must be more than 0");
            }
        }
        connect.connect_timeout(timeout.min(Duration::from_secs(10)));
        if connect.get_application_name().is_none() {
            connect.application_name("weir");
        }
        PostgresConfig {
            url,
            connect,
            table,
            timeout,
        }
    }
}

/// A table name Weir can quote without surprises: `name` or `schema.name`, each part
/// letters, digits and `_`, not starting with a digit, at most 63 bytes.
fn check_table_name(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if parts.len() <= 2 && parts.iter().all(|p| ok(p)) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a table name Weir accepts: use `name` or `schema.name`, letters, digits and _ (at most 63 each)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check_table_name;

    #[test]
    fn table_names() {
        assert!(check_table_name("user_activity_stats").is_ok());
        assert!(check_table_name("analytics.stats_1").is_ok());
        for bad in ["", "a.b.c", "1stats", "stats;drop", "a b", ".x"] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }
}
