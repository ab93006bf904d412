//! Request framing checks that close request-smuggling gaps hyper's parser leaves open to a
//! proxy (RFC 9112 §6.1, §6.3): a request with both `Transfer-Encoding` and `Content-Length`,
//! several `Content-Length` fields, a transfer coding other than exactly `chunked`, or
//! `Transfer-Encoding` on HTTP/1.0 is answered 400 and its connection is closed, so nothing
//! that follows it on the connection is read as another request.
//!
//! The header limits (`edge.max_headers`, `edge.max_header_bytes`) are enforced here too, so a
//! 431 is a metered call like any other refusal; hyper's parser only stops heads four times
//! over those limits (answered by hyper itself, without an event).

use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Version};

use crate::config::HttpSettings;
use crate::problem::Problem;

/// Why a request's framing is refused, or `None` when it is acceptable.
pub fn framing_error(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let te: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    let cl = headers.get_all(CONTENT_LENGTH).iter().count();
    if cl > 1 {
        return Some("more than one Content-Length");
    }
    if te.is_empty() {
        return None;
    }
    if cl > 0 {
        return Some("both Transfer-Encoding and Content-Length");
    }
    if version == Version::HTTP_10 {
        return Some("Transfer-Encoding in an HTTP/1.0 request");
    }
    let only_chunked = te.len() == 1 && te[0].to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
    if !only_chunked {
        return Some("unsupported Transfer-Encoding (only `chunked` is accepted)");
    }
    None
}

/// Factor between the configured header limits and hyper's own (hard) limits.
pub const PARSER_HEADROOM: usize = 4;

/// hyper's header-field limit when none is set; its parser then works on a buffer on the
/// stack. An explicit limit costs a heap buffer of that many entries per request.
pub const PARSER_DEFAULT_MAX_HEADERS: usize = 100;

/// The parser's field limit for `max_headers`: its default when that leaves headroom for
/// the edge's own (metered) 431, else [`PARSER_HEADROOM`] × `max_headers`.
pub fn parser_max_headers(max_headers: usize) -> Option<usize> {
    (max_headers >= PARSER_DEFAULT_MAX_HEADERS).then(|| max_headers * PARSER_HEADROOM)
}

/// Why the request head is over the limits, or `None`. The head's size counts the request
/// line and each field as `name: value\r\n`, as on the wire in HTTP/1.1.
pub fn header_limit_error<B>(req: &http::Request<B>, max_headers: usize, max_header_bytes: usize) -> Option<String> {
    let headers = req.headers();
    if headers.len() > max_headers {
        return Some(format!("{} header fields; the limit is {max_headers}", headers.len()));
    }
    // Origin form (the usual case) without formatting the URI.
    let target = match (req.uri().authority(), req.uri().path_and_query()) {
        (None, Some(pq)) => pq.as_str().len(),
        _ => req.uri().to_string().len(),
    };
    let line = req.method().as_str().len() + target + 12;
    let size = line + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>();
    (size > max_header_bytes).then(|| format!("the request head is {size} bytes; the limit is {max_header_bytes}"))
}

