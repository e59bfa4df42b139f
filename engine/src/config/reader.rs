//! Reading a located tree into typed settings while collecting every problem.

use std::fmt;
use std::time::Duration;

use super::tree::{Loc, Node, Table, Value};

/// One configuration problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Where it is.
    pub loc: Loc,
    /// The dotted key it concerns, e.g. `window.grace`.
    pub key: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

/// Every problem found in a pipeline configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors {
    /// The file the configuration came from.
    pub file: String,
    /// The problems, in the order found.
    pub problems: Vec<Problem>,
}

impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} problem{} in the pipeline configuration:",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            let key = if p.key.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.key)
            };
            match &p.loc {
                Loc::File { file: None, .. } => {
                    writeln!(f, "  {}:{}: {key}{}", self.file, p.loc, p.message)?
                }
                // A file the pipeline includes: the location names it.
                Loc::File { .. } => writeln!(f, "  {}: {key}{}", p.loc, p.message)?,
                Loc::Arg(a) => writeln!(f, "  {a}: {key}{}", p.message)?,
                Loc::Nowhere => writeln!(f, "  {}: {key}{}", self.file, p.message)?,
            }
        }
        Ok(())
    }
}

/// Collects problems while settings are read.
#[derive(Debug, Default)]
pub struct Diagnostics {
    problems: Vec<Problem>,
}

impl Diagnostics {
    /// Records a problem.
    pub fn push(&mut self, loc: &Loc, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            loc: loc.clone(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Whether nothing is wrong so far.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems so far.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `Ok` if nothing is wrong, else every problem, sorted by location.
    pub fn into_result(self, file: &str) -> Result<(), ConfigErrors> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let mut problems = self.problems;
        problems.sort_by_key(|p| match &p.loc {
            Loc::File { line, col, file } => (0, file.clone(), *line, *col),
            Loc::Arg(_) => (1, None, 0, 0),
            Loc::Nowhere => (2, None, 0, 0),
        });
        Err(ConfigErrors {
            file: file.to_string(),
            problems,
        })
    }
}

/// Reads one table, remembering which keys were asked for so that the rest can be
/// reported as unknown.
#[derive(Debug)]
pub struct TableReader<'t> {
    path: String,
    table: &'t Table,
    loc: Loc,
    known: Vec<&'static str>,
}

impl<'t> TableReader<'t> {
    /// Starts reading `table`, found at `loc` under the dotted `path` (empty for the root).
    pub fn new(path: &str, table: &'t Table, loc: Loc) -> Self {
        TableReader {
            path: path.to_string(),
            table,
            loc,
            known: Vec::new(),
        }
    }

    /// The dotted path of `key` in this table.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Where this table is.
    pub fn loc(&self) -> &Loc {
        &self.loc
    }

    /// The raw node under `key`, marking the key as known.
    pub fn node(&mut self, key: &'static str) -> Option<&'t Node> {
        self.known.push(key);
        self.table.get(key)
    }

    /// Every entry of the table, for tables whose keys are data (e.g. schema fields).
    /// Marks all keys as known.
    pub fn entries(&mut self) -> &'t [(String, Loc, Node)] {
        &self.table.entries
    }

    fn wrong(&self, d: &mut Diagnostics, key: &str, n: &Node, want: &str) {
        let msg = match &n.value {
            Value::BigInt(text) => format!(
                "{text} is a number too large for an integer (integers go from {} to {}); expected {want}",
                i64::MIN,
                i64::MAX
            ),
            v => format!("expected {want}, found {}", v.type_name()),
        };
        d.push(&n.loc, &self.key_path(key), msg);
    }

    /// A string setting.
    pub fn str(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<&'t str> {
        let n = self.node(key)?;
        match &n.value {
            Value::Str(s) => Some(s),
            _ => {
                self.wrong(d, key, n, "a string");
                None
            }
        }
    }

    /// A required string setting.
    pub fn req_str(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<&'t str> {
        let present = self.table.get(key).is_some();
        let v = self.str(d, key);
        if !present {
            d.push(&self.loc, &self.key_path(key), "missing required key");
        }
        v
    }

