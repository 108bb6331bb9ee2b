//! The access log as Istio configures it: the mesh config's `accessLogFile` (empty: none, Istio's default;
//! `/dev/stdout`; or a file, reopened when it is rotated away or on SIGHUP), `accessLogEncoding` (`TEXT`,
//! `JSON`) and `accessLogFormat` (Envoy's command operators; for JSON, an object of field → format). The command
//! line's `--access-log-format` overrides the encoding with Sluice's built-in lines (Envoy's default text, or JSON).
//! Compiled once per configuration; a line is rendered per request or relayed connection.

pub mod format;
pub mod writer;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
};

use format::{Fields, Format, FormatError, Headers, ISTIO_TEXT};

use super::expression::Expression;
use super::{
    connections::ConnectionRecord,
    requests::{AccessLogFormat, RequestRecord},
};
use crate::{config::mesh::MeshConfig, policy::telemetry::GatewayTelemetry};

/// Set by SIGHUP: the writer reopens its file before the next line (logrotate's `postrotate`).
pub static REOPEN: AtomicBool = AtomicBool::new(false);

/// What is written, and where.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    /// `/dev/stdout`, or a file's path; `None`: no access log.
    pub file: Option<PathBuf>,
    pub lines: Lines,
    /// Request headers the format reads beyond those every request keeps.
    pub request_headers: Box<[http::HeaderName]>,
    /// Every request header is kept (a filter reads `request.headers`).
    pub all_request_headers: bool,
    /// The response headers the format reads, kept per request.
    pub response_headers: Box<[http::HeaderName]>,
    /// Every response header is kept (a filter reads `response.headers`).
    pub all_response_headers: bool,
    /// The Telemetry API's `filter.expression`: only entries for which it holds are written.
    pub filter: Option<Arc<Expression>>,
}

/// How a line is made.
#[derive(Clone, Debug, Default)]
pub enum Lines {
    /// Envoy's default text format (`--access-log-format text`).
    #[default]
    EnvoyText,
    /// One JSON object of Envoy's field names (`--access-log-format json`, or JSON encoding without a format).
    Json,
    /// A text format: the mesh config's, or Istio's default.
    Text(Format),
    /// A JSON object of the mesh config's fields, each a format.
    JsonFields(Vec<(String, Format)>),
}

impl AccessLog {
    /// The access log the mesh config and the Telemetry API (`telemetry`) ask for, unless the command line's `flag`
    /// says otherwise (then written where the mesh config says, else to standard output; still filtered). A
    /// Telemetry that enables the log writes to the mesh config's file, else standard output (Istio's `envoy`
    /// provider). A mesh config that passed validation compiles.
    pub fn compile(mesh: &MeshConfig, flag: Option<AccessLogFormat>, telemetry: &GatewayTelemetry) -> AccessLog {
        let file = mesh.access_log_file.as_deref().filter(|file| !file.is_empty()).map(PathBuf::from);
        let logging = telemetry.access_logging.as_ref();
        let file = match logging {
            Some(logging) if !logging.enabled => None,
            Some(_) => file.or_else(|| Some("/dev/stdout".into())),
            None => file,
        };
        let (file, lines) = match flag {
            Some(AccessLogFormat::Off) => (None, Lines::EnvoyText),
            Some(AccessLogFormat::Text) => (file.or_else(|| Some("/dev/stdout".into())), Lines::EnvoyText),
            Some(AccessLogFormat::Json) => (file.or_else(|| Some("/dev/stdout".into())), Lines::Json),
            None => (file, mesh_lines(mesh).unwrap_or(Lines::EnvoyText)),
        };
        let filter = logging.and_then(|logging| logging.filter.clone());
        let named = |response: bool| -> Box<[http::HeaderName]> {
            let names = match &lines {
                Lines::Text(format) if response => format.response_headers(),
                Lines::Text(format) => format.request_headers(),
                Lines::JsonFields(fields) if response => {
                    fields.iter().flat_map(|(_, format)| format.response_headers()).collect()
                }
                Lines::JsonFields(fields) => fields.iter().flat_map(|(_, format)| format.request_headers()).collect(),
                Lines::EnvoyText | Lines::Json => Vec::new(),
            };
            names
                .iter()
                // The record keeps these itself: the request's (`KEPT`), the upstream's service time.
                .filter(|name| !KEPT.contains(&name.as_str()) && name.as_str() != SERVICE_TIME)
                .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
                .collect()
        };
        let (request_headers, response_headers) = (named(false), named(true));
        let all_request_headers = filter.as_ref().is_some_and(|filter| filter.reads_request_headers);
        let all_response_headers = filter.as_ref().is_some_and(|filter| filter.reads_response_headers);
        AccessLog { file, lines, request_headers, all_request_headers, response_headers, all_response_headers, filter }
    }