/// 431 for heads over the limits; 400 and `Connection: close` for ambiguous framing; `None`
/// when the request may go on.
pub fn check<B>(limits: &HttpSettings, req: &http::Request<B>) -> Option<Response> {
    if let Some(reason) = header_limit_error(req, limits.max_headers, limits.max_header_bytes) {
        return Some(Problem::header_fields_too_large(reason).into_response());
    }
    if let Some(reason) = framing_error(req.version(), req.headers()) {
        let mut resp = Problem::bad_request(format!("ambiguous request framing: {reason}")).into_response();
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return Some(resp);
    }
    if let Some(reason) = host_error(req.version(), req.headers()) {
        return Some(Problem::bad_request(reason).into_response());
    }
    // The request target's own host (HTTP/2 `:authority`, an absolute-form target), which is
    // routed by: the same rule, so no user info (RFC 9110 §4.2.4: an error).
    if req.uri().authority().is_some_and(|a| !valid_host(a.as_str().as_bytes())) {
        return Some(Problem::bad_request("the request target's host is not a valid host[:port]").into_response());
    }
    None
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host` field, a valid one (the edge would
/// otherwise route, and fill `X-Forwarded-Host`, by a host it guessed). HTTP/1.0 may lack it;
/// HTTP/2 names the host in `:authority`, and a `Host` beside it, if any, counts no more.
pub fn host_error(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => Some("an HTTP/1.1 request needs a Host header"),
        (Some(_), Some(_)) if version <= Version::HTTP_11 => Some("more than one Host header"),
        (Some(host), None) if version <= Version::HTTP_11 && !valid_host(host.as_bytes()) => {
            Some("the Host header is not a valid host[:port]")
        }
        _ => None,
    }
}

/// `host[:port]` (RFC 3986 §3.2.2: a registered name, IPv4 or bracketed IPv6 address): no
/// user info, path, spaces or other delimiters.
fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']' | b'%'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn framing_table() {
        type Case<'a> = (Version, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case<'_>] = &[
            (Version::HTTP_11, &[("content-length", "4")], true),
            (Version::HTTP_11, &[("transfer-encoding", "chunked")], true),
            (Version::HTTP_11, &[("transfer-encoding", "Chunked ")], true),
            (Version::HTTP_11, &[("transfer-encoding", "chunked"), ("content-length", "4")], false),
            (Version::HTTP_11, &[("content-length", "4"), ("content-length", "4")], false),
            (Version::HTTP_11, &[("transfer-encoding", "gzip, chunked")], false),
            (Version::HTTP_11, &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")], false),
            (Version::HTTP_10, &[("transfer-encoding", "chunked")], false),
            (Version::HTTP_11, &[], true),
        ];
        for (version, headers, ok) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in *headers {
                h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(framing_error(*version, &h).is_none(), *ok, "{version:?} {headers:?}");
        }
    }

    #[test]
    fn http1_requests_have_one_valid_host() {
        let headers = |hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(HOST, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let cases: &[(Version, &[&str], bool)] = &[
            (Version::HTTP_11, &["api.example.com"], true),
            (Version::HTTP_11, &["api.example.com:8443"], true),
            (Version::HTTP_11, &["[::1]:8080"], true),
            (Version::HTTP_11, &["127.0.0.1"], true),
            (Version::HTTP_11, &[], false),
            (Version::HTTP_11, &["a.example", "b.example"], false),
            (Version::HTTP_11, &["evil@api.example.com"], false),
            (Version::HTTP_11, &["api.example.com/path"], false),
            (Version::HTTP_11, &["api example"], false),
            (Version::HTTP_11, &[""], false),
            (Version::HTTP_10, &[], true),
            (Version::HTTP_10, &["a.example", "b.example"], false),
            (Version::HTTP_2, &[], true),
        ];
        for (version, hosts, ok) in cases {
            assert_eq!(host_error(*version, &headers(hosts)).is_none(), *ok, "{version:?} {hosts:?}");
        }
    }

    #[test]
    fn header_limits_count_fields_and_head_bytes() {
        let req = |n: usize, value_len: usize| {
            let mut b = http::Request::get("/a?b=c");
            for i in 0..n {
                b = b.header(format!("x-h{i}"), "v".repeat(value_len));
            }
            b.body(axum::body::Body::empty()).unwrap()
        };
        assert_eq!(header_limit_error(&req(10, 1), 10, 1024), None);
        assert!(header_limit_error(&req(11, 1), 10, 1024).unwrap().contains("11 header fields"));
        // 2 fields of "x-hN: " + 500 bytes + CRLF, plus the request line: over 1,000 bytes.
        assert!(header_limit_error(&req(2, 500), 10, 1000).unwrap().contains("limit is 1000"));
        assert_eq!(header_limit_error(&req(2, 400), 10, 1000), None);
    }
}
