//! JWT bearer tokens (`jsonwebtoken`), per trusted issuer.
//!
//! A token is matched to its issuer by the `iss` claim (read before verification only to pick
//! the issuer's keys and rules). Everything that decides acceptance is fixed by the issuer's
//! config, never by the token: the allowed algorithms (so `alg: none` and HS256-signed-with-
//! the-RSA-public-key are refused), the keys, `aud`, and the required claims `exp`, `iss` and
//! `aud` (`nbf` is checked when present), with `leeway_s` of clock skew.
//!
//! Keys come from the config (PEM files, shared secrets) and from a JSON Web Key Set (file or
//! `http://` URL) that a background task reloads every `jwks_refresh_s`. A token whose `kid`
//! is unknown triggers one JWKS fetch, single-flight, at most once per
//! `unknown_kid_cooldown_s`: a flood of random `kid`s costs one fetch per cooldown, not one per
//! request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{JwksSource, JwtIssuer};
use crate::proxy::HttpClient;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One verification key.
#[derive(Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    /// The one algorithm this key verifies; `None` (JWKS keys without `alg`): any algorithm of
    /// the key's family that the issuer allows.
    pub alg: Option<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (shared secrets).
        f.debug_struct("JwtKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl JwtKey {
    /// A public key in PEM for `alg` (RSA, EC or Ed25519 family).
    pub fn from_pem(kid: Option<String>, alg: Algorithm, pem: &[u8]) -> Result<Self, String> {
        use jsonwebtoken::AlgorithmFamily as F;
        let key = match alg.family() {
            F::Rsa => DecodingKey::from_rsa_pem(pem),
            F::Ec => DecodingKey::from_ec_pem(pem),
            F::Ed => DecodingKey::from_ed_pem(pem),
            F::Hmac => return Err("HS* keys are shared secrets: use secret_file or secret_env".into()),
        }
        .map_err(|e| format!("not a {alg:?} public key in PEM: {e}"))?;
        Ok(Self { kid, alg: Some(alg), key })
    }

    /// A shared secret for an HS* algorithm.
    pub fn from_secret(kid: Option<String>, alg: Algorithm, secret: &[u8]) -> Result<Self, String> {
        if alg.family() != jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(format!("{alg:?} needs a public key (pem_file), not a secret"));
        }
        if secret.len() < 32 {
            return Err("an HMAC secret must be at least 32 bytes".into());
        }
        Ok(Self { kid, alg: Some(alg), key: DecodingKey::from_secret(secret) })
    }

    fn matches(&self, alg: Algorithm, kid: Option<&str>) -> bool {
        let kid_ok = match kid {
            Some(k) => self.kid.as_deref() == Some(k),
            None => true,
        };
        let alg_ok = match self.alg {
            Some(a) => a == alg,
            None => self.key.family() == alg.family(),
        };
        kid_ok && alg_ok
    }
}

/// Parses an algorithm name as the config spells it (`ES256`, `EdDSA`, ...).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>().map_err(|_| {
        format!("`{name}` is not a JWT algorithm (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)")
    })
}

/// The verification keys of a JWKS document. Keys for encryption, of unknown types or with
/// unusable parameters are skipped; a document without any usable key is an error.
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<JwtKey>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else { continue };
        if matches!(jwk.common.public_key_use, Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        let alg = jwk.common.key_algorithm.and_then(|a| parse_algorithm(&a.to_string()).ok());
        keys.push(JwtKey { kid: jwk.common.key_id.clone(), alg, key });
    }
    if keys.is_empty() {
        return Err("no usable verification key in the set".into());
    }
    Ok(keys)
}

/// Why a token was refused. Messages go to clients: they name the rule, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token has no issuer (iss)")]
    MissingIssuer,
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token algorithm is not allowed for its issuer")]
    AlgorithmNotAllowed,
    #[error("no key of the issuer matches the token (kid/alg)")]
    UnknownKey,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token audience (aud) is not accepted")]
    BadAudience,
    #[error("token issuer (iss) is not accepted")]
    BadIssuer,
    #[error("token lacks a valid `{0}` claim (required)")]
    MissingClaim(String),
    #[error("token claim `{0}` has the wrong type")]
    BadClaim(String),
    #[error("token has no consumer claim `{0}` (a non-empty string)")]
    NoConsumer(String),
    #[error("token header lists critical extensions (crit), none of which the edge supports")]
    CriticalExtension,
}