    /// Keeps the response headers the format (or the filter) reads: before the proxy takes the hop-by-hop ones
    /// out, as Envoy's access log sees the upstream's response.
    pub fn capture_response(&self, headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
        if !self.is_on() {
            return;
        }
        let mut keep = |name: &http::HeaderName, value: &http::HeaderValue| {
            into.push((name.clone(), String::from_utf8_lossy(value.as_bytes()).into()));
        };
        if self.all_response_headers {
            capture_all_response(headers, into);
            return;
        }
        for name in self.response_headers.iter() {
            if let Some(value) = headers.get(name) {
                keep(name, value);
            }
        }
    }

    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Keeps the request headers the format (or the filter) reads beyond a record's own fields.
    pub fn capture(&self, headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
        let mut keep = |name: &http::HeaderName, value: &http::HeaderValue| {
            into.push((name.clone(), String::from_utf8_lossy(value.as_bytes()).into()));
        };
        if self.all_request_headers {
            return capture_all(headers, into);
        }
        for name in self.request_headers.iter() {
            if let Some(value) = headers.get(name) {
                keep(name, value);
            }
        }
    }

    /// The line of an ended request, if there is an access log.
    pub fn request_line(&self, record: &RequestRecord) -> Option<String> {
        self.file.as_ref()?;
        match (&self.lines, &self.filter) {
            (Lines::EnvoyText, None) => return Some(super::requests::text_line(record)),
            (Lines::Json, None) => return Some(super::requests::json_line(record)),
            _ => {}
        }
        // A filter on the status code alone decides before anything is made for the line.
        let by_code = self.filter.as_ref().and_then(|filter| filter.holds_for_code(record.response_code));
        if by_code == Some(false) {
            return None;
        }
        // The entry's fields, made once for the filter and the line.
        with_request_fields(record, |fields| {
            if self.filter.as_ref().is_some_and(|filter| !filter.holds(fields)) {
                return None;
            }
            Some(match &self.lines {
                Lines::EnvoyText => super::requests::text_line(record),
                Lines::Json => super::requests::json_line(record),
                Lines::Text(format) => format.to_line(fields),
                Lines::JsonFields(format) => json_object(format, fields),
            })
        })
    }

    /// Whether lines are written at all (an access log file is configured).
    pub fn writes(&self) -> bool {
        self.file.is_some()
    }

    /// The line of a relayed connection, if there is an access log.
    pub fn connection_line(&self, record: &ConnectionRecord<'_>) -> Option<String> {
        self.file.as_ref()?;
        if self.filter.is_none() {
            match &self.lines {
                Lines::EnvoyText => return Some(record.text_line()),
                Lines::Json => return Some(record.json_line()),
                Lines::Text(_) | Lines::JsonFields(_) => {}
            }
        }
        let cluster = record.destination.cluster();
        let values = || Fields {
            start: Some(record.start),
            response_flags: record.flag.text(),
            bytes_received: record.received,
            bytes_sent: record.sent,
            duration: record.duration,
            upstream_host: record.upstream,
            upstream_local: record.upstream_local,
            upstream_transport_failure_reason: record.upstream_transport_failure_reason,
            connection_termination_details: record.termination_details,
            upstream_cluster: Some(&cluster),
            downstream_local: Some(record.local),
            downstream_remote: Some(record.remote),
            server_name: record.server_name,
            ..Fields::default()
        };
        if self.filter.as_ref().is_some_and(|filter| !filter.holds(&values())) {
            return None;
        }
        Some(match &self.lines {
            Lines::EnvoyText => record.text_line(),
            Lines::Json => record.json_line(),
            Lines::Text(format) => format.to_line(&values()),
            Lines::JsonFields(fields) => json_object(fields, &values()),
        })
    }
}

