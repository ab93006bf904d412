//! JWT authentication through the real edge: keys from a JWKS served over HTTP (and, for a
//! second issuer, from a JWKS file), consumers from the `sub` claim (configured ones keep
//! their plan, others get the issuer's default plan), key rotation picked up on an unknown
//! `kid`, and a flood of random `kid`s costing at most one JWKS fetch per cooldown. The token-level rules (algorithms, exp/nbf/aud/iss,
//! leeway) are the table in `edge/src/auth/jwt.rs`; here each kind of refusal is seen as a
//! 401 with `WWW-Authenticate` and metered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tollgate_e2e::*;
use tollgate_schemas::Outcome;

const ISS: &str = "https://issuer.e2e/";
const AUD: &str = "tollgate-e2e";
const COOLDOWN_S: u64 = 3;

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("edge/testdata/jwt").join(name)).unwrap()
}

/// A JWKS endpoint whose key set the test can change; counts the fetches.
struct Jwks {
    keys: Mutex<Vec<Jwk>>,
    fetches: AtomicU64,
}

async fn serve_jwks(jwks: Arc<Jwks>) -> std::net::SocketAddr {
    serve_http(move |_req| {
        let jwks = Arc::clone(&jwks);
        async move {
            jwks.fetches.fetch_add(1, Ordering::SeqCst);
            let doc = serde_json::json!({ "keys": *jwks.keys.lock().unwrap() });
            http::Response::new(Full::new(Bytes::from(doc.to_string())))
        }
    })
    .await
}

fn jwk(private_pem: &[u8], alg: Algorithm, kid: &str) -> Jwk {
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem).unwrap(),
        _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

fn token(alg: Algorithm, kid: &str, private_pem: &[u8], sub: &str) -> String {
    token_from(ISS, alg, kid, private_pem, sub)
}

fn token_from(iss: &str, alg: Algorithm, kid: &str, private_pem: &[u8], sub: &str) -> String {
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem).unwrap(),
        _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
    };
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({ "iss": iss, "aud": AUD, "sub": sub, "exp": now + 600, "iat": now });
    jsonwebtoken::encode(&h, &claims, &key).unwrap()
}

/// The second issuer's keys: a JWKS file.
const FILE_ISS: &str = "https://file-issuer.e2e/";

fn config(topic: &str, upstream: std::net::SocketAddr, jwks: std::net::SocketAddr, jwks_file: &Path) -> String {
    let head = edge_head("edge-jwt", topic);
    format!(
        r#"{head}
[[routes]]
id = "jwt"
path_prefix = "/jwt"
upstream = "http://{upstream}"
auth = "jwt"
[[routes]]
id = "key"
path_prefix = "/key"
upstream = "http://{upstream}"
[[routes]]
id = "any"
path_prefix = "/any"
upstream = "http://{upstream}"
auth = "api_key_or_jwt"
[plans.big]
rate_per_second = 10000
[plans.free]
rate_per_second = 100
[[consumers]]
id = "acme"
plan = "big"
keys = [{{ id = "acme-1", sha256 = "{a}" }}]
[[jwt.issuers]]
id = "e2e"
issuer = "{ISS}"
audiences = ["{AUD}"]
algorithms = ["ES256", "EdDSA"]
default_plan = "free"
jwks_url = "http://{jwks}/.well-known/jwks.json"
unknown_kid_cooldown_s = {COOLDOWN_S}
[[jwt.issuers]]
id = "e2e-file"
issuer = "{FILE_ISS}"
audiences = ["{AUD}"]
algorithms = ["ES256"]
default_plan = "free"
jwks_file = "{f}"
"#,
        a = sha256_hex("key-acme"),
        f = jwks_file.display(),
    )
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: serde_json::Value,
    raw: String,
}

