//! `weir test`: golden-file tests of a pipeline, without a broker.
//!
//! A case is a TOML file: input events as JSON lines in arrival order (a line may be
//! `{"partition": N, "order": K, "event": {…}}` to arrive on source partition N, as the
//! K-th event; lines without `order` keep their place), optional `set`
//! overrides and enrichment `table` rows, and the expected `results`, `dead_letters` and
//! `late` records (JSON lines; order does not matter; a section left out is not checked).
//! The pipeline runs on the memory backend, its input read from the case; when the input
//! ends every open window is emitted, as with `weir run --input`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use weir_engine::config::{LatePolicy, Overrides};
use weir_engine::{Checkpoint, OutRecord, Position, Received, Record, Source};

use crate::assemble::{FileIo, Parts};
use crate::Backend;

/// The late-events topic a case that checks `late` gets when its pipeline sends late
/// events to the dead letters.
const LATE_TOPIC: &str = "weir-test-late";

/// One case file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    /// What the case shows (printed with its result).
    description: Option<String>,
    /// Settings overridden for this case, as `--set PATH=VALUE`.
    #[serde(default)]
    set: Vec<String>,
    /// Rows of the `[enrich]` table (JSON lines), published before the pipeline starts.
    table: Option<toml::Spanned<String>>,
    /// Input events, JSON lines in arrival order.
    input: toml::Spanned<String>,
    /// Expected window results.
    results: Option<toml::Spanned<String>>,
    /// Expected dead letters; each line is compared on the fields it gives.
    dead_letters: Option<toml::Spanned<String>>,
    /// Expected late events (the original events).
    late: Option<toml::Spanned<String>>,
}

/// A case that could be read.
pub struct Case {
    name: String,
    path: PathBuf,
    text: String,
    file: CaseFile,
}

/// What a case's run differed in; empty when it passed.
#[derive(Debug, Default)]
pub struct Diff {
    /// Per output (`results`, `dead letters`, `late`): expected lines not produced and
    /// produced lines not expected.
    pub outputs: Vec<(&'static str, Vec<Value>, Vec<Value>)>,
}

impl Diff {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.outputs.is_empty()
    }

    /// The diff as indented lines: `- expected`, `+ produced`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (what, missing, unexpected) in &self.outputs {
            out.push_str(&format!(
                "    {what}: {} expected but not produced, {} produced but not expected\n",
                missing.len(),
                unexpected.len()
            ));
            for v in missing {
                out.push_str(&format!("      - {v}\n"));
            }
            for v in unexpected {
                out.push_str(&format!("      + {v}\n"));
            }
        }
        out
    }
}

/// The cases shipped beside `pipeline`: `<its folder>/tests/<its name>/*.toml`, sorted.
pub fn shipped_cases(pipeline: &Path) -> Vec<PathBuf> {
    let stem = pipeline.file_stem().unwrap_or_default();
    let dir = pipeline
        .parent()
        .unwrap_or(Path::new("."))
        .join("tests")
        .join(stem);
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    cases.sort();
    cases
}

