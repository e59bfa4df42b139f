//! Encoding window results and dead letters.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::aggregate::{write_value, AggFn};
use crate::record::{
    OutRecord, Record, HEADER_ERROR, HEADER_ID, HEADER_NULL_VALUE, HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};
use crate::time::write_rfc3339;
use crate::window::{Acc, Extra, WindowRange};

/// Separates the JSON texts of key parts inside an encoded group key. JSON text never
/// contains a raw 0x1F byte, so the encoding is unambiguous.
pub const KEY_SEP: u8 = 0x1f;

/// Writes window results as JSON records.
#[derive(Debug)]
pub struct ResultEncoder {
    /// `"user_id":` for each key field, pre-encoded.
    key_names: Vec<Vec<u8>>,
    /// `,"count":` for each aggregate, pre-encoded.
    aggs: Vec<(AggFn, Vec<u8>)>,
    /// Whether results carry `"final"` (update emission).
    flag_final: bool,
    /// A scratch buffer results are written into, then copied into the arena, which
    /// results are slices of: one allocation per [`ARENA`] bytes of results instead of two
    /// per result. (A lock, not a `RefCell`, because the operator is shared across awaits.)
    buffers: Mutex<(Vec<u8>, BytesMut)>,
}

/// Bytes of results per shared allocation.
const ARENA: usize = 64 * 1024;

impl Clone for ResultEncoder {
    fn clone(&self) -> Self {
        ResultEncoder {
            key_names: self.key_names.clone(),
            aggs: self.aggs.clone(),
            flag_final: self.flag_final,
            buffers: Mutex::default(),
        }
    }
}

/// The parts of a result that are the same for every key of one window, formatted once.
#[derive(Debug, Clone)]
pub struct WindowText {
    /// `"window_start":"…","window_end":"…"`.
    fields: Vec<u8>,
    /// `@` + window start, the suffix of result ids.
    id_suffix: Vec<u8>,
    start: i64,
}

impl WindowText {
    /// Formats `window`'s fields once.
    pub fn new(window: WindowRange) -> Self {
        let mut t = String::with_capacity(64);
        t.push_str("\"window_start\":\"");
        write_rfc3339(&mut t, window.start);
        t.push_str("\",\"window_end\":\"");
        write_rfc3339(&mut t, window.end);
        t.push('"');
        let mut id = String::with_capacity(24);
        id.push('@');
        write_rfc3339(&mut id, window.start);
        WindowText {
            fields: t.into_bytes(),
            id_suffix: id.into_bytes(),
            start: window.start,
        }
    }
}

impl ResultEncoder {
    /// An encoder naming the key fields and aggregates as configured.
    pub fn new(group_by: &[String], aggs: &[AggFn], flag_final: bool) -> Self {
        let key_names = group_by
            .iter()
            .map(|n| {
                let mut v = Vec::new();
                crate::decode::write_json_str(&mut v, n);
                v.push(b':');
                v
            })
            .collect();
        let aggs = aggs
            .iter()
            .map(|a| {
                let mut v = vec![b','];
                crate::decode::write_json_str(&mut v, &a.output_name());
                v.push(b':');
                (a.clone(), v)
            })
            .collect();
        ResultEncoder {
            key_names,
            aggs,
            flag_final,
            buffers: Mutex::default(),
        }
    }

    /// One result record: `{"user_id": "User3", "window_start": ..., "window_end": ...,
    /// "count": 42}`, keyed by the group key, with its deterministic id in a header.
    pub fn encode(&self, window: WindowRange, key: &[u8], acc: &Acc) -> OutRecord {
        self.encode_with(&WindowText::new(window), key, acc, None, true)
    }

    /// [`encode`](Self::encode) with the window's text formatted beforehand. The payload,
    /// the key and the id are slices of one buffer shared by many results.
    pub fn encode_with(
        &self,
        w: &WindowText,
        key: &[u8],
        acc: &Acc,
        extra: Option<&Extra>,
        is_final: bool,
    ) -> OutRecord {
        self.batch(|b| b.encode(w, key, acc, extra, is_final))
    }

