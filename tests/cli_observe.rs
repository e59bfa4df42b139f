//! The `weir` binary seen from outside while it runs: the demo and its graceful Ctrl-C,
//! `/metrics` and `/healthz` of `weir run`, progress and colour only on a terminal.

#[path = "cli/fds.rs"]
mod fds;
#[path = "cli/support.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{generate, pipeline, signal, weir, USER_ACTIVITY};

#[test]
fn the_demo_prints_results_and_stops_cleanly_on_ctrl_c() {
    let mut child = weir()
        .args([
            "run",
            &pipeline(),
            "--set",
            "demo.interval=100ms",
            "--set",
            "window.size=1s",
        ])
        .args(["--set", "window.grace=0s", "--set", "demo.invalid_every=0"])
        .env("WEIR_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let start = Instant::now();
    let first = lines.next().expect("a result line").unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert!(
        v["count"].as_u64().unwrap() >= 1 && v["user_id"].is_string(),
        "{first}"
    );
    signal(child.id(), "-INT");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "graceful Ctrl-C exits 0");
    // The memory broker ends with the process: open windows are not "recomputed on restart".
    if err.contains("open windows were not emitted") {
        assert!(err.contains("so their events are gone"), "{err}");
        assert!(!err.contains("recomputed on restart"), "{err}");
    }
    assert!(err.contains("SIGINT: finishing the current batch"), "{err}");
}

