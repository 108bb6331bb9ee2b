//! The header values that decide how an HTTP/1.1 body is framed, read as hyper reads them.

use http::{header, HeaderMap, HeaderValue};

/// Whether the last `Transfer-Encoding` ends in `chunked` (it must be last, RFC 9112 §6.1).
pub(super) fn is_chunked(headers: &HeaderMap) -> bool {
    headers.get_all(header::TRANSFER_ENCODING).iter().next_back().is_some_and(|value| {
        value
            .to_str()
            .ok()
            .and_then(|line| line.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    })
}

/// The `Content-Length`: `None` without one; `Err` when a value is not digits, or values disagree (several
/// headers, or a list, that all say the same length are that length).
pub(super) fn content_length(headers: &HeaderMap) -> Option<Result<u64, ()>> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter().peekable();
    values.peek()?;
    let mut length = None;
    for value in values {
        let Ok(line) = value.to_str() else { return Some(Err(())) };
        for item in line.split(',') {
            let Some(n) = digits(item.trim().as_bytes()) else { return Some(Err(())) };
            match length {
                None => length = Some(n),
                Some(seen) if seen != n => return Some(Err(())),
                Some(_) => {}
            }
        }
    }
    length.map(Ok)
}

/// A decimal number without a sign (which `u64::from_str` would take), or `None` (empty, not digits, too large).
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Whether the comma-separated `value` lists `token` (any case).
pub(crate) fn lists(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|line| line.split(',').any(|item| item.trim().eq_ignore_ascii_case(token)))
}
