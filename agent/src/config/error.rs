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
