//! What the tests of `pipeline.toml` loading share (`tests/config.rs`,
//! `tests/config_values.rs`).

#![allow(dead_code)]

use weir::Backend;
use weir_engine::config::{load_str, Overrides, PipelineConfig};

/// Every problem `weir validate` would list for `text` (as `p.toml`) with `--set sets`,
/// one line each.
pub fn problems(text: &str, sets: &[&str]) -> Vec<String> {
    let overrides = Overrides {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        broker: None,
    };
    let mut loaded = load_str("p.toml", text, &overrides);
    let _ = Backend::from_config(&loaded.config, &mut loaded.diagnostics);
    match loaded.finish() {
        Ok(_) => Vec::new(),
        Err(e) => e
            .to_string()
            .lines()
            .skip(1)
            .map(|l| l.trim().to_string())
            .collect(),
    }
}

/// A minimal valid pipeline.
pub const GOOD: &str = r#"
[source]
topic = "in"
[window]
size = "10s"
[aggregate]
group_by = "user_id"
[sink]
topic = "out"
[dead_letter]
topic = "dlq"
"#;

/// [`GOOD`] with `--set sets`, loaded without problems.
pub fn good_with(sets: &[&str]) -> PipelineConfig {
    let overrides = Overrides {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        broker: None,
    };
    load_str("p.toml", GOOD, &overrides).finish().unwrap()
}

/// That one of the problems `p` contains `want`.
pub fn assert_has(p: &[String], want: &str) {
    assert!(p.iter().any(|l| l.contains(want)), "no {want:?} in {p:#?}");
}
