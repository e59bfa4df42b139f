//! `pipeline.toml` loading: every shipped pipeline is valid; every problem is reported at
//! once with its `file:line:col`; overrides behave.

use std::path::Path;

#[path = "config/support.rs"]
mod support;

use support::{problems, GOOD};
use weir::Backend;
use weir_engine::config::{load_str, Loc, Overrides, Value};

/// The shipped pipelines: `pipelines/*.toml` except `brokers.toml`, which they include.
fn shipped_pipelines() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .filter(|p| !p.ends_with("brokers.toml"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_pipeline_file_is_valid() {
    let pipelines = shipped_pipelines();
    for path in &pipelines {
        if let Err(e) = Backend::load(path, &Overrides::default()) {
            panic!("{e}");
        }
    }
    assert!(pipelines.len() >= 4);
}

/// Every shipped pipeline is valid with `--broker NAME` alone for every backend, and has
/// that backend's `[brokers.NAME]` section (without one, `--broker kinesis` would go to
/// real AWS and `--broker kafka` would miss the test bed's checkpoint topic).
#[test]
fn every_pipeline_has_a_section_for_every_broker() {
    for path in shipped_pipelines() {
        for broker in ["memory", "kafka", "amqp", "kinesis"] {
            let overrides = Overrides {
                sets: vec![],
                broker: Some((broker.into(), format!("--broker {broker}"))),
            };
            let (config, backend) = Backend::load(&path, &overrides)
                .unwrap_or_else(|e| panic!("{} --broker {broker}: {e}", path.display()));
            assert_eq!(backend.name(), broker);
            assert!(
                config.brokers.iter().any(|(name, _, _)| name == broker),
                "{} has no [brokers.{broker}] section",
                path.display()
            );
        }
    }
}

/// Writes `files` (name, text) into a new folder; returns it.
fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// The setting at `path` (`["kafka", "producer", "linger.ms"]`) of a loaded pipeline's
/// `[brokers.*]` sections.
fn broker_setting<'a>(config: &'a weir_engine::config::PipelineConfig, path: &[&str]) -> &'a Value {
    let (name, parts) = path.split_first().unwrap();
    let mut node = &config.brokers.iter().find(|(n, _, _)| n == name).unwrap().2;
    for part in parts {
        let Value::Table(t) = &node.value else {
            panic!("{path:?}: not a table")
        };
        node = t
            .get(part)
            .unwrap_or_else(|| panic!("{path:?}: no `{part}`"));
    }
    &node.value
}

/// `include` takes the `[brokers.*]` tables of another file (relative to the including
/// one); the including file's own keys win key by key, and `--set` wins over both.
#[test]
fn include_merges_broker_sections_under_the_files_own_keys() {
    let shared = "[brokers.kafka]\nbootstrap_servers = \"shared:1\"\npartitions = 8\n\
                  session_timeout = \"9s\"\n[brokers.kafka.producer]\n\"linger.ms\" = \"7\"\n\
                  [brokers.memory]\npartitions = 3\n";
    let text = format!(
        "include = [\"shared.toml\"]\n{GOOD}\n[brokers.kafka]\npartitions = 2\n\
         [brokers.kafka.producer]\n\"acks\" = \"1\"\n"
    );
    let dir = folder(&[("shared.toml", shared), ("p.toml", &text)]);
    let overrides = Overrides {
        sets: vec!["brokers.kafka.session_timeout=4s".into()],
        broker: Some(("kafka".into(), "--broker kafka".into())),
    };
    let (config, _) = Backend::load(&dir.path().join("p.toml"), &overrides).unwrap();
    let s = |p: &[&str]| broker_setting(&config, p).clone();
    let text = |t: &str| Value::Str(t.into());
    assert_eq!(s(&["kafka", "bootstrap_servers"]), text("shared:1"));
    assert_eq!(
        s(&["kafka", "partitions"]),
        Value::Int(2),
        "the file's own key wins"
    );
    assert_eq!(s(&["kafka", "session_timeout"]), text("4s"), "--set wins");
    assert_eq!(s(&["kafka", "producer", "linger.ms"]), text("7"));
    assert_eq!(s(&["kafka", "producer", "acks"]), text("1"));
    assert_eq!(s(&["memory", "partitions"]), Value::Int(3));
}

