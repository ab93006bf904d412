//! The access log (`edge.access_log`): one JSON line per call, with the fields of the call's
//! event, for operators who want to `tail` what the edge does without the pipeline behind it
//! (a failing Kafka, a dashboard not yet there). The events stay the record that usage and
//! invoices are made of; the access log is for people.
//!
//! The request path never waits on the disk: a worker formats the line (into a buffer of its
//! thread) and appends it to a shared buffer under a lock held for that copy; a thread of the
//! access log's own takes the whole buffer every [`FLUSH_INTERVAL`] and writes it with one
//! `write`. When [`MAX_PENDING`] bytes wait (the disk is slower than the traffic, or the file
//! cannot be written), further lines are dropped and counted
//! (`tollgate_edge_access_log_dropped_total`) rather than held in memory without bound.
//!
//! SIGHUP reopens the file (logrotate's `postrotate`: rename, then `kill -HUP`); a reload that
//! changes `edge.access_log` switches to the new file, or to none.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tollgate_schemas::ApiCallRef;

use crate::metrics::Metrics;

/// How often the writer thread writes what the workers logged.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes of lines waiting for the writer beyond which further lines are dropped.
pub const MAX_PENDING: usize = 8 << 20;
/// A failing file is reported at most this often (each time with the lines lost meanwhile).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Where the lines go: `edge.access_log = "stdout"` (or `"-"`), or a file (appended to,
/// created if missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// The config value's destination.
    pub fn parse(value: &str) -> Self {
        match value {
            "stdout" | "-" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        }
    }

    fn open(&self) -> std::io::Result<Output> {
        match self {
            Self::Stdout => Ok(Output::Stdout),
            Self::File(path) => open_append(path).map(Output::File),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(path) => path.display().fmt(f),
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Checks that `dest` can be written (the file opened for appending, created if missing):
/// at start, so a wrong path stops the edge with an error naming the key instead of losing
/// every line.
pub fn check(dest: &Destination) -> anyhow::Result<()> {
    dest.open().map(drop).map_err(|e| anyhow::anyhow!("edge.access_log {dest}: {e}"))
}

enum Output {
    Stdout,
    File(std::fs::File),
}

impl Output {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Self::File(f) => f.write_all(bytes),
        }
    }
}

/// The access log of one edge, kept across reloads.
#[derive(Debug)]
pub struct AccessLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    /// Lines are taken (a destination is set).
    on: AtomicBool,
    /// Lines waiting for the writer, and how many.
    pending: Mutex<(Vec<u8>, u64)>,
    control: Mutex<Control>,
    wake: Condvar,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Control {
    destination: Option<Destination>,
    /// Bumped to make the writer open the destination again (SIGHUP, a new destination).
    generation: u64,
    stop: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// A worker's line being formatted (its allocation kept from call to call).
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// An access log writing to `destination` (`None`: off until a reload sets one).
    pub fn new(destination: Option<Destination>, metrics: Arc<Metrics>) -> Self {
        let log = Self {
            shared: Arc::new(Shared {
                on: AtomicBool::new(false),
                pending: Mutex::new((Vec::new(), 0)),
                control: Mutex::new(Control::default()),
                wake: Condvar::new(),
                metrics,
            }),
            writer: Mutex::new(None),
        };
        log.set_destination(destination);
        log
    }

    /// Whether calls are logged.
    pub fn enabled(&self) -> bool {
        self.shared.on.load(Ordering::Relaxed)
    }

    /// Logs a call (never waits on the disk; drops the line when too much is waiting).
    pub fn record(&self, call: &ApiCallRef<'_>) {
        if !self.enabled() {
            return;
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            format_line(line, call);
            let mut pending = lock(&self.shared.pending);
            if pending.0.len() + line.len() > MAX_PENDING {
                drop(pending);
                self.shared.metrics.access_log_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            pending.0.extend_from_slice(line);
            pending.1 += 1;
        });
    }

    /// Sets where lines go (at start and at each reload): a new destination is opened by the
    /// writer from its next write on; `None` turns the log off.
    pub fn set_destination(&self, destination: Option<Destination>) {
        let on = destination.is_some();
        {
            let mut control = lock(&self.shared.control);
            if control.destination != destination {
                control.destination = destination;
                control.generation += 1;
            }
        }
        if on {
            let mut writer = lock(&self.writer);
            if writer.is_none() {
                let shared = Arc::clone(&self.shared);
                match std::thread::Builder::new().name("access-log".into()).spawn(move || write_loop(&shared)) {
                    Ok(handle) => *writer = Some(handle),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the access log's writer thread; no access log");
                        return;
                    }
                }
            }
        }
        self.shared.on.store(on, Ordering::Relaxed);
    }

    /// Opens the file again from the next write on (after logrotate moved it away).
    pub fn reopen(&self) {
        lock(&self.shared.control).generation += 1;
    }

    /// Writes what is waiting and stops the writer (at shutdown, once the calls are done).
    pub fn close(&self) {
        self.shared.on.store(false, Ordering::Relaxed);
        lock(&self.shared.control).stop = true;
        self.shared.wake.notify_all();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
    }
}

