//! The oracles: expected results computed without the engine, and the parsing of what
//! the engine wrote.

use std::collections::HashMap;

use weir_engine::generate::dataset;
use weir_engine::record::HEADER_ID;
use weir_engine::Record;

/// (user, window start in ms) -> count, computed without the engine.
pub type Counts = HashMap<(String, i64), u64>;

/// The oracle: counts per user per 10 s window of the seed's timestamp, valid events only.
pub fn oracle(lines: &[Vec<u8>]) -> Counts {
    let allowed = ["page_view", "scroll", "click"];
    let mut c = Counts::new();
    for l in lines {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) else {
            continue;
        };
        let (Some(et), Some(user), Some(_), Some(ts)) = (
            v["event_type"].as_str(),
            v["user_id"].as_str(),
            v["action"].as_str(),
            v["timestamp"].as_str(),
        ) else {
            continue;
        };
        if !allowed.contains(&et) || !(v["metadata"].is_object() || v["metadata"].is_null()) {
            continue;
        }
        let Ok(t) = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f") else {
            continue;
        };
        let ms = t.and_utc().timestamp_millis();
        *c.entry((user.to_string(), ms - ms.rem_euclid(10_000)))
            .or_default() += 1;
    }
    c
}

/// Parses result records, checking their key and id header; duplicates (same id) must
/// carry the same count. Returns the distinct results.
pub fn results(records: &[Record]) -> Counts {
    let mut c = Counts::new();
    for r in records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("result is JSON");
        let user = v["user_id"].as_str().expect("user_id").to_string();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let end = chrono::DateTime::parse_from_rfc3339(v["window_end"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        assert_eq!(end - start, 10_000, "{v}");
        assert_eq!(
            r.key.as_deref(),
            Some(user.as_bytes()),
            "result key is the group key"
        );
        if let Some((_, id)) = r.headers.iter().find(|(k, _)| k == HEADER_ID) {
            assert_eq!(
                std::str::from_utf8(id).unwrap(),
                format!("{user}@{}", v["window_start"].as_str().unwrap())
            );
        }
        let count = v["count"].as_u64().expect("count");
        if let Some(prev) = c.insert((user.clone(), start), count) {
            assert_eq!(
                prev, count,
                "a duplicate result for ({user}, {start}) has another count"
            );
        }
    }
    c
}

pub fn lines(seed: u64, n: usize, users: u64, invalid_every: u64) -> Vec<Vec<u8>> {
    dataset(seed, n, users, invalid_every)
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

/// Results of any window size as user -> count.
pub fn results_any_size(records: &[Record]) -> HashMap<String, u64> {
    records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["user_id"].as_str().unwrap().to_string(),
                v["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// (group key values joined by `|`, window start, window end) -> (count, distinct values).
pub type Windows = HashMap<(String, i64, i64), (u64, u64)>;

pub fn event_ms(v: &serde_json::Value) -> i64 {
    chrono::NaiveDateTime::parse_from_str(v["timestamp"].as_str().unwrap(), "%Y-%m-%d %H:%M:%S%.f")
        .unwrap()
        .and_utc()
        .timestamp_millis()
}

pub fn rfc_ms(v: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

/// Final results as (key, start, end) -> (count, the named distinct aggregate).
pub fn windows_of(records: &[Record], keys: &[&str], distinct: &str) -> Windows {
    let mut w = Windows::new();
    for r in records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        if v["final"] == false {
            continue;
        }
        let key: Vec<&str> = keys.iter().map(|k| v[*k].as_str().unwrap()).collect();
        let k = (
            key.join("|"),
            rfc_ms(&v["window_start"]),
            rfc_ms(&v["window_end"]),
        );
        let val = (v["count"].as_u64().unwrap(), v[distinct].as_u64().unwrap());
        if let Some(prev) = w.insert(k.clone(), val) {
            assert_eq!(prev, val, "duplicate final results for {k:?} differ");
        }
    }
    w
}

/// The original payloads of dead letters (their envelopes' `payload`), checking that none
/// of them is a valid event dead-lettered as late.
pub fn dead_letter_payloads(dead: &[Record]) -> std::collections::HashSet<Vec<u8>> {
    dead.iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.payload).expect("envelope");
            let reason = v["error"].as_str().unwrap_or_default();
            assert!(
                !reason.starts_with("late event"),
                "a valid event was late: {v}"
            );
            v["payload"]
                .as_str()
                .unwrap_or_default()
                .as_bytes()
                .to_vec()
        })
        .collect()
}
