//! Stopping `weir run` and `weir serve` with SIGINT or SIGTERM in every state — also while
//! the broker cannot be reached — a second signal ending the process at once, and
//! unreachable brokers handled the same way on every backend: a log line from the first
//! attempt, retries, and an exit 1 after `[pipeline] give_up_after`.
//!
//! "Unreachable" is a loopback port nobody listens on (9, discard), so these tests need no
//! broker and run for every backend.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Per backend: the `--set` that points it at a port where nothing listens.
const UNREACHABLE: [(&str, &str); 3] = [
    ("kafka", "brokers.kafka.bootstrap_servers=127.0.0.1:9"),
    (
        "amqp",
        "brokers.amqp.url=amqp://guest:guest@127.0.0.1:9/%2f",
    ),
    ("kinesis", "brokers.kinesis.endpoint_url=http://127.0.0.1:9"),
];

fn pipeline() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/user_activity.toml")
}

/// A `weir` process whose stderr lines arrive on a channel.
struct Weir {
    child: Child,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Weir {
    fn spawn(args: &[&str]) -> Weir {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .env_remove("WEIR_BROKER")
            .env("WEIR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir starts");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Weir {
            child,
            stderr: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `within`) for a stderr line containing `text`.
    fn wait_for(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(text)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "no line with {text:?} within {within:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// The exit code, waiting at most `within`.
    fn exit_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "still running {within:?} later; stderr:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first stdout line (`weir serve` prints its URL there).
    fn first_stdout_line(&mut self) -> String {
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weir run` on each backend while its broker is unreachable: the first failed attempt
/// is logged at once (within the first attempt's timeout), and SIGTERM and SIGINT each stop
/// it with exit 0 within a few seconds.
#[test]
fn run_stops_on_sigterm_and_sigint_while_the_broker_is_unreachable_on_every_backend() {
    for (backend, set) in UNREACHABLE {
        for sig in ["TERM", "INT"] {
            let mut w = Weir::spawn(&["run", pipeline(), "--broker", backend, "--set", set]);
            let line = w.wait_for("failed; retrying", Duration::from_secs(8));
            assert!(line.contains("attempt=1"), "{backend}: {line}");
            assert!(line.contains("giving up after 5m"), "{backend}: {line}");
            w.signal(sig);
            let sent = Instant::now();
            assert_eq!(
                w.exit_within(Duration::from_secs(5)),
                Some(0),
                "{backend} SIG{sig}"
            );
            w.wait_for(&format!("SIG{sig}: finishing"), Duration::from_secs(1));
            w.wait_for(
                "stopped before the pipeline started",
                Duration::from_secs(1),
            );
            assert!(sent.elapsed() < Duration::from_secs(5));
        }
    }
}

/// `weir serve` with an unreachable broker answers `/healthz` at once (503, connecting)
/// and stops on the first signal.
#[test]
fn serve_answers_healthz_503_while_connecting_and_stops_on_a_signal() {
    for (backend, set) in UNREACHABLE {
        let mut w = Weir::spawn(&[
            "serve",
            pipeline(),
            "--listen",
            "127.0.0.1:0",
            "--broker",
            backend,
            "--set",
            set,
        ]);
        let line = w.first_stdout_line();
        let url = line
            .split_whitespace()
            .find(|x| x.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        let (code, body) = http_get(&url, "/healthz");
        assert_eq!(code, 503, "{backend}: {body}");
        assert!(
            body.contains(r#""status":"starting: connecting to the broker""#),
            "{body}"
        );
        w.wait_for("failed; retrying", Duration::from_secs(8));
        w.signal(if backend == "amqp" { "INT" } else { "TERM" });
        assert_eq!(w.exit_within(Duration::from_secs(5)), Some(0), "{backend}");
    }
}

/// `[pipeline] give_up_after` ends the retries of `run` and `serve` with exit 1 and a
/// message saying so, the same on every backend.
#[test]
fn an_unreachable_broker_is_given_up_after_the_configured_time_on_every_backend() {
    for (backend, set) in UNREACHABLE {
        for command in [&["run"][..], &["serve", "--listen", "127.0.0.1:0"]] {
            let mut args = command.to_vec();
            args.extend([pipeline(), "--broker", backend, "--set", set]);
            args.extend(["--set", "pipeline.give_up_after=1s"]);
            let mut w = Weir::spawn(&args);
            assert_eq!(
                w.exit_within(Duration::from_secs(15)),
                Some(1),
                "{backend} {command:?}"
            );
            let line = w.wait_for("gave up after", Duration::from_secs(1));
            assert!(line.starts_with("error: "), "{line}");
            assert!(line.contains("opening topic user-activity"), "{line}");
        }
    }
}

/// A run whose output does not drain (a FIFO nobody reads) cannot finish its batch: the
/// first signal asks for a graceful stop, which waits; a second one exits at once with
/// 128 + the signal's number.
#[test]
fn a_second_signal_exits_at_once_when_the_graceful_stop_cannot_finish() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader that opens the FIFO (so weir can open it for writing) and never reads.
    let reader_path = fifo.clone();
    let (opened_tx, opened) = mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(reader_path).unwrap();
        opened_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(60));
        drop(f);
    });
    let events = dir.path().join("events.jsonl");
    let gen = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "generate", "--events", "100000", "--users", "50", "--seed", "3",
        ])
        .output()
        .unwrap();
    std::fs::write(&events, gen.stdout).unwrap();
    let mut w = Weir::spawn(&[
        "run",
        pipeline(),
        "--input",
        events.to_str().unwrap(),
        "--output",
        fifo.to_str().unwrap(),
        "--set",
        "window.size=1s",
    ]);
    opened.recv_timeout(Duration::from_secs(10)).unwrap();
    // 100,000 events over 1,000 s of event time: 50,000 results, far more than a pipe holds.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "stuck on the full pipe"
    );
    w.signal("INT");
    w.wait_for("SIGINT: finishing", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the graceful stop waits for the output"
    );
    w.signal("TERM");
    assert_eq!(w.exit_within(Duration::from_secs(3)), Some(143));
    w.wait_for("SIGTERM again: exiting at once", Duration::from_secs(1));
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
fn http_get(base: &str, path: &str) -> (u16, String) {
    use std::io::Write as _;
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// A TCP proxy on a free loopback port; `cut` closes every connection through it and stops
/// listening, as a broker that goes away does.
struct Proxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn to(target: String) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o) = (stop.clone(), open.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let mut o = o.lock().unwrap();
                o.push(client.try_clone().unwrap());
                o.push(upstream.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, stop, open }
    }

    fn cut(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// RabbitMQ going away while the pipeline runs: the source's reconnects fail (each one
/// logged), and after `[pipeline] give_up_after` the run stops with exit 1 saying why.
#[test]
fn amqp_an_outage_while_running_is_given_up_after_give_up_after() {
    let url = std::env::var("WEIR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let (creds, rest) = url
        .split_once('@')
        .expect("user:pass@host:port in WEIR_AMQP_URL");
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
    let proxy = Proxy::to(hostport.to_string());
    let via = format!("brokers.amqp.url={creds}@127.0.0.1:{}/{vhost}", proxy.port);
    let id = std::process::id();
    let topic = |t: &str| format!("{t}=outage-{t}-{id}").replace(".topic-", "-");
    let mut w = Weir::spawn(&[
        "run",
        pipeline(),
        "--broker",
        "amqp",
        "--set",
        &via,
        "--set",
        &topic("source.topic"),
        "--set",
        &topic("sink.topic"),
        "--set",
        &topic("dead_letter.topic"),
        "--set",
        "brokers.amqp.queue_expires=1m",
        "--set",
        "pipeline.give_up_after=2s",
    ]);
    w.wait_for("pipeline started", Duration::from_secs(20));
    proxy.cut();
    let line = w.wait_for("cannot reconnect", Duration::from_secs(10));
    assert!(line.contains("attempt=1"), "{line}");
    assert_eq!(w.exit_within(Duration::from_secs(20)), Some(1));
    let why = w.wait_for("error: gave up", Duration::from_secs(1));
    assert!(
        why.contains("the source has failed for") && why.contains("give_up_after = 2s"),
        "{why}"
    );
}

/// The settings that point `backend` at the test brokers (`WEIR_*` or the loopback
/// defaults of scripts/brokers), with topics and a group of this run's own.
fn on_test_broker(backend: &str, dir: &std::path::Path) -> Vec<String> {
    let id = format!("{backend}-{}", std::process::id());
    let mut sets = vec![
        format!("source.topic=sig-in-{id}"),
        format!("source.group=sig-{id}"),
        format!("sink.topic=sig-out-{id}"),
        format!("dead_letter.topic=sig-dlq-{id}"),
    ];
    match backend {
        "kafka" => {
            if let Ok(addr) = std::env::var("WEIR_KAFKA_BOOTSTRAP") {
                sets.push(format!("brokers.kafka.bootstrap_servers={addr}"));
            }
        }
        "amqp" => {
            if let Ok(url) = std::env::var("WEIR_AMQP_URL") {
                sets.push(format!("brokers.amqp.url={url}"));
            }
            sets.push("brokers.amqp.queue_expires=1m".into());
        }
        _ => {
            let ep = std::env::var("WEIR_KINESIS_ENDPOINT")
                .unwrap_or_else(|_| "http://127.0.0.1:4567".into());
            sets.push(format!("brokers.kinesis.endpoint_url={ep}"));
            sets.push("brokers.kinesis.credentials=emulator".into());
            sets.push("brokers.kinesis.create_streams=true".into());
            sets.push(format!("brokers.kinesis.checkpoint_dir={}", dir.display()));
        }
    }
    sets
}

/// A pipeline running on a real broker stops on SIGTERM with exit 0 within seconds, having
/// committed (the runtime's "pipeline stopped (Shutdown)" line).
fn sigterm_stops_a_running_pipeline(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sets = on_test_broker(backend, dir.path());
    let mut args = vec!["run", pipeline(), "--broker", backend];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let mut w = Weir::spawn(&args);
    w.wait_for("partitions assigned", Duration::from_secs(60));
    w.signal("TERM");
    assert_eq!(w.exit_within(Duration::from_secs(10)), Some(0), "{backend}");
    w.wait_for("pipeline stopped (Shutdown)", Duration::from_secs(1));
}

#[test]
fn kafka_sigterm_stops_a_running_pipeline() {
    sigterm_stops_a_running_pipeline("kafka");
}

#[test]
fn amqp_sigterm_stops_a_running_pipeline() {
    sigterm_stops_a_running_pipeline("amqp");
}

#[test]
fn kinesis_sigterm_stops_a_running_pipeline() {
    sigterm_stops_a_running_pipeline("kinesis");
}

/// A Kafka broker of this test's own (Apache Kafka from the jars `scripts/brokers` fetches,
/// `scripts/brokers kafka-serve` in the foreground) on free loopback ports, killed when
/// dropped: stopping the shared test bed's broker would break every other test.
struct PrivateKafka {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateKafka {
    fn start() -> PrivateKafka {
        let root = env!("CARGO_MANIFEST_DIR");
        let dir = tempfile::tempdir().unwrap();
        let (port, controller) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("kafka.log")).unwrap();
        let mut child = Command::new(format!("{root}/scripts/brokers"))
            .arg("kafka-serve")
            .arg(dir.path().join("node"))
            .args([port.to_string(), controller.to_string()])
            .env_remove("WEIR_KAFKA_IMPL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("scripts/brokers kafka-serve");
        // Fetching the jars (first use on a machine) and the JVM's start take a while.
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join("kafka.log")).unwrap_or_default();
                panic!("the private Kafka exited ({status}) before it listened on {port}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "the private Kafka did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateKafka {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kafka going away while the pipeline runs (librdkafka retries inside and never returns
/// an error): the source turns "all brokers down" into receive errors, so `/healthz` turns
/// 503 and, after `[pipeline] give_up_after`, the run stops with exit 1 saying why.
#[test]
fn kafka_an_outage_while_running_is_seen_by_healthz_and_given_up() {
    let kafka = PrivateKafka::start();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let id = std::process::id();
    let mut w = Weir::spawn(&[
        "run",
        pipeline(),
        "--broker",
        "kafka",
        "--set",
        &format!("brokers.kafka.bootstrap_servers=127.0.0.1:{}", kafka.port),
        "--set",
        &format!("source.topic=kout-in-{id}"),
        "--set",
        &format!("source.group=kout-{id}"),
        "--set",
        &format!("sink.topic=kout-out-{id}"),
        "--set",
        &format!("dead_letter.topic=kout-dlq-{id}"),
        "--set",
        &format!("brokers.kafka.checkpoint_topic=kout-cp-{id}"),
        "--set",
        "pipeline.give_up_after=8s",
        "--set",
        "observability.stuck_after=2s",
        "--metrics-listen",
        &metrics.to_string(),
    ]);
    w.wait_for("partitions assigned", Duration::from_secs(40));
    let base = format!("http://{metrics}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&base, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(kafka);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (code, body) = loop {
        let (code, body) = http_get(&base, "/healthz");
        if code == 503 || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the source has failed for"), "{body}");
    assert_eq!(w.exit_within(Duration::from_secs(30)), Some(1));
    let why = w.wait_for("error: gave up", Duration::from_secs(1));
    assert!(why.contains("the source has failed for"), "{why}");
}
