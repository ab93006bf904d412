//! Route matching. Precedence, highest first:
//! 1. routes with a `host` that equals the request's host, before routes without `host`;
//! 2. exact `path` routes before `path_prefix` routes;
//! 3. the longest path (prefixes match at `/` boundaries: `/v1` matches `/v1` and `/v1/x`,
//!    never `/v1x`);
//! 4. the order in the config file.
//!
//! Among routes matching host and path, the first whose `methods` allow the request's method
//! wins; when none does, the answer is 405 with `Allow`.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::Method;

use crate::Runtime;
use crate::config::Route;
use crate::problem::Problem;

/// The route table, sorted by precedence.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Some route matches on `host` (else the host is not looked at).
    by_host: bool,
}

/// Why no route was chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum NoMatch {
    NotFound,
    /// Host and path matched but no route allows the method; the methods that would.
    MethodNotAllowed(Vec<Method>),
}

/// What a route without `methods` takes: every method but `TRACE`, which only a route listing
/// it does. (A TRACE answer echoes the request as the upstream got it, with the headers the
/// edge added; nginx refuses it too. `CONNECT` is refused before routing.)
const ANY_BUT_TRACE: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];

/// Adds to `allowed` those of `methods` it does not have yet.
fn add_methods(allowed: &mut Vec<Method>, methods: &[Method]) {
    for m in methods {
        if !allowed.contains(m) {
            allowed.push(m.clone());
        }
    }
}

/// Whether `path` is `prefix` or below it at a `/` boundary (`/` matches every path).
pub(crate) fn prefix_matches(prefix: &str, path: &str, ignore_case: bool) -> bool {
    prefix == "/"
        || (starts_with(path, prefix, ignore_case)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

/// Whether `path` starts with `prefix`, letters compared without case with `ignore_case`
/// (a route's `ignore_case`; request paths are ASCII).
fn starts_with(path: &str, prefix: &str, ignore_case: bool) -> bool {
    if ignore_case {
        path.len() >= prefix.len() && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    } else {
        path.starts_with(prefix)
    }
}

/// `path` as servlet containers (Tomcat, Jetty) read it: each segment's `;parameters` dropped
/// (`/admin;jsessionid=1` is `/admin` to them, and `/public/..;/admin` is `/admin`), so that
/// the route matched is the one whose resource such an upstream serves; the request is
/// forwarded as it came. Paths without `;` (nearly all) are not copied.
pub(crate) fn without_path_params(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or_default());
    }
    // A segment that was `..;x` is `..` now: resolved like the others were.
    match crate::path::normalize(&out) {
        Ok(n) => std::borrow::Cow::Owned(n.path.into_owned()),
        Err(_) => std::borrow::Cow::Owned(out),
    }
}

/// The request's host: lower case, without port, without the trailing dot of a fully
/// qualified name (`api.example.com.` is `api.example.com`, as nginx reads it: a route bound
/// to the host is not passed over for one without).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host.split_once(']').map(|(h, _)| format!("{h}]")).unwrap_or_else(|| host.to_owned())
    } else {
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        name.strip_suffix('.').unwrap_or(name).to_owned()
    };
    without_port.to_ascii_lowercase()
}

impl RouteTable {
    pub fn new(routes: &[Arc<Route>]) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.to_vec();
        // Stable sort keeps config order among equals.
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.exact.cmp(&a.exact))
                .then(b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        let by_host = routes.iter().any(|r| r.host.is_some());
        Self { routes, by_host }
    }

    pub fn find(&self, host: &str, path: &str, method: &Method) -> Result<Arc<Route>, NoMatch> {
        let path = &*without_path_params(path);
        let mut allowed = Vec::new();
        for route in &self.routes {
            let path_ok = match (route.exact, route.ignore_case) {
                (true, false) => route.path_prefix == path,
                (true, true) => route.path_prefix.eq_ignore_ascii_case(path),
                (false, ignore_case) => prefix_matches(&route.path_prefix, path, ignore_case),
            };
            if route.host.as_deref().is_some_and(|h| h != host) || !path_ok {
                continue;
            }
            if route.methods.is_empty() {
                if *method != Method::TRACE {
                    return Ok(Arc::clone(route));
                }
                add_methods(&mut allowed, &ANY_BUT_TRACE);
                continue;
            }
            if route.methods.contains(method) {
                return Ok(Arc::clone(route));
            }
            add_methods(&mut allowed, &route.methods);
        }
        if allowed.is_empty() { Err(NoMatch::NotFound) } else { Err(NoMatch::MethodNotAllowed(allowed)) }
    }
}

/// The request's route in `runtime`.
pub fn route<B>(runtime: &Runtime, req: &http::Request<B>) -> Result<Arc<Route>, NoMatch> {
    route_as(runtime, req, req.method())
}

/// The route `req` would take with `method` (a CORS preflight is routed by the method it asks
/// for).
pub fn route_as<B>(runtime: &Runtime, req: &http::Request<B>, method: &Method) -> Result<Arc<Route>, NoMatch> {
    let host = if runtime.routes.by_host {
        crate::request_host(req).as_ref().and_then(|h| h.to_str().ok()).map(normalize_host).unwrap_or_default()
    } else {
        String::new()
    };
    runtime.routes.find(&host, req.uri().path(), method)
}

