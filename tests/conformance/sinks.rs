//! Results in a database instead of the sink topic, behind every broker.

use std::time::Duration;

use weir_engine::StopReason;

use super::stores::pg;
use super::{lines, oracle, Bed};

/// `[sink] type = "postgres"`: the pipeline as `weir run` assembles it writes its results
/// to a fresh table of the test bed's PostgreSQL (`scripts/brokers up postgres`), which
/// then equals the oracle: one row per window, every count exact.
pub async fn postgres_holds_the_results(broker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let url = pg::url();
    let client = pg::client(&url).await;
    let table = pg::unique_table(&format!("conf_{broker}"));
    let bed = Bed::with_file(&pg::pipeline(dir.path(), &url, &table), broker, "pg", &[]);
    let data = lines(43, 20_000, 50, 0);
    let want = oracle(&data);
    bed.produce(&data).await;
    let (pipeline, background) = bed.assembled().await;
    let summary = pipeline
        .exit_when_idle(Duration::from_secs(2))
        .run()
        .await
        .expect("run");
    background.cancel();
    assert_eq!(summary.reason, StopReason::Idle);
    assert_eq!(summary.counters.windowed, 20_000, "{:?}", summary.counters);
    let (got, rows) = pg::counts(&client, &table).await;
    assert_eq!(rows, want.len(), "one row per window");
    assert_eq!(got, want);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}
