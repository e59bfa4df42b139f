//! `weir`: run, check and feed event-streaming pipelines described in `pipeline.toml`.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir_engine::config::{ConfigErrors, LatePolicy, Overrides, PipelineConfig};
use weir_engine::generate::{EventGenerator, Timeline, DEFAULT_START_MS};
use weir_engine::{Received, Source, StopReason};

use weir::assemble::{FileIo, Parts};
use weir::observe::{Observer, Phase};
use weir::Backend;

mod io_cmd;
mod signals;

/// An error and its causes on one line, each cause once: a backend error's message already
/// shows the text of the cause it keeps (`source()`).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "In-process event-streaming engine with pluggable brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until its input ends or Ctrl-C.
    Run(RunArgs),
    /// Check a pipeline file and list every problem (exit 0 if valid, 2 if not).
    Validate(PipelineArgs),
    /// Print seed-shaped random events as JSON lines.
    Generate(GenerateArgs),
    /// Publish JSON lines from stdin to the pipeline's source topic (or --topic), keyed by
    /// its group_by field; waits for acknowledgements and prints how many were sent.
    Produce(io_cmd::ProduceArgs),
    /// Print the records of the pipeline's sink topic (or --topic) as JSON lines.
    Tail(io_cmd::TailArgs),
    /// Test a pipeline against golden cases (input events and the expected results, dead
    /// letters and late events) on the memory backend; exit 1 if any case differs.
    Test(TestArgs),
    /// Run a pipeline and serve its HTTP ingest API (POST /track), a live page of its
    /// results (GET /, GET /ws), /healthz and /metrics, until Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Args)]
struct TestArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Case files; default: every `*.toml` in `tests/<pipeline name>/` beside the pipeline.
    cases: Vec<PathBuf>,
    /// Override a setting for every case: `--set window.grace=5s` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Address to listen on, instead of `[serve] listen` (127.0.0.1:8000); port 0 picks one.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// Also feed the source topic with the `[demo]` generator (the seed's timer).
    #[arg(long)]
    demo: bool,
}

#[derive(Args, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Backend to use instead of the file's `pipeline.broker`.
    #[arg(long, env = "WEIR_BROKER")]
    broker: Option<String>,
    /// Override a setting: `--set window.grace=5s` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Read JSON-lines events from FILE (or `-` for stdin) instead of the source topic; when
    /// it ends, every open window is emitted and weir exits.
    #[arg(long, value_name = "FILE|-")]
    input: Option<String>,
    /// Write results as JSON lines to FILE (or `-`) instead of the sink topic.
    #[arg(long, value_name = "FILE|-")]
    output: Option<String>,
    /// Write dead letters as JSON lines to FILE (or `-`) instead of the dead-letter topic.
    #[arg(long, value_name = "FILE|-")]
    dead_letter: Option<String>,
    /// Write late events as JSON lines to FILE (or `-`) instead of the `[late]` topic.
    #[arg(long, value_name = "FILE|-")]
    late: Option<String>,
    /// Stop once no record arrived for this long (e.g. `5s`), emitting every open window as
    /// at the end of input: a bounded run over a broker topic.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    exit_when_idle: Option<Duration>,
    /// Serve Prometheus `/metrics` and `/healthz` on this address, instead of
    /// `[observability] listen` (none by default); port 0 picks a free one.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Durations on the command line read as in the pipeline file (`5s`, `500ms`, `1m30s`).
pub(crate) fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    weir_engine::time::parse_duration(s)
}

