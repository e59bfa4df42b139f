//! The engine in floors: no module of `engine/src` imports one on a higher floor, and no
//! modules import each other in a circle. The table below is the one ARCHITECTURE.md shows
//! (a test compares the two); a module missing from it fails the check, so a new module
//! gets a floor when it is added.
//!
//! The check reads the sources as text: every `crate::…`, `super::…` and child-module path
//! outside comments and `#[cfg(test)]` items (a test may use any module as a fixture),
//! resolved through `pub use` re-exports (`crate::config::ConfigErrors` is
//! `config::reader`'s) to the module that defines the item. A module's submodules belong
//! to it unless the table lists them on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Floor by module, lowest first. A unit is a module with the submodules the table does not
/// list on their own.
const FLOORS: &[(u32, &str, &[&str])] = &[
    (
        0,
        "ground: records, time, the error type, config diagnostics",
        &[
            "record",
            "time",
            "error",
            "base64",
            "config::tree",
            "config::reader",
        ],
    ),
    (
        1,
        "contracts: the traits, counters, backoff, outcomes",
        &[
            "source",
            "sink",
            "processor",
            "metrics",
            "backoff",
            "outcome",
        ],
    ),
    (
        2,
        "model: the config model and its loading, decoding, windows, aggregates",
        &["config", "decode", "generate", "window", "aggregate"],
    ),
    (
        3,
        "encoding: record origins, the retry envelope, results, late records and dead letters, the error policy",
        &["origin", "retry::envelope", "output", "error_policy"],
    ),
    (
        4,
        "operator: the operator, replay, the retry source, enrichment",
        &["operator", "replay", "retry", "retry::source", "enrich"],
    ),
    (
        5,
        "runtime: the runtime, the repartition stage and what opens the edges",
        &["runtime", "repartition", "jsonl", "broker", "checkpoint_store"],
    ),
];

/// A module path inside the crate (`""` is the crate root), and the file it was read from.
struct Module {
    file: String,
    /// Text without comments and `#[cfg(test)]` items, by line number.
    lines: Vec<(usize, String)>,
    /// Child modules declared with `mod name;`.
    children: BTreeSet<String>,
}

/// One reference from a module to a path.
struct Reference {
    from: String,
    line: usize,
    path: Vec<String>,
}

fn module_path(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The lines of `text` that are code: comments dropped, `#[cfg(test)]` items skipped.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let t = line.trim();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            // Skip the item that follows: up to its `;` or its closing brace.
            let mut depth = 0i32;
            let mut opened = false;
            for (_, l) in lines.by_ref() {
                let l = strip_comment(l);
                for c in l.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push((i + 1, strip_comment(line).to_string()));
    }
    out
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        // Not inside a string literal (an even number of quotes before it).
        Some(i) if line[..i].matches('"').count().is_multiple_of(2) => &line[..i],
        _ => line,
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths of a `use` tree starting at `s` (after `prefix::`): `a::b`, `{a, b::{c, d}}`,
/// `a as b` (the alias is dropped), `*`.
fn use_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut prefix: Vec<String> = Vec::new();
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            let mut all = Vec::new();
            loop {
                let (paths, used) = use_tree(&s[i..]);
                i += used;
                all.extend(paths.into_iter().map(|p| {
                    let mut full = prefix.clone();
                    full.extend(p);
                    full
                }));
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => {
                        i += 1;
                        while i < b.len() && (b[i] as char).is_whitespace() {
                            i += 1;
                        }
                        if b.get(i) == Some(&b'}') {
                            i += 1;
                            return (all, i);
                        }
                    }
                    Some(b'}') => {
                        i += 1;
                        return (all, i);
                    }
                    _ => return (all, i),
                }
            }
        }
        let start = i;
        while i < b.len() && (is_ident(b[i] as char) || b[i] == b'*') {
            i += 1;
        }
        if start == i {
            return (vec![prefix], i);
        }
        prefix.push(s[start..i].to_string());
        if s[i..].starts_with("::") {
            i += 2;
            continue;
        }
        // `as alias`
        let rest = &s[i..];
        let trimmed = rest.trim_start();
        if let Some(after) = trimmed.strip_prefix("as ") {
            let skip = rest.len() - trimmed.len() + 3;
            let alias_len = after
                .trim_start()
                .find(|c: char| !is_ident(c))
                .unwrap_or(after.trim_start().len());
            i += skip + (after.len() - after.trim_start().len()) + alias_len;
        }
        return (vec![prefix], i);
    }
}