/// Problems inside an included file are reported at that file's `line:col`: anything but
/// `[brokers.*]` tables (a nested `include` too), syntax errors, and a backend's own checks.
#[test]
fn problems_in_an_included_file_name_that_file() {
    let shared = "include = [\"other.toml\"]\n[window]\nsize = \"1s\"\n\
                  [brokers.kafka]\nbootstrap_server = \"x:1\"\n";
    let text = format!("include = \"shared.toml\"\n{GOOD}");
    let dir = folder(&[("shared.toml", shared), ("p.toml", &text)]);
    let overrides = Overrides {
        sets: vec![],
        broker: Some(("kafka".into(), "--broker kafka".into())),
    };
    let p = dir.path().join("p.toml");
    let err = Backend::load(&p, &overrides).unwrap_err().to_string();
    let shared = dir.path().join("shared.toml").display().to_string();
    for want in [
        format!("  {shared}:1:1: include: an included file cannot include others"),
        format!("  {shared}:2:2: window: an included file may hold only [brokers.*] tables, not `window`"),
        format!("  {shared}:5:1: brokers.kafka.bootstrap_server: unknown key (did you mean `bootstrap_servers`?)"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in\n{err}");
    }
    assert!(
        err.starts_with(&format!("{}: 3 problems", p.display())),
        "{err}"
    );

    let dir = folder(&[
        ("shared.toml", "[brokers.kafka\nx = 1\n"),
        ("p.toml", &text),
    ]);
    let err = Backend::load(&dir.path().join("p.toml"), &overrides)
        .unwrap_err()
        .to_string();
    let shared = dir.path().join("shared.toml").display().to_string();
    assert!(
        err.contains(&format!("  {shared}:1:")) && err.contains("TOML syntax"),
        "{err}"
    );
}

/// An included file that cannot be read is a problem at the `include` line; so is an
/// `include` that is not a file name.
#[test]
fn a_missing_included_file_is_reported_at_the_include_line() {
    let text = format!("{}\ninclude = [\"nope.toml\", 5]\n{GOOD}", "# a comment");
    let dir = folder(&[("p.toml", &text)]);
    let p = dir.path().join("p.toml");
    let err = Backend::load(&p, &Overrides::default())
        .unwrap_err()
        .to_string();
    let nope = dir.path().join("nope.toml").display().to_string();
    assert!(
        err.contains(&format!(
            "  {}:2:12: include: cannot read `{nope}`: ",
            p.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "  {}:2:25: include: expected a file name or an array of file names, found an integer",
            p.display()
        )),
        "{err}"
    );
}

/// A pipeline that names no broker gets the registry's default, the embedded broker: the
/// engine leaves the name empty, `Backend::load` fills it in.
#[test]
fn a_pipeline_without_a_broker_runs_on_the_embedded_one() {
    let dir = folder(&[("p.toml", GOOD)]);
    let (config, backend) =
        Backend::load(&dir.path().join("p.toml"), &Overrides::default()).expect("valid");
    assert_eq!(backend.name(), "memory");
    assert!(backend.in_process());
    assert_eq!(config.broker, "memory");
    let engine_only = load_str("p.toml", GOOD, &Overrides::default());
    assert_eq!(engine_only.config.broker, "", "the engine names no backend");
}

#[test]
fn a_minimal_pipeline_is_valid() {
    assert_eq!(problems(GOOD, &[]), Vec::<String>::new());
}

#[test]
fn every_problem_is_listed_with_its_location() {
    let text = r#"[pipeline]
broker = "memroy"

[source]
topicc = "in"

[window]
size = "ten seconds"
grace = 5

[aggregate]
group_by = []
compute = ["count", "median(x)"]

[sink]
topic = "out"

[dead_letter]
topic = "dlq"

[schema.fields]
user_id = { type = "strng" }
"#;
    let p = problems(text, &[]);
    let expect = [
        "p.toml:2:10: pipeline.broker: unknown broker `memroy` (choose one of memory, kafka, amqp, kinesis)",
        "p.toml:4:1: source.topic: missing required key",
        "p.toml:5:1: source.topicc: unknown key (did you mean `topic`?)",
        "p.toml:8:8: window.size: `ten seconds` is not a duration",
        "p.toml:9:9: window.grace: expected a duration string such as \"2s\", found an integer",
        "p.toml:12:12: aggregate.group_by: name at least one key field",
        "p.toml:13:11: aggregate.compute: unknown aggregate `median(x)`",
        "p.toml:22:20: schema.fields.user_id.type: unknown type `strng`",
    ];
    for e in expect {
        assert!(
            p.iter().any(|l| l.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
}

#[test]
fn toml_syntax_errors_have_locations_too() {
    let p = problems("[source]\ntopic = \"in\nx = 1\n", &[]);
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:2:") && l.contains("TOML syntax")),
        "{p:#?}"
    );
}

#[test]
fn set_overrides_any_setting_with_the_same_reporting() {
    assert_eq!(
        problems(GOOD, &["window.grace=5s", "source.batch_size=10"]),
        Vec::<String>::new()
    );
    let p = problems(GOOD, &["window.grace=soon", "windw.size=1s", "novalue"]);
    assert!(
        p.iter()
            .any(|l| l
                .starts_with("--set window.grace=soon: window.grace: `soon` is not a duration")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("--set windw.size=1s: windw: unknown key")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("--set novalue: expected PATH=VALUE")),
        "{p:#?}"
    );
    let mut loaded = load_str(
        "p.toml",
        GOOD,
        &Overrides {
            sets: vec!["window.grace=5s".into()],
            broker: None,
        },
    );
    assert_eq!(
        loaded.config.window.grace,
        std::time::Duration::from_secs(5)
    );
    let _ = Backend::from_config(&loaded.config, &mut loaded.diagnostics);
    assert!(loaded.diagnostics.is_empty());
}

#[test]
fn broker_override_is_named_in_errors() {
    let overrides = Overrides {
        sets: vec![],
        broker: Some(("rabbit".into(), "WEIR_BROKER=rabbit".into())),
    };
    let mut loaded = load_str("p.toml", GOOD, &overrides);
    // The broker's name is checked against the registry of this build's backends.
    assert!(Backend::from_config(&loaded.config, &mut loaded.diagnostics).is_none());
    let err = loaded.finish().unwrap_err();
    assert_eq!(err.problems[0].loc, Loc::Arg("WEIR_BROKER=rabbit".into()));
    assert!(err.problems[0].message.contains("unknown broker `rabbit`"));
}

#[test]
fn memory_section_keys_are_checked() {
    let text = format!("{GOOD}\n[brokers.memory]\npartitions = 0\nretention = 5\n");
    let p = problems(&text, &[]);
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:14:14: brokers.memory.partitions: 0 is out of range")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:15:1: brokers.memory.retention: unknown key")),
        "{p:#?}"
    );
}