impl From<jsonwebtoken::errors::Error> for JwtError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidSignature => JwtError::BadSignature,
            ErrorKind::ExpiredSignature => JwtError::Expired,
            ErrorKind::ImmatureSignature => JwtError::NotYetValid,
            ErrorKind::InvalidAudience => JwtError::BadAudience,
            ErrorKind::InvalidIssuer => JwtError::BadIssuer,
            ErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim(c.clone()),
            ErrorKind::InvalidClaimFormat(c) => JwtError::BadClaim(c.clone()),
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => JwtError::AlgorithmNotAllowed,
            _ => JwtError::Malformed,
        }
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `jwt:<issuer id>`, the event's `credential_id`.
    pub credential_id: Arc<str>,
    pub consumer_id: String,
    /// Plan for consumers that are not configured.
    pub default_plan: Option<String>,
    /// What the token grants beyond the consumer: its scopes and the headers its claims make.
    pub grants: Arc<Grants>,
}

/// What a verified token carries for the request path besides its consumer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// The token's scopes (`scope`, space-separated, and `scp`, a list or a string), sorted.
    pub scopes: Box<[Box<str>]>,
    /// Headers for the upstream made from its claims (the issuer's `claims_to_headers`).
    pub headers: Box<[(http::HeaderName, http::HeaderValue)]>,
}

impl Grants {
    /// Whether the token grants every one of `required`.
    pub fn has_scopes(&self, required: &[String]) -> bool {
        required.iter().all(|r| self.scopes.binary_search_by(|h| (**h).cmp(r)).is_ok())
    }
}

/// The header value a claim makes: a string as it is, a number or boolean as text, a list of
/// those joined with `,`; `None` for other types, empty lists, values that are not valid
/// header text, or longer than 4 KiB.
pub fn claim_header_value(v: &serde_json::Value) -> Option<http::HeaderValue> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let text = match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(scalar).collect::<Option<Vec<_>>>()?.join(","),
        other => scalar(other)?,
    };
    (text.len() <= 4096).then(|| http::HeaderValue::from_str(&text).ok()).flatten()
}

/// The scopes a token grants: the `scope` claim (RFC 8693, RFC 9068: one string, scopes
/// separated by spaces) and the `scp` claim (a list of strings, or one string, as some
/// issuers write it), sorted and without repeats. Other types grant nothing.
pub fn scopes(claims: &serde_json::Map<String, serde_json::Value>) -> Box<[Box<str>]> {
    use serde_json::Value;
    let mut all: Vec<Box<str>> = Vec::new();
    for claim in ["scope", "scp"] {
        match claims.get(claim) {
            Some(Value::String(s)) => all.extend(s.split(' ').filter(|s| !s.is_empty()).map(Box::from)),
            Some(Value::Array(list)) => {
                all.extend(list.iter().filter_map(Value::as_str).filter(|s| !s.is_empty()).map(Box::from));
            }
            _ => {}
        }
    }
    all.sort_unstable();
    all.dedup();
    all.into()
}

/// A verification's result with the times that bound its validity.
#[derive(Debug)]
struct Accepted {
    verified: Verified,
    exp: u64,
    nbf: u64,
}

/// A verified token remembered by the SHA-256 of the whole token.
#[derive(Debug)]
struct Cached {
    accepted: Accepted,
    issuer: Arc<IssuerState>,
    generation: u64,
}

/// Verified tokens remembered at most; beyond, the cache starts over.
const TOKEN_CACHE_CAPACITY: usize = 16_384;

/// Counters for `/metrics`, shared by every config generation.
#[derive(Debug, Default)]
pub struct JwtStats {
    /// JWKS fetches (background refreshes and unknown-`kid` fetches).
    pub fetches: std::sync::atomic::AtomicU64,
    /// Fetches that failed or timed out.
    pub fetch_failures: std::sync::atomic::AtomicU64,
    /// Tokens accepted from the verified-token cache.
    pub cache_hits: std::sync::atomic::AtomicU64,
}

