//! What `weir run --metrics-listen` and `weir serve` expose about a running pipeline: the
//! one Prometheus rendering of its counters (plus per-partition positions and commit,
//! sink and emit latency histograms), and its health (`/healthz`: 200 while running and making
//! progress, 503 while starting, stuck on a broker, or stopped).
//!
//! The source and sinks are wrapped ([`ObservedSource`], [`ObservedSink`]) so nothing of
//! this is in the engine: they time commits and sends and note when the broker last
//! answered.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use weir_engine::metrics::{Histogram, Metrics};
use weir_engine::time::human;
use weir_engine::Record;

mod wrap;
pub use wrap::{ObservedSink, ObservedSource};

/// One source partition's positions.
#[derive(Debug, Default, Clone, Copy)]
struct PartitionStats {
    /// Next offset after the last record received.
    received: u64,
    /// The last committed position (next offset to read after a restart).
    committed: u64,
    /// The highest broker timestamp seen, epoch ms.
    broker_time: Option<i64>,
    /// The highest event time sampled (the newest record of each batch), epoch ms.
    event_time: Option<i64>,
}

/// How the observer reads a record's event time, as the pipeline does.
#[derive(Debug)]
struct EventTime {
    decoder: Option<weir_engine::decode::Decoder>,
    source: weir_engine::decode::TimeSource,
    out_of_orderness_ms: i64,
}

/// One per-partition series' value, if it has one.
type PartitionValue = fn(&PartitionStats) -> Option<String>;

/// The pipeline's state for `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting to the broker.
    Starting = 0,
    /// The pipeline loop runs.
    Running = 1,
    /// The pipeline has stopped.
    Stopped = 2,
}

/// Everything `/metrics` and `/healthz` report, shared by the pipeline's wrapped source
/// and sinks.
#[derive(Debug)]
pub struct Observer {
    /// The engine's counters.
    pub metrics: Arc<Metrics>,
    pipeline: String,
    backend: &'static str,
    phase: AtomicU8,
    stuck_after: Duration,
    started: Instant,
    /// Milliseconds after `started` of the last time the source answered (0: never).
    source_ok: AtomicI64,
    /// Milliseconds after `started` of the first failure since the last success (-1: none).
    source_failing: AtomicI64,
    sink_failing: AtomicI64,
    last_error: Mutex<Option<String>>,
    partitions: Mutex<BTreeMap<u32, PartitionStats>>,
    /// Payload bytes received from the source.
    pub bytes_in: AtomicU64,
    event_time: std::sync::OnceLock<EventTime>,
    /// Time of each successful `Source::commit`.
    pub commit_latency: Histogram,
    /// Time of each `Sink::send` / `Sink::flush` (until the broker acknowledged).
    pub sink_latency: Histogram,
}

impl Observer {
    /// An observer of pipeline `pipeline` on `backend`; `/healthz` turns 503 once the
    /// broker has failed for `stuck_after`.
    pub fn new(pipeline: &str, backend: &'static str, stuck_after: Duration) -> Arc<Self> {
        Arc::new(Observer {
            metrics: Arc::new(Metrics::default()),
            pipeline: pipeline.to_string(),
            backend,
            phase: AtomicU8::new(Phase::Starting as u8),
            stuck_after,
            started: Instant::now(),
            source_ok: AtomicI64::new(0),
            source_failing: AtomicI64::new(-1),
            sink_failing: AtomicI64::new(-1),
            last_error: Mutex::new(None),
            partitions: Mutex::default(),
            bytes_in: AtomicU64::new(0),
            event_time: std::sync::OnceLock::new(),
            commit_latency: Histogram::default(),
            sink_latency: Histogram::default(),
        })
    }

    /// Reads event times as pipeline `c` does, for the per-partition watermarks.
    pub fn read_event_time(&self, c: &weir_engine::config::PipelineConfig) {
        use weir_engine::decode::{Decoder, Schema, TimeSource};
        let decoder = matches!(c.time, TimeSource::Field { .. })
            .then(|| Decoder::new(&Schema::default(), &c.time, c.source.max_payload_bytes));
        let _ = self.event_time.set(EventTime {
            decoder,
            source: c.time.clone(),
            out_of_orderness_ms: c.out_of_orderness.as_millis() as i64,
        });
    }

