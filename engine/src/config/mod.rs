//! The pipeline configuration (`pipeline.toml`): its model, and loading it with every
//! problem reported at its `file:line:col`.

mod include;
mod load;
mod model;
mod reader;
mod schema;
mod serve;
mod stages;
mod tree;
mod windowing;

use load::read_pipeline;
pub use model::{
    AggFn, AggregateConfig, DemoConfig, EmitMode, EnrichConfig, ErrorAction, Guarantee, LatePolicy,
    ObservabilityConfig, PipelineConfig, RetryConfig, ServeConfig, SinkStore, SourceConfig,
    TopicConfig, WindowConfig,
};
pub(crate) use model::{DEFAULT_MAX_FUTURE, STAGE_ENRICH, STAGE_VALIDATE};
pub use reader::{ConfigErrors, Diagnostics, Problem, TableReader};
pub use tree::{Loc, Node, Table, Value};

/// Options that come from the command line rather than the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--set PATH=VALUE` arguments, in order.
    pub sets: Vec<String>,
    /// `--broker NAME` or `WEIR_BROKER`, and how to name it in errors.
    pub broker: Option<(String, String)>,
}

/// A parsed configuration plus the problems found so far; backends add their own before
/// [`finish`](Loaded::finish) reports everything at once.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration (meaningful only if no problems are reported).
    pub config: PipelineConfig,
    /// Problems found so far.
    pub diagnostics: Diagnostics,
    /// The file name used in messages.
    pub file: String,
}

impl Loaded {
    /// The configuration, or every problem found.
    pub fn finish(self) -> Result<PipelineConfig, ConfigErrors> {
        self.diagnostics.into_result(&self.file)?;
        Ok(self.config)
    }
}

/// Reads a pipeline file's text. `file` names it in messages; the files its `include`
/// names are read relative to `file`'s folder.
pub fn load_str(file: &str, text: &str, overrides: &Overrides) -> Loaded {
    let mut d = Diagnostics::default();
    let lines = tree::LineIndex::new(text);
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    for e in errors {
        let loc = e.span().map(|s| lines.loc(s.start)).unwrap_or(Loc::Nowhere);
        let msg = e.message().trim().replace('\n', " ");
        d.push(&loc, "", format!("TOML syntax: {msg}"));
    }
    let mut root = tree::from_de(doc.get_ref(), &lines);
    include::resolve(&mut root, file, &mut d);
    for arg in &overrides.sets {
        let loc = Loc::Arg(format!("--set {arg}"));
        match arg.split_once('=') {
            Some((path, raw)) if !path.trim().is_empty() => {
                let node = tree::parse_override_value(raw.trim(), &format!("--set {arg}"));
                if let Err(e) = tree::set_path(&mut root, path.trim(), node) {
                    d.push(&loc, path.trim(), e);
                }
            }
            _ => d.push(&loc, "", "expected PATH=VALUE, e.g. window.grace=5s"),
        }
    }
    if let Some((name, origin)) = &overrides.broker {
        let node = Node {
            value: Value::Str(name.clone()),
            loc: Loc::Arg(origin.clone()),
        };
        let _ = tree::set_path(&mut root, "pipeline.broker", node);
    }
    let config = read_pipeline(&root, &mut d);
    Loaded {
        config,
        diagnostics: d,
        file: file.to_string(),
    }
}

/// Reads a pipeline file from disk.
pub fn load_file(path: &std::path::Path, overrides: &Overrides) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(load_str(&file, &text, overrides)),
        Err(e) => Err(ConfigErrors {
            file,
            problems: vec![Problem {
                loc: Loc::Nowhere,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        }),
    }
}