    /// Runs `f` with the encoder's buffers taken once, for encoding many results.
    pub fn batch<T>(&self, f: impl FnOnce(&mut EncodeBatch<'_>) -> T) -> T {
        let mut buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let (scratch, arena) = &mut *buffers;
        f(&mut EncodeBatch {
            enc: self,
            out: scratch,
            arena,
        })
    }
}

/// A [`ResultEncoder`] with its buffers in hand (see [`ResultEncoder::batch`]).
pub struct EncodeBatch<'e> {
    enc: &'e ResultEncoder,
    out: &'e mut Vec<u8>,
    arena: &'e mut BytesMut,
}

impl EncodeBatch<'_> {
    /// [`ResultEncoder::encode_with`] without taking the buffers again.
    pub fn encode(
        &mut self,
        w: &WindowText,
        key: &[u8],
        acc: &Acc,
        extra: Option<&Extra>,
        is_final: bool,
    ) -> OutRecord {
        let enc = self.enc;
        let (out, arena) = (&mut *self.out, &mut *self.arena);
        out.clear();
        out.push(b'{');
        for (name, part) in enc.key_names.iter().zip(key.split(|b| *b == KEY_SEP)) {
            out.extend_from_slice(name);
            out.extend_from_slice(part);
            out.push(b',');
        }
        out.extend_from_slice(&w.fields);
        let mut extra = extra.map(|e| e.0.iter());
        for (agg, name) in &enc.aggs {
            out.extend_from_slice(name);
            let state = extra.as_mut().and_then(|it| it.next());
            match agg {
                AggFn::Count => write_u64(out, acc.count()),
                _ => write_value(out, acc.count(), state),
            }
        }
        if enc.flag_final {
            out.extend_from_slice(if is_final {
                b",\"final\":true"
            } else {
                b",\"final\":false"
            });
        }
        out.push(b'}');
        let payload_end = out.len();
        push_key_display(out, key);
        let key_end = out.len();
        out.extend_from_slice(&w.id_suffix);
        if arena.capacity() - arena.len() < out.len() {
            *arena = BytesMut::with_capacity(ARENA.max(out.len()));
        }
        arena.extend_from_slice(out);
        let payload = arena.split_to(payload_end).freeze();
        let id = arena.split().freeze();
        OutRecord {
            key: Some(id.slice(..key_end - payload_end)),
            payload,
            headers: vec![(HEADER_ID.into(), id)],
            timestamp: Some(w.start),
        }
    }
}

/// A late event for the late output: the original record unchanged, plus headers naming
/// the window it missed, the watermark, and where it came from.
pub fn late_record(topic: &str, record: &Record, window: WindowRange, watermark: i64) -> OutRecord {
    let meta = crate::retry::meta(record);
    let (topic, partition, offset) = match &meta {
        Some(m) => (m.source.topic.as_str(), m.source.partition, m.source.offset),
        None => (topic, record.position.partition, record.position.offset),
    };
    let mut headers = without_retry_header(record);
    let t = |ms| Bytes::from(crate::time::format_rfc3339(ms));
    headers.push(("weir.late.window_start".into(), t(window.start)));
    headers.push(("weir.late.window_end".into(), t(window.end)));
    headers.push(("weir.late.watermark".into(), t(watermark)));
    headers.push((
        HEADER_SOURCE_TOPIC.into(),
        Bytes::copy_from_slice(topic.as_bytes()),
    ));
    headers.push((
        HEADER_SOURCE_PARTITION.into(),
        Bytes::from(partition.to_string()),
    ));
    headers.push((HEADER_SOURCE_OFFSET.into(), Bytes::from(offset.to_string())));
    OutRecord {
        key: record.key.clone(),
        payload: record.payload.clone(),
        headers,
        timestamp: record.timestamp,
    }
}

/// Appends `n` in decimal.
pub fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// The human form of an encoded group key: string parts unquoted, joined by `|`.
pub fn key_display(key: &[u8]) -> String {
    String::from_utf8_lossy(&key_display_bytes(key)).into_owned()
}

fn key_display_bytes(key: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(key.len());
    push_key_display(&mut s, key);
    s
}

