//! `GET /metrics` of `weir serve`: the pipeline's exposition (the same text as
//! `weir run --metrics-listen`, see [`crate::observe`]) plus the ingest API's counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::App;

/// The exposition text.
pub fn render(app: &App) -> String {
    app.observer.render(|out, labels| {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let zero = AtomicU64::new(0);
        let st = app.ingest.get().map(|i| &i.stats);
        let pick = |f: fn(&super::ingest::IngestStats) -> &AtomicU64| st.map_or(&zero, f);
        let _ = write!(
            out,
            "# HELP weir_http_events_accepted_total Events POST /track* published and the broker acknowledged.\n\
             # TYPE weir_http_events_accepted_total counter\n\
             weir_http_events_accepted_total{{{labels}}} {}\n",
            g(pick(|s| &s.accepted))
        );
        let _ = write!(
            out,
            "# HELP weir_http_requests_refused_total POST /track* requests refused, by reason.\n\
             # TYPE weir_http_requests_refused_total counter\n"
        );
        let refused = [
            ("invalid", pick(|s| &s.invalid)),
            ("unavailable", pick(|s| &s.unavailable)),
            ("unauthorized", &app.unauthorized),
        ];
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
            app.ingest.get().map_or(0, |i| i.queued())
        );
        let _ = write!(
            out,
            "# HELP weir_live_clients Connected /ws clients.\n# TYPE weir_live_clients gauge\n\
             weir_live_clients{{{labels}}} {}\n",
            app.hub.clients()
        );
    })
}
