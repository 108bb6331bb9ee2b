//! Envoy's access-log format strings (`%COMMAND(ARGS):MAX%` operators between literal text), parsed once when the
//! configuration is compiled, and rendered per request or connection from its [`Fields`].
//!
//! Supported operators: `START_TIME` (with a strftime-like format: `%Y %m %d %H %M %S %s %z %Z %%` and
//! fractional seconds `%f`, `%1f`…`%9f`), `REQ(X?Y)` / `RESP(X?Y)` (request and response headers, pseudo-headers
//! `:method`, `:path`, `:authority`, `:scheme`; `Y` when `X` is absent), `RESPONSE_CODE`, `RESPONSE_FLAGS`,
//! `RESPONSE_CODE_DETAILS`, `CONNECTION_TERMINATION_DETAILS`, `UPSTREAM_TRANSPORT_FAILURE_REASON`,
//! `BYTES_RECEIVED`, `BYTES_SENT`, `DURATION`, `PROTOCOL`, `UPSTREAM_HOST`, `UPSTREAM_CLUSTER`,
//! `UPSTREAM_CLUSTER_RAW`, `UPSTREAM_LOCAL_ADDRESS`, `DOWNSTREAM_LOCAL_ADDRESS` and `DOWNSTREAM_REMOTE_ADDRESS`
//! (each also `_WITHOUT_PORT`), `DOWNSTREAM_DIRECT_REMOTE_ADDRESS`, `REQUESTED_SERVER_NAME`, `ROUTE_NAME`,
//! `DOWNSTREAM_PEER_URI_SAN`, `HOSTNAME`. Anything else is refused with its position, as Envoy refuses it.

use std::{
    fmt::Write,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

/// A parsed format string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Operator { operator: Operator, max_len: Option<usize> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Operator {
    StartTime(Option<Vec<TimePart>>),
    Request(String, Option<String>),
    Response(String, Option<String>),
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress(bool),
    DownstreamLocalAddress(bool),
    DownstreamRemoteAddress(bool),
    RequestedServerName,
    RouteName,
    DownstreamPeerUriSan,
    Hostname,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TimePart {
    Literal(String),
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    EpochSeconds,
    Offset,
    Zone,
    Fraction(u32),
}

/// A format string Sluice cannot render: what and where (a byte offset into the string).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at position {position}")]
pub struct FormatError {
    pub position: usize,
    pub reason: String,
}

/// An entry's headers, by lowercase name.
pub trait Headers {
    /// A request header, pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`) included.
    fn request(&self, name: &str) -> Option<&str>;
    fn response(&self, name: &str) -> Option<&str>;
    /// Every request header kept (not the pseudo-headers), for expressions that read them all.
    fn request_headers(&self) -> Vec<(&str, &str)> {
        Vec::new()
    }

    /// Every response header kept, for expressions that read `response.headers`.
    fn response_headers(&self) -> Vec<(&str, &str)> {
        Vec::new()
    }
}

/// What an entry offers to the operators. Absent values render as `-`.
#[derive(Clone, Copy, Default)]
pub struct Fields<'a> {
    pub start: Option<SystemTime>,
    pub headers: Option<&'a dyn Headers>,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub response_code_details: Option<&'a str>,
    /// Why a connection was closed for L4 reasons (a network RBAC denial's `rbac_access_denied_matched_policy[…]`).
    pub connection_termination_details: Option<&'a str>,
    pub upstream_transport_failure_reason: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// The upstream's time to the response's head (`x-envoy-upstream-service-time`).
    pub upstream_service_time: Option<Duration>,
    pub protocol: Option<&'a str>,
    pub upstream_host: Option<SocketAddr>,
    /// Written out where it is shown (a cluster's name is made of its parts; a line need not allocate it).
    pub upstream_cluster: Option<&'a dyn std::fmt::Display>,
    pub upstream_local: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub server_name: Option<&'a str>,
    pub route_name: Option<&'a dyn std::fmt::Display>,
    pub peer_uri_san: Option<&'a str>,
}

/// Istio's default text format (the mesh config's `accessLogFormat` when empty, TEXT encoding).
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \
\"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% \
%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

