//! CORS for browser clients (`routes[].cors`): the edge answers preflights itself and puts the
//! CORS headers on every answer of the route, its own refusals included.
//!
//! A browser calling an API from another origin with a credential header (`x-api-key`,
//! `Authorization`) first sends a preflight: `OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`, without credentials. Without CORS at the edge that
//! preflight would be refused (401, or 405 where the route does not take `OPTIONS`) and the
//! browser would never send the call. With a policy, a preflight from an allowed origin is
//! answered 204 with what the route allows, one from another origin 403; preflights are not
//! forwarded, authenticated, limited or metered (they are not calls; counted in
//! `tollgate_edge_cors_preflights_total`). Every answer to a request with an allowed `Origin`
//! carries `Access-Control-Allow-Origin` and exposes the edge's headers (rate limits, quota,
//! request id, `Retry-After`), so a browser app can read its 429s and problem documents; any
//! CORS headers of the upstream are replaced, so exactly one policy answers.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD,
    HeaderMap, HeaderValue, ORIGIN, VARY,
};
use http::{Method, StatusCode};

/// Request headers a browser may send by default: the edge's credential headers and a JSON
/// body's type.
pub const DEFAULT_ALLOW_HEADERS: &[&str] = &["authorization", "content-type", "x-api-key"];

/// The response headers the edge writes itself, which a browser app may read (and route header
/// rules may not touch).
pub const EXPOSED_HEADERS: &[&str] = &[
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-quota-limit",
    "x-quota-used",
    "x-quota-reset",
    "x-quota-warning",
    "x-request-id",
];

/// Methods answered to a preflight on a route that takes any method.
const ANY_METHOD: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A route's CORS policy, its header values made once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Allowed origins as browsers send them (`scheme://host[:port]`, compared without regard
    /// to case); empty with `any`.
    origins: Vec<String>,
    /// `*`: every origin.
    any: bool,
    allow_credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    expose_headers: HeaderValue,
    max_age: HeaderValue,
}

/// `routes[].cors` as configured.
#[derive(Debug, Default)]
pub struct CorsSettings {
    pub allow_origins: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age_s: u32,
    pub allow_credentials: bool,
}

