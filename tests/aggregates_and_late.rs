//! Aggregates beyond count, grouping by several (nested) fields, the late-event policies
//! and window configuration errors.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use weir_engine::aggregate::AggFn;
use weir_engine::config::{load_str, EmitMode, LatePolicy, Overrides};
use weir_engine::operator::{Emitted, Outcome, WindowOperator};
use weir_engine::window::WindowKind;
use weir_engine::{Job, Position, Record};

fn rec(offset: u64, json: &str) -> Record {
    Record {
        payload: Bytes::from(json.to_string()),
        position: Position {
            partition: 0,
            offset,
        },
        ..Default::default()
    }
}

fn run(job: &Job, events: &[&str]) -> (Emitted, Vec<Outcome>) {
    let mut op = WindowOperator::new(job, "t");
    let now = Instant::now();
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    let outcomes = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            op.ingest(
                &rec(i as u64, e),
                now,
                weir_engine::time::now_millis(),
                &mut out,
            )
        })
        .collect();
    op.close_all(&mut out);
    (out, outcomes)
}

fn json(r: &weir_engine::OutRecord) -> serde_json::Value {
    serde_json::from_slice(&r.payload).unwrap()
}

#[test]
fn every_aggregate_grouped_by_nested_fields() {
    let job = Job::tumbling_count("unused", "t", Duration::from_secs(10))
        .with_group_by(&["shop.country", "kind"])
        .with_aggregates(
            [
                "count",
                "sum(order.amount)",
                "min(order.amount)",
                "max(order.amount)",
                "mean(order.amount)",
                "count_distinct(user)",
            ]
            .iter()
            .map(|a| AggFn::parse(a).unwrap())
            .collect(),
        );
    let (out, outcomes) = run(
        &job,
        &[
            r#"{"t":1000,"shop":{"country":"FR"},"kind":"web","order":{"amount":10},"user":"a"}"#,
            r#"{"t":2000,"shop":{"country":"FR"},"kind":"web","order":{"amount":2.5},"user":"b"}"#,
            r#"{"t":3000,"shop":{"country":"FR"},"kind":"web","order":{"amount":-1},"user":"a"}"#,
            r#"{"t":4000,"shop":{"country":"FR"},"kind":"web","user":"c"}"#,
            r#"{"t":5000,"shop":{"country":"DE"},"kind":"web","order":{"amount":null},"user":"d"}"#,
            r#"{"t":6000,"shop":{"country":"DE"},"kind":"web","order":{"amount":"lots"},"user":"d"}"#,
        ],
    );
    assert_eq!(
        outcomes[5],
        Outcome::Dead,
        "a non-number in sum() is a dead letter"
    );
    let dl = json(&out.dead[0]);
    assert!(
        dl["error"]
            .as_str()
            .unwrap()
            .contains("field `order.amount`: sum_amount needs a number"),
        "{dl}"
    );
    let fr = out
        .results
        .iter()
        .map(json)
        .find(|v| v["shop.country"] == "FR")
        .unwrap();
    assert_eq!(fr["kind"], "web");
    assert_eq!(fr["count"], 4);
    assert_eq!(fr["sum_amount"], 11.5);
    assert_eq!(fr["min_amount"], -1.0);
    assert_eq!(fr["max_amount"], 10.0);
    assert!((fr["mean_amount"].as_f64().unwrap() - 11.5 / 3.0).abs() < 1e-9);
    assert_eq!(fr["distinct_user"], 3);
    let de = out
        .results
        .iter()
        .map(json)
        .find(|v| v["shop.country"] == "DE")
        .unwrap();
    assert_eq!(
        (de["count"].as_u64(), de["sum_amount"].as_f64()),
        (Some(1), Some(0.0))
    );
    assert!(
        de["min_amount"].is_null() && de["mean_amount"].is_null(),
        "no values: null, like SQL"
    );
    assert_eq!(
        out.results[0].key.as_deref().map(|k| k.contains(&b'|')),
        Some(true),
        "composite keys join with |"
    );
}

const LATE: [&str; 3] = [
    r#"{"k":"a","t":1000}"#,
    r#"{"k":"a","t":25000}"#,
    r#"{"k":"a","t":2000}"#,
];

