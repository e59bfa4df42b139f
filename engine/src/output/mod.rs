//! Encoding window results, late records and dead letters (the latter in
//! [`dead_letters`]).

mod dead_letters;

pub use crate::base64::base64;
pub(crate) use dead_letters::dead_letter_from;
pub use dead_letters::{dead_letter, fit_to, record_size};
use dead_letters::{push_source_headers, without_retry_header};

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::aggregate::{write_u64, write_value, AggFn};
use crate::origin::Origin;
use crate::record::{OutRecord, Record, HEADER_ID};
use crate::time::write_rfc3339;
use crate::window::{Acc, Extra, WindowRange};

/// Separates the JSON texts of key parts inside an encoded group key. JSON text never
/// contains a raw 0x1F byte, so the encoding is unambiguous.
pub(crate) const KEY_SEP: u8 = 0x1f;

/// Writes window results as JSON records.
#[derive(Debug)]
pub(crate) struct ResultEncoder {
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
pub(crate) struct WindowText {
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
    #[cfg(test)]
    pub(crate) fn encode(&self, window: WindowRange, key: &[u8], acc: &Acc) -> OutRecord {
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
pub(crate) struct EncodeBatch<'e> {
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
/// the window it missed, the watermark, and where it came from (`origin`; `topic` is the
/// pipeline's source topic).
pub(crate) fn late_record(
    topic: &str,
    origin: &Origin,
    record: &Record,
    window: WindowRange,
    watermark: i64,
) -> OutRecord {
    let (topic, partition, offset) = origin.reported(topic);
    let mut headers = without_retry_header(record);
    let t = |ms| Bytes::from(crate::time::format_rfc3339(ms));
    headers.push(("weir.late.window_start".into(), t(window.start)));
    headers.push(("weir.late.window_end".into(), t(window.end)));
    headers.push(("weir.late.watermark".into(), t(watermark)));
    push_source_headers(&mut headers, topic, partition, offset);
    OutRecord {
        key: record.key.clone(),
        payload: record.payload.clone(),
        headers,
        timestamp: record.timestamp,
    }
}

/// The human form of an encoded group key: string parts unquoted, joined by `|`.
#[cfg(test)]
pub(crate) fn key_display(key: &[u8]) -> String {
    String::from_utf8_lossy(&key_display_bytes(key)).into_owned()
}

#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
