//! Per-route header rules (`routes[].request_headers`, `routes[].response_headers`): headers
//! the edge sets on or removes from what it forwards — a credential of the API provider's own
//! for the upstream, a version header, `Server` taken off the upstream's answers.
//!
//! Headers the edge owns are not rules' to touch: framing and hop-by-hop headers, `Host`, and
//! the headers the edge writes itself (`x-consumer-id`, `x-request-id`, `x-forwarded-*`,
//! `traceparent` upstream; the rate-limit, quota and request-id headers to the client).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};

/// What a route does to one direction's headers: remove these, then set those.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
    /// (`response_headers` only) `set` also adds to the edge's own answers on the route (401,
    /// 403, 429, 502, 503, 504...), as nginx's `add_header ... always`.
    pub always: bool,
}

/// Which direction a rule list is for (the headers the edge owns differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// To the upstream.
    Request,
    /// To the client (the upstream's answers).
    Response,
}

/// Headers no rule may name, in either direction: framing and connection management.
const FRAMING: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];
/// What the edge writes on the request to the upstream.
const EDGE_REQUEST: &[&str] =
    &["x-consumer-id", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "traceparent"];
/// What the edge writes on the answer to the client.
const EDGE_RESPONSE: &[&str] = crate::cors::EXPOSED_HEADERS;

/// Whether the edge owns `name` on requests to upstreams: framing, hop-by-hop, or written by
/// the edge itself (no rule or claim header may set it).
pub fn edge_owned_request_header(name: &HeaderName) -> bool {
    FRAMING.contains(&name.as_str()) || EDGE_REQUEST.contains(&name.as_str())
}

impl HeaderRules {
    /// The rules from the config's `set` (name → value; `${NAME}` in a value is the
    /// environment variable NAME, from `env`) and `remove` (names). `Err((key, reason))`, the
    /// key relative to the rules' table (`set.authorization`, `remove[1]`).
    pub fn new(
        set: &BTreeMap<String, String>,
        remove: &[String],
        direction: Direction,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, (String, String)> {
        let owned = match direction {
            Direction::Request => EDGE_REQUEST,
            Direction::Response => EDGE_RESPONSE,
        };
        let name = |key: String, text: &str| -> Result<HeaderName, (String, String)> {
            let name = HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| (key.clone(), format!("`{text}` is not a header name")))?;
            if FRAMING.contains(&name.as_str()) || owned.contains(&name.as_str()) {
                return Err((key, format!("`{name}` is the edge's to write; a route cannot change it")));
            }
            Ok(name)
        };
        let mut rules = Self::default();
        for (i, text) in remove.iter().enumerate() {
            rules.remove.push(name(format!("remove[{i}]"), text)?);
        }
        for (header, value) in set {
            let key = format!("set.{header}");
            let header = name(key.clone(), header)?;
            if rules.remove.contains(&header) {
                return Err((key, format!("`{header}` is both set and removed")));
            }
            let value = expand(value, env).map_err(|reason| (key.clone(), reason))?;
            let value = HeaderValue::from_str(&value)
                .map_err(|_| (key, "the value has characters a header cannot carry".to_owned()))?;
            rules.set.push((header, value));
        }
        Ok(rules)
    }

    /// No rule.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Adds the `set` headers the answer does not have (an edge's own answer, with `always`):
    /// what the edge wrote (its content type, `WWW-Authenticate`, `Allow`, CORS) stays.
    pub fn add_missing(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }

    /// Removes, then sets (replacing every value a header had).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// `value` with each `${NAME}` replaced by the environment variable NAME; an unset variable is
/// an error naming it (a secret missing from the environment must not become an empty header).
fn expand(value: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| "`${` without its closing `}`".to_owned())?;
        let var = &after[..end];
        let found = env.get(var).ok_or_else(|| format!("environment variable `{var}` is not set"))?;
        out.push_str(found);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn rules_remove_then_set_and_expand_the_environment() {
        let env = set(&[("ORDERS_TOKEN", "s3cret")]);
        let rules = HeaderRules::new(
            &set(&[("Authorization", "Bearer ${ORDERS_TOKEN}"), ("x-api-version", "2")]),
            &["x-debug".to_owned(), "Cookie".to_owned()],
            Direction::Request,
            &env,
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.append("x-debug", HeaderValue::from_static("1"));
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("x-api-version", HeaderValue::from_static("1"));
        h.append("x-api-version", HeaderValue::from_static("0"));
        h.append("accept", HeaderValue::from_static("*/*"));
        rules.apply(&mut h);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["authorization"], "Bearer s3cret");
        assert_eq!(h.get_all("x-api-version").iter().collect::<Vec<_>>(), ["2"]);
        assert_eq!(h["accept"], "*/*");
        assert!(!rules.is_empty());
        assert!(HeaderRules::default().is_empty());
        assert_eq!(expand("a${X}b${X}", &set(&[("X", "-")])).unwrap(), "a-b-");
        assert_eq!(expand("no variables", &BTreeMap::new()).unwrap(), "no variables");
    }

    #[test]
    fn rules_may_not_touch_what_the_edge_writes_and_errors_name_the_key() {
        let env = BTreeMap::new();
        let err = |s: &[(&str, &str)], r: &[&str], d| {
            let remove: Vec<String> = r.iter().map(|s| (*s).to_owned()).collect();
            HeaderRules::new(&set(s), &remove, d, &env).unwrap_err()
        };
        let (key, reason) = err(&[("x-consumer-id", "me")], &[], Direction::Request);
        assert_eq!(key, "set.x-consumer-id");
        assert!(reason.contains("the edge's to write"), "{reason}");
        assert_eq!(err(&[], &["ok", "Transfer-Encoding"], Direction::Response).0, "remove[1]");
        assert_eq!(err(&[], &["x-ratelimit-remaining"], Direction::Response).0, "remove[0]");
        assert_eq!(err(&[("x-quota-warning", "none")], &[], Direction::Response).0, "set.x-quota-warning");
        assert_eq!(err(&[], &["host"], Direction::Request).0, "remove[0]");
        // The upstream may get what the client may not and the other way round.
        assert!(HeaderRules::new(&set(&[("retry-after", "1")]), &[], Direction::Request, &env).is_ok());
        assert!(HeaderRules::new(&set(&[("traceparent", "x")]), &[], Direction::Response, &env).is_ok());
        let (key, reason) = err(&[("x-key", "${NOPE}")], &[], Direction::Request);
        assert_eq!(key, "set.x-key");
        assert!(reason.contains("`NOPE` is not set"), "{reason}");
        assert!(err(&[("x-key", "${OPEN")], &[], Direction::Request).1.contains("closing"));
        assert!(err(&[("bad name", "v")], &[], Direction::Request).1.contains("not a header name"));
        assert!(err(&[("x-v", "line\nbreak")], &[], Direction::Request).1.contains("cannot carry"));
        assert!(err(&[("x-v", "1")], &["x-v"], Direction::Request).1.contains("both set and removed"));
    }
}
