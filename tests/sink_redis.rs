//! `[sink] type = "redis"` against a real Redis (`scripts/brokers up redis`;
//! `WEIR_REDIS_URL` for another): results from `--input` equal an independent count, each
//! in its hash and in the window index, and a second run adds nothing; settings are checked
//! at their `file:line:col`. The kill -9 tests are in `tests/crash.rs` (`kafka_redis_…`).
//! Without a server these tests fail, never skip.

mod conformance;

use conformance::oracle;
use conformance::stores::{self, redis};
use weir_engine::generate::dataset;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_input_results_equal_the_oracle_and_a_second_run_adds_nothing() {
    let url = redis::url();
    let mut conn = redis::connect(&url).await;
    let prefix = stores::unique_name("input");
    let dir = tempfile::tempdir().unwrap();
    let file = redis::pipeline(dir.path(), &url, &prefix);
    let data: Vec<Vec<u8>> = dataset(13, 30_000, 300, 50)
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let want = oracle(&data);
    assert!(want.len() > 1_000);
    for run in 0..2 {
        let (status, stderr) = stores::run_input(dir.path(), &file, &data);
        assert!(status.success(), "run {run}: {status}\n{stderr}");
        let (got, hashes) = redis::counts(&mut conn, &prefix).await;
        assert_eq!(hashes, want.len(), "run {run}: one hash per window");
        assert_eq!(got, want, "run {run}");
    }
}

#[test]
fn redis_settings_are_checked_at_their_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let file = redis::pipeline(dir.path(), "http://127.0.0.1:16379", "a prefix");
    stores::validate_fails(
        &file,
        &[],
        &[
            "FILE:@LINE(url):7: sink.url: not a Redis URL",
            "FILE:@LINE(prefix):10: sink.prefix: `a prefix`: a key prefix must be",
        ],
    );
}
