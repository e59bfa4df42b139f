//! The `[retry]`, `[enrich]` and `[errors]` sections: the stages besides windowing and
//! what happens to the records they fail on.

use std::time::Duration;

use super::model::{EnrichConfig, ErrorAction, RetryConfig, STAGE_ENRICH, STAGE_VALIDATE};
use super::reader::{Diagnostics, TableReader};
use super::tree::Value;

/// `[retry]`: the retry topic and its backoff.
pub(super) fn retry(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Option<RetryConfig> {
    r.table(d, "retry").map(|mut t| {
        let topic = t.req_str(d, "topic").unwrap_or_default().to_string();
        let initial = t.duration_or(d, "initial", Duration::from_secs(1));
        let max = t.duration_or(d, "max", Duration::from_secs(60));
        let multiplier = match t.node("multiplier") {
            None => 2.0,
            Some(n) => match n.value {
                Value::Float(f) if f >= 1.0 && f.is_finite() => f,
                Value::Int(i) if i >= 1 => i as f64,
                Value::Float(_) | Value::Int(_) => {
                    d.push(&n.loc, "retry.multiplier", "must be 1 or more");
                    2.0
                }
                _ => {
                    d.push(
                        &n.loc,
                        "retry.multiplier",
                        format!("expected a number, found {}", n.value.type_name()),
                    );
                    2.0
                }
            },
        };
        let max_attempts = t.uint_or(d, "max_attempts", 5, 1..=1_000_000) as u32;
        if initial.is_zero() {
            d.push(t.loc(), "retry.initial", "must be more than 0");
        }
        if max < initial {
            d.push(t.loc(), "retry.max", "must be at least `initial`");
        }
        t.finish(d);
        RetryConfig {
            topic,
            initial,
            multiplier,
            max,
            max_attempts,
        }
    })
}

/// `[enrich]`: the table joined into each event.
pub(super) fn enrich(r: &mut TableReader<'_>, d: &mut Diagnostics) -> Option<EnrichConfig> {
    r.table(d, "enrich").map(|mut t| {
        let table = t.req_str(d, "table").unwrap_or_default().to_string();
        let key = t.req_str(d, "key").unwrap_or_default().to_string();
        let table_key = t.str_or(d, "table_key", &key);
        let into_loc = t
            .node("into")
            .map_or_else(|| t.loc().clone(), |n| n.loc.clone());
        let into = t.str_or(d, "into", "profile");
        if into.is_empty() || into.contains('.') {
            d.push(
                &into_loc,
                "enrich.into",
                "must be a top-level field name (no dots)",
            );
        }
        t.finish(d);
        EnrichConfig {
            table,
            key,
            table_key,
            into,
        }
    })
}

/// `[errors]`: the strategy of each stage that is not the default `dead_letter`.
pub(super) fn errors(
    r: &mut TableReader<'_>,
    d: &mut Diagnostics,
    retry: Option<&RetryConfig>,
    enrich: Option<&EnrichConfig>,
) -> Vec<(String, ErrorAction)> {
    let mut errors = Vec::new();
    if let Some(mut t) = r.table(d, "errors") {
        for stage in [STAGE_VALIDATE, STAGE_ENRICH] {
            let Some(n) = t.node(stage) else { continue };
            let path = format!("errors.{stage}");
            let Value::Str(s) = &n.value else {
                d.push(
                    &n.loc,
                    &path,
                    format!("expected a string, found {}", n.value.type_name()),
                );
                continue;
            };
            match ErrorAction::parse(s) {
                None => d.push(
                    &n.loc,
                    &path,
                    format!("unknown strategy `{s}` (choose dead_letter, retry, skip or fail)"),
                ),
                Some(ErrorAction::Retry) if retry.is_none() => d.push(
                    &n.loc,
                    &path,
                    "`retry` needs a [retry] section with the retry topic",
                ),
                Some(_) if stage == STAGE_ENRICH && enrich.is_none() => {
                    d.push(&n.loc, &path, "there is no [enrich] stage")
                }
                Some(a) => errors.push((stage.to_string(), a)),
            }
        }
        t.finish(d);
    }
    // Enrichment misses are what the retry topic is for: with both, they retry unless
    // `[errors] enrich` says otherwise.
    if enrich.is_some() && retry.is_some() && !errors.iter().any(|(s, _)| s == STAGE_ENRICH) {
        errors.push((STAGE_ENRICH.to_string(), ErrorAction::Retry));
    }
    errors
}