async fn call(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = http::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client.request(b.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    Answer { status, headers, body: serde_json::from_slice(&bytes).unwrap_or_default(), raw }
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_consumers_jwks_rotation_and_kid_flood() {
    let dir = TempDir::new("e2e_edge_jwt");
    let topic = unique("edge_jwt");
    create_topic(&topic, 1).await;
    let (upstream, echo) = start_echo().await;
    let (es, ed, es2) = (key_file("es256.key.pem"), key_file("eddsa.key.pem"), key_file("es256-other.key.pem"));
    let jwks = Arc::new(Jwks {
        keys: Mutex::new(vec![jwk(&es, Algorithm::ES256, "es-1"), jwk(&ed, Algorithm::EdDSA, "ed-1")]),
        fetches: AtomicU64::new(0),
    });
    let jwks_addr = serve_jwks(Arc::clone(&jwks)).await;
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, serde_json::json!({ "keys": [jwk(&es2, Algorithm::ES256, "file-1")] }).to_string())
        .unwrap();
    let (mut edge, addr, admin) =
        start_edge(dir.path(), "edge", &config(&topic, upstream, jwks_addr, &jwks_file)).await;
    // The background refresh loads the key set at start.
    assert!(wait_until(Duration::from_secs(10), || async { jwks.fetches.load(Ordering::SeqCst) >= 1 }).await);
    let started = Instant::now();
    let mut expected: Vec<(String, u16, Option<&str>, Option<&str>)> = Vec::new();
    let mut note = |a: &Answer, consumer: Option<&'static str>, credential: Option<&'static str>| {
        expected.push((a.headers["x-request-id"].to_str().unwrap().to_owned(), a.status, consumer, credential));
    };

    // A configured consumer: its own plan; the credential never reaches the upstream.
    let t = token(Algorithm::ES256, "es-1", &es, "acme");
    let a = call(addr, "/jwt/a", &[("authorization", &bearer(&t))]).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["headers"]["x-consumer-id"], "acme");
    assert!(a.body["headers"].get("authorization").is_none());
    assert_eq!(a.headers["x-ratelimit-limit"], "10000");
    note(&a, Some("acme"), Some("jwt:e2e"));

    // A consumer only the issuer knows: the issuer's default plan (free: 100).
    let t = token(Algorithm::EdDSA, "ed-1", &ed, "newco");
    let a = call(addr, "/any/b", &[("authorization", &bearer(&t))]).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["headers"]["x-consumer-id"], "newco");
    assert_eq!(a.headers["x-ratelimit-limit"], "100");
    note(&a, Some("newco"), Some("jwt:e2e"));
    // The second issuer, keys from its JWKS file: its own key and issuer only.
    let t = token_from(FILE_ISS, Algorithm::ES256, "file-1", &es2, "fileco");
    let a = call(addr, "/jwt/f", &[("authorization", &bearer(&t))]).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["headers"]["x-consumer-id"], "fileco");
    note(&a, Some("fileco"), Some("jwt:e2e-file"));
    for (name, t) in [
        ("signed with another key", token_from(FILE_ISS, Algorithm::ES256, "file-1", &es, "fileco")),
        ("a kid not in the file", token_from(FILE_ISS, Algorithm::ES256, "file-2", &es2, "fileco")),
        // (The other issuer's kid and key: that issuer's keys are not this one's.)
        ("another issuer's key", token_from(FILE_ISS, Algorithm::ES256, "es-1", &es, "fileco")),
    ] {
        let a = call(addr, "/jwt/f", &[("authorization", &bearer(&t))]).await;
        assert_eq!(a.status, 401, "{name}: {}", a.raw);
        note(&a, None, None);
    }
    // The API key still works where keys are accepted.
    let a = call(addr, "/any/c", &[("x-api-key", "key-acme")]).await;
    assert_eq!(a.status, 200);
    note(&a, Some("acme"), Some("acme-1"));

    // Refusals: each a 401 problem with WWW-Authenticate and no token in the body.
    let valid = token(Algorithm::ES256, "es-1", &es, "acme");
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", valid.split('.').nth(1).unwrap());
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("two credentials", vec![("authorization", bearer(&valid)), ("x-api-key", "key-acme".into())]),
        ("two tokens", vec![("authorization", bearer(&valid)), ("authorization", bearer(&valid))]),
        ("alg none", vec![("authorization", bearer(&none))]),
        ("API key on a JWT-only route", vec![("x-api-key", "key-acme".into())]),
        ("wrong key", vec![("authorization", bearer(&token(Algorithm::ES256, "es-1", &es2, "acme")))]),
        ("no credential", vec![]),
    ];
    for (name, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = call(addr, "/jwt/x", &h).await;
        assert_eq!(a.status, 401, "{name}: {}", a.raw);
        assert_eq!(a.headers["content-type"], "application/problem+json", "{name}");
        assert!(a.headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"), "{name}");
        assert!(!a.raw.contains(&valid) && !a.raw.contains("key-acme"), "{name}: {}", a.raw);
        note(&a, None, None);
    }
    let a = call(addr, "/key/x", &[("authorization", &bearer(&valid))]).await;
    assert_eq!(a.status, 401, "a JWT on an API-key route: {}", a.raw);
    note(&a, None, None);

    // Rotation: the issuer publishes a new key; a token signed with it is accepted once the
    // cooldown since the last fetch has passed (one fetch, on the unknown kid).
    jwks.keys.lock().unwrap().push(jwk(&es2, Algorithm::ES256, "es-2"));
    tokio::time::sleep(Duration::from_secs(COOLDOWN_S).saturating_sub(started.elapsed()) + Duration::from_millis(200))
        .await;
    let before = jwks.fetches.load(Ordering::SeqCst);
    let a =
        call(addr, "/jwt/rotated", &[("authorization", &bearer(&token(Algorithm::ES256, "es-2", &es2, "acme")))]).await;
    assert_eq!(a.status, 200, "rotated key: {}", a.raw);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), before + 1);
    note(&a, Some("acme"), Some("jwt:e2e"));

    // A flood of random kids right after: refused, and at most one fetch per cooldown.
    let before = jwks.fetches.load(Ordering::SeqCst);
    let flood_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let t = token(Algorithm::ES256, &format!("random-{i}-{:x}", rand::random::<u64>()), &es, "acme");
        tasks.push(tokio::spawn(async move { call(addr, "/jwt/flood", &[("authorization", &bearer(&t))]).await }));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 401, "{}", a.raw);
        note(&a, None, None);
    }
    let fetched = jwks.fetches.load(Ordering::SeqCst) - before;
    let allowed = 1 + flood_start.elapsed().as_secs() / COOLDOWN_S;
    assert!(fetched <= allowed, "{fetched} JWKS fetches for 60 random kids in {:?}", flood_start.elapsed());
    // The metric also counts the file issuer's reads of its file: at start, and at most once
    // more for its unknown kid (within the default cooldown).
    let file_reads = metric(admin, "tollgate_edge_jwks_fetches_total").await - jwks.fetches.load(Ordering::SeqCst);
    assert!((1..=2).contains(&file_reads), "{file_reads} JWKS file reads");
    // Limiters exist for the consumers that got through (acme, newco, fileco), none for
    // refusals.
    assert_eq!(metric(admin, "tollgate_edge_limiters").await, 3);

    // Every call was metered with the consumer and credential the edge decided on.
    let n = expected.len();
    let events = read_events(&topic, |e| e.len() >= n).await;
    assert_eq!(events.len(), n);
    for (id, status, consumer, credential) in &expected {
        let e = events.iter().find(|e| e.event_id.to_string() == *id).unwrap_or_else(|| panic!("no event {id}"));
        assert_eq!(e.status, *status, "{id}");
        assert_eq!(e.consumer_id.as_deref(), *consumer, "{id}");
        assert_eq!(e.credential_id.as_deref(), *credential, "{id}");
        let outcome = if *status == 200 { Outcome::Forwarded } else { Outcome::Unauthenticated };
        assert_eq!(e.outcome, outcome, "{id}");
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 5, "only accepted calls reach the upstream");
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
}

