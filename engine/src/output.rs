//! Encoding window results and dead letters.

use bytes::Bytes;

use crate::config::AggFn;
use crate::record::{
    OutRecord, Record, HEADER_ERROR, HEADER_ID, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
};
use crate::time::write_rfc3339;
use crate::window::{Acc, WindowRange};

/// Separates the JSON texts of key parts inside an encoded group key. JSON text never
/// contains a raw 0x1F byte, so the encoding is unambiguous.
pub const KEY_SEP: u8 = 0x1f;

/// Writes window results as JSON records.
#[derive(Debug, Clone)]
pub struct ResultEncoder {
    key_names: Vec<String>,
    aggs: Vec<(AggFn, String)>,
}

impl ResultEncoder {
    /// An encoder naming the key fields and aggregates as configured.
    pub fn new(group_by: &[String], aggs: &[AggFn]) -> Self {
        ResultEncoder {
            key_names: group_by.to_vec(),
            aggs: aggs.iter().map(|a| (a.clone(), a.output_name())).collect(),
        }
    }

    /// One result record: `{"user_id": "User3", "window_start": ..., "window_end": ...,
    /// "count": 42}`, keyed by the group key, with its deterministic id in a header.
    pub fn encode(&self, window: WindowRange, key: &[u8], acc: &Acc) -> OutRecord {
        let mut out = Vec::with_capacity(96 + key.len());
        out.push(b'{');
        for (name, part) in self.key_names.iter().zip(key.split(|b| *b == KEY_SEP)) {
            crate::decode::write_json_str(&mut out, name);
            out.push(b':');
            out.extend_from_slice(part);
            out.push(b',');
        }
        let mut t = String::with_capacity(64);
        t.push_str("\"window_start\":\"");
        write_rfc3339(&mut t, window.start);
        t.push_str("\",\"window_end\":\"");
        write_rfc3339(&mut t, window.end);
        t.push('"');
        out.extend_from_slice(t.as_bytes());
        for (agg, name) in &self.aggs {
            out.push(b',');
            crate::decode::write_json_str(&mut out, name);
            out.push(b':');
            match agg {
                AggFn::Count => out.extend_from_slice(acc.count.to_string().as_bytes()),
            }
        }
        out.push(b'}');
        let display = key_display(key);
        let mut id = display.clone();
        id.push('@');
        write_rfc3339(&mut id, window.start);
        OutRecord {
            key: Some(Bytes::from(display)),
            payload: Bytes::from(out),
            headers: vec![(HEADER_ID.to_string(), Bytes::from(id))],
            timestamp: Some(window.start),
        }
    }
}

/// The human form of an encoded group key: string parts unquoted, joined by `|`.
pub fn key_display(key: &[u8]) -> String {
    let mut s = String::with_capacity(key.len());
    for (i, part) in key.split(|b| *b == KEY_SEP).enumerate() {
        if i > 0 {
            s.push('|');
        }
        if part.first() == Some(&b'"') {
            match serde_json::from_slice::<String>(part) {
                Ok(v) => s.push_str(&v),
                Err(_) => s.push_str(&String::from_utf8_lossy(part)),
            }
        } else {
            s.push_str(&String::from_utf8_lossy(part));
        }
    }
    s
}

/// Builds the dead letter for `record` from `topic`: a JSON envelope
/// `{"error", "source": {topic, partition, offset}, "payload"}` (payload as text, or base64
/// with `"payload_encoding": "base64"` when it is not UTF-8), keeping the original key and
/// headers and adding `weir.error` / `weir.source.*` headers.
pub fn dead_letter(topic: &str, record: &Record, reason: &str) -> OutRecord {
    let mut env = serde_json::Map::new();
    env.insert("error".into(), reason.into());
    env.insert(
        "source".into(),
        serde_json::json!({
            "topic": topic,
            "partition": record.position.partition,
            "offset": record.position.offset,
        }),
    );
    match std::str::from_utf8(&record.payload) {
        Ok(text) => {
            env.insert("payload".into(), text.into());
        }
        Err(_) => {
            env.insert("payload".into(), base64(&record.payload).into());
            env.insert("payload_encoding".into(), "base64".into());
        }
    }
    if let Some(k) = &record.key {
        env.insert("key".into(), String::from_utf8_lossy(k).into_owned().into());
    }
    let payload = serde_json::to_vec(&serde_json::Value::Object(env)).unwrap_or_default();
    let mut headers = record.headers.clone();
    headers.push((HEADER_ERROR.into(), Bytes::copy_from_slice(reason.as_bytes())));
    headers.push((HEADER_SOURCE_TOPIC.into(), Bytes::copy_from_slice(topic.as_bytes())));
    headers.push((
        HEADER_SOURCE_PARTITION.into(),
        Bytes::from(record.position.partition.to_string()),
    ));
    headers.push((
        HEADER_SOURCE_OFFSET.into(),
        Bytes::from(record.position.offset.to_string()),
    ));
    OutRecord {
        key: record.key.clone(),
        payload: Bytes::from(payload),
        headers,
        timestamp: record.timestamp,
    }
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn result_record_shape() {
        let enc = ResultEncoder::new(&["user_id".into()], &[AggFn::Count]);
        let r = enc.encode(
            WindowRange { start: 1_719_500_400_000, end: 1_719_500_410_000 },
            br#""User3""#,
            &Acc { count: 42, partition: 0 },
        );
        assert_eq!(
            std::str::from_utf8(&r.payload).unwrap(),
            r#"{"user_id":"User3","window_start":"2024-06-27T15:00:00Z","window_end":"2024-06-27T15:00:10Z","count":42}"#
        );
        assert_eq!(r.key.as_deref(), Some(&b"User3"[..]));
        assert_eq!(r.header(HEADER_ID).unwrap(), "User3@2024-06-27T15:00:00Z");
    }

    #[test]
    fn dead_letter_keeps_binary_payloads_as_base64() {
        let rec = Record {
            payload: Bytes::from_static(b"\xff\x00"),
            ..Default::default()
        };
        let dl = dead_letter("events", &rec, "payload is not valid UTF-8");
        let v: serde_json::Value = serde_json::from_slice(&dl.payload).unwrap();
        assert_eq!(v["payload"], "/wA=");
        assert_eq!(v["payload_encoding"], "base64");
        assert_eq!(v["source"]["topic"], "events");
        assert_eq!(dl.header(HEADER_ERROR).unwrap(), "payload is not valid UTF-8");
    }
}
