//! Decoding a chunked response body (RFC 9112 §7.1) from the bytes read so far, by the rules hyper's decoder
//! keeps: hex sizes that fit 64 bits, whitespace only before an extension, extensions (ignored) without a bare
//! LF and at most 16 KiB in all, CRLF everywhere, trailers at most 16 KiB and 100 fields.

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

use super::head::MAX_RESPONSE_HEADERS;

/// The most bytes of chunk extensions, and of trailers, a body may carry.
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
const TRAILERS_LIMIT: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeWhitespace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    End,
}

/// Where a chunked body is in its decoding.
#[derive(Debug)]
pub(super) struct Chunked {
    state: State,
    /// What is left of the chunk being read (its size while the size is read).
    remaining: u64,
    extension_bytes: u64,
    trailers: Option<BytesMut>,
    trailer_count: usize,
}

/// What the bytes available gave.
#[derive(Debug)]
pub(super) enum Step {
    Data(Bytes),
    /// The body's end, with its trailers if it had any.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

/// Why a chunked body was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid chunked body: {0}")]
pub(crate) struct ChunkError(&'static str);

impl Chunked {
    pub(super) fn new() -> Chunked {
        Chunked { state: State::Start, remaining: 0, extension_bytes: 0, trailers: None, trailer_count: 0 }
    }

    /// Takes from `buffer` what it can: a piece of a chunk's data, or the end; `More` when `buffer` ran out
    /// first.
    pub(super) fn step(&mut self, buffer: &mut BytesMut) -> Result<Step, ChunkError> {
        loop {
            if self.state == State::End {
                return Ok(Step::End(None));
            }
            if self.state == State::Data {
                if buffer.is_empty() {
                    return Ok(Step::More);
                }
                let take = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(buffer.len());
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Step::Data(buffer.split_to(take).freeze()));
            }
            let Some(&byte) = buffer.first() else { return Ok(Step::More) };
            buffer.advance(1);
            self.state = self.next(byte)?;
            if self.state == State::End {
                let trailers = self.trailers.take().map(|lines| parse_trailers(&lines, self.trailer_count));
                return trailers.transpose().map(Step::End);
            }
        }
    }

    /// The state after `byte`.
    fn next(&mut self, byte: u8) -> Result<State, ChunkError> {
        Ok(match (self.state, byte) {
            (State::Start | State::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                let digit = (byte as char).to_digit(16).unwrap_or_default();
                self.remaining = self
                    .remaining
                    .checked_mul(16)
                    .and_then(|size| size.checked_add(u64::from(digit)))
                    .ok_or(ChunkError("chunk size overflows"))?;
                State::Size
            }
            (State::Start, _) => return Err(ChunkError("missing chunk size")),
            (State::Size | State::SizeWhitespace, b'\t' | b' ') => State::SizeWhitespace,
            (State::Size | State::SizeWhitespace, b';') => State::Extension,
            (State::Size | State::SizeWhitespace | State::Extension, b'\r') => State::SizeLf,
            (State::Size, _) => return Err(ChunkError("invalid chunk size")),
            (State::SizeWhitespace, _) => return Err(ChunkError("invalid whitespace after the chunk size")),
            (State::Extension, b'\n') => return Err(ChunkError("chunk extension with a bare LF")),
            (State::Extension, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes >= EXTENSIONS_LIMIT {
                    return Err(ChunkError("chunk extensions over 16 KiB"));
                }
                State::Extension
            }
            (State::SizeLf, b'\n') if self.remaining == 0 => State::EndCr,
            (State::SizeLf, b'\n') => State::Data,
            (State::SizeLf, _) => return Err(ChunkError("chunk size line without LF")),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataCr, _) => return Err(ChunkError("chunk data without CR")),
            (State::DataLf, b'\n') => State::Start,
            (State::DataLf, _) => return Err(ChunkError("chunk data without LF")),
            (State::EndCr, b'\r') => {
                self.keep_trailer_byte(byte)?;
                State::EndLf
            }
            (State::EndCr, _) => {
                self.trailers.get_or_insert_with(|| BytesMut::with_capacity(64));
                self.keep_trailer_byte(byte)?;
                State::Trailer
            }
            (State::Trailer, _) => {
                self.keep_trailer_byte(byte)?;
                if byte == b'\r' {
                    State::TrailerLf
                } else {
                    State::Trailer
                }
            }
            (State::TrailerLf, b'\n') => {
                if self.trailer_count >= MAX_RESPONSE_HEADERS {
                    return Err(ChunkError("more than 100 trailers"));
                }
                self.trailer_count += 1;
                self.keep_trailer_byte(byte)?;
                State::EndCr
            }
            (State::TrailerLf, _) => return Err(ChunkError("trailer without LF")),
            (State::EndLf, b'\n') => {
                self.keep_trailer_byte(byte)?;
                State::End
            }
            (State::EndLf, _) => return Err(ChunkError("last chunk without LF")),
            (State::Data | State::End, _) => unreachable!("data and the end are not read byte by byte"),
        })
    }

    fn keep_trailer_byte(&mut self, byte: u8) -> Result<(), ChunkError> {
        if let Some(trailers) = &mut self.trailers {
            if trailers.len() >= TRAILERS_LIMIT {
                return Err(ChunkError("trailers over 16 KiB"));
            }
            trailers.extend_from_slice(&[byte]);
        }
        Ok(())
    }
}

/// The trailer fields in `lines` (each ending in CRLF, then an empty line).
fn parse_trailers(lines: &[u8], count: usize) -> Result<HeaderMap, ChunkError> {
    let mut fields = vec![httparse::EMPTY_HEADER; count];
    match httparse::parse_headers(lines, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields.iter() {
                let name = http::HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| ChunkError("invalid trailer name"))?;
                let value =
                    http::HeaderValue::from_bytes(field.value).map_err(|_| ChunkError("invalid trailer value"))?;
                trailers.append(name, value);
            }
            Ok(trailers)
        }
        Ok(httparse::Status::Partial) => Err(ChunkError("incomplete trailers")),
        Err(_) => Err(ChunkError("invalid trailers")),
    }
}
