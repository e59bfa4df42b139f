//! `weir run`: the pipeline of a `pipeline.toml` on its backend, with its progress line,
//! optional metrics endpoint, and the memory backend's outputs printed as they arrive.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use weir_engine::config::{LatePolicy, PipelineConfig};
use weir_engine::{Received, Source, StopReason};

use weir::assemble::{FileIo, Parts};
use weir::observe::{Observer, Phase};
use weir::Backend;

use crate::{signals, RunArgs};

/// `weir run`: assembles the pipeline, runs it until input ends, it goes idle (with
/// `--exit-when-idle`) or a signal stops it, and prints its summary.
pub(crate) async fn run(a: RunArgs, c: PipelineConfig, backend: Backend) -> anyhow::Result<()> {
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
        // The same front as `weir serve`'s, with its limits (`[serve]`).
        let server = weir::http::serve(
            listener,
            weir::observe::router(observer.clone()),
            weir::http::Limits::from(&c.serve),
            tails_done.clone(),
        );
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
    let mut parts = parts;
    let forwarder =
        weir::assemble::spawn_forwarder(parts.forwarder.take(), &shutdown, a.exit_when_idle);
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
    // The forwarder stops when its input does (or with the pipeline, on a signal).
    let forwarded = match forwarder {
        Some(f) => {
            if result.is_err() {
                shutdown.cancel();
            }
            f.await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("repartition: {e}")))
        }
        None => Ok(()),
    };
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
    forwarded?;
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

/// The files `a` names instead of topics.
pub(crate) fn file_io(a: &RunArgs) -> FileIo {
    FileIo {
        input: a.input.clone(),
        output: a.output.clone(),
        dead_letter: a.dead_letter.clone(),
        late: a.late.clone(),
    }
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
    let parts = Parts::open(c, backend, &file_io(a), metrics).await?;

    // The embedded broker lives and dies with this process: feed it with the demo
    // generator when there is no --input, and print what lands in its topics.
    if memory {
        if a.input.is_none() {
            weir::demo::start(tasks, c, backend, shutdown.clone()).await?;
        }
        if a.output.is_none() && c.sink_store.is_none() {
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
