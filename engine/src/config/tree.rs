//! An owned TOML tree that remembers where each value came from, so every problem can be
//! reported at its `file:line:col` (or at the `--set` argument that put it there).

use std::fmt;
use std::sync::Arc;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loc {
    /// A position in a configuration file (1-based line and column).
    File {
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        col: usize,
        /// The file, when it is not the pipeline file itself (a file it `include`s).
        file: Option<Arc<str>>,
    },
    /// A command-line override such as `--set window.grace=5s` or `--broker kafka`.
    Arg(String),
    /// The value is missing; the problem is about the enclosing table at this location.
    Nowhere,
}

/// A located value.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it came from.
    pub loc: Loc,
}

/// A TOML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A date-time, kept as its text.
    Datetime(String),
    /// A whole number too large for an integer (64 bits), kept as its text so that the
    /// message can say so rather than call it a string.
    BigInt(String),
    /// An array.
    Array(Vec<Node>),
    /// A table.
    Table(Table),
}

impl Value {
    /// The TOML type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::BigInt(_) => "a number too large for an integer",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// A table: keys in file order, each with the location of the key itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// `(key, where the key is, value)`.
    pub entries: Vec<(String, Loc, Node)>,
}

impl Table {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, n)| n)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.entries
            .iter_mut()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, n)| n)
    }
}

/// Maps byte offsets of a text to line and column.
#[derive(Debug)]
pub struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
    file: Option<Arc<str>>,
}

impl<'a> LineIndex<'a> {
    /// Indexes `text` of the pipeline file.
    pub fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex {
            text,
            starts,
            file: None,
        }
    }

    /// Indexes `text` of another file (one the pipeline file includes), named `file` in
    /// every location.
    pub fn of_file(text: &'a str, file: &str) -> Self {
        LineIndex {
            file: Some(file.into()),
            ..LineIndex::new(text)
        }
    }

    /// The location of byte `offset`.
    pub fn loc(&self, offset: usize) -> Loc {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let end = offset.min(self.text.len()).max(start);
        let col = self
            .text
            .get(start..end)
            .map(|s| s.chars().count())
            .unwrap_or(0)
            + 1;
        Loc::File {
            line,
            col,
            file: self.file.clone(),
        }
    }
}

/// Converts a parsed document into an owned [`Table`].
pub fn from_de(table: &DeTable<'_>, lines: &LineIndex<'_>) -> Table {
    Table {
        entries: table
            .iter()
            .map(|(k, v)| {
                (
                    k.get_ref().to_string(),
                    lines.loc(k.span().start),
                    node_from_de(v, lines),
                )
            })
            .collect(),
    }
}

fn node_from_de(v: &Spanned<DeValue<'_>>, lines: &LineIndex<'_>) -> Node {
    let value = match v.get_ref() {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => {
            let text: String = i.as_str().chars().filter(|c| *c != '_').collect();
            match i64::from_str_radix(text.trim_start_matches('+'), i.radix()) {
                Ok(n) => Value::Int(n),
                Err(_) => Value::BigInt(text),
            }
        }
        DeValue::Float(f) => Value::Float(
            f.as_str()
                .chars()
                .filter(|c| *c != '_')
                .collect::<String>()
                .parse()
                .unwrap_or(f64::NAN),
        ),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(a) => Value::Array(a.iter().map(|e| node_from_de(e, lines)).collect()),
        DeValue::Table(t) => Value::Table(from_de(t, lines)),
    };
    Node {
        value,
        loc: lines.loc(v.span().start),
    }
}

/// Parses the value of a `--set PATH=VALUE` override: TOML when it parses as TOML
/// (`8`, `true`, `"x"`, `["a", "b"]`), a plain string otherwise (`5s`, `kafka`).
pub fn parse_override_value(raw: &str, arg: &str) -> Node {
    let loc = Loc::Arg(arg.to_string());
    let lines = LineIndex::new(raw);
    let value = match DeValue::parse(raw) {
        Ok(v) => {
            let mut n = node_from_de(&v, &lines);
            relocate(&mut n, &loc);
            n.value
        }
        Err(_) => Value::Str(raw.to_string()),
    };
    Node { value, loc }
}

fn relocate(n: &mut Node, loc: &Loc) {
    n.loc = loc.clone();
    match &mut n.value {
        Value::Array(a) => a.iter_mut().for_each(|e| relocate(e, loc)),
        Value::Table(t) => t.entries.iter_mut().for_each(|(_, l, e)| {
            *l = loc.clone();
            relocate(e, loc)
        }),
        _ => {}
    }
}

/// Sets `path` (dotted) in `root` to `node`, creating tables on the way.
pub fn set_path(root: &mut Table, path: &str, node: Node) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{path}` is not a valid key path"));
    }
    let mut table = root;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            match table.get_mut(part) {
                Some(existing) => *existing = node,
                None => table
                    .entries
                    .push((part.to_string(), node.loc.clone(), node)),
            }
            return Ok(());
        }
        if table.get(part).is_none() {
            table.entries.push((
                part.to_string(),
                node.loc.clone(),
                Node {
                    value: Value::Table(Table::default()),
                    loc: node.loc.clone(),
                },
            ));
        }
        match table.get_mut(part) {
            Some(Node {
                value: Value::Table(t),
                ..
            }) => table = t,
            Some(other) => {
                return Err(format!(
                    "`{}` is {}, not a table",
                    parts[..=i].join("."),
                    other.value.type_name()
                ))
            }
            None => unreachable!("inserted above"),
        }
    }
    Ok(())
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::File {
                line,
                col,
                file: None,
            } => write!(f, "{line}:{col}"),
            Loc::File {
                line,
                col,
                file: Some(file),
            } => write!(f, "{file}:{line}:{col}"),
            Loc::Arg(a) => write!(f, "{a}"),
            Loc::Nowhere => Ok(()),
        }
    }
}
