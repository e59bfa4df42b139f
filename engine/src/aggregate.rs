//! Aggregate functions and their per-(key, window) state.

use std::collections::HashSet;

use crate::decode::Val;

/// One aggregate computed per (window, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggFn {
    /// Number of events.
    Count,
    /// Sum of a numeric field.
    Sum(String),
    /// Smallest value of a numeric field.
    Min(String),
    /// Largest value of a numeric field.
    Max(String),
    /// Mean of a numeric field.
    Mean(String),
    /// Exact number of distinct values of a field.
    CountDistinct(String),
}

impl AggFn {
    /// Parses `count`, `sum(amount)`, `count_distinct(metadata.session_id)`, ...
    pub fn parse(s: &str) -> Result<AggFn, String> {
        let s = s.trim();
        if s == "count" {
            return Ok(AggFn::Count);
        }
        let bad = || {
            format!(
                "unknown aggregate `{s}` (use count, sum(field), min(field), max(field), mean(field), count_distinct(field))"
            )
        };
        let (name, rest) = s.split_once('(').ok_or_else(bad)?;
        let field = rest.strip_suffix(')').ok_or_else(bad)?.trim();
        if field.is_empty() || field.split('.').any(|p| p.is_empty()) {
            return Err(format!("`{s}`: name a field, e.g. {}(amount)", name.trim()));
        }
        let f = field.to_string();
        Ok(match name.trim() {
            "sum" => AggFn::Sum(f),
            "min" => AggFn::Min(f),
            "max" => AggFn::Max(f),
            "mean" | "avg" => AggFn::Mean(f),
            "count_distinct" => AggFn::CountDistinct(f),
            _ => return Err(bad()),
        })
    }

    /// The field it reads, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            AggFn::Count => None,
            AggFn::Sum(f)
            | AggFn::Min(f)
            | AggFn::Max(f)
            | AggFn::Mean(f)
            | AggFn::CountDistinct(f) => Some(f),
        }
    }

    /// The name of this aggregate in results: `count`, `sum_amount`, `distinct_session_id`.
    pub fn output_name(&self) -> String {
        let last = |f: &str| f.rsplit('.').next().unwrap_or(f).to_string();
        match self {
            AggFn::Count => "count".into(),
            AggFn::Sum(f) => format!("sum_{}", last(f)),
            AggFn::Min(f) => format!("min_{}", last(f)),
            AggFn::Max(f) => format!("max_{}", last(f)),
            AggFn::Mean(f) => format!("mean_{}", last(f)),
            AggFn::CountDistinct(f) => format!("distinct_{}", last(f)),
        }
    }

    /// Whether it needs numeric values (`sum`, `min`, `max`, `mean`).
    pub fn is_numeric(&self) -> bool {
        self.numeric()
    }

    fn numeric(&self) -> bool {
        matches!(
            self,
            AggFn::Sum(_) | AggFn::Min(_) | AggFn::Max(_) | AggFn::Mean(_)
        )
    }

    fn init(&self) -> AggState {
        match self {
            AggFn::Count => AggState::None,
            AggFn::Sum(_) => AggState::Sum(0.0),
            AggFn::Min(_) => AggState::Min(None),
            AggFn::Max(_) => AggState::Max(None),
            AggFn::Mean(_) => AggState::Mean(0.0, 0),
            AggFn::CountDistinct(_) => AggState::Distinct(HashSet::new()),
        }
    }
}

/// The running state of one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum AggState {
    /// `count` lives in the accumulator itself.
    None,
    /// Running sum.
    Sum(f64),
    /// Smallest value so far.
    Min(Option<f64>),
    /// Largest value so far.
    Max(Option<f64>),
    /// Sum and number of values.
    Mean(f64, u64),
    /// The distinct values, as JSON text.
    Distinct(HashSet<Box<[u8]>>),
}

/// The aggregates of a job beyond `count`, with the decoder slot of each one's field.
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    fns: Vec<(AggFn, usize)>,
}

/// The values an event contributes, read once and applied to each of its windows.
#[derive(Debug, Default)]
pub struct Inputs {
    vals: Vec<Option<Input>>,
}

#[derive(Debug, Clone)]
enum Input {
    Num(f64),
    Text(Box<[u8]>),
}

impl Aggregates {
    /// Aggregates reading fields at the given decoder slots.
    pub fn new(fns: Vec<(AggFn, usize)>) -> Self {
        Aggregates { fns }
    }

    /// Whether there is anything beyond `count` (then entries carry extra state).
    pub fn has_state(&self) -> bool {
        self.fns.iter().any(|(f, _)| *f != AggFn::Count)
    }

