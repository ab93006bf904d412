//! Shared bench plumbing: a private Tansu broker on memory storage, processes, ClickHouse.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process stopped on drop: SIGTERM first (nginx's master then stops its workers,
/// which a SIGKILL would orphan), SIGKILL after 5 s.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Proc(cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
}

/// Work directory for logs and configs.
pub fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A Tansu broker on memory storage, on a free port.
pub struct Broker {
    pub addr: String,
    pub proc: Proc,
}

impl Broker {
    pub async fn start(dir: &Path) -> Self {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let proc = spawn(
            Command::new("tansu").args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ]),
            &dir.join("tansu.log"),
        );
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { addr, proc }
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.addr).create().unwrap();
        let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for r in admin.create_topics([&t], &AdminOptions::new()).await.unwrap() {
            r.unwrap();
        }
    }
}

/// Release binary path (bench/run.sh builds them).
pub fn release_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().join(name);
    assert!(p.exists(), "{} missing: cargo build --release --bins", p.display());
    p
}

pub async fn ch(url: &str, sql: &str) -> String {
    let client = clickhouse::Client::default().with_url(url);
    let mut cursor = client.query(sql).fetch_bytes("TSV").unwrap();
    let bytes = cursor.collect().await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub async fn ch_count(url: &str, db: &str) -> u64 {
    let client = clickhouse::Client::default().with_url(url);
    match client.query(&format!("SELECT count() FROM {db}.api_calls")).fetch_bytes("TSV") {
        Ok(mut c) => match c.collect().await {
            Ok(b) => String::from_utf8_lossy(&b).trim().parse().unwrap_or(0),
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ingest_config(broker: &str, topic: &str, group: &str, ch_url: &str, db: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{broker}\"\ntopic = \"{topic}\"\ndlq_topic = \"{topic}.dlq\"\ngroup_id = \"{group}\"\ninstance_id = \"{group}-0\"\n\
         [clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{db}\"\n[batch]\nmax_rows = 50000\nmax_wait_ms = 250\n"
    )
}

/// Starts the release edge with `config` (written to `dir/edge.toml`) and waits until it
/// listens; returns the process, its traffic address and its admin address.
pub async fn start_edge(dir: &Path, config: &str) -> (Proc, std::net::SocketAddr, std::net::SocketAddr) {
    let cfg = dir.join("edge.toml");
    std::fs::write(&cfg, config).unwrap();
    let ready = dir.join("edge.ready");
    let proc = spawn(
        Command::new(release_bin("tollgate-edge"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn"),
        &dir.join("edge.log"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&ready).map(|m| m.len() == 0).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "edge did not start; see {}", dir.join("edge.log").display());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    (proc, v["listen"].as_str().unwrap().parse().unwrap(), v["admin"].as_str().unwrap().parse().unwrap())
}
