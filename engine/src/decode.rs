//! Decoding and validating a payload in one pass: only the fields the pipeline needs are
//! read (strings borrowed from the payload where they have no escapes), everything else is
//! skipped, and every schema problem of a record is reported together.

use std::borrow::Cow;

use crate::time::TimeFormat;

mod fast;
mod visit;

/// The JSON type a schema field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// A JSON string.
    String,
    /// A JSON number without fraction.
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
    /// A string or number readable as a timestamp in the pipeline's event-time format.
    Timestamp,
    /// Anything but `null`.
    Any,
}

impl FieldType {
    /// Parses the name used in `pipeline.toml`.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "string" => FieldType::String,
            "integer" => FieldType::Integer,
            "number" => FieldType::Number,
            "boolean" | "bool" => FieldType::Boolean,
            "object" => FieldType::Object,
            "array" => FieldType::Array,
            "timestamp" => FieldType::Timestamp,
            "any" => FieldType::Any,
            _ => return None,
        })
    }

    /// The names accepted by [`from_name`](Self::from_name).
    pub const NAMES: &'static str =
        "string, integer, number, boolean, object, array, timestamp, any";
}

/// One field of a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    /// Dotted path from the top of the event, e.g. `metadata.page`.
    pub path: String,
    /// The type it must have.
    pub ty: FieldType,
    /// Whether the event is invalid without it. `null` counts as missing.
    pub required: bool,
    /// For string fields: the only values allowed, if set.
    pub allowed: Option<Vec<String>>,
}

/// The schema events must satisfy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    /// The fields checked, in the order their problems are reported.
    pub fields: Vec<FieldSpec>,
}

impl Schema {
    /// The seed document's user-engagement event, ready-made.
    pub fn seed_event() -> Self {
        let f = |path: &str, ty, required, allowed: Option<&[&str]>| FieldSpec {
            path: path.into(),
            ty,
            required,
            allowed: allowed.map(|a| a.iter().map(|s| s.to_string()).collect()),
        };
        Schema {
            fields: vec![
                f(
                    "event_type",
                    FieldType::String,
                    true,
                    Some(&["page_view", "scroll", "click"]),
                ),
                f("user_id", FieldType::String, true, None),
                f("action", FieldType::String, true, None),
                f("timestamp", FieldType::Timestamp, true, None),
                f("metadata", FieldType::Object, false, None),
            ],
        }
    }
}

/// A value read from an event.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Val<'a> {
    /// Not present in the event.
    #[default]
    Missing,
    /// JSON `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer that fits `i64`.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// A string, borrowed from the payload unless it had escapes.
    Str(Cow<'a, str>),
    /// An object (its contents are only read through child paths).
    Object,
    /// An array (skipped).
    Array,
}

impl Val<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Val::Missing => "nothing",
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Str(_) => "a string",
            Val::Object => "an object",
            Val::Array => "an array",
        }
    }

    /// The value as `f64` if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Writes the value as JSON text (scalars only; objects and arrays write `null`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Val::Str(s) => write_json_str(out, s),
            Val::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Val::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => out.extend_from_slice(n.to_string().as_bytes()),
                None => out.extend_from_slice(b"null"),
            },
            Val::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            _ => out.extend_from_slice(b"null"),
        }
    }
}

/// Appends `s` as a JSON string literal.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Byte equality without a call into libc: field names and allowed values are short, and
/// comparing them is per event.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i + 8 <= a.len() {
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&s[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        if word(a) != word(b) {
            return false;
        }
        i += 8;
    }
    a[i..].iter().zip(&b[i..]).all(|(x, y)| x == y)
}

#[derive(Debug, Default)]
struct Node {
    children: Vec<(Box<str>, Node)>,
    slot: Option<usize>,
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|(k, _)| same(k.as_bytes(), key.as_bytes()))
            .map(|(_, n)| n)
    }

    fn insert(&mut self, path: &str, next_slot: &mut usize) -> usize {
        let mut node = self;
        for part in path.split('.') {
            let idx = match node.children.iter().position(|(k, _)| &**k == part) {
                Some(i) => i,
                None => {
                    node.children.push((part.into(), Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[idx].1;
        }
        *node.slot.get_or_insert_with(|| {
            *next_slot += 1;
            *next_slot - 1
        })
    }
}

/// Where the event time of a record comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TimeSource {
    /// A field of the event, read in a format.
    Field {
        /// Dotted path of the field.
        path: String,
        /// How to read it.
        format: TimeFormat,
    },
    /// The broker's timestamp of the record.
    Broker,
    /// The wall clock when the record was received.
    Processing,
}

/// The values of one decoded event, by slot: inline (no allocation) for up to 8 slots.
pub type Values<'a> = smallvec::SmallVec<[Val<'a>; 8]>;

/// A record that passed validation: its event time (if read from the payload) and the
/// values the pipeline needs, indexed by the slots the [`Decoder`] handed out.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// Event time in epoch milliseconds when the time source is a field.
    pub time: Option<i64>,
    /// Values by slot.
    pub values: Values<'a>,
}

