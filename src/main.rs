//! `weir`: run, check and feed event-streaming pipelines described in `pipeline.toml`.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use weir_engine::config::{ConfigErrors, Overrides, PipelineConfig};
use weir_engine::generate::{EventGenerator, Timeline, DEFAULT_START_MS};

use weir::Backend;

mod io_cmd;
mod run_cmd;
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
                    weir::store::describe(&c),
                    c.dead_letter.topic
                );
                if let Some(internal) = &c.source.repartition {
                    println!(
                        "repartition: {} is read in group {}.repartition and forwarded by {} to the internal topic {} \
                         (created if missing, with the backend's partition count for new topics), which group {} reads",
                        c.source.topic,
                        c.source.group,
                        c.aggregate.group_by.join(", "),
                        internal,
                        c.source.group
                    );
                }
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
            // Before anything is opened (creating an output truncates it): a usage error.
            if let Err(e) = run_cmd::file_io(&a).check() {
                eprintln!("error: {}", one_line(&e));
                return ExitCode::from(2);
            }
            let p = a.p.clone();
            pipeline_main(&p, false, |c, backend| run_cmd::run(a, c, backend))
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
