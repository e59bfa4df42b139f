//! `weir`: run, check and feed event-streaming pipelines described in `pipeline.toml`.

use std::io::Write as _;
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
use weir::Backend;

mod io_cmd;

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
    /// Run a pipeline and serve its HTTP ingest API (POST /track), a live page of its
    /// results (GET /, GET /ws), /healthz and /metrics, until Ctrl-C.
    Serve(ServeArgs),
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
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli.command {
        Command::Validate(a) => match load(&a) {
            Ok((c, backend)) => {
                println!(
                    "ok: {} — {} backend, {} -> {:?} window of {} -> {} (dead letters -> {})",
                    a.pipeline.display(),
                    backend.name(),
                    c.source.topic,
                    c.window.kind,
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
        Command::Tail(a) => io_cmd::tail(a),
        Command::Generate(a) => match generate(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
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
    match rt.block_on(f(c, backend)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
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

/// A token cancelled by the first Ctrl-C; a second one aborts the process.
fn stop_on_ctrl_c() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!(
                "Ctrl-C: finishing the current batch, committing, stopping (Ctrl-C again to abort)"
            );
            shutdown.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    token
}

async fn serve(a: ServeArgs, c: PipelineConfig, backend: Backend) -> anyhow::Result<()> {
    let addr = a.listen.unwrap_or(c.serve.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("weir serve: http://{local}/ (POST /track, GET /ws, /healthz, /metrics)");
    std::io::stdout().flush()?;
    weir::serve::serve(c, backend, listener, a.demo, stop_on_ctrl_c()).await
}

async fn run(a: RunArgs, c: PipelineConfig, backend: Backend) -> anyhow::Result<()> {
    let shutdown = stop_on_ctrl_c();
    let tasks = tokio_util::task::TaskTracker::new();
    let memory = matches!(backend, Backend::Memory(_));
    let io = FileIo {
        input: a.input.clone(),
        output: a.output.clone(),
        dead_letter: a.dead_letter.clone(),
        late: a.late.clone(),
    };
    let parts = Parts::open(&c, &backend, &io).await?;
    let background = parts.background.clone();

    // The embedded broker lives and dies with this process: feed it with the demo
    // generator when there is no --input, and print what lands in its topics.
    let tails_done = CancellationToken::new();
    if memory {
        if a.input.is_none() {
            weir::demo::start(&tasks, &c, &backend, shutdown.clone()).await?;
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
    let mut pipeline = parts.into_pipeline().shutdown_on(shutdown.clone());
    if let Some(idle) = a.exit_when_idle {
        pipeline = pipeline.exit_when_idle(idle);
    }
    let result = pipeline.run().await;
    background.cancel();
    shutdown.cancel();
    tails_done.cancel();
    tasks.close();
    tasks.wait().await;
    let summary = result?;
    let s = summary.counters;
    if !s.balanced() {
        anyhow::bail!("counters do not balance: {s:?}");
    }
    if summary.reason == StopReason::Shutdown && summary.open_windows > 0 {
        tracing::info!(
            open_windows = summary.open_windows,
            "open windows were not emitted; their input is uncommitted and is recomputed on restart"
        );
    }
    Ok(())
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
