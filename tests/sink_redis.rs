//! `[sink] type = "redis"` against a real Redis (`scripts/brokers up redis`;
//! `WEIR_REDIS_URL` for another): results from `--input` equal an independent count, each
//! in its hash and in the window index, and a second run adds nothing; settings are checked
//! at their `file:line:col`. The kill -9 tests are in `tests/crash.rs` (`kafka_redis_…`).
//! Without a server these tests fail, never skip.

mod conformance;
mod stores;

use std::io::Write as _;
use std::process::Command;

use conformance::oracle;
use stores::redis;
use weir_engine::generate::dataset;

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_input_results_equal_the_oracle_and_a_second_run_adds_nothing() {
    let url = redis::url();
    let mut conn = redis::connect(&url).await;
    let prefix = stores::unique_name("input");
    let dir = tempfile::tempdir().unwrap();
    let file = redis::pipeline(dir.path(), &url, &prefix);
    let data: Vec<String> = dataset(13, 30_000, 300, 50);
    let want = oracle(
        &data
            .iter()
            .map(|l| l.clone().into_bytes())
            .collect::<Vec<_>>(),
    );
    assert!(want.len() > 1_000);
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for l in &data {
        writeln!(f, "{l}").unwrap();
    }
    for run in 0..2 {
        let out = weir()
            .arg("run")
            .arg(&file)
            .arg("--input")
            .arg(&input)
            .arg("--dead-letter")
            .arg(dir.path().join("dead.jsonl"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (got, hashes) = redis::counts(&mut conn, &prefix).await;
        assert_eq!(hashes, want.len(), "run {run}: one hash per window");
        assert_eq!(got, want, "run {run}");
    }
}

#[test]
fn redis_settings_are_checked_at_their_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let file = redis::pipeline(dir.path(), "http://127.0.0.1:16379", "a prefix");
    let text = std::fs::read_to_string(&file).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let out = weir().arg("validate").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let f = file.display();
    for want in [
        format!("{f}:{}:7: sink.url: not a Redis URL", line_of("url")),
        format!(
            "{f}:{}:10: sink.prefix: `a prefix`: a key prefix must be",
            line_of("prefix")
        ),
    ] {
        assert!(stderr.contains(&want), "want `{want}` in:\n{stderr}");
    }
}