/// Reads a case file; a problem names its `file:line:col`.
pub fn read_case(path: &Path) -> anyhow::Result<Case> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: CaseFile = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(&text, s.start));
        anyhow::anyhow!(
            "{}:{line}:{col}: {}",
            path.display(),
            e.message().trim().replace('\n', " ")
        )
    })?;
    let name = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    Ok(Case {
        name,
        path: path.to_path_buf(),
        text,
        file,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

impl Case {
    /// The case's name (its file name without `.toml`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its description, if any.
    pub fn description(&self) -> Option<&str> {
        self.file.description.as_deref()
    }

    /// The non-empty lines of a multi-line value with their `file:line:col` places.
    fn lines<'a>(&'a self, v: &'a toml::Spanned<String>) -> Vec<(String, &'a str)> {
        let (line0, _) = line_col(&self.text, v.span().start);
        // A multi-line string starting with a newline begins on the next line.
        let raw = &self.text[v.span().start..v.span().end.min(self.text.len())];
        let skip = usize::from(raw.starts_with("'''\n") || raw.starts_with("\"\"\"\n"));
        v.get_ref()
            .split('\n')
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    format!("{}:{}:1", self.path.display(), line0 + skip + i),
                    l.trim(),
                )
            })
            .collect()
    }

    fn expected(&self, v: &Option<toml::Spanned<String>>) -> anyhow::Result<Option<Vec<Value>>> {
        let Some(v) = v else { return Ok(None) };
        self.lines(v)
            .into_iter()
            .map(|(at, l)| {
                serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{at}: not JSON: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }

    /// Runs the case against `pipeline` (with `sets` from the command line): its diff,
    /// or an error when the case or the pipeline cannot be used (bad configuration).
    pub async fn run(&self, pipeline: &Path, sets: &[String]) -> anyhow::Result<Diff> {
        let expected_results = self.expected(&self.file.results)?;
        let expected_dead = self.expected(&self.file.dead_letters)?;
        let expected_late = self.expected(&self.file.late)?;
        let load = |extra: &[String]| {
            let overrides = Overrides {
                sets: sets
                    .iter()
                    .chain(&self.file.set)
                    .chain(extra)
                    .cloned()
                    .collect(),
                broker: Some(("memory".into(), "weir test".into())),
            };
            Backend::load(pipeline, &overrides).map_err(|e| anyhow::anyhow!("{e}"))
        };
        let (mut c, mut backend) = load(&[])?;
        if expected_late.is_some() && c.late == LatePolicy::DeadLetter {
            // Checking late events: they get a topic of their own, as `--late` gives them.
            (c, backend) = load(&[format!("late.topic={LATE_TOPIC}")])?;
        }
        if c.sink_store.is_some() {
            // A `[sink] type = "postgres"` pipeline: its cases compare the results as rows
            // would be written, so they go to a memory topic here (no database needed).
            c.sink_store = None;
            c.sink.topic = "weir-test-results".into();
        }
        let late_topic = match &c.late {
            LatePolicy::Output(t) => Some(t.clone()),
            _ => None,
        };

        if let (Some(rows), Some(e)) = (&self.file.table, &c.enrich) {
            let rows: Vec<OutRecord> = self
                .lines(rows)
                .into_iter()
                .map(|(_, l)| OutRecord {
                    payload: Bytes::copy_from_slice(l.as_bytes()),
                    ..Default::default()
                })
                .collect();
            backend.sink(&e.table).await?.send(&rows).await?;
        }

        let mut events: Vec<(u64, u32, Bytes)> = self
            .lines(&self.file.input)
            .into_iter()
            .enumerate()
            .map(|(i, (_, l))| {
                let (partition, order, payload) = arrival(l);
                (order.unwrap_or(i as u64), partition, payload)
            })
            .collect();
        events.sort_by_key(|(order, _, _)| *order);
        let input = CaseInput::new(events.into_iter().map(|(_, p, e)| (p, e)).collect());
        let parts = Parts::open_with(
            &c,
            &backend,
            &FileIo::default(),
            Some(Box::new(input)),
            Default::default(),
        )
        .await?;
        let background = parts.background.clone();
        let summary = parts.into_pipeline().run().await;
        background.cancel();
        summary?;

        let mut diff = Diff::default();
        let results = drain(&backend, &c.sink.topic).await?;
        compare(&mut diff, "results", expected_results, results, false);
        let dead = drain(&backend, &c.dead_letter.topic).await?;
        compare(&mut diff, "dead letters", expected_dead, dead, true);
        if let Some(t) = late_topic {
            let late = drain(&backend, &t).await?;
            compare(&mut diff, "late", expected_late, late, false);
        } else if expected_late.as_ref().is_some_and(|l| !l.is_empty()) {
            diff.outputs
                .push(("late", expected_late.unwrap_or_default(), Vec::new()));
        }
        Ok(diff)
    }
}

/// An input line: `{"partition": N, "order": K, "event": {…}}` arrives on partition N as
/// the K-th event (both optional); anything else (including lines that are not JSON) is
/// the payload itself, on partition 0, in its place.
fn arrival(line: &str) -> (u32, Option<u64>, Bytes) {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) {
        let envelope = o.contains_key("event")
            && o.keys()
                .all(|k| k == "event" || k == "partition" || k == "order");
        if envelope {
            let order = o.get("order").and_then(Value::as_u64);
            let partition = o
                .get("partition")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .min(u64::from(u16::MAX)) as u32;
            let event = match &o["event"] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            return (partition, order, Bytes::from(event));
        }
    }
    (0, None, Bytes::copy_from_slice(line.as_bytes()))
}

/// Every record of `topic` on the memory backend, as JSON (text that is not JSON as a
/// string).
async fn drain(backend: &Backend, topic: &str) -> anyhow::Result<Vec<Value>> {
    let mut src = backend.source(topic, None).await?;
    let mut out = Vec::new();
    loop {
        match src.recv(4096, Duration::from_millis(20)).await? {
            Received::Batch(b) if b.is_empty() => return Ok(out),
            Received::Batch(b) => out.extend(b.iter().map(|r| {
                serde_json::from_slice(&r.payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.payload).into()))
            })),
            Received::End => return Ok(out),
            _ => {}
        }
    }
}

