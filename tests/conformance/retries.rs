//! The retry topic and enrichment (`pipelines/enriched_by_country.toml`), and the `fail`
//! strategy.

use std::collections::HashMap;
use std::time::Duration;

use super::{lines, oracle, pipeline_named, results, unique_id, user_of, Bed};

/// A bed for `pipelines/enriched_by_country.toml` with its own table and retry topics, and
/// `extra` overrides; returns it with the table topic's name.
fn enriched_bed(broker: &str, case: &str, extra: &[&str]) -> (Bed, String) {
    let id = unique_id(case);
    let table = format!("conf-profiles-{id}");
    let mut sets = vec![
        format!("enrich.table={table}"),
        format!("retry.topic=conf-retry-{id}"),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let bed = Bed::with_file(&pipeline_named("enriched_by_country"), broker, case, &sets);
    (bed, table)
}

/// Polls the counters until `done` holds (at most 60 s).
async fn wait_for(
    metrics: &weir_engine::metrics::Metrics,
    done: impl Fn(&weir_engine::metrics::Snapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&metrics.snapshot()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            metrics.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The country of `UserN` in the enrichment tests.
pub fn country_of(user: &str) -> &'static str {
    let n: usize = user.trim_start_matches("User").parse().unwrap_or(0);
    ["NL", "DE", "FR", "JP", "BR"][n % 5]
}

/// The profile of `UserN` (its country by [`country_of`]), as the table topic holds it.
pub fn profile(user: usize) -> Vec<u8> {
    format!(
        r#"{{"user_id": "User{user}", "country": "{}", "plan": "free"}}"#,
        country_of(&format!("User{user}"))
    )
    .into_bytes()
}

/// Enrichment that waits for its data (`pipelines/enriched_by_country.toml`): users 0–9
/// have profiles before the run, users 10–14 get theirs only after their events went to
/// the retry topic, users 15–19 never do. The first two groups are counted exactly per
/// country; the last goes to the dead letters after `max_attempts` with its history.
pub async fn enrichment_retries_until_profiles_arrive(broker: &str) {
    let (bed, table) = enriched_bed(
        broker,
        "enrich",
        &[
            "retry.initial=200ms",
            "retry.multiplier=1.5",
            "retry.max=1s",
            "retry.max_attempts=8",
            // Every window stays open until the run ends, so that whether a retried event
            // is counted does not depend on how fast this machine is.
            "window.size=1h",
            "window.grace=1h",
            "window.idle_timeout=10m",
        ],
    );
    // One event in 50 is invalid: those go to the dead letters at once, never retried.
    let data = lines(11, 3_000, 20, 50);
    // (country, hour) -> count: the oracle's per-user 10 s counts, regrouped.
    let mut want: HashMap<(String, i64), u64> = HashMap::new();
    let (mut never, mut valid) = (0, 0);
    for ((u, start), n) in oracle(&data) {
        valid += n;
        let n_user: usize = u.trim_start_matches("User").parse().unwrap();
        if n_user < 15 {
            let hour = start - start.rem_euclid(3_600_000);
            *want.entry((country_of(&u).to_string(), hour)).or_default() += n;
        } else {
            never += n;
        }
    }
    let invalid = data.len() as u64 - valid;
    assert!(never > 0 && invalid > 0 && want.len() >= 5);

    bed.produce_to(&table, &(0..10).map(profile).collect::<Vec<_>>())
        .await;
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.exit_when_idle(Duration::from_secs(3)).run());
    // The late profiles arrive once some events are waiting in the retry topic.
    wait_for(&metrics, |s| s.retried > 0).await;
    bed.produce_to(&table, &(10..15).map(profile).collect::<Vec<_>>())
        .await;
    let summary = run.await.unwrap().expect("run");
    background.cancel();
    let s = summary.counters;
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.windowed, want.values().sum::<u64>(), "{s:?}");
    assert_eq!((s.dead_letters, s.late), (never + invalid, 0), "{s:?}");
    assert!(s.retried >= never * 7, "{s:?}");

    let mut got: HashMap<(String, i64), u64> = HashMap::new();
    for r in bed
        .read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let country = v["profile.country"]
            .as_str()
            .or(v["country"].as_str())
            .unwrap_or_else(|| panic!("no country in {v}"))
            .to_string();
        let count = v["count"].as_u64().unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        if let Some(prev) = got.insert((country, start), count) {
            assert_eq!(prev, count, "duplicate result with another count: {v}");
        }
    }
    assert_eq!(got, want);

    let dead = bed
        .read(
            &bed.config.dead_letter.topic,
            (never + invalid) as usize,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dead.len() as u64, never + invalid);
    let (gave_up, rest): (Vec<serde_json::Value>, Vec<serde_json::Value>) = dead
        .iter()
        .map(|d| serde_json::from_slice::<serde_json::Value>(&d.payload).unwrap())
        .partition(|e| e["attempts"].is_array());
    assert_eq!(gave_up.len() as u64, never);
    for e in &rest {
        assert!(!e["error"].as_str().unwrap().contains("gave up"), "{e}");
        // Invalid events are dead-lettered with their original payload, not enriched.
        assert!(!e["payload"].as_str().unwrap().contains("\"plan\""), "{e}");
    }
    for e in &gave_up {
        let why = e["error"].as_str().unwrap();
        assert!(why.starts_with("gave up after 8 attempts: "), "{e}");
        assert!(
            why.contains(&format!("no `{table}` entry for user_id User")),
            "{e}"
        );
        assert_eq!(e["attempts"].as_array().map(Vec::len), Some(8), "{e}");
        assert_eq!(e["attempts"][0]["stage"], "enrich");
        // Reported where it first came from, with its original payload.
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
        let original: serde_json::Value =
            serde_json::from_str(e["payload"].as_str().unwrap()).unwrap();
        let u = original["user_id"].as_str().unwrap();
        assert!(u.trim_start_matches("User").parse::<usize>().unwrap() >= 15);
    }
}

