//! HTTP header names and values in VirtualServices, as Istio checks them: what a match may test, what a route
//! may set or remove (not `Host` or pseudo-headers, except the authority on requests), and values Envoy's
//! header formatter accepts (`%VAR%` closed, `%%` for a literal `%`, no control characters).

use super::{error::FieldError, fields::HeaderOperations};

/// A header name a match tests: letters, digits, `-` and `_` (either case: names are matched without regard to
/// it), or a JWT claim (`@request.auth.claims.…`), which only gateways route on.
pub fn match_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a header name may not be empty".into());
    }
    if is_jwt_claim(name) {
        return None;
    }
    (!is_token(name)).then(|| format!("'{name}' is not a header name (letters, digits, '-' and '_')"))
}

pub fn is_jwt_claim(name: &str) -> bool {
    name.starts_with("@request.auth.claims.") || name.starts_with("@request.auth.claims[")
}

fn is_token(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A CORS header name: a header name or `*`.
pub fn cors_name_problem(name: &str) -> Option<String> {
    if name == "*" {
        return None;
    }
    if name.is_empty() || !is_token(name) {
        return Some(format!("'{name}' is not a header name (letters, digits, '-' and '_', or '*')"));
    }
    None
}

/// Whether `name` is the request's authority (`:authority` or `Host`), which a route may set on requests.
pub fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

/// Which headers an operation applies to: requests may have their authority set; responses may not, and
/// nothing may remove it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Istio's checks of a `headers.request` or `headers.response` block at `path`.
pub fn validate_operations(
    operations: &HeaderOperations,
    direction: Direction,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    for (field, pairs) in [("set", &operations.set), ("add", &operations.add)] {
        for (name, value) in pairs {
            let path = format!("{path}.{field}.{name}");
            let authority_allowed = direction == Direction::Request && is_authority(name);
            if let Some(reason) = operation_name_problem(name, authority_allowed) {
                errors.push(FieldError::new(&path, reason));
            }
            if let Some(reason) = value_problem(value) {
                errors.push(FieldError::new(path, reason));
            }
        }
    }
    for (i, name) in operations.remove.iter().enumerate() {
        if let Some(reason) = operation_name_problem(name, false) {
            errors.push(FieldError::new(format!("{path}.remove[{i}]"), reason));
        }
    }
}

fn operation_name_problem(name: &str, authority_allowed: bool) -> Option<String> {
    if name.is_empty() {
        return Some("a header name may not be empty".into());
    }
    if authority_allowed {
        return None;
    }
    if name.eq_ignore_ascii_case("host") {
        return Some(
            "the Host header may not be changed here (rewrite.authority or a request 'set' changes it)".into(),
        );
    }
    name.starts_with(':').then(|| format!("'{name}': pseudo-headers (':' names) may not be changed"))
}

/// Why Envoy's header formatter would refuse `value`, if it would (a port of its parser's states).
pub fn value_problem(value: &str) -> Option<String> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Some(format!("{value:?}: a header value may not hold control characters"));
    }
    #[derive(PartialEq)]
    enum State {
        Literal,
        Name,
        ExpectArray,
        ExpectString,
        InString,
        ExpectDelimiterOrEnd,
        ExpectArgsEnd,
        ExpectVariableEnd,
    }
    let bytes = value.as_bytes();
    let mut state = State::Literal;
    let mut pos = 0;
    while pos < bytes.len() {
        let c = bytes[pos];
        let next = bytes.get(pos + 1).copied();
        match state {
            State::Literal if c == b'%' => match next {
                None => return Some(format!("'{value}': a lone '%' (write '%%' for a literal one)")),
                Some(b'%') => pos += 1,
                Some(_) => state = State::Name,
            },
            State::Literal => {}
            State::Name if c == b'%' => state = State::Literal,
            State::Name if c == b'(' => state = State::ExpectArray,
            State::Name => {}
            State::ExpectArray if c == b'[' => state = State::ExpectString,
            State::ExpectArray if c != b' ' => state = State::InString,
            State::ExpectArray => {}
            State::ExpectDelimiterOrEnd if c == b',' => state = State::ExpectString,
            State::ExpectDelimiterOrEnd if c == b']' => state = State::ExpectArgsEnd,
            State::ExpectDelimiterOrEnd if c != b' ' => {
                return Some(format!("'{value}': expected ',' or ']' in a %VARIABLE(…)% argument list"))
            }
            State::ExpectDelimiterOrEnd => {}
            State::ExpectString if c == b'"' => state = State::InString,
            State::ExpectString if c != b' ' => {
                return Some(format!("'{value}': expected '\"' in a %VARIABLE(…)% argument list"))
            }
            State::ExpectString => {}
            State::InString if c == b'\\' => {
                if next.is_none() {
                    return Some(format!("'{value}': an unterminated backslash in a %VARIABLE(…)% argument"));
                }
                pos += 1;
            }
            State::InString if c == b')' => state = State::ExpectVariableEnd,
            State::InString if c == b'"' => state = State::ExpectDelimiterOrEnd,
            State::InString => {}
            State::ExpectArgsEnd if c == b')' => state = State::ExpectVariableEnd,
            State::ExpectArgsEnd if c != b' ' => return Some(format!("'{value}': expected ')' after the arguments")),
            State::ExpectArgsEnd => {}
            State::ExpectVariableEnd if c == b'%' => state = State::Literal,
            State::ExpectVariableEnd if c != b' ' => {
                return Some(format!("'{value}': expected '%' to close the variable"))
            }
            State::ExpectVariableEnd => {}
        }
        pos += 1;
    }
    (state != State::Literal).then(|| format!("'{value}': an unterminated %VARIABLE% (write '%%' for a literal '%')"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_read_as_envoy_formats_them() {
        for value in [
            "foo",
            "%HOSTNAME%",
            "100%%",
            "prefix %HOSTNAME% suffix",
            "%REQ(x-a)%",
            r#"%PER_REQUEST_STATE(["a", "b"])%"#,
            "",
        ] {
            assert_eq!(value_problem(value), None, "{value}");
        }
        for value in ["abc%123", "%START_TIME%%", "50%", "a\nb", "%VAR(x"] {
            assert!(value_problem(value).is_some(), "{value}");
        }
    }

    #[test]
    fn names_a_route_may_touch() {
        assert_eq!(match_name_problem("X-User"), None, "either case: Istio accepts it");
        assert_eq!(match_name_problem("@request.auth.claims.group"), None);
        assert!(match_name_problem("x user").is_some());
        assert!(match_name_problem(":path").is_some());
        assert_eq!(operation_name_problem(":authority", true), None);
        assert!(operation_name_problem("Host", false).is_some());
        assert!(operation_name_problem(":path", false).is_some());
        assert_eq!(cors_name_problem("*"), None);
    }
}