impl Cors {
    /// The policy for a route taking `methods` (empty: any); errors are (field, reason).
    pub fn new(s: CorsSettings, methods: &[Method]) -> Result<Self, (&'static str, String)> {
        if s.allow_origins.is_empty() {
            return Err(("allow_origins", "must list at least one origin (or \"*\")".into()));
        }
        let any = s.allow_origins.iter().any(|o| o == "*");
        if any && s.allow_origins.len() > 1 {
            return Err(("allow_origins", "\"*\" allows every origin: list it alone".into()));
        }
        if any && s.allow_credentials {
            return Err((
                "allow_credentials",
                "browsers refuse credentials with \"*\": list the allowed origins instead".into(),
            ));
        }
        let mut origins = Vec::new();
        for o in s.allow_origins.iter().filter(|o| *o != "*") {
            let uri: http::Uri = o.parse().map_err(|_| ("allow_origins", format!("`{o}` is not an origin")))?;
            let is_origin = matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some()
                && uri.path_and_query().is_none_or(|p| p.as_str() == "/" && !o.ends_with('/'));
            if !is_origin {
                return Err((
                    "allow_origins",
                    format!(
                        "`{o}` is not an origin: scheme://host[:port] without a path, e.g. https://app.example.com"
                    ),
                ));
            }
            origins.push(o.clone());
        }
        let list = |names: &[String], defaults: &[&str], field: &'static str| -> Result<HeaderValue, _> {
            let mut all: Vec<String> = defaults.iter().map(|s| (*s).to_owned()).collect();
            for n in names {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| (field, format!("`{n}` is not a header name")))?;
                let n = n.to_ascii_lowercase();
                if !all.contains(&n) {
                    all.push(n);
                }
            }
            HeaderValue::from_str(&all.join(", ")).map_err(|_| (field, "not a header value".to_owned()))
        };
        let allow_methods = if methods.is_empty() {
            HeaderValue::from_static(ANY_METHOD)
        } else {
            let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
            HeaderValue::from_str(&names.join(", ")).map_err(|_| ("methods", "not a header value".to_owned()))?
        };
        Ok(Self {
            origins,
            any,
            allow_credentials: s.allow_credentials,
            allow_methods,
            allow_headers: list(&s.allow_headers, DEFAULT_ALLOW_HEADERS, "allow_headers")?,
            expose_headers: list(&s.expose_headers, EXPOSED_HEADERS, "expose_headers")?,
            max_age: HeaderValue::from(s.max_age_s),
        })
    }

    /// Whether `origin` (the request's `Origin`) may read the route's answers.
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        self.any || origin.to_str().is_ok_and(|o| self.origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(o)))
    }

    /// The value of `Access-Control-Allow-Origin` for an allowed `origin`.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any { HeaderValue::from_static("*") } else { origin.clone() }
    }

    /// The answer to a preflight from `origin`: 204 with what the route allows, or 403 for an
    /// origin the policy does not list.
    pub fn preflight(&self, origin: &HeaderValue) -> axum::response::Response {
        use axum::response::IntoResponse;
        if !self.allows(origin) {
            return crate::problem::Problem::new(
                StatusCode::FORBIDDEN,
                "cors-origin",
                "Origin not allowed",
                tollgate_schemas::Outcome::Forbidden,
                "this origin may not call this route from a browser (routes[].cors.allow_origins)",
            )
            .into_response();
        }
        let mut resp = axum::response::Response::new(axum::body::Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin));
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        h.insert(ACCESS_CONTROL_ALLOW_HEADERS, self.allow_headers.clone());
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.allow_credentials {
            h.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        h.insert(
            VARY,
            HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        );
        resp
    }

    /// The CORS headers of an answer to a request from `origin` (`None`: no `Origin`, not a
    /// browser's cross-origin call): the upstream's own CORS headers give way to the policy's.
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        for h in [ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_EXPOSE_HEADERS] {
            headers.remove(h);
        }
        if !self.any {
            // The answer depends on the origin: caches must keep one per origin.
            headers.append(VARY, HeaderValue::from_static("Origin"));
        }
        let Some(origin) = origin.filter(|o| self.allows(o)) else { return };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.allow_origin(origin));
        headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, self.expose_headers.clone());
        if self.allow_credentials {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`. Returns the
/// origin and the method the browser asks for.
pub fn preflight_of<B>(req: &http::Request<B>) -> Option<(HeaderValue, Method)> {
    if req.method() != Method::OPTIONS {
        return None;
    }
    let origin = req.headers().get(ORIGIN)?.clone();
    let method = Method::from_bytes(req.headers().get(ACCESS_CONTROL_REQUEST_METHOD)?.as_bytes()).ok()?;
    Some((origin, method))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Result<Cors, (&'static str, String)> {
        let s = CorsSettings {
            allow_origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            allow_headers: vec!["X-Tenant".into()],
            expose_headers: vec![],
            max_age_s: 600,
            allow_credentials: credentials,
        };
        Cors::new(s, &[Method::GET, Method::POST])
    }

    #[test]
    fn origins_are_checked_when_configured_and_compared_without_case() {
        let c = cors(&["https://app.example.com", "http://localhost:3000"], true).unwrap();
        assert!(c.allows(&HeaderValue::from_static("https://APP.example.com")));
        assert!(c.allows(&HeaderValue::from_static("http://localhost:3000")));
        assert!(!c.allows(&HeaderValue::from_static("https://evil.example.com")));
        assert!(!c.allows(&HeaderValue::from_static("http://localhost:3001")));
        assert!(cors(&["*"], false).unwrap().allows(&HeaderValue::from_static("https://any.where")));
        for (origins, credentials, field) in [
            (&[][..], false, "allow_origins"),
            (&["*", "https://a.example"][..], false, "allow_origins"),
            (&["*"][..], true, "allow_credentials"),
            (&["https://a.example/path"][..], false, "allow_origins"),
            (&["https://a.example/"][..], false, "allow_origins"),
            (&["app.example.com"][..], false, "allow_origins"),
            (&["ftp://a.example"][..], false, "allow_origins"),
        ] {
            assert_eq!(cors(origins, credentials).unwrap_err().0, field, "{origins:?}");
        }
    }

    #[test]
    fn preflights_and_answers_carry_the_policy() {
        let c = cors(&["https://app.example.com"], true).unwrap();
        let origin = HeaderValue::from_static("https://app.example.com");
        let p = c.preflight(&origin);
        assert_eq!(p.status(), 204);
        let h = p.headers();
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "authorization, content-type, x-api-key, x-tenant");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(c.preflight(&HeaderValue::from_static("https://evil.example.com")).status(), 403);

        // An answer: the upstream's CORS headers give way, the edge's headers are exposed.
        let mut headers = HeaderMap::new();
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        c.decorate(Some(&origin), &mut headers);
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.com");
        assert!(headers[ACCESS_CONTROL_EXPOSE_HEADERS].to_str().unwrap().contains("x-ratelimit-remaining"));
        let vary: Vec<_> = headers.get_all(VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        // Another origin: no grant, and the upstream's is gone too.
        let mut headers = HeaderMap::new();
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        c.decorate(Some(&HeaderValue::from_static("https://evil.example.com")), &mut headers);
        assert!(headers.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        // "*": the same answer for everyone, no Vary.
        let any = cors(&["*"], false).unwrap();
        let mut headers = HeaderMap::new();
        any.decorate(Some(&origin), &mut headers);
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(headers.get(VARY).is_none());
    }

    #[test]
    fn a_preflight_is_options_with_origin_and_a_requested_method() {
        let req = |method: Method, headers: &[(&str, &str)]| {
            let mut b = http::Request::builder().method(method).uri("/x");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let full = [("origin", "https://a.example"), ("access-control-request-method", "POST")];
        assert_eq!(preflight_of(&req(Method::OPTIONS, &full)).unwrap().1, Method::POST);
        assert!(preflight_of(&req(Method::GET, &full)).is_none());
        assert!(preflight_of(&req(Method::OPTIONS, &full[..1])).is_none());
        assert!(preflight_of(&req(Method::OPTIONS, &full[1..])).is_none());
    }
}
