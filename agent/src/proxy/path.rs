//! Request paths normalized as Istio has Envoy normalize them (the mesh config's `pathNormalization`), before
//! they are matched and forwarded: `/status/./418`, `//status/418` or `/%73tatus/418` would otherwise pass a
//! `uri` match they should meet, or skip one meant to stop them.
//!
//! `BASE` (Istio's default; Envoy's `normalize_path`, RFC 3986): percent-encoded unreserved characters are
//! decoded, other escapes written in upper case, backslashes made slashes, and `.`/`..` segments removed.
//! `MERGE_SLASHES` also merges runs of slashes; `DECODE_AND_MERGE_SLASHES` first decodes `%2F` and `%5C` as well.
//! `NONE` leaves paths as sent. The query is never changed.

use crate::config::mesh::PathNormalization;

/// A path with a `%` not followed by two hex digits: refused (400), as Envoy refuses it.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPath;

/// `path_and_query` normalized as `mode` says: `None` when it is already normal (most requests: nothing is
/// allocated for them).
pub fn normalize(path_and_query: &str, mode: PathNormalization) -> Result<Option<String>, InvalidPath> {
    // `OPTIONS *` names the server, not a path.
    if mode == PathNormalization::None || path_and_query == "*" {
        return Ok(None);
    }
    let (path, query) = match path_and_query.find('?') {
        Some(at) => path_and_query.split_at(at),
        None => (path_and_query, ""),
    };
    let merge = matches!(mode, PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes);
    if is_normal(path.as_bytes(), merge) {
        return Ok(None);
    }
    let decoded = decode(path.as_bytes(), mode == PathNormalization::DecodeAndMergeSlashes)?;
    let mut normal = remove_dot_segments(&decoded, merge);
    if normal.is_empty() {
        normal.push('/');
    }
    normal.push_str(query);
    Ok((normal != path_and_query).then_some(normal))
}

/// Whether `path` has nothing normalization changes: no escape, backslash, dot segment or (when merging)
/// repeated slash.
fn is_normal(path: &[u8], merge: bool) -> bool {
    let mut previous = b'/';
    for (i, &byte) in path.iter().enumerate() {
        match byte {
            b'%' | b'\\' => return false,
            b'.' if previous == b'/' => {
                let rest = &path[i..];
                if rest == b"." || rest == b".." || rest.starts_with(b"./") || rest.starts_with(b"../") {
                    return false;
                }
            }
            b'/' if merge && previous == b'/' && i > 0 => return false,
            _ => {}
        }
        previous = byte;
    }
    path.first() == Some(&b'/') || path.is_empty()
}

/// Decodes escapes of unreserved characters (and, with `slashes`, of `/` and `\`), upper-cases the others, and
/// turns backslashes into slashes.
fn decode(path: &[u8], slashes: bool) -> Result<String, InvalidPath> {
    let mut out = String::with_capacity(path.len() + 1);
    if path.first() != Some(&b'/') {
        out.push('/');
    }
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => {
                let hex =
                    path.get(i + 1..i + 3).filter(|hex| hex.iter().all(u8::is_ascii_hexdigit)).ok_or(InvalidPath)?;
                let value = (hex_value(hex[0]) << 4) | hex_value(hex[1]);
                match value {
                    b'/' | b'\\' if slashes => out.push('/'),
                    _ if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') => {
                        out.push(value as char)
                    }
                    _ => {
                        out.push('%');
                        out.push_str(&format!("{value:02X}"));
                    }
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // A run of plain bytes at once: the path came from a `&str`, so runs between ASCII bytes are UTF-8.
                let end = path[i..].iter().position(|&b| b == b'%' || b == b'\\').map_or(path.len(), |n| i + n);
                out.push_str(std::str::from_utf8(&path[i..end]).map_err(|_| InvalidPath)?);
                i = end;
            }
        }
    }
    Ok(out)
}

/// The value of one hex digit (checked by the caller).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        _ => (digit | 0x20) - b'a' + 10,
    }
}

/// RFC 3986 §5.2.4 over an absolute path (it starts with `/`), merging empty segments when `merge`.
fn remove_dot_segments(path: &str, merge: bool) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path[1..].split('/').collect();
    let last = parts.len() - 1;
    // Whether the path ends in a directory (`/`, `/.`, `/..`): its trailing slash stays.
    let mut trailing_slash = false;
    for (index, segment) in parts.into_iter().enumerate() {
        trailing_slash = false;
        match segment {
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            "" if merge && index != last => {}
            "" if index == last => trailing_slash = true,
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_envoy_normalizes_them_for_each_mode() {
        use PathNormalization::{Base, DecodeAndMergeSlashes, MergeSlashes};
        let cases = [
            (Base, "/status/418", None),
            (Base, "*", None),
            (Base, "/status/418?x=/./y", None),
            (Base, "/status/./418?x=/./y", Some("/status/418?x=/./y")),
            (Base, "/status/./418", Some("/status/418")),
            (Base, "/a/b/../../status/418", Some("/status/418")),
            (Base, "/../../status/418", Some("/status/418")),
            (Base, "/%73tatus/%34%31%38", Some("/status/418")),
            (Base, "/status/%2e/418", Some("/status/418")),
            (Base, "/status/%2E%2E/admin", Some("/admin")),
            (Base, "/a%2fb", Some("/a%2Fb")),
            (Base, "/a%2Fb", None),
            (Base, "/a\\status\\418", Some("/a/status/418")),
            (Base, "//status/418", None),
            (Base, "/dir/.", Some("/dir/")),
            (Base, "/dir/..", Some("/")),
            (Base, "/dir/", None),
            (Base, "/caf\u{e9}/./x", Some("/caf\u{e9}/x")),
            (MergeSlashes, "//status//418", Some("/status/418")),
            (MergeSlashes, "/status/418/", None),
            (MergeSlashes, "/a//./b//", Some("/a/b/")),
            (DecodeAndMergeSlashes, "/a%2Fb%2f%2fc", Some("/a/b/c")),
            (DecodeAndMergeSlashes, "/a%5Cstatus", Some("/a/status")),
            (PathNormalization::None, "/status/./418", None),
        ];
        for (mode, path, expected) in cases {
            assert_eq!(normalize(path, mode), Ok(expected.map(str::to_owned)), "{mode:?} {path}");
        }
    }

    #[test]
    fn a_broken_escape_is_refused() {
        for path in ["/a%", "/a%2", "/a%zz", "/a%2g/b"] {
            assert_eq!(normalize(path, PathNormalization::Base), Err(InvalidPath), "{path}");
        }
    }
}
