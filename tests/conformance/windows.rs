//! Hopping windows (`pipelines/page_views_hopping.toml`, with its late topic) and session
//! windows in update mode (`pipelines/user_sessions.toml`).

use std::collections::HashMap;
use std::time::Duration;

use super::{event_ms, lines, pipeline_named, rfc_ms, windows_of, Bed, Windows};

/// `pipelines/page_views_hopping.toml`: 60 s windows every 10 s per (page, event type),
/// count and distinct users, against an oracle over the same events.
pub async fn hopping_windows_match_the_oracle(broker: &str) {
    let bed = Bed::with_file(
        &pipeline_named("page_views_hopping"),
        broker,
        "hopping",
        &[],
    );
    let data = lines(5, 6_000, 40, 0);
    let mut want: HashMap<(String, i64, i64), (u64, std::collections::HashSet<String>)> =
        HashMap::new();
    for l in &data {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        let t = event_ms(&v);
        let key = format!(
            "{}|{}",
            v["metadata"]["page"].as_str().unwrap(),
            v["event_type"].as_str().unwrap()
        );
        let mut start = t.div_euclid(10_000) * 10_000;
        while start > t - 60_000 {
            let e = want
                .entry((key.clone(), start, start + 60_000))
                .or_default();
            e.0 += 1;
            e.1.insert(v["user_id"].as_str().unwrap().to_string());
            start -= 10_000;
        }
    }
    let want: Windows = want
        .into_iter()
        .map(|(k, (n, users))| (k, (n, users.len() as u64)))
        .collect();
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!(
        (s.windowed, s.late, s.late_window_misses),
        (6_000, 0, 0),
        "{s:?}"
    );
    let records = bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
        .await;
    assert_eq!(
        windows_of(
            &records,
            &["metadata.page", "event_type"],
            "distinct_user_id"
        ),
        want
    );
}

/// `pipelines/user_sessions.toml`: per-user sessions with a 30 s gap, emitted in update
/// mode; the final results match an oracle, and updates never exceed their final count.
pub async fn session_windows_in_update_mode_match_the_oracle(broker: &str) {
    let bed = Bed::with_file(&pipeline_named("user_sessions"), broker, "sessions", &[]);
    // Sparse: one event every 200 ms over 30 users, so a user's gaps often pass 30 s.
    let mut g = weir_engine::generate::EventGenerator::new(8, 30);
    let mut t =
        weir_engine::generate::Timeline::new(8, weir_engine::generate::DEFAULT_START_MS, 200, 500);
    let data: Vec<Vec<u8>> = (0..3_000)
        .map(|_| g.event(t.next_time()).into_bytes())
        .collect();
    let mut by_user: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for l in &data {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        by_user
            .entry(v["user_id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                event_ms(&v),
                v["metadata"]["page"].as_str().unwrap().to_string(),
            ));
    }
    let mut want = Windows::new();
    for (user, mut evs) in by_user {
        evs.sort();
        let mut i = 0;
        while i < evs.len() {
            let (start, mut end) = (evs[i].0, evs[i].0 + 30_000);
            let mut pages = std::collections::HashSet::new();
            let mut n = 0;
            while i < evs.len() && evs[i].0 < end {
                end = end.max(evs[i].0 + 30_000);
                pages.insert(evs[i].1.clone());
                n += 1;
                i += 1;
            }
            want.insert((user.clone(), start, end), (n, pages.len() as u64));
        }
    }
    assert!(
        want.len() > 30,
        "the dataset should split users into several sessions"
    );
    bed.produce(&data).await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert_eq!((s.windowed, s.late), (3_000, 0), "{s:?}");
    let records = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let finals = windows_of(&records, &["user_id"], "distinct_page");
    assert_eq!(finals, want);
    let mut updates = 0;
    for r in &records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        if v["final"] == false {
            updates += 1;
            let user = v["user_id"].as_str().unwrap();
            let (start, count) = (rfc_ms(&v["window_start"]), v["count"].as_u64().unwrap());
            // An update belongs to a session that ends up containing it.
            assert!(
                want.iter().any(|((u, s, e), (n, _))| u == user
                    && *s <= start
                    && start < *e
                    && count <= *n),
                "update {v} matches no final session"
            );
        }
    }
    assert!(updates > 0, "update mode emits intermediate results");
}

/// `pipelines/page_views_hopping.toml`'s `[late]` topic: an event whose windows have all
/// closed goes there unchanged (not to the dead letters) and is counted as late; the
/// events around it are counted in their windows. The records are keyed by the page (the
/// first `group_by` value), so the page's partition has an event time of its own and which
/// event is late does not depend on the broker's partitioning.
pub async fn late_events_go_to_the_late_topic(broker: &str) {
    let bed = Bed::with_file(&pipeline_named("page_views_hopping"), broker, "late", &[]);
    let event = |t: &str| {
        format!(
            r#"{{"event_type":"click","user_id":"User1","action":"a","timestamp":"2024-06-27T15:{t}Z","metadata":{{"page":"/home","session_id":"s1"}}}}"#
        )
        .into_bytes()
    };
    // 15:00:06 arrives when the watermark is 15:02:30: every window covering it ended by
    // 15:01:00 and closed at 15:01:02. 15:02:20 is on time (its windows end after 15:02:30).
    let late = event("00:06");
    let data = [
        event("00:05"),
        event("00:30"),
        event("02:30"),
        late.clone(),
        event("02:20"),
    ];
    bed.produce_keyed(
        &data
            .iter()
            .map(|l| ("/home", l.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
    let s = bed.run_until_idle().await.expect("run").counters;
    assert!(s.balanced(), "{s:?}");
    assert_eq!((s.windowed, s.late, s.dead_letters), (4, 1, 0), "{s:?}");
    let weir_engine::config::LatePolicy::Output(topic) = &bed.config.late else {
        panic!("page_views_hopping.toml has a late topic")
    };
    let got = bed.read(topic, 2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "one late event");
    assert_eq!(&got[0].payload[..], &late[..], "the late event, unchanged");
    let results = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    let windows = windows_of(
        &results,
        &["metadata.page", "event_type"],
        "distinct_user_id",
    );
    let count_at = |start: &str| {
        let start = rfc_ms(&serde_json::Value::String(format!("2024-06-27T{start}Z")));
        windows
            .iter()
            .find(|((_, s, _), _)| *s == start)
            .map(|(_, (n, _))| *n)
    };
    assert_eq!(count_at("15:00:00"), Some(2), "{windows:?}");
    assert_eq!(count_at("14:59:10"), Some(1), "{windows:?}");
    assert_eq!(count_at("15:02:00"), Some(2), "{windows:?}");
    assert_eq!(count_at("15:02:30"), Some(1), "{windows:?}");
    // 9 windows hold 15:00:05 or 15:00:30 (starting 14:59:10 ... 15:00:30), 7 hold 15:02:20
    // or 15:02:30 (15:01:30 ... 15:02:30).
    assert_eq!(windows.len(), 9 + 7, "{windows:?}");
}