#[derive(Args)]
struct GenerateArgs {
    /// How many events; without it, events flow forever at --rate with wall-clock times.
    #[arg(long)]
    events: Option<u64>,
    /// Distinct users (User0, User1, ...).
    #[arg(long, default_value_t = 10)]
    users: u64,
    /// Seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Events per second when streaming without --events.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// First event time (RFC 3339) for --events; 100 events per second of event time follow.
    #[arg(long)]
    start: Option<String>,
    /// Make one in N events invalid (0 = none), for dead-letter demos.
    #[arg(long, default_value_t = 0)]
    invalid_every: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `weir test` prints its own report; the pipelines' info lines would bury it.
    let default = if matches!(cli.command, Command::Test(_)) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour())
        .init();
    match cli.command {
        Command::Validate(a) => match load(&a) {
            Ok((c, backend)) => {
                println!(
                    "ok: {} — {} backend, {} -> {} window of {} -> {} (dead letters -> {})",
                    a.pipeline.display(),
                    backend.name(),
                    c.source.topic,
                    describe(c.window.kind),
                    c.aggregate.group_by.join(", "),
                    c.sink.topic,
                    c.dead_letter.topic
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Produce(a) => io_cmd::produce(a),
        Command::Test(a) => test_cases(a),
        Command::Tail(a) => io_cmd::tail(a),
        Command::Generate(a) => match generate(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", one_line(&e));
                ExitCode::from(1)
            }
        },
        Command::Serve(a) => {
            let p = a.p.clone();
            pipeline_main(&p, true, |c, backend| serve(a, c, backend))
        }
        Command::Run(a) => {
            let p = a.p.clone();
            pipeline_main(&p, false, |c, backend| run(a, c, backend))
        }
    }
}

/// A window in the file's words: `tumbling 10s`, `hopping 1m every 10s`, `session (gap 30s)`.
fn describe(kind: weir_engine::window::WindowKind) -> String {
    use weir_engine::time::human;
    use weir_engine::window::WindowKind;
    let ms = |v: i64| human(Duration::from_millis(v.max(0) as u64));
    match kind {
        WindowKind::Tumbling { size } => format!("tumbling {}", ms(size)),
        WindowKind::Hopping { size, advance } => {
            format!("hopping {} every {}", ms(size), ms(advance))
        }
        WindowKind::Session { gap } => format!("session (gap {})", ms(gap)),
    }
}

/// Colour in log lines only on a terminal, and never with `NO_COLOR` set (no-color.org).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `weir test`: runs every case, prints each result and a diff per failing case; exit 0
/// when all pass, 1 when one differs, 2 when a case or the pipeline cannot be used.
fn test_cases(a: TestArgs) -> ExitCode {
    let paths = if a.cases.is_empty() {
        weir::golden::shipped_cases(&a.pipeline)
    } else {
        a.cases.clone()
    };
    if paths.is_empty() {
        eprintln!(
            "error: no cases given and none in tests/{}/ beside {}",
            a.pipeline.file_stem().unwrap_or_default().to_string_lossy(),
            a.pipeline.display()
        );
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for path in &paths {
        let case = match weir::golden::read_case(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}", one_line(&e));
                return ExitCode::from(2);
            }
        };
        let about = case
            .description()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default();
        match rt.block_on(case.run(&a.pipeline, &a.sets)) {
            Ok(diff) if diff.passed() => {
                passed += 1;
                println!("ok    {}{about}", case.name());
            }
            Ok(diff) => {
                failed += 1;
                println!("FAIL  {}{about} ({})", case.name(), path.display());
                print!("{}", diff.render());
            }
            Err(e) => {
                eprintln!(
                    "error: case {} ({}): {}",
                    case.name(),
                    path.display(),
                    one_line(&e)
                );
                return ExitCode::from(2);
            }
        }
    }
    println!(
        "{} case{}: {passed} passed, {failed} failed",
        passed + failed,
        if passed + failed == 1 { "" } else { "s" }
    );
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Loads the pipeline of `p` (exit 2 with every problem), then runs `f` on a tokio runtime,
/// multi-threaded or not (exit 1 on error).
fn pipeline_main<F>(
    p: &PipelineArgs,
    multi_thread: bool,
    f: impl FnOnce(PipelineConfig, Backend) -> F,
) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let (c, backend) = match load(p) {
        Ok(x) => x,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(f(c, backend));
    // A blocking call still waiting for an unreachable broker must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn load(a: &PipelineArgs) -> Result<(PipelineConfig, Backend), ConfigErrors> {
    let overrides = Overrides {
        sets: a.sets.clone(),
        broker: a.broker.clone().map(|b| {
            let origin = if std::env::args().any(|x| x == "--broker" || x.starts_with("--broker="))
            {
                format!("--broker {b}")
            } else {
                format!("WEIR_BROKER={b}")
            };
            (b, origin)
        }),
    };
    Backend::load(&a.pipeline, &overrides)
}

async fn serve(a: ServeArgs, c: PipelineConfig, backend: Backend) -> anyhow::Result<()> {
    let addr = a.listen.unwrap_or(c.serve.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("weir serve: http://{local}/ (POST /track, GET /ws, /healthz, /metrics)");
    std::io::stdout().flush()?;
    let stop = signals::stop_token()?;
    weir::serve::serve(c, backend, listener, a.demo, stop).await
}

async fn run(a: RunArgs, c: PipelineConfig, backend: Backend) -> anyhow::Result<()> {
    let shutdown = signals::stop_token()?;
    let tasks = tokio_util::task::TaskTracker::new();
    let tails_done = CancellationToken::new();
    // Observed always: the progress line, giving up on a failing broker and the optional
    // metrics endpoint read it.
    let observer = Observer::new(&c.name, backend.name(), c.observability.stuck_after);
    observer.read_event_time(&c);
    if let Some(addr) = a.metrics_listen.or(c.observability.listen) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
        let local = listener.local_addr()?;
        tracing::info!("metrics: http://{local}/metrics and http://{local}/healthz");
        let server = axum::serve(listener, weir::observe::router(observer.clone()))
            .with_graceful_shutdown(tails_done.clone().cancelled_owned());
        tasks.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the metrics server stopped");
            }
        });
    }
    let stop_tasks = |tasks: tokio_util::task::TaskTracker| {
        let tails_done = tails_done.clone();
        async move {
            tails_done.cancel();
            tasks.close();
            tasks.wait().await;
        }
    };
    // Connecting may wait for an unreachable broker: a signal stops that at once.
    let started = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = start(&a, &c, &backend, &shutdown, &tasks, &tails_done, observer.metrics.clone()) => Some(r),
    };
    let parts = match started {
        Some(Ok(parts)) => parts,
        Some(Err(e)) => {
            stop_tasks(tasks).await;
            return Err(e);
        }
        None => {
            stop_tasks(tasks).await;
            tracing::info!("stopped before the pipeline started: nothing was read or committed");
            return Ok(());
        }
    };
    let background = parts.background.clone();
    let mut pipeline = parts
        .observed(&observer)
        .into_pipeline()
        .shutdown_on(shutdown.clone());
    if let Some(idle) = a.exit_when_idle {
        pipeline = pipeline.exit_when_idle(idle);
    }
    observer.set_phase(Phase::Running);
    let progress = (a.input.is_some() && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(progress(observer.clone())));
    let watchdog = {
        let (o, limit, stop) = (observer.clone(), c.give_up_after, shutdown.clone());
        tokio::spawn(async move { o.give_up_after(limit, &stop).await })
    };
    let result = pipeline.run().await;
    observer.set_phase(Phase::Stopped);
    background.cancel();
    shutdown.cancel();
    if let Some(p) = progress {
        p.abort();
        eprint!("\r\x1b[K");
    }
    stop_tasks(tasks).await;
    if let Ok(Some(why)) = watchdog.await {
        anyhow::bail!("{why}");
    }
    let summary = result?;
    let s = summary.counters;
    if !s.balanced() {
        anyhow::bail!("counters do not balance: {s:?}");
    }
    if summary.reason == StopReason::Shutdown && summary.open_windows > 0 {
        if backend.in_process() && a.input.is_none() {
            tracing::info!(
                open_windows = summary.open_windows,
                "open windows were not emitted; the memory broker's topics end with this process, so their events are gone"
            );
        } else if a.input.is_some() {
            tracing::info!(
                open_windows = summary.open_windows,
                "open windows were not emitted; run the same --input again to get them"
            );
        } else {
            tracing::info!(
                open_windows = summary.open_windows,
                "open windows were not emitted; their input is uncommitted and is recomputed on restart"
            );
        }
    }
    Ok(())
}

