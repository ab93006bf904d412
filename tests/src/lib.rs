//! Helpers for the end-to-end tests: the real binaries, the real local broker and ClickHouse.
//! Every test works in its own topic, consumer group and ClickHouse database, so tests run
//! in parallel. The stack must be up (`scripts/test.sh` starts it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Kafka bootstrap servers of the local stack.
pub fn kafka() -> String {
    std::env::var("TOLLGATE_TEST_KAFKA").unwrap_or_else(|_| {
        format!("127.0.0.1:{}", std::env::var("TOLLGATE_KAFKA_PORT").unwrap_or_else(|_| "9092".into()))
    })
}

/// ClickHouse HTTP URL of the local stack.
pub fn clickhouse() -> String {
    std::env::var("TOLLGATE_TEST_CLICKHOUSE").unwrap_or_else(|_| {
        format!("http://127.0.0.1:{}", std::env::var("TOLLGATE_CH_HTTP_PORT").unwrap_or_else(|_| "8123".into()))
    })
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A name unique to this test run: `prefix_<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Path of a workspace binary (built by `cargo build --bins`, which scripts/test.sh runs).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-exe> → target/<profile>/<name>
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built; run `cargo build --workspace --bins` (scripts/test.sh does)", path.display());
    path
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // TOLLGATE_TEST_KEEP=1 keeps logs and configs for debugging; a failing test keeps
        // them too (the assertion shows only the logs' tails).
        if std::env::var_os("TOLLGATE_TEST_KEEP").is_some() || std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name: name.to_owned(), child, log }
    }

    /// SIGKILL, and wait.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`TERM`, `HUP`...) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(sent.is_ok_and(|s| s.success()), "cannot send SIG{signal} to {}", self.name);
    }

    /// Waits up to `timeout` for the process to exit; its exit status, or `None`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and wait up to `timeout` (then SIGKILL). Returns true if it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal("TERM");
        if self.wait(timeout).is_some() {
            return true;
        }
        self.kill9();
        false
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Creates a topic on the local broker.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&kafka(), name, partitions).await;
}

/// Creates a topic on the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .unwrap();
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// A producer to the local broker (acks=all).
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // As the edge: anonymous events (empty key) in one partition, so that aggregator
        // replicas own whole consumers (tollgate_edge::metering::producer).
        .set("partitioner", "consistent")
        .create()
        .unwrap()
}

/// Produces `payloads` to `topic` with `key`, waiting for every acknowledgement.
pub async fn produce_all(producer: &FutureProducer, topic: &str, items: &[(String, Vec<u8>)]) {
    // `send_result` enqueues at once (`send` would only enqueue when awaited, one by one).
    let mut pending = Vec::with_capacity(items.len());
    for (key, payload) in items {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "produce: {e}"
                    );
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for f in pending {
        f.await.expect("delivery canceled").unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

/// Runs a ClickHouse query over HTTP and returns the body (use `FORMAT TSV`). Panics on error.
pub async fn ch(url: &str, sql: &str) -> String {
    try_ch(url, sql).await.unwrap_or_else(|e| panic!("ClickHouse query failed: {e}\n{sql}"))
}

/// Runs a ClickHouse query; `Err` with the server's message on failure.
pub async fn try_ch(url: &str, sql: &str) -> Result<String, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(url).body(Full::new(Bytes::from(sql.to_owned()))).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() { Ok(text) } else { Err(text) }
}

/// A single number from a query.
pub async fn ch_u64(url: &str, sql: &str) -> u64 {
    ch(url, sql).await.trim().parse().unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Polls `check` until it returns true or `timeout` passes; returns the last result.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the demo echo upstream in-process; returns its address and request counter.
pub async fn start_echo() -> (std::net::SocketAddr, Arc<tollgate_demo::upstream::EchoStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(tollgate_demo::upstream::EchoStats::default());
    tokio::spawn(tollgate_demo::upstream::serve(listener, Arc::clone(&stats)));
    (addr, stats)
}

/// An ingest process for `topic` writing to `database`.
pub fn ingest_config(topic: &str, database: &str, group: &str, ch_url: &str) -> String {
    ingest_config_on(&kafka(), topic, database, group, ch_url)
}

/// A `[kafka.properties]` table giving a consumer a 10 s group session, for tests whose group
/// coordinator is librdkafka's mock cluster: the mock holds a JoinGroup for the session timeout
/// less 1 s and answers nothing else on that connection meanwhile, so under the 45 s default a
/// stall watchdog's own requests time out (and it names that as the stall); with 10 s they are
/// answered and it can tell what is wrong. Append it to a config that has no such table.
pub const MOCK_GROUP_SESSION: &str = "[kafka.properties]\n\"session.timeout.ms\" = \"10000\"\n";

/// Like [`ingest_config`], for the broker at `brokers`.
pub fn ingest_config_on(brokers: &str, topic: &str, database: &str, group: &str, ch_url: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\ndlq_topic = \"{topic}.dlq\"\ngroup_id = \"{group}\"\ninstance_id = \"{group}-0\"\n\
         [clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{database}\"\n\
         [batch]\nmax_rows = 2000\nmax_wait_ms = 200\n\
         [retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n",
        brokers
    )
}

/// `config` (of ingest or the aggregator) with an admin port on a free local port, and that
/// port's address.
pub fn with_admin(config: &str) -> (String, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (format!("{config}\n[admin]\nlisten = \"{addr}\"\n"), addr)
}

/// Starts `tollgate-ingest run` with `config` (TOML text).
pub fn start_ingest(dir: &Path, name: &str, config: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    Proc::spawn(
        name,
        Command::new(bin("tollgate-ingest"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", std::env::var("TOLLGATE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into())),
        dir.join(format!("{name}.log")),
    )
}

/// Starts `tollgate-edge run` with `config`; waits until it listens. Returns the process and
/// its request address.
pub async fn start_edge(dir: &Path, name: &str, config: &str) -> (Proc, std::net::SocketAddr, std::net::SocketAddr) {
    let cfg = dir.join(format!("{name}.toml"));
    let ready = dir.join(format!("{name}.ready"));
    let mut config = config.to_owned();
    if !config.contains("[spool]") {
        config.push_str(&format!("\n[spool]\ndir = \"{}\"\n", dir.join(format!("{name}-spool")).display()));
    }
    std::fs::write(&cfg, config).unwrap();
    let proc = Proc::spawn(
        name,
        Command::new(bin("tollgate-edge"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", std::env::var("TOLLGATE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into())),
        dir.join(format!("{name}.log")),
    );
    let ok = wait_until(Duration::from_secs(20), || async {
        std::fs::metadata(&ready).map(|m| m.len() > 0).unwrap_or(false)
    })
    .await;
    assert!(ok, "edge did not start:\n{}", proc.log_tail());
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let listen = v["listen"].as_str().unwrap().parse().unwrap();
    let admin = v["admin"].as_str().unwrap().parse().unwrap();
    (proc, listen, admin)
}

/// The edge's Prometheus metrics, as text.
pub async fn metrics_text(admin: std::net::SocketAddr) -> String {
    try_metrics_text(admin).await.unwrap()
}

/// [`metrics_text`], or the error while the admin port is not up (yet).
pub async fn try_metrics_text(admin: std::net::SocketAddr) -> Result<String, String> {
    try_get(&format!("http://{admin}/metrics")).await.map(|(_, body)| body)
}

/// GET `url` (http): status and body, or the error (e.g. while the server is not up yet).
pub async fn try_get(url: &str) -> Result<(u16, String), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = url.parse().map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let resp = client.get(uri).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Fetches the edge's Prometheus metrics and returns the value of `name` (with its labels, if
/// any, as exposed: `name{label="v"}`).
pub async fn metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    let text = metrics_text(admin).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

/// Writes `config` to the edge's config file `path`, sends SIGHUP and waits (up to 10 s) until
/// the edge counts a successful reload; panics with its log otherwise.
pub async fn reload_edge(edge: &Proc, admin: std::net::SocketAddr, path: &Path, config: &str) {
    let reloads = metric(admin, "tollgate_edge_config_reloads_total").await;
    std::fs::write(path, config).unwrap();
    edge.signal("HUP");
    let reloaded = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reloads_total").await > reloads
    })
    .await;
    assert!(reloaded, "no reload:\n{}", edge.log_tail());
}

/// A sample event for tests that produce directly.
pub fn sample_event(consumer: &str, start_time_us: i64) -> tollgate_schemas::ApiCall {
    tollgate_schemas::ApiCall {
        event_id: uuid::Uuid::now_v7(),
        start_time_us,
        edge_id: "test-edge".into(),
        consumer_id: Some(consumer.to_owned()),
        credential_id: Some(format!("{consumer}-key")),
        route_id: Some("echo".into()),
        method: "GET".into(),
        host: "localhost".into(),
        path: "/echo".into(),
        status: 200,
        outcome: tollgate_schemas::Outcome::Forwarded,
        latency_us: 1500,
        upstream_latency_us: Some(1000),
        request_bytes: 0,
        response_bytes: 100,
        client_ip: "127.0.0.1".into(),
        user_agent: None,
        trace_id: None,
        plan_id: Some("basic".into()),
        upstream_target: Some("http://127.0.0.1:8081".into()),
        grpc_status: None,
    }
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A ClickHouse server of a test's own (for fault tests that stop it), from the project's
/// config template, on free ports, with its data in a temporary directory.
pub struct PrivateClickHouse {
    pub dir: TempDir,
    pub http_port: u16,
    pub tcp_port: u16,
    proc: Option<Proc>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PrivateClickHouse {
    pub async fn start() -> Self {
        let dir = TempDir::new("ch");
        let mut ch = Self { dir, http_port: free_port(), tcp_port: free_port(), proc: None };
        let template = std::fs::read_to_string(repo_root().join("scripts/stack/clickhouse-config.xml")).unwrap();
        let d = ch.dir.path().display().to_string();
        let config = template
            .replace("@DIR@", &d)
            .replace("@HTTP_PORT@", &ch.http_port.to_string())
            .replace("@TCP_PORT@", &ch.tcp_port.to_string());
        std::fs::create_dir_all(ch.dir.path().join("log")).unwrap();
        std::fs::write(ch.dir.path().join("config.xml"), config).unwrap();
        std::fs::copy(repo_root().join("scripts/stack/clickhouse-users.xml"), ch.dir.path().join("users.xml")).unwrap();
        ch.resume().await;
        ch
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// (Re)starts the server on the same ports and data, and waits until it answers.
    pub async fn resume(&mut self) {
        let config = self.dir.path().join("config.xml");
        let proc = Proc::spawn(
            "clickhouse",
            Command::new("clickhouse-server").arg(format!("--config-file={}", config.display())),
            self.dir.path().join("log/stdout.log"),
        );
        self.proc = Some(proc);
        let url = self.url();
        let up = wait_until(Duration::from_secs(60), || async { try_ch(&url, "SELECT 1").await.is_ok() }).await;
        assert!(up, "private ClickHouse did not start");
    }

    /// Stops the server (SIGTERM, then SIGKILL after 20 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(20));
        }
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Encodes `n` sample events for `consumers` (round robin), as (key, payload) pairs. Every
/// third (the first included) is a gRPC call that failed with UNAVAILABLE (`grpc_status` 14).
pub fn encoded_events(n: usize, consumers: &[&str]) -> Vec<(String, Vec<u8>)> {
    let enc = tollgate_schemas::Encoder::new().unwrap();
    let base = now_us();
    (0..n)
        .map(|i| {
            let c = consumers[i % consumers.len()];
            let mut e = sample_event(c, base + i as i64);
            if i % 3 == 0 {
                (e.status, e.grpc_status) = (503, Some(14));
            }
            (c.to_owned(), enc.encode(&e).unwrap())
        })
        .collect()
}

/// A Tansu broker of a test's own (for tests that stop it), SQLite storage in a temporary
/// directory so that its data survives a restart.
pub struct PrivateBroker {
    pub dir: TempDir,
    pub addr: String,
    proc: Option<Proc>,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let mut b = Self { dir: TempDir::new("tansu"), addr: format!("127.0.0.1:{}", free_port()), proc: None };
        b.resume().await;
        b
    }

    /// (Re)starts the broker on the same port and data.
    pub async fn resume(&mut self) {
        let url = format!("tcp://{}", self.addr);
        let mut cmd = Command::new("tansu");
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(self.dir.path());
        self.proc =
            Some(Proc::spawn("tansu", &mut cmd, self.dir.path().join(format!("tansu-{}.log", rand::random::<u16>()))));
        let addr = self.addr.clone();
        let up = wait_until(Duration::from_secs(30), || async { std::net::TcpStream::connect(&addr).is_ok() }).await;
        assert!(up, "private Tansu did not start");
    }

    /// Stops the broker (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}

/// Hex SHA-256, as `consumers[].keys[].sha256` wants a key.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// Hex SHA-256 of the first certificate (its DER) in the PEM file at `path`: a client
/// certificate's fingerprint, as `consumers[].certificates[].sha256` wants it.
pub fn cert_fingerprint_hex(path: &Path) -> String {
    use sha2::Digest;
    let pem = std::fs::read(path).unwrap();
    hex::encode(sha2::Sha256::digest(&tollgate_common::tls::read_pem_certs(&pem).unwrap()[0]))
}

/// Reads `topic` from the beginning and decodes `ApiCall`s until `done` says enough (each
/// message waited for at most 30 s). Also checks every message's key is its consumer id.
pub async fn read_events(
    topic: &str,
    done: impl FnMut(&[tollgate_schemas::ApiCall]) -> bool,
) -> Vec<tollgate_schemas::ApiCall> {
    read_events_on(&kafka(), topic, done).await
}

/// [`read_events`] from the broker at `brokers` (e.g. a [`PrivateBroker`]).
pub async fn read_events_on(
    brokers: &str,
    topic: &str,
    mut done: impl FnMut(&[tollgate_schemas::ApiCall]) -> bool,
) -> Vec<tollgate_schemas::ApiCall> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let decoder = tollgate_schemas::Decoder::new().unwrap();
    let mut events = Vec::new();
    while !done(&events) {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("no event within 30 s")
            .unwrap();
        let e = decoder.decode(msg.payload().unwrap()).unwrap();
        assert_eq!(msg.key().unwrap(), e.kafka_key().as_bytes());
        events.push(e);
    }
    events
}

/// The `[edge]` and `[kafka]` sections of a test edge: ports chosen by the OS (read them from
/// the ready file), events to `topic` on the local broker.
pub fn edge_head(instance_id: &str, topic: &str) -> String {
    format!(
        "[edge]\ninstance_id = \"{instance_id}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\n",
        kafka()
    )
}

/// Plan `big` (`rate` calls/s) and consumer `acme` with the API key `key-acme` (key id
/// `acme-1`), as edge config.
pub fn acme_with_key(rate: u32) -> String {
    format!(
        "[plans.big]\nrate_per_second = {rate}\n[[consumers]]\nid = \"acme\"\nplan = \"big\"\n\
         keys = [{{ id = \"acme-1\", sha256 = \"{}\" }}]\n",
        sha256_hex("key-acme")
    )
}

/// Serves HTTP/1.1 on an OS-chosen port with `handler` (a tiny JWKS endpoint, a fake OTLP
/// collector...); returns the address.
pub async fn serve_http<F, Fut>(handler: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    serve(handler, None).await
}

/// [`serve_http`] over TLS with the test certificate `tests/testdata/tls/server.pem` (for
/// `localhost` and 127.0.0.1, signed by the test CA `ca.pem`). A client that does not trust
/// it aborts the handshake, and the connection is dropped.
pub async fn serve_https<F, Fut>(handler: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    serve(handler, Some(tokio_rustls::TlsAcceptor::from(Arc::new(test_server_tls())))).await
}

/// The TLS settings of a test server: the test certificate `tests/testdata/tls/server.pem`
/// (for `localhost` and 127.0.0.1, signed by the test CA `ca.pem`), no ALPN.
pub fn test_server_tls() -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |name: &str| repo_root().join("tests/testdata/tls").join(name);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls("server.pem")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(tls("server.key.pem")).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

async fn serve<F, Fut>(handler: F, tls: Option<tokio_rustls::TlsAcceptor>) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (handler, tls) = (handler.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await,
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else { return };
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await
                    }
                };
            });
        }
    });
    addr
}

/// An aggregator config for `topic` → `database`, reading in `group` as `instance`, waiting for
/// ingest group `ingest_group`; `extra` is appended (e.g. `[admin]`).
pub fn aggregator_config(
    topic: &str,
    database: &str,
    group: &str,
    instance: &str,
    ingest_group: &str,
    extra: &str,
) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\ngroup_id = \"{group}\"\ninstance_id = \"{instance}\"\n\
         ingest_group_id = \"{ingest_group}\"\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\n\
         [retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n{extra}",
        kafka(),
        clickhouse()
    )
}

/// Starts `tollgate-aggregator run` with `config` (TOML text).
pub fn start_aggregator(dir: &Path, name: &str, config: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    Proc::spawn(
        name,
        Command::new(bin("tollgate-aggregator"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", std::env::var("TOLLGATE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into())),
        dir.join(format!("{name}.log")),
    )
}

/// A pooled HTTP/1.1 client for tests.
pub struct Http(Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>);

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    /// GET `path` on `addr` with `headers`: (status, response headers, body as text).
    pub async fn get(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, http::HeaderMap, String) {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.0.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into_owned())
    }
}