impl Format {
    pub fn parse(text: &str) -> Result<Format, FormatError> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('%') {
            literal.push_str(&rest[..at]);
            let position = text.len() - rest.len() + at;
            let after = &rest[at + 1..];
            let Some(end) = after.find('%') else {
                return Err(FormatError { position, reason: "a '%' opens no command operator".into() });
            };
            let command = &after[..end];
            if command.is_empty() {
                return Err(FormatError { position, reason: "'%%' names no command operator".into() });
            }
            // START_TIME's own format may hold '%': its operator ends at the ')%' closing its argument.
            let (command, consumed) = match command.strip_prefix("START_TIME(") {
                Some(_) => {
                    let close = after
                        .find(")%")
                        .ok_or_else(|| FormatError { position, reason: "START_TIME( is not closed by ')%'".into() })?;
                    (&after[..=close], close + 2)
                }
                None => (command, end + 1),
            };
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            segments.push(operator(command, position)?);
            rest = &after[consumed..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Format { segments })
    }

    /// The request headers the format reads that an entry must keep (lowercase, pseudo-headers left out).
    pub fn request_headers(&self) -> Vec<String> {
        self.headers(false)
    }

    /// The response headers the format reads that an entry must keep (lowercase).
    pub fn response_headers(&self) -> Vec<String> {
        self.headers(true)
    }

    fn headers(&self, response: bool) -> Vec<String> {
        let mut names = Vec::new();
        for segment in &self.segments {
            let (name, alternative) = match segment {
                Segment::Operator { operator: Operator::Request(name, alternative), .. } if !response => {
                    (name, alternative)
                }
                Segment::Operator { operator: Operator::Response(name, alternative), .. } if response => {
                    (name, alternative)
                }
                _ => continue,
            };
            names.extend([Some(name), alternative.as_ref()].into_iter().flatten().cloned());
        }
        names.retain(|name| !name.starts_with(':'));
        names.sort();
        names.dedup();
        names
    }

    /// Whether the whole format is one operator whose value is a number (JSON writes it unquoted).
    pub fn is_number(&self) -> bool {
        matches!(
            self.segments.as_slice(),
            [Segment::Operator {
                operator: Operator::ResponseCode | Operator::BytesReceived | Operator::BytesSent | Operator::Duration,
                max_len: None
            }]
        )
    }

    /// Whether the whole format is `%RESPONSE_FLAGS%`, whose `-` (no flag) is a value: JSON writes it `"-"`, as
    /// Envoy does, where an absent value is `null`.
    pub fn dash_is_a_value(&self) -> bool {
        matches!(self.segments.as_slice(), [Segment::Operator { operator: Operator::ResponseFlags, .. }])
    }

    /// Appends the entry's rendering to `out`.
    pub fn render(&self, fields: &Fields<'_>, out: &mut String) {
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Operator { operator, max_len } => {
                    let start = out.len();
                    render(operator, fields, out);
                    if out.len() == start {
                        out.push('-');
                    } else if let Some(max_len) = max_len {
                        truncate(out, start, *max_len);
                    }
                }
            }
        }
    }

    /// The rendering on its own.
    pub fn to_line(&self, fields: &Fields<'_>) -> String {
        // Istio's default line is 300–400 bytes: room for it at once, rather than a copy as it grows.
        let mut out = String::with_capacity(512);
        self.render(fields, &mut out);
        out
    }
}

/// Cuts `out[start..]` to `max_len` characters.
fn truncate(out: &mut String, start: usize, max_len: usize) {
    if let Some((cut, _)) = out[start..].char_indices().nth(max_len) {
        out.truncate(start + cut);
    }
}

