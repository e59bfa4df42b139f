//! The sink: one transaction per batch, acknowledged after its commit.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use weir_engine::record::OutRecord;
use weir_engine::{EngineError, Result, Sink};

use crate::config::PostgresConfig;
use crate::error::PostgresError;
use crate::table::{ColType, Layout};

const BACKEND: &str = "postgres";

/// Window results upserted into a PostgreSQL table. [`send`](Sink::send) returns once the
/// batch's transaction has committed; a failed batch leaves the sink disconnected, and the
/// runtime's retry (the same batch again) reconnects first.
pub struct PostgresSink {
    config: PostgresConfig,
    layout: Layout,
    name: String,
    conn: Option<(Client, Statement)>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("table", &self.config.table)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl PostgresSink {
    /// Connects, creates the table if it is missing and checks that it fits `layout`
    /// (one attempt: an unreachable server is a retryable error, a table that does not fit
    /// is not).
    pub async fn open(config: PostgresConfig, layout: Layout) -> Result<PostgresSink> {
        let name = format!("postgres table {}", config.table);
        let mut sink = PostgresSink {
            config,
            layout,
            name,
            conn: None,
        };
        sink.connect().await.map_err(err)?;
        tracing::info!(table = %sink.config.table, "writing results to PostgreSQL");
        Ok(sink)
    }

    async fn connect(&mut self) -> std::result::Result<(), PostgresError> {
        let (table, timeout) = (self.config.table.clone(), self.config.timeout);
        let (client, connection) = within(
            timeout,
            "connecting to PostgreSQL",
            self.config.connect.connect(NoTls),
        )
        .await?
        .map_err(|e| PostgresError::db("connecting to PostgreSQL", e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        let create = self.layout.create_sql(&table);
        match within(timeout, "creating the table", client.batch_execute(&create)).await? {
            Ok(()) => {}
            // Two instances creating it at once: one wins, the other finds it made.
            Err(e)
                if e.code()
                    .is_some_and(|c| c.code() == "42P07" || c.code() == "23505") => {}
            Err(e) => return Err(PostgresError::db(format!("creating table {table}"), e)),
        }
        let rows = within(
            timeout,
            "reading the table's columns",
            client.query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef \
                 FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
                 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&crate::table::table_ident(&table)],
            ),
        )
        .await?
        .map_err(|e| PostgresError::db(format!("reading the columns of {table}"), e))?;
        let found: Vec<(String, String, bool, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        self.layout.check(&table, &found)?;
        // The upsert's ON CONFLICT needs a unique index on exactly the key columns (the
        // server finds out only when it plans the first upsert).
        let indexes = within(
            timeout,
            "reading the table's unique indexes",
            client.query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL \
                 AND i.indexprs IS NULL GROUP BY i.indexrelid",
                &[&crate::table::table_ident(&table)],
            ),
        )
        .await?
        .map_err(|e| PostgresError::db(format!("reading the indexes of {table}"), e))?;
        let mut keys = self.layout.key_names();
        keys.sort();
        if !indexes.iter().any(|r| r.get::<_, Vec<String>>(0) == keys) {
            return Err(self.layout.no_unique_key(&table));
        }
        let upsert = self.layout.upsert_sql(&table);
        let statement =
            match within(timeout, "preparing the upsert", client.prepare(&upsert)).await? {
                Ok(s) => s,
                // 42P10: no unique index matches the ON CONFLICT columns.
                Err(e) if e.code().is_some_and(|c| c.code() == "42P10") => {
                    return Err(self.layout.no_unique_key(&table))
                }
                Err(e) => {
                    return Err(PostgresError::db(
                        format!("preparing the upsert into {table}"),
                        e,
                    ))
                }
            };
        self.conn = Some((client, statement));
        Ok(())
    }

    /// The batch as one text array per column, the last result of each key and window
    /// only (an upsert may not touch a row twice).
    fn columns(
        &self,
        batch: &[OutRecord],
    ) -> std::result::Result<Vec<Vec<Option<String>>>, PostgresError> {
        let cols = &self.layout.columns;
        let mut out: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(batch.len()); cols.len()];
        let mut row_of: HashMap<String, usize> = HashMap::with_capacity(batch.len());
        for rec in batch {
            let obj: serde_json::Map<String, Value> = serde_json::from_slice(&rec.payload)
                .map_err(|e| {
                    PostgresError::Result(format!("a result is not a JSON object: {e}"))
                })?;
            let mut row = Vec::with_capacity(cols.len());
            let mut key = String::new();
            for c in cols {
                let v = match (obj.get(&c.name), c.ty) {
                    (None, _) => {
                        return Err(PostgresError::Result(format!(
                            "a result has no field `{}`: {}",
                            c.name,
                            String::from_utf8_lossy(&rec.payload)
                        )))
                    }
                    (Some(Value::Null), ColType::Text) => Some("null".to_string()),
                    (Some(Value::Null), _) => None,
                    (Some(Value::String(s)), _) => Some(s.clone()),
                    (Some(v), _) => Some(v.to_string()),
                };
                if c.key {
                    key.push_str(v.as_deref().unwrap_or_default());
                    key.push('\u{1f}');
                }
                row.push(v);
            }
            match row_of.get(&key) {
                Some(&i) => {
                    for (col, v) in out.iter_mut().zip(row) {
                        col[i] = v;
                    }
                }
                None => {
                    row_of.insert(key, out[0].len());
                    for (col, v) in out.iter_mut().zip(row) {
                        col.push(v);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        cols: &[Vec<Option<String>>],
    ) -> std::result::Result<(), PostgresError> {
        if self.conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.conn = None;
            self.connect().await?;
        }
        let timeout = self.config.timeout;
        let (client, statement) = self.conn.as_mut().expect("connected above");
        let params: Vec<&(dyn ToSql + Sync)> =
            cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let statement = statement.clone();
        within(timeout, "writing a batch of results", async {
            let tx = client
                .transaction()
                .await
                .map_err(|e| PostgresError::db("BEGIN", e))?;
            tx.execute(&statement, &params)
                .await
                .map_err(|e| PostgresError::db("upserting results", e))?;
            // Acknowledged only from here: the commit has been answered.
            tx.commit()
                .await
                .map_err(|e| PostgresError::db("COMMIT", e))
        })
        .await?
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let cols = self.columns(batch).map_err(err)?;
        let written = self.write(&cols).await;
        if let Err(e) = &written {
            if weir_engine::error::Retryable::is_retryable(e) {
                // Reconnect on the retry: the transaction may have died with its connection.
                self.conn = None;
            }
        }
        written.map_err(err)
    }
}

fn err(e: PostgresError) -> EngineError {
    EngineError::from_backend(BACKEND, e)
}

/// `f`, or a retryable timeout after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = T>,
) -> std::result::Result<T, PostgresError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PostgresError::Timeout(what.to_string(), limit))
}
