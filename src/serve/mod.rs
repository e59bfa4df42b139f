//! `weir serve`: runs a pipeline and, in the same process, an HTTP server (axum) with the
//! ingest API (`POST /track`, `POST /track/batch`), the live view (`GET /` and the
//! `GET /ws` feed of window results), `GET /healthz` and `GET /metrics`.
//!
//! ```text
//! POST /track ─▶ Ingest (validate, queue) ─▶ source topic ─▶ Pipeline ─▶ LiveSink ─▶ sink topic
//!                                                                          └─▶ Hub ─▶ /ws clients
//! ```

mod ingest;
mod live;
mod prom;
mod routes;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weir_engine::config::PipelineConfig;

use crate::assemble::{FileIo, Parts};
use crate::observe::{Observer, Phase};
use crate::Backend;

pub use ingest::{Ingest, Refused};
pub use live::{Hub, LiveSink};

/// Messages a live-view client may fall behind by before it skips ahead.
const LIVE_LAG: usize = 4096;
/// Results replayed to a live-view client that joins.
const LIVE_RECENT: usize = 500;
/// How often the counters go to the live view.
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

/// What the routes share.
pub struct App {
    config: PipelineConfig,
    backend: &'static str,
    /// Set once the broker is connected; until then `POST /track*` wait for it (up to
    /// `publish_timeout`, then 503).
    ingest: OnceLock<Ingest>,
    /// Notified when `ingest` is set.
    ready: tokio::sync::Notify,
    /// Requests refused for a missing or wrong token (401).
    unauthorized: std::sync::atomic::AtomicU64,
    hub: Arc<Hub>,
    observer: Arc<Observer>,
    /// The bearer token `POST /track*` require, if any.
    token: Option<String>,
    stop: CancellationToken,
}

impl App {
    /// The ingest API once the broker is connected, waiting up to `publish_timeout` for it.
    async fn ingest(&self) -> Option<&Ingest> {
        let deadline = tokio::time::Instant::now() + self.config.serve.publish_timeout;
        loop {
            let ready = self.ready.notified();
            if let Some(i) = self.ingest.get() {
                return Some(i);
            }
            if tokio::time::timeout_at(deadline, ready).await.is_err() {
                return self.ingest.get();
            }
        }
    }

    fn hello(&self) -> Arc<str> {
        let c = &self.config;
        serde_json::json!({
            "type": "hello",
            "pipeline": c.name,
            "backend": self.backend,
            "group_by": c.aggregate.group_by,
            "values": c.aggregate.compute.iter().map(|a| a.output_name()).collect::<Vec<_>>(),
        })
        .to_string()
        .into()
    }

    fn counters(&self) -> Arc<str> {
        let s = self.observer.metrics.snapshot();
        let mut m = serde_json::Map::new();
        m.insert("type".into(), "counters".into());
        // Every counter of the balance and the others, from the one list all displays share.
        for t in s.terms() {
            m.insert(t.name.into(), t.value.into());
        }
        m.insert("balanced".into(), s.balanced().into());
        m.insert(
            "watermark".into(),
            (s.watermark != i64::MIN).then_some(s.watermark).into(),
        );
        let e = &s.emit_latency;
        m.insert(
            "emit_latency".into(),
            serde_json::json!({
                "windows": e.count(),
                "p50_ms": e.quantile_ms(0.5),
                "p99_ms": e.quantile_ms(0.99),
            }),
        );
        m.insert(
            "accepted".into(),
            self.ingest
                .get()
                .map_or(0, |i| i.stats.accepted.load(Ordering::Relaxed))
                .into(),
        );
        serde_json::Value::Object(m).to_string().into()
    }
}