/// `weir run --metrics-listen`: the same Prometheus text as `weir serve` (counters,
/// per-partition positions, commit and sink latency histograms) and `/healthz`; with the
/// broker unreachable, `[observability] listen` answers 503 while connecting.
#[tokio::test]
async fn run_serves_metrics_and_health() {
    let (mut child, base) = observed(
        weir()
            .args(["run", &pipeline(), "--metrics-listen", "127.0.0.1:0"])
            .args(["--set", "demo.interval=100ms", "--set", "window.size=1s"])
            .args([
                "--set",
                "window.grace=0s",
                "--set",
                "source.commit_interval=100ms",
            ]),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics_text(&base).await;
        let count = value(&text, "weir_commit_duration_seconds_count{");
        let emitted = value(&text, "weir_emit_latency_seconds_count{");
        if value(&text, "weir_results_out_total{") > 0.0 && count > 0.0 && emitted > 0.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "no results or commits:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let labels = r#"pipeline="user_activity",backend="memory""#;
    assert!(value(&text, &format!("weir_events_in_total{{{labels}}}")) > 0.0);
    assert!(text.contains("# TYPE weir_sink_ack_duration_seconds histogram"));
    assert!(text.contains(&format!(
        r#"weir_commit_duration_seconds_bucket{{{labels},le="+Inf"}}"#
    )));
    // Emit latency: one observation per closed window, observed once its results were
    // acknowledged (so never more than the windows closed so far), in every bucket form.
    assert!(text.contains("# TYPE weir_emit_latency_seconds histogram"));
    let emitted = value(&text, "weir_emit_latency_seconds_count{");
    assert_eq!(
        value(
            &text,
            &format!(r#"weir_emit_latency_seconds_bucket{{{labels},le="+Inf"}}"#)
        ),
        emitted
    );
    assert!(value(&text, r#"weir_emit_latency_seconds_bucket{"#) <= emitted);
    assert!(
        emitted <= value(&text, "weir_windows_closed_total{"),
        "{text}"
    );
    assert!(
        value(&text, "weir_emit_latency_seconds_sum{") > 0.0,
        "{text}"
    );
    assert!(
        value(&text, "weir_partition_received_offset{") > 0.0,
        "per-partition positions:\n{text}"
    );
    assert!(text.contains("weir_partition_committed_offset{"), "{text}");
    // The demo's events carry wall-clock times: each partition's watermark is recent.
    let lag = value(&text, "weir_partition_watermark_lag_seconds{");
    assert!((0.0..60.0).contains(&lag), "{lag}\n{text}");
    assert_eq!(value(&text, "weir_up{"), 1.0);
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    signal(child.id(), "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // Kafka unreachable: the endpoint comes from the file's [observability] section and
    // says 503 while the pipeline is still connecting.
    let (mut child, base) = observed(
        weir()
            .args(["run", &pipeline(), "--broker", "kafka"])
            .args(["--set", "brokers.kafka.bootstrap_servers=127.0.0.1:9"])
            .args(["--set", "observability.listen=127.0.0.1:0"]),
    );
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(
        body["status"], "starting: connecting to the broker",
        "{body}"
    );
    let text = metrics_text(&base).await;
    assert_eq!(value(&text, "weir_up{"), 0.0);
    signal(child.id(), "-INT");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The emit latency of a `weir run --input`: the summary line reports one observation per
/// window closed, and that is the number of distinct windows in the output (one input
/// partition: each window closes once).
#[test]
fn run_reports_the_emit_latency_of_every_window_it_closed() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, generate("20000", "50", "7", &[]).stdout).unwrap();
    let out = weir()
        .args(["run", USER_ACTIVITY, "--input", input.to_str().unwrap()])
        .args([
            "--output",
            output.to_str().unwrap(),
            "--dead-letter",
            "/dev/null",
        ])
        .env("WEIR_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let windows: std::collections::BTreeSet<String> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["window_start"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(windows.len() > 10, "{windows:?}");
    let summary = err
        .lines()
        .find(|l| l.contains("pipeline stopped"))
        .unwrap_or_else(|| panic!("no summary line in {err}"));
    let field = |name: &str| -> u64 {
        let rest = summary
            .split(name)
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in {summary}"));
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    assert_eq!(field("windows_closed="), windows.len() as u64, "{summary}");
    assert_eq!(
        field("emit_latency windows="),
        windows.len() as u64,
        "{summary}"
    );
    let p99 = summary
        .split("p99=")
        .nth(1)
        .and_then(|r| r.split("ms").next());
    let p99: f64 = p99
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(p99 > 0.0 && p99 <= 10_000.0, "{summary}");
}

/// `cmd` started with an info log, and the base URL of its metrics endpoint.
fn observed(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .env("WEIR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = metrics_url(&mut child);
    (child, base)
}

/// What `{base}/metrics` answers.
async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The base URL of the metrics endpoint, from the log line that announces it.
fn metrics_url(child: &mut Child) -> String {
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a `metrics: http://…` log line");
        if let Some(rest) = line.split("metrics: ").nth(1) {
            let url = rest.split_whitespace().next().unwrap();
            return url.trim_end_matches("/metrics").to_string();
        }
    }
}

/// The value of the first series starting with `prefix`.
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// A long `--input` run shows a progress line on a terminal (`script` gives it one) and
/// nothing of it when stderr is a pipe; log lines carry colour codes only on a terminal
/// and never with `NO_COLOR`.
#[test]
fn progress_and_colour_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let events = generate("400000", "500", "9", &[]);
    std::fs::write(&input, events.stdout).unwrap();
    let pipeline = USER_ACTIVITY;
    let run = [
        "run",
        pipeline,
        "--input",
        input.to_str().unwrap(),
        "--output",
        "/dev/null",
        "--dead-letter",
        "/dev/null",
    ];

    let piped = weir().args(run).env("WEIR_LOG", "info").output().unwrap();
    assert_eq!(piped.status.code(), Some(0));
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(err.contains("pipeline started"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no escape codes into a pipe:\n{err}"
    );
    assert!(!err.contains("events ("), "no progress into a pipe:\n{err}");

    let typescript = dir.path().join("typescript");
    let line = format!("{} {}", env!("CARGO_BIN_EXE_weir"), run.join(" "));
    for no_color in [false, true] {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, typescript.to_str().unwrap()])
            .env_remove("WEIR_BROKER")
            .env("WEIR_LOG", "info")
            .stdout(Stdio::null());
        if no_color {
            cmd.env("NO_COLOR", "1");
        } else {
            cmd.env_remove("NO_COLOR");
        }
        assert!(cmd.status().unwrap().success());
        let tty = std::fs::read_to_string(&typescript).unwrap();
        assert!(
            tty.contains(" events (") && tty.contains("/s), ") && tty.contains(" MiB read, "),
            "a progress line on the terminal:\n{tty}"
        );
        // The log's dimmed timestamp: colour on a terminal unless NO_COLOR.
        assert_eq!(tty.contains("\u{1b}[2m"), !no_color, "{tty}");
    }
}

/// `weir run --metrics-listen` has the limits of `weir serve` (one HTTP front): under a
/// 1,024 descriptor limit, 1,100 connections that never send a byte do not keep
/// `/healthz` from answering (past `max_connections` the longest-idle ones are closed).
#[tokio::test]
async fn run_metrics_answer_past_1100_idle_connections_under_a_1024_descriptor_limit() {
    fds::allow_files(4096);
    let mut capped = Command::new("prlimit");
    capped
        .args(["--nofile=1024", "--", env!("CARGO_BIN_EXE_weir")])
        .env_remove("WEIR_BROKER")
        .args(["run", &pipeline(), "--metrics-listen", "127.0.0.1:0"]);
    let (mut child, base) = observed(&mut capped);
    let addr = base.trim_start_matches("http://").to_string();
    let idle = fds::hold_connections(&addr, 1100).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let health = client.get(format!("{base}/healthz")).send().await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(health.unwrap().status().as_u16(), 200);
    drop(idle);
}
