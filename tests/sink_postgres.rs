//! `[sink] type = "postgres"` against a real PostgreSQL server (`scripts/brokers up
//! postgres`; `WEIR_POSTGRES_URL` for another): results from `--input` equal an
//! independent count and a second run changes nothing; a table that does not fit stops
//! the run before it reads anything, naming the column; settings are checked at their
//! `file:line:col`; a server crashed and restarted mid-run loses nothing (a server of the
//! test's own). The kill -9 test is in `tests/crash.rs` (`kafka_postgres_…`). Without a
//! server these tests fail, never skip.

mod conformance;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use conformance::oracle;
use conformance::stores::{self, pg};
use weir_engine::generate::dataset;

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn data(seed: u64, events: usize) -> Vec<Vec<u8>> {
    dataset(seed, events, 300, 50)
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_input_results_equal_the_oracle_and_a_second_run_changes_nothing() {
    let url = pg::url();
    let client = pg::client(&url).await;
    let table = pg::unique_table("input");
    let dir = tempfile::tempdir().unwrap();
    let file = pg::pipeline(dir.path(), &url, &table);
    let data = data(11, 30_000);
    let want = oracle(&data);
    assert!(want.len() > 1_000);
    let run = || {
        let (status, stderr) = stores::run_input(dir.path(), &file, &data);
        assert!(status.success(), "weir run: {status}\n{stderr}");
    };
    run();
    let (got, rows) = pg::counts(&client, &table).await;
    assert_eq!(rows, want.len(), "one row per window");
    assert_eq!(got, want);
    let stamp_sql = format!("SELECT max(updated_at)::text, count(*) FROM {table}");
    let stamp = |r: tokio_postgres::Row| (r.get::<_, String>(0), r.get::<_, i64>(1));
    let before = stamp(client.query_one(&stamp_sql, &[]).await.unwrap());
    // The same results again (what a replay after a crash writes): same rows, none
    // rewritten.
    run();
    let (again, rows) = pg::counts(&client, &table).await;
    assert_eq!(rows, want.len());
    assert_eq!(again, want);
    assert_eq!(
        stamp(client.query_one(&stamp_sql, &[]).await.unwrap()),
        before,
        "unchanged rows are not written again"
    );
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_table_whose_columns_do_not_fit_stops_the_run_at_start_naming_the_column() {
    let url = pg::url();
    let client = pg::client(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "wrongtype",
            "user_id text, window_start timestamptz, window_end timestamptz, count text, \
             updated_at timestamptz, PRIMARY KEY (user_id, window_start)",
            "column `count` of table TABLE is text, but the results need bigint",
        ),
        (
            "missing",
            "user_id text, window_start timestamptz, window_end timestamptz, \
             updated_at timestamptz, PRIMARY KEY (user_id, window_start)",
            "table TABLE has no column `count`",
        ),
        (
            "notnull",
            "user_id text, window_start timestamptz, window_end timestamptz, count bigint, \
             updated_at timestamptz, owner text NOT NULL, PRIMARY KEY (user_id, window_start)",
            "column `owner` of table TABLE is NOT NULL without a default",
        ),
        (
            "nokey",
            "user_id text, window_start timestamptz, window_end timestamptz, count bigint, \
             updated_at timestamptz",
            "table TABLE has no primary key or unique index on (\"user_id\", \"window_start\")",
        ),
    ];
    for (case, columns, message) in cases {
        let table = pg::unique_table(case);
        client
            .batch_execute(&format!("CREATE TABLE {table} ({columns})"))
            .await
            .unwrap();
        let file = pg::pipeline(dir.path(), &url, &table);
        let (status, stderr) = stores::run_input(dir.path(), &file, &data(3, 100));
        assert_eq!(status.code(), Some(1), "{case}: {stderr}");
        let message = message.replace("TABLE", &table);
        assert!(
            stderr.contains(&message),
            "{case}: want `{message}` in:\n{stderr}"
        );
        assert!(
            !stderr.contains("pipeline started"),
            "{case}: refused before reading anything:\n{stderr}"
        );
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{case}: nothing written");
        client
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
    }
}

#[test]
fn postgres_settings_are_checked_at_their_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let file = pg::pipeline(
        dir.path(),
        "postgresql://weir@127.0.0.1:nope/weir",
        "stats;drop",
    );
    // One more problem: a key the sink does not have.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[sink]\n", "[sink]\nbatch = 5\n");
    std::fs::write(&file, &text).unwrap();
    stores::validate_fails(
        &file,
        &[],
        &[
            "FILE:@LINE(batch):1: sink.batch: unknown key",
            "FILE:@LINE(url):7: sink.url: not a PostgreSQL connection string",
            "FILE:@LINE(table):9: sink.table: `stats;drop` is not a table name",
        ],
    );
    // An unknown store, at its `type`.
    stores::validate_fails(
        &file,
        &["sink.type=mysql"],
        &["sink.type: unknown sink type `mysql` (choose among topic, postgres, redis)"],
    );
    // `weir tail` has no topic to read: it says where the results are.
    let file = pg::pipeline(dir.path(), &pg::url(), "stats");
    let out = weir()
        .args(["tail", "--broker", "kafka"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the results of this pipeline go to postgres table stats, not to a topic"),
        "{stderr}"
    );
}

/// The database crashes (SIGQUIT: immediate shutdown, recovery from the WAL at the next
/// start) while results are being written, stays down while more windows close, and comes
/// back: the sink retries, the pipeline waits, and the table equals the independent count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = pg::OwnServer::start(dir.path()).await;
    let url = server.url();
    let table = pg::unique_table("restart");
    let file = pg::pipeline(dir.path(), &url, &table);
    let data = data(23, 45_000);
    let want = oracle(&data);
    let log = dir.path().join("weir.log");
    let mut weir = weir()
        .arg("run")
        .arg(&file)
        .arg("--input")
        .arg("-")
        .arg("--dead-letter")
        .arg(dir.path().join("dead.jsonl"))
        .env("WEIR_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = weir.stdin.take().unwrap();
    let thirds: Vec<Vec<Vec<u8>>> = data.chunks(data.len() / 3 + 1).map(<[_]>::to_vec).collect();
    let feed = |stdin: &mut std::process::ChildStdin, part: &[Vec<u8>]| {
        for l in part {
            stdin.write_all(l).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
        stdin.flush().unwrap();
    };
    feed(&mut stdin, &thirds[0]);
    // Results of the first third are in the table: the database is in use.
    let client = pg::client(&url).await;
    let mut written = 0;
    for _ in 0..150 {
        written = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_or(0, |r| r.get::<_, i64>(0));
        if written > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(written > 0, "no result written before the crash");
    drop(client);
    server.crash();
    // More windows close while it is down (the feeder may block once the pipeline waits).
    let second = thirds[1].clone();
    let feeder = std::thread::spawn(move || {
        feed(&mut stdin, &second);
        stdin
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.restart().await;
    let mut stdin = feeder.join().unwrap();
    feed(&mut stdin, &thirds[2]);
    drop(stdin);
    let status = tokio::task::spawn_blocking(move || weir.wait().unwrap())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "weir run: {status}\n{text}");
    assert!(
        text.contains("send failed; retrying"),
        "the sink met the outage and retried:\n{text}"
    );
    let client = pg::client(&url).await;
    let (got, rows) = pg::counts(&client, &table).await;
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} windows missing\n{text}",
        want.len()
    );
    assert_eq!(rows, want.len());
    assert_eq!(got, want);
    eprintln!(
        "postgres restarted mid-run: {written} rows before the crash, {} windows exact, {} retries logged",
        want.len(),
        text.matches("send failed; retrying").count()
    );
}
