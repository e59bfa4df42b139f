//! Enrichment: a keyed table fed from another topic (the latest value per key), joined
//! into each event before it is windowed. An event whose key is not in the table yet is a
//! *recoverable* failure of the `enrich` stage (retried when its strategy is `retry`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use crate::config::EnrichConfig;
use crate::config::STAGE_ENRICH;
use crate::decode::{write_json_str, Decoder, Schema, TimeSource, Val};
use crate::error::Result;
use crate::processor::{Processor, Rejected};
use crate::record::Record;
use crate::source::{Received, Source};

/// A table of the latest JSON value per key.
#[derive(Debug, Default)]
pub struct Table {
    rows: RwLock<HashMap<Bytes, Bytes>>,
}

impl Table {
    /// The value stored for `key`.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.rows.read().ok()?.get(key).cloned()
    }

    /// How many keys the table holds.
    pub fn len(&self) -> usize {
        self.rows.read().map_or(0, |r| r.len())
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, batch: Vec<(Bytes, Bytes)>) {
        if let Ok(mut rows) = self.rows.write() {
            for (k, v) in batch {
                rows.insert(k, v);
            }
        }
    }
}

/// Reads the key field of a JSON payload as the bytes tables are keyed by: a string's
/// text, or a number's or boolean's JSON form.
struct KeyReader {
    decoder: Decoder,
    slot: usize,
}

impl KeyReader {
    fn new(path: &str) -> Self {
        Self::validating(
            path,
            &Schema::default(),
            &TimeSource::Processing,
            usize::MAX,
        )
    }

    /// A reader that also checks the event against the pipeline's schema, time field and
    /// payload limit: an event that fails them yields an error.
    fn validating(path: &str, schema: &Schema, time: &TimeSource, max_payload: usize) -> Self {
        let mut decoder = Decoder::new(schema, time, max_payload);
        let slot = decoder.want(path);
        KeyReader { decoder, slot }
    }

    fn key(&self, payload: &[u8]) -> std::result::Result<Option<Vec<u8>>, String> {
        let ev = self.decoder.decode(payload)?;
        Ok(match &ev.values[self.slot] {
            Val::Str(s) => Some(s.as_bytes().to_vec()),
            v @ (Val::Int(_) | Val::Float(_) | Val::Bool(_)) => {
                let mut out = Vec::new();
                v.write_json(&mut out);
                Some(out)
            }
            _ => None,
        })
    }
}

/// Keeps `table` up to date from `source` until `stop`: each record's `table_key` field
/// keys its payload (a JSON object); records without it are logged and ignored. Returns
/// after the first time the source has nothing more to give when `caught_up` is set, so a
/// pipeline can start with the table loaded, and otherwise follows until `stop`.
pub async fn follow(
    table: Arc<Table>,
    source: &mut dyn Source,
    table_key: &str,
    caught_up: bool,
    stop: &CancellationToken,
) -> Result<()> {
    let reader = KeyReader::new(table_key);
    let wait = Duration::from_millis(if caught_up { 500 } else { 200 });
    let mut seen_any = false;
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = source.recv(4096, wait) => r?,
        };
        match r {
            Received::Batch(b) if b.is_empty() => {
                if caught_up && seen_any {
                    return Ok(());
                }
                seen_any = true;
            }
            Received::Batch(b) => {
                seen_any = true;
                let mut rows = Vec::with_capacity(b.len());
                for rec in b {
                    match reader.key(&rec.payload) {
                        Ok(Some(k)) => rows.push((Bytes::from(k), rec.payload)),
                        Ok(None) => tracing::warn!(
                            partition = rec.position.partition,
                            offset = rec.position.offset,
                            "table record without `{table_key}`; ignored"
                        ),
                        Err(e) => tracing::warn!(
                            partition = rec.position.partition,
                            offset = rec.position.offset,
                            "table record ignored: {e}"
                        ),
                    }
                }
                table.apply(rows);
            }
            Received::End => return Ok(()),
            Received::Assigned(_) | Received::Revoked(_) => {}
        }
    }
}

/// The enrichment processor (stage `enrich`): adds the table's value for each event's key
/// under `into`, or rejects the event as recoverable when the key is not in the table yet.
/// Events that fail the pipeline's validation pass unchanged (validation dead-letters them
/// with its reason and their original payload); they are never retried.
pub struct Enricher {
    cfg: EnrichConfig,
    table: Arc<Table>,
    reader: KeyReader,
    field: Vec<u8>,
}

