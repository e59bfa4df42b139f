//! The Kinesis sink: PutRecords in batches within the API limits.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use weir_engine::backoff::Backoff;
use weir_engine::record::fnv1a;
use weir_engine::{EngineError, OutRecord, Result, Sink};

use crate::error::KinesisError;

/// Records per PutRecords request (API limit).
pub const MAX_RECORDS_PER_PUT: usize = 500;
/// Bytes per PutRecords request, data plus partition keys (API limit: 5 MiB).
pub const MAX_BYTES_PER_PUT: usize = 5 * 1024 * 1024;
/// Bytes per record, data plus partition key (API limit: 1 MiB).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Attempts at the failed entries of one request before giving up with a retryable error.
const MAX_ATTEMPTS: u32 = 12;

/// A producer to one stream.
#[derive(Debug)]
pub struct KinesisSink {
    client: Client,
    endpoint: String,
    stream: String,
}

impl KinesisSink {
    pub(crate) fn new(client: Client, endpoint: String, stream: String) -> Self {
        KinesisSink {
            client,
            endpoint,
            stream,
        }
    }

    /// Puts `entries` (one request's worth), retrying only the entries that failed.
    async fn put(&self, mut entries: Vec<PutRecordsRequestEntry>) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        for attempt in 1..=MAX_ATTEMPTS {
            let out = match self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries.clone()))
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let e = KinesisError::from_sdk("PutRecords", &self.endpoint, e);
                    if matches!(e, KinesisError::Throttled { .. }) && attempt < MAX_ATTEMPTS {
                        pause(&mut backoff).await;
                        continue;
                    }
                    return Err(e.into());
                }
            };
            if out.failed_record_count().unwrap_or(0) == 0 {
                return Ok(());
            }
            let failed: Vec<PutRecordsRequestEntry> = entries
                .into_iter()
                .zip(out.records())
                .filter(|(_, r)| r.error_code().is_some())
                .map(|(e, _)| e)
                .collect();
            let code = out
                .records()
                .iter()
                .find_map(|r| r.error_code())
                .unwrap_or("unknown")
                .to_string();
            tracing::debug!(stream = %self.stream, failed = failed.len(), %code, attempt, "PutRecords partly failed; retrying the failed entries");
            entries = failed;
            if attempt == MAX_ATTEMPTS {
                return Err(EngineError::backend(
                    "kinesis",
                    format!(
                        "PutRecords to `{}`: {} records still failing after {MAX_ATTEMPTS} attempts ({code})",
                        self.stream,
                        entries.len()
                    ),
                    true,
                ));
            }
            pause(&mut backoff).await;
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// Waits for the next delay of `backoff` (which has no give-up time).
async fn pause(backoff: &mut Backoff) {
    if let Some(delay) = backoff.next_delay() {
        tokio::time::sleep(delay).await;
    }
}

/// The partition key of a record: its key (up to 256 characters), else a hash of the
/// payload, so keyless records still spread over shards deterministically.
pub fn partition_key(r: &OutRecord) -> String {
    if let Some(k) = r.key.as_deref().filter(|k| !k.is_empty()) {
        if let Ok(s) = std::str::from_utf8(k) {
            if s.chars().count() <= 256 {
                return s.to_string();
            }
        }
        return format!("h{:016x}", fnv1a(k));
    }
    format!("h{:016x}", fnv1a(&r.payload))
}

#[async_trait]
impl Sink for KinesisSink {
    fn name(&self) -> &str {
        &self.stream
    }

    async fn send(&mut self, batch: &[OutRecord]) -> Result<()> {
        let mut entries = Vec::with_capacity(batch.len().min(MAX_RECORDS_PER_PUT));
        let mut bytes = 0usize;
        for (i, r) in batch.iter().enumerate() {
            let key = partition_key(r);
            // A dead letter or late record never fails for its size: it is cut to fit
            // (Kinesis counts data + partition key; Weir's headers are not sent).
            let fitted = weir_engine::output::fit_to(
                r,
                MAX_RECORD_BYTES - key.len() + weir_engine::output::record_size(r)
                    - r.payload.len(),
            );
            if fitted.is_some() {
                tracing::warn!(stream = %self.stream, bytes = r.payload.len() + key.len(), limit = MAX_RECORD_BYTES, "record cut to fit Kinesis' record size limit (payload_truncated in its envelope)");
            }
            let r = fitted.as_ref().unwrap_or(r);
            let size = r.payload.len() + key.len();
            if size > MAX_RECORD_BYTES {
                return Err(KinesisError::Invalid(format!(
                    "record {i} of the batch to `{}` is {size} bytes (payload + partition key), over Kinesis' limit of {MAX_RECORD_BYTES}",
                    self.stream
                ))
                .into());
            }
            if entries.len() == MAX_RECORDS_PER_PUT || bytes + size > MAX_BYTES_PER_PUT {
                self.put(std::mem::take(&mut entries)).await?;
                bytes = 0;
            }
            bytes += size;
            entries.push(
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.payload.to_vec()))
                    .partition_key(key)
                    .build()
                    .expect("data and partition key are set"),
            );
        }
        if !entries.is_empty() {
            self.put(entries).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn partition_key_is_the_key_or_a_hash() {
        let r = OutRecord {
            key: Some(Bytes::from_static(b"User1")),
            payload: Bytes::from_static(b"{}"),
            ..Default::default()
        };
        assert_eq!(partition_key(&r), "User1");
        let keyless = OutRecord {
            payload: Bytes::from_static(b"{}"),
            ..Default::default()
        };
        assert_eq!(partition_key(&keyless), partition_key(&keyless.clone()));
        assert!(partition_key(&keyless).len() <= 256);
        let long = OutRecord {
            key: Some(Bytes::from(vec![b'k'; 300])),
            ..Default::default()
        };
        assert!(partition_key(&long).len() <= 256);
    }
}