/// Matches `produced` against `expected` as multisets; with `subset`, an expected object
/// matches a produced one that has the same values for the keys it gives.
fn compare(
    diff: &mut Diff,
    what: &'static str,
    expected: Option<Vec<Value>>,
    mut produced: Vec<Value>,
    subset: bool,
) {
    let Some(expected) = expected else { return };
    let mut missing = Vec::new();
    for e in expected {
        match produced.iter().position(|p| matches(&e, p, subset)) {
            Some(i) => {
                produced.swap_remove(i);
            }
            None => missing.push(e),
        }
    }
    if !missing.is_empty() || !produced.is_empty() {
        diff.outputs.push((what, missing, produced));
    }
}

fn matches(expected: &Value, produced: &Value, subset: bool) -> bool {
    match (expected, produced) {
        (Value::Object(e), Value::Object(p)) if subset => e
            .iter()
            .all(|(k, v)| p.get(k).is_some_and(|pv| matches(v, pv, true))),
        _ => expected == produced,
    }
}

/// The case's input as a source: the partitions it uses, then every event in arrival
/// order (offsets counted per partition), then the end.
struct CaseInput {
    events: Vec<(u32, Bytes)>,
    next: usize,
    offsets: Vec<u64>,
    assigned: bool,
}

impl CaseInput {
    fn new(events: Vec<(u32, Bytes)>) -> Self {
        let parts = events
            .iter()
            .map(|(p, _)| *p as usize + 1)
            .max()
            .unwrap_or(1);
        CaseInput {
            events,
            next: 0,
            offsets: vec![0; parts],
            assigned: false,
        }
    }
}

#[async_trait]
impl Source for CaseInput {
    fn topic(&self) -> &str {
        "case input"
    }

    async fn recv(&mut self, max: usize, _wait: Duration) -> weir_engine::Result<Received> {
        if !self.assigned {
            self.assigned = true;
            return Ok(Received::Assigned(
                (0..self.offsets.len() as u32).map(|p| (p, None)).collect(),
            ));
        }
        if self.next == self.events.len() {
            return Ok(Received::End);
        }
        let end = (self.next + max.max(1)).min(self.events.len());
        let batch = self.events[self.next..end]
            .iter()
            .map(|(p, payload)| {
                let offset = &mut self.offsets[*p as usize];
                *offset += 1;
                Record {
                    payload: payload.clone(),
                    position: Position {
                        partition: *p,
                        offset: *offset - 1,
                    },
                    ..Default::default()
                }
            })
            .collect();
        self.next = end;
        Ok(Received::Batch(batch))
    }

    async fn commit(&mut self, _: &[(Position, Checkpoint)]) -> weir_engine::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_pick_a_partition_and_everything_else_is_the_payload() {
        assert_eq!(
            arrival(r#"{"partition": 2, "event": {"a": 1}}"#),
            (2, None, Bytes::from(r#"{"a":1}"#))
        );
        assert_eq!(
            arrival(r#"{"order": 7, "event": {"a": 1}}"#),
            (0, Some(7), Bytes::from(r#"{"a":1}"#))
        );
        assert_eq!(
            arrival(r#"{"a": 1}"#),
            (0, None, Bytes::from(r#"{"a": 1}"#))
        );
        assert_eq!(arrival("not json"), (0, None, Bytes::from("not json")));
        // An event that merely has an `event` field is an event.
        let ev = r#"{"event": "x", "user_id": "u"}"#;
        assert_eq!(arrival(ev), (0, None, Bytes::from(ev)));
    }

    #[test]
    fn dead_letters_match_on_the_fields_given_and_results_exactly() {
        let mut d = Diff::default();
        let produced = vec![serde_json::json!({"error": "bad", "payload": "x", "source": {}})];
        compare(
            &mut d,
            "dead letters",
            Some(vec![serde_json::json!({"error": "bad"})]),
            produced.clone(),
            true,
        );
        assert!(d.passed());
        compare(
            &mut d,
            "results",
            Some(vec![serde_json::json!({"error": "bad"})]),
            produced,
            false,
        );
        assert_eq!(d.outputs.len(), 1);
        assert!(
            d.render().contains("- {\"error\":\"bad\"}"),
            "{}",
            d.render()
        );
    }
}
