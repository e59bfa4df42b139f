//! Dead letters: the envelope that says why a record failed and where it came from, and
//! cutting a dead letter or late record that is larger than a broker takes.

use bytes::Bytes;

use crate::base64::base64;
use crate::origin::Origin;
use crate::record::{
    OutRecord, Record, HEADER_ERROR, HEADER_NULL_VALUE, HEADER_PAYLOAD_BYTES, HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC, HEADER_TRUNCATED,
};

/// Builds the dead letter for `record` from `origin` (`topic` is the pipeline's source
/// topic): a JSON envelope `{"error", "source": {topic, partition, offset}, "payload"}`
/// (payload as text, or base64 with `"payload_encoding": "base64"` when it is not UTF-8),
/// keeping the original key and headers and adding `weir.error` / `weir.source.*` headers.
/// A record back from the retry topic is reported where it first came from, with the
/// history of its attempts.
pub fn dead_letter(topic: &str, origin: &Origin, record: &Record, reason: &str) -> OutRecord {
    let (topic, partition, offset) = origin.reported(topic);
    dead_letter_from(
        topic,
        partition,
        offset,
        record,
        reason,
        origin.history_json(),
    )
}

/// A dead letter for `record`, which came from `topic` at (`partition`, `offset`), with
/// the history of its retries (`"attempts"`), if any.
pub(crate) fn dead_letter_from(
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
    // A payload its source cut short (a line past the size limit): its first bytes follow.
    if let Some(n) = record.cut_from() {
        env.insert("payload_truncated".into(), true.into());
        env.insert("payload_bytes".into(), n.into());
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
    push_source_headers(&mut headers, topic, partition, offset);
    OutRecord {
        key: record.key.clone(),
        payload: Bytes::from(payload),
        headers,
        timestamp: record.timestamp,
    }
}

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
    // A payload cut before (by its source) keeps the size it was cut from.
    let cut_before = env.get("payload_bytes").and_then(|v| v.as_u64());
    let original_bytes = if let Some(n) = cut_before {
        n as usize
    } else if base64_payload {
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

/// Appends the `weir.source.*` headers: where a dead letter or late record came from.
pub(super) fn push_source_headers(
    headers: &mut Vec<crate::record::Header>,
    topic: &str,
    partition: u32,
    offset: u64,
) {
    headers.push((
        HEADER_SOURCE_TOPIC.into(),
        Bytes::copy_from_slice(topic.as_bytes()),
    ));
    headers.push((
        HEADER_SOURCE_PARTITION.into(),
        Bytes::from(partition.to_string()),
    ));
    headers.push((HEADER_SOURCE_OFFSET.into(), Bytes::from(offset.to_string())));
}

pub(super) fn without_retry_header(record: &Record) -> Vec<crate::record::Header> {
    record
        .headers
        .iter()
        .filter(|(n, _)| n != crate::retry::envelope::HEADER_RETRY)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggFn;
    use crate::output::{late_record, ResultEncoder};
    use crate::window::{Acc, WindowRange};

    fn big_dead_letter(payload: &[u8]) -> OutRecord {
        let rec = Record {
            payload: Bytes::copy_from_slice(payload),
            key: Some(Bytes::from_static(b"User1")),
            headers: vec![("trace".into(), Bytes::from_static(b"t-1"))],
            ..Default::default()
        };
        let origin = Origin::of(&rec);
        dead_letter(
            "events",
            &origin,
            &rec,
            "payload of 3000000 bytes exceeds the limit",
        )
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
            &Origin::of(&rec),
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
        let dl = dead_letter(
            "events",
            &Origin::of(&rec),
            &rec,
            "payload is not valid UTF-8",
        );
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