/// Rewrites one line on the terminal every second: events read and their rate, bytes
/// read, open (key, window) entries.
async fn progress(o: std::sync::Arc<Observer>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, std::time::Instant::now());
    loop {
        tick.tick().await;
        let s = o.metrics.snapshot();
        let now = std::time::Instant::now();
        let rate = (s.events_in - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
        last = (s.events_in, now);
        let mib = o.bytes_in.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1048576.0;
        eprint!(
            "\r\x1b[K{} events ({}/s), {mib:.1} MiB read, {} open window entries",
            thousands(s.events_in),
            thousands(rate as u64),
            thousands(s.open_entries)
        );
    }
}

/// 1234567 as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Opens the pipeline's parts and starts what feeds and prints the memory broker.
async fn start(
    a: &RunArgs,
    c: &PipelineConfig,
    backend: &Backend,
    shutdown: &CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
    tails_done: &CancellationToken,
    metrics: std::sync::Arc<weir_engine::metrics::Metrics>,
) -> anyhow::Result<Parts> {
    let memory = backend.in_process();
    let io = FileIo {
        input: a.input.clone(),
        output: a.output.clone(),
        dead_letter: a.dead_letter.clone(),
        late: a.late.clone(),
    };
    let parts = Parts::open(c, backend, &io, metrics).await?;

    // The embedded broker lives and dies with this process: feed it with the demo
    // generator when there is no --input, and print what lands in its topics.
    if memory {
        if a.input.is_none() {
            weir::demo::start(tasks, c, backend, shutdown.clone()).await?;
        }
        if a.output.is_none() {
            let src = backend.source(&c.sink.topic, None).await?;
            tasks.spawn(tail(src, tails_done.clone(), ""));
        }
        if a.dead_letter.is_none() {
            let src = backend.source(&c.dead_letter.topic, None).await?;
            tasks.spawn(tail(src, tails_done.clone(), "dead letter: "));
        }
    }

    if let (LatePolicy::Output(topic), None, true) = (&c.late, &a.late, memory) {
        let src = backend.source(topic, None).await?;
        tasks.spawn(tail(src, tails_done.clone(), "late event: "));
    }
    Ok(parts)
}