fn push_key_display(s: &mut Vec<u8>, key: &[u8]) {
    for (i, part) in key.split(|b| *b == KEY_SEP).enumerate() {
        if i > 0 {
            s.push(b'|');
        }
        match part {
            [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => s.extend_from_slice(inner),
            [b'"', ..] => match serde_json::from_slice::<String>(part) {
                Ok(v) => s.extend_from_slice(v.as_bytes()),
                Err(_) => s.extend_from_slice(part),
            },
            _ => s.extend_from_slice(part),
        }
    }
}

/// Builds the dead letter for `record` from `topic`: a JSON envelope
/// `{"error", "source": {topic, partition, offset}, "payload"}` (payload as text, or base64
/// with `"payload_encoding": "base64"` when it is not UTF-8), keeping the original key and
/// headers and adding `weir.error` / `weir.source.*` headers.
pub fn dead_letter(topic: &str, record: &Record, reason: &str) -> OutRecord {
    // A record back from the retry topic is reported where it first came from, with the
    // history of its attempts.
    if let Some(meta) = crate::retry::meta(record) {
        return dead_letter_from(
            &meta.source.topic,
            meta.source.partition,
            meta.source.offset,
            record,
            reason,
            meta.history_json(),
        );
    }
    dead_letter_from(
        topic,
        record.position.partition,
        record.position.offset,
        record,
        reason,
        None,
    )
}

/// A dead letter for `record`, which came from `topic` at (`partition`, `offset`), with
/// the history of its retries (`"attempts"`), if any.
pub fn dead_letter_from(
    topic: &str,
    partition: u32,
    offset: u64,
    record: &Record,
    reason: &str,
    attempts: Option<serde_json::Value>,
) -> OutRecord {
    // A record without a value (a Kafka tombstone) is not an empty one: say so.
    let null_value = record.headers.iter().any(|(n, _)| n == HEADER_NULL_VALUE);
    let tombstone;
    let reason = if null_value && record.payload.is_empty() {
        tombstone = format!("null value (a Kafka tombstone), not an event; {reason}");
        tombstone.as_str()
    } else {
        reason
    };
    let mut env = serde_json::Map::new();
    env.insert("error".into(), reason.into());
    env.insert(
        "source".into(),
        serde_json::json!({
            "topic": topic,
            "partition": partition,
            "offset": offset,
        }),
    );
    if let Some(a) = attempts {
        env.insert("attempts".into(), a);
    }
    match std::str::from_utf8(&record.payload) {
        Ok(_) if null_value && record.payload.is_empty() => {
            env.insert("payload".into(), serde_json::Value::Null);
        }
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
    let mut headers = without_retry_header(record);
    headers.push((
        HEADER_ERROR.into(),
        Bytes::copy_from_slice(reason.as_bytes()),
    ));
    headers.push((
        HEADER_SOURCE_TOPIC.into(),
        Bytes::copy_from_slice(topic.as_bytes()),
    ));
    headers.push((
        HEADER_SOURCE_PARTITION.into(),
        Bytes::from(partition.to_string()),
    ));
    headers.push((HEADER_SOURCE_OFFSET.into(), Bytes::from(offset.to_string())));
    OutRecord {
        key: record.key.clone(),
        payload: Bytes::from(payload),
        headers,
        timestamp: record.timestamp,
    }
}

/// Header on a dead letter or late record whose payload was cut to fit the broker: `true`.
pub const HEADER_TRUNCATED: &str = "weir.truncated";
/// Header on a cut record: the original payload's size in bytes.
pub const HEADER_PAYLOAD_BYTES: &str = "weir.payload_bytes";

/// A record's size as brokers limit it: payload, key and headers (names and values).
pub fn record_size(r: &OutRecord) -> usize {
    r.payload.len()
        + r.key.as_ref().map_or(0, |k| k.len())
        + r.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

/// Bytes kept free for what [`fit_to`] adds besides the payload text.
const FIT_SLACK: usize = 256;

/// A dead letter or late record larger than `max_bytes` (counted as [`record_size`] does)
/// cut to fit, so that an outcome never fails for its size: its original payload is cut
/// (on a character boundary; base64 in whole groups) and the envelope says
/// `"payload_truncated": true` and `"payload_bytes"`: the original size. A late record,
/// which is the original event without an envelope, becomes a dead-letter-like envelope
/// (`"late": {…}`, since a cut event is no longer an event). The headers
/// [`HEADER_TRUNCATED`] and [`HEADER_PAYLOAD_BYTES`] say the same on brokers with headers.
///
/// `None` when `r` fits, or is neither a dead letter nor a late record (a result or retry
/// record too large for the broker is the producer's error to report).
pub fn fit_to(r: &OutRecord, max_bytes: usize) -> Option<OutRecord> {
    if record_size(r) <= max_bytes {
        return None;
    }
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let mut env: serde_json::Map<String, serde_json::Value> = if header(HEADER_ERROR).is_some() {
        match serde_json::from_slice(&r.payload) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return None,
        }
    } else if let Some(start) = header("weir.late.window_start") {
        let mut m = serde_json::Map::new();
        m.insert(
            "error".into(),
            "late event (cut to fit the broker's record size limit)".into(),
        );
        m.insert(
            "late".into(),
            serde_json::json!({
                "window_start": start,
                "window_end": header("weir.late.window_end"),
                "watermark": header("weir.late.watermark"),
            }),
        );
        let num = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
        m.insert(
            "source".into(),
            serde_json::json!({
                "topic": header(HEADER_SOURCE_TOPIC),
                "partition": num(HEADER_SOURCE_PARTITION),
                "offset": num(HEADER_SOURCE_OFFSET),
            }),
        );
        match std::str::from_utf8(&r.payload) {
            Ok(t) => m.insert("payload".into(), t.into()),
            Err(_) => {
                m.insert("payload_encoding".into(), "base64".into());
                m.insert("payload".into(), base64(&r.payload).into())
            }
        };
        m
    } else {
        return None;
    };
    let base64_payload = env.get("payload_encoding").and_then(|v| v.as_str()) == Some("base64");
    let original = match env.remove("payload") {
        Some(serde_json::Value::String(p)) => p,
        _ => String::new(),
    };
    let original_bytes = if base64_payload {
        let pad = original.bytes().rev().take_while(|b| *b == b'=').count();
        original.len() / 4 * 3 - pad
    } else {
        original.len()
    };
    env.insert("payload_truncated".into(), true.into());
    env.insert("payload_bytes".into(), original_bytes.into());
    let mut headers: Vec<crate::record::Header> = r
        .headers
        .iter()
        .filter(|(n, _)| n != HEADER_TRUNCATED && n != HEADER_PAYLOAD_BYTES)
        .cloned()
        .collect();
    headers.push((HEADER_TRUNCATED.into(), Bytes::from_static(b"true")));
    headers.push((
        HEADER_PAYLOAD_BYTES.into(),
        Bytes::from(original_bytes.to_string()),
    ));
    let mut fixed = OutRecord {
        key: r.key.clone(),
        payload: Bytes::new(),
        headers,
        timestamp: r.timestamp,
    };
    let envelope = |keep: &str| {
        let mut e = env.clone();
        e.insert("payload".into(), keep.into());
        serde_json::to_vec(&serde_json::Value::Object(e)).unwrap_or_default()
    };
    let empty = envelope("").len();
    let around = record_size(&fixed) + empty + FIT_SLACK;
    // Bytes left for the payload's JSON text.
    let budget = max_bytes.saturating_sub(around);
    let mut keep = budget.min(original.len());
    loop {
        let mut cut = keep;
        if base64_payload {
            cut -= cut % 4;
        }
        while !original.is_char_boundary(cut) {
            cut -= 1;
        }
        let payload = envelope(&original[..cut]);
        let size = record_size(&fixed) + payload.len();
        if size <= max_bytes || cut == 0 {
            fixed.payload = Bytes::from(payload);
            return Some(fixed);
        }
        // JSON escapes made the text longer: scale the cut by how much, and try again.
        let encoded = payload.len().saturating_sub(empty).max(1);
        keep = ((cut as u128 * budget as u128 / encoded as u128) as usize).min(cut - 1);
    }
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

fn without_retry_header(record: &Record) -> Vec<crate::record::Header> {
    record
        .headers
        .iter()
        .filter(|(n, _)| n != crate::retry::HEADER_RETRY)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn result_record_shape() {
        let enc = ResultEncoder::new(&["user_id".into()], &[AggFn::Count], false);
        let r = enc.encode(
            WindowRange {
                start: 1_719_500_400_000,
                end: 1_719_500_410_000,
            },
            br#""User3""#,
            &{
                let mut a = Acc::default();
                a.add(42);
                a
            },
        );
        assert_eq!(
            std::str::from_utf8(&r.payload).unwrap(),
            r#"{"user_id":"User3","window_start":"2024-06-27T15:00:00Z","window_end":"2024-06-27T15:00:10Z","count":42}"#
        );
        assert_eq!(r.key.as_deref(), Some(&b"User3"[..]));
        assert_eq!(r.header(HEADER_ID).unwrap(), "User3@2024-06-27T15:00:00Z");
    }

    #[test]
    fn keys_with_escapes_and_several_parts_display_plainly() {
        assert_eq!(key_display(br#""a\"b""#), "a\"b");
        let mut k = br#""x""#.to_vec();
        k.push(KEY_SEP);
        k.extend_from_slice(b"42");
        assert_eq!(key_display(&k), "x|42");
        let mut v = Vec::new();
        write_u64(&mut v, 0);
        write_u64(&mut v, 18_446_744_073_709_551_615);
        assert_eq!(v, b"018446744073709551615");
    }

    fn big_dead_letter(payload: &[u8]) -> OutRecord {
        let rec = Record {
            payload: Bytes::copy_from_slice(payload),
            key: Some(Bytes::from_static(b"User1")),
            headers: vec![("trace".into(), Bytes::from_static(b"t-1"))],
            ..Default::default()
        };
        dead_letter("events", &rec, "payload of 3000000 bytes exceeds the limit")
    }

    #[test]
    fn a_dead_letter_too_large_for_the_broker_is_cut_to_fit_with_its_size() {
        // Text full of characters JSON escapes: the envelope is much larger than the text.
        let text: String = "\"é\n".repeat(300_000);
        let dl = big_dead_letter(text.as_bytes());
        assert!(record_size(&dl) > 1_000_000);
        let fit = fit_to(&dl, 1_000_000).expect("cut");
        assert!(record_size(&fit) <= 1_000_000, "{}", record_size(&fit));
        let env: serde_json::Value = serde_json::from_slice(&fit.payload).unwrap();
        assert_eq!(env["payload_truncated"], true);
        assert_eq!(env["payload_bytes"], text.len());
        let kept = env["payload"].as_str().unwrap();
        assert!(
            text.starts_with(kept) && kept.len() > 100_000,
            "{}",
            kept.len()
        );
        assert_eq!(env["source"]["topic"], "events");
        assert_eq!(fit.key.as_deref(), Some(&b"User1"[..]));
        assert_eq!(fit.header(HEADER_TRUNCATED).unwrap(), "true");
        assert_eq!(fit.header("trace").unwrap(), "t-1");
        // What fits is left alone.
        assert!(fit_to(&dl, 10_000_000).is_none());
    }

    #[test]
    fn binary_payloads_are_cut_in_whole_base64_groups() {
        let bytes: Vec<u8> = (0..900_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
        let dl = big_dead_letter(&bytes);
        let fit = fit_to(&dl, 500_000).expect("cut");
        assert!(record_size(&fit) <= 500_000);
        let env: serde_json::Value = serde_json::from_slice(&fit.payload).unwrap();
        assert_eq!(env["payload_bytes"], 900_000);
        assert_eq!(env["payload_encoding"], "base64");
        let kept = env["payload"].as_str().unwrap();
        assert_eq!(kept.len() % 4, 0);
        assert!(base64(&bytes).starts_with(kept));
    }

    #[test]
    fn a_late_record_too_large_becomes_a_cut_envelope() {
        let rec = Record {
            payload: Bytes::from(format!(
                "{{\"user_id\":\"U\",\"pad\":\"{}\"}}",
                "x".repeat(50_000)
            )),
            ..Default::default()
        };
        let late = late_record(
            "events",
            &rec,
            WindowRange {
                start: 0,
                end: 10_000,
            },
            20_000,
        );
        let fit = fit_to(&late, 10_000).expect("cut");
        assert!(record_size(&fit) <= 10_000);
        let env: serde_json::Value = serde_json::from_slice(&fit.payload).unwrap();
        assert_eq!(env["late"]["window_start"], "1970-01-01T00:00:00Z");
        assert_eq!(env["source"]["topic"], "events");
        assert_eq!(env["payload_bytes"], rec.payload.len());
        assert!(rec
            .payload
            .starts_with(env["payload"].as_str().unwrap().as_bytes()));
        // A result is never cut.
        let enc = ResultEncoder::new(&["user_id".into()], &[AggFn::Count], false);
        let r = enc.encode(WindowRange { start: 0, end: 1 }, br#""U""#, &Acc::default());
        assert!(fit_to(&r, 1).is_none());
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
        assert_eq!(
            dl.header(HEADER_ERROR).unwrap(),
            "payload is not valid UTF-8"
        );
    }
}
