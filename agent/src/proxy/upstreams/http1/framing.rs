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
    // Each value (or list item) must say the length the first said.
    let mut agrees = |n: u64| *length.get_or_insert(n) == n;
    for value in values {
        // Most values are a number alone, read without splitting.
        let agreed = match digits(value.as_bytes()) {
            Some(n) => agrees(n),
            None => value
                .to_str()
                .is_ok_and(|line| line.split(',').all(|item| digits(item.trim().as_bytes()).is_some_and(&mut agrees))),
        };
        if !agreed {
            return Some(Err(()));
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
    // Most values are one token (`Connection: close`), compared without splitting.
    let bytes = value.as_bytes();
    if !bytes.contains(&b',') {
        return bytes.trim_ascii().eq_ignore_ascii_case(token.as_bytes());
    }
    value.to_str().is_ok_and(|line| line.split(',').any(|item| item.trim().eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(name.clone(), HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn a_content_length_is_one_length_however_it_is_written() {
        let length = |values: &[&'static str]| content_length(&headers(header::CONTENT_LENGTH, values));
        assert_eq!(length(&[]), None);
        assert_eq!(length(&["13"]), Some(Ok(13)));
        assert_eq!(length(&["0"]), Some(Ok(0)));
        assert_eq!(length(&["13", "13"]), Some(Ok(13)));
        assert_eq!(length(&["13, 13"]), Some(Ok(13)));
        assert_eq!(length(&["13 ,13", "13"]), Some(Ok(13)));
        for bad in
            [&["13", "14"][..], &["13, 14"], &["+13"], &["-1"], &["1x"], &[""], &["13,"], &["99999999999999999999"]]
        {
            assert_eq!(length(bad), Some(Err(())), "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_found_alone_or_in_a_list_in_any_case() {
        let listed = |value: &'static str, token| lists(&HeaderValue::from_static(value), token);
        assert!(listed("close", "close"));
        assert!(listed("Close", "close"));
        assert!(listed("keep-alive, Upgrade", "upgrade"));
        assert!(listed(" upgrade ,x", "upgrade"));
        assert!(!listed("closed", "close"));
        assert!(!listed("keep-alive", "close"));
        assert!(!listed("", "close"));
        assert!(listed(" close\t", "close"));
    }
}
