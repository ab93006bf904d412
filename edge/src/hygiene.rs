//! Request framing checks that close request-smuggling gaps hyper's parser leaves open to a
//! proxy (RFC 9112 §6.1, §6.3): a request with both `Transfer-Encoding` and `Content-Length`,
//! several `Content-Length` fields, a transfer coding other than exactly `chunked`, or
//! `Transfer-Encoding` on HTTP/1.0 is answered 400 and its connection is closed, so nothing
//! that follows it on the connection is read as another request.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Version};

use crate::Gateway;
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

/// Layer: 400 and `Connection: close` for ambiguous framing.
pub async fn layer(State(_gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    if let Some(reason) = framing_error(req.version(), req.headers()) {
        let mut resp = Problem::bad_request(format!("ambiguous request framing: {reason}")).into_response();
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
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
}
