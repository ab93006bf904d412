//! The request path, normalized before anything looks at it (RFC 3986 §6.2.2), so that the
//! route a call is matched to, authenticated and limited for is the one the upstream serves:
//! a path the upstream would read differently from the edge (`/public/../admin`,
//! `/public/%2e%2e/admin`, `/%61dmin`, `/api//admin` beside an `/api` route) could otherwise
//! reach a protected route's upstream through a public route.
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other
//!   percent-encodings get upper-case hex digits;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4; `..` above the root stays at the root);
//! - runs of `/` become one (nginx's `merge_slashes`);
//! - a malformed percent-encoding (`%zz`, `%4`) or a raw backslash (Windows servers read it as
//!   `/`; valid URIs carry it as `%5C`) is refused;
//! - an encoded slash or backslash (`%2F`, `%5C`) is kept as it is, and reported: routes refuse
//!   it unless `routes[].allow_encoded_slashes` (an upstream that decodes it before its own
//!   routing would see other segments than the edge did).
//!
//! The normalized path is what is routed, forwarded, metered and logged. A path needing none of
//! this (the usual case) is only scanned once, without copying.

use std::borrow::Cow;

/// A path the edge refuses (400).
#[derive(Debug, PartialEq, Eq)]
pub enum BadPath {
    /// `%` not followed by two hex digits.
    Percent,
    /// A raw `\`.
    Backslash,
    /// The normalized path did not make a URI again (not expected: it only has characters
    /// the original had, or percent-encodings).
    Unusable,
}

impl BadPath {
    pub fn detail(&self) -> &'static str {
        match self {
            BadPath::Percent => "the path has a malformed percent-encoding (`%` must be followed by two hex digits)",
            BadPath::Backslash => "the path has a raw backslash (send it as %5C)",
            BadPath::Unusable => "the path cannot be normalized",
        }
    }
}

/// The normalized path, and whether it carries an encoded slash or backslash.
#[derive(Debug, PartialEq, Eq)]
pub struct Normalized<'a> {
    pub path: Cow<'a, str>,
    pub encoded_slash: bool,
}

/// Normalizes an origin-form path (one starting with `/`; others, like `*`, are returned as
/// they are).
pub fn normalize(path: &str) -> Result<Normalized<'_>, BadPath> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Ok(Normalized { path: Cow::Borrowed(path), encoded_slash: false });
    }
    // Fast path: nothing to decode, no dot segment, no empty segment.
    let mut plain = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' => plain = false,
            b'\\' => return Err(BadPath::Backslash),
            b'/' if i > 0 && bytes[i - 1] == b'/' => plain = false,
            b'.' if i > 0 && bytes[i - 1] == b'/' => {
                let rest = &bytes[i + 1..];
                if rest.is_empty() || rest[0] == b'/' || (rest[0] == b'.' && (rest.len() == 1 || rest[1] == b'/')) {
                    plain = false;
                }
            }
            _ => {}
        }
    }
    if plain {
        return Ok(Normalized { path: Cow::Borrowed(path), encoded_slash: false });
    }
    let (decoded, encoded_slash) = decode_unreserved(bytes)?;
    let normalized = remove_dot_segments(&decoded);
    // Percent-encodings that were already in normal form: the request stays as it is.
    let path = if normalized == path { Cow::Borrowed(path) } else { Cow::Owned(normalized) };
    Ok(Normalized { path, encoded_slash })
}

/// Normalizes `req`'s path in place (the query is kept as it is); `Ok(true)` when it has an
/// encoded slash or backslash.
pub fn normalize_request<B>(req: &mut http::Request<B>) -> Result<bool, BadPath> {
    let Normalized { path, encoded_slash } = normalize(req.uri().path())?;
    let Cow::Owned(path) = path else { return Ok(encoded_slash) };
    // Built beside the request's URI, which stays as it came if this fails (and is metered so).
    let mut parts = req.uri().clone().into_parts();
    let query = parts.path_and_query.as_ref().and_then(|pq| pq.query());
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).map_err(|_| BadPath::Unusable)?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| BadPath::Unusable)?;
    Ok(encoded_slash)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes percent-encoded unreserved characters, upper-cases the hex of the others; the path
