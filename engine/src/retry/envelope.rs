//! The retry envelope: a retry record's payload is JSON that carries the original key,
//! payload, broker timestamp and source position (so it works on brokers without headers,
//! such as Kinesis), its not-before time and the history of its failures. Read back, the
//! metadata travels in the [`HEADER_RETRY`] header of the unwrapped record, which
//! [`Origin::of`](crate::origin::Origin::of) decodes once when the record enters the
//! operator.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::base64::{base64, unbase64};
use crate::record::{OutRecord, Record};

/// Header on a record read back from the retry topic: its retry metadata (JSON).
pub(crate) const HEADER_RETRY: &str = "weir.retry";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SourceRef {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AttemptLog {
    pub(crate) attempt: u32,
    pub(crate) at: String,
    pub(crate) stage: String,
    pub(crate) error: String,
}

/// What a retried record carries: how often it was retried, where it first came from, its
/// not-before time, every failure so far, and the id of the run that wrote it (0 in
/// records from before run ids; see [`Copies`](crate::replay::Copies)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) retries: u32,
    pub(crate) source: SourceRef,
    pub(crate) not_before: i64,
    #[serde(default)]
    pub(crate) run: u64,
    pub(crate) history: Vec<AttemptLog>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    meta: Meta,
    key: Option<String>,
    timestamp: Option<i64>,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
}

/// The retry metadata of a record read back from the retry topic.
pub(crate) fn meta(rec: &Record) -> Option<Meta> {
    if rec.headers.is_empty() {
        return None;
    }
    let (_, v) = rec.headers.iter().find(|(n, _)| n == HEADER_RETRY)?;
    serde_json::from_slice(v).ok()
}

/// Turns a retry-topic record back into the record that failed (with its metadata in the
/// [`HEADER_RETRY`] header) and its not-before time. A record that is not an envelope is
/// passed on as it is, due at once.
pub(crate) fn unwrap(mut rec: Record) -> (i64, Record) {
    let Ok(env) = serde_json::from_slice::<Envelope>(&rec.payload) else {
        return (i64::MIN, rec);
    };
    let b64 = env.encoding.as_deref() == Some("base64");
    let bytes = |s: String| -> Option<Bytes> {
        if b64 {
            unbase64(&s).map(Bytes::from)
        } else {
            Some(Bytes::from(s))
        }
    };
    let (Some(payload), key) = (bytes(env.payload), env.key.map(bytes)) else {
        return (i64::MIN, rec);
    };
    rec.payload = payload;
    rec.key = key.flatten().or(rec.key);
    rec.timestamp = env.timestamp;
    rec.headers.retain(|(n, _)| n != HEADER_RETRY);
    rec.headers.push((
        HEADER_RETRY.into(),
        Bytes::from(serde_json::to_vec(&env.meta).unwrap_or_default()),
    ));
    (env.meta.not_before, rec)
}

/// The retry record that carries `rec` with `meta` until `not_before` (key and payload as
/// text, or base64 when either is not UTF-8).
pub(crate) fn wrap(rec: &Record, mut meta: Meta, not_before: i64) -> OutRecord {
    meta.not_before = not_before;
    let (key, payload, encoding) = match (
        rec.key.as_deref().map(std::str::from_utf8).transpose(),
        std::str::from_utf8(&rec.payload),
    ) {
        (Ok(k), Ok(p)) => (k.map(str::to_string), p.to_string(), None),
        _ => (
            rec.key.as_deref().map(base64),
            base64(&rec.payload),
            Some("base64".to_string()),
        ),
    };
    let env = Envelope {
        meta,
        key,
        timestamp: rec.timestamp,
        payload,
        encoding,
    };
    OutRecord {
        key: rec.key.clone(),
        payload: Bytes::from(serde_json::to_vec(&env).unwrap_or_default()),
        headers: rec
            .headers
            .iter()
            .filter(|(n, _)| n != HEADER_RETRY)
            .cloned()
            .collect(),
        timestamp: rec.timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::{Input, Origin};
    use crate::record::Position;

    #[test]
    fn a_binary_record_round_trips_through_the_envelope_with_its_metadata() {
        let rec = Record {
            key: Some(Bytes::from_static(b"k\xff")),
            payload: Bytes::from_static(b"{\"a\":1}"),
            timestamp: Some(42),
            position: Position {
                partition: 2,
                offset: 7,
            },
            ..Default::default()
        };
        assert!(meta(&rec).is_none());
        let m = Meta {
            retries: 1,
            source: SourceRef {
                topic: "src".into(),
                partition: 2,
                offset: 7,
            },
            not_before: i64::MIN,
            run: 1,
            history: Vec::new(),
        };
        let out = wrap(&rec, m, 1_100);
        assert!(out.headers.iter().all(|(n, _)| n != HEADER_RETRY));
        let (due, back) = unwrap(Record {
            payload: out.payload.clone(),
            headers: out.headers.clone(),
            position: Position {
                partition: Input::Retry.partition(0),
                offset: 0,
            },
            ..Default::default()
        });
        assert_eq!(due, 1_100);
        assert_eq!(back.payload, rec.payload);
        assert_eq!(back.key, rec.key);
        assert_eq!(back.timestamp, Some(42));
        let origin = Origin::of(&back);
        assert_eq!(origin.attempts(), 1);
        assert_eq!(origin.source_partition(), 2);
        assert_eq!(origin.reported("other"), ("src", 2, 7));
    }

    #[test]
    fn a_record_that_is_not_an_envelope_is_due_at_once_and_unchanged() {
        let rec = Record {
            payload: Bytes::from_static(b"not json"),
            ..Default::default()
        };
        let (due, back) = unwrap(rec.clone());
        assert_eq!(due, i64::MIN);
        assert_eq!(back.payload, rec.payload);
    }
}