/// The writer thread: every [`FLUSH_INTERVAL`] (or at stop), takes the waiting lines and
/// writes them with one write.
fn write_loop(shared: &Shared) {
    // The open output, and the destination and generation it was opened for.
    let mut out: Option<(Output, Destination, u64)> = None;
    let mut batch = Vec::new();
    let mut last_error: Option<Instant> = None;
    let mut lost_since_report = 0u64;
    loop {
        let (destination, generation, stop) = {
            let control = lock(&shared.control);
            let control = if control.stop {
                control
            } else {
                shared.wake.wait_timeout(control, FLUSH_INTERVAL).unwrap_or_else(PoisonError::into_inner).0
            };
            (control.destination.clone(), control.generation, control.stop)
        };
        let mut lines = {
            let mut pending = lock(&shared.pending);
            std::mem::swap(&mut batch, &mut pending.0);
            std::mem::take(&mut pending.1)
        };
        if out.as_ref().is_none_or(|(_, _, g)| *g != generation) {
            // Turned off by a reload: what was logged before goes where the log was.
            if destination.is_none() && lines > 0 {
                write_batch(shared, &mut out, &batch, lines, &mut last_error, &mut lost_since_report);
                lines = 0;
            }
            // Closed before opening again: the file logrotate moved away is let go. (Lines
            // waiting at a SIGHUP or a new path, at most one flush interval's, go to the new
            // file.)
            out = None;
            if let Some(dest) = &destination {
                match dest.open() {
                    Ok(o) => out = Some((o, dest.clone(), generation)),
                    Err(e) => report(&mut last_error, &mut lost_since_report, lines, || {
                        format!("cannot open edge.access_log {dest}: {e}")
                    }),
                }
            }
        }
        if lines > 0 {
            write_batch(shared, &mut out, &batch, lines, &mut last_error, &mut lost_since_report);
        }
        batch.clear();
        // The buffer grew for a burst: let it go rather than keep megabytes for good.
        if batch.capacity() > 1 << 20 {
            batch = Vec::new();
        }
        if stop {
            return;
        }
    }
}