/// An ES256 token of `ISS` for `sub` with `extra` claims (e.g. `scope`, `scp`).
fn token_with(sub: &str, extra: serde_json::Value) -> String {
    let key = EncodingKey::from_ec_pem(&key_file("es256.key.pem")).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({ "iss": ISS, "aud": AUD, "sub": sub, "exp": now + 600, "iat": now });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap()
}

/// `routes[].required_scopes`: a JWT must grant every scope the route names, in its `scope`
/// claim (space-separated) or its `scp` claim (a list); else 403 with RFC 6750's
/// `insufficient_scope` challenge, metered as `forbidden` with its consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_required_scopes_take_only_tokens_that_grant_them() {
    let dir = TempDir::new("e2e_jwt_scopes");
    let topic = unique("jwt_scopes");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"http://{upstream}\"\nauth = \"jwt\"\n\
         required_scopes = [\"orders:read\", \"orders:write\"]\n\
         [[routes]]\nid = \"open\"\npath_prefix = \"/open\"\nupstream = \"http://{upstream}\"\nauth = \"jwt\"\n\
         [[routes]]\nid = \"key\"\npath_prefix = \"/key\"\nupstream = \"http://{upstream}\"\n\
         [plans.free]\nrate_per_second = 1000\n\
         [[consumers]]\nid = \"acme\"\nplan = \"free\"\nkeys = [{{ id = \"acme-1\", sha256 = \"{}\" }}]\n\
         [[jwt.issuers]]\nid = \"e2e\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\nalgorithms = [\"ES256\"]\n\
         default_plan = \"free\"\nkeys = [{{ alg = \"ES256\", pem_file = \"{}\" }}]\n\
         claims_to_headers = {{ email = \"x-user-email\", roles = \"x-user-roles\" }}\n",
        edge_head("edge-jwt-scopes", &topic),
        sha256_hex("key-acme"),
        repo_root().join("edge/testdata/jwt/es256.pub.pem").display()
    );
    let (mut edge, addr, _admin) = start_edge(dir.path(), "edge", &cfg).await;
    let with = |claims: serde_json::Value| bearer(&token_with("u-1", claims));

    // Granted: by `scope` (more than needed is fine) or by `scp`.
    let both = with(serde_json::json!({ "scope": "profile orders:write orders:read" }));
    assert_eq!(call(addr, "/orders/1", &[("authorization", &both)]).await.status, 200);
    let listed = with(serde_json::json!({ "scp": ["orders:read", "orders:write"] }));
    assert_eq!(call(addr, "/orders/2", &[("authorization", &listed)]).await.status, 200);
    let split = with(serde_json::json!({ "scope": "orders:read", "scp": "orders:write" }));
    assert_eq!(call(addr, "/orders/3", &[("authorization", &split)]).await.status, 200);

    // Missing one, or all: 403 naming what is needed.
    for claims in
        [serde_json::json!({ "scope": "orders:read" }), serde_json::json!({}), serde_json::json!({ "scope": 7 })]
    {
        let a = call(addr, "/orders/4", &[("authorization", &with(claims.clone()))]).await;
        assert_eq!(a.status, 403, "{claims}: {}", a.raw);
        assert_eq!(a.body["type"], "https://tollgate.dev/problems/insufficient-scope");
        assert_eq!(
            a.headers["www-authenticate"],
            "Bearer realm=\"tollgate\", error=\"insufficient_scope\", scope=\"orders:read orders:write\""
        );
    }
    // A route without required scopes takes the token without any.
    assert_eq!(call(addr, "/open/x", &[("authorization", &with(serde_json::json!({})))]).await.status, 200);

    // `claims_to_headers`: the upstream gets the token's claims as headers, never a client's
    // own value under those names (with a JWT lacking the claim, or with an API key).
    let claims = with(serde_json::json!({ "email": "u1@example.com", "roles": ["admin", "editor"] }));
    let a = call(addr, "/open/claims", &[("authorization", &claims), ("x-user-email", "forged@example.com")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["headers"]["x-user-email"], "u1@example.com", "{}", a.raw);
    assert_eq!(a.body["headers"]["x-user-roles"], "admin,editor");
    let a = call(
        addr,
        "/open/none",
        &[("authorization", &with(serde_json::json!({}))), ("x-user-email", "forged@example.com")],
    )
    .await;
    assert!(a.body["headers"].get("x-user-email").is_none(), "{}", a.raw);
    let a = call(addr, "/key/x", &[("x-api-key", "key-acme"), ("x-user-roles", "admin")]).await;
    assert_eq!(a.status, 200);
    assert!(a.body["headers"].get("x-user-roles").is_none(), "{}", a.raw);

    let events = read_events(&topic, |e| e.len() >= 10).await;
    let refused: Vec<_> = events.iter().filter(|e| e.status == 403).collect();
    assert_eq!(refused.len(), 3);
    for e in refused {
        assert_eq!(
            (e.outcome, e.consumer_id.as_deref(), e.route_id.as_deref()),
            (Outcome::Forbidden, Some("u-1"), Some("orders"))
        );
    }
    assert!(edge.terminate(Duration::from_secs(15)));
}