/// `[errors] validate = "fail"`: the first invalid event stops the run with an error and
/// nothing past it is committed; a restart with the strategy switched to dead letters
/// re-reads it (it is dead-lettered once) and the results are exact.
pub async fn fail_stops_and_a_restart_resumes_from_the_failing_record(broker: &str) {
    let bed = Bed::new(broker, "fail", &["errors.validate=fail"]);
    let mut data = lines(5, 2_000, 10, 0);
    let bad = br#"{"event_type":"click","user_id":"User1","action":"x","timestamp":"nope"}"#;
    data.insert(1_000, bad.to_vec());
    let want = oracle(&data);
    bed.produce(&data).await;
    let err = bed
        .run_until_idle()
        .await
        .expect_err("the invalid event stops the run");
    let msg = err.to_string();
    assert!(msg.contains("stage `validate` failed"), "{msg}");
    assert!(msg.contains("is not a timestamp"), "{msg}");

    let mut again = Bed {
        config: bed.config.clone(),
        backend: bed.backend.clone(),
        sets: bed.sets.clone(),
    };
    again.config.errors.clear();
    let summary = again.run_until_idle().await.expect("second run");
    let s = summary.counters;
    assert!(s.balanced(), "{s:?}");
    assert_eq!(s.dead_letters, 1, "{s:?}");
    let dead = bed
        .read(&bed.config.dead_letter.topic, 2, Duration::from_secs(3))
        .await;
    assert_eq!(dead.len(), 1, "the failing record was dead-lettered once");
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(got, want);
}