/// The 404 / 405 answer for a request without a route.
pub fn refusal(no_match: NoMatch, path: &str) -> Response {
    match no_match {
        NoMatch::NotFound => Problem::no_route(path).into_response(),
        NoMatch::MethodNotAllowed(methods) => {
            let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
            Problem::method_not_allowed(&allow.join(", ")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route(id: &str, host: Option<&str>, prefix: &str, methods: &[Method]) -> Arc<Route> {
        let mut r = Route::with_defaults(id, prefix.trim_start_matches('='), &["http://127.0.0.1:1"]).unwrap();
        r.exact = prefix.starts_with('=');
        r.host = host.map(Into::into);
        r.methods = methods.to_vec();
        Arc::new(r)
    }

    #[test]
    fn precedence_host_then_longest_prefix_then_order() {
        let t = RouteTable::new(&[
            route("root", None, "/", &[]),
            route("v1", None, "/v1", &[]),
            route("v1-items", None, "/v1/items", &[]),
            route("v1-host", Some("api.example.com"), "/v1", &[]),
            route("get-only", None, "/ro", &[Method::GET]),
            route("v1-exact", None, "=/v1/items/special", &[]),
        ]);
        let id = |host: &str, path: &str, m: Method| t.find(host, path, &m).map(|r| r.id.clone());
        assert_eq!(id("x", "/v1/items/3", Method::GET).unwrap(), "v1-items");
        assert_eq!(id("x", "/v1/items/special", Method::GET).unwrap(), "v1-exact");
        assert_eq!(id("x", "/v1/items/special/x", Method::GET).unwrap(), "v1-items");
        assert_eq!(id("x", "/v1/other", Method::GET).unwrap(), "v1");
        assert_eq!(id("api.example.com", "/v1/items", Method::GET).unwrap(), "v1-host");
        assert_eq!(id("x", "/v1x", Method::GET).unwrap(), "root");
        // A method mismatch falls through to less specific routes...
        assert_eq!(id("x", "/ro", Method::POST).unwrap(), "root");
        // ...and is a 405 only when no route takes the method.
        let no_root = RouteTable::new(&[route("v1", None, "/v1", &[]), route("get-only", None, "/ro", &[Method::GET])]);
        let find = |path: &str, m: Method| no_root.find("x", path, &m).map(|r| r.id.clone());
        assert_eq!(find("/ro", Method::POST), Err(NoMatch::MethodNotAllowed(vec![Method::GET])));
        assert_eq!(find("/v2", Method::GET), Err(NoMatch::NotFound));
    }

    #[test]
    fn a_route_that_ignores_case_takes_any_case_of_its_path() {
        let mut admin = (*route("admin", None, "/Admin", &[])).clone();
        admin.ignore_case = true;
        let mut exact = (*route("exact", None, "=/api/Login", &[])).clone();
        exact.ignore_case = true;
        let t = RouteTable::new(&[
            route("public", None, "/", &[]),
            Arc::new(admin),
            Arc::new(exact),
            route("cased", None, "/Cased", &[]),
        ]);
        let id = |path: &str| t.find("x", path, &Method::GET).map(|r| r.id.clone()).unwrap();
        for path in ["/admin", "/ADMIN/users", "/aDmIn;x/users", "/Admin"] {
            assert_eq!(id(path), "admin", "{path}");
        }
        assert_eq!(id("/adminx"), "public");
        assert_eq!(id("/API/LOGIN"), "exact");
        assert_eq!(id("/api/login/x"), "public");
        // Routes without it keep RFC 3986's case-sensitive paths.
        assert_eq!(id("/Cased/x"), "cased");
        assert_eq!(id("/cased/x"), "public");
    }

    #[test]
    fn trace_takes_only_a_route_that_lists_it() {
        let t = RouteTable::new(&[
            route("any", None, "/", &[]),
            route("get-only", None, "/ro", &[Method::GET]),
            route("traced", None, "/debug", &[Method::GET, Method::TRACE]),
        ]);
        let find = |path: &str, m: Method| t.find("x", path, &m).map(|r| r.id.clone());
        assert_eq!(find("/debug/x", Method::TRACE).unwrap(), "traced");
        assert_eq!(find("/x", Method::GET).unwrap(), "any");
        // The route without `methods` does not take it: 405 with what it does take (once).
        let Err(NoMatch::MethodNotAllowed(allow)) = find("/ro", Method::TRACE) else { panic!("TRACE was routed") };
        assert_eq!(allow[0], Method::GET);
        assert_eq!(allow.len(), ANY_BUT_TRACE.len(), "{allow:?}");
        assert!(!allow.contains(&Method::TRACE));
    }

    #[test]
    fn path_parameters_do_not_take_a_call_past_its_route() {
        let t = RouteTable::new(&[
            route("public", None, "/", &[]),
            route("admin", None, "/admin", &[]),
            route("api-admin", None, "=/api/admin", &[]),
        ]);
        let id = |path: &str| t.find("x", path, &Method::GET).map(|r| r.id.clone()).unwrap();
        for path in
            ["/admin;jsessionid=1", "/admin;x/users", "/public/..;/admin", "/public/..;x=1/admin/users", "/.;/admin"]
        {
            assert_eq!(id(path), "admin", "{path}");
        }
        assert_eq!(id("/api;v=2/admin"), "api-admin");
        assert_eq!(id("/adminx;y"), "public");
        assert_eq!(id("/public/a;b"), "public");
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
        assert_eq!(normalize_host("Internal.Example.:443"), "internal.example");
        assert_eq!(normalize_host("internal.example."), "internal.example");
    }
}
