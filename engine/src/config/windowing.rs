//! The `[event_time]` and `[window]` sections: where time comes from and which windows
//! it fills.

use std::time::Duration;

use crate::decode::TimeSource;
use crate::time::TimeFormat;
use crate::window::{WindowKind, DEFAULT_MAX_OPEN_ENTRIES, MAX_WINDOWS_PER_EVENT};

use super::model::{EmitMode, WindowConfig, DEFAULT_MAX_FUTURE};
use super::reader::{Diagnostics, TableReader};
use super::tree::{Loc, Node, Value};

/// `[event_time]`: the time source, the out-of-orderness and the `max_future` limit.
pub(super) fn event_time(
    r: &mut TableReader<'_>,
    d: &mut Diagnostics,
) -> (TimeSource, Duration, Option<Duration>) {
    match r.table(d, "event_time") {
        Some(mut t) => {
            let field_node = t.node("field");
            let field = t.str(d, "field");
            let from = t.str(d, "from");
            let format_node = t.node("format");
            let format = t.str_or(d, "format", "auto");
            let ooo = t.duration_or(d, "max_out_of_orderness", Duration::ZERO);
            let max_future = match t.node("max_future") {
                Some(Node {
                    value: Value::Str(s),
                    ..
                }) if s == "off" => None,
                _ => Some(t.duration_or(d, "max_future", DEFAULT_MAX_FUTURE)),
            };
            let fmt = TimeFormat::from_name(&format).unwrap_or_else(|| {
                if let Some(n) = format_node {
                    d.push(
                        &n.loc,
                        "event_time.format",
                        format!("unknown format `{format}` (choose auto, rfc3339, epoch_millis or epoch_seconds)"),
                    );
                }
                TimeFormat::Auto
            });
            let time = match (from, field) {
                (Some("field") | None, Some(f)) => TimeSource::Field {
                    path: f.to_string(),
                    format: fmt,
                },
                (Some("broker"), None) => TimeSource::Broker,
                (Some("processing"), None) => TimeSource::Processing,
                (Some(other), _) if !matches!(other, "field" | "broker" | "processing") => {
                    let loc = t
                        .node("from")
                        .map(|n| n.loc.clone())
                        .unwrap_or(Loc::Nowhere);
                    d.push(
                        &loc,
                        "event_time.from",
                        format!(
                            "unknown time source `{other}` (choose field, broker or processing)"
                        ),
                    );
                    TimeSource::Processing
                }
                (Some(_), Some(_)) => {
                    let loc = field_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere);
                    d.push(
                        &loc,
                        "event_time.field",
                        "`field` only applies with from = \"field\"",
                    );
                    TimeSource::Processing
                }
                (_, None) => {
                    d.push(t.loc(), "event_time", "set `field` (the event's timestamp field) or from = \"broker\" / \"processing\"");
                    TimeSource::Processing
                }
            };
            t.finish(d);
            (time, ooo, max_future)
        }
        None => (
            TimeSource::Processing,
            Duration::ZERO,
            Some(DEFAULT_MAX_FUTURE),
        ),
    }
}