/// Runs the pipeline of `c` on `backend` and serves HTTP on `listener` until `stop` (or
/// until the pipeline stops, which also stops the server). `demo` feeds the source topic
/// with the `[demo]` generator. The server answers at once: `/healthz` says 503 while the
/// broker is being connected, and `stop` ends that wait too.
pub async fn serve(
    c: PipelineConfig,
    backend: Backend,
    listener: TcpListener,
    demo: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let hub = Arc::new(Hub::new(LIVE_LAG, LIVE_RECENT));
    let observer = Observer::new(&c.name, backend.name(), c.observability.stuck_after);
    observer.read_event_time(&c);
    let token = std::env::var(&c.serve.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let tasks = tokio_util::task::TaskTracker::new();
    let app = Arc::new(App {
        backend: backend.name(),
        ingest: OnceLock::new(),
        ready: tokio::sync::Notify::new(),
        unauthorized: Default::default(),
        hub: hub.clone(),
        observer: observer.clone(),
        token,
        stop: stop.clone(),
        config: c,
    });
    let server = tokio::spawn(crate::http::serve(
        listener,
        routes::router(app.clone()),
        crate::http::Limits::from(&app.config.serve),
        stop.clone(),
    ));

    let c = &app.config;
    let connected = tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        r = connect(c, &backend, &hub, &observer, &tasks, demo, &stop) => Some(r),
    };
    let parts = match connected {
        Some(Ok((parts, ingest))) => {
            let _ = app.ingest.set(ingest);
            app.ready.notify_waiters();
            parts
        }
        Some(Err(e)) => {
            observer.set_phase(Phase::Stopped);
            stop.cancel();
            let _ = server.await;
            return Err(e);
        }
        None => {
            observer.set_phase(Phase::Stopped);
            tasks.close();
            tasks.wait().await;
            server.await??;
            tracing::info!("stopped before the pipeline started: nothing was read or committed");
            return Ok(());
        }
    };
    tracing::info!(
        pipeline = %c.name,
        backend = app.backend,
        token = app.token.is_some(),
        "serving the ingest API and the live view"
    );

    // The tasks the parts started (the enrichment table's follower) stop with the pipeline.
    let background = parts.background.clone();
    let mut parts = parts;
    let forwarder = crate::assemble::spawn_forwarder(parts.forwarder.take(), &stop, None);
    let pipeline = parts.into_pipeline().shutdown_on(stop.clone());
    observer.set_phase(Phase::Running);
    let watchdog = {
        let (o, limit, stop) = (observer.clone(), c.give_up_after, stop.clone());
        tokio::spawn(async move { o.give_up_after(limit, &stop).await })
    };
    let run = {
        let app = app.clone();
        tokio::spawn(async move {
            let r = pipeline.run().await;
            background.cancel();
            app.observer.set_phase(Phase::Stopped);
            app.stop.cancel();
            r
        })
    };
    {
        let app = app.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(COUNTERS_EVERY);
            loop {
                tokio::select! {
                    _ = app.stop.cancelled() => break,
                    _ = tick.tick() => app.hub.publish(app.counters()),
                }
            }
        });
    }

    let served = server.await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let summary = run.await?;
    if let Ok(Some(why)) = watchdog.await {
        anyhow::bail!("{why}");
    }
    let summary = summary?;
    if let Some(f) = forwarder {
        f.await??;
    }
    served??;
    let s = summary.counters;
    anyhow::ensure!(s.balanced(), "counters do not balance: {s:?}");
    Ok(())
}

/// Connects the pipeline's parts (observed, the results teed to the live view) and the
/// ingest API's producer, and starts the demo generator if asked.
async fn connect(
    c: &PipelineConfig,
    backend: &Backend,
    hub: &Arc<Hub>,
    observer: &Arc<Observer>,
    tasks: &tokio_util::task::TaskTracker,
    demo: bool,
    stop: &CancellationToken,
) -> anyhow::Result<(Parts, Ingest)> {
    let mut parts = Parts::open(c, backend, &FileIo::default(), observer.metrics.clone())
        .await?
        .observed(observer);
    parts.sink = Box::new(LiveSink::new(parts.sink, hub.clone()));
    let ingest_sink = crate::assemble::connect(
        c,
        backend,
        &format!("opening topic {}", c.source.topic),
        || backend.feeder(&c.source.topic),
    )
    .await?;
    let ingest = Ingest::start(c, ingest_sink, stop.clone());
    if demo {
        crate::demo::start(tasks, c, backend, stop.clone()).await?;
    }
    Ok((parts, ingest))
}
