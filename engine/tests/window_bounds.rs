//! Window state is bounded: a definition that would put an event in too many windows does
//! not run, and `window.max_open_entries` refuses (as dead letters) the events that would
//! open more (window, key) entries, until closing windows make room.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use weir_engine::operator::{Emitted, Outcome, WindowOperator};
use weir_engine::window::{WindowKind, MAX_WINDOWS_PER_EVENT};
use weir_engine::{Job, Position, Record};

fn rec(offset: u64, key: &str, t: i64) -> Record {
    Record {
        key: Some(Bytes::from(key.to_string())),
        payload: Bytes::from(format!(r#"{{"k":"{key}","t":{t}}}"#)),
        position: Position {
            partition: 0,
            offset,
        },
        ..Default::default()
    }
}

/// Hopping windows of 10 s every 1 s: ten per event.
fn hopping(max_open: usize) -> Job {
    Job::tumbling_count("k", "t", Duration::from_secs(10))
        .with_window(WindowKind::Hopping {
            size: 10_000,
            advance: 1_000,
        })
        .with_max_open_entries(max_open)
}

fn now_ms() -> i64 {
    weir_engine::time::now_millis()
}

#[test]
fn events_that_would_open_entries_past_the_bound_are_dead_letters() {
    let mut op = WindowOperator::new(&hopping(25), "t");
    let now = Instant::now();
    let mut out = Emitted::default();
    let ingest = |op: &mut WindowOperator, o, k, t, out: &mut Emitted| {
        op.ingest(&rec(o, k, t), now, now_ms(), out)
    };
    assert_eq!(ingest(&mut op, 0, "a", 1_000, &mut out), Outcome::Windowed);
    assert_eq!(ingest(&mut op, 1, "b", 1_000, &mut out), Outcome::Windowed);
    assert_eq!(op.open_entries(), 20);
    // Ten more would make 30.
    assert_eq!(ingest(&mut op, 2, "c", 1_000, &mut out), Outcome::Dead);
    let reason = String::from_utf8_lossy(out.dead[0].header("weir.error").unwrap()).to_string();
    assert_eq!(
        reason,
        "window state is full: 20 open (window, key) entries, and this event would open 10 more \
         (window.max_open_entries = 25)"
    );
    // Entries that exist still count; one new window of `a` fits.
    assert_eq!(ingest(&mut op, 3, "a", 1_500, &mut out), Outcome::Windowed);
    assert_eq!(ingest(&mut op, 4, "a", 2_000, &mut out), Outcome::Windowed);
    assert_eq!(op.open_entries(), 21);
    // An event far ahead is refused too, but moves time on: the windows it closes make
    // room for the next.
    assert_eq!(ingest(&mut op, 5, "b", 100_000, &mut out), Outcome::Dead);
    op.close_ready(now, &|_| false, &mut out);
    assert_eq!(op.open_entries(), 0);
    assert_eq!(
        ingest(&mut op, 6, "c", 100_000, &mut out),
        Outcome::Windowed
    );
    assert_eq!(out.dead.len(), 2);
}

/// However many distinct keys arrive, the state stays at the bound.
#[test]
fn no_input_takes_the_state_past_the_bound() {
    let max = 1_000;
    let mut op = WindowOperator::new(&hopping(max), "t");
    let now = Instant::now();
    let mut out = Emitted::default();
    let mut windowed = 0;
    for i in 0..10_000u64 {
        let o = op.ingest(
            &rec(i, &format!("user-{i}"), 5_000 + i as i64),
            now,
            now_ms(),
            &mut out,
        );
        windowed += u64::from(o == Outcome::Windowed);
        assert!(op.open_entries() <= max, "{} entries", op.open_entries());
    }
    assert_eq!(windowed, 100, "ten windows each: room for a hundred keys");
    assert_eq!(out.dead.len(), 9_900);
}

#[test]
fn a_window_with_too_many_windows_per_event_does_not_run() {
    let job =
        Job::tumbling_count("k", "t", Duration::from_secs(10)).with_window(WindowKind::Hopping {
            size: 86_400_000,
            advance: 1,
        });
    assert_eq!(job.window.kind.windows_per_event(), 86_400_000);
    let err = job.check(false, false).unwrap_err();
    assert!(err.contains("86400000 windows"), "{err}");
    let fine = job.with_window(WindowKind::Hopping {
        size: MAX_WINDOWS_PER_EVENT as i64,
        advance: 1,
    });
    assert_eq!(fine.check(false, false), Ok(()));
}