#[test]
fn broker_names_are_checked_against_the_registry() {
    let names = weir::backend::available().join(", ");
    assert!(names.starts_with("memory"), "{names}");
    let text = format!("[pipeline]\nbroker = \"nats\"\n{GOOD}\n[brokers.kafkaa]\nacks = 1\n");
    let p = problems(&text, &[]);
    assert!(
        p.iter().any(|l| l.starts_with(&format!(
            "p.toml:2:10: pipeline.broker: unknown broker `nats` (choose one of {names})"
        ))),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|l| l.starts_with("p.toml:15:10:")
            && l.contains(&format!(
                "brokers.kafkaa: unknown broker section (choose among {names})"
            ))),
        "{p:#?}"
    );
    // A known section is read by its backend even when another backend is chosen.
    let text = format!("{GOOD}\n[brokers.kinesis]\nshards = 0\n");
    let p = problems(&text, &[]);
    if names.contains("kinesis") {
        let want = "brokers.kinesis.shards: 0 is out of range";
        assert!(p.iter().any(|l| l.contains(want)), "{p:#?}");
    } else {
        // A build without the Kinesis backend accepts its section unread (one brokers.toml
        // for every build), and refuses only choosing it.
        assert!(p.is_empty(), "{p:#?}");
        let p = problems(&format!("[pipeline]\nbroker = \"kinesis\"\n{GOOD}"), &[]);
        assert!(
            p.iter().any(|l| l.starts_with("p.toml:2:10:")
                && l.contains("the `kinesis` backend is not in this build")),
            "{p:#?}"
        );
    }
}