fn operator(command: &str, position: usize) -> Result<Segment, FormatError> {
    let fail = |reason: String| FormatError { position, reason };
    // `NAME(ARGS):MAX`: the length limit follows the closing parenthesis (or the name).
    let (body, max_len) = match command.rfind(':') {
        Some(colon) if !command[colon..].contains(')') && command[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            let digits = &command[colon + 1..];
            let max_len = digits.parse::<usize>().map_err(|_| fail(format!("'{digits}' is not a length")))?;
            (&command[..colon], Some(max_len))
        }
        _ => (command, None),
    };
    let (name, argument) = match body.find('(') {
        Some(open) => {
            let argument = body[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| fail(format!("%{command}%: the argument is not closed by ')'")))?;
            (&body[..open], Some(argument))
        }
        None => (body, None),
    };
    let headers = |argument: Option<&str>| -> Result<(String, Option<String>), FormatError> {
        let argument = argument.filter(|a| !a.is_empty()).ok_or_else(|| fail(format!("%{name}% needs a header")))?;
        let (main, alternative) = match argument.split_once('?') {
            Some((main, alternative)) => (main, Some(alternative.to_ascii_lowercase())),
            None => (argument, None),
        };
        Ok((main.to_ascii_lowercase(), alternative))
    };
    let no_argument = |operator: Operator| match argument {
        None => Ok(operator),
        Some(_) => Err(fail(format!("%{name}% takes no argument"))),
    };
    let operator = match name {
        "START_TIME" => Operator::StartTime(argument.map(|format| time_format(format, position)).transpose()?),
        "REQ" => headers(argument).map(|(main, alternative)| Operator::Request(main, alternative))?,
        "RESP" => headers(argument).map(|(main, alternative)| Operator::Response(main, alternative))?,
        "RESPONSE_CODE" => no_argument(Operator::ResponseCode)?,
        "RESPONSE_FLAGS" => no_argument(Operator::ResponseFlags)?,
        "RESPONSE_CODE_DETAILS" => no_argument(Operator::ResponseCodeDetails)?,
        "CONNECTION_TERMINATION_DETAILS" => no_argument(Operator::ConnectionTerminationDetails)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_argument(Operator::UpstreamTransportFailureReason)?,
        "BYTES_RECEIVED" => no_argument(Operator::BytesReceived)?,
        "BYTES_SENT" => no_argument(Operator::BytesSent)?,
        "DURATION" => no_argument(Operator::Duration)?,
        "PROTOCOL" => no_argument(Operator::Protocol)?,
        "UPSTREAM_HOST" => no_argument(Operator::UpstreamHost)?,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => no_argument(Operator::UpstreamCluster)?,
        "UPSTREAM_LOCAL_ADDRESS" => no_argument(Operator::UpstreamLocalAddress(true))?,
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_argument(Operator::UpstreamLocalAddress(false))?,
        "DOWNSTREAM_LOCAL_ADDRESS" => no_argument(Operator::DownstreamLocalAddress(true))?,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_argument(Operator::DownstreamLocalAddress(false))?,
        // No proxy protocol or XFF trust: the direct peer is the remote address.
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_argument(Operator::DownstreamRemoteAddress(true))?
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_argument(Operator::DownstreamRemoteAddress(false))?
        }
        "REQUESTED_SERVER_NAME" => no_argument(Operator::RequestedServerName)?,
        "ROUTE_NAME" => no_argument(Operator::RouteName)?,
        "DOWNSTREAM_PEER_URI_SAN" => no_argument(Operator::DownstreamPeerUriSan)?,
        "HOSTNAME" => no_argument(Operator::Hostname)?,
        _ => return Err(fail(format!("%{name}% is not a command operator Sluice supports"))),
    };
    Ok(Segment::Operator { operator, max_len })
}

fn time_format(format: &str, position: usize) -> Result<Vec<TimePart>, FormatError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            literal.push(c);
            continue;
        }
        let mut spec = chars.next().unwrap_or(' ');
        let mut digits = None;
        if spec.is_ascii_digit() {
            digits = spec.to_digit(10);
            spec = chars.next().unwrap_or(' ');
        }
        let part = match (spec, digits) {
            ('%', None) => {
                literal.push('%');
                continue;
            }
            ('f', digits) => TimePart::Fraction(digits.unwrap_or(9).clamp(1, 9)),
            ('Y', None) => TimePart::Year,
            ('m', None) => TimePart::Month,
            ('d', None) => TimePart::Day,
            ('H', None) => TimePart::Hour,
            ('M', None) => TimePart::Minute,
            ('S', None) => TimePart::Second,
            ('s', None) => TimePart::EpochSeconds,
            ('z', None) => TimePart::Offset,
            ('Z', None) => TimePart::Zone,
            _ => {
                return Err(FormatError {
                    position,
                    reason: format!("START_TIME: '%{spec}' is not a time field Sluice supports"),
                })
            }
        };
        if !literal.is_empty() {
            parts.push(TimePart::Literal(std::mem::take(&mut literal)));
        }
        parts.push(part);
    }
    if !literal.is_empty() {
        parts.push(TimePart::Literal(literal));
    }
    Ok(parts)
}

