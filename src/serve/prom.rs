//! `GET /metrics`: the pipeline's and the ingest API's counters in Prometheus' text format,
//! labelled with the pipeline and its backend.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::App;

/// The exposition text.
pub fn render(app: &App) -> String {
    let s = app.metrics.snapshot();
    let labels = format!(
        r#"pipeline="{}",backend="{}""#,
        escape(&app.config.name),
        app.backend
    );
    let mut out = String::with_capacity(2048);
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
    let st = &app.ingest.stats;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    metric(
        "weir_http_events_accepted_total",
        "counter",
        "Events POST /track* published and the broker acknowledged.",
        g(&st.accepted),
    );
    let refused = [
        ("invalid", &st.invalid),
        ("unavailable", &st.unavailable),
        ("unauthorized", &st.unauthorized),
    ];
    let _ = write!(
        out,
        "# HELP weir_http_requests_refused_total POST /track* requests refused, by reason.\n\
         # TYPE weir_http_requests_refused_total counter\n"
    );
    for (reason, a) in refused {
        let _ = writeln!(
            out,
            r#"weir_http_requests_refused_total{{{labels},reason="{reason}"}} {}"#,
            g(a)
        );
    }
    let _ = write!(
        out,
        "# HELP weir_http_queue_events Events waiting for the broker's acknowledgement.\n\
         # TYPE weir_http_queue_events gauge\nweir_http_queue_events{{{labels}}} {}\n",
        app.ingest.queued()
    );
    let _ = write!(
        out,
        "# HELP weir_live_clients Connected /ws clients.\n# TYPE weir_live_clients gauge\n\
         weir_live_clients{{{labels}}} {}\n",
        app.hub.clients()
    );
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}
