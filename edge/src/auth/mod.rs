//! Authentication: API keys, JWTs and client certificates (mutual TLS). On success the request
//! path gets a typed [`Identity`], and the credential headers are removed before forwarding.
//!
//! A request carries at most one credential: `Authorization: Bearer <key or JWT>` or
//! `x-api-key: <key>`, or, on a route that accepts them, the client certificate of its TLS
//! connection; sending two (of any kinds) is ambiguous and refused. A bearer value with three
//! dot-separated parts is a JWT ([`jwt`]), anything else an API key.
//!
//! API keys: consumers in the config carry the SHA-256 of each key, never the key; a request's
//! key is hashed and looked up. Client certificates: the TLS handshake has verified the chain
//! to `edge.tls_client_ca_file`; the certificate's SHA-256 fingerprint is looked up among the
//! consumers' `certificates`, so removing one revokes it at the next reload (also on open
//! connections: the lookup is per request).

pub mod jwt;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::Runtime;
use crate::config::{AuthMode, Consumer, Plan, Route};
use crate::problem::Problem;

/// Header carrying an API key, as an alternative to `Authorization: Bearer`.
pub static API_KEY_HEADER: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// Who is calling: read by the limiter, the proxy and metering.
#[derive(Debug)]
pub struct Identity {
    pub consumer_id: Arc<str>,
    /// The API key's or client certificate's id, or `jwt:<issuer id>`.
    pub credential_id: Arc<str>,
    pub plan: Arc<Plan>,
    /// Where the credential may be used from (`None`: any address): the consumer's
    /// `allowed_ips`, or the key's or certificate's own list within them.
    pub allowed_ips: Option<Arc<[crate::forwarded::IpNet]>>,
    /// A JWT's scopes and claim headers (`None`: an API key or a certificate, which carry
    /// none).
    pub grants: Option<Arc<jwt::Grants>>,
}

impl Identity {
    /// Whether the credential grants every one of `required` (a JWT's scopes).
    pub fn has_scopes(&self, required: &[String]) -> bool {
        self.grants.as_ref().is_some_and(|g| g.has_scopes(required))
    }
}

/// Key hash → identity; certificate fingerprint → identity; consumer id → plan.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<[u8; 32], Arc<Identity>, foldhash::fast::RandomState>,
    by_certificate: HashMap<[u8; 32], Arc<Identity>, foldhash::fast::RandomState>,
    /// An identity of each consumer (its first key's), found by consumer id: a set of
    /// pointers to identities the key map holds anyway (8 bytes an entry, not a second copy
    /// of every id and plan).
    consumers: HashSet<ByConsumer, foldhash::fast::RandomState>,
}

/// An identity looked up by its consumer id.
#[derive(Debug)]
struct ByConsumer(Arc<Identity>);

impl std::borrow::Borrow<str> for ByConsumer {
    fn borrow(&self) -> &str {
        &self.0.consumer_id
    }
}

impl PartialEq for ByConsumer {
    fn eq(&self, other: &Self) -> bool {
        self.0.consumer_id == other.0.consumer_id
    }
}

impl Eq for ByConsumer {}

impl std::hash::Hash for ByConsumer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it (`Borrow<str>`).
        (*self.0.consumer_id).hash(state);
    }
}

impl KeyStore {
    /// The store for `consumers` (taken one by one, so their memory is reused for the store's
    /// while it is built: 100,000s of consumers are held once, not twice).
    pub fn new(plans_by_name: &HashMap<String, Arc<Plan>>, consumers: Vec<Consumer>) -> Self {
        let mut by_hash = HashMap::with_capacity_and_hasher(consumers.len(), Default::default());
        let mut by_consumer = HashSet::with_capacity_and_hasher(consumers.len(), Default::default());
        let mut by_certificate = HashMap::default();
        for c in consumers {
            let consumer_id: Arc<str> = Arc::from(c.id.as_str());
            let Some(plan) = plans_by_name.get(&c.plan) else { continue };
            let allowed_ips: Option<Arc<[crate::forwarded::IpNet]>> =
                (!c.allowed_ips.is_empty()).then(|| c.allowed_ips.as_slice().into());
            let identity = |credential_id: &str, own: &[crate::forwarded::IpNet]| {
                Arc::new(Identity {
                    consumer_id: Arc::clone(&consumer_id),
                    credential_id: Arc::from(credential_id),
                    plan: Arc::clone(plan),
                    // The credential's own list is already within the consumer's (config).
                    allowed_ips: if own.is_empty() { allowed_ips.clone() } else { Some(own.into()) },
                    grants: None,
                })
            };
            // The consumer's entry shares a credential's identity (one allocation less per
            // consumer) if one has the consumer's address list, not a list of its own.
            let mut first = None;
            for k in &c.keys {
                let id = identity(&k.id, &k.allowed_ips);
                if k.allowed_ips.is_empty() {
                    first.get_or_insert_with(|| Arc::clone(&id));
                }
                by_hash.insert(k.sha256, id);
            }
            for k in &c.certificates {
                let id = identity(&k.id, &k.allowed_ips);
                if k.allowed_ips.is_empty() {
                    first.get_or_insert_with(|| Arc::clone(&id));
                }
                by_certificate.insert(k.sha256, id);
            }
            // A consumer without keys (JWT only) still has its plan and address list.
            by_consumer.insert(ByConsumer(first.unwrap_or_else(|| identity("", &[]))));
        }
        Self { by_hash, by_certificate, consumers: by_consumer }
    }