fn render(operator: &Operator, fields: &Fields<'_>, out: &mut String) {
    let text = |out: &mut String, value: Option<&str>| {
        if let Some(value) = value.filter(|value| !value.is_empty()) {
            out.push_str(value);
        }
    };
    let shown = |out: &mut String, value: Option<&dyn std::fmt::Display>| {
        if let Some(value) = value {
            let _ = write!(out, "{value}");
        }
    };
    let address = |out: &mut String, address: Option<SocketAddr>, with_port: bool| match address {
        // IPv4, the common case, octet by octet: `Display` for addresses pads through a buffer of its own.
        Some(SocketAddr::V4(address)) => {
            for (i, octet) in address.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                number(out, u64::from(octet));
            }
            if with_port {
                out.push(':');
                number(out, u64::from(address.port()));
            }
        }
        Some(address) if with_port => {
            let _ = write!(out, "{address}");
        }
        Some(address) => {
            let _ = write!(out, "{}", address.ip());
        }
        None => {}
    };

    match operator {
        Operator::StartTime(format) => {
            if let Some(start) = fields.start {
                match format {
                    None => super::super::requests::write_rfc3339_millis(start, out),
                    Some(parts) => render_time(start, parts, out),
                }
            }
        }
        Operator::Request(name, alternative) => {
            let value = fields.headers.and_then(|headers| {
                headers.request(name).or_else(|| alternative.as_deref().and_then(|name| headers.request(name)))
            });
            text(out, value)
        }
        // The upstream's time, kept as a duration: written as a number, not made a header's text first.
        Operator::Response(name, _) if name == SERVICE_TIME && fields.upstream_service_time.is_some() => {
            number(out, fields.upstream_service_time.map_or(0, |time| time.as_millis() as u64));
        }
        Operator::Response(name, alternative) => {
            let value = fields.headers.and_then(|headers| {
                headers.response(name).or_else(|| alternative.as_deref().and_then(|name| headers.response(name)))
            });
            text(out, value)
        }
        Operator::ResponseCode => number(out, u64::from(fields.response_code)),
        Operator::ResponseFlags => text(out, Some(fields.response_flags)),
        Operator::ResponseCodeDetails => text(out, fields.response_code_details),
        Operator::ConnectionTerminationDetails => text(out, fields.connection_termination_details),
        Operator::UpstreamTransportFailureReason => text(out, fields.upstream_transport_failure_reason),
        Operator::BytesReceived => number(out, fields.bytes_received),
        Operator::BytesSent => number(out, fields.bytes_sent),
        Operator::Duration => number(out, fields.duration.as_millis() as u64),
        Operator::Protocol => text(out, fields.protocol),
        Operator::UpstreamHost => address(out, fields.upstream_host, true),
        Operator::UpstreamCluster => shown(out, fields.upstream_cluster),
        Operator::UpstreamLocalAddress(port) => address(out, fields.upstream_local, *port),
        Operator::DownstreamLocalAddress(port) => address(out, fields.downstream_local, *port),
        Operator::DownstreamRemoteAddress(port) => address(out, fields.downstream_remote, *port),
        Operator::RequestedServerName => text(out, fields.server_name),
        Operator::RouteName => shown(out, fields.route_name),
        Operator::DownstreamPeerUriSan => text(out, fields.peer_uri_san),
        Operator::Hostname => text(out, Some(hostname())),
    }
}

/// `value` in decimal, without the formatting machinery.
fn number(out: &mut String, value: u64) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// The response header Envoy adds with the upstream's time.
const SERVICE_TIME: &str = "x-envoy-upstream-service-time";

fn hostname() -> &'static str {
    static NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_owned()).unwrap_or_default()
    });
    &NAME
}

/// `start` in UTC by `parts`.
fn render_time(start: SystemTime, parts: &[TimePart], out: &mut String) {
    let since = start.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (year, month, day) = civil_date(since.as_secs() / 86_400);
    let rest = since.as_secs() % 86_400;
    for part in parts {
        let _ = match part {
            TimePart::Literal(text) => out.write_str(text),
            TimePart::Year => write!(out, "{year:04}"),
            TimePart::Month => write!(out, "{month:02}"),
            TimePart::Day => write!(out, "{day:02}"),
            TimePart::Hour => write!(out, "{:02}", rest / 3600),
            TimePart::Minute => write!(out, "{:02}", rest % 3600 / 60),
            TimePart::Second => write!(out, "{:02}", rest % 60),
            TimePart::EpochSeconds => write!(out, "{}", since.as_secs()),
            TimePart::Offset => out.write_str("+0000"),
            TimePart::Zone => out.write_str("UTC"),
            TimePart::Fraction(digits) => {
                let nanos = since.subsec_nanos() / 10u32.pow(9 - digits);
                write!(out, "{nanos:0width$}", width = *digits as usize)
            }
        };
    }
}

/// (year, month, day) of the day `days` after 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_date(days: u64) -> (i64, i64, i64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests;