/// Makes `path` (relative to module `here`) absolute, if it points into this crate.
fn absolute(here: &str, module: &Module, path: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = if here.is_empty() {
        Vec::new()
    } else {
        here.split("::").map(str::to_string).collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        Some(first) if module.children.contains(first) => {}
        _ => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

struct Crate {
    modules: BTreeMap<String, Module>,
    /// (module, name) -> absolute path, from `pub use`.
    exports: BTreeMap<(String, String), Vec<String>>,
    references: Vec<Reference>,
    problems: Vec<String>,
}

impl Crate {
    fn read(files: &[(String, String)]) -> Crate {
        let mut modules = BTreeMap::new();
        for (rel, text) in files {
            let lines = code_lines(text);
            let children = lines
                .iter()
                .filter_map(|(_, l)| {
                    let t = l.trim();
                    let t = t
                        .strip_prefix("pub(crate) ")
                        .or_else(|| t.strip_prefix("pub(super) "))
                        .or_else(|| t.strip_prefix("pub "))
                        .unwrap_or(t);
                    let name = t.strip_prefix("mod ")?.strip_suffix(';')?;
                    Some(name.trim().to_string())
                })
                .collect();
            modules.insert(
                module_path(Path::new(rel)),
                Module {
                    file: rel.clone(),
                    lines,
                    children,
                },
            );
        }
        let mut c = Crate {
            modules,
            exports: BTreeMap::new(),
            references: Vec::new(),
            problems: Vec::new(),
        };
        c.collect();
        c
    }

    fn collect(&mut self) {
        for (here, m) in &self.modules {
            // The code as one text (a `use` tree may span lines), and where each line starts.
            let mut clean = String::new();
            let mut starts = Vec::new();
            for (n, l) in &m.lines {
                starts.push((clean.len(), *n));
                clean.push_str(l);
                clean.push('\n');
            }
            let line_of = |pos: usize| starts[starts.partition_point(|(s, _)| *s <= pos) - 1].1;
            let mut found = |at: usize, public: bool, refs: &mut Vec<Reference>| {
                let (paths, _) = use_tree(&clean[at..]);
                for p in paths {
                    let Some(abs) = absolute(here, m, &p) else {
                        continue;
                    };
                    if public {
                        if let Some(name) = p.last() {
                            self.exports
                                .insert((here.clone(), name.clone()), abs.clone());
                        }
                    }
                    refs.push(Reference {
                        from: here.clone(),
                        line: line_of(at),
                        path: abs,
                    });
                }
            };
            // `use` statements (rustfmt starts each on a line of its own); public ones are
            // also re-exports.
            for (k, (off, _)) in starts.iter().enumerate() {
                let line = &m.lines[k].1;
                let t = line.trim_start();
                let (public, rest) = match ["pub(crate) ", "pub(super) ", "pub "]
                    .iter()
                    .find_map(|v| t.strip_prefix(v))
                {
                    Some(rest) => (true, rest),
                    None => (false, t),
                };
                if let Some(tree) = rest.strip_prefix("use ") {
                    found(off + line.len() - tree.len(), public, &mut self.references);
                }
            }
            // Paths in code: `crate::a::b`, `super::a`.
            for prefix in ["crate::", "super::"] {
                for (at, _) in clean.match_indices(prefix) {
                    if at > 0 && is_ident(clean[..at].chars().last().unwrap_or(' ')) {
                        continue;
                    }
                    found(at, false, &mut self.references);
                }
            }
        }
    }

    /// The module that defines what `path` names: modules are followed as far as they go,
    /// then re-exports.
    fn resolve(&self, path: &[String], depth: u32) -> String {
        let mut cur = String::new();
        for (k, seg) in path.iter().enumerate() {
            let next = if cur.is_empty() {
                seg.clone()
            } else {
                format!("{cur}::{seg}")
            };
            if self.modules.contains_key(&next) {
                cur = next;
                continue;
            }
            if depth < 8 {
                if let Some(target) = self.exports.get(&(cur.clone(), seg.clone())) {
                    let mut t = target.clone();
                    t.extend(path[k + 1..].iter().cloned());
                    return self.resolve(&t, depth + 1);
                }
            }
            break;
        }
        cur
    }

    /// The table's unit of `module`: the longest listed prefix.
    fn unit(module: &str) -> Option<(&'static str, u32)> {
        FLOORS
            .iter()
            .flat_map(|(floor, _, mods)| mods.iter().map(move |m| (*m, *floor)))
            .filter(|(m, _)| module == *m || module.starts_with(&format!("{m}::")))
            .max_by_key(|(m, _)| m.len())
    }

    /// Every import from a lower floor to a higher one, every module without a floor, and
    /// every circle of units.
    fn check(mut self) -> Vec<String> {
        let problems = self.problems_found();
        problems
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn problems_found(&mut self) -> Vec<String> {
        let mut edges: BTreeMap<&'static str, BTreeSet<&'static str>> = BTreeMap::new();
        for (path, m) in &self.modules {
            if !path.is_empty() && Self::unit(path).is_none() {
                self.problems.push(format!(
                    "{}: module `{path}` has no floor in the table of engine/tests/floors.rs",
                    m.file
                ));
            }
        }
        for r in &self.references {
            if r.from.is_empty() {
                continue; // the crate root only declares modules and re-exports
            }
            let target = self.resolve(&r.path, 0);
            let (Some((from, f_floor)), Some((to, t_floor))) =
                (Self::unit(&r.from), Self::unit(&target))
            else {
                continue;
            };
            if from == to {
                continue;
            }
            edges.entry(from).or_default().insert(to);
            if t_floor > f_floor {
                self.problems.push(format!(
                    "{}:{}: `{}` (floor {f_floor}) imports `crate::{}` of `{to}` (floor {t_floor}), a higher floor",
                    self.modules[&r.from].file,
                    r.line,
                    r.from,
                    r.path.join("::"),
                ));
            }
        }
        // Circles among units (possible only within one floor, but looked for everywhere).
        fn visit(
            u: &'static str,
            edges: &BTreeMap<&'static str, BTreeSet<&'static str>>,
            stack: &mut Vec<&'static str>,
            done: &mut BTreeSet<&'static str>,
            out: &mut Vec<String>,
        ) {
            if let Some(k) = stack.iter().position(|s| *s == u) {
                let mut circle = stack[k..].to_vec();
                circle.push(u);
                out.push(format!(
                    "modules import each other in a circle: {}",
                    circle.join(" -> ")
                ));
                return;
            }
            if !done.insert(u) {
                return;
            }
            stack.push(u);
            for v in edges.get(u).into_iter().flatten() {
                visit(v, edges, stack, done, out);
            }
            stack.pop();
        }
        let mut done = BTreeSet::new();
        for u in edges.keys() {
            visit(u, &edges, &mut Vec::new(), &mut done, &mut self.problems);
        }
        std::mem::take(&mut self.problems)
    }
}

fn engine_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).expect("engine/src is readable") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).expect("under src").to_string_lossy();
                out.push((
                    rel.into_owned(),
                    std::fs::read_to_string(&p).expect("readable"),
                ));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

#[test]
fn no_engine_module_imports_one_on_a_higher_floor() {
    let files = engine_sources();
    assert!(
        files.len() > 20,
        "read the engine's sources: {}",
        files.len()
    );
    let krate = Crate::read(&files);
    assert!(
        krate.references.len() > 100,
        "found the engine's imports: {}",
        krate.references.len()
    );
    let problems = krate.check();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_floor_table_of_architecture_md_is_this_one() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md is readable");
    // Rows such as "| 2 | model | `config`, `decode` |".
    let mut documented: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let Ok(floor) = cells[1].parse::<u32>() else {
            continue;
        };
        let mods = cells[3]
            .split(',')
            .map(|m| m.trim().trim_matches('`').to_string())
            .filter(|m| !m.is_empty());
        documented.entry(floor).or_default().extend(mods);
    }
    let table: BTreeMap<u32, BTreeSet<String>> = FLOORS
        .iter()
        .map(|(f, _, mods)| (*f, mods.iter().map(|m| m.to_string()).collect()))
        .collect();
    assert_eq!(
        documented, table,
        "ARCHITECTURE.md's floor table differs from this test's"
    );
}

