//! The `weir` binary: exit codes, `generate` determinism, `run --input`, `weir test`, the
//! README's sessions. Its demo, metrics and terminal output are in `tests/cli_observe.rs`.

#[path = "cli/produce.rs"]
mod produce;
#[path = "cli/support.rs"]
mod support;

mod conformance;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{generate, pipeline, weir, USER_ACTIVITY};

/// The summary line `weir run` logs when it stops.
fn summary_line(err: &str) -> &str {
    err.lines()
        .find(|l| l.contains("pipeline stopped"))
        .unwrap_or_else(|| panic!("no summary line in {err}"))
}

#[test]
fn validate_exits_0_for_a_good_file_and_2_with_every_problem() {
    let ok = weir().args(["validate", &pipeline()]).output().unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[source]\ntopic = 5\n[window]\nsize = \"x\"\n").unwrap();
    let out = weir()
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    assert!(
        err.contains(&format!("{file}:2:9: source.topic: expected a string")),
        "{err}"
    );
    assert!(err.contains(&format!("{file}:4:8: window.size:")), "{err}");
    assert!(err.contains("aggregate: missing required table"), "{err}");

    // Windows in the file's words, not Rust's (`Hopping { size: 60000, … }`).
    let hopping = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/page_views_hopping.toml"
    );
    let out = weir().args(["validate", hopping]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-> hopping 1m every 10s window of"), "{text}");

    let usage = weir().args(["validate"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
    let broker = weir()
        .args(["validate", &pipeline(), "--broker", "nats"])
        .output()
        .unwrap();
    assert_eq!(broker.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&broker.stderr)
        .contains("--broker nats: pipeline.broker: unknown broker `nats`"));
}

#[test]
fn generate_is_deterministic_for_a_seed() {
    let run = |seed: &str| {
        let o = generate("500", "7", seed, &[]);
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    let a = run("3");
    assert_eq!(a, run("3"));
    assert_ne!(a, run("4"));
    assert_eq!(a.lines().count(), 500);
    let users: std::collections::HashSet<String> = a
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["user_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(users.len(), 7);
}

#[test]
fn run_with_input_emits_every_window_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let gen = generate("5000", "20", "11", &["--invalid-every", "50"]);
    std::fs::write(&events, &gen.stdout).unwrap();
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let status = weir()
        .args(["run", &pipeline(), "--input", events.to_str().unwrap()])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--dead-letter",
            dead.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let lines: Vec<Vec<u8>> = gen
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let want = conformance::oracle(&lines);
    let mut got = conformance::Counts::new();
    for l in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        got.insert(
            (v["user_id"].as_str().unwrap().to_string(), start),
            v["count"].as_u64().unwrap(),
        );
    }
    assert_eq!(got, want);
    assert_eq!(std::fs::read_to_string(&dead).unwrap().lines().count(), 100);
}

#[test]
fn run_reads_stdin_and_writes_stdout() {
    let mut child = weir()
        .args([
            "run",
            &pipeline(),
            "--input",
            "-",
            "--output",
            "-",
            "--dead-letter",
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (i, user) in ["a", "b", "a"].iter().enumerate() {
        writeln!(
            stdin,
            r#"{{"event_type":"click","user_id":"{user}","action":"x","timestamp":"2024-06-27T15:00:0{i}Z"}}"#
        )
        .unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(r#"{"user_id":"a","window_start":"2024-06-27T15:00:00Z","window_end":"2024-06-27T15:00:10Z","count":2}"#), "{text}");
    assert!(
        text.contains(r#""user_id":"b""#) && text.lines().count() == 2,
        "{text}"
    );
}

#[test]
fn a_fail_strategy_stops_the_run_with_exit_1_and_skip_counts_and_drops() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let good = r#"{"event_type":"click","user_id":"User1","action":"a","timestamp":"2024-06-27 15:00:01.000000"}"#;
    let bad = r#"{"event_type":"hover","user_id":"User1","action":"a","timestamp":"2024-06-27 15:00:02.000000"}"#;
    std::fs::write(&input, format!("{good}\n{bad}\n{good}\n")).unwrap();
    let run = |strategy: &str| {
        weir()
            .args(["run", &pipeline(), "--input", input.to_str().unwrap()])
            .args(["--output", "-", "--dead-letter", "-"])
            .args(["--set", &format!("errors.validate={strategy}")])
            .output()
            .unwrap()
    };
    let failed = run("fail");
    assert_eq!(failed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("stage `validate` failed on") && err.contains("`hover` is not one of"),
        "{err}"
    );
    assert!(failed.stdout.is_empty(), "nothing was emitted");

    let skipped = run("skip");
    assert_eq!(
        skipped.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    let out = String::from_utf8(skipped.stdout).unwrap();
    // One result counting both good events, and no dead letter.
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(r#""count":2"#), "{out}");
}

/// Every duration flag reads durations as the file does (`5s`, `500ms`), and rejects a
/// bare number the same way.
#[test]
fn duration_flags_take_the_file_syntax() {
    let pipeline = USER_ACTIVITY;
    for (args, ok) in [
        (vec!["tail", pipeline, "--idle-exit", "5s"], true),
        (vec!["tail", pipeline, "--idle-exit", "500ms"], true),
        (vec!["tail", pipeline, "--idle-exit", "5"], false),
        (
            vec![
                "run",
                pipeline,
                "--exit-when-idle",
                "1m30s",
                "--input",
                "/nonexistent",
            ],
            true,
        ),
        (
            vec![
                "run",
                pipeline,
                "--exit-when-idle",
                "5",
                "--input",
                "/nonexistent",
            ],
            false,
        ),
    ] {
        let out = weir().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            // Parsed: it fails later, for another reason (memory has no tail; no file).
            assert!(!err.contains("not a duration"), "{args:?}: {err}");
        } else {
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(
                err.contains("`5` is not a duration (use e.g. 500ms, 2s, 1m, 1h)"),
                "{err}"
            );
        }
    }
}

/// `weir test`: every shipped pipeline has golden cases and they pass (exit 0); a case
/// that expects something else fails with a diff (exit 1); a case file with a problem
/// names its place (exit 2).
#[test]
fn weir_test_runs_golden_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut pipelines = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // brokers.toml holds the [brokers.*] sections the pipelines include.
        if path.extension().is_none_or(|e| e != "toml") || path.ends_with("brokers.toml") {
            continue;
        }
        pipelines += 1;
        let out = weir()
            .args(["test", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}:\n{text}", path.display());
        assert!(text.contains(" passed, 0 failed"), "{text}");
    }
    assert!(pipelines >= 4);

    let pipeline = dir.join("user_activity.toml");
    let case = std::fs::read_to_string(dir.join("tests/user_activity/two_windows.toml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong.toml");
    std::fs::write(&wrong, case.replacen(r#""count":2}"#, r#""count":3}"#, 1)).unwrap();
    let out = weir()
        .args(["test", pipeline.to_str().unwrap(), wrong.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  wrong"), "{text}");
    assert!(
        text.contains(r#"- {"user_id":"User1","window_start":"2024-06-27T15:00:00Z","window_end":"2024-06-27T15:00:10Z","count":3}"#)
            && text.contains(r#"+ {"user_id":"User1","window_start":"2024-06-27T15:00:00Z","window_end":"2024-06-27T15:00:10Z","count":2}"#),
        "{text}"
    );

    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "input = '''\n{}\n'''\nresults = '''\n{\"a\":1}\n{oops\n'''\n",
    )
    .unwrap();
    let out = weir()
        .args(["test", pipeline.to_str().unwrap(), bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:1: not JSON", bad.display())),
        "{err}"
    );
}

/// Every README example shown as a terminal session (a ```text block starting with
/// `$ weir …`) gives exactly the output the README shows, from the repository's root.
#[test]
fn readme_sessions_run_as_shown() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut sessions = 0;
    for block in readme.split("```text\n").skip(1) {
        let block = block.split("```").next().unwrap();
        let Some(first) = block.lines().next() else {
            continue;
        };
        let Some(cmd) = first.strip_prefix("$ weir ") else {
            continue;
        };
        sessions += 1;
        let shown: String = block.lines().skip(1).map(|l| format!("{l}\n")).collect();
        let out = weir()
            .current_dir(root)
            .args(cmd.split_whitespace())
            .output()
            .unwrap();
        let got = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(got, shown, "README: `$ weir {cmd}`");
    }
    assert!(sessions >= 2, "the README's sessions were found");
}

/// Whitespace-only lines of `--input` are counted (in `events_in` and `blank_lines`) and
/// shown in the summary line with every other term of the balance.
#[test]
fn run_input_counts_blank_lines_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let ev = |u: &str, s: u32| {
        format!(
            r#"{{"event_type":"click","user_id":"{u}","action":"a","timestamp":"2024-06-27T15:00:0{s}Z"}}"#
        )
    };
    // 3 events, 4 blank lines (empty, spaces, a tab, CRLF), 1 invalid line.
    let text = format!(
        "{}\n\n{}\n   \n\t\r\n{}\nnot json\n\r\n",
        ev("U1", 1),
        ev("U1", 2),
        ev("U2", 3)
    );
    std::fs::write(&input, text).unwrap();
    let out = weir()
        .env("WEIR_LOG", "info")
        .args([
            "run",
            &pipeline(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            "-",
            "--dead-letter",
            dir.path().join("dead.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let counted: u64 = results.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 3, "{results:?}");
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    let summary = summary_line(&err);
    assert!(
        summary.contains(
            "events_in=8 = windowed=3 + dead_letters=1 + late=0 + filtered=0 + replayed=0 + \
             retried=0 + skipped=0 + blank_lines=4; late_window_misses=0; results_out=2"
        ),
        "{summary}"
    );
    assert!(summary.contains("(balanced)"), "{summary}");
}

/// `weir validate` refuses a `group_by` the schema does not have at its `file:line:col`
/// (exit 2) instead of saying ok and dead-lettering every event at run time.
#[test]
fn validate_refuses_a_group_by_the_schema_does_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let text = std::fs::read_to_string(pipeline())
        .unwrap()
        .replace("group_by = \"user_id\"", "group_by = \"userid\"")
        .replace(
            "compute = [\"count\"]",
            "compute = [\"count\", \"sum(action)\"]",
        );
    std::fs::write(&file, &text).unwrap();
    // What the pipeline includes, beside it.
    std::fs::copy(
        conformance::pipeline_named("brokers"),
        dir.path().join("brokers.toml"),
    )
    .unwrap();
    let line = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let out = weir()
        .args(["validate", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let f = file.display();
    assert!(
        err.contains(&format!(
            "{f}:{}:12: aggregate.group_by: `userid` is not a field of the schema",
            line("group_by")
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:{}:11: aggregate.compute: sum_action needs a number, but `action` is a string",
            line("compute")
        )),
        "{err}"
    );
}

/// `weir run --input` with a `[retry]` section: events whose profile never arrives are
/// retried until `max_attempts` and then dead-lettered with the reason, before the run
/// exits; none vanishes in the retry topic when the input ends.
#[test]
fn run_input_with_retries_runs_them_to_their_end() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let text: String = (1..=3)
        .map(|i| {
            format!(
                "{{\"event_type\":\"click\",\"user_id\":\"User{i}\",\"action\":\"a\",\"timestamp\":\"2024-06-27T15:00:0{i}Z\"}}\n"
            )
        })
        .collect();
    let started = Instant::now();
    let mut child = weir()
        .env("WEIR_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .args([
            "run",
            &conformance::pipeline_named("enriched_by_country")
                .display()
                .to_string(),
            "--input",
            "-",
            "--output",
            "-",
            "--dead-letter",
            dead.to_str().unwrap(),
            "--set",
            "retry.initial=100ms",
            "--set",
            "retry.max=200ms",
            "--set",
            "retry.max_attempts=3",
        ])
        .spawn()
        .unwrap();
    // The first event goes through all its attempts while the input waits (the retry
    // topic is polled and found empty meanwhile); the last two are retried just before
    // the input ends.
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = text.lines();
    writeln!(stdin, "{}", lines.next().unwrap()).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let rest: String = lines.map(|l| format!("{l}\n")).collect();
    stdin.write_all(rest.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no profile, no result"
    );
    let dead = std::fs::read_to_string(&dead).unwrap();
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let mut users: Vec<String> = dead
        .iter()
        .map(|d| {
            assert!(
                d["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("gave up after 3 attempts"),
                "{d}"
            );
            assert_eq!(d["attempts"].as_array().unwrap().len(), 3, "{d}");
            let p: serde_json::Value =
                serde_json::from_str(d["payload"].as_str().unwrap()).unwrap();
            p["user_id"].as_str().unwrap().to_string()
        })
        .collect();
    users.sort();
    assert_eq!(users, ["User1", "User2", "User3"]);
    let summary = summary_line(&err);
    // Each event in three times (twice back from the retry topic), retried twice, then a
    // dead letter.
    assert!(
        summary.contains("events_in=9 = windowed=0 + dead_letters=3 + late=0 + filtered=0 + replayed=0 + retried=6 + skipped=0 + blank_lines=0"),
        "{summary}"
    );
}

/// `weir tail --read-committed` asks for what an exactly-once pipeline's readers see: on
/// a backend without transactions it is refused (exit 2) with the reason, before
/// connecting to anything.
#[test]
fn tail_read_committed_needs_a_backend_with_transactions() {
    for broker in ["amqp", "kinesis"] {
        let out = weir()
            .args(["tail", &pipeline(), "--broker", broker, "--read-committed"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("--set pipeline.guarantee=exactly_once: pipeline.guarantee: the {broker} backend cannot give `exactly_once`")),
            "{err}"
        );
    }
}

/// `[source] repartition = true`: `weir validate` says what will be created, and a backend
/// that cannot repartition exactly is refused at the setting's `file:line:col`.
#[test]
fn validate_says_what_a_repartition_creates_and_where_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let text = std::fs::read_to_string(pipeline())
        .unwrap()
        .replace("[source]\n", "[source]\nrepartition = true\n");
    std::fs::write(&file, &text).unwrap();
    std::fs::copy(
        conformance::pipeline_named("brokers"),
        dir.path().join("brokers.toml"),
    )
    .unwrap();
    let out = weir()
        .args(["validate", file.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("forwarded by user_id to the internal topic weir-user-activity-repartition"),
        "{said}"
    );
    let line = text
        .lines()
        .position(|l| l == "repartition = true")
        .unwrap()
        + 1;
    for broker in ["amqp", "kinesis"] {
        let out = weir()
            .args(["validate", file.to_str().unwrap(), "--broker", broker])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!(
                "{}:{line}:15: source.repartition: the {broker} backend cannot repartition yet",
                file.display()
            )),
            "{err}"
        );
    }
}
