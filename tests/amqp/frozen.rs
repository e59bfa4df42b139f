//! A frozen instance (SIGSTOP: a stalled VM, a debugger, a process swapped out) keeps no
//! partition for long: RabbitMQ closes its connections after about two `heartbeat`s
//! (`[brokers.amqp] heartbeat`, 5 s) instead of its default 60 s, and the other instance
//! takes over.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{lines, two_instance_bed, two_instances, until};
use crate::conformance;

fn signal(child: &std::process::Child, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), sig).expect("signal");
}

/// Two `weir run`s share four partitions; one is frozen with SIGSTOP while the data
/// arrives. The other reads all four partitions within 30 s of the freeze (10–15 s
/// measured) and finishes with every window exact; then the frozen one runs again
/// (SIGCONT), finds its partitions gone, and the results stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_frozen_instance_loses_its_partitions_within_seconds() {
    crate::require_rabbitmq().await;
    let bed = two_instance_bed("part-freeze");
    let data = lines(26, 30_000);
    let want = conformance::oracle(&data);
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (mut a, mut b) = two_instances(&bed, &log_a, &log_b).await;
    // A partition queue's single active consumer: the first delivery to a consumer that
    // stood by is logged (a consumer that RabbitMQ has not made active receives nothing).
    let active = |log: &str, p: u32| {
        log.lines().any(|l| {
            l.contains("active consumer of the partition queue")
                && l.contains(&format!("partition={p}"))
        })
    };
    let active_in_b = |n: &str| (0..4).filter(|p| active(n, *p)).count();
    let produced = AtomicUsize::new(0);
    let freezer = async {
        until(
            "a third of the data is out",
            Duration::from_secs(60),
            || produced.load(Ordering::Relaxed) >= data.len() / 3,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            active_in_b(&read(&log_b)) < 4,
            "a read partitions before it froze"
        );
        signal(&a, rustix::process::Signal::STOP);
        let frozen = Instant::now();
        let frozen_at = produced.load(Ordering::Relaxed);
        until(
            "b reads all four partitions",
            Duration::from_secs(90),
            || active_in_b(&read(&log_b)) == 4,
        )
        .await;
        (frozen_at, frozen.elapsed())
    };
    let producer = async {
        for chunk in data.chunks(2_000) {
            bed.produce(chunk).await;
            produced.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    };
    let ((frozen_at, took), ()) = tokio::join!(freezer, producer);
    eprintln!("b read every partition {took:?} after a froze");
    assert!(
        frozen_at < data.len(),
        "frozen mid-stream ({frozen_at} produced)"
    );
    assert!(
        took <= Duration::from_secs(30),
        "b took {took:?} to take the frozen instance's partitions over:\n{}",
        read(&log_b)
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = b.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let _ = b.kill();
            let _ = a.kill();
            panic!("b did not finish:\n{}", read(&log_b));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{status}\n{}", read(&log_b));
    // a runs again: RabbitMQ closed its connections while it was frozen. It must find that
    // out (a revoke: its open windows dropped) and write nothing that contradicts b.
    let before = read(&log_a).len();
    signal(&a, rustix::process::Signal::CONT);
    until(
        "a finds its partitions gone",
        Duration::from_secs(60),
        || read(&log_a)[before..].contains("partitions revoked"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let got = conformance::results(
        &bed.read_all(&bed.config.sink.topic, Duration::from_secs(6))
            .await,
    );
    assert_eq!(got.len(), want.len(), "{}", read(&log_b));
    assert_eq!(got, want);
}