    fn event_time_of(&self, rec: &Record) -> Option<i64> {
        use weir_engine::decode::TimeSource;
        let et = self.event_time.get()?;
        match &et.source {
            TimeSource::Field { .. } => et.decoder.as_ref()?.decode(&rec.payload).ok()?.time,
            TimeSource::Broker => rec.timestamp,
            TimeSource::Processing => Some(weir_engine::time::now_millis()),
        }
    }

    /// Moves to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Running,
            _ => Phase::Stopped,
        }
    }

    fn now(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    fn ok(&self, failing: &AtomicI64) {
        failing.store(-1, Ordering::Relaxed);
    }

    fn failed(&self, failing: &AtomicI64, e: &weir_engine::EngineError) {
        let _ = failing.compare_exchange(-1, self.now(), Ordering::Relaxed, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// What has been failing longest without a success in between (`the source` or `a
    /// sink`), for how long, and the last error; `None` while both answer.
    pub fn failing_for(&self) -> Option<(&'static str, Duration, String)> {
        let now = self.now();
        let (what, since) = [
            ("the source", self.source_failing.load(Ordering::Relaxed)),
            ("a sink", self.sink_failing.load(Ordering::Relaxed)),
        ]
        .into_iter()
        .filter(|(_, s)| *s >= 0)
        .min_by_key(|(_, s)| *s)?;
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let d = Duration::from_millis((now - since).max(0) as u64);
        Some((what, d, error))
    }

    /// Watches the broker while the pipeline runs: once the source or a sink has failed
    /// for `give_up_after` without a success, logs it, cancels `stop` and returns the
    /// reason (the run then exits 1). Returns `None` when `stop` is cancelled otherwise.
    pub async fn give_up_after(
        &self,
        give_up_after: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<String> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tick.tick() => {}
            }
            if let Some((what, d, error)) = self.failing_for() {
                if d >= give_up_after {
                    let why = format!(
                        "gave up: {what} has failed for {} ([pipeline] give_up_after = {}): {error}",
                        human(d),
                        human(give_up_after)
                    );
                    tracing::error!("{why}");
                    stop.cancel();
                    return Some(why);
                }
            }
        }
    }

    /// `Ok` while healthy; otherwise why not.
    pub fn health(&self) -> Result<(), String> {
        match self.phase() {
            Phase::Starting => return Err("starting: connecting to the broker".into()),
            Phase::Stopped => return Err("pipeline stopped".into()),
            Phase::Running => {}
        }
        match self.failing_for() {
            Some((what, d, error)) if d >= self.stuck_after => Err(format!(
                "stuck: {what} has failed for {}: {error}",
                human(d)
            )),
            _ => Ok(()),
        }
    }

    /// The Prometheus exposition text of the pipeline, labelled `pipeline` and `backend`;
    /// `extra` appends lines with the same labels (`weir serve`'s ingest API).
    pub fn render(&self, extra: impl FnOnce(&mut String, &str)) -> String {
        let s = self.metrics.snapshot();
        let labels = format!(
            r#"pipeline="{}",backend="{}""#,
            escape(&self.pipeline),
            self.backend
        );
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n"
            );
        };
        // Every counter of the balance and the others, from the one list all displays share.
        for t in s.terms() {
            let name = match t.name {
                // Names kept from before the list existed.
                "windowed" => "weir_events_windowed_total".to_string(),
                "late" => "weir_late_events_total".to_string(),
                n => format!("weir_{n}_total"),
            };
            metric(&name, "counter", t.help, t.value.to_string());
        }
        metric(
            "weir_open_entries",
            "gauge",
            "Open (window, key) entries.",
            s.open_entries.to_string(),
        );
        let lag = if s.watermark == i64::MIN {
            "NaN".to_string()
        } else {
            let ms = weir_engine::time::now_millis().saturating_sub(s.watermark);
            format!("{:.3}", ms as f64 / 1000.0)
        };
        metric(
            "weir_watermark_lag_seconds",
            "gauge",
            "Wall clock minus the pipeline watermark (NaN before the first event).",
            lag,
        );
        metric(
            "weir_up",
            "gauge",
            "1 while the pipeline runs and its brokers answer (what /healthz says), else 0.",
            u8::from(self.health().is_ok()).to_string(),
        );
        let parts = self
            .partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ooo = self.event_time.get().map_or(0, |e| e.out_of_orderness_ms);
        let watermark_lag = |p: &PartitionStats| {
            p.event_time.map(|t| {
                let ms = weir_engine::time::now_millis().saturating_sub(t - ooo);
                format!("{:.3}", ms as f64 / 1000.0)
            })
        };
        let per_partition: [(&str, &str, &str, PartitionValue); 4] = [
            (
                "weir_partition_received_offset",
                "gauge",
                "Next offset after the last record received, per source partition.",
                |p| Some(p.received.to_string()),
            ),
            (
                "weir_partition_committed_offset",
                "gauge",
                "The last committed position, per source partition.",
                |p| Some(p.committed.to_string()),
            ),
            (
                "weir_partition_uncommitted_records",
                "gauge",
                "Records received but not yet committed (held by open windows or in flight), per source partition.",
                |p| Some(p.received.saturating_sub(p.committed).to_string()),
            ),
            (
                "weir_partition_broker_time_lag_seconds",
                "gauge",
                "Wall clock minus the newest broker timestamp received, per source partition.",
                |p| {
                    p.broker_time.map(|t| {
                        let ms = weir_engine::time::now_millis().saturating_sub(t);
                        format!("{:.3}", ms as f64 / 1000.0)
                    })
                },
            ),
        ];
        for (name, kind, help, value) in per_partition {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for (p, st) in &parts {
                if let Some(v) = value(st) {
                    let _ = writeln!(out, r#"{name}{{{labels},partition="{p}"}} {v}"#);
                }
            }
        }
        let name = "weir_partition_watermark_lag_seconds";
        let _ = write!(
            out,
            "# HELP {name} Wall clock minus the partition's watermark (its highest event time, sampled from the newest record of each batch, minus the allowed out-of-orderness).\n# TYPE {name} gauge\n"
        );
        for (p, st) in &parts {
            if let Some(v) = watermark_lag(st) {
                let _ = writeln!(out, r#"{name}{{{labels},partition="{p}"}} {v}"#);
            }
        }
        for (name, help, h) in [
            (
                "weir_commit_duration_seconds",
                "Time to commit source positions.",
                self.commit_latency.snapshot(),
            ),
            (
                "weir_sink_ack_duration_seconds",
                "Time until a sink's broker acknowledged a send or flush.",
                self.sink_latency.snapshot(),
            ),
            (
                "weir_emit_latency_seconds",
                "From the operator closing windows (watermark or idleness past end + grace, or end of input) to the sink acknowledging their results; one observation per window.",
                s.emit_latency,
            ),
        ] {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
            for (le, n) in h.cumulative() {
                let _ = writeln!(out, r#"{name}_bucket{{{labels},le="{le}"}} {n}"#);
            }
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {:.6}",
                h.sum_micros as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
        }
        extra(&mut out, &labels);
        out
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// `GET /metrics` and `GET /healthz` of `weir run --metrics-listen`.
pub fn router(observer: Arc<Observer>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(observer)
}

async fn metrics(State(o): State<Arc<Observer>>) -> Response {
    metrics_response(o.render(|_, _| {}))
}

/// The `/metrics` answer for an exposition text.
pub fn metrics_response(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz(State(o): State<Arc<Observer>>) -> Response {
    health_response(&o)
}

/// The `/healthz` answer: 200 `{"status":"ok",…}` or 503 with the reason.
pub fn health_response(o: &Observer) -> Response {
    let (code, status) = match o.health() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    };
    (
        code,
        Json(serde_json::json!({"status": status, "pipeline": o.pipeline, "backend": o.backend})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_phase_and_a_failing_broker() {
        let o = Observer::new("p", "memory", Duration::ZERO);
        assert!(o.health().unwrap_err().starts_with("starting"));
        o.set_phase(Phase::Running);
        assert!(o.health().is_ok());
        o.failed(
            &o.source_failing,
            &weir_engine::EngineError::backend("kafka", "all brokers down", true),
        );
        let why = o.health().unwrap_err();
        assert!(
            why.contains("stuck: the source has failed") && why.contains("all brokers down"),
            "{why}"
        );
        o.ok(&o.source_failing);
        assert!(o.health().is_ok());
        o.set_phase(Phase::Stopped);
        assert_eq!(o.health().unwrap_err(), "pipeline stopped");
    }
}