    /// A string setting with a default.
    pub fn str_or(&mut self, d: &mut Diagnostics, key: &'static str, default: &str) -> String {
        self.str(d, key).unwrap_or(default).to_string()
    }

    /// A boolean setting with a default.
    pub fn bool_or(&mut self, d: &mut Diagnostics, key: &'static str, default: bool) -> bool {
        match self.node(key) {
            None => default,
            Some(Node {
                value: Value::Bool(b),
                ..
            }) => *b,
            Some(n) => {
                self.wrong(d, key, n, "true or false");
                default
            }
        }
    }

    /// A non-negative integer setting within `range`, with a default.
    pub fn uint_or(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        match self.node(key) {
            None => default,
            Some(
                n @ Node {
                    value: Value::Int(i),
                    ..
                },
            ) => {
                if *i >= 0 && range.contains(&(*i as u64)) {
                    *i as u64
                } else {
                    d.push(
                        &n.loc,
                        &self.key_path(key),
                        format!(
                            "{i} is out of range (allowed {}..={})",
                            range.start(),
                            range.end()
                        ),
                    );
                    default
                }
            }
            Some(n) => {
                self.wrong(d, key, n, "an integer");
                default
            }
        }
    }

    /// A duration setting (`"2s"`, `"500ms"`, or a bare `0`) with a default.
    pub fn duration_or(
        &mut self,
        d: &mut Diagnostics,
        key: &'static str,
        default: Duration,
    ) -> Duration {
        match self.node(key) {
            None => default,
            Some(
                n @ Node {
                    value: Value::Str(s),
                    ..
                },
            ) => crate::time::parse_duration(s).unwrap_or_else(|e| {
                d.push(&n.loc, &self.key_path(key), e);
                default
            }),
            // Zero needs no unit, in the file as on the command line (`--set x=0`).
            Some(Node {
                value: Value::Int(0),
                ..
            }) => Duration::ZERO,
            Some(
                n @ Node {
                    value: Value::Int(i),
                    ..
                },
            ) => {
                d.push(
                    &n.loc,
                    &self.key_path(key),
                    format!(
                        "expected a duration string such as \"2s\", found an integer (add a unit: \"{i}s\", \"{i}ms\"; only 0 goes without one)"
                    ),
                );
                default
            }
            Some(n) => {
                self.wrong(d, key, n, "a duration string such as \"2s\"");
                default
            }
        }
    }

    /// A string or an array of strings.
    pub fn str_list(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<Vec<String>> {
        let n = self.node(key)?;
        match &n.value {
            Value::Str(s) => Some(vec![s.clone()]),
            Value::Array(items) => {
                let mut out = Vec::new();
                for it in items {
                    match &it.value {
                        Value::Str(s) => out.push(s.clone()),
                        other => d.push(
                            &it.loc,
                            &self.key_path(key),
                            format!("expected strings, found {}", other.type_name()),
                        ),
                    }
                }
                Some(out)
            }
            _ => {
                self.wrong(d, key, n, "a string or an array of strings");
                None
            }
        }
    }

    /// A sub-table; a reader for it, or `None` if absent (or not a table, reported).
    pub fn table(&mut self, d: &mut Diagnostics, key: &'static str) -> Option<TableReader<'t>> {
        let n = self.node(key)?;
        match &n.value {
            Value::Table(t) => Some(TableReader::new(&self.key_path(key), t, n.loc.clone())),
            _ => {
                self.wrong(d, key, n, "a table");
                None
            }
        }
    }

    /// Reports every key that no accessor asked for.
    pub fn finish(self, d: &mut Diagnostics) {
        for (k, loc, _) in &self.table.entries {
            if !self.known.iter().any(|known| known == k) {
                let mut msg = "unknown key".to_string();
                if let Some(s) = suggest(k, &self.known) {
                    msg.push_str(&format!(" (did you mean `{s}`?)"));
                } else if !self.known.is_empty() {
                    let mut known = self.known.clone();
                    known.sort_unstable();
                    known.dedup();
                    msg.push_str(&format!(" (known keys: {})", known.join(", ")));
                }
                d.push(loc, &self.key_path(k), msg);
            }
        }
    }
}

fn suggest<'a>(k: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|c| (edit_distance(k, c), *c))
        .filter(|(dist, c)| *dist <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