    /// Reads an event's inputs; `Err` names a value that is not usable (a dead letter).
    /// Missing and `null` values are skipped, as SQL aggregates skip NULL.
    pub fn read(&self, values: &[Val<'_>], out: &mut Inputs) -> Result<(), String> {
        out.vals.clear();
        for (f, slot) in &self.fns {
            let v = &values[*slot];
            let input = match (f, v) {
                (AggFn::Count, _) | (_, Val::Missing | Val::Null) => None,
                (f, v) if f.numeric() => match v.as_f64() {
                    Some(x) => Some(Input::Num(x)),
                    None => {
                        return Err(format!(
                            "field `{}`: {} needs a number",
                            f.field().unwrap_or_default(),
                            f.output_name()
                        ))
                    }
                },
                (_, Val::Object | Val::Array) => {
                    return Err(format!(
                        "field `{}`: count_distinct needs a string, number or boolean",
                        f.field().unwrap_or_default()
                    ))
                }
                (_, v) => {
                    let mut b = Vec::new();
                    v.write_json(&mut b);
                    Some(Input::Text(b.into_boxed_slice()))
                }
            };
            out.vals.push(input);
        }
        Ok(())
    }

    /// Fresh state for a new (key, window).
    pub fn init(&self) -> Box<[AggState]> {
        self.fns.iter().map(|(f, _)| f.init()).collect()
    }

    /// Applies an event's inputs.
    pub fn apply(&self, state: &mut [AggState], inputs: &Inputs) {
        for (s, v) in state.iter_mut().zip(&inputs.vals) {
            match (s, v) {
                (AggState::Sum(a), Some(Input::Num(x))) => *a += x,
                (AggState::Min(a), Some(Input::Num(x))) => *a = Some(a.map_or(*x, |m| m.min(*x))),
                (AggState::Max(a), Some(Input::Num(x))) => *a = Some(a.map_or(*x, |m| m.max(*x))),
                (AggState::Mean(a, n), Some(Input::Num(x))) => {
                    *a += x;
                    *n += 1;
                }
                (AggState::Distinct(set), Some(Input::Text(t))) if !set.contains(t) => {
                    set.insert(t.clone());
                }
                _ => {}
            }
        }
    }

    /// Folds `other` into `into` (session windows merging).
    pub fn merge(into: &mut [AggState], other: Box<[AggState]>) {
        for (a, b) in into.iter_mut().zip(other.into_vec()) {
            match (a, b) {
                (AggState::Sum(x), AggState::Sum(y)) => *x += y,
                (AggState::Min(x), AggState::Min(y)) => *x = min_opt(*x, y, f64::min),
                (AggState::Max(x), AggState::Max(y)) => *x = min_opt(*x, y, f64::max),
                (AggState::Mean(s, n), AggState::Mean(t, m)) => {
                    *s += t;
                    *n += m;
                }
                (AggState::Distinct(x), AggState::Distinct(y)) => x.extend(y),
                _ => {}
            }
        }
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Writes an aggregate's value as JSON.
pub(crate) fn write_value(out: &mut Vec<u8>, count: u64, state: Option<&AggState>) {
    let num = |out: &mut Vec<u8>, x: f64| match serde_json::Number::from_f64(x) {
        Some(n) => out.extend_from_slice(n.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    };
    match state {
        None | Some(AggState::None) => write_u64(out, count),
        Some(AggState::Sum(x)) => num(out, *x),
        Some(AggState::Min(x) | AggState::Max(x)) => match x {
            Some(x) => num(out, *x),
            None => out.extend_from_slice(b"null"),
        },
        Some(AggState::Mean(s, n)) => {
            if *n == 0 {
                out.extend_from_slice(b"null")
            } else {
                num(out, s / *n as f64)
            }
        }
        Some(AggState::Distinct(set)) => write_u64(out, set.len() as u64),
    }
}

/// Appends `n` in decimal.
pub(crate) fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_aggregates() {
        assert_eq!(AggFn::parse("count").unwrap(), AggFn::Count);
        assert_eq!(
            AggFn::parse(" sum(amount) ").unwrap().output_name(),
            "sum_amount"
        );
        assert_eq!(
            AggFn::parse("count_distinct(metadata.session_id)")
                .unwrap()
                .output_name(),
            "distinct_session_id"
        );
        assert!(AggFn::parse("median(x)").is_err());
        assert!(AggFn::parse("sum()").is_err());
        assert!(AggFn::parse("sum(a..b)").is_err());
    }
}