/// Request headers every request keeps for the log (fields of its record; the original path is never set by
/// Sluice, so its alternative is read).
/// The response header Envoy adds with the upstream's time, which the record keeps as a duration.
const SERVICE_TIME: &str = "x-envoy-upstream-service-time";
const KEPT: [&str; 5] = ["user-agent", "x-forwarded-for", "x-request-id", "host", "x-envoy-original-path"];

/// The mesh config's lines: `None` when it asks for no access log.
fn mesh_lines(mesh: &MeshConfig) -> Option<Lines> {
    let format = mesh.access_log_format.as_deref().filter(|format| !format.trim().is_empty());
    let json = mesh.access_log_encoding.as_deref() == Some("JSON");
    match (json, format) {
        (false, None) => Format::parse(ISTIO_TEXT).ok().map(Lines::Text),
        (false, Some(format)) => Format::parse(format).ok().map(Lines::Text),
        (true, None) => Some(Lines::Json),
        (true, Some(format)) => json_fields(format).ok().map(Lines::JsonFields),
    }
}

/// The mesh config's `accessLogFormat` for its encoding, checked: a text format, or for JSON an object whose
/// values are formats. Errors name the position (in the format, or in the JSON field's value).
pub fn check(format: &str, json: bool) -> Result<(), String> {
    if json {
        json_fields(format).map(drop)
    } else {
        Format::parse(format).map(drop).map_err(|error| error.to_string())
    }
}

fn json_fields(format: &str) -> Result<Vec<(String, Format)>, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(format)
        .map_err(|error| format!("a JSON encoding's format is a JSON object of field formats: {error}"))?;
    (object.into_iter())
        .map(|(key, value)| {
            let text = value.as_str().ok_or_else(|| format!("field '{key}': its format is not a string"))?;
            let format = Format::parse(text).map_err(|FormatError { position, reason }| {
                format!("field '{key}': {reason} at position {position}")
            })?;
            Ok((key, format))
        })
        .collect()
}

fn json_object(fields: &[(String, Format)], values: &Fields<'_>) -> String {
    let mut object = serde_json::Map::with_capacity(fields.len());
    for (key, format) in fields {
        let text = format.to_line(values);
        let value = match (format.is_number(), text.parse::<u64>()) {
            (true, Ok(number)) => serde_json::Value::from(number),
            _ if text == "-" && !format.dash_is_a_value() => serde_json::Value::Null,
            _ => serde_json::Value::String(text),
        };
        object.insert(key.clone(), value);
    }
    let mut line = serde_json::Value::Object(object).to_string();
    line.push('\n');
    line
}

/// A request's headers as its record kept them.
struct RecordHeaders<'a> {
    record: &'a RequestRecord,
    /// The upstream's time as the header's text, made only if something reads it as a header.
    service_time: std::cell::OnceCell<Option<String>>,
}

impl RecordHeaders<'_> {
    fn service_time(&self) -> Option<&String> {
        let millis = || self.record.upstream_service_time.map(|time| time.as_millis().to_string());
        self.service_time.get_or_init(millis).as_ref()
    }
}