impl Enricher {
    /// An enricher joining `table` as `cfg` says, for events of `job` (whose schema, time
    /// field and payload limit it checks first).
    pub fn new(cfg: EnrichConfig, table: Arc<Table>, job: &crate::Job) -> Self {
        let mut field = Vec::new();
        write_json_str(&mut field, &cfg.into);
        field.push(b':');
        Enricher {
            reader: KeyReader::validating(&cfg.key, &job.schema, &job.time, job.max_payload_bytes),
            cfg,
            table,
            field,
        }
    }

    /// `payload` (a JSON object) with `"into": value` added as its last member, or `None`
    /// when it is not an object.
    fn join(&self, payload: &[u8], value: &[u8]) -> Option<Bytes> {
        let start = payload.iter().position(|b| !b.is_ascii_whitespace())?;
        let end = payload.iter().rposition(|b| !b.is_ascii_whitespace())?;
        if payload[start] != b'{' || payload[end] != b'}' {
            return None;
        }
        let empty = payload[start + 1..end]
            .iter()
            .all(|b| b.is_ascii_whitespace());
        let mut out = Vec::with_capacity(payload.len() + self.field.len() + value.len() + 2);
        out.extend_from_slice(&payload[..end]);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(&self.field);
        out.extend_from_slice(value);
        out.push(b'}');
        Some(Bytes::from(out))
    }
}

#[async_trait]
impl Processor for Enricher {
    fn name(&self) -> &str {
        STAGE_ENRICH
    }

    async fn process(
        &mut self,
        batch: &mut Vec<Record>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<()> {
        let mut keep = Vec::with_capacity(batch.len());
        for mut rec in batch.drain(..) {
            // Events that are not JSON objects, or lack the key, are left for validation
            // to dead-letter with its own reason.
            let key = match self.reader.key(&rec.payload) {
                Ok(Some(k)) => k,
                _ => {
                    keep.push(rec);
                    continue;
                }
            };
            match self.table.get(&key) {
                Some(value) => {
                    if let Some(joined) = self.join(&rec.payload, &value) {
                        rec.payload = joined;
                    }
                    keep.push(rec);
                }
                None => {
                    let reason = format!(
                        "no `{}` entry for {} {} yet",
                        self.cfg.table,
                        self.cfg.key,
                        String::from_utf8_lossy(&key)
                    );
                    rejected.push(Rejected::recoverable(rec, reason));
                }
            }
        }
        *batch = keep;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enricher(table: Arc<Table>) -> Enricher {
        let job = crate::Job::tumbling_count("user_id", "timestamp", Duration::from_secs(10))
            .with_schema(Schema::seed_event());
        Enricher::new(
            EnrichConfig {
                table: "profiles".into(),
                key: "user_id".into(),
                table_key: "user_id".into(),
                into: "profile".into(),
            },
            table,
            &job,
        )
    }

    fn event(user: &str, event_type: &str) -> Record {
        Record {
            payload: Bytes::from(format!(
                r#"{{"event_type":"{event_type}","user_id":"{user}","action":"a","timestamp":"2024-06-27 15:00:00.000"}} "#
            )),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn joins_known_keys_and_rejects_unknown_ones_as_recoverable() {
        let table = Arc::new(Table::default());
        table.apply(vec![(
            Bytes::from_static(b"u1"),
            Bytes::from_static(b"{\"user_id\":\"u1\",\"country\":\"NL\"}"),
        )]);
        let mut e = enricher(table);
        let invalid = event("u2", "hover");
        let mut batch = vec![
            event("u1", "click"),
            event("u2", "click"),
            Record {
                payload: Bytes::from_static(b"not json"),
                ..Default::default()
            },
            invalid.clone(),
        ];
        let mut rejected = Vec::new();
        e.process(&mut batch, &mut rejected).await.unwrap();
        assert_eq!(batch.len(), 3);
        let v: serde_json::Value = serde_json::from_slice(&batch[0].payload).unwrap();
        assert_eq!(v["profile"]["country"], "NL");
        assert_eq!(v["event_type"], "click");
        // Invalid events are left to validation, unchanged, even when their key is unknown.
        assert_eq!(&batch[1].payload[..], b"not json");
        assert_eq!(batch[2].payload, invalid.payload);
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].recoverable);
        assert_eq!(rejected[0].reason, "no `profiles` entry for user_id u2 yet");
    }

    #[test]
    fn joins_into_an_empty_object() {
        let e = enricher(Arc::new(Table::default()));
        assert_eq!(
            &e.join(b" { } ", b"1").unwrap()[..],
            b" { \"profile\":1}".as_slice()
        );
        assert!(e.join(b"[1]", b"1").is_none());
    }
}