/// One issuer's rules and current keys.
#[derive(Debug)]
pub struct IssuerState {
    pub cfg: Arc<JwtIssuer>,
    id: Arc<str>,
    credential_id: Arc<str>,
    /// One per allowed algorithm: the library wants the validation's algorithms to share the
    /// key's family, and each token is checked against exactly its own (allowed) algorithm.
    validations: HashMap<Algorithm, Validation>,
    /// Config keys followed by the last JWKS loaded.
    keys: RwLock<Arc<Vec<JwtKey>>>,
    /// When the JWKS was last fetched (successfully or not); guards the unknown-kid cooldown.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// When the background task reloads the JWKS next.
    next_refresh: Mutex<Instant>,
    stats: Arc<JwtStats>,
    /// Bumped whenever the keys change: cached verifications of older generations are void.
    generation: std::sync::atomic::AtomicU64,
}

impl IssuerState {
    fn new(cfg: Arc<JwtIssuer>, previous: Option<&IssuerState>, stats: Arc<JwtStats>) -> Self {
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = cfg.leeway_s;
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = true;
                v.set_audience(&cfg.audiences);
                v.set_issuer(&[&cfg.issuer]);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (alg, v)
            })
            .collect();
        // Keep the keys fetched by the previous config when the source did not change, so a
        // reload does not make tokens fail until the next fetch.
        let carried = previous.filter(|p| p.cfg.jwks.is_some() && p.cfg.jwks == cfg.jwks);
        let mut keys = cfg.keys.clone();
        let mut next_refresh = Instant::now();
        if let Some(p) = carried {
            let old = p.keys();
            keys.extend(old.iter().skip(p.cfg.keys.len()).cloned());
            next_refresh = *p.next_refresh.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Self {
            id: Arc::from(cfg.id.as_str()),
            credential_id: Arc::from(format!("jwt:{}", cfg.id)),
            validations,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: tokio::sync::Mutex::new(None),
            next_refresh: Mutex::new(next_refresh),
            stats,
            generation: std::sync::atomic::AtomicU64::new(0),
            cfg,
        }
    }

    fn keys(&self) -> Arc<Vec<JwtKey>> {
        Arc::clone(&self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn verify_with(&self, token: &str, header_alg: Algorithm, kid: Option<&str>) -> Option<Result<Accepted, JwtError>> {
        let Some(validation) = self.validations.get(&header_alg) else {
            return Some(Err(JwtError::AlgorithmNotAllowed));
        };
        let keys = self.keys();
        let mut tried = false;
        for key in keys.iter().filter(|k| k.matches(header_alg, kid)) {
            tried = true;
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, validation) {
                Ok(data) => {
                    let time = |c: &str| data.claims.get(c).and_then(serde_json::Value::as_f64).map_or(0, |t| t as u64);
                    let (exp, nbf) = (time("exp"), time("nbf"));
                    return Some(self.identity(&data.claims).map(|verified| Accepted { verified, exp, nbf }));
                }
                // Without a kid several keys may match (rotation): try the next one.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
        tried.then_some(Err(JwtError::BadSignature))
    }

    fn identity(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Result<Verified, JwtError> {
        let claim = &self.cfg.consumer_claim;
        let consumer = claims
            .get(claim)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or_else(|| JwtError::NoConsumer(claim.clone()))?;
        Ok(Verified {
            credential_id: Arc::clone(&self.credential_id),
            consumer_id: consumer.to_owned(),
            default_plan: self.cfg.default_plan.clone(),
            grants: Arc::new(Grants {
                scopes: scopes(claims),
                headers: self
                    .cfg
                    .claims_to_headers
                    .iter()
                    .filter_map(|(claim, name)| Some((name.clone(), claim_header_value(claims.get(claim)?)?)))
                    .collect(),
            }),
        })
    }

    /// Fetches the JWKS now unless one was fetched within `min_interval`; single-flight.
    /// Returns whether a fetch happened.
    async fn fetch_jwks(&self, client: &HttpClient, min_interval: Duration) -> bool {
        let Some(source) = &self.cfg.jwks else { return false };
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        self.stats.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let loaded = tokio::time::timeout(self.cfg.jwks_timeout, load(source, client)).await;
        let delay = match loaded {
            Ok(Ok(fresh)) => {
                let mut keys = self.cfg.keys.clone();
                let n = fresh.len();
                keys.extend(fresh);
                *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
                self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                tracing::info!(issuer = %self.id, keys = n, "JWKS loaded");
                self.cfg.jwks_refresh
            }
            Ok(Err(e)) => {
                self.stats.fetch_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(issuer = %self.id, error = %e, "JWKS fetch failed; keeping the keys we have");
                self.cfg.unknown_kid_cooldown.max(Duration::from_secs(1))
            }
            Err(_) => {
                self.stats.fetch_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(issuer = %self.id, timeout_ms = self.cfg.jwks_timeout.as_millis() as u64, "JWKS fetch timed out");
                self.cfg.unknown_kid_cooldown.max(Duration::from_secs(1))
            }
        };
        *self.next_refresh.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now() + delay;
        true
    }
}

async fn load(source: &JwksSource, client: &HttpClient) -> Result<Vec<JwtKey>, String> {
    let bytes = match source {
        JwksSource::File(path) => tokio::fs::read(path).await.map_err(|e| format!("{}: {e}", path.display()))?,
        JwksSource::Url(uri) => {
            let req = http::Request::get(uri.clone())
                .header(http::header::ACCEPT, "application/json")
                .body(Body::empty())
                .map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| format!("{uri}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{uri}: status {}", resp.status()));
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
            body.collect().await.map_err(|e| format!("{uri}: {e}"))?.to_bytes().to_vec()
        }
    };
    parse_jwks(&bytes)
}

/// All trusted issuers, by `iss`.
///
/// Verified tokens are cached (keyed by the SHA-256 of the whole token, so a token differing
/// in any byte is verified afresh): a client reusing its token costs a hash and a map lookup,
/// not a signature check. A hit still checks `exp`/`nbf` against the clock; a key change of
/// the issuer (JWKS refresh) and a config reload void the cache.
#[derive(Debug, Default)]
pub struct Verifier {
    by_iss: HashMap<String, Arc<IssuerState>>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    stats: Arc<JwtStats>,
}

impl Verifier {
    /// Builds the verifier for `issuers`, keeping the JWKS keys of `previous` (a reload) for
    /// issuers whose key source did not change.
    pub fn new(issuers: &[Arc<JwtIssuer>], previous: Option<&Verifier>, stats: &Arc<JwtStats>) -> Self {
        let by_iss = issuers
            .iter()
            .map(|cfg| {
                let old = previous.and_then(|p| p.by_iss.get(&cfg.issuer)).map(Arc::as_ref);
                (cfg.issuer.clone(), Arc::new(IssuerState::new(Arc::clone(cfg), old, Arc::clone(stats))))
            })
            .collect();
        Self { by_iss, cache: Mutex::default(), stats: Arc::clone(stats) }
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Verified> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = cache.get(digest)?;
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = c.issuer.cfg.leeway_s;
        let fresh = c.generation == c.issuer.generation.load(std::sync::atomic::Ordering::Acquire);
        let in_time = c.accepted.exp.saturating_add(leeway) >= now && c.accepted.nbf <= now.saturating_add(leeway);
        (fresh && in_time).then(|| c.accepted.verified.clone())
    }

    fn remember(&self, digest: [u8; 32], accepted: Accepted, issuer: &Arc<IssuerState>, generation: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= TOKEN_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(digest, Cached { accepted, issuer: Arc::clone(issuer), generation });
    }

    pub fn is_empty(&self) -> bool {
        self.by_iss.is_empty()
    }

    /// Verifies `token`. May fetch the issuer's JWKS once (see the module docs).
    pub async fn verify(&self, token: &str, client: &HttpClient) -> Result<Verified, JwtError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.cached(&digest) {
            self.stats.cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(v);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        // RFC 7515 §4.1.11: a token whose `crit` names an extension the recipient does not
        // understand is invalid (one with `"b64": false`, RFC 7797, signs the payload
        // unencoded: read as usual, its signature means something else). jsonwebtoken
        // parses `crit` but leaves it to the caller.
        if header.crit.is_some() {
            return Err(JwtError::CriticalExtension);
        }
        #[derive(serde::Deserialize)]
        struct Iss {
            iss: Option<serde_json::Value>,
        }
        let peek: Iss = jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| JwtError::Malformed)?;
        let iss = match peek.iss {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(JwtError::BadClaim("iss".into())),
            None => return Err(JwtError::MissingIssuer),
        };
        let issuer = self.by_iss.get(&iss).ok_or(JwtError::UnknownIssuer)?;
        if !issuer.cfg.algorithms.contains(&header.alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        let kid = header.kid.as_deref();
        let mut generation = issuer.generation.load(std::sync::atomic::Ordering::Acquire);
        let mut result = issuer.verify_with(token, header.alg, kid);
        // Unknown kid: the issuer may have rotated keys. One fetch per cooldown, whoever asks.
        // (Boxed: a fetch is rare, and its future would otherwise enlarge every request's.)
        if result.is_none() && Box::pin(issuer.fetch_jwks(client, issuer.cfg.unknown_kid_cooldown)).await {
            generation = issuer.generation.load(std::sync::atomic::Ordering::Acquire);
            result = issuer.verify_with(token, header.alg, kid);
        }
        let accepted = result.ok_or(JwtError::UnknownKey)??;
        let verified = accepted.verified.clone();
        self.remember(digest, accepted, issuer, generation);
        Ok(verified)
    }

    /// Reloads the JWKS of every issuer whose refresh time has come (background task).
    pub async fn refresh_due(&self, client: &HttpClient) {
        for issuer in self.by_iss.values() {
            if issuer.cfg.jwks.is_none() {
                continue;
            }
            let due = *issuer.next_refresh.lock().unwrap_or_else(std::sync::PoisonError::into_inner) <= Instant::now();
            if due {
                issuer.fetch_jwks(client, Duration::ZERO).await;
            }
        }
    }

    /// JWKS fetches made so far (by this verifier and others sharing its stats).
    pub fn fetches(&self) -> u64 {
        self.stats.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether a bearer value looks like a JWT (three base64url parts) rather than an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    #[test]
    fn claims_make_header_values_of_scalars_and_lists_only() {
        let v = |j: serde_json::Value| claim_header_value(&j).map(|h| h.to_str().unwrap().to_owned());
        assert_eq!(v(json!("a@example.com")).as_deref(), Some("a@example.com"));
        assert_eq!(v(json!(42)).as_deref(), Some("42"));
        assert_eq!(v(json!(true)).as_deref(), Some("true"));
        assert_eq!(v(json!(["admin", "editor", 3])).as_deref(), Some("admin,editor,3"));
        for none in
            [json!({ "a": 1 }), json!(null), json!([]), json!([["x"]]), json!("line\nbreak"), json!("x".repeat(4097))]
        {
            assert_eq!(v(none.clone()), None, "{none}");
        }
    }

    #[test]
    fn scopes_come_from_scope_and_scp_sorted_without_repeats() {
        let of = |claims: serde_json::Value| {
            scopes(claims.as_object().unwrap()).iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(of(json!({ "scope": "b a  c" })), ["a", "b", "c"]);
        assert_eq!(of(json!({ "scp": ["b", "a", ""] })), ["a", "b"]);
        assert_eq!(of(json!({ "scope": "a b", "scp": ["b", "c"] })), ["a", "b", "c"]);
        assert_eq!(of(json!({ "scp": "x y" })), ["x", "y"]);
        assert!(of(json!({ "scope": 7, "scp": { "a": 1 } })).is_empty());
        assert!(of(json!({})).is_empty());
    }

    const ISS: &str = "https://issuer.test/";
    const AUD: &str = "tollgate-api";
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";

    fn testdata(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/testdata/jwt/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn issuer(id: &str, iss: &str, algorithms: Vec<Algorithm>, keys: Vec<JwtKey>) -> Arc<JwtIssuer> {
        Arc::new(JwtIssuer {
            id: id.into(),
            issuer: iss.into(),
            audiences: vec![AUD.into()],
            algorithms,
            consumer_claim: "sub".into(),
            leeway_s: 60,
            default_plan: None,
            keys,
            jwks: None,
            jwks_refresh: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(30),
            jwks_timeout: Duration::from_secs(1),
            claims_to_headers: Vec::new(),
        })
    }

    fn verifier() -> Verifier {
        let pk = |kid: &str, alg, file| JwtKey::from_pem(Some(kid.into()), alg, &testdata(file)).unwrap();
        let main = issuer(
            "main",
            ISS,
            vec![Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
            vec![
                pk("es", Algorithm::ES256, "es256.pub.pem"),
                pk("rs", Algorithm::RS256, "rs256.pub.pem"),
                pk("ed", Algorithm::EdDSA, "eddsa.pub.pem"),
            ],
        );
        let hs = issuer(
            "hs",
            "https://hs.test/",
            vec![Algorithm::HS256],
            vec![JwtKey::from_secret(None, Algorithm::HS256, SECRET).unwrap()],
        );
        Verifier::new(&[main, hs], None, &Arc::default())
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn claims() -> serde_json::Value {
        json!({ "iss": ISS, "aud": AUD, "sub": "acme", "exp": now() + 600, "iat": now() })
    }

    fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &serde_json::Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, key).unwrap()
    }

    fn es(claims: &serde_json::Value) -> String {
        sign(Algorithm::ES256, Some("es"), &EncodingKey::from_ec_pem(&testdata("es256.key.pem")).unwrap(), claims)
    }

    fn with(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> serde_json::Value {
        let mut c = claims();
        f(c.as_object_mut().unwrap());
        c
    }

    #[tokio::test]
    async fn accepted_tokens_name_their_consumer() {
        let v = verifier();
        let client = crate::proxy::client(Duration::from_secs(1), &crate::tls::client_config(&[]).unwrap());
        let rs = sign(
            Algorithm::RS256,
            Some("rs"),
            &EncodingKey::from_rsa_pem(&testdata("rs256.key.pem")).unwrap(),
            &claims(),
        );
        let ed = sign(
            Algorithm::EdDSA,
            Some("ed"),
            &EncodingKey::from_ed_pem(&testdata("eddsa.key.pem")).unwrap(),
            &claims(),
        );
        let hs_claims = with(|c| {
            c.insert("iss".into(), json!("https://hs.test/"));
        });
        let hs = sign(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET), &hs_claims);
        // Expired 30 s ago: within the 60 s leeway.
        let leeway = es(&with(|c| {
            c.insert("exp".into(), json!(now() - 30));
        }));
        // No kid: the keys of the algorithm's family are tried.
        let no_kid =
            sign(Algorithm::ES256, None, &EncodingKey::from_ec_pem(&testdata("es256.key.pem")).unwrap(), &claims());
        for (name, token, cred) in [
            ("ES256", es(&claims()), "jwt:main"),
            ("RS256", rs, "jwt:main"),
            ("EdDSA", ed, "jwt:main"),
            ("HS256", hs, "jwt:hs"),
            ("expired within leeway", leeway, "jwt:main"),
            ("no kid", no_kid, "jwt:main"),
        ] {
            let got = v.verify(&token, &client).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.consumer_id, "acme", "{name}");
            assert_eq!(&*got.credential_id, cred, "{name}");
        }
    }

    #[tokio::test]
    async fn refused_tokens_table() {
        let v = verifier();
        let client = crate::proxy::client(Duration::from_secs(1), &crate::tls::client_config(&[]).unwrap());
        let valid = es(&claims());
        let parts: Vec<&str> = valid.split('.').collect();
        // {"alg":"none","typ":"JWT"}
        let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        // The classic confusion: HS256 "signed" with the issuer's RSA public key as secret.
        let confused =
            sign(Algorithm::HS256, Some("rs"), &EncodingKey::from_secret(&testdata("rs256.pub.pem")), &claims());
        let wrong_key = sign(
            Algorithm::ES256,
            Some("es"),
            &EncodingKey::from_ec_pem(&testdata("es256-other.key.pem")).unwrap(),
            &claims(),
        );
        let other = es(&with(|c| {
            c.insert("sub".into(), json!("someone-else"));
        }));
        let tampered = format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2]);
        let unknown_kid = sign(
            Algorithm::ES256,
            Some("nope"),
            &EncodingKey::from_ec_pem(&testdata("es256.key.pem")).unwrap(),
            &claims(),
        );
        let table: Vec<(&str, String, JwtError)> = vec![
            ("alg none", alg_none, JwtError::Malformed),
            ("HS256 signed with the RS public key", confused, JwtError::AlgorithmNotAllowed),
            ("wrong key", wrong_key, JwtError::BadSignature),
            ("tampered claims", tampered, JwtError::BadSignature),
            (
                "exp as a string",
                es(&with(|c| {
                    c.insert("exp".into(), json!("9999999999"));
                })),
                JwtError::MissingClaim("exp".into()),
            ),
            (
                "missing exp",
                es(&with(|c| {
                    c.remove("exp");
                })),
                JwtError::MissingClaim("exp".into()),
            ),
            (
                "expired beyond leeway",
                es(&with(|c| {
                    c.insert("exp".into(), json!(now() - 120));
                })),
                JwtError::Expired,
            ),
            (
                "nbf beyond leeway",
                es(&with(|c| {
                    c.insert("nbf".into(), json!(now() + 120));
                })),
                JwtError::NotYetValid,
            ),
            (
                "wrong aud",
                es(&with(|c| {
                    c.insert("aud".into(), json!("other-api"));
                })),
                JwtError::BadAudience,
            ),
            (
                "missing aud",
                es(&with(|c| {
                    c.remove("aud");
                })),
                JwtError::MissingClaim("aud".into()),
            ),
            (
                "wrong iss",
                es(&with(|c| {
                    c.insert("iss".into(), json!("https://evil.test/"));
                })),
                JwtError::UnknownIssuer,
            ),
            (
                "missing iss",
                es(&with(|c| {
                    c.remove("iss");
                })),
                JwtError::MissingIssuer,
            ),
            ("unknown kid", unknown_kid, JwtError::UnknownKey),
            (
                "no consumer claim",
                es(&with(|c| {
                    c.remove("sub");
                })),
                JwtError::NoConsumer("sub".into()),
            ),
            ("not a JWT", "a.b.c".into(), JwtError::Malformed),
            (
                "critical extension",
                {
                    let mut h = Header::new(Algorithm::ES256);
                    h.kid = Some("es".into());
                    h.crit = Some(vec!["exp".into()]);
                    encode(&h, &claims(), &EncodingKey::from_ec_pem(&testdata("es256.key.pem")).unwrap()).unwrap()
                },
                JwtError::CriticalExtension,
            ),
        ];
        for (name, token, want) in table {
            let got = v.verify(&token, &client).await;
            assert_eq!(got, Err(want), "{name}");
            // What the client is told never contains the token.
            assert!(!got.unwrap_err().to_string().contains(&token), "{name}");
        }
        assert_eq!(v.fetches(), 0, "no JWKS source: nothing to fetch");
    }

    #[tokio::test]
    async fn cached_tokens_still_expire_and_a_changed_byte_is_verified_afresh() {
        let key = JwtKey::from_pem(Some("es".into()), Algorithm::ES256, &testdata("es256.pub.pem")).unwrap();
        let mut cfg = (*issuer("strict", ISS, vec![Algorithm::ES256], vec![key])).clone();
        cfg.leeway_s = 0;
        let v = Verifier::new(&[Arc::new(cfg)], None, &Arc::default());
        let client = crate::proxy::client(Duration::from_secs(1), &crate::tls::client_config(&[]).unwrap());
        let short = es(&with(|c| {
            c.insert("exp".into(), json!(now() + 1));
        }));
        assert!(v.verify(&short, &client).await.is_ok());
        assert!(v.verify(&short, &client).await.is_ok(), "served from the cache");
        assert_eq!(v.stats.cache_hits.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(v.cache.lock().unwrap().len(), 1);
        // The cached token's signature with other claims is still checked.
        let parts: Vec<&str> = short.split('.').collect();
        let other = es(&with(|c| {
            c.insert("sub".into(), json!("mallory"));
        }));
        let forged = format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2]);
        assert_eq!(v.verify(&forged, &client).await, Err(JwtError::BadSignature));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(v.verify(&short, &client).await, Err(JwtError::Expired), "the cache honours exp");
    }

    #[test]
    fn jwks_documents_give_usable_keys_and_skip_the_rest() {
        let es = EncodingKey::from_ec_pem(&testdata("es256.key.pem")).unwrap();
        let mut jwk = Jwk::from_encoding_key(&es, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("es".into());
        let doc = json!({ "keys": [jwk, { "kty": "weird" }, { "kty": "oct", "k": "AAAA", "use": "enc" }] });
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("es"));
        assert!(keys[0].matches(Algorithm::ES256, Some("es")));
        assert!(!keys[0].matches(Algorithm::RS256, Some("es")));
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"nope").is_err());
    }
}
