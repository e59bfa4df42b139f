//! Values at the edges of `pipeline.toml` and `--set`: durations written as a bare `0`,
//! numbers too large for an integer, problems reported at their own line, window
//! definitions that would put an event in too many windows.

#[path = "config/support.rs"]
mod support;

use std::time::Duration;

use support::{assert_has, good_with, problems, GOOD};

/// The README says a bare `0` is a duration, on the command line as in the file.
#[test]
fn a_bare_zero_is_a_duration_in_the_file_and_on_the_command_line() {
    assert_eq!(problems(GOOD, &["window.grace=0"]), Vec::<String>::new());
    let text = GOOD.replace("size = \"10s\"", "size = \"10s\"\ngrace = 0");
    assert_eq!(problems(&text, &[]), Vec::<String>::new());
    let c = good_with(&["window.grace=5s", "window.grace=0"]);
    assert_eq!(c.window.grace, Duration::ZERO);
    // Any other bare number still needs its unit, and the message says so.
    let p = problems(GOOD, &["window.grace=5"]);
    assert!(
        p.iter().any(|l| l.starts_with(
            "--set window.grace=5: window.grace: expected a duration string such as \"2s\", found an integer (add a unit: \"5s\""
        )),
        "{p:#?}"
    );
}

/// A number TOML cannot hold is called what it is, not "a string".
#[test]
fn a_number_too_large_for_an_integer_is_named_so() {
    let p = problems(GOOD, &["brokers.memory.partitions=99999999999999999999"]);
    assert_eq!(
        p,
        vec![
            "--set brokers.memory.partitions=99999999999999999999: brokers.memory.partitions: \
             99999999999999999999 is a number too large for an integer \
             (integers go from -9223372036854775808 to 9223372036854775807); \
             expected an integer"
                .to_string()
        ]
    );
    // The same in the file, at its line.
    let text = format!("{GOOD}\n[brokers.memory]\npartitions = -99_999_999_999_999_999_999\n");
    let p = problems(&text, &[]);
    assert!(
        p.iter().any(|l| l.starts_with(
            "p.toml:14:14: brokers.memory.partitions: -99999999999999999999 is a number too large"
        )),
        "{p:#?}"
    );
    // Other values that are not TOML stay strings.
    assert_eq!(problems(GOOD, &["source.topic=in-2"]), Vec::<String>::new());
    let p = problems(GOOD, &["brokers.memory.partitions=12ab"]);
    assert_has(&p, "expected an integer, found a string");
}

/// Each Kinesis problem is reported at its own line, not at the section's header.
#[test]
fn kinesis_start_position_problems_point_at_their_own_line() {
    if !weir::backend::available().contains(&"kinesis") {
        return;
    }
    // Lines 13.. of the text: the header, then the keys.
    let unknown =
        format!("{GOOD}\n[brokers.kinesis]\nregion = \"\"\nstart_position = \"earliest\"\n");
    let p = problems(&unknown, &[]);
    assert!(
        p.iter().any(|l| l
            .starts_with("p.toml:15:18: brokers.kinesis.start_position: `earliest` is not one of")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:14:10: brokers.kinesis.region: must not be empty")),
        "{p:#?}"
    );
    let missing =
        format!("{GOOD}\n[brokers.kinesis]\nshards = 2\nstart_position = \"at_timestamp\"\n");
    let p = problems(&missing, &[]);
    assert_eq!(
        p,
        vec!["p.toml:15:18: brokers.kinesis.start_timestamp: required when start_position = \"at_timestamp\"".to_string()],
    );
}

/// The typo: `advance = "1ms"` for `"1m"` would put every event in 86.4 million
/// windows. Refused at the line of `advance`, with the bound.
#[test]
fn a_hopping_window_with_too_many_windows_per_event_is_refused_at_its_line() {
    let text = GOOD.replace(
        "size = \"10s\"",
        "type = \"hopping\"\nsize = \"1d\"\nadvance = \"1ms\"",
    );
    let p = problems(&text, &[]);
    assert_eq!(
        p,
        vec![
            "p.toml:7:11: window.advance: puts every event in 86400000 windows (size 1d / advance 1ms); \
             at most 10000 are allowed per event: a larger advance (\"1m\" rather than \"1ms\"?) or a smaller size"
                .to_string()
        ]
    );
    // At the bound it is accepted (a day every 10 s: 8,640 windows per event).
    assert_eq!(
        problems(&text, &["window.advance=10s"]),
        Vec::<String>::new()
    );
    let c = good_with(&[]);
    assert_eq!(
        c.window.max_open_entries,
        weir_engine::window::DEFAULT_MAX_OPEN_ENTRIES
    );
    let p = problems(GOOD, &["window.max_open_entries=0"]);
    assert_has(&p, "window.max_open_entries: 0 is out of range");
}

/// `[serve] body_timeout` and `min_body_rate`: defaults, overrides and their checks.
#[test]
fn serve_body_limits_have_defaults_and_are_checked() {
    let c = good_with(&[]);
    assert_eq!(
        (c.serve.body_timeout, c.serve.min_body_rate),
        (Duration::from_secs(10), 1024)
    );
    let c = good_with(&["serve.body_timeout=2s", "serve.min_body_rate=10"]);
    assert_eq!(
        (c.serve.body_timeout, c.serve.min_body_rate),
        (Duration::from_secs(2), 10)
    );
    let p = problems(GOOD, &["serve.min_body_rate=0"]);
    assert_has(&p, "serve.min_body_rate: 0 is out of range");
}