#[test]
fn serve_section_defaults_and_problems() {
    let c = load_str("p.toml", GOOD, &Overrides::default())
        .finish()
        .unwrap();
    assert_eq!(c.serve.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(c.serve.max_body_bytes, c.source.max_payload_bytes);
    assert_eq!(c.serve.token_env, "WEIR_SERVE_TOKEN");

    let text = format!(
        "{GOOD}\n[serve]\nlisten = \"localhost\"\nqueue = -1\ntoken = \"secret\"\npublish_timeout = \"1s\"\n"
    );
    let p = problems(&text, &[]);
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:14:10: serve.listen: expected IP:PORT")),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|l| l.starts_with("p.toml:15:9: serve.queue:")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("p.toml:16:1: serve.token: unknown key")),
        "{p:#?}"
    );
    assert_eq!(p.len(), 3, "{p:#?}");

    let c = load_str(
        "p.toml",
        GOOD,
        &Overrides {
            sets: vec!["serve.listen=127.0.0.1:0".into(), "serve.queue=2".into()],
            broker: None,
        },
    )
    .finish()
    .unwrap();
    assert_eq!((c.serve.listen.port(), c.serve.queue), (0, 2));
}

#[test]
fn operating_settings_defaults_and_problems() {
    let c = load_str("p.toml", GOOD, &Overrides::default())
        .finish()
        .unwrap();
    assert_eq!(c.give_up_after, std::time::Duration::from_secs(300));
    assert_eq!(c.observability.listen, None);
    assert_eq!(
        c.observability.stuck_after,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        (
            c.serve.header_timeout.as_secs(),
            c.serve.idle_timeout.as_secs(),
            c.serve.max_connections
        ),
        (10, 60, 512)
    );

    let text = format!(
        "{GOOD}\n[observability]\nlisten = \"everywhere\"\nstuck_after = \"soon\"\n[serve]\nheader_timeout = 5\nmax_connections = -3\nidle_timeout = \"2m\"\n"
    );
    let p = problems(&text, &[]);
    for want in [
        "p.toml:14:10: observability.listen: expected IP:PORT",
        "p.toml:15:15: observability.stuck_after:",
        "p.toml:17:18: serve.header_timeout:",
        "p.toml:18:19: serve.max_connections:",
    ] {
        assert!(p.iter().any(|l| l.starts_with(want)), "{want} in {p:#?}");
    }
    assert_eq!(p.len(), 4, "{p:#?}");

    let p = problems(GOOD, &["pipeline.give_up_after=forever"]);
    assert!(
        p.iter().any(|l| l.starts_with(
            "--set pipeline.give_up_after=forever: pipeline.give_up_after: `forever` is not a duration"
        )),
        "{p:#?}"
    );
    let c = load_str(
        "p.toml",
        GOOD,
        &Overrides {
            sets: vec![
                "pipeline.give_up_after=1m30s".into(),
                "observability.listen=127.0.0.1:9090".into(),
            ],
            broker: None,
        },
    )
    .finish()
    .unwrap();
    assert_eq!(c.give_up_after.as_secs(), 90);
    assert_eq!(c.observability.listen.unwrap().port(), 9090);
}

const WITH_SCHEMA: &str = r#"
[source]
topic = "in"
[schema.fields]
user_id = { type = "string" }
action = { type = "string" }
amount = { type = "number", required = false }
metadata = { type = "object", required = false }
[window]
size = "10s"
[aggregate]
group_by = "usr_id"
compute = ["count", "sum(action)", "mean(amount)", "count_distinct(metadata.page)", "max(nope)"]
[sink]
topic = "out"
[dead_letter]
topic = "dlq"
"#;

