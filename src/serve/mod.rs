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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weir_engine::config::PipelineConfig;
use weir_engine::metrics::Metrics;

use crate::assemble::{FileIo, Parts};
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
    ingest: Ingest,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// The bearer token `POST /track*` require, if any.
    token: Option<String>,
    running: AtomicBool,
    stop: CancellationToken,
}

impl App {
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
        let s = self.metrics.snapshot();
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
        m.insert(
            "accepted".into(),
            self.ingest.stats.accepted.load(Ordering::Relaxed).into(),
        );
        serde_json::Value::Object(m).to_string().into()
    }
}

/// Runs the pipeline of `c` on `backend` and serves HTTP on `listener` until `stop` (or
/// until the pipeline stops, which also stops the server). `demo` feeds the source topic
/// with the `[demo]` generator.
pub async fn serve(
    c: PipelineConfig,
    backend: Backend,
    listener: TcpListener,
    demo: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let hub = Arc::new(Hub::new(LIVE_LAG, LIVE_RECENT));
    let mut parts = Parts::open(&c, &backend, &FileIo::default()).await?;
    parts.sink = Box::new(LiveSink::new(parts.sink, hub.clone()));
    let metrics = parts.metrics.clone();
    let ingest = Ingest::start(&c, backend.sink(&c.source.topic).await?, stop.clone());
    let token = std::env::var(&c.serve.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let tasks = tokio_util::task::TaskTracker::new();
    if demo {
        crate::demo::start(&tasks, &c, &backend, stop.clone()).await?;
    }
    let app = Arc::new(App {
        backend: backend.name(),
        ingest,
        hub: hub.clone(),
        metrics: metrics.clone(),
        token,
        running: AtomicBool::new(true),
        stop: stop.clone(),
        config: c,
    });
    tracing::info!(
        pipeline = %app.config.name,
        backend = app.backend,
        token = app.token.is_some(),
        "serving the ingest API and the live view"
    );

    // The tasks the parts started (the enrichment table's follower) stop with the pipeline.
    let background = parts.background.clone();
    let pipeline = parts
        .into_pipeline()
        .with_metrics(metrics)
        .shutdown_on(stop.clone());
    let run = {
        let app = app.clone();
        tokio::spawn(async move {
            let r = pipeline.run().await;
            background.cancel();
            app.running.store(false, Ordering::Relaxed);
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

    let server = axum::serve(listener, routes::router(app.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let summary = run.await??;
    server?;
    let s = summary.counters;
    anyhow::ensure!(s.balanced(), "counters do not balance: {s:?}");
    Ok(())
}
