//! The whole process, as a user measures it: `weir run PIPELINE --input FILE --output FILE`
//! against a bare single-threaded Rust program that does the same job end to end (read the
//! file, parse each line with serde_json into a borrowed struct, count per (user, 10 s
//! window), close windows as event time passes their end + grace, write the same result
//! lines). Runs alternate (bare, weir, bare, weir, …) and the median of the per-pair
//! ratios is printed, for a file and for `--input -` fed through a pipe. Both outputs are
//! checked against each other: the same windows with the same counts.
//!
//! `cargo bench --bench whole_process` (WEIR_BENCH_EVENTS, default 1,000,000 over 1,000
//! users; WEIR_BENCH_ROUNDS pairs, default 7; WEIR_BENCH_EVENT_RATE to run one shape only;
//! WEIR_BIN to time another `weir` binary, WEIR_BENCH_PIPELINE another pipeline file).
//!
//! The bench binary is also the bare program: `whole_process bare IN OUT` (`-` = stdin).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/seed_event.rs"]
mod seed_event;
use seed_event::Event;
#[path = "support/common.rs"]
mod common;

const SIZE_MS: i64 = 10_000;
const GRACE_MS: i64 = 2_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("bare") {
        bare(&args[2], &args[3]);
        return;
    }
    let n = common::events(1_000_000);
    let rounds = common::env_number("WEIR_BENCH_ROUNDS", 7);
    let rates: Vec<i64> = match std::env::var("WEIR_BENCH_EVENT_RATE") {
        Ok(r) => vec![r.parse().expect("WEIR_BENCH_EVENT_RATE")],
        // The generator's own shape (`weir generate`: 100 events per second of event time)
        // and a denser one (~10 events per user and window).
        Err(_) => vec![100, 1000],
    };
    let dir = std::env::temp_dir().join(format!("weir-whole-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for rate in rates {
        let input = dir.join(format!("events-{rate}.jsonl"));
        write_events(&input, n, rate);
        for piped in [false, true] {
            compare(&dir, &input, rate, piped, rounds);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `n` seed events over 1,000 users, `rate` per second of event time.
fn write_events(path: &Path, n: usize, rate: i64) {
    let mut w = BufWriter::new(File::create(path).expect("events file"));
    for e in common::seed_events(1, n, 1_000, rate) {
        w.write_all(&e).expect("write");
        w.write_all(b"\n").expect("write");
    }
    w.flush().expect("write");
}

/// One timed process run: its wall time and peak resident memory (KiB).
struct Run {
    wall: Duration,
    max_rss_kib: u64,
}

fn compare(dir: &Path, input: &Path, rate: i64, piped: bool, rounds: usize) {
    let weir = std::env::var("WEIR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_weir").into());
    let me = std::env::current_exe().expect("bench path");
    let pipeline = std::env::var("WEIR_BENCH_PIPELINE").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/user_activity.toml"),
        Into::into,
    );
    let (bare_out, weir_out) = (dir.join("bare.jsonl"), dir.join("weir.jsonl"));
    let src = if piped {
        "-".into()
    } else {
        input.display().to_string()
    };
    let mut bare_cmd = Command::new(&me);
    bare_cmd.arg("bare").arg(&src).arg(&bare_out);
    let mut weir_cmd = Command::new(&weir);
    weir_cmd
        .arg("run")
        .arg(&pipeline)
        .arg("--input")
        .arg(&src)
        .arg("--output")
        .arg(&weir_out)
        .arg("--dead-letter")
        .arg(dir.join("dl.jsonl"))
        .env("WEIR_LOG", "warn");
    let mut ratios = Vec::new();
    let (mut bare_walls, mut weir_walls) = (Vec::new(), Vec::new());
    let mut peak = (0, 0);
    for round in 0..rounds {
        let b = timed(&mut bare_cmd, input, piped);
        let w = timed(&mut weir_cmd, input, piped);
        if round == 0 {
            check_same(&bare_out, &weir_out);
        }
        ratios.push(w.wall.as_secs_f64() / b.wall.as_secs_f64());
        bare_walls.push(b.wall.as_secs_f64());
        weir_walls.push(w.wall.as_secs_f64());
        peak = (peak.0.max(b.max_rss_kib), peak.1.max(w.max_rss_kib));
    }
    println!(
        "whole process, {rate} events/s of event time, {}: weir {:.3} s, bare {:.3} s (medians of {rounds}); weir/bare = {:.2}x (median of the pair ratios, range {:.2}-{:.2}); peak RSS weir {} MiB, bare {} MiB",
        if piped { "--input - from a pipe" } else { "--input FILE" },
        median(&mut weir_walls),
        median(&mut bare_walls),
        median(&mut ratios.clone()),
        ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        ratios.iter().cloned().fold(0.0, f64::max),
        peak.1 / 1024,
        peak.0 / 1024,
    );
}

/// Runs `cmd` to its end (stdin: nothing, or `input` through a pipe) and times it.
fn timed(cmd: &mut Command, input: &Path, piped: bool) -> Run {
    cmd.stdin(if piped { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let feeder = piped.then(|| {
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_path_buf();
        std::thread::spawn(move || {
            let mut f = File::open(input).expect("input");
            let mut buf = vec![0; 1 << 16];
            loop {
                let n = f.read(&mut buf).expect("read input");
                if n == 0 {
                    break;
                }
                stdin.write_all(&buf[..n]).expect("feed the pipe");
            }
        })
    });
    let watcher = peak_rss_watcher(child.id());
    let status = child.wait().expect("wait");
    let wall = start.elapsed();
    if let Some(f) = feeder {
        f.join().expect("feeder");
    }
    assert!(status.success(), "{cmd:?} failed: {status}");
    Run {
        wall,
        max_rss_kib: watcher.join().expect("watcher"),
    }
}

/// Reads the process's peak resident set (`VmHWM` in `/proc/PID/status`, which only grows)
/// every few milliseconds until the process is gone, and returns the last value read.
fn peak_rss_watcher(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            match status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                Some(v) => {
                    peak = v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .unwrap_or(peak)
                }
                None => break, // a zombie: its memory is gone
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        peak
    })
}

/// Both programs found the same windows with the same counts (line order may differ).
fn check_same(bare: &Path, weir: &Path) {
    let read = |p: &Path| {
        let mut lines: Vec<String> = BufReader::new(File::open(p).expect("output"))
            .lines()
            .map(|l| l.expect("line"))
            .collect();
        lines.sort_unstable();
        lines
    };
    let (b, w) = (read(bare), read(weir));
    assert!(!b.is_empty(), "the bare program wrote no results");
    assert_eq!(
        b.len(),
        w.len(),
        "weir and the bare program wrote different numbers of results"
    );
    assert!(b == w, "weir's results differ from the bare program's");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bare program: one thread, a `BufReader`, serde_json into a borrowed struct, a map of
/// open windows per window start, windows closed when the largest event time seen passes
/// their end + grace, results written as they close.
fn bare(input: &str, output: &str) {
    let stdin = std::io::stdin();
    let mut r: Box<dyn BufRead> = if input == "-" {
        Box::new(BufReader::with_capacity(1 << 16, stdin.lock()))
    } else {
        Box::new(BufReader::with_capacity(
            1 << 16,
            File::open(input).expect("input"),
        ))
    };
    let mut out = BufWriter::with_capacity(1 << 16, File::create(output).expect("output"));
    let mut open: BTreeMap<i64, HashMap<String, u64>> = BTreeMap::new();
    let mut max_time = i64::MIN;
    let mut line = Vec::with_capacity(512);
    let mut text = String::with_capacity(128);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).expect("read") == 0 {
            break;
        }
        let Ok(ev) = serde_json::from_slice::<Event>(&line) else {
            continue;
        };
        let Ok(t) = weir_engine::time::parse_datetime(ev.timestamp) else {
            continue;
        };
        let start = t.div_euclid(SIZE_MS) * SIZE_MS;
        if start + SIZE_MS + GRACE_MS <= max_time {
            continue; // late
        }
        let users = open.entry(start).or_default();
        match users.get_mut(ev.user_id) {
            Some(c) => *c += 1,
            None => {
                users.insert(ev.user_id.to_string(), 1);
            }
        }
        if t > max_time {
            max_time = t;
            while let Some(entry) = open.first_entry() {
                if *entry.key() + SIZE_MS + GRACE_MS > max_time {
                    break;
                }
                let (start, users) = entry.remove_entry();
                write_window(&mut out, &mut text, start, users);
            }
        }
    }
    while let Some((start, users)) = open.pop_first() {
        write_window(&mut out, &mut text, start, users);
    }
    out.flush().expect("write");
}

fn write_window(out: &mut impl Write, text: &mut String, start: i64, users: HashMap<String, u64>) {
    use std::fmt::Write as _;
    for (user, count) in users {
        text.clear();
        text.push_str("{\"user_id\":\"");
        text.push_str(&user);
        text.push_str("\",\"window_start\":\"");
        weir_engine::time::write_rfc3339(text, start);
        text.push_str("\",\"window_end\":\"");
        weir_engine::time::write_rfc3339(text, start + SIZE_MS);
        let _ = writeln!(text, "\",\"count\":{count}}}");
        out.write_all(text.as_bytes()).expect("write");
    }
}
