//! HTTP/1.1 message heads on an upstream connection: the request's written, with its body's framing; the
//! response's parsed with httparse under the rules hyper's client applies (nothing lenient: no obs-fold, no
//! space before a colon, no invalid header), and its body's framing decided as RFC 9112 §6.3 says.

use bytes::{Bytes, BytesMut};
use http::{header, response, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Envoy's default limits on a response's headers: 60 KiB (the status line included) and 100 headers.
pub(crate) const MAX_RESPONSE_HEAD_BYTES: usize = 60 * 1024;
pub(super) const MAX_RESPONSE_HEADERS: usize = 100;

/// What the request body is known to be before a byte of it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyShape {
    /// Nothing at all.
    Empty,
    /// Exactly this many bytes.
    Known(u64),
    /// Bytes still to come, how many unknown.
    Unknown,
}

/// How a request body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestFraming {
    /// `Content-Length` bytes (0: none).
    Length(u64),
    Chunked,
}

/// Writes the request head (origin-form `path`) into `out`, making the headers say how the body is framed as
/// hyper's client does: a body known empty sends none; `Transfer-Encoding` (a client's is hop-by-hop and gone by
/// now) is made to end in `chunked`; else a valid `Content-Length` is kept; a body of unknown length is chunked;
/// a known one gets its `Content-Length`.
pub(super) fn write_request(
    method: &Method,
    path: &str,
    headers: &mut HeaderMap,
    body: BodyShape,
    out: &mut Vec<u8>,
) -> RequestFraming {
    let framing = match body {
        BodyShape::Empty => {
            headers.remove(header::TRANSFER_ENCODING);
            RequestFraming::Length(0)
        }
        _ if headers.contains_key(header::TRANSFER_ENCODING) => {
            headers.remove(header::CONTENT_LENGTH);
            if !super::framing::is_chunked(headers) {
                headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
            RequestFraming::Chunked
        }
        shape => match (super::framing::content_length(headers), shape) {
            (Some(Ok(length)), _) => RequestFraming::Length(length),
            (_, BodyShape::Known(length)) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                RequestFraming::Length(length)
            }
            _ => {
                headers.remove(header::CONTENT_LENGTH);
                headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                RequestFraming::Chunked
            }
        },
    };
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if path.is_empty() { b"/" } else { path.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// This many bytes (0: no body — HEAD, 204, 304).
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (which then cannot be reused).
    UntilClose,
}

/// A final response's head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) parts: response::Parts,
    pub(crate) framing: ResponseFraming,
    /// Whether the connection may carry another exchange after this one (HTTP/1.1 without `Connection:
    /// close`, or HTTP/1.0 with `keep-alive`).
    pub(crate) keep_alive: bool,
}

/// Why a response head was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("invalid response head: {0}")]
    Invalid(httparse::Error),
    #[error("response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("invalid response status {0}")]
    Status(u16),
    #[error("invalid response header {0:?}")]
    Header(String),
    #[error("HTTP/1.0 response with Transfer-Encoding")]
    TransferEncodingInHttp10,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("101 Switching Protocols to a request that asked no upgrade")]
    UnaskedSwitch,
}

/// The response head at the start of `buffer`, taken out of it, informational (1xx) responses skipped;
/// `Ok(None)` while more bytes are needed. `method` is the request's (a HEAD response has no body).
pub(crate) fn read_response(buffer: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, HeadError> {
    loop {
        if buffer.is_empty() {
            return Ok(None);
        }
        // Where each header lies in `buffer` (a head is at most 60 KiB), kept past httparse's borrow of it.
        let mut lines = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
        let (length, code, reason, version, count) = {
            // httparse fills what it finds: the room for 100 headers is not cleared first for every response.
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let bytes: &[u8] = buffer;
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                bytes,
                &mut headers,
            );
            let length = match parsed {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) if bytes.len() >= MAX_RESPONSE_HEAD_BYTES => {
                    return Err(HeadError::TooLarge)
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(error) => return Err(HeadError::Invalid(error)),
            };
            if length > MAX_RESPONSE_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            // httparse's slices lie within the head; an empty one anywhere else is taken as at its start.
            let offset = |part: &[u8]| {
                (part.as_ptr() as usize).checked_sub(bytes.as_ptr() as usize).filter(|&at| at <= length).unwrap_or(0)
            };
            let at = |start: usize, len: usize| (start as u32, (start + len) as u32);
            for (line, header) in lines.iter_mut().zip(response.headers.iter()) {
                let (name_start, name_end) = at(offset(header.name.as_bytes()), header.name.len());
                let (value_start, value_end) = at(offset(header.value), header.value.len());
                *line = (name_start, name_end, value_start, value_end);
            }
            let reason = match response.reason {
                Some(reason) if !reason.is_empty() => (offset(reason.as_bytes()), reason.len()),
                _ => (0, 0),
            };
            (length, response.code.unwrap_or_default(), reason, response.version, response.headers.len())
        };
        let head = buffer.split_to(length).freeze();
        let status = StatusCode::from_u16(code).map_err(|_| HeadError::Status(code))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(HeadError::UnaskedSwitch);
        }
        if status.is_informational() {
            continue;
        }
        let version = if version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
        let mut keep_alive = version == Version::HTTP_11;
        let mut asked_close = false;
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, value_start, value_end) in &lines[..count] {
            let (name_start, name_end) = (name_start as usize, name_end as usize);
            let (value_start, value_end) = (value_start as usize, value_end as usize);
            let name = HeaderName::from_bytes(&head[name_start..name_end])
                .map_err(|_| HeadError::Header(String::from_utf8_lossy(&head[name_start..name_end]).into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
                .map_err(|_| HeadError::Header(name.to_string()))?;
            // Once any Connection line asks to close, a later `keep-alive` does not undo it.
            if name == header::CONNECTION {
                if asked_close || super::framing::lists(&value, "close") {
                    asked_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = super::framing::lists(&value, "keep-alive");
                }
            }
            headers.append(name, value);
        }
        let framing = framing(status, version, &headers, method)?;
        // A length beside Transfer-Encoding is not the body's: it goes no further (RFC 9112 §6.3), so that no
        // client reads the body by it.
        if framing != ResponseFraming::Length(0) && headers.contains_key(header::TRANSFER_ENCODING) {
            headers.remove(header::CONTENT_LENGTH);
        }
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        let reason = &head[reason.0..reason.0 + reason.1];
        if Some(reason) != status.canonical_reason().map(str::as_bytes) {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(Bytes::copy_from_slice(reason)) {
                parts.extensions.insert(reason);
            }
        }
        return Ok(Some(ResponseHead { parts, framing, keep_alive }));
    }
}

/// How the body of a final response is delimited (RFC 9112 §6.3, as hyper's client decides it).
fn framing(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    method: &Method,
) -> Result<ResponseFraming, HeadError> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED || method == Method::HEAD {
        return Ok(ResponseFraming::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(HeadError::TransferEncodingInHttp10);
        }
        // A Transfer-Encoding that does not end in chunked delimits the body by the connection's end.
        return Ok(if super::framing::is_chunked(headers) {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::UntilClose
        });
    }
    match super::framing::content_length(headers) {
        // The largest lengths are refused, as hyper refuses them.
        Some(Ok(length)) if length < u64::MAX - 1 => Ok(ResponseFraming::Length(length)),
        Some(_) => Err(HeadError::ContentLength),
        None => Ok(ResponseFraming::UntilClose),
    }
}