    pub fn lookup(&self, key: &str) -> Option<Arc<Identity>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&digest).cloned()
    }

    /// The identity of the client certificate with this fingerprint.
    pub fn lookup_certificate(&self, fingerprint: &[u8; 32]) -> Option<Arc<Identity>> {
        self.by_certificate.get(fingerprint).cloned()
    }

    /// An identity of the configured consumer (its id, plan and allowed addresses).
    pub fn consumer(&self, id: &str) -> Option<&Identity> {
        self.consumers.get(id).map(|c| &*c.0)
    }
}

/// Characters of generated keys (base62).
const KEY_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in a generated key: 32 × log2(62) ≈ 190 bits.
pub const KEY_RANDOM_CHARS: usize = 32;

/// A new API key, `tg_<env>_<32 base62 chars>`: recognizable (secret scanners can match the
/// prefix), and random from a CSPRNG.
pub fn generate_key(env: &str) -> String {
    use rand::Rng;
    // ThreadRng is a CSPRNG (ChaCha) seeded from the OS; random_range has no modulo bias.
    let mut rng = rand::rng();
    let mut key = format!("tg_{env}_");
    for _ in 0..KEY_RANDOM_CHARS {
        key.push(char::from(KEY_ALPHABET[rng.random_range(0..KEY_ALPHABET.len())]));
    }
    key
}

/// SHA-256 of a certificate's DER encoding: how a client certificate is registered
/// (`consumers[].certificates[].sha256`).
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Hex SHA-256 of a key, as the config wants it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Why a credential was refused. The messages go to clients: they never echo the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credential: send `Authorization: Bearer <credential>` or `x-api-key: <key>`")]
    Missing,
    #[error("missing credential: this route needs a client certificate (mutual TLS)")]
    MissingCertificate,
    #[error("the client certificate is not registered")]
    CertificateNotRegistered,
    #[error("more than one credential in the request")]
    Ambiguous,
    #[error("unsupported Authorization scheme; use Bearer")]
    UnsupportedScheme,
    #[error("invalid credential")]
    Invalid,
    #[error("this route accepts {0} only")]
    WrongKind(&'static str),
    #[error("{0}")]
    Jwt(#[from] jwt::JwtError),
    /// Valid token, but its consumer is not configured and the issuer has no default plan.
    #[error("the token's consumer is not registered")]
    NotRegistered,
}

/// A credential as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    ApiKey(String),
    Jwt(String),
}

/// The single credential a request carries, if any.
pub fn extract(headers: &HeaderMap) -> Result<Option<Credential>, AuthError> {
    let mut found = Vec::new();
    for v in headers.get_all(http::header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, token) = v.trim().split_once(' ').ok_or(AuthError::UnsupportedScheme)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::UnsupportedScheme);
        }
        let token = token.trim().to_owned();
        found.push(if jwt::looks_like_jwt(&token) { Credential::Jwt(token) } else { Credential::ApiKey(token) });
    }
    for v in headers.get_all(&API_KEY_HEADER) {
        found.push(Credential::ApiKey(v.to_str().map_err(|_| AuthError::Invalid)?.trim().to_owned()));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(AuthError::Ambiguous),
    }
}