#[test]
fn late_events_go_to_the_late_output_unchanged() {
    let job = Job::tumbling_count("k", "t", Duration::from_secs(10))
        .with_late(LatePolicy::Output("late".into()));
    let (out, outcomes) = run(&job, &LATE);
    assert_eq!(
        outcomes,
        vec![Outcome::Windowed, Outcome::Windowed, Outcome::Late]
    );
    assert!(out.dead.is_empty());
    assert_eq!(out.late.len(), 1);
    assert_eq!(&out.late[0].payload[..], LATE[2].as_bytes());
    assert_eq!(
        out.late[0].header("weir.late.window_start").unwrap(),
        "1970-01-01T00:00:00Z"
    );
    assert_eq!(
        out.late[0].header("weir.late.watermark").unwrap(),
        "1970-01-01T00:00:25Z"
    );
    let first = out
        .results
        .iter()
        .map(json)
        .find(|v| v["window_start"] == "1970-01-01T00:00:00Z")
        .unwrap();
    assert_eq!(first["count"], 1, "never merged into the closed window");
}

#[test]
fn late_events_can_be_dropped_or_dead_lettered_and_are_counted() {
    let drop = Job::tumbling_count("k", "t", Duration::from_secs(10)).with_late(LatePolicy::Drop);
    let (out, outcomes) = run(&drop, &LATE);
    assert_eq!(outcomes[2], Outcome::Late);
    assert!(out.late.is_empty() && out.dead.is_empty());
    let dead = Job::tumbling_count("k", "t", Duration::from_secs(10));
    let (out, _) = run(&dead, &LATE);
    assert!(json(&out.dead[0])["error"]
        .as_str()
        .unwrap()
        .starts_with("late event: window 1970-01-01T00:00:00Z..1970-01-01T00:00:10Z"));
}

#[test]
fn update_mode_emits_changes_then_the_final_result() {
    let job = Job::tumbling_count("k", "t", Duration::from_secs(10)).with_emit(EmitMode::Update);
    let mut op = WindowOperator::new(&job, "t");
    let now = Instant::now();
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    for (i, batch) in [[1000, 2000], [3000, 12000]].iter().enumerate() {
        for (j, t) in batch.iter().enumerate() {
            op.ingest(
                &rec((i * 2 + j) as u64, &format!(r#"{{"k":"a","t":{t}}}"#)),
                now,
                0,
                &mut out,
            );
        }
        op.close_ready(now, &|_| false, &mut out);
    }
    op.close_all(&mut out);
    let seen: Vec<(String, u64, bool)> = out
        .results
        .iter()
        .map(json)
        .map(|v| {
            (
                v["window_start"].as_str().unwrap()[17..19].to_string(),
                v["count"].as_u64().unwrap(),
                v["final"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("00".into(), 2, false), // after batch 1
            ("00".into(), 3, false), // after batch 2 ...
            ("10".into(), 1, false),
            ("00".into(), 3, true), // ... closed at end of input
            ("10".into(), 1, true),
        ]
    );
}

#[test]
fn window_settings_are_checked_per_kind() {
    let base = "[source]\ntopic='a'\n[aggregate]\ngroup_by='k'\ncompute=['count','sum(x)','sum(x)','p99(x)']\n[sink]\ntopic='b'\n[dead_letter]\ntopic='c'\n[late]\n";
    let text = format!(
        "{base}[window]\ntype='hopping'\nsize='10s'\nadvance='20s'\ngap='1s'\nemit='often'\n"
    );
    let err = load_str("p.toml", &text, &Overrides::default())
        .finish()
        .unwrap_err()
        .to_string();
    for want in [
        "p.toml:5:9: aggregate.compute: `sum(x)` is listed twice",
        "p.toml:5:9: aggregate.compute: unknown aggregate `p99(x)`",
        "late: set `topic` (a late-events topic) or `drop = true`",
        "p.toml:14:9: window.advance: must not be larger than `size`",
        "p.toml:15:5: window.gap: does not apply to hopping windows",
        "p.toml:16:6: window.emit: unknown emit mode `often`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    let session = "[source]\ntopic='a'\n[aggregate]\ngroup_by='k'\n[sink]\ntopic='b'\n[dead_letter]\ntopic='c'\n[window]\ntype='session'\n";
    let err = load_str("p.toml", session, &Overrides::default())
        .finish()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("window.gap: session windows need `gap`"),
        "{err}"
    );
    let ok = load_str(
        "p.toml",
        &format!("{session}gap='30s'\n"),
        &Overrides::default(),
    )
    .finish()
    .unwrap();
    assert_eq!(ok.window.kind, WindowKind::Session { gap: 30_000 });
}