impl Headers for RecordHeaders<'_> {
    fn request(&self, name: &str) -> Option<&str> {
        let record = self.record;
        match name {
            ":method" => Some(record.method()),
            ":path" => Some(record.path()),
            ":authority" | "host" => Some(record.authority()),
            ":scheme" => Some(if record.connection_security == super::requests::ConnectionSecurity::Unknown {
                "http"
            } else {
                "https"
            }),
            "user-agent" => record.user_agent(),
            "x-forwarded-for" => record.x_forwarded_for(),
            "x-request-id" => record.request_id(),
            name => record.captured_headers.iter().find(|(kept, _)| kept.as_str() == name).map(|(_, value)| &**value),
        }
    }

    fn response(&self, name: &str) -> Option<&str> {
        match name {
            SERVICE_TIME => self.service_time().map(String::as_str),
            name => {
                let captured = &self.record.captured_response_headers;
                captured.iter().find(|(kept, _)| kept.as_str() == name).map(|(_, value)| &**value)
            }
        }
    }

    fn response_headers(&self) -> Vec<(&str, &str)> {
        let captured = self.record.captured_response_headers.iter().map(|(name, value)| (name.as_str(), &**value));
        let service_time = self.service_time().map(|time| (SERVICE_TIME, time.as_str()));
        service_time.into_iter().chain(captured).collect()
    }

    fn request_headers(&self) -> Vec<(&str, &str)> {
        let record = self.record;
        let known = [
            ("host", Some(record.authority())),
            ("user-agent", record.user_agent()),
            ("x-forwarded-for", record.x_forwarded_for()),
            ("x-request-id", record.request_id()),
        ];
        let known = known.into_iter().filter_map(|(name, value)| value.map(|value| (name, value)));
        known.chain(record.captured_headers.iter().map(|(name, value)| (name.as_str(), &**value))).collect()
    }
}

/// Keeps every request header beyond a record's own fields (an expression reads `request.headers`).
pub(crate) fn capture_all(headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
    for (name, value) in headers.iter().filter(|(name, _)| !KEPT.contains(&name.as_str())) {
        into.push((name.clone(), String::from_utf8_lossy(value.as_bytes()).into()));
    }
}

/// Keeps every upstream response header (an expression reads `response.headers`; the service time is the record's).
pub(crate) fn capture_all_response(headers: &http::HeaderMap, into: &mut Vec<(http::HeaderName, Box<str>)>) {
    for (name, value) in headers.iter().filter(|(name, _)| name.as_str() != SERVICE_TIME) {
        into.push((name.clone(), String::from_utf8_lossy(value.as_bytes()).into()));
    }
}

/// Runs `render` with what `record` offers to the operators (and to the tag overrides' expressions).
pub(crate) fn with_request_fields<T>(record: &RequestRecord, render: impl FnOnce(&Fields<'_>) -> T) -> T {
    let headers = RecordHeaders { record, service_time: std::cell::OnceCell::new() };
    let cluster = record.destination.as_ref().map(|destination| destination.cluster());
    let fields = Fields {
        start: record.start,
        headers: Some(&headers),
        response_code: record.response_code,
        upstream_service_time: record.upstream_service_time,
        response_flags: record.response_flags.text(),
        // Envoy's details for a response that came from the upstream as it was.
        response_code_details: record.response_code_details.as_deref().or_else(|| {
            (record.upstream_host.is_some() && record.response_flags.text() == "-").then_some("via_upstream")
        }),
        bytes_received: record.bytes_received,
        bytes_sent: record.bytes_sent,
        duration: record.duration,
        protocol: Some(record.protocol),
        upstream_host: record.upstream_host,
        upstream_cluster: cluster.as_ref().map(|cluster| cluster as &dyn std::fmt::Display),
        upstream_local: record.upstream_local,
        upstream_transport_failure_reason: record.upstream_transport_failure_reason.as_deref(),
        connection_termination_details: None,
        downstream_local: record.downstream_local,
        downstream_remote: record.downstream_remote,
        server_name: record.server_name.as_deref(),
        route_name: record.route_name.as_ref().map(|route| route as &dyn std::fmt::Display),
        peer_uri_san: record.source_principal.as_ref().map(|principal| principal.as_str()),
    };
    render(&fields)
}