/// Writes `lines` lines (`batch`) to the open output, counting them written or dropped.
fn write_batch(
    shared: &Shared,
    out: &mut Option<(Output, Destination, u64)>,
    batch: &[u8],
    lines: u64,
    last_error: &mut Option<Instant>,
    lost: &mut u64,
) {
    match out.as_mut() {
        Some((o, dest, _)) => match o.write_all(batch) {
            Ok(()) => {
                shared.metrics.access_log_lines.fetch_add(lines, Ordering::Relaxed);
            }
            Err(e) => {
                shared.metrics.access_log_dropped.fetch_add(lines, Ordering::Relaxed);
                report(last_error, lost, lines, || format!("cannot write edge.access_log {dest}: {e}"));
            }
        },
        // Not open (the open failed, reported when it did).
        _ => {
            shared.metrics.access_log_dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }
}

/// Logs a failing access log at most once per [`ERROR_LOG_INTERVAL`], with the lines lost.
fn report(last: &mut Option<Instant>, lost: &mut u64, lines: u64, message: impl FnOnce() -> String) {
    *lost += lines;
    if last.is_some_and(|t| t.elapsed() < ERROR_LOG_INTERVAL) {
        return;
    }
    *last = Some(Instant::now());
    tracing::error!(lines_lost = *lost, "{}", message());
    *lost = 0;
}

/// Appends `call` as one JSON line to `out`: the event's fields under the event's names (the
/// same names as the ClickHouse columns), `time` for its `start_time_us`, `null` where the call
/// has none. Written by hand (constant keys, `itoa` numbers, strings escaped only where they
/// need it): with serde_json's serializer and `format!` for the time, the line cost 10,800
/// instructions per call under callgrind, a fifth of the whole request path.
pub fn format_line(out: &mut Vec<u8>, call: &ApiCallRef<'_>) {
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(b"{\"time\":\"");
    push_time(out, call.start_time_us);
    out.extend_from_slice(b"\",\"event_id\":\"");
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(call.event_id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    out.extend_from_slice(num.format(call.status).as_bytes());
    out.extend_from_slice(b",\"outcome\":\"");
    out.extend_from_slice(call.outcome.as_str().as_bytes());
    out.push(b'"');
    let text = [
        (&b",\"method\":"[..], Some(call.method)),
        (b",\"host\":", Some(call.host)),
        (b",\"path\":", Some(call.path)),
        (b",\"route_id\":", call.route_id),
        (b",\"consumer_id\":", call.consumer_id),
        (b",\"credential_id\":", call.credential_id),
        (b",\"plan_id\":", call.plan_id),
        (b",\"client_ip\":", Some(call.client_ip)),
    ];
    for (key, value) in text {
        out.extend_from_slice(key);
        push_str(out, value);
    }
    let numbers = [
        (&b",\"latency_us\":"[..], Some(call.latency_us)),
        (b",\"upstream_latency_us\":", call.upstream_latency_us),
        (b",\"request_bytes\":", Some(call.request_bytes)),
        (b",\"response_bytes\":", Some(call.response_bytes)),
        (b",\"grpc_status\":", call.grpc_status.map(u64::from)),
    ];
    for (key, value) in numbers {
        out.extend_from_slice(key);
        match value {
            Some(n) => out.extend_from_slice(num.format(n).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }
    let text = [
        (&b",\"upstream_target\":"[..], call.upstream_target),
        (b",\"user_agent\":", call.user_agent),
        (b",\"trace_id\":", call.trace_id),
        (b",\"edge_id\":", Some(call.edge_id)),
    ];
    for (key, value) in text {
        out.extend_from_slice(key);
        push_str(out, value);
    }
    out.extend_from_slice(b"}\n");
}

/// A JSON string (escaped: quotes, backslashes, control characters), or `null`.
fn push_str(out: &mut Vec<u8>, s: Option<&str>) {
    let Some(s) = s else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut clean = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[clean..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.extend_from_slice(short);
        }
        clean = i + 1;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

/// RFC 3339 UTC with microseconds (`2026-11-30T00:50:09.000250Z`), digit by digit.
fn push_time(out: &mut Vec<u8>, us: i64) {
    let secs = us.div_euclid(1_000_000);
    let (year, month, day) = tollgate_common::time::civil_from_days(secs.div_euclid(86_400));
    let in_day = secs.rem_euclid(86_400) as u32;
    let digits = |out: &mut Vec<u8>, n: u32, width: u32| {
        for p in (0..width).rev() {
            out.push(b'0' + (n / 10u32.pow(p) % 10) as u8);
        }
    };
    digits(out, year.clamp(0, 9999) as u32, 4);
    out.push(b'-');
    digits(out, month, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, in_day / 3600, 2);
    out.push(b':');
    digits(out, in_day / 60 % 60, 2);
    out.push(b':');
    digits(out, in_day % 60, 2);
    out.push(b'.');
    digits(out, us.rem_euclid(1_000_000) as u32, 6);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tollgate_schemas::Outcome;

    fn call<'a>(user_agent: Option<&'a str>) -> ApiCallRef<'a> {
        ApiCallRef {
            event_id: uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
            start_time_us: 1_795_999_809_000_250,
            edge_id: "edge-1",
            consumer_id: Some("acme"),
            credential_id: Some("acme-1"),
            route_id: Some("echo"),
            method: "POST",
            host: "api.example",
            path: "/v1/echo",
            status: 201,
            outcome: Outcome::Forwarded,
            latency_us: 1500,
            upstream_latency_us: Some(1200),
            request_bytes: 10,
            response_bytes: 64,
            client_ip: "192.0.2.7",
            user_agent,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            plan_id: Some("basic"),
            upstream_target: Some("http://127.0.0.1:8081"),
            grpc_status: None,
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_the_events_fields() {
        let mut out = Vec::new();
        format_line(&mut out, &call(Some("curl/8 \"quoted\"\n\u{1}")));
        let text = String::from_utf8(out).unwrap();
        // One line: a newline in a field is escaped, not written.
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], "2026-11-30T00:50:09.000250Z");
        assert_eq!(v["event_id"], "01930000-0000-7000-8000-000000000001");
        assert_eq!(v["status"], 201);
        assert_eq!(v["outcome"], "forwarded");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["host"], "api.example");
        assert_eq!(v["path"], "/v1/echo");
        assert_eq!(v["route_id"], "echo");
        assert_eq!(v["consumer_id"], "acme");
        assert_eq!(v["credential_id"], "acme-1");
        assert_eq!(v["plan_id"], "basic");
        assert_eq!(v["client_ip"], "192.0.2.7");
        assert_eq!(v["latency_us"], 1500);
        assert_eq!(v["upstream_latency_us"], 1200);
        assert_eq!(v["upstream_target"], "http://127.0.0.1:8081");
        assert_eq!(v["request_bytes"], 10);
        assert_eq!(v["response_bytes"], 64);
        assert!(v["grpc_status"].is_null());
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"\n\u{1}");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["edge_id"], "edge-1");
    }

    #[test]
    fn every_string_is_escaped_and_the_time_agrees_with_the_rfc_3339_formatter() {
        // Every control character, quotes, backslashes and non-ASCII text round-trip.
        let nasty: String = (0u8..0x20).map(char::from).chain("\"\\/ é 漢 \u{7f}".chars()).collect();
        let mut c = call(Some(&nasty));
        c.path = "/a\"b\\c";
        c.consumer_id = Some("tab\there");
        let mut out = Vec::new();
        format_line(&mut out, &c);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user_agent"].as_str(), Some(nasty.as_str()));
        assert_eq!(v["path"], "/a\"b\\c");
        assert_eq!(v["consumer_id"], "tab\there");
        for us in [0, 1, 999_999, 1_795_999_809_000_250, 951_782_400_123_456, 4_102_444_799_999_999, -1] {
            c.start_time_us = us;
            let mut out = Vec::new();
            format_line(&mut out, &c);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["time"].as_str().unwrap(), tollgate_common::time::format_utc_micros(us), "{us}");
        }
    }

    #[test]
    fn fields_a_call_lacks_are_null() {
        let mut c = call(None);
        (c.consumer_id, c.credential_id, c.plan_id, c.route_id) = (None, None, None, None);
        (c.upstream_latency_us, c.upstream_target, c.status, c.outcome) = (None, None, 404, Outcome::NoRoute);
        c.grpc_status = Some(5);
        let mut out = Vec::new();
        format_line(&mut out, &c);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for field in [
            "consumer_id",
            "credential_id",
            "plan_id",
            "route_id",
            "upstream_latency_us",
            "upstream_target",
            "user_agent",
        ] {
            assert!(v[field].is_null(), "{field}: {v}");
        }
        assert_eq!((v["status"].as_u64(), v["outcome"].as_str()), (Some(404), Some("no_route")));
        assert_eq!(v["grpc_status"], 5);
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(std::iter::empty(), 1))
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-access-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_follows_a_rotation() {
        let dir = temp_dir("rotate");
        let path = dir.join("access.log");
        let m = metrics();
        let log = AccessLog::new(Some(Destination::File(path.clone())), Arc::clone(&m));
        assert!(log.enabled());
        log.record(&call(Some("first")));
        log.record(&call(Some("second")));
        wait_for(|| lines(&path).len() == 2);
        assert_eq!(m.access_log_lines.load(Ordering::Relaxed), 2);
        // logrotate: move the file away, then SIGHUP (reopen). Lines after go to a new file.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.record(&call(Some("third")));
        wait_for(|| lines(&path).len() == 1);
        assert_eq!(lines(&path)[0]["user_agent"], "third");
        let old: Vec<_> = lines(&rotated).iter().map(|v| v["user_agent"].as_str().unwrap().to_owned()).collect();
        assert_eq!(old, ["first", "second"]);
        // Turned off by a reload: a line logged just before still goes to the file; nothing
        // more is taken.
        log.record(&call(Some("fourth")));
        log.set_destination(None);
        assert!(!log.enabled());
        log.record(&call(Some("fifth")));
        log.close();
        let last: Vec<_> = lines(&path).iter().map(|v| v["user_agent"].as_str().unwrap().to_owned()).collect();
        assert_eq!(last, ["third", "fourth"]);
        assert_eq!(m.access_log_dropped.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn close_writes_what_is_waiting_and_a_new_destination_is_switched_to() {
        let dir = temp_dir("switch");
        let (a, b) = (dir.join("a.log"), dir.join("b.log"));
        let m = metrics();
        // Off at start, turned on by a reload.
        let log = AccessLog::new(None, Arc::clone(&m));
        log.record(&call(None));
        log.set_destination(Some(Destination::File(a.clone())));
        log.record(&call(Some("to a")));
        wait_for(|| lines(&a).len() == 1);
        log.set_destination(Some(Destination::File(b.clone())));
        log.record(&call(Some("to b")));
        // Closed right away: the line waiting is written before the writer stops.
        log.close();
        assert_eq!(lines(&a).len(), 1);
        assert_eq!(lines(&b)[0]["user_agent"], "to b");
        assert_eq!(m.access_log_lines.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_beyond_the_pending_bound_are_dropped_and_counted() {
        let dir = temp_dir("bound");
        let path = dir.join("access.log");
        let m = metrics();
        // Taking lines, with no writer yet: nothing takes them away meanwhile.
        let log = AccessLog::new(None, Arc::clone(&m));
        log.shared.on.store(true, Ordering::Relaxed);
        let mut one = Vec::new();
        format_line(&mut one, &call(None));
        let fit = (MAX_PENDING / one.len()) as u64;
        for _ in 0..fit + 10 {
            log.record(&call(None));
        }
        assert_eq!(m.access_log_dropped.load(Ordering::Relaxed), 10);
        assert_eq!(lock(&log.shared.pending).1, fit);
        // The writer starts and writes them all.
        log.set_destination(Some(Destination::File(path.clone())));
        log.close();
        assert_eq!(lines(&path).len() as u64, fit);
        assert_eq!(m.access_log_lines.load(Ordering::Relaxed), fit);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_destination_drops_lines_counted_and_the_check_names_the_key() {
        let dir = temp_dir("unwritable");
        let missing = Destination::File(dir.join("no-such-dir").join("access.log"));
        let msg = check(&missing).unwrap_err().to_string();
        assert!(msg.contains("edge.access_log") && msg.contains("no-such-dir"), "{msg}");
        let m = metrics();
        let log = AccessLog::new(Some(missing), Arc::clone(&m));
        log.record(&call(None));
        log.close();
        assert_eq!(m.access_log_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(m.access_log_lines.load(Ordering::Relaxed), 0);
        assert!(check(&Destination::Stdout).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
