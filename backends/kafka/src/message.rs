//! librdkafka's messages and logs as Weir's: records copied out of librdkafka's buffers,
//! headers (null values named), log lines to `tracing`.

use bytes::{Bytes, BytesMut};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use weir_engine::{Position, Record};

/// On a record read from Kafka: the JSON list of its headers that had no value (null),
/// which the record's header type cannot hold. A Kafka sink writes those back as null and
/// drops this header.
pub const HEADER_NULL_HEADERS: &str = "weir.null_headers";

const ARENA: usize = 256 * 1024;

pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(facility = fac, "librdkafka: {msg}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility = fac, "librdkafka: {msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {msg}"),
    }
}

/// Copies a message's headers out of librdkafka's buffer.
pub(crate) fn headers_of(m: &impl rdkafka::message::Message) -> Vec<weir_engine::record::Header> {
    let Some(hs) = m.headers() else {
        return Vec::new();
    };
    let mut out: Vec<weir_engine::record::Header> = hs
        .iter()
        .map(|h| {
            (
                h.key.to_string().into(),
                h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
            )
        })
        .collect();
    // Headers without a value (null) would read as empty: name them, so a dead letter
    // written to Kafka gives them back as null (see `crate::sink`).
    let nulls: Vec<&str> = hs
        .iter()
        .filter(|h| h.value.is_none())
        .map(|h| h.key)
        .collect();
    if !nulls.is_empty() {
        out.push((
            HEADER_NULL_HEADERS.into(),
            Bytes::from(serde_json::to_vec(&nulls).unwrap_or_default()),
        ));
    }
    out
}

/// Copies a message out of librdkafka's buffer. Keys and payloads are appended to `arena`
/// and split off as shared slices of it: one allocation per ~256 KiB of records instead of
/// two per record.
pub(crate) fn to_record(m: &BorrowedMessage<'_>, arena: &mut BytesMut) -> Record {
    let mut copy = |b: &[u8]| {
        if arena.capacity() - arena.len() < b.len() {
            *arena = BytesMut::with_capacity(ARENA.max(b.len()));
        }
        arena.extend_from_slice(b);
        arena.split().freeze()
    };
    let mut headers = headers_of(m);
    if m.payload().is_none() {
        // A tombstone: no value, which an empty payload cannot tell.
        headers.push((
            weir_engine::record::HEADER_NULL_VALUE.into(),
            Bytes::from_static(b"true"),
        ));
    }
    Record {
        key: m.key().map(&mut copy),
        payload: m.payload().map(&mut copy).unwrap_or_default(),
        headers,
        timestamp: m.timestamp().to_millis(),
        position: Position {
            partition: m.partition() as u32,
            offset: m.offset() as u64,
        },
    }
}