/// A retried event keeps its own event time: once its profile arrives it is counted in its
/// window if that window is still open, and is late if the window closed meanwhile. The
/// topics have one partition, so User1's events move the watermark for User0's too.
pub async fn retried_events_keep_their_event_time(broker: &str) {
    let one = super::brokers::get(broker).one_partition();
    let (bed, table) = enriched_bed(
        broker,
        "retry-time",
        &[
            one.iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
            &[
                "retry.initial=200ms",
                "retry.max=500ms",
                "retry.max_attempts=1000",
                "window.grace=0s",
                "window.idle_timeout=10m",
            ],
        ]
        .concat(),
    );
    let event = |user: &str, second: u32| {
        format!(
            r#"{{"event_type":"click","user_id":"{user}","action":"a","timestamp":"2024-06-27 15:00:{second:02}.000000"}}"#
        )
        .into_bytes()
    };
    // User0 (no profile yet): ten events in window :00–:10 and one in :50–:60. User1 moves
    // the watermark to :50, closing every window before :50.
    let mut data: Vec<Vec<u8>> = (0..10).map(|s| event("User0", s)).collect();
    data.push(event("User0", 55));
    data.extend((0..=50).map(|s| event("User1", s)));
    bed.produce_to(&table, &[profile(1)]).await;
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let run = tokio::spawn(pipeline.exit_when_idle(Duration::from_secs(2)).run());
    wait_for(&metrics, |s| s.windowed >= 51 && s.retried >= 11).await;
    bed.produce_to(&table, &[profile(0)]).await;
    let s = run.await.unwrap().expect("run").counters;
    background.cancel();
    assert!(s.balanced(), "{s:?}");
    assert_eq!((s.windowed, s.late, s.dead_letters), (52, 10, 0), "{s:?}");
    let results = bed
        .read(&bed.config.sink.topic, 7, Duration::from_secs(3))
        .await;
    let nl: Vec<serde_json::Value> = results
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap())
        .filter(|v| v["profile.country"] == "NL")
        .collect();
    assert_eq!(nl.len(), 1, "{nl:?}");
    assert_eq!(nl[0]["window_start"], "2024-06-27T15:00:50Z");
    assert_eq!(nl[0]["count"], 1);
    let late = bed
        .read(&bed.config.dead_letter.topic, 10, Duration::from_secs(3))
        .await;
    assert_eq!(late.len(), 10);
    for r in &late {
        let e: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert!(
            e["error"].as_str().unwrap().starts_with("late event"),
            "{e}"
        );
        assert_eq!(e["source"]["topic"], bed.config.source.topic.as_str());
    }
}

/// Records waiting in the retry topic survive a stop: their positions are not committed
/// while they wait, so the next run reads them again and counts them once.
pub async fn waiting_retries_survive_a_restart(broker: &str) {
    let (bed, table) = enriched_bed(
        broker,
        "retry-restart",
        &[
            "retry.initial=3s",
            "retry.max=3s",
            "window.size=1h",
            "window.grace=1h",
            "window.idle_timeout=10m",
        ],
    );
    let data = lines(21, 600, 5, 0);
    let mut want: HashMap<String, u64> = HashMap::new();
    for l in &data {
        *want
            .entry(country_of(&user_of(l).unwrap()).to_string())
            .or_default() += 1;
    }
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let metrics = pipeline.metrics();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(pipeline.shutdown_on(stop.clone()).run());
    wait_for(&metrics, |s| s.retried >= data.len() as u64).await;
    stop.cancel();
    let first = run.await.unwrap().expect("first run").counters;
    background.cancel();
    assert_eq!(
        (first.windowed, first.retried),
        (0, data.len() as u64),
        "{first:?}"
    );

    bed.produce_to(&table, &(0..5).map(profile).collect::<Vec<_>>())
        .await;
    let (pipeline, background) = bed.assembled().await;
    let second = pipeline
        .exit_when_idle(Duration::from_secs(3))
        .run()
        .await
        .expect("second run")
        .counters;
    background.cancel();
    assert!(second.balanced(), "{second:?}");
    assert_eq!(
        (second.windowed, second.dead_letters, second.late),
        (data.len() as u64, 0, 0),
        "{second:?}"
    );
    let mut got: HashMap<String, u64> = HashMap::new();
    for r in bed
        // One result per country and hour; the data may start just before an hour.
        .read(
            &bed.config.sink.topic,
            2 * want.len(),
            Duration::from_secs(3),
        )
        .await
    {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let c = v["profile.country"].as_str().unwrap().to_string();
        *got.entry(c).or_default() += v["count"].as_u64().unwrap();
    }
    assert_eq!(got, want);
}
