//! Gateway throughput and latency with wrk, in one run, against the same upstream:
//! direct upstream, nginx as a plain reverse proxy (worker count = the edge's threads), a bare
//! hyper reverse proxy on the edge's own server and upstream-pool code (the ceiling of this
//! stack, see `hyper_proxy`), the edge with metering off, the edge with API key + limits +
//! metering (Tansu on memory storage), and the same edge authenticating an ES256 JWT instead
//! of the key; then HTTPS (TLS 1.3, the test certificate, HTTP/1.1, keep-alive connections so
//! the figure is the record layer's cost, not handshakes): nginx with `ssl` against the edge
//! with `edge.tls_cert_file`, key + limits + metering. Then the edge's RSS with 100,000
//! consumers configured (in a `consumers_file`, and as `[[consumers]]` tables).
//!
//! wrk and nginx come from Debian (`bench/run.sh` installs them). The machine has 2 cores
//! shared by wrk, the upstream, the proxy and (for metering) Tansu: figures are comparable
//! with each other, not with other machines.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sha2::Digest;

use crate::common::*;

const KEY: &str = "tg_bench_0123456789abcdefghijklmnopqrstuv";

#[derive(Debug, Clone, Copy)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests completed in the run.
    requests: f64,
}

/// The sum of two numeric fields of a `/proc/.../stat` line, counted after the command name
/// (which may contain spaces; the state, field 3, is index 0).
fn stat_fields(path: &str, first: usize) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            Some(f.get(first)?.parse::<u64>().ok()? + f.get(first + 1)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// CPU time (user + system: fields 14 and 15) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(&format!("/proc/{pid}/stat"), 11)
}

/// CPU time of this process's waited-for children (wrk; fields 16 and 17), in clock ticks.
fn children_ticks() -> u64 {
    stat_fields("/proc/self/stat", 13)
}

/// The machine's (steal, total) CPU time from `/proc/stat`, in clock ticks: time the hypervisor
/// gave to other guests while this one wanted to run, the shared machine's noise made visible.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    (fields.get(7).copied().unwrap_or(0), fields.iter().take(8).sum())
}

/// The processes a nginx master started (its workers).
fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Microseconds of CPU per request, per role, over one wrk run.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerRequest {
    proxy: f64,
    upstream: f64,
    broker: f64,
    wrk: f64,
}

/// Whose CPU a target's run is charged to.
struct Roles {
    proxy: Vec<u32>,
    upstream: u32,
    broker: u32,
}

impl Roles {
    fn ticks(&self) -> [u64; 4] {
        [
            self.proxy.iter().map(|&p| cpu_ticks(p)).sum(),
            cpu_ticks(self.upstream),
            cpu_ticks(self.broker),
            children_ticks(),
        ]
    }
}

fn per_request(before: [u64; 4], after: [u64; 4], requests: f64) -> CpuPerRequest {
    // Linux reports these in USER_HZ = 100 ticks per second.
    let us = |i: usize| (after[i].saturating_sub(before[i])) as f64 * 10_000.0 / requests.max(1.0);
    CpuPerRequest { proxy: us(0), upstream: us(1), broker: us(2), wrk: us(3) }
}

fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// The credential a target is called with.
#[derive(Debug, Clone)]
enum Cred {
    None,
    ApiKey,
    /// `Authorization: Bearer <jwt>`.
    Jwt(String),
}

fn wrk(url: &str, cred: &Cred, seconds: u64, connections: u32) -> Figures {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"]);
    match cred {
        Cred::None => {}
        Cred::ApiKey => {
            cmd.args(["-H", &format!("x-api-key: {KEY}")]);
        }
        Cred::Jwt(t) => {
            cmd.args(["-H", &format!("authorization: Bearer {t}")]);
        }
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in").map(|(n, _)| n.trim().to_owned()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let pct = |p: &str| {
        text.lines().map(str::trim).find_map(|l| l.strip_prefix(p)).and_then(parse_latency).unwrap_or(f64::NAN)
    };
    let non2xx =
        text.lines().find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:")).map(|v| v.trim().to_owned());
    if let Some(n) = non2xx {
        eprintln!("warning: {url}: {n} non-2xx responses");
    }
    Figures { rps, p50_ms: pct("50%"), p99_ms: pct("99%"), requests }
}

fn wait_port(addr: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr} did not open");
}

/// The test certificate and key (`tests/testdata/tls`, for `localhost` and 127.0.0.1).
fn tls_files() -> (std::path::PathBuf, std::path::PathBuf) {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
    (d.join("server.pem"), d.join("server.key.pem"))
}