// The check itself, on made-up sources: it must see what it is meant to catch.

fn check(files: &[(&str, &str)]) -> Vec<String> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    Crate::read(&files).check()
}

const LIB: &str = "mod record;\nmod runtime;\nmod config;\nmod operator;\n";

#[test]
fn an_upward_import_is_caught_in_a_use_a_path_and_a_group() {
    for record in [
        "use crate::runtime::Pipeline;\n",
        "fn f() { let _ = crate::runtime::TICK; }\n",
        "use crate::{\n    time::now,\n    operator::Job,\n};\n",
        "pub use crate::config::PipelineConfig;\n",
    ] {
        let problems = check(&[
            ("lib.rs", LIB),
            ("record.rs", record),
            ("runtime.rs", "pub struct Pipeline;\n"),
            ("config/mod.rs", "pub struct PipelineConfig;\n"),
            ("operator/mod.rs", "pub use job::Job;\nmod job;\n"),
            ("operator/job.rs", "pub struct Job;\n"),
        ]);
        assert_eq!(problems.len(), 1, "{record}: {problems:?}");
        assert!(problems[0].contains("record.rs:"), "{problems:?}");
        assert!(problems[0].contains("a higher floor"), "{problems:?}");
    }
}

#[test]
fn re_exports_are_followed_to_the_module_that_defines_the_item() {
    let files = [
        ("lib.rs", "mod error;\nmod config;\n"),
        // `config` is on floor 2, but `ConfigErrors` is `config::reader`'s (floor 0).
        ("error.rs", "use crate::config::ConfigErrors;\n"),
        (
            "config/mod.rs",
            "mod reader;\nmod load;\npub use reader::{ConfigErrors, Diagnostics};\n",
        ),
        ("config/reader.rs", "pub struct ConfigErrors;\n"),
        ("config/load.rs", "use super::reader::Diagnostics;\n"),
    ];
    assert_eq!(check(&files), Vec::<String>::new());
    let mut upward = files;
    upward[1].1 = "use crate::config::load_str;\n";
    let problems = check(&upward);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn comments_and_test_code_are_not_imports_but_a_module_without_a_floor_is_a_problem() {
    let problems = check(&[
        ("lib.rs", "mod record;\nmod mystery;\n"),
        (
            "record.rs",
            "//! See [`crate::runtime::Pipeline`].\nfn f() {} // crate::runtime\n\
             #[cfg(test)]\nmod tests {\n    use crate::runtime::Pipeline;\n    fn g() { if true { } }\n}\n",
        ),
        ("mystery.rs", ""),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("`mystery` has no floor"),
        "{problems:?}"
    );
}

#[test]
fn a_circle_within_one_floor_is_caught() {
    let problems = check(&[
        ("lib.rs", "mod source;\nmod sink;\n"),
        ("source.rs", "use crate::sink::Sink;\n"),
        ("sink.rs", "use crate::source::Source;\n"),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("circle"), "{problems:?}");
}
