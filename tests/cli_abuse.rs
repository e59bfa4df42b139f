//! `weir run` against a careless or hostile input (issue 31): window definitions that
//! explode state, lines without end, outputs that name the input, an input truncated
//! while read. Memory-bound runs are under `prlimit --as`, so a regression ends in a
//! failed allocation, not in the machine's out-of-memory killer.

#[path = "cli/support.rs"]
mod support;

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{generate, pipeline, signal, weir};

/// The address-space cap of the capped runs: `weir run` takes about 115 MB of it idle.
const CAP: u64 = 768 << 20;

/// `weir` under `prlimit --as=CAP`, as [`weir`] sets it up.
fn capped() -> Command {
    let mut c = Command::new("prlimit");
    c.arg(format!("--as={CAP}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_weir"))
        .env_remove("WEIR_BROKER")
        .env("WEIR_LOG", "warn");
    c
}

/// The peak resident memory of a running process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Waits up to `limit` for `child` to exit; its status, or `None` if it is still running.
fn exits_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A folder with `events.jsonl`: `weir generate` of `events` events of `users` users.
fn events_file(events: &str, users: &str, seed: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, generate(events, users, seed, &[]).stdout).unwrap();
    (dir, path)
}

/// Everything on a child's stderr (after it exited).
fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Hopping windows of 10 s every millisecond: 10,000 windows per event (the bound), so
/// each new user opens 10,000 (window, key) entries.
const DENSE_HOPPING: [&str; 8] = [
    "--set",
    "window.type=hopping",
    "--set",
    "window.size=10s",
    "--set",
    "window.advance=1ms",
    "--set",
    "window.grace=0",
];

