//! Demo traffic: consumers with their keys, requests with bad keys, and over-limit bursts.
//! Every response is tallied by (consumer label, status), with its `x-request-id`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

/// One kind of request in the mix.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Label in the tally (the consumer id, or e.g. `bad-key`).
    pub label: String,
    /// API key or JWT sent as `Authorization: Bearer`; `None` sends no credential.
    pub key: Option<String>,
    /// Requests to send.
    pub requests: usize,
    /// Concurrent requests in flight for this caller (a burst when high).
    pub concurrency: usize,
    /// Pause between two requests of one worker.
    pub pause: Duration,
    /// Path (and query) to call.
    pub path: String,
}

/// What the client saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// (label, status) → count.
    pub by_status: BTreeMap<(String, u16), u64>,
    /// Every `x-request-id` received, with its label and status.
    pub request_ids: Vec<(String, String, u16)>,
    /// Requests that got no HTTP response at all.
    pub transport_errors: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.transport_errors
    }
}

/// The keys of the demo consumers in `config/demo/edge.toml` (demo only: real keys are
/// never written down, only their hashes).
pub const DEMO_KEYS: [(&str, &str); 3] = [
    ("acme", "tg_demo_acme_7f3a9c1e2b"),
    ("globex", "tg_demo_globex_4d8e6a0f1c"),
    ("initech", "tg_demo_initech_9b2c5e7a3d"),
];

/// Issuer, audience and signing key of the demo JWT issuer in `config/demo/edge.toml`
/// (demo only).
pub const DEMO_JWT_ISSUER: &str = "https://auth.demo.tollgate.dev/";
pub const DEMO_JWT_AUDIENCE: &str = "tollgate-demo";
const DEMO_JWT_KEY: &[u8] = include_bytes!("../../config/demo/jwt/demo-es256.key.pem");

/// An ES256 JWT from the demo issuer for `consumer`, valid for a day.
pub fn demo_jwt(consumer: &str) -> Option<String> {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(DEMO_JWT_KEY).ok()?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": DEMO_JWT_ISSUER, "aud": DEMO_JWT_AUDIENCE, "sub": consumer, "iat": now, "exp": now + 86_400,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("demo-1".into());
    jsonwebtoken::encode(&header, &claims, &key).ok()
}

/// The demo mix: steady traffic from three API-key consumers and one JWT consumer,
/// unauthenticated and bad-key calls, and a burst from `initech` well above its plan's rate.
pub fn demo_mix(scale: usize) -> Vec<Caller> {
    let key = |i: usize| Some(DEMO_KEYS[i].1.to_owned());
    let steady = |label: &str, k, n| Caller {
        label: label.into(),
        key: k,
        requests: n,
        concurrency: 2,
        pause: Duration::from_millis(5),
        path: "/echo/items?page=1".into(),
    };
    vec![
        steady("acme", key(0), 40 * scale),
        steady("globex", key(1), 25 * scale),
        steady("initech", key(2), 10 * scale),
        steady("umbrella", demo_jwt("umbrella"), 15 * scale),
        Caller {
            label: "bad-key".into(),
            key: Some("tg_wrong_0000000000".into()),
            requests: 5 * scale,
            concurrency: 1,
            pause: Duration::from_millis(10),
            path: "/echo/items".into(),
        },
        Caller {
            label: "no-key".into(),
            key: None,
            requests: 3 * scale,
            concurrency: 1,
            pause: Duration::from_millis(10),
            path: "/echo/items".into(),
        },
        Caller {
            label: "initech".into(),
            key: key(2),
            requests: 30 * scale,
            concurrency: 16,
            pause: Duration::ZERO,
            path: "/echo/burst".into(),
        },
        // The upstream failing for one consumer's calls: the demo's SLO alerts fire.
        Caller {
            label: "globex".into(),
            key: key(1),
            requests: 4 * scale,
            concurrency: 1,
            pause: Duration::from_millis(10),
            path: "/echo/items?status=503".into(),
        },
    ]
}

/// Sends every caller's requests to `base` (e.g. `http://127.0.0.1:8080`) and tallies.
pub async fn run(base: &str, callers: Vec<Caller>) -> Tally {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for caller in callers {
        let caller = Arc::new(caller);
        let per_worker = caller.requests / caller.concurrency.max(1);
        let extra = caller.requests % caller.concurrency.max(1);
        for w in 0..caller.concurrency.max(1) {
            let n = per_worker + usize::from(w < extra);
            let (client, tally, caller, base) =
                (client.clone(), Arc::clone(&tally), Arc::clone(&caller), base.to_owned());
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    let mut builder =
                        Request::get(format!("{base}{}", caller.path)).header("user-agent", "tollgate-demo-traffic/1");
                    if let Some(k) = &caller.key {
                        builder = builder.header("authorization", format!("Bearer {k}"));
                    }
                    let Ok(req) = builder.body(Full::new(Bytes::new())) else { continue };
                    match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let id = resp
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let _ = resp.into_body().collect().await;
                            let mut t = tally.lock().await;
                            *t.by_status.entry((caller.label.clone(), status)).or_default() += 1;
                            t.request_ids.push((id, caller.label.clone(), status));
                        }
                        Err(_) => tally.lock().await.transport_errors += 1,
                    }
                    if !caller.pause.is_zero() {
                        tokio::time::sleep(caller.pause).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }

    tally.lock().await.clone()
}
