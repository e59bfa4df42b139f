//! Property tests of the windowed operator against a brute-force oracle: random event
//! orders, several partitions at different speeds, disorder within and beyond grace,
//! random batch boundaries.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tokio::time::Instant;
use weir_engine::operator::{Emitted, Outcome, WindowOperator};
use weir_engine::window::WindowKind;
use weir_engine::{Job, Position, Record};

const SIZE: i64 = 1_000;

#[derive(Debug, Clone)]
struct Ev {
    partition: u32,
    key: u8,
    t: i64,
}

/// Per partition: a base clock moving forward at its own speed, each event up to
/// `disorder` ms earlier than the clock. Interleaved by a random schedule.
fn scenario(max_disorder: i64) -> impl Strategy<Value = (Vec<Ev>, usize, i64)> {
    (1u32..=3, 0..=max_disorder, 1usize..=64).prop_flat_map(move |(parts, disorder, batch)| {
        let per_part = prop::collection::vec((0u8..5, 0i64..=disorder, 1i64..=300), 0..60);
        (
            prop::collection::vec(per_part, parts as usize),
            prop::collection::vec(0u32..parts, 0..200),
            Just(batch),
            Just(disorder),
        )
            .prop_map(|(streams, schedule, batch, disorder)| {
                let mut evs: Vec<Vec<Ev>> = streams
                    .iter()
                    .enumerate()
                    .map(|(p, s)| {
                        let mut clock = 10_000;
                        s.iter()
                            .map(|&(key, back, step)| {
                                clock += step;
                                Ev {
                                    partition: p as u32,
                                    key,
                                    t: clock - back,
                                }
                            })
                            .collect()
                    })
                    .collect();
                for v in &mut evs {
                    v.reverse();
                }
                let mut out = Vec::new();
                for p in schedule {
                    if let Some(e) = evs[p as usize].pop() {
                        out.push(e);
                    }
                }
                for v in &mut evs {
                    while let Some(e) = v.pop() {
                        out.push(e);
                    }
                }
                (out, batch, disorder)
            })
    })
}

/// Runs the operator over `evs` in batches; returns result counts and the outcomes.
fn run(
    evs: &[Ev],
    batch: usize,
    grace: i64,
    partitions: u32,
) -> (HashMap<(String, i64), u64>, Vec<Outcome>) {
    let (got, outcomes) = run_kind(
        evs,
        batch,
        grace,
        partitions,
        WindowKind::Tumbling { size: SIZE },
    );
    (
        got.into_iter().map(|((k, s, _), c)| ((k, s), c)).collect(),
        outcomes,
    )
}

type Results = HashMap<(String, i64, i64), u64>;

