//! `brokers.amqp.partitions` changed under a topic that was read: records of one key would
//! go to another queue than before (windows counted in pieces) and records left in the old
//! layout's queues would never be read. The run stops at once with an error saying so.

use std::process::{Command, Stdio};

use super::lines;
use crate::conformance::{self, Bed};

/// `weir run` of the bed with `extra` settings until idle: its exit code and stderr.
fn run(bed: &Bed, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.arg("run").arg(conformance::pipeline_file());
    cmd.args(["--broker", "amqp", "--exit-when-idle", "3s"]);
    for s in bed
        .sets
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        cmd.arg("--set").arg(s);
    }
    let out = cmd
        .env("WEIR_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("weir run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_changed_partitions_setting_stops_the_pipeline() {
    crate::require_rabbitmq().await;
    // Two parts an hour of event time apart: the first run's last windows are complete.
    let mut data = lines(44, 2_000);
    let mut g = weir_engine::generate::EventGenerator::new(45, 40);
    let start = weir_engine::generate::DEFAULT_START_MS + 3_600_000;
    let mut t = weir_engine::generate::Timeline::new(45, start, 10, 500);
    data.extend((0..1_000).map(|_| g.event(t.next_time()).into_bytes()));
    let bed = Bed::new("amqp", "layout", &["brokers.amqp.partitions=4"]);
    bed.produce(&data[..2_000]).await;
    let (code, err) = run(&bed, &[]);
    assert_eq!(code, Some(0), "{err}");
    bed.produce(&data[2_000..]).await;
    // More queues, fewer queues, one queue: each stops, saying what changed.
    for (n, says) in [
        ("6", "committed with 4"),
        ("2", "committed with 4"),
        ("1", "read with partitions = more than 1 before"),
    ] {
        let (code, err) = run(&bed, &[&format!("brokers.amqp.partitions={n}")]);
        assert_eq!(code, Some(1), "partitions = {n}: {err}");
        assert!(
            err.contains(&format!("brokers.amqp.partitions = {n}")) && err.contains(says),
            "partitions = {n}: {err}"
        );
    }
    // The setting it was read with runs on, and nothing was lost.
    let (code, err) = run(&bed, &[]);
    assert_eq!(code, Some(0), "{err}");
    let got = conformance::results(
        &bed.read_all(&bed.config.sink.topic, std::time::Duration::from_secs(3))
            .await,
    );
    let want = conformance::oracle(&data);
    assert_eq!(got, want);

    // One queue read before, several now.
    let one = Bed::new("amqp", "layout-one", &[]);
    one.produce(&data[..500]).await;
    let (code, err) = run(&one, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&one, &["brokers.amqp.partitions=4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("read with partitions = 1 before"), "{err}");
}
