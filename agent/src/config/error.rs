//! Configuration errors, in the form `FILE: Kind ns/name: spec.field[1].sub: reason`.

use std::fmt;

/// One problem with one resource (or one file, when no resource could be read from it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the resource came from: a file path, or `kubernetes`.
    pub source: String,
    /// `Kind ns/name`, when the resource got that far.
    pub resource: Option<String>,
    /// The field, as `spec.ports[0].number`; empty for the whole resource or file.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(resource) = &self.resource {
            write!(f, ": {resource}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// A problem found while validating a spec: the field and the reason, before the source and resource are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError { path: path.into(), reason: reason.into() }
    }
}

impl FieldError {
    /// A serde error on reading a field, said as validation says things: `number is required`, `'dns' is not one
    /// of NONE, STATIC, DNS or DNS_ROUND_ROBIN`, `-80 is not a whole number from 0 to 4294967295`. `path` is the
    /// field's (serde's `.` for the root is read as `prefix` alone).
    pub fn from_serde(prefix: &str, path: &str, message: &str) -> FieldError {
        let path = match path {
            "" | "." => prefix.to_owned(),
            path if prefix.is_empty() => path.to_owned(),
            path => format!("{prefix}.{path}"),
        };
        let message = message.split(" at line ").next().unwrap_or(message);
        // Some deserializers (YAML's) put the path in front of the message already.
        let message =
            message.split_once(": ").filter(|(head, _)| path.ends_with(head)).map_or(message, |(_, rest)| rest);
        if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
            let path = if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") };
            return FieldError::new(path, format!("{field} is required"));
        }
        if let Some((value, expected)) =
            message.strip_prefix("unknown variant `").and_then(|rest| rest.split_once("`, expected "))
        {
            let allowed = expected.replace('`', "");
            let allowed = match allowed.rsplit_once(", ") {
                Some((head, last)) => format!("{head} or {last}"),
                None => allowed,
            };
            return FieldError::new(path, format!("'{value}' is not {allowed}"));
        }
        let typed = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "));
        if let Some((found, expected)) = typed.and_then(|rest| rest.split_once(", expected ")) {
            return FieldError::new(path, format!("{} is not {}", found_text(found), expected_text(expected)));
        }
        FieldError::new(path, message)
    }
}

/// serde's name for a value found (`string "https"`, `integer `-80``), as a user wrote it.
fn found_text(found: &str) -> String {
    let quoted = |text: &str| text.trim_matches('`').trim_matches('"').to_owned();
    match found.split_once(' ') {
        Some(("string", text)) => format!("'{}'", quoted(text)),
        Some(("integer" | "boolean" | "character", text)) => quoted(text),
        Some(("floating", text)) => quoted(text.trim_start_matches("point ")),
        _ => match found {
            "sequence" => "a list".into(),
            "map" => "a map".into(),
            "null" | "unit value" => "null".into(),
            other => other.into(),
        },
    }
}

/// serde's name for what was expected (`u32`, `a sequence`, `struct Destination`), in the user's words.
fn expected_text(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        "a string" | "a map" => expected.into(),
        other if other.starts_with("struct ") || other.starts_with("a map") => "a map of fields".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_read_as_validation_errors() {
        let said = |path: &str, message: &str| {
            let error = FieldError::from_serde("spec", path, message);
            format!("{}: {}", error.path, error.reason)
        };
        assert_eq!(
            said("resolution", "unknown variant `dns`, expected one of `NONE`, `STATIC`, `DNS`, `DNS_ROUND_ROBIN`"),
            "spec.resolution: 'dns' is not one of NONE, STATIC, DNS or DNS_ROUND_ROBIN"
        );
        assert_eq!(
            said("ports[0].number", "invalid value: integer `-80`, expected u32"),
            "spec.ports[0].number: -80 is not a whole number from 0 to 4294967295"
        );
        assert_eq!(
            said("ports[0].number", "invalid type: string \"https\", expected u32"),
            "spec.ports[0].number: 'https' is not a whole number from 0 to 4294967295"
        );
        assert_eq!(said("hosts", "invalid type: string \"a\", expected a sequence"), "spec.hosts: 'a' is not a list");
        assert_eq!(said("ports[0]", "missing field `number`"), "spec.ports[0].number: number is required");
        assert_eq!(
            said(".", "invalid type: sequence, expected struct ServiceEntry"),
            "spec: a list is not a map of fields"
        );
        assert_eq!(
            said("weight", "invalid type: floating point `1.5`, expected i64"),
            "spec.weight: 1.5 is not a whole number"
        );
    }
}
