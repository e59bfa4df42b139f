//! Event time per task: keyed partitions keep their own watermark, unkeyed input shares
//! one, partitions assigned later start from their own checkpoint, and a future-dated event
//! cannot drag the watermark along.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use weir_engine::operator::{Emitted, Outcome, WindowOperator};
use weir_engine::{Checkpoint, Job, Position, Record};

fn rec(partition: u32, offset: u64, key: Option<&str>, t: i64) -> Record {
    Record {
        key: key.map(|k| Bytes::from(k.to_string())),
        payload: Bytes::from(format!(r#"{{"k":"{}","t":{t}}}"#, key.unwrap_or("x"))),
        position: Position { partition, offset },
        ..Default::default()
    }
}

/// The results in `out` of the window that starts at `start` (an RFC 3339 fragment).
fn results_at(out: &Emitted, start: &str) -> Vec<String> {
    out.results
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .filter(|r| r.contains(start))
        .collect()
}

fn job() -> Job {
    Job::tumbling_count("k", "t", Duration::from_secs(10)).with_grace(Duration::from_secs(1))
}

fn now_ms() -> i64 {
    weir_engine::time::now_millis()
}

#[test]
fn keyed_partitions_keep_their_own_time() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None), (1, None)], now);
    let mut out = Emitted::default();
    // Partition 0 reads far ahead (a backlog read first, a partition assigned earlier).
    for (i, t) in [1_000, 50_000, 100_000].iter().enumerate() {
        let o = op.ingest(&rec(0, i as u64, Some("a"), *t), now, now_ms(), &mut out);
        assert_eq!(o, Outcome::Windowed);
    }
    // Partition 1's old events are not late: its own time has not moved.
    for (i, t) in [2_000, 3_000].iter().enumerate() {
        let o = op.ingest(&rec(1, i as u64, Some("b"), *t), now, now_ms(), &mut out);
        assert_eq!(o, Outcome::Windowed, "partition 1 at {t}");
    }
    assert!(!op.is_shared());
    op.close_ready(now, &|_| false, &mut out);
    let closed: Vec<String> = out
        .results
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .collect();
    assert_eq!(
        closed.len(),
        2,
        "partition 0 closed its two windows: {closed:?}"
    );
    assert!(
        closed.iter().all(|r| r.contains(r#""k":"a""#)),
        "{closed:?}"
    );
    assert_eq!(op.open_entries(), 2, "b's window and a's last stay open");
}

#[test]
fn an_unkeyed_record_merges_every_partition_into_one_time() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None), (1, None)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, Some("a"), 1_000), now, now_ms(), &mut out);
    op.ingest(&rec(1, 0, Some("b"), 1_500), now, now_ms(), &mut out);
    assert!(!op.is_shared());
    op.ingest(&rec(1, 1, None, 2_000), now, now_ms(), &mut out);
    assert!(op.is_shared(), "a record without the group key as its key");
    assert_eq!(op.open_entries(), 3, "nothing was lost in the merge");
    // One time now: partition 0 moving ahead closes nothing while partition 1 lags.
    op.ingest(&rec(0, 1, Some("a"), 60_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert!(out.results.is_empty());
    op.ingest(&rec(1, 2, None, 60_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert_eq!(out.results.len(), 3, "a, b and x of the first window");
}

#[test]
fn a_partition_assigned_later_replays_against_its_own_checkpoint() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    // Partition 0 comes back with a checkpoint far ahead of partition 1's.
    op.assign(
        &[(
            0,
            Some(Checkpoint {
                watermark: 90_000,
                processed: 5,
            }),
        )],
        now,
    );
    let mut out = Emitted::default();
    let o = op.ingest(&rec(0, 3, Some("a"), 40_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Replayed, "its window closed before the crash");
    // Later, partition 1 (held by a dead member until its session timed out).
    op.assign(
        &[
            (0, None),
            (
                1,
                Some(Checkpoint {
                    watermark: 30_000,
                    processed: 4,
                }),
            ),
        ],
        now,
    );
    let replayed = op.ingest(&rec(1, 2, Some("b"), 15_000), now, now_ms(), &mut out);
    assert_eq!(replayed, Outcome::Replayed, "closed at its own checkpoint");
    let counted = op.ingest(&rec(1, 3, Some("b"), 35_000), now, now_ms(), &mut out);
    assert_eq!(
        counted,
        Outcome::Windowed,
        "open at its own checkpoint: counted again"
    );
    let live = op.ingest(&rec(1, 4, Some("b"), 36_000), now, now_ms(), &mut out);
    assert_eq!(live, Outcome::Windowed, "not judged by partition 0's time");
    assert_eq!(op.checkpoint(1).watermark, 36_000);
    assert!(op.checkpoint(0).watermark >= 90_000);
}

#[test]
fn a_future_event_is_dead_lettered_and_a_near_one_cannot_pass_the_wall_clock() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    let wall = now_ms();
    let far = op.ingest(
        &rec(0, 0, Some("a"), wall + 2 * 3_600_000),
        now,
        wall,
        &mut out,
    );
    assert_eq!(far, Outcome::Dead);
    let reason = String::from_utf8_lossy(&out.dead[0].payload).to_string();
    assert!(reason.contains("more than 1h ahead"), "{reason}");
    // Ten minutes ahead: counted, but the watermark stops at the wall clock, so an event
    // of now is still on time (it would be late for ten minutes otherwise).
    let near = op.ingest(&rec(0, 1, Some("a"), wall + 600_000), now, wall, &mut out);
    assert_eq!(near, Outcome::Windowed);
    assert_eq!(op.watermark(), wall);
    let current = op.ingest(&rec(0, 2, Some("a"), wall), now, wall, &mut out);
    assert_eq!(current, Outcome::Windowed);
    let off = job().with_max_future(None);
    let mut op = WindowOperator::new(&off, "t");
    op.assign(&[(0, None)], now);
    let o = op.ingest(
        &rec(0, 0, Some("a"), wall + 2 * 3_600_000),
        now,
        wall,
        &mut out,
    );
    assert_eq!(o, Outcome::Windowed, "max_future = \"off\"");
}

#[test]
fn unkeyed_data_after_a_quiet_start_waits_for_every_partition() {
    let job = job().with_idle_timeout(Duration::from_secs(1));
    let mut op = WindowOperator::new(&job, "t");
    let t0 = Instant::now();
    op.assign(&[(0, None), (1, None)], t0);
    let mut out = Emitted::default();
    // Started before the data: both partitions idle.
    let t1 = t0 + Duration::from_secs(3);
    op.close_ready(t1, &|_| false, &mut out);
    // Partition 1's (unkeyed) records come first, far ahead in event time.
    for (i, t) in [1_000, 30_000, 60_000].iter().enumerate() {
        op.ingest(&rec(1, i as u64, None, *t), t1, now_ms(), &mut out);
    }
    assert!(op.is_shared());
    op.close_ready(t1, &|_| false, &mut out);
    assert!(out.results.is_empty(), "partition 0 holds the time again");
    let o = op.ingest(&rec(0, 0, None, 2_000), t1, now_ms(), &mut out);
    assert_eq!(
        o,
        Outcome::Windowed,
        "partition 0's first record is not late"
    );
}

#[test]
fn a_shared_task_holds_its_windows_while_partitions_of_the_topic_are_not_assigned_here() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    // A restart that joined while the killed member still holds partition 1.
    op.expect_partitions(Some(2));
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    assert!(op.is_shared() && op.holding());
    op.ingest(&rec(0, 1, None, 60_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert!(
        out.results.is_empty(),
        "no window closes on partition 0 alone"
    );
    // Partition 1 comes: its events count in the windows still open, which then close.
    op.assign(&[(0, None), (1, None)], now);
    assert!(!op.holding());
    let o = op.ingest(&rec(1, 0, None, 1_500), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Windowed);
    op.ingest(&rec(1, 1, None, 60_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    let first = results_at(&out, "1970-01-01T00:00:00");
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].contains(r#""count":2"#), "{first:?}");
}

#[test]
fn a_window_closed_by_several_partition_tasks_counts_once() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None), (1, None), (2, None)], now);
    let mut out = Emitted::default();
    // Three keyed partitions (three tasks), each with keys in the windows [0, 10 s) and
    // [10 s, 20 s).
    for p in 0..3u32 {
        let key = ["a", "b", "c"][p as usize];
        for (i, t) in [1_000, 2_000, 10_500].iter().enumerate() {
            op.ingest(&rec(p, i as u64, Some(key), *t), now, now_ms(), &mut out);
        }
    }
    assert!(!op.is_shared());
    assert_eq!(op.open_entries(), 6);
    assert_eq!(
        op.open_windows(),
        2,
        "two distinct windows, open in three tasks"
    );
    // Partition 0's time passes the first window: its key there closes.
    op.ingest(&rec(0, 3, Some("a"), 18_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert_eq!((out.results.len(), out.windows_closed), (1, 1));
    assert_eq!(
        op.open_windows(),
        2,
        "[0, 10 s) in two tasks, [10 s, 20 s) in three"
    );
    // Partitions 1 and 2 pass it later, in one step: their keys of it close, no new window.
    op.ingest(&rec(1, 3, Some("b"), 15_000), now, now_ms(), &mut out);
    op.ingest(&rec(2, 3, Some("c"), 15_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert_eq!(
        (out.results.len(), out.windows_closed),
        (3, 1),
        "[0, 10 s) closed in three tasks is one window"
    );
    // The end closes the rest: [10 s, 20 s), three keys in three tasks.
    op.close_all(&mut out);
    assert_eq!((out.results.len(), out.windows_closed), (6, 2));
    assert_eq!(op.open_windows(), 0);
}

/// Keys `a` in partition 0 and `b` in partition 1; partition 2 continues `parents` (a
/// shard split or merged) with more of the same windows.
fn resharded(parents: &[u32], continued: bool) -> Vec<String> {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None), (1, None)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, Some("a"), 1_000), now, now_ms(), &mut out);
    op.ingest(&rec(0, 1, Some("a"), 2_000), now, now_ms(), &mut out);
    op.ingest(&rec(1, 0, Some("b"), 3_000), now, now_ms(), &mut out);
    if continued {
        op.continues(2, parents);
    }
    op.assign(&[(0, None), (1, None), (2, None)], now);
    for (i, k) in ["a", "b", "a"].iter().enumerate() {
        op.ingest(&rec(2, i as u64, Some(k), 4_000), now, now_ms(), &mut out);
    }
    // The child reads on: its time passes the first window, which closes with every
    // record of it once the parents' time does too (or they are idle).
    op.ingest(&rec(2, 3, Some("a"), 30_000), now, now_ms(), &mut out);
    op.close_ready(now + Duration::from_secs(120), &|_| false, &mut out);
    op.close_all(&mut out);
    let mut results: Vec<String> = out
        .results
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .filter(|r| !r.contains(r#""window_start":"1970-01-01T00:00:30"#))
        .collect();
    results.sort();
    results
}

#[test]
fn a_split_or_merged_partition_counts_in_its_parents_task() {
    let count = |rs: &[String], k: &str| -> Vec<String> {
        rs.iter()
            .filter(|r| r.contains(&format!(r#""k":"{k}""#)) && r.contains("T00:00:00"))
            .cloned()
            .collect()
    };
    // A split of partition 0: a's window [0, 10 s) is one result of 4 events.
    let split = resharded(&[0], true);
    let a = count(&split, "a");
    assert_eq!(a.len(), 1, "{split:?}");
    assert!(a[0].contains(r#""count":4"#), "{a:?}");
    // A merge of partitions 0 and 1: a's and b's windows each one result, with every event.
    let merged = resharded(&[0, 1], true);
    let (a, b) = (count(&merged, "a"), count(&merged, "b"));
    assert_eq!((a.len(), b.len()), (1, 1), "{merged:?}");
    assert!(a[0].contains(r#""count":4"#), "{a:?}");
    assert!(b[0].contains(r#""count":2"#), "{b:?}");
    // Without it (as before), the child's task counts its part apart: two partial counts.
    let apart = resharded(&[0, 1], false);
    assert_eq!(count(&apart, "a").len(), 2, "{apart:?}");
}

/// After a restart a parent and its child can be assigned together (the parent's reader
/// reached its end at once): the child still counts in the parent's task, restored from
/// their checkpoints.
#[test]
fn a_child_assigned_with_its_parent_counts_in_the_parents_task() {
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    let cp = Some(Checkpoint {
        watermark: 500,
        processed: 0,
    });
    op.continues(2, &[0]);
    op.assign(&[(0, cp), (2, cp)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, Some("a"), 1_000), now, now_ms(), &mut out);
    op.ingest(&rec(2, 0, Some("a"), 2_000), now, now_ms(), &mut out);
    // The child reads far ahead: one task, so the parent's time holds the window open.
    op.ingest(&rec(2, 1, Some("a"), 60_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert!(out.results.is_empty(), "the parent holds the family's time");
    op.close_all(&mut out);
    let first = results_at(&out, "T00:00:00");
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].contains(r#""count":2"#), "{first:?}");
}

#[test]
fn unkeyed_input_whose_partitions_another_instance_takes_stops_the_pipeline() {
    let now = Instant::now();
    let mut out = Emitted::default();
    // Incremental: partition 1 alone is revoked while partition 0 stays.
    let mut op = WindowOperator::new(&job(), "t");
    op.assign(&[(0, None), (1, None)], now);
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    op.ingest(&rec(1, 0, None, 1_000), now, now_ms(), &mut out);
    assert!(op.is_shared() && op.conflict(now).is_none());
    op.revoke(&[1], false);
    let why = op
        .conflict(now)
        .expect("a partial revocation of a shared task stops it");
    assert!(
        why.contains("not keyed by the group key") && why.contains("[1]"),
        "{why}"
    );
    // Eager: everything is revoked, then a smaller share comes back.
    let mut op = WindowOperator::new(&job(), "t");
    op.assign(&[(0, None), (1, None)], now);
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    op.revoke(&[0, 1], false);
    assert!(op.conflict(now).is_none(), "all revoked: nothing is split");
    op.assign(&[(0, None)], now);
    let why = op
        .conflict(now)
        .expect("a smaller share after an eager rebalance");
    assert!(why.contains("[1]"), "{why}");
}

#[test]
fn a_reconnect_or_keyed_input_losing_partitions_goes_on() {
    let now = Instant::now();
    let mut out = Emitted::default();
    // A reconnect: every partition revoked, then all of them assigned again.
    let mut op = WindowOperator::new(&job(), "t");
    op.assign(&[(0, None), (1, None)], now);
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    op.revoke(&[0, 1], false);
    op.assign(&[(0, None), (1, None)], now);
    assert!(op.conflict(now).is_none());
    // Keyed input: each partition's windows are its own, another instance may take it.
    let mut op = WindowOperator::new(&job(), "t");
    op.assign(&[(0, None), (1, None)], now);
    op.ingest(&rec(0, 0, Some("a"), 1_000), now, now_ms(), &mut out);
    op.ingest(&rec(1, 0, Some("b"), 1_000), now, now_ms(), &mut out);
    op.revoke(&[1], false);
    op.assign(&[(0, None)], now);
    assert!(!op.is_shared() && op.conflict(now).is_none());
}

#[test]
fn a_shared_task_short_of_partitions_for_longer_than_any_takeover_stops_the_pipeline() {
    use weir_engine::operator::UNKEYED_HOLD_LIMIT;
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    // Two instances that started together, before the data: each has half.
    op.expect_partitions(Some(2));
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    assert!(op.holding());
    let later = Instant::now() + UNKEYED_HOLD_LIMIT - Duration::from_secs(1);
    assert!(
        op.conflict(later).is_none(),
        "a dead member's partitions may still come"
    );
    let why = op
        .conflict(later + Duration::from_secs(2))
        .expect("another instance reads partition 1");
    assert!(why.contains("only partitions [0] of the 2"), "{why}");
    // Had partition 1 come in time, the run would have gone on.
    let mut op = WindowOperator::new(&job(), "t");
    op.expect_partitions(Some(2));
    op.assign(&[(0, None)], now);
    op.ingest(&rec(0, 0, None, 1_000), now, now_ms(), &mut out);
    op.assign(&[(0, None), (1, None)], now);
    assert!(op.conflict(later + Duration::from_secs(2)).is_none());
}

#[test]
fn windows_recounted_under_an_older_checkpoint_are_dropped_when_a_later_one_comes() {
    // A shared task taken over partition by partition: partition 1's last commit is older
    // (its lease was taken while the old owner went on), partition 0's says the window
    // [10 s, 20 s) was delivered whole.
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    let cp = |watermark, processed| {
        Some(Checkpoint {
            watermark,
            processed,
        })
    };
    op.expect_partitions(Some(2));
    op.assign(&[(1, cp(5_000, 10))], now);
    let mut out = Emitted::default();
    let o = op.ingest(&rec(1, 0, None, 12_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Windowed, "a replay into a window open at 5 s");
    op.assign(&[(0, cp(30_000, 5)), (1, None)], now);
    op.close_all(&mut out);
    assert!(
        out.results.is_empty(),
        "the window was delivered before with every partition's count: {:?}",
        out.results
    );
}

#[test]
fn a_replayed_record_cannot_reopen_a_window_this_run_closed() {
    // Restarted from a checkpoint that marks offsets below 10 processed; the replay brings
    // an event, one far ahead that closes its window, then a straggler of that window
    // (late in the first run too: its late outcome was delivered before the restart).
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    let cp = Checkpoint {
        watermark: 0,
        processed: 10,
    };
    op.assign(&[(0, Some(cp))], now);
    let mut out = Emitted::default();
    let o = op.ingest(&rec(0, 0, Some("a"), 5_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Windowed);
    op.ingest(&rec(0, 1, Some("a"), 100_000), now, now_ms(), &mut out);
    op.close_ready(now, &|_| false, &mut out);
    assert_eq!(out.results.len(), 1, "[0 s, 10 s) closed once");
    let o = op.ingest(&rec(0, 2, Some("a"), 6_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Replayed);
    op.close_all(&mut out);
    let first = results_at(&out, "1970-01-01T00:00:00");
    assert_eq!(first.len(), 1, "the window is emitted once: {first:?}");
}

#[test]
fn windows_emitted_at_an_idle_exit_are_late_for_the_next_run() {
    // A bounded run ends idle: its open window is emitted whole as it stands, and the
    // checkpoint committed after says so.
    let mut op = WindowOperator::new(&job(), "t");
    let now = Instant::now();
    op.assign(&[(0, None)], now);
    let mut out = Emitted::default();
    op.ingest(&rec(0, 0, Some("a"), 5_000), now, now_ms(), &mut out);
    op.close_all(&mut out);
    assert_eq!(out.results.len(), 1);
    let cp = op.checkpoint(0);
    assert!(cp.watermark >= 11_000, "{cp:?}");
    // The next run gets a straggler of that window: late, not a second result for it.
    let mut next = WindowOperator::new(&job(), "t");
    next.assign(&[(0, Some(cp))], now);
    let mut out = Emitted::default();
    let o = next.ingest(&rec(0, 1, Some("a"), 6_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Late);
    let o = next.ingest(&rec(0, 2, Some("a"), 12_000), now, now_ms(), &mut out);
    assert_eq!(o, Outcome::Windowed, "the next window is open");
}
