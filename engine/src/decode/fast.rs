//! A one-pass scanner for the common case of [`Decoder::check`](super::Decoder::check):
//! a well-formed JSON object whose read fields hold plain strings, small non-negative
//! integers, booleans, `null`, objects or arrays.
//!
//! It fills the same slots as the serde path, with the same meaning, but it never decides
//! that a payload is bad: whenever it meets anything it does not handle exactly as
//! `serde_json` does (an escape in a string it must return, a `\u` escape anywhere, a
//! negative or fractional number it must return, deep nesting, a control character, any
//! syntax error) it gives up, and the caller decodes the payload with `serde_json`, which
//! also words the error. So what it accepts `serde_json` accepts too, with equal values;
//! `tests::agrees_with_serde_json` checks that on random and mutated documents.
//!
//! Why: on the seed's events it decodes about twice as fast as the serde visitor, and
//! decoding is half of the engine's work per event.

use std::borrow::Cow;

use super::{Node, Val};

/// Nesting beyond this is left to `serde_json` (which has a limit of its own).
const MAX_DEPTH: usize = 64;

/// Fills `slots` from `text` (already valid UTF-8). `None`: not sure, decode with serde.
#[inline]
pub(super) fn scan<'a>(text: &'a str, root: &Node, slots: &mut [Val<'a>]) -> Option<()> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    s.ws();
    if s.peek()? != b'{' {
        return None;
    }
    s.i += 1;
    s.object(root, slots, 1)?;
    s.ws();
    (s.i == s.b.len()).then_some(())
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// A mask with the high bit set in each byte of `v` that is zero (exact for the lowest
/// such byte, which is the only one used).
#[inline]
fn zero_bytes(v: u64) -> u64 {
    v.wrapping_sub(ONES) & !v & HIGHS
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        if self.peek()? == c {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// Moves to the next `"`, `\` or control character at or after `i`.
    #[inline]
    fn skip_to_special(&mut self) -> Option<u8> {
        let b = self.b;
        while self.i + 8 <= b.len() {
            let v = u64::from_le_bytes(b[self.i..self.i + 8].try_into().ok()?);
            let m = zero_bytes(v ^ (ONES * b'"' as u64))
                | zero_bytes(v ^ (ONES * b'\\' as u64))
                | (v.wrapping_sub(ONES * 0x20) & !v & HIGHS);
            if m != 0 {
                self.i += (m.trailing_zeros() / 8) as usize;
                return Some(b[self.i]);
            }
            self.i += 8;
        }
        while let Some(&c) = b.get(self.i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// A string starting at `i` (on its `"`): the range of its text, and whether it had
    /// escapes (then the range is the raw, escaped text).
    #[inline]
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            match self.skip_to_special()? {
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i - 1, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        _ => return None, // `\u` (surrogate rules) and bad escapes: serde
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    /// A string the pipeline reads: borrowed when it has no escapes, else give up.
    #[inline]
    fn plain_string(&mut self) -> Option<&'a str> {
        let (start, end, escaped) = self.string()?;
        if escaped {
            return None;
        }
        self.text.get(start..end)
    }

    /// The items of an object or array whose opening bracket was consumed, up to `close`:
    /// `item` reads each one; the whitespace and separators around them are checked here.
    #[inline]
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.ws();
        if self.peek()? == close {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                c if c == close => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The members of an object whose `{` was consumed, read through `node`.
    fn object(&mut self, node: &Node, slots: &mut [Val<'a>], depth: usize) -> Option<()> {
        self.items(b'}', |s| {
            if s.peek()? != b'"' {
                return None;
            }
            let key = s.plain_string()?;
            let child = node.child(key);
            s.eat(b':')?;
            s.ws();
            match child {
                Some(n) => s.value(n, slots, depth),
                None => s.skip(depth),
            }
        })
    }

    /// A value the pipeline reads (its node has a slot, children, or both).
    fn value(&mut self, node: &Node, slots: &mut [Val<'a>], depth: usize) -> Option<()> {
        let v = match self.peek()? {
            b'"' => Val::Str(Cow::Borrowed(self.plain_string()?)),
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                if let Some(s) = node.slot {
                    slots[s] = Val::Object;
                }
                self.i += 1;
                return self.object(node, slots, depth + 1);
            }
            b'[' => {
                self.skip(depth)?;
                Val::Array
            }
            b't' => {
                self.literal(b"true")?;
                Val::Bool(true)
            }
            b'f' => {
                self.literal(b"false")?;
                Val::Bool(false)
            }
            b'n' => {
                self.literal(b"null")?;
                Val::Null
            }
            b'0'..=b'9' => Val::Int(self.small_integer()?),
            _ => return None, // negative numbers (`-0` is a float to serde) and bad input
        };
        if let Some(s) = node.slot {
            slots[s] = v;
        }
        Some(())
    }

    /// A non-negative integer of at most 18 digits with no fraction or exponent.
    fn small_integer(&mut self) -> Option<i64> {
        let start = self.i;
        let mut n: i64 = 0;
        while let Some(&c @ b'0'..=b'9') = self.b.get(self.i) {
            if self.i - start == 18 {
                return None;
            }
            n = n * 10 + (c - b'0') as i64;
            self.i += 1;
        }
        let leading_zero = self.b[start] == b'0' && self.i - start > 1;
        if leading_zero || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    #[inline]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Skips any value, checking its syntax as `serde_json` does.
    fn skip(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.items(b'}', |s| {
                    if s.peek()? != b'"' {
                        return None;
                    }
                    s.string()?;
                    s.eat(b':')?;
                    s.ws();
                    s.skip(depth + 1)
                })
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.items(b']', |s| s.skip(depth + 1))
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => {
                self.i += 1;
                if matches!(self.peek(), Some(b'0'..=b'9')) {
                    return None;
                }
            }
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        Some(())
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::{Decoder, Schema, TimeSource, Val, Values};
    use crate::time::TimeFormat;

    fn decoder() -> Decoder {
        let mut d = Decoder::new(
            &Schema::seed_event(),
            &TimeSource::Field {
                path: "timestamp".into(),
                format: TimeFormat::Auto,
            },
            1 << 20,
        );
        for path in ["metadata.page", "n", "a.b", "a.b.c", "x", ""] {
            d.want(path);
        }
        d
    }

    /// The fast scan's values when it is sure, after checking serde_json agrees.
    fn both<'a>(d: &Decoder, text: &'a str) -> Option<Values<'a>> {
        let mut fast: Values = smallvec::smallvec![Val::Missing; d.slots];
        let sure = super::scan(text, &d.root, &mut fast).is_some();
        let mut slow: Values = smallvec::smallvec![Val::Missing; d.slots];
        let serde = super::super::visit::scan(&d.root, text, &mut slow);
        if sure {
            assert!(
                serde.is_ok(),
                "fast scan accepted what serde rejects: {text:?}: {serde:?}"
            );
            assert_eq!(fast, slow, "values differ for {text:?}");
            Some(fast)
        } else {
            None
        }
    }

    #[test]
    fn takes_the_fast_path_for_the_generated_events() {
        let d = decoder();
        for line in crate::generate::dataset(3, 2_000, 50, 0) {
            assert!(both(&d, &line).is_some(), "{line}");
        }
        let v = both(&d, r#" {"user_id" : "U1", "n": 42, "x": [1, {"y": -2.5e3}], "a": {"b": {"c": true}}, "metadata": null, "": "e", "q": "\"e\n\t\/"} "#).unwrap();
        assert!(v.contains(&Val::Int(42)));
        assert!(v.contains(&Val::Bool(true)));
        assert!(v.contains(&Val::Array));
        assert!(v.contains(&Val::Object), "a.b is an object");
    }

    #[test]
    fn hands_hard_and_bad_cases_to_serde() {
        let d = decoder();
        for text in [
            r#"{"user_id":"a\"b"}"#,
            r#"{"user_id":"\u0041"}"#,
            r#"{"us\u0065r_id":"a"}"#,
            r#"{"n":-0}"#,
            r#"{"n":1.5}"#,
            r#"{"n":1234567890123456789}"#,
            r#"{"n":01}"#,
            r#"{"x":[1,]}"#,
            r#"{"x":1,}"#,
            "{\"x\":\"a\tb\"}",
            r#"{"x":tru}"#,
            r#"{"x":1} x"#,
            r#"[{"x":1}]"#,
            r#"{"x":1"#,
            "",
        ] {
            assert!(both(&d, text).is_none(), "{text:?}");
        }
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(100), "]".repeat(100));
        assert!(both(&d, &deep).is_none());
    }

    /// Every one-character insertion, replacement and deletion of documents that touch
    /// each construct, read and skipped.
    #[test]
    fn agrees_with_serde_json_on_every_single_edit() {
        let d = decoder();
        let alphabet: Vec<char> = "{}[]\":,\\ -+.0123456789eEtrufalsn\t\nux\u{1}\u{e9}"
            .chars()
            .collect();
        let (mut sure, mut tried) = (0, 0);
        for doc in [
            r#"{"user_id":"U1","n":10,"q":[0,-1.5e3,true,null,{"k":"v\"w"}],"a":{"b":{"c":false}},"x":0}"#,
            r#"{"q":{"r":[[],{}]},"metadata":{"page":"/p","z":1E+2},"n":0,"x":[false]}"#,
            "{ \"n\" : 7 ,\n\t\"q\" : \"\\/\\\\\\b\\f\\n\\r\\t\" , \"x\" : null }",
        ] {
            let chars: Vec<char> = doc.chars().collect();
            for i in 0..=chars.len() {
                let mut edits = Vec::new();
                if i < chars.len() {
                    let mut del = chars.clone();
                    del.remove(i);
                    edits.push(del);
                }
                for &c in &alphabet {
                    let mut ins = chars.clone();
                    ins.insert(i, c);
                    edits.push(ins);
                    if i < chars.len() {
                        let mut rep = chars.clone();
                        rep[i] = c;
                        edits.push(rep);
                    }
                }
                for e in edits {
                    let text: String = e.into_iter().collect();
                    tried += 1;
                    sure += both(&d, &text).is_some() as usize;
                }
            }
        }
        assert!(
            sure > tried / 20,
            "the fast path took only {sure} of {tried}"
        );
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let key = prop::sample::select(vec![
            "user_id",
            "event_type",
            "metadata",
            "page",
            "n",
            "a",
            "b",
            "c",
            "x",
            "",
            "timestamp",
        ]);
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-3..20i64).prop_map(serde_json::Value::from),
            prop::sample::select(vec![0.0, -0.0, 0.5, 1e-7, 2.5e21])
                .prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            "[a-z\"\\\\/\n\t\u{e9}\u{1f600} ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(5, 40, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                    serde_json::Value::Object(
                        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    )
                }),
            ]
        })
    }

    fn object() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                (
                    prop::sample::select(vec!["user_id", "n", "a", "x", "metadata", "q"]),
                    json(),
                ),
                0..6,
            ),
            any::<bool>(),
        )
            .prop_map(|(kv, pretty)| {
                let mut m = serde_json::Map::new();
                for (k, v) in kv {
                    m.insert(k.to_string(), v);
                }
                let v = serde_json::Value::Object(m);
                if pretty {
                    serde_json::to_string_pretty(&v).unwrap()
                } else {
                    serde_json::to_string(&v).unwrap()
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn agrees_with_serde_json_on_valid_documents(text in object()) {
            let d = decoder();
            both(&d, &text);
        }

        #[test]
        fn agrees_with_serde_json_on_mutated_documents(
            text in object(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, prop::sample::select(
                "{}[]\":,\\ -+.00123456789eEtrufalsn\t\nu\u{1}x".chars().collect::<Vec<_>>())), 1..4),
        ) {
            let d = decoder();
            let mut chars: Vec<char> = text.chars().collect();
            for (at, op, c) in edits {
                let i = at.index(chars.len() + 1);
                match op {
                    0 => chars.insert(i, c),
                    1 if i < chars.len() => chars[i] = c,
                    _ if i < chars.len() => { chars.remove(i); }
                    _ => chars.push(c),
                }
            }
            let text: String = chars.into_iter().collect();
            both(&d, &text);
        }
    }
}
