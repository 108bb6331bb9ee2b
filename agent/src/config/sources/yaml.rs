//! YAML documents as JSON values, read leniently where JSON is narrower than YAML: a number past 64 bits
//! becomes a float (which the resource's own checks then refuse, naming the field), and a non-string map key
//! becomes its text. A document is never lost to what one of its fields holds.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Each document of a YAML stream, to `add` as it is read (one document's value at a time: a file's documents
/// as values take several times the memory of what is kept of them); a syntax error ends the stream (the parser
/// cannot resume after one).
pub fn documents(text: &str, mut add: impl FnMut(Result<Value, String>)) {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        match Lenient::deserialize(document) {
            Ok(Lenient(value)) => add(Ok(value)),
            Err(error) => return add(Err(error.to_string())),
        }
    }
}

struct Lenient(Value);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Lenient, D::Error> {
        deserializer.deserialize_any(LenientVisitor).map(Lenient)
    }
}

struct LenientVisitor;

fn float(value: f64) -> Value {
    Number::from_f64(value).map_or(Value::Null, Value::Number)
}

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_i128<E>(self, value: i128) -> Result<Value, E> {
        Ok(i64::try_from(value).map_or_else(|_| float(value as f64), |value| Value::Number(value.into())))
    }

    fn visit_u128<E>(self, value: u128) -> Result<Value, E> {
        Ok(u64::try_from(value).map_or_else(|_| float(value as f64), |value| Value::Number(value.into())))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Lenient(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some((Lenient(key), Lenient(value))) = map.next_entry()? {
            let key = match key {
                Value::String(key) => key,
                other => other.to_string(),
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_is_read_whatever_its_fields_hold() {
        let mut read = Vec::new();
        documents("a: 99999999999999999999999\n---\n8080: port\nb: [1, -2, 1.5, null, true]\n", |d| read.push(d));
        assert_eq!(read.len(), 2);
        assert!(read[0].as_ref().unwrap()["a"].is_f64(), "{read:?}");
        assert_eq!(read[1].as_ref().unwrap()["8080"], "port");
        assert_eq!(read[1].as_ref().unwrap()["b"], serde_json::json!([1, -2, 1.5, null, true]));
        let mut broken = Vec::new();
        documents("a: [1, 2\n", |d| broken.push(d));
        assert!(broken[0].is_err());
    }
}
