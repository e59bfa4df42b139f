//! `include = ["brokers.toml"]`: a pipeline file takes its `[brokers.*]` sections from a
//! shared file, so every pipeline reaches the same brokers with `--broker NAME` alone.
//!
//! - The path is relative to the including file (an absolute path is used as it is).
//! - An included file may hold `[brokers.*]` tables only; anything else (another
//!   `include` too: includes do not nest) is a problem at its `file:line:col`.
//! - The including file's own keys win, key by key (`[brokers.kafka] partitions = 8` in
//!   the pipeline keeps every other key of the included `[brokers.kafka]`); of several
//!   included files the first listed wins; `--set` wins over both (it is applied after).
//! - A file that cannot be read is a problem at the `include` line.

use std::path::Path;

use super::reader::Diagnostics;
use super::tree::{from_de, LineIndex, Loc, Node, Table, Value};

/// The top-level key naming the files to include.
pub const KEY: &str = "include";

/// Takes `include` out of `root` and merges the `[brokers.*]` tables of the files it
/// names into it, under what `root` already has. `file` is the including file's name as
/// given (its folder is where relative paths start).
pub fn resolve(root: &mut Table, file: &str, d: &mut Diagnostics) {
    let Some(i) = root.entries.iter().position(|(k, _, _)| k == KEY) else {
        return;
    };
    let (_, _, node) = root.entries.remove(i);
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    for (name, loc) in names(&node, d) {
        let path = base.join(&name);
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                d.push(&loc, KEY, format!("cannot read `{shown}`: {e}"));
                continue;
            }
        };
        let included = parse(&text, &shown, d);
        merge_under(root, included);
    }
}

/// The file names of an `include` value: a string or an array of strings.
fn names(node: &Node, d: &mut Diagnostics) -> Vec<(String, Loc)> {
    let wrong = |d: &mut Diagnostics, n: &Node| {
        d.push(
            &n.loc,
            KEY,
            format!(
                "expected a file name or an array of file names, found {}",
                n.value.type_name()
            ),
        )
    };
    match &node.value {
        Value::Str(s) => vec![(s.clone(), node.loc.clone())],
        Value::Array(items) => items
            .iter()
            .filter_map(|n| match &n.value {
                Value::Str(s) => Some((s.clone(), n.loc.clone())),
                _ => {
                    wrong(d, n);
                    None
                }
            })
            .collect(),
        _ => {
            wrong(d, node);
            Vec::new()
        }
    }
}

/// Parses an included file, keeping only its `brokers` table and reporting the rest.
fn parse(text: &str, shown: &str, d: &mut Diagnostics) -> Table {
    let lines = LineIndex::of_file(text, shown);
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    for e in errors {
        let loc = e.span().map(|s| lines.loc(s.start)).unwrap_or(Loc::Nowhere);
        let msg = e.message().trim().replace('\n', " ");
        d.push(&loc, "", format!("TOML syntax: {msg}"));
    }
    let mut table = from_de(doc.get_ref(), &lines);
    table.entries.retain(|(k, loc, node)| {
        let why = match (k.as_str(), &node.value) {
            ("brokers", Value::Table(_)) => return true,
            ("brokers", v) => format!("expected a table, found {}", v.type_name()),
            (KEY, _) => "an included file cannot include others".to_string(),
            _ => format!("an included file may hold only [brokers.*] tables, not `{k}`"),
        };
        d.push(loc, k, why);
        false
    });
    table
}

/// Adds to `into` every key of `from` it does not have, table by table.
fn merge_under(into: &mut Table, from: Table) {
    for (key, loc, node) in from.entries {
        match into.entries.iter_mut().find(|(k, _, _)| *k == key) {
            None => into.entries.push((key, loc, node)),
            Some((_, _, mine)) => {
                if let (Value::Table(mine), Value::Table(theirs)) = (&mut mine.value, node.value) {
                    merge_under(mine, theirs);
                }
                // Otherwise the including file's own value wins.
            }
        }
    }
}
