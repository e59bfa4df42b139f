//! `weir produce` stopped by a signal while it still reads stdin: it waits for the batch in
//! flight, says how many records it sent (every one acknowledged) and the stdin line to
//! resume from, and exits 128 + the signal's number; the topic then holds exactly the
//! lines before that one.

use std::io::{BufRead as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::conformance::{self, Bed};
use crate::support::{signal, weir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_produce_stopped_by_sigterm_sent_exactly_what_it_says() {
    produce_stopped_by("kafka", "-TERM", 143).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_produce_stopped_by_sigint_sent_exactly_what_it_says() {
    produce_stopped_by("amqp", "-INT", 130).await;
}

async fn produce_stopped_by(broker: &str, sig: &str, code: i32) {
    conformance::init_logs();
    let bed = Bed::new(broker, "produce-sig", &[]);
    let topic = bed.config.source.topic.clone();
    let lines: Vec<String> = weir_engine::generate::dataset(41, 60_000, 50, 0);
    let mut cmd = weir();
    cmd.arg("produce")
        .arg(conformance::pipeline_file())
        .args(["--broker", broker]);
    for s in &bed.sets {
        cmd.arg("--set").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir produce");
    // The lines trickle in and stdin stays open: only the signal can end the command.
    let mut stdin = child.stdin.take().unwrap();
    let feed = lines.clone();
    let writer = std::thread::spawn(move || {
        for chunk in feed.chunks(500) {
            let text: String = chunk.iter().map(|l| format!("{l}\n")).collect();
            if stdin.write_all(text.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Keep stdin open until the command is gone.
        std::thread::sleep(Duration::from_secs(120));
    });
    // Signal once some records are in the topic, while lines still arrive.
    let t0 = Instant::now();
    while bed.read(&topic, 1_000, Duration::from_secs(1)).await.len() < 1_000 {
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing produced");
    }
    signal(child.id(), sig);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "weir produce still runs 20 s after {sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = Vec::new();
    for l in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        out.push(l.unwrap());
    }
    let out = out.join("\n");
    assert_eq!(status.code(), Some(code), "{out}");
    let number = |after: &str, before: &str| -> usize {
        let at = out
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} in {out}"))
            + after.len();
        out[at..]
            .split(before)
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let sent = number("sent ", " records");
    let next_line = number("lines from ", " on were not sent");
    assert!(out.contains("(all acknowledged)"), "{out}");
    assert!(
        (1_000..lines.len()).contains(&sent),
        "stopped mid-input: {out}"
    );
    // No blank lines in the input: line numbers are record numbers.
    assert_eq!(next_line, sent + 1, "{out}");
    let mut got: Vec<String> = bed
        .read_all(&topic, Duration::from_secs(3))
        .await
        .iter()
        .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
        .collect();
    let mut want = lines[..sent].to_vec();
    got.sort();
    want.sort();
    assert_eq!(got.len(), sent, "the topic holds what was said to be sent");
    assert_eq!(got, want);
    drop(writer);
}