/// Authenticates against the runtime's keys, certificates and issuers (`client_cert`: the
/// fingerprint of the connection's client certificate); `Ok(None)` for a public route without
/// credential.
pub async fn authenticate(
    runtime: &Runtime,
    route: &Route,
    headers: &HeaderMap,
    client_cert: Option<&[u8; 32]>,
    client: &crate::proxy::HttpClient,
) -> Result<Option<Arc<Identity>>, AuthError> {
    let accepted = route.auth.accepted();
    // The connection's certificate is a credential only where the route takes one.
    let cert = client_cert.filter(|_| route.auth.accepts_mtls());
    match (extract(headers)?, cert) {
        (Some(_), Some(_)) => Err(AuthError::Ambiguous),
        (None, Some(fingerprint)) => {
            runtime.keys.lookup_certificate(fingerprint).map(Some).ok_or(AuthError::CertificateNotRegistered)
        }
        (None, None) if route.auth.is_public() => Ok(None),
        (None, None) if route.auth == AuthMode::MTLS => Err(AuthError::MissingCertificate),
        (None, None) => Err(AuthError::Missing),
        (Some(Credential::ApiKey(key)), None) => {
            if !route.auth.accepts_api_key() {
                return Err(AuthError::WrongKind(accepted));
            }
            if key.is_empty() {
                return Err(AuthError::Invalid);
            }
            runtime.keys.lookup(&key).map(Some).ok_or(AuthError::Invalid)
        }
        (Some(Credential::Jwt(token)), None) => {
            if !route.auth.accepts_jwt() {
                return Err(AuthError::WrongKind(accepted));
            }
            if runtime.jwt.is_empty() {
                // A public route on an edge without issuers: a JWT cannot be valid here.
                return Err(AuthError::Invalid);
            }
            let v = runtime.jwt.verify(&token, client).await?;
            let (consumer_id, plan, allowed_ips) = match runtime.keys.consumer(&v.consumer_id) {
                Some(c) => (Arc::clone(&c.consumer_id), Arc::clone(&c.plan), c.allowed_ips.clone()),
                None => {
                    let plan =
                        v.default_plan.as_ref().and_then(|p| runtime.plans.get(p)).ok_or(AuthError::NotRegistered)?;
                    (Arc::from(v.consumer_id.as_str()), Arc::clone(plan), None)
                }
            };
            Ok(Some(Arc::new(Identity {
                consumer_id,
                credential_id: v.credential_id,
                plan,
                allowed_ips,
                grants: Some(v.grants),
            })))
        }
    }
}