/// Runs the operator with any window kind; results keyed by (key, start, end).
fn run_kind(
    evs: &[Ev],
    batch: usize,
    grace: i64,
    partitions: u32,
    kind: WindowKind,
) -> (Results, Vec<Outcome>) {
    let job = Job::tumbling_count("k", "t", Duration::from_millis(SIZE as u64))
        .with_window(kind)
        .with_grace(Duration::from_millis(grace as u64));
    let mut op = WindowOperator::new(&job, "props");
    let now = Instant::now();
    op.assign(&(0..partitions).map(|p| (p, None)).collect::<Vec<_>>(), now);
    let mut offsets = vec![0u64; partitions as usize];
    let mut out = Emitted::default();
    let mut outcomes = Vec::new();
    for chunk in evs.chunks(batch) {
        for e in chunk {
            let rec = Record {
                payload: Bytes::from(format!(r#"{{"k":"k{}","t":{}}}"#, e.key, e.t)),
                position: Position {
                    partition: e.partition,
                    offset: offsets[e.partition as usize],
                },
                ..Default::default()
            };
            offsets[e.partition as usize] += 1;
            outcomes.push(op.ingest(&rec, now, weir_engine::time::now_millis(), &mut out));
            assert!(
                out.late.is_empty(),
                "late events go to dead letters by default"
            );
        }
        op.close_ready(now, &|_| false, &mut out);
    }
    op.close_all(&mut out);
    assert_eq!(op.open_entries(), 0, "state is dropped once emitted");
    let mut counts = HashMap::new();
    let ms = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    for r in &out.results {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let key = (
            v["k"].as_str().unwrap().to_string(),
            ms(&v["window_start"]),
            ms(&v["window_end"]),
        );
        assert!(
            counts.insert(key, v["count"].as_u64().unwrap()).is_none(),
            "one result per (key, window)"
        );
    }
    (counts, outcomes)
}

/// The oracle's watermark after each event: recomputed from scratch.
fn watermarks(evs: &[Ev], partitions: u32) -> Vec<i64> {
    let mut max = vec![i64::MIN; partitions as usize];
    let mut wm = i64::MIN;
    evs.iter()
        .map(|e| {
            max[e.partition as usize] = max[e.partition as usize].max(e.t);
            wm = wm.max(*max.iter().min().unwrap());
            wm
        })
        .collect()
}

/// Hopping oracle: an event counts in each of its windows not yet closed when it arrives;
/// it is late when all of them had closed.
fn hopping_oracle(
    evs: &[Ev],
    grace: i64,
    partitions: u32,
    size: i64,
    advance: i64,
) -> (Results, usize) {
    let mut counts = Results::new();
    let mut late = 0;
    for (e, wm) in evs.iter().zip(watermarks(evs, partitions)) {
        let mut any = false;
        let mut start = e.t.div_euclid(advance) * advance;
        while start > e.t - size {
            if start + size + grace > wm {
                any = true;
                *counts
                    .entry((format!("k{}", e.key), start, start + size))
                    .or_insert(0) += 1;
            }
            start -= advance;
        }
        late += usize::from(!any);
    }
    (counts, late)
}

/// Session oracle: an event is late when the watermark passed it by more than grace; the
/// others form, per key, the connected components of their [t, t + gap) intervals.
fn session_oracle(evs: &[Ev], grace: i64, partitions: u32, gap: i64) -> (Results, usize) {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    let mut late = 0;
    for (e, wm) in evs.iter().zip(watermarks(evs, partitions)) {
        if e.t + grace < wm {
            late += 1;
        } else {
            by_key.entry(format!("k{}", e.key)).or_default().push(e.t);
        }
    }
    let mut counts = Results::new();
    for (k, mut ts) in by_key {
        ts.sort_unstable();
        let (mut start, mut end, mut n) = (ts[0], ts[0] + gap, 0);
        for t in ts {
            if t >= end {
                counts.insert((k.clone(), start, end), n);
                (start, n) = (t, 0);
            }
            end = end.max(t + gap);
            n += 1;
        }
        counts.insert((k, start, end), n);
    }
    (counts, late)
}

/// The brute-force oracle: recompute the watermark from scratch after every event (the
/// minimum over partitions of their highest event time), an event is late when its
/// window's end + grace is at or below it, everything else is counted.
fn oracle(evs: &[Ev], grace: i64, partitions: u32) -> (HashMap<(String, i64), u64>, usize) {
    let mut max = vec![i64::MIN; partitions as usize];
    let mut wm = i64::MIN;
    let mut counts = HashMap::new();
    let mut late = 0;
    for e in evs {
        max[e.partition as usize] = max[e.partition as usize].max(e.t);
        wm = wm.max(*max.iter().min().unwrap());
        let start = e.t.div_euclid(SIZE) * SIZE;
        if start + SIZE + grace <= wm {
            late += 1;
        } else {
            *counts.entry((format!("k{}", e.key), start)).or_insert(0) += 1;
        }
    }
    (counts, late)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Disorder within grace: nothing is late, and the counts are exact.
    #[test]
    fn within_grace_counts_are_exact((evs, batch, disorder) in scenario(2_500)) {
        let partitions = evs.iter().map(|e| e.partition + 1).max().unwrap_or(1);
        let (got, outcomes) = run(&evs, batch, disorder, partitions);
        prop_assert!(outcomes.iter().all(|o| *o == Outcome::Windowed));
        let mut want: HashMap<(String, i64), u64> = HashMap::new();
        for e in &evs {
            *want.entry((format!("k{}", e.key), e.t.div_euclid(SIZE) * SIZE)).or_insert(0) += 1;
        }
        prop_assert_eq!(got, want);
    }

    /// Any disorder, any grace: results and late events are exactly the oracle's, and
    /// every event is either counted or late.
    #[test]
    fn beyond_grace_matches_the_oracle((evs, batch, _d) in scenario(3_000), grace in 0i64..1_500) {
        let partitions = evs.iter().map(|e| e.partition + 1).max().unwrap_or(1);
        let (got, outcomes) = run(&evs, batch, grace, partitions);
        let (want, late) = oracle(&evs, grace, partitions);
        prop_assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Late).count(), late);
        prop_assert_eq!(got.values().sum::<u64>() as usize + late, evs.len());
        prop_assert_eq!(got, want);
    }

    /// Hopping windows: every event in every open window covering it, exactly.
    #[test]
    fn hopping_matches_the_oracle(
        (evs, batch, _d) in scenario(3_000),
        grace in 0i64..1_500,
        (size, advance) in (1i64..=4).prop_flat_map(|n| (Just(n * 500), prop::sample::select(vec![250i64, 500]))),
    ) {
        let partitions = evs.iter().map(|e| e.partition + 1).max().unwrap_or(1);
        let (got, outcomes) = run_kind(&evs, batch, grace, partitions, WindowKind::Hopping { size, advance });
        let (want, late) = hopping_oracle(&evs, grace, partitions, size, advance);
        prop_assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Late).count(), late);
        prop_assert_eq!(got, want);
    }

    /// Session windows, merges across late-but-allowed events included, exactly.
    #[test]
    fn sessions_match_the_oracle(
        (evs, batch, _d) in scenario(3_000),
        grace in 0i64..1_500,
        gap in 50i64..2_000,
    ) {
        let partitions = evs.iter().map(|e| e.partition + 1).max().unwrap_or(1);
        let (got, outcomes) = run_kind(&evs, batch, grace, partitions, WindowKind::Session { gap });
        let (want, late) = session_oracle(&evs, grace, partitions, gap);
        prop_assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Late).count(), late);
        prop_assert_eq!(got.values().sum::<u64>() as usize + late, evs.len());
        prop_assert_eq!(got, want);
    }
}