/// Reads and checks events against a schema plus the fields the pipeline needs.
#[derive(Debug)]
pub struct Decoder {
    root: Node,
    slots: usize,
    checks: Vec<(usize, FieldSpec)>,
    time: Option<(usize, String, TimeFormat)>,
    max_payload: usize,
}

impl Decoder {
    /// Builds a decoder for `schema` that also reads the event time (when it comes from a
    /// field) and limits payloads to `max_payload` bytes.
    pub fn new(schema: &Schema, time: &TimeSource, max_payload: usize) -> Self {
        let mut d = Decoder {
            root: Node::default(),
            slots: 0,
            checks: Vec::new(),
            time: None,
            max_payload,
        };
        for f in &schema.fields {
            let slot = d.root.insert(&f.path, &mut d.slots);
            d.checks.push((slot, f.clone()));
        }
        if let TimeSource::Field { path, format } = time {
            let slot = d.root.insert(path, &mut d.slots);
            d.time = Some((slot, path.clone(), *format));
        }
        d
    }

    /// Reserves a slot for a field the pipeline reads (a group-by key, an aggregated field).
    pub fn want(&mut self, path: &str) -> usize {
        self.root.insert(path, &mut self.slots)
    }

    /// Decodes and validates one payload. On failure returns the reason for the dead letter.
    #[inline]
    pub fn decode<'a>(&self, payload: &'a [u8]) -> Result<Decoded<'a>, String> {
        self.check(payload).map_err(|problems| problems.join("; "))
    }

    /// [`decode`](Self::decode) of a record's payload; a payload its source cut short for
    /// its size ([`Record::cut_from`](crate::Record::cut_from)) is oversized whatever its
    /// first bytes are.
    #[inline]
    pub fn decode_record<'a>(&self, rec: &'a crate::Record) -> Result<Decoded<'a>, String> {
        match rec.cut_from() {
            Some(n) => Err(format!(
                "payload is {n} bytes, over the limit of {} bytes (only its first {} bytes were kept)",
                self.max_payload,
                rec.payload.len()
            )),
            None => self.decode(&rec.payload),
        }
    }

    /// Like [`decode`](Self::decode), but on failure returns every problem separately (for
    /// an ingest API that lists them): one entry for a payload that is not a JSON object,
    /// one per schema field otherwise.
    pub fn check<'a>(&self, payload: &'a [u8]) -> Result<Decoded<'a>, Vec<String>> {
        if payload.len() > self.max_payload {
            return Err(vec![format!(
                "payload is {} bytes, over the limit of {} bytes",
                payload.len(),
                self.max_payload
            )]);
        }
        if payload.is_empty() {
            return Err(vec!["empty payload: no JSON event".into()]);
        }
        // SIMD validation first (a third of decoding with std's); std only to say where.
        let text = match simdutf8::basic::from_utf8(payload) {
            Ok(t) => t,
            Err(_) => {
                let at = std::str::from_utf8(payload)
                    .err()
                    .map_or(0, |e| e.valid_up_to());
                return Err(vec![format!(
                    "payload is not valid UTF-8 (invalid byte at {at})"
                )]);
            }
        };
        let mut values: Values<'a> = smallvec::smallvec![Val::Missing; self.slots];
        if fast::scan(text, &self.root, &mut values).is_none() {
            // Not the common case, or not valid: serde_json decides, and words the error.
            values.fill(Val::Missing);
            if let Err(e) = visit::scan(&self.root, text, &mut values) {
                return Err(vec![format!("invalid JSON: {e}")]);
            }
        }
        let mut problems: Vec<String> = Vec::new();
        for (slot, f) in &self.checks {
            let v = &values[*slot];
            if matches!(v, Val::Missing | Val::Null) {
                if f.required {
                    problems.push(format!("missing field `{}`", f.path));
                }
                continue;
            }
            let ok = match f.ty {
                FieldType::String => matches!(v, Val::Str(_)),
                FieldType::Integer => matches!(v, Val::Int(_)),
                FieldType::Number => matches!(v, Val::Int(_) | Val::Float(_)),
                FieldType::Boolean => matches!(v, Val::Bool(_)),
                FieldType::Object => matches!(v, Val::Object),
                FieldType::Array => matches!(v, Val::Array),
                FieldType::Timestamp => matches!(v, Val::Str(_) | Val::Int(_) | Val::Float(_)),
                FieldType::Any => true,
            };
            if !ok {
                let want = match f.ty {
                    FieldType::Timestamp => "a timestamp string or number".to_string(),
                    t => format!("{t:?}").to_lowercase(),
                };
                problems.push(format!(
                    "field `{}`: expected {want}, got {}",
                    f.path,
                    v.kind()
                ));
                continue;
            }
            if let (Some(allowed), Val::Str(s)) = (&f.allowed, v) {
                if !allowed.iter().any(|a| same(a.as_bytes(), s.as_bytes())) {
                    problems.push(format!(
                        "field `{}`: `{}` is not one of {}",
                        f.path,
                        clip(s),
                        allowed.join(", ")
                    ));
                }
            }
        }
        let mut time = None;
        if let Some((slot, path, format)) = &self.time {
            let parsed = match &values[*slot] {
                Val::Missing | Val::Null => Err(format!("missing event-time field `{path}`")),
                Val::Str(s) => format.parse_str(s),
                Val::Int(i) => format.parse_number(*i as f64),
                Val::Float(f) => format.parse_number(*f),
                other => Err(format!("expected a timestamp, got {}", other.kind())),
            };
            match parsed {
                Ok(t) => time = Some(t),
                Err(e) if e.starts_with("missing") => {
                    if !problems.iter().any(|p| p.contains(&format!("`{path}`"))) {
                        problems.push(e)
                    }
                }
                Err(e) => problems.push(format!("field `{path}`: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(Decoded { time, values })
        } else {
            Err(problems)
        }
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{"event_type": "page_view", "user_id": "e659e3e7-22e1-4a6b", "action": "alternative_handset", "timestamp": "2024-06-27T15:43:43.315342", "metadata": {"session_id": "4b481fd1-9973-4498-89fb", "page": "/search", "item_id": "05efee91", "user_agent": "Opera/8.81.(X11; Linux x86_64; hi-IN) Presto/2.9.181 Version/12.00"}}"#;

    fn decoder() -> (Decoder, usize, usize) {
        let mut d = Decoder::new(
            &Schema::seed_event(),
            &TimeSource::Field {
                path: "timestamp".into(),
                format: TimeFormat::Auto,
            },
            4096,
        );
        let user = d.want("user_id");
        let page = d.want("metadata.page");
        (d, user, page)
    }

    #[test]
    fn reads_the_seed_event_borrowing_strings() {
        let (d, user, page) = decoder();
        let ev = d.decode(SEED.as_bytes()).unwrap();
        assert_eq!(ev.time, Some(1_719_503_023_315));
        assert!(matches!(
            &ev.values[user],
            Val::Str(Cow::Borrowed("e659e3e7-22e1-4a6b"))
        ));
        assert_eq!(ev.values[page], Val::Str("/search".into()));
    }

    #[test]
    fn reports_every_problem_of_a_record() {
        let (d, _, _) = decoder();
        let err = d
            .decode(br#"{"event_type":"hover","user_id":7,"timestamp":"soon","metadata":[]}"#)
            .unwrap_err();
        assert!(
            err.contains("`event_type`: `hover` is not one of page_view, scroll, click"),
            "{err}"
        );
        assert!(
            err.contains("`user_id`: expected string, got an integer"),
            "{err}"
        );
        assert!(err.contains("missing field `action`"), "{err}");
        assert!(
            err.contains("`metadata`: expected object, got an array"),
            "{err}"
        );
        assert!(
            err.contains("`timestamp`: `soon` is not a timestamp"),
            "{err}"
        );
    }

    #[test]
    fn check_lists_the_problems_one_by_one() {
        let (d, _, _) = decoder();
        let problems = d
            .check(br#"{"event_type":"hover","user_id":7,"timestamp":"soon"}"#)
            .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("`event_type`"), "{problems:?}");
        assert_eq!(problems[2], "missing field `action`");
        let one = d.check(b"[1]").unwrap_err();
        assert_eq!(one.len(), 1, "{one:?}");
    }

    #[test]
    fn malformed_payloads_are_reasons_not_panics() {
        let (d, _, _) = decoder();
        let cases: [(&[u8], &str); 7] = [
            (b"{\"user_id\": ", "invalid JSON"),
            (b"[1,2]", "expected a JSON object, got an array"),
            (b"42", "expected a JSON object"),
            (b"\xff\xfe{}", "not valid UTF-8"),
            (b"{} trailing", "invalid JSON"),
            (b"", "empty payload"),
            (&[b'x'; 5000], "over the limit of 4096 bytes"),
        ];
        for (payload, want) in cases {
            let err = d.decode(payload).unwrap_err();
            assert!(err.contains(want), "{payload:?}: {err}");
        }
    }

    #[test]
    fn escaped_strings_and_null_optional_fields() {
        let (d, user, _) = decoder();
        let ev = d
            .decode(br#"{"event_type":"click","user_id":"a\"b","action":"x","timestamp":1719503023315,"metadata":null}"#)
            .unwrap();
        assert_eq!(ev.values[user], Val::Str("a\"b".into()));
        assert_eq!(ev.time, Some(1_719_503_023_315));
    }
}