/// stays ASCII (a decoded byte is unreserved, so ASCII).
fn decode_unreserved(bytes: &[u8]) -> Result<(String, bool), BadPath> {
    let mut out = String::with_capacity(bytes.len());
    let mut encoded_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(BadPath::Percent);
        };
        let c = hi << 4 | lo;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(c));
        } else {
            encoded_slash |= c == b'/' || c == b'\\';
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(hi)]));
            out.push(char::from(HEX[usize::from(lo)]));
        }
        i += 3;
    }
    Ok((out, encoded_slash))
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments dropped (merged slashes); a
/// trailing `/`, `/.` or `/..` leaves a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_are_normalized_like_the_upstream_would_read_them() {
        let cases: &[(&str, &str, bool)] = &[
            // Nothing to do: borrowed.
            ("/", "/", false),
            ("/v1/items/42", "/v1/items/42", false),
            ("/v1/items/", "/v1/items/", false),
            ("/a/.well-known/x", "/a/.well-known/x", false),
            ("/a/..b/c.", "/a/..b/c.", false),
            // Dot segments.
            ("/status/../echo/x", "/echo/x", false),
            ("/a/./b", "/a/b", false),
            ("/a/b/..", "/a/", false),
            ("/a/b/.", "/a/b/", false),
            ("/..", "/", false),
            ("/../../etc/passwd", "/etc/passwd", false),
            ("/.", "/", false),
            // Merged slashes.
            ("//echo/x", "/echo/x", false),
            ("/api//admin", "/api/admin", false),
            ("/a/b//", "/a/b/", false),
            ("/status//../echo", "/echo", false),
            // Percent-encodings: unreserved decoded (then dot segments removed), others upper case.
            ("/%65cho/x", "/echo/x", false),
            ("/status/%2e%2e/echo/x", "/echo/x", false),
            ("/status/%2E./echo", "/echo", false),
            ("/a/%7euser/%5f", "/a/~user/_", false),
            ("/a/b%20c/%c3%a9", "/a/b%20c/%C3%A9", false),
            // Encoded slashes and backslashes stay, reported.
            ("/status/..%2fecho/x", "/status/..%2Fecho/x", true),
            ("/repos/group%2Fproject/x", "/repos/group%2Fproject/x", true),
            ("/a/..%5Cb", "/a/..%5Cb", true),
            // Not origin form: as it is.
            ("*", "*", false),
        ];
        for (raw, want, slash) in cases {
            let got = normalize(raw).unwrap();
            assert_eq!((got.path.as_ref(), got.encoded_slash), (*want, *slash), "{raw}");
            if raw == want {
                assert!(matches!(got.path, Cow::Borrowed(_)), "{raw} copied");
            }
        }
    }

    #[test]
    fn the_request_keeps_its_query_and_authority() {
        let mut req = http::Request::get("http://api.example.com//a/./b/%7e?x=/../y&z=%2e").body(()).unwrap();
        assert_eq!(normalize_request(&mut req), Ok(false));
        assert_eq!(req.uri().to_string(), "http://api.example.com/a/b/~?x=/../y&z=%2e");
        let mut req = http::Request::get("/s/..%2Fa?q").body(()).unwrap();
        assert_eq!(normalize_request(&mut req), Ok(true));
        assert_eq!(req.uri().to_string(), "/s/..%2Fa?q");
    }

    #[test]
    fn malformed_paths_are_refused() {
        for raw in ["/a/%zz", "/a/%4", "/a%", "/a/%g1/b", "/%%41"] {
            assert_eq!(normalize(raw), Err(BadPath::Percent), "{raw}");
        }
        for raw in ["/status/..\\echo", "/a\\b"] {
            assert_eq!(normalize(raw), Err(BadPath::Backslash), "{raw}");
        }
    }
}
