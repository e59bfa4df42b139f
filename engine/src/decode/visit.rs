//! The serde_json visitor that reads an event's wanted fields into their slots: the
//! fallback of the fast scan (`fast.rs`), which decides and words every error.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Node, Val};

/// Fills `values` from `text` with the serde visitor.
pub(super) fn scan<'a>(
    root: &Node,
    text: &'a str,
    values: &mut [Val<'a>],
) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = RootSeed {
        node: root,
        slots: values,
    };
    top.deserialize(&mut de).and_then(|()| de.end())
}

struct RootSeed<'n, 's, 'a> {
    node: &'n Node,
    slots: &'s mut [Val<'a>],
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for RootSeed<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(ObjVisitor {
            node: self.node,
            slots: self.slots,
            top: true,
        })
    }
}

struct ObjVisitor<'n, 's, 'a> {
    node: &'n Node,
    slots: &'s mut [Val<'a>],
    top: bool,
}

impl ObjVisitor<'_, '_, '_> {
    fn not_object<E: de::Error>(self, what: &str) -> Result<(), E> {
        if self.top {
            Err(E::custom(format_args!(
                "expected a JSON object, got {what}"
            )))
        } else {
            unreachable_object(what)
        }
    }
}

fn unreachable_object<E: de::Error>(what: &str) -> Result<(), E> {
    Err(E::custom(format_args!("expected an object, got {what}")))
}

impl<'de: 'a, 'a> Visitor<'de> for ObjVisitor<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(child) = map.next_key_seed(KeySeed(self.node))? {
            match child {
                Some(node) => map.next_value_seed(ValSeed {
                    node,
                    slots: &mut *self.slots,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.not_object("an array")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_object("a string")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_object("a boolean")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object("null")
    }
}

struct KeySeed<'n>(&'n Node);

impl<'de, 'n> DeserializeSeed<'de> for KeySeed<'n> {
    type Value = Option<&'n Node>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'n> Visitor<'de> for KeySeed<'n> {
    type Value = Option<&'n Node>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, k: &str) -> Result<Self::Value, E> {
        Ok(self.0.child(k))
    }
}

struct ValSeed<'n, 's, 'a> {
    node: &'n Node,
    slots: &'s mut [Val<'a>],
}

impl<'a> ValSeed<'_, '_, 'a> {
    fn set(self, v: Val<'a>) {
        if let Some(s) = self.node.slot {
            self.slots[s] = v;
        }
    }
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for ValSeed<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ValSeed<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.set(Val::Str(Cow::Borrowed(v)));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.set(Val::Str(Cow::Owned(v.to_owned())));
        Ok(())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.set(Val::Str(Cow::Owned(v)));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.set(Val::Int(v));
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.set(match i64::try_from(v) {
            Ok(i) => Val::Int(i),
            Err(_) => Val::Float(v as f64),
        });
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.set(Val::Float(v));
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.set(Val::Bool(v));
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.set(Val::Null);
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.set(Val::Array);
        Ok(())
    }
    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<(), M::Error> {
        if let Some(s) = self.node.slot {
            self.slots[s] = Val::Object;
        }
        ObjVisitor {
            node: self.node,
            slots: self.slots,
            top: false,
        }
        .visit_map(map)
    }
}
