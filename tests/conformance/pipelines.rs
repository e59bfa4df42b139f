//! Every shipped pipeline runs on every broker with `--broker NAME` alone: its golden
//! cases' input goes to topics of its own through `weir produce`, `weir run --broker NAME
//! --exit-when-idle` counts it, and the results are the cases' expected ones. Only topic
//! names (and a case's own `set`) are overridden, never a `[brokers.*]` setting, so a
//! pipeline whose file lacks the broker's section (or whose section does not reach the
//! test bed's broker) fails here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_engine::config::LatePolicy;

use super::{load, unique_id, Bed};

/// The shipped pipelines: `pipelines/*.toml` but `brokers.toml`, which they include.
pub fn shipped() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && !p.ends_with("brokers.toml"))
        .collect();
    out.sort();
    out
}

/// A golden case (`pipelines/tests/NAME/CASE.toml`) whose expected results do not depend
/// on the arrival order the memory runner sets up: no `{"partition"…}` / `{"order"…}`
/// envelopes and no late events expected (on a broker, records of different keys arrive
/// in the broker's own order).
struct Case {
    name: String,
    input: Vec<String>,
    table: Vec<String>,
    results: Vec<serde_json::Value>,
    dead_letters: Vec<serde_json::Value>,
    sets: Vec<String>,
}

fn json_lines(v: Option<&toml::Value>) -> Vec<String> {
    v.and_then(toml::Value::as_str)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn cases_of(pipeline: &Path) -> Vec<Case> {
    let name = pipeline.file_stem().unwrap().to_string_lossy().into_owned();
    let dir = pipeline.parent().unwrap().join("tests").join(&name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let case: toml::Table = std::fs::read_to_string(&f).unwrap().parse().unwrap();
        let input = json_lines(case.get("input"));
        let ordered = input.iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v.get("event").is_some() && (v.get("partition").is_some() || v.get("order").is_some())
        });
        if ordered || !json_lines(case.get("late")).is_empty() {
            continue;
        }
        let parse = |key| -> Vec<serde_json::Value> {
            json_lines(case.get(key))
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        out.push(Case {
            name: f.file_stem().unwrap().to_string_lossy().into_owned(),
            input,
            table: json_lines(case.get("table")),
            results: parse("results"),
            dead_letters: parse("dead_letters"),
            sets: case
                .get("set")
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default(),
        });
    }
    out
}

/// Runs `weir ARGS` in `dir` with `stdin`, for at most two minutes; its exit code and output.
fn weir(dir: &Path, args: &[String], stdin: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(dir)
        .env_remove("WEIR_BROKER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir runs");
    let mut input = child.stdin.take().unwrap();
    for l in stdin {
        writeln!(input, "{l}").unwrap();
    }
    drop(input);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Every shipped pipeline's order-free golden cases on `broker`, through the `weir` CLI.
pub async fn shipped_pipelines_run_with_broker_alone(broker: &str) {
    let pipelines = shipped();
    assert!(pipelines.len() >= 4, "{pipelines:?}");
    let work = tempfile::tempdir().unwrap();
    for pipeline in &pipelines {
        let cases = cases_of(pipeline);
        assert!(
            !cases.is_empty(),
            "{} has no golden case that a broker can replay",
            pipeline.display()
        );
        for case in cases {
            run_case(broker, pipeline, &case, work.path()).await;
        }
    }
}

async fn run_case(broker: &str, pipeline: &Path, case: &Case, work: &Path) {
    let what = format!("{} / {} on {broker}", pipeline.display(), case.name);
    let id = unique_id("shipped");
    let (plain, _) = load(pipeline, broker, &[]);
    // Without its own section a backend falls back to its defaults: real AWS for Kinesis,
    // no checkpoint topic on Kafka.
    assert!(
        plain.brokers.iter().any(|(name, _, _)| name == broker),
        "{what}: the pipeline has no [brokers.{broker}] section"
    );
    let mut sets = vec![
        format!("source.topic=conf-in-{id}"),
        format!("source.group=conf-group-{id}"),
        format!("sink.topic=conf-out-{id}"),
        format!("dead_letter.topic=conf-dlq-{id}"),
    ];
    if let LatePolicy::Output(_) = plain.late {
        sets.push(format!("late.topic=conf-late-{id}"));
    }
    if plain.retry.is_some() {
        sets.push(format!("retry.topic=conf-retry-{id}"));
    }
    let table = format!("conf-profiles-{id}");
    if plain.enrich.is_some() {
        sets.push(format!("enrich.table={table}"));
    }
    sets.extend(case.sets.iter().cloned());
    let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![cmd.into(), pipeline.display().to_string()];
        a.extend(["--broker".to_string(), broker.to_string()]);
        for s in &sets {
            a.extend(["--set".to_string(), s.clone()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    if !case.table.is_empty() {
        let (code, out) = weir(work, &args("produce", &["--topic", &table]), &case.table);
        assert_eq!(code, Some(0), "{what}: weir produce (table):\n{out}");
    }
    let (code, out) = weir(work, &args("produce", &[]), &case.input);
    assert_eq!(code, Some(0), "{what}: weir produce:\n{out}");
    let (code, out) = weir(work, &args("run", &["--exit-when-idle", "3s"]), &[]);
    assert_eq!(code, Some(0), "{what}: weir run:\n{out}");
    assert!(out.contains("(balanced)"), "{what}:\n{out}");

    // Read back with the same file, broker and overrides as the run.
    let (config, backend) = load(pipeline, broker, &sets);
    let bed = Bed {
        config,
        backend,
        sets,
    };
    let finals = |records: Vec<weir_engine::Record>| {
        let mut v: Vec<String> = records
            .iter()
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap())
            .filter(|v| v["final"] != false)
            .map(|v| v.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let mut want: Vec<String> = case
        .results
        .iter()
        .filter(|v| v["final"] != false)
        .map(|v| v.to_string())
        .collect();
    want.sort();
    let got = bed
        .read(&bed.config.sink.topic, usize::MAX, Duration::from_secs(3))
        .await;
    assert_eq!(finals(got), want, "{what}: results");
    let dead = bed
        .read(
            &bed.config.dead_letter.topic,
            usize::MAX,
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(dead.len(), case.dead_letters.len(), "{what}: dead letters");
    // Reasons name the table, whose topic is this run's own.
    let renamed = |reason: &str| match &plain.enrich {
        Some(e) => reason.replace(&format!("`{}`", e.table), &format!("`{table}`")),
        None => reason.to_string(),
    };
    for d in &case.dead_letters {
        let want = renamed(d["error"].as_str().unwrap());
        assert!(
            dead.iter().any(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
                v["error"] == want
            }),
            "{what}: no dead letter with error {want:?}"
        );
    }
}