fn nginx_conf(dir: &Path, (port, tls_port): (u16, u16), upstream: u16, workers: usize) -> String {
    let (cert, key) = tls_files();
    format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream u {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://u;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n\
           server {{\n    listen 127.0.0.1:{tls_port} ssl;\n    ssl_certificate {cert};\n\
             ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    location / {{\n\
               proxy_pass http://u;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_set_header X-Forwarded-Proto https;\n    }}\n  }}\n}}\n",
        d = dir.display(),
        cert = cert.display(),
        key = key.display()
    )
}

fn edge_config(port: u16, admin: u16, upstream: u16, broker: Option<&str>, spool: &Path, consumers: usize) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "[edge]\ninstance_id = \"edge-bench\"\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         [kafka]\nenabled = {}\nbrokers = \"{}\"\ntopic = \"bench-gw\"\n[spool]\ndir = \"{}\"\n\
         [[routes]]\nid = \"up\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:{upstream}\"\nauth = \"api_key_or_jwt\"\n\
         [plans.big]\nrate_per_second = 10000000\n\
         [[jwt.issuers]]\nid = \"demo\"\nissuer = \"{}\"\naudiences = [\"{}\"]\nalgorithms = [\"ES256\"]\n\
         default_plan = \"big\"\nkeys = [{{ kid = \"demo-1\", alg = \"ES256\", pem_file = \"{}\" }}]\n",
        broker.is_some(),
        broker.unwrap_or(""),
        spool.display(),
        tollgate_demo::traffic::DEMO_JWT_ISSUER,
        tollgate_demo::traffic::DEMO_JWT_AUDIENCE,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo/jwt/demo-es256.pub.pem").display(),
    );
    let _ = write!(
        c,
        "[[consumers]]\nid = \"bench\"\nplan = \"big\"\nkeys = [{{ id = \"k\", sha256 = \"{}\" }}]\n",
        hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
    );
    for i in 1..consumers {
        let key = format!("tg_bench_consumer_{i:08}");
        let _ = write!(
            c,
            "[[consumers]]\nid = \"c{i}\"\nplan = \"big\"\nkeys = [{{ id = \"k{i}\", sha256 = \"{}\" }}]\n",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        );
    }
    c
}

/// Consumers `c1` … `c{n-1}` as JSON Lines (with the config's `bench` consumer: `n`).
fn consumers_jsonl(n: usize) -> String {
    let mut c = String::with_capacity(n * 140);
    for i in 1..n {
        let key = format!("tg_bench_consumer_{i:08}");
        let _ = writeln!(
            c,
            "{{\"id\": \"c{i}\", \"plan\": \"big\", \"keys\": [{{\"id\": \"k{i}\", \"sha256\": \"{}\"}}]}}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        );
    }
    c
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`: resident now, `VmHWM`: peak resident).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|v| v.strip_prefix(':'))
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn median_of(runs: &[Figures]) -> Figures {
    let mut r: Vec<f64> = runs.iter().map(|f| f.rps).collect();
    let mut a: Vec<f64> = runs.iter().map(|f| f.p50_ms).collect();
    let mut b: Vec<f64> = runs.iter().map(|f| f.p99_ms).collect();
    let mut n: Vec<f64> = runs.iter().map(|f| f.requests).collect();
    Figures { rps: median(&mut r), p50_ms: median(&mut a), p99_ms: median(&mut b), requests: median(&mut n) }
}

pub async fn run(seconds: u64, runs: usize, connections: u32) -> anyhow::Result<()> {
    let dir = workdir("gateway");
    for sub in ["body", "proxy", "fcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    // Upstream: the demo upstream answering 64 bytes (`?bytes=64`), in its own process.
    let up_port = free_port();
    let up = spawn(
        Command::new(release_bin("tollgate-demo")).args(["upstream", "--listen", &format!("127.0.0.1:{up_port}")]),
        &dir.join("upstream.log"),
    );
    wait_port(&format!("127.0.0.1:{up_port}"));
    let (ng_port, ng_tls_port) = (free_port(), free_port());
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, (ng_port, ng_tls_port), up_port, threads))?;
    let ng =
        spawn(Command::new("nginx").arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir), &dir.join("nginx.out"));
    wait_port(&format!("127.0.0.1:{ng_port}"));
    wait_port(&format!("127.0.0.1:{ng_tls_port}"));
    let broker = Broker::start(&dir).await;
    broker.create_topic("bench-gw", 4).await;

    let start_edge = |name: &str, kafka: Option<&str>, tls: bool| {
        let (port, admin) = (free_port(), free_port());
        let cfg = dir.join(format!("{name}.toml"));
        let mut text = edge_config(port, admin, up_port, kafka, &dir.join(format!("{name}-spool")), 1);
        if tls {
            let (cert, key) = tls_files();
            let files =
                format!("[edge]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", cert.display(), key.display());
            text = text.replacen("[edge]\n", &files, 1);
        }
        std::fs::write(&cfg, text).unwrap();
        let p = spawn(
            Command::new(release_bin("tollgate-edge")).args(["run", "--config"]).arg(&cfg).env("RUST_LOG", "warn"),
            &dir.join(format!("{name}.log")),
        );
        wait_port(&format!("127.0.0.1:{port}"));
        (p, port)
    };
    // The framework ceiling: hyper server + the edge's upstream pool, no gateway work.
    let hp_port = free_port();
    let hp = spawn(
        Command::new(release_bin("tollgate-bench")).args([
            "hyper-proxy",
            "--listen",
            &format!("127.0.0.1:{hp_port}"),
            "--upstream",
            &format!("127.0.0.1:{up_port}"),
            "--threads",
            &threads.to_string(),
        ]),
        &dir.join("hyper-proxy.log"),
    );
    wait_port(&format!("127.0.0.1:{hp_port}"));
    let (e1, off_port) = start_edge("edge-off", None, false);
    let (e2, on_port) = start_edge("edge-on", Some(&broker.addr), false);
    let (e3, tls_port) = start_edge("edge-tls", Some(&broker.addr), true);

    let path = "/bench?bytes=64";
    let jwt = tollgate_demo::traffic::demo_jwt("bench").ok_or_else(|| anyhow::anyhow!("cannot sign the demo JWT"))?;
    let targets = [
        ("direct upstream", format!("http://127.0.0.1:{up_port}{path}"), Cred::None),
        ("nginx reverse proxy", format!("http://127.0.0.1:{ng_port}{path}"), Cred::None),
        ("hyper proxy, no gateway work (ceiling)", format!("http://127.0.0.1:{hp_port}{path}"), Cred::None),
        ("edge, key + limits, metering off", format!("http://127.0.0.1:{off_port}{path}"), Cred::ApiKey),
        ("edge, key + limits + metering", format!("http://127.0.0.1:{on_port}{path}"), Cred::ApiKey),
        ("edge, ES256 JWT + limits + metering", format!("http://127.0.0.1:{on_port}{path}"), Cred::Jwt(jwt)),
        ("nginx reverse proxy, HTTPS", format!("https://127.0.0.1:{ng_tls_port}{path}"), Cred::None),
        ("edge HTTPS, key + limits + metering", format!("https://127.0.0.1:{tls_port}{path}"), Cred::ApiKey),
    ];
    let (up_pid, broker_pid) = (up.0.id(), broker.proc.0.id());
    let roles = |proxy: Vec<u32>| Roles { proxy, upstream: up_pid, broker: broker_pid };
    let roles = [
        roles(vec![]),
        roles(child_pids(ng.0.id())),
        roles(vec![hp.0.id()]),
        roles(vec![e1.0.id()]),
        roles(vec![e2.0.id()]),
        roles(vec![e2.0.id()]),
        roles(child_pids(ng.0.id())),
        roles(vec![e3.0.id()]),
    ];
    // Warm-up: connection pools, page cache.
    for (_, url, cred) in &targets {
        let _ = wrk(url, cred, 2, connections);
    }
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); targets.len()];
    let mut cpu: Vec<Vec<CpuPerRequest>> = vec![Vec::new(); targets.len()];
    let mut steal = Vec::new();
    for run in 0..runs {
        // Interleaved, so drift on the shared machine hits every target alike.
        for (i, (name, url, cred)) in targets.iter().enumerate() {
            let before = roles[i].ticks();
            let (steal0, total0) = machine_ticks();
            let f = wrk(url, cred, seconds, connections);
            cpu[i].push(per_request(before, roles[i].ticks(), f.requests));
            let (steal1, total1) = machine_ticks();
            let stolen = 100.0 * steal1.saturating_sub(steal0) as f64 / total1.saturating_sub(total0).max(1) as f64;
            steal.push(stolen);
            println!(
                "run {}: {name:<38} {:>9.0} req/s  P50 {:>6.2} ms  P99 {:>6.2} ms  steal {stolen:>4.1} %",
                run + 1,
                f.rps,
                f.p50_ms,
                f.p99_ms
            );
            results[i].push(f);
        }
    }
    let most_stolen = steal.iter().copied().fold(0.0, f64::max);
    println!(
        "CPU stolen by the hypervisor (other guests) during the runs: median {:.1} %, worst run {most_stolen:.1} %{}",
        median(&mut steal),
        if most_stolen > 5.0 { " (a run with more than 5 % is slowed by the machine, not by the proxy)" } else { "" }
    );
    let med: Vec<Figures> = results.iter().map(|r| median_of(r)).collect();
    let nginx = med[1];
    println!(
        "\nmedian of {runs} runs, wrk -t1 -c{connections} -d{seconds}s, {threads} edge threads = {threads} nginx workers:"
    );
    println!("{:<38} {:>10} {:>9} {:>9} {:>12} {:>14}", "", "req/s", "P50 ms", "P99 ms", "vs nginx", "P99 - nginx");
    for ((name, _, _), f) in targets.iter().zip(&med) {
        println!(
            "{name:<38} {:>10.0} {:>9.2} {:>9.2} {:>11.2}x {:>11.2} ms",
            f.rps,
            f.p50_ms,
            f.p99_ms,
            f.rps / nginx.rps,
            f.p99_ms - nginx.p99_ms
        );
    }
    println!("edge with metering vs the hyper proxy (share of the ceiling): {:.2}x", med[4].rps / med[2].rps);
    // Throughput on this machine is the inverse of the CPU every process spends per request.
    println!("\nCPU per request (median, microseconds; user + system; the 2 cores are shared by all):");
    println!("{:<38} {:>8} {:>9} {:>8} {:>8} {:>8}", "", "proxy", "upstream", "Tansu", "wrk", "total");
    for ((name, _, _), c) in targets.iter().zip(&cpu) {
        let m = |f: fn(&CpuPerRequest) -> f64| {
            let mut v: Vec<f64> = c.iter().map(f).collect();
            median(&mut v)
        };
        let (p, u, b, w) = (m(|c| c.proxy), m(|c| c.upstream), m(|c| c.broker), m(|c| c.wrk));
        println!("{name:<38} {p:>8.1} {u:>9.1} {b:>8.1} {w:>8.1} {:>8.1}", p + u + b + w);
    }
    println!("metering cost: {:.1} % of throughput", (1.0 - med[4].rps / med[3].rps) * 100.0);
    println!("JWT path vs API-key path: {:.2}x throughput (goal >= 0.8x)", med[5].rps / med[4].rps);
    println!(
        "HTTPS: edge {:.2}x nginx's throughput, P99 {:+.2} ms against nginx's; TLS costs the edge {:.1} % and nginx {:.1} %",
        med[7].rps / med[6].rps,
        med[7].p99_ms - med[6].p99_ms,
        (1.0 - med[7].rps / med[4].rps) * 100.0,
        (1.0 - med[6].rps / nginx.rps) * 100.0
    );

    // RSS with 100,000 consumers: in a consumers_file (JSON Lines, the way documented for
    // large lists), and as [[consumers]] tables for comparison.
    for (label, in_file) in [("consumers_file (JSON Lines)", true), ("[[consumers]] tables", false)] {
        let (port, admin) = (free_port(), free_port());
        let name = if in_file { "edge-100k-file" } else { "edge-100k-toml" };
        let cfg = dir.join(format!("{name}.toml"));
        let spool = dir.join(format!("{name}-spool"));
        let text = if in_file {
            std::fs::write(dir.join("consumers-100k.jsonl"), consumers_jsonl(100_000))?;
            format!(
                "consumers_file = \"consumers-100k.jsonl\"\n{}",
                edge_config(port, admin, up_port, Some(&broker.addr), &spool, 0)
            )
        } else {
            edge_config(port, admin, up_port, Some(&broker.addr), &spool, 100_000)
        };
        std::fs::write(&cfg, text)?;
        let p = spawn(
            Command::new(release_bin("tollgate-edge")).args(["run", "--config"]).arg(&cfg).env("RUST_LOG", "warn"),
            &dir.join(format!("{name}.log")),
        );
        wait_port(&format!("127.0.0.1:{port}"));
        let mib = |field: &str| status_kib(p.0.id(), field) as f64 / 1024.0;
        let at_start = mib("VmRSS");
        std::thread::sleep(Duration::from_secs(3));
        let settled = mib("VmRSS");
        let _ = wrk(&format!("http://127.0.0.1:{port}{path}"), &Cred::ApiKey, seconds.min(5), connections);
        let loaded = mib("VmRSS");
        println!(
            "edge RSS with 100,000 consumers in {label}: {at_start:.1} MiB when listening, {settled:.1} MiB 3 s later, \
             {loaded:.1} MiB after load, peak {:.1} MiB (goal <= 64 MiB)",
            mib("VmHWM")
        );
        drop(p);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