/// Authenticates the request for `route` and strips its credential headers; the refusal
/// (401 / 403) as an answer.
pub async fn admit<B>(
    runtime: &Runtime,
    route: &Route,
    peer: &crate::Peer,
    req: &mut http::Request<B>,
) -> Result<Option<Arc<Identity>>, Response> {
    match authenticate(runtime, route, req.headers(), peer.client_cert.as_ref(), &runtime.client).await {
        Err(AuthError::NotRegistered) => Err(Problem::forbidden(AuthError::NotRegistered.to_string()).into_response()),
        Err(e @ AuthError::Jwt(_)) => Err(Problem::invalid_token(e.to_string()).into_response()),
        Err(e) => Err(Problem::unauthenticated(e.to_string()).into_response()),
        Ok(identity) => {
            req.headers_mut().remove(http::header::AUTHORIZATION);
            req.headers_mut().remove(&API_KEY_HEADER);
            Ok(identity)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn extraction_table() {
        use Credential::{ApiKey, Jwt};
        let key = |s: &str| Ok(Some(ApiKey(s.to_owned())));
        type Case<'a> = (&'a [(&'static str, &'a str)], Result<Option<Credential>, AuthError>);
        let cases: &[Case<'_>] = &[
            (&[], Ok(None)),
            (&[("authorization", "Bearer abc")], key("abc")),
            (&[("authorization", "bearer  abc ")], key("abc")),
            (&[("x-api-key", "abc")], key("abc")),
            (&[("authorization", "Bearer a.b.c")], Ok(Some(Jwt("a.b.c".into())))),
            (&[("x-api-key", "a.b.c")], key("a.b.c")),
            (&[("authorization", "Bearer abc"), ("x-api-key", "abc")], Err(AuthError::Ambiguous)),
            (&[("authorization", "Bearer a.b.c"), ("x-api-key", "abc")], Err(AuthError::Ambiguous)),
            (&[("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")], Err(AuthError::Ambiguous)),
            (&[("x-api-key", "a"), ("x-api-key", "b")], Err(AuthError::Ambiguous)),
            (&[("authorization", "Basic dXNlcjpwYXNz")], Err(AuthError::UnsupportedScheme)),
            (&[("authorization", "Bearer")], Err(AuthError::UnsupportedScheme)),
        ];
        for (h, want) in cases {
            assert_eq!(&extract(&headers(h)), want, "{h:?}");
        }
    }

    #[test]
    fn generated_keys_are_prefixed_random_base62() {
        let a = generate_key("live");
        let b = generate_key("live");
        assert_ne!(a, b);
        let body = a.strip_prefix("tg_live_").unwrap();
        assert_eq!(body.len(), KEY_RANDOM_CHARS);
        assert!(body.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }

    #[test]
    fn errors_never_echo_the_credential() {
        for e in [AuthError::Missing, AuthError::Ambiguous, AuthError::UnsupportedScheme, AuthError::Invalid] {
            assert!(!e.to_string().contains("abc"));
        }
        assert_eq!(hash_key("foo"), "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae");
    }

    #[test]
    fn key_store_finds_keys_by_hash_and_plans_by_consumer_with_or_without_keys() {
        use crate::config::{ApiKey, Rate};
        use std::num::NonZeroU32;
        let rate = Rate { rate_per_second: NonZeroU32::new(1).unwrap(), burst: NonZeroU32::new(1).unwrap() };
        let plan =
            |name: &str| Arc::new(Plan { name: name.into(), limit: rate, routes: HashMap::new(), max_in_flight: None });
        let plans: HashMap<String, Arc<Plan>> =
            [("gold".to_owned(), plan("gold")), ("free".to_owned(), plan("free"))].into();
        let key = |id: &str, k: &str| ApiKey {
            id: id.into(),
            sha256: Sha256::digest(k.as_bytes()).into(),
            allowed_ips: Box::default(),
        };
        let consumers = vec![
            Consumer {
                id: "acme".into(),
                plan: "gold".into(),
                keys: vec![key("a1", "key-1"), key("a2", "key-2")],
                certificates: vec![key("c1", "cert-1")],
                allowed_ips: vec![],
            },
            Consumer {
                id: "ci".into(),
                plan: "free".into(),
                keys: vec![ApiKey { allowed_ips: ["10.1.0.0/16".parse().unwrap()].into(), ..key("ci-1", "key-ci") }],
                certificates: vec![],
                allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
            },
            Consumer {
                id: "jwt-only".into(),
                plan: "free".into(),
                keys: vec![],
                certificates: vec![],
                allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
            },
        ];
        let store = KeyStore::new(&plans, consumers);
        let found = store.lookup("key-2").unwrap();
        assert_eq!((&*found.consumer_id, &*found.credential_id, found.plan.name.as_str()), ("acme", "a2", "gold"));
        assert!(store.lookup("key-3").is_none());
        // Certificates by fingerprint, apart from keys: a key whose hash is a certificate's
        // fingerprint finds nothing.
        let c1 = store.lookup_certificate(&Sha256::digest(b"cert-1").into()).unwrap();
        assert_eq!((&*c1.consumer_id, &*c1.credential_id), ("acme", "c1"));
        assert!(store.lookup("cert-1").is_none());
        assert!(store.lookup_certificate(&Sha256::digest(b"key-1").into()).is_none());
        let c = store.consumer("acme").unwrap();
        assert_eq!((&*c.consumer_id, c.plan.name.as_str()), ("acme", "gold"));
        assert!(c.allowed_ips.is_none(), "no allowed_ips: any address");
        let c = store.consumer("jwt-only").unwrap();
        assert_eq!((&*c.consumer_id, c.plan.name.as_str()), ("jwt-only", "free"));
        assert_eq!(c.allowed_ips.as_deref(), Some(&["10.0.0.0/8".parse().unwrap()][..]));
        // A key with a list of its own: the key's list for the key, the consumer's for the
        // consumer (JWTs).
        let ci = store.lookup("key-ci").unwrap();
        assert_eq!(ci.allowed_ips.as_deref(), Some(&["10.1.0.0/16".parse().unwrap()][..]));
        let c = store.consumer("ci").unwrap();
        assert_eq!(c.allowed_ips.as_deref(), Some(&["10.0.0.0/8".parse().unwrap()][..]));
        assert!(store.consumer("nobody").is_none());
    }
}