/// A `group_by` or aggregate that names a field the schema does not have, or a numeric
/// aggregate over a string field, would dead-letter every event: a configuration error at
/// the key's `file:line:col`, not a run that fails every record.
#[test]
fn group_by_and_aggregates_are_checked_against_the_schema() {
    let p = problems(WITH_SCHEMA, &[]);
    assert_eq!(
        p,
        vec![
            "p.toml:12:12: aggregate.group_by: `usr_id` is not a field of the schema (declared: user_id, action, amount, metadata); every event would be a dead letter",
            "p.toml:13:11: aggregate.compute: sum_action needs a number, but `action` is a string in the schema; every event would be a dead letter",
            "p.toml:13:11: aggregate.compute: `nope` (in max_nope) is not a field of the schema (declared: user_id, action, amount, metadata)",
        ],
        "{p:#?}"
    );
    // Fixed, the same file is valid: fields inside a declared object are allowed.
    let fixed = problems(
        WITH_SCHEMA,
        &[
            "aggregate.group_by=user_id",
            r#"aggregate.compute=["count", "mean(amount)", "count_distinct(metadata.page)"]"#,
        ],
    );
    assert_eq!(fixed, Vec::<String>::new());
    // The enrichment's field is known only at run time.
    let enriched = problems(
        WITH_SCHEMA,
        &[
            "aggregate.group_by=profile.country",
            r#"aggregate.compute=["count"]"#,
            "enrich.table=profiles",
            "enrich.key=user_id",
        ],
    );
    assert_eq!(enriched, Vec::<String>::new());
}

/// `[pipeline] guarantee`: `at_least_once` (the default) everywhere, `exactly_once` only
/// on a backend with transactions; any other value, or `exactly_once` elsewhere, is
/// reported at its `file:line:col`.
#[test]
fn guarantee_is_checked_against_the_backend() {
    let with = |broker: &str, guarantee: &str| {
        format!("[pipeline]\nbroker = \"{broker}\"\nguarantee = \"{guarantee}\"\n{GOOD}")
    };
    assert_eq!(problems(GOOD, &[]), Vec::<String>::new());
    for broker in ["memory", "kafka", "amqp", "kinesis"] {
        assert_eq!(
            problems(&with(broker, "at_least_once"), &[]),
            Vec::<String>::new()
        );
    }
    assert_eq!(
        problems(&with("kafka", "exactly_once"), &[]),
        Vec::<String>::new()
    );
    for broker in ["memory", "amqp", "kinesis"] {
        assert_eq!(
            problems(&with(broker, "exactly_once"), &[]),
            [format!("p.toml:3:13: pipeline.guarantee: the {broker} backend cannot give `exactly_once` (it has no transactions); use `at_least_once`, whose results carry a deterministic id for deduplication")],
            "{broker}"
        );
    }
    assert_eq!(
        problems(&with("kafka", "exactly-once"), &[]),
        ["p.toml:3:13: pipeline.guarantee: unknown guarantee `exactly-once` (choose at_least_once or exactly_once)"]
    );
    assert_eq!(
        problems(GOOD, &["pipeline.guarantee=exactly_once"]),
        ["--set pipeline.guarantee=exactly_once: pipeline.guarantee: the memory backend cannot give `exactly_once` (it has no transactions); use `at_least_once`, whose results carry a deterministic id for deduplication"]
    );
}

/// `exactly_once` with a `[retry]` topic is refused at the guarantee's location (the
/// retry topic's own consumer group would abort the shared transaction under the other).
#[test]
fn exactly_once_with_a_retry_topic_is_refused() {
    let text = format!(
        "[pipeline]\nbroker = \"kafka\"\nguarantee = \"exactly_once\"\n{GOOD}\n[retry]\ntopic = \"r\"\n"
    );
    let p = problems(&text, &[]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("p.toml:3:13: pipeline.guarantee: `exactly_once` cannot be combined with a [retry] topic yet"),
        "{p:?}"
    );
}