/// 3,000 events of 1,000 users would open about 30 million entries (GBs); with
/// `max_open_entries` the run stays within its cap, dead-letters what does not fit with
/// the reason, and its counters balance (exit 0).
#[test]
fn window_state_stays_within_max_open_entries() {
    let (dir, events) = events_file("3000", "1000", "5");
    let dead = dir.path().join("dead.jsonl");
    let out = capped()
        .args(["run", &pipeline(), "--input", events.to_str().unwrap()])
        .args(DENSE_HOPPING)
        .args(["--set", "window.max_open_entries=300000"])
        .args([
            "--output",
            "/dev/null",
            "--dead-letter",
            dead.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let dead = std::fs::read_to_string(&dead).unwrap();
    let full = dead
        .lines()
        .filter(|l| l.contains("window state is full"))
        .count();
    assert!(full > 1000, "{full} refused for a full state:\n{err}");
    assert!(
        dead.contains("(window.max_open_entries = 300000)"),
        "{}",
        dead.lines().next().unwrap_or_default()
    );
}

/// Ctrl-C stops a run whose state is full and whose every event costs 10,000 windows,
/// promptly and gracefully (exit 0).
#[test]
fn ctrl_c_stops_a_run_at_full_window_state() {
    let mut gen = weir()
        .args(["generate", "--users", "100000", "--rate", "20000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut run = capped()
        .args(["run", &pipeline(), "--input", "-"])
        .args(DENSE_HOPPING)
        .args(["--set", "window.max_open_entries=200000"])
        .args(["--output", "/dev/null", "--dead-letter", "/dev/null"])
        .stdin(gen.stdout.take().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Long enough to fill the state (20 users) and refuse events for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert!(run.try_wait().unwrap().is_none(), "{}", stderr_of(&mut run));
    signal(run.id(), "-INT");
    let status = exits_within(&mut run, Duration::from_secs(10));
    let _ = gen.kill();
    let _ = gen.wait();
    if status.is_none() {
        let _ = run.kill();
    }
    let err = stderr_of(&mut run);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");
}

/// `--input /dev/zero`: one line without end. Memory stays flat (the line is not
/// buffered past `max_payload_bytes`), and Ctrl-C stops the run.
#[test]
fn an_endless_line_is_not_buffered() {
    let mut run = capped()
        .args(["run", &pipeline(), "--input", "/dev/zero"])
        .args(["--output", "/dev/null", "--dead-letter", "/dev/null"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Unbounded, the line grew by about 700 MB/s: past the cap within a second or two.
    let still = exits_within(&mut run, Duration::from_secs(3));
    assert!(
        still.is_none(),
        "exited: {still:?}\n{}",
        stderr_of(&mut run)
    );
    let peak = peak_rss(run.id());
    signal(run.id(), "-INT");
    let status = exits_within(&mut run, Duration::from_secs(5));
    if status.is_none() {
        let _ = run.kill();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(peak < 128 << 20, "peak resident memory {peak} bytes");
}

/// A line past `max_payload_bytes` (64 KiB in the pipeline) between two events: one dead
/// letter with its first bytes and its length, and reading goes on at the next line.
#[test]
fn a_line_past_max_payload_bytes_is_one_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let gen = generate("2", "1", "3", &[]).stdout;
    let lines: Vec<&[u8]> = gen.split(|b| *b == b'\n').collect();
    let long = vec![b'x'; 50 << 20];
    let mut f = std::fs::File::create(&events).unwrap();
    for part in [lines[0], b"\n", &long, b"\n", lines[1], b"\n"] {
        f.write_all(part).unwrap();
    }
    drop(f);
    let (out, dead) = (dir.path().join("out.jsonl"), dir.path().join("dead.jsonl"));
    let status = capped()
        .args(["run", &pipeline(), "--input", events.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(["--dead-letter", dead.to_str().unwrap()])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let dead = std::fs::read_to_string(&dead).unwrap();
    let letters: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{dead}");
    let d = &letters[0];
    assert_eq!(
        d["error"],
        "payload is 52428800 bytes, over the limit of 65536 bytes (only its first 1024 bytes were kept)"
    );
    assert_eq!(d["payload_truncated"], true);
    assert_eq!(d["payload_bytes"], 52428800);
    assert_eq!(d["payload"].as_str().unwrap(), "x".repeat(1024));
    assert_eq!(d["source"]["offset"], 1);
    // Both events were counted.
    let counted: u64 = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(counted, 2);
}

/// `--output`, `--dead-letter` or `--late` naming the input (by any name) or another
/// output is refused before anything is opened: exit 2, the file untouched.
#[test]
fn an_output_naming_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let data = generate("100", "3", "1", &[]).stdout;
    std::fs::write(&events, &data).unwrap();
    let link = dir.path().join("other-name.jsonl");
    std::fs::hard_link(&events, &link).unwrap();
    let input = events.to_str().unwrap();
    let out = dir.path().join("out.jsonl");
    let out = out.to_str().unwrap();
    for (flags, want) in [
        (vec!["--output", input], "--output"),
        (
            vec!["--dead-letter", link.to_str().unwrap()],
            "--dead-letter",
        ),
        (vec!["--output", out, "--late", out], "--late"),
    ] {
        std::fs::write(out, "kept\n").unwrap();
        let run = weir()
            .args(["run", &pipeline(), "--input", input])
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.contains(&format!("error: {want} ")) && err.contains(" is the same file as "),
            "{flags:?}: {err}"
        );
        assert_eq!(std::fs::read(&events).unwrap(), data, "{flags:?}");
        assert_eq!(std::fs::read_to_string(out).unwrap(), "kept\n", "{flags:?}");
    }
    // Standard output appending to the input (`>> events.jsonl`) is the input too.
    let append = std::fs::OpenOptions::new()
        .append(true)
        .open(&events)
        .unwrap();
    let run = weir()
        .args(["run", &pipeline(), "--input", input, "--output", "-"])
        .stdout(append)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(std::fs::read(&events).unwrap(), data);
}

/// An input file truncated while it is read ends the run with an error that says so
/// (exit 1), not with exit 0 after part of it. The run is held mid-file by its output, a
/// FIFO this test stops reading.
#[test]
fn an_input_truncated_while_read_fails_the_run() {
    let (dir, events) = events_file("100000", "2000", "9");
    let fifo = dir.path().join("results");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut run = weir()
        .args(["run", &pipeline(), "--input", events.to_str().unwrap()])
        .args([
            "--output",
            fifo.to_str().unwrap(),
            "--dead-letter",
            "/dev/null",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening the FIFO waits for the writer: in a thread, so a run that fails first
    // cannot hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(path));
    });
    let mut results = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("weir opens its output")
        .unwrap();
    let mut first = [0u8; 1];
    results.read_exact(&mut first).unwrap();
    // The run now waits on the full FIFO with most of the 20 MB file still unread.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&events)
        .unwrap()
        .set_len(0)
        .unwrap();
    std::io::copy(&mut results, &mut std::io::sink()).unwrap();
    let status = exits_within(&mut run, Duration::from_secs(30));
    if status.is_none() {
        let _ = run.kill();
    }
    let err = stderr_of(&mut run);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains("events.jsonl was truncated while being read: it is now 0 bytes long"),
        "{err}"
    );
}