/// Prints the records of a topic as they arrive (results to stdout; dead letters and late
/// events to stderr, after `prefix`); after `done`, drains what is left and returns.
async fn tail(mut src: Box<dyn Source>, done: CancellationToken, prefix: &'static str) {
    let to_stderr = !prefix.is_empty();
    let mut finishing = false;
    loop {
        let r = src.recv(1024, Duration::from_millis(50)).await;
        let batch = match r {
            Ok(Received::Batch(b)) => b,
            Ok(Received::Assigned(_) | Received::Revoked(_)) => continue,
            Ok(Received::End) => return,
            Err(e) => {
                tracing::warn!(error = %e, "tail stopped");
                return;
            }
        };
        if batch.is_empty() {
            if finishing {
                return;
            }
            finishing = done.is_cancelled();
            continue;
        }
        let mut buf = Vec::with_capacity(batch.len() * 128);
        for r in &batch {
            buf.extend_from_slice(prefix.as_bytes());
            buf.extend_from_slice(&r.payload);
            buf.push(b'\n');
        }
        let _ = if to_stderr {
            std::io::stderr().write_all(&buf)
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf).and_then(|_| out.flush())
        };
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let mut g = EventGenerator::new(a.seed, a.users).with_invalid_every(a.invalid_every);
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out.lock());
    match a.events {
        Some(n) => {
            let start = match &a.start {
                Some(s) => weir_engine::generate::parse_start(s)
                    .map_err(|e| anyhow::anyhow!("--start: {e}"))?,
                None => DEFAULT_START_MS,
            };
            let mut t = Timeline::new(a.seed, start, 10, 500);
            for _ in 0..n {
                writeln!(out, "{}", g.event(t.next_time())).context("writing events")?;
            }
            out.flush().context("writing events")?;
        }
        None => {
            anyhow::ensure!(
                a.rate > 0.0 && a.rate.is_finite(),
                "--rate must be more than 0"
            );
            let gap = Duration::from_secs_f64(1.0 / a.rate);
            let mut next = std::time::Instant::now();
            loop {
                writeln!(out, "{}", g.event(weir_engine::time::now_millis()))
                    .context("writing events")?;
                out.flush().context("writing events")?;
                next += gap;
                if let Some(d) = next.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }
    }
    Ok(())
}