/// `[window]`: the kind and size, grace, idleness and the emit mode.
pub(super) fn window(r: &mut TableReader<'_>, d: &mut Diagnostics) -> WindowConfig {
    match r.table(d, "window") {
        Some(mut t) => {
            let kind_node = t.node("type");
            let kind = t.str_or(d, "type", "tumbling");
            let ms = |d: &mut Diagnostics,
                      t: &mut TableReader<'_>,
                      key: &'static str,
                      default: Duration| {
                let node = t.node(key);
                let v = t.duration_or(d, key, default);
                if v.as_millis() == 0 {
                    d.push(
                        &node
                            .map(|n| n.loc.clone())
                            .unwrap_or_else(|| t.loc().clone()),
                        &format!("window.{key}"),
                        "must be at least 1ms",
                    );
                }
                (v.as_millis() as i64).max(1)
            };
            let kind = match kind.as_str() {
                "tumbling" => WindowKind::Tumbling {
                    size: ms(d, &mut t, "size", Duration::from_secs(10)),
                },
                "hopping" | "sliding" => {
                    let size = ms(d, &mut t, "size", Duration::from_secs(10));
                    let advance_node = t.node("advance");
                    let advance = ms(d, &mut t, "advance", Duration::from_secs(5));
                    let advance_loc = advance_node
                        .map(|n| n.loc.clone())
                        .unwrap_or_else(|| t.loc().clone());
                    let per_event = WindowKind::Hopping { size, advance }.windows_per_event();
                    if per_event > MAX_WINDOWS_PER_EVENT {
                        d.push(
                            &advance_loc,
                            "window.advance",
                            format!(
                                "puts every event in {per_event} windows (size {} / advance {}); at most {MAX_WINDOWS_PER_EVENT} \
                                 are allowed per event: a larger advance (\"1m\" rather than \"1ms\"?) or a smaller size",
                                crate::time::human(Duration::from_millis(size as u64)),
                                crate::time::human(Duration::from_millis(advance as u64)),
                            ),
                        );
                    }
                    if advance > size {
                        d.push(
                            &advance_loc,
                            "window.advance",
                            "must not be larger than `size` (events would fall between windows)",
                        );
                    } else if advance_node.is_none() {
                        d.push(
                            t.loc(),
                            "window.advance",
                            "hopping windows need `advance`, e.g. advance = \"5s\"",
                        );
                    }
                    WindowKind::Hopping { size, advance }
                }
                "session" => {
                    if t.node("gap").is_none() {
                        d.push(
                            t.loc(),
                            "window.gap",
                            "session windows need `gap`, e.g. gap = \"30s\"",
                        );
                    }
                    WindowKind::Session {
                        gap: ms(d, &mut t, "gap", Duration::from_secs(30)),
                    }
                }
                other => {
                    d.push(
                        &kind_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        "window.type",
                        format!(
                            "unknown window type `{other}` (choose tumbling, hopping or session)"
                        ),
                    );
                    WindowKind::Tumbling { size: 10_000 }
                }
            };
            // Keys of the other kinds are errors, not silently ignored.
            let allowed: &[&str] = match kind {
                WindowKind::Tumbling { .. } => &["size"],
                WindowKind::Hopping { .. } => &["size", "advance"],
                WindowKind::Session { .. } => &["gap"],
            };
            for key in ["size", "advance", "gap"] {
                if !allowed.contains(&key) {
                    if let Some(n) = t.node(key) {
                        d.push(
                            &n.loc,
                            &format!("window.{key}"),
                            format!(
                                "does not apply to {} windows",
                                match kind {
                                    WindowKind::Tumbling { .. } => "tumbling",
                                    WindowKind::Hopping { .. } => "hopping",
                                    WindowKind::Session { .. } => "session",
                                }
                            ),
                        );
                    }
                }
            }
            let grace = t.duration_or(d, "grace", Duration::ZERO);
            let idle_timeout = t.duration_or(d, "idle_timeout", Duration::from_secs(5));
            if idle_timeout.is_zero() {
                d.push(t.loc(), "window.idle_timeout", "must be more than 0");
            }
            let max_open_entries = t.uint_or(
                d,
                "max_open_entries",
                DEFAULT_MAX_OPEN_ENTRIES as u64,
                1..=1_000_000_000,
            ) as usize;
            let emit_node = t.node("emit");
            let emit = match t.str_or(d, "emit", "final").as_str() {
                "final" => EmitMode::Final,
                "update" => EmitMode::Update,
                other => {
                    d.push(
                        &emit_node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                        "window.emit",
                        format!("unknown emit mode `{other}` (choose final or update)"),
                    );
                    EmitMode::Final
                }
            };
            t.finish(d);
            WindowConfig {
                kind,
                grace,
                idle_timeout: idle_timeout.max(Duration::from_millis(1)),
                emit,
                max_open_entries,
            }
        }
        None => {
            d.push(
                &Loc::Nowhere,
                "window",
                "missing required table [window] (with `size`)",
            );
            WindowConfig {
                kind: WindowKind::Tumbling { size: 10_000 },
                grace: Duration::ZERO,
                idle_timeout: Duration::from_secs(5),
                emit: EmitMode::Final,
                max_open_entries: DEFAULT_MAX_OPEN_ENTRIES,
            }
        }
    }
}
