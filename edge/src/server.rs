//! Listeners, connections and graceful shutdown.
//!
//! Shutdown: stop accepting, let in-flight requests finish within `edge.shutdown_grace_ms`,
//! then close the event queue and flush the Kafka producer.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metering::spool::Spool;
use crate::metering::{EventSink, producer};
use crate::metrics::{ConnTimeout, Metrics};
use crate::silent::FirstBytes;
use crate::{Gateway, Runtime, admin};

/// How [`serve`] is run.
#[derive(Debug, Default, Clone)]
pub struct ServeOptions {
    /// Write `{"listen": "...", "admin": "..."}` here once both ports accept connections.
    pub ready_file: Option<PathBuf>,
    /// Reload routes, plans and consumers from this file on SIGHUP and when it changes.
    pub config_path: Option<PathBuf>,
    /// Environment overrides applied on reload.
    pub env: BTreeMap<String, String>,
}

/// Runs the edge until `shutdown` completes.
pub async fn serve(mut cfg: Config, shutdown: impl Future<Output = ()>, opts: ServeOptions) -> anyhow::Result<()> {
    let ready_file = opts.ready_file.as_deref();
    // The first worker's listener is bound here, so a port 0 is resolved before the other
    // workers bind the same port (SO_REUSEPORT).
    let listener = bind_reuseport(cfg.listen).map_err(|e| anyhow::anyhow!("edge.listen {}: {e}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("edge.admin_listen {}: {e}", cfg.admin_listen))?;
    let (listen, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);
    let redirect_listener = match cfg.http_redirect {
        Some(r) => Some(
            TcpListener::bind(r.listen)
                .await
                .map_err(|e| anyhow::anyhow!("edge.http_redirect_listen {}: {e}", r.listen))?,
        ),
        None => None,
    };
    let redirect_addr = redirect_listener.as_ref().map(TcpListener::local_addr).transpose()?;

    let metrics = Arc::new(Metrics::new(cfg.routes.iter().map(|r| r.id.as_str()), cfg.worker_threads));
    let (events_tx, producer_task) = if cfg.kafka.enabled {
        let spool = Spool::open(&cfg.spool)?;
        let _ = metrics.spool.set(Arc::clone(spool.stats()));
        let (tx, task) = producer::start(&cfg.kafka, spool.clone(), Arc::clone(&metrics), cfg.shutdown_grace)?;
        (Some((tx, spool)), Some(task))
    } else {
        tracing::warn!("kafka.enabled = false: metering is off, no event is produced");
        (None, None)
    };
    if let Some(dest) = &cfg.access_log {
        crate::access_log::check(dest)?;
    }
    let clients = crate::upstream::Clients::new(Arc::clone(&cfg.upstream_tls));
    // The runtime takes the consumers (possibly 100,000s): reloads read the files again.
    let consumers = cfg.consumers.len();
    let runtime = Runtime::new(&mut cfg, &metrics, None);
    let gw = Arc::new(Gateway {
        instance_id: cfg.instance_id.clone(),
        runtime: std::sync::RwLock::new(Arc::new(runtime)),
        clients,
        events: EventSink::new(events_tx, Arc::clone(&metrics)).map_err(|e| anyhow::anyhow!("event encoder: {e}"))?,
        access_log: crate::access_log::AccessLog::new(cfg.access_log.clone(), Arc::clone(&metrics)),
        metrics: Arc::clone(&metrics),
        quotas: Arc::clone(&metrics.quota),
        tunnels: tokio::sync::watch::channel(false).0,
        telemetry: cfg.telemetry.otlp_endpoint.is_some(),
    });
    let tunnels = gw.tunnels.clone();
    let for_workers = Arc::clone(&gw);
    let reload_task =
        opts.config_path.clone().map(|path| tokio::spawn(reload(Arc::clone(&gw), cfg.clone(), path, opts.env.clone())));
    let jwks_task = tokio::spawn(refresh_jwks(Arc::clone(&gw)));
    let health_task = tokio::spawn(crate::upstream::run_health_checks(Arc::clone(&gw)));
    let quota_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quota_thread = if cfg.kafka.enabled && !cfg.kafka.quota_topic.is_empty() {
        Some(crate::quota::start(
            cfg.kafka.brokers.clone(),
            cfg.kafka.quota_topic.clone(),
            cfg.kafka.properties.clone(),
            &cfg.instance_id,
            Arc::clone(&gw.quotas),
            Arc::clone(&quota_stop),
        )?)
    } else {
        None
    };
    drop(gw);

    let admin_router = admin::app(Arc::clone(&metrics), Arc::downgrade(&for_workers));
    let admin_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin_router).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });

    // A port 0 in edge.listen (tests) is the port it was given.
    let https_port = cfg.http_redirect.map(|r| if r.https_port == 0 { listen.port() } else { r.https_port });
    let redirect_task = redirect_listener
        .zip(https_port)
        .map(|(l, port)| tokio::spawn(crate::redirect::serve(l, port, Arc::clone(&for_workers))));

    if let Some(path) = ready_file {
        let mut body = serde_json::json!({ "listen": listen.to_string(), "admin": admin_addr.to_string() });
        if let Some(a) = redirect_addr {
            body["http_redirect"] = a.to_string().into();
        }
        std::fs::write(path, body.to_string())
            .map_err(|e| anyhow::anyhow!("cannot write ready file {}: {e}", path.display()))?;
    }
    tracing::info!(
        %listen,
        admin = %admin_addr,
        http_redirect = ?redirect_addr,
        routes = cfg.routes.len(),
        consumers,
        "edge started"
    );

    // Thread per core: each worker thread runs its own current-thread runtime, accepts on its
    // own SO_REUSEPORT listener (the kernel spreads connections) and keeps its own upstream
    // connection pools, so a request never crosses threads (docs/benchmarks.md).
    let grace = cfg.shutdown_grace;
    // Shared by the workers: a connection holds a slot from its accept to its end.
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    metrics.connection_limit.store(cfg.max_connections as u64, Ordering::Relaxed);
    if let Some(files) = crate::config::open_files_limit()
        && (cfg.max_connections as u64) * 2 > files
    {
        tracing::warn!(
            max_connections = cfg.max_connections,
            open_files_limit = files,
            "edge.max_connections is more than half the open-file limit: with an upstream connection per client \
             connection, the edge may run out of file descriptors first (raise the limit: ulimit -n, LimitNOFILE)"
        );
    }
    if cfg.http.proxy_protocol && cfg.http.proxy_protocol_from.is_none() {
        tracing::warn!(
            "edge.proxy_protocol is on for every peer: a client that can reach the edge directly can name any \
             address in its own PROXY header (set edge.proxy_protocol_from to the load balancers)"
        );
    }
    let (stop_accepting, stop_rx) = tokio::sync::watch::channel(false);
    let (release, release_rx) = tokio::sync::watch::channel(false);
    let mut drained = Vec::new();
    let mut threads = Vec::new();
    let mut first = Some(listener.into_std()?);
    for i in 0..cfg.worker_threads {
        let std_listener = match first.take() {
            Some(l) => l,
            None => bind_reuseport(listen)?.into_std()?,
        };
        let (for_workers, slots, mut stop_rx, mut release_rx) =
            (for_workers.clone(), Arc::clone(&slots), stop_rx.clone(), release_rx.clone());
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        drained.push(drained_rx);
        threads.push(std::thread::Builder::new().name(format!("edge-worker-{i}")).spawn(move || {
            Metrics::set_worker(i);
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker runtime");
                    return;
                }
            };
            rt.block_on(async move {
                // This worker's idle upstream connections are closed once idle too long.
                let sweeper = tokio::spawn(async {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        crate::upstream::Clients::sweep_local();
                    }
                });
                match TcpListener::from_std(std_listener) {
                    Ok(l) => accept_loop(l, for_workers, slots, grace, &mut stop_rx).await,
                    Err(e) => tracing::error!(error = %e, "worker listener"),
                }
                let _ = drained_tx.send(());
                // Keep the runtime (its upgrade tunnels and their metering) until released.
                let _ = release_rx.wait_for(|r| *r).await;
                sweeper.abort();
            });
        })?);
    }
    shutdown.await;
    // Load balancers polling `/readyz` see 503 from now on; the admin port stays up until the
    // drain is over.
    metrics.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop_accepting.send(true);
    if let Some(t) = redirect_task {
        t.abort();
    }
    tracing::info!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "draining in-flight requests");
    for d in drained {
        let _ = d.await;
    }
    // Upgraded connections (WebSockets) are not HTTP connections any more: close them now and
    // wait (briefly) until their events are in the producer queue.
    let _ = tunnels.send(true);
    let open = || metrics.tunnels_open.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = release.send(true);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // Every call is done: the access log's last lines are written.
    let gw = for_workers;
    let _ = tokio::task::spawn_blocking(move || gw.access_log.close()).await;
    if let Some(t) = reload_task {
        t.abort();
        let _ = t.await;
    }
    admin_task.abort();
    jwks_task.abort();
    health_task.abort();
    quota_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = quota_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some(task) = producer_task {
        task.close().await?;
    }
    tracing::info!(
        produced = metrics.events_produced.load(std::sync::atomic::Ordering::Relaxed),
        dropped = metrics.events_dropped.load(std::sync::atomic::Ordering::Relaxed),
        delivery_failed = metrics.events_delivery_failed.load(std::sync::atomic::Ordering::Relaxed),
        "edge stopped"
    );
    Ok(())
}

/// The HTTP/1 and HTTP/2 server for connections with these settings.
fn connection_builder(http: &crate::config::HttpSettings) -> auto::Builder<TokioExecutor> {
    // hyper's parser is the backstop; the configured limits are checked (and metered) by the
    // hygiene layer.
    let max_buf_size = (http.max_header_bytes * crate::hygiene::PARSER_HEADROOM).max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(http.header_read_timeout).max_buf_size(max_buf_size);
    if let Some(n) = crate::hygiene::parser_max_headers(http.max_headers) {
        builder.http1().max_headers(n);
    }
    // HTTP/2: the same backstop for the head as HTTP/1's buffer (hyper's default is 16 KiB,
    // which would refuse heads between it and `max_header_bytes` before the edge's 431), and
    // keep-alive PINGs, which find a client that is gone while its streams wait upstream.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_buf_size).unwrap_or(u32::MAX))
        .keep_alive_interval(http.http2_keepalive_interval)
        .keep_alive_timeout(http.http2_keepalive_timeout);
    builder
}

/// With `edge.proxy_protocol`: the client the connection's PROXY header names (`peer`, the
/// balancer, when it names none, or when `peer` is not one of `edge.proxy_protocol_from`),
/// or `None` when the header is missing or invalid (the connection is then dropped, and
/// counted).
pub(crate) async fn proxied_client(
    metrics: &Metrics,
    http: &crate::config::HttpSettings,
    stream: &mut tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    match crate::proxy_protocol::read_header(stream, http.header_read_timeout).await {
        Ok(Some(client)) => {
            let trusted =
                http.proxy_protocol_from.as_ref().is_none_or(|nets| nets.iter().any(|n| n.contains(peer.ip())));
            if trusted {
                return Some(client);
            }
            metrics.proxy_protocol_untrusted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, %client, "PROXY header from a peer not in edge.proxy_protocol_from: its address ignored");
            Some(peer)
        }
        Ok(None) => Some(peer),
        Err(e) => {
            metrics.proxy_protocol_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "connection closed: no valid PROXY protocol header");
            None
        }
    }
}

/// After a failed accept (out of file descriptors and the like): logs it and backs off for a
/// moment instead of spinning on the error.
pub(crate) async fn accept_failed(e: &std::io::Error, listener: &str) {
    tracing::warn!(error = %e, listener, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A listener with SO_REUSEPORT (and SO_REUSEADDR), so every worker can bind the same port.
pub fn bind_reuseport(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// One worker's accept loop: serves connections until `stop` turns true, then lets in-flight
/// requests finish within the grace period.
async fn accept_loop(
    listener: TcpListener,
    gw: Arc<Gateway>,
    slots: Arc<tokio::sync::Semaphore>,
    grace: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    // Rebuilt when a reload changes the settings: new connections get them, open ones keep
    // theirs.
    let mut http = gw.runtime().http.clone();
    let mut builder = connection_builder(&http);
    // Each connection's task holds a sender: the drain is over when the last one is dropped.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let told_to_stop = stop.clone();
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e, "edge.listen").await;
                    continue;
                }
            },
        };
        // A slot of `edge.max_connections` for it. None free: this worker holds the
        // connection, unserved, and accepts nothing more until a slot frees (further
        // connections wait in the kernel's listen backlog). Taken after the accept:
        // each worker has its own listener, and a slot taken before it could go to a
        // worker with no connection waiting while another worker's waits.
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                gw.metrics.connection_limit_waits.fetch_add(1, Ordering::Relaxed);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warning = Some(std::time::Instant::now());
                    tracing::warn!(
                        max_connections = gw.metrics.connection_limit.load(Ordering::Relaxed),
                        "edge.max_connections connections are open: not accepting until one closes"
                    );
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        gw.metrics.connections_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let runtime = gw.runtime();
        if runtime.http != http {
            http = runtime.http.clone();
            builder = connection_builder(&http);
        }
        let life = ConnLife::new(&gw.metrics, told_to_stop.clone(), http.idle_timeout, alive.clone(), slot);
        match runtime.tls.clone() {
            None if !http.proxy_protocol => {
                let peer = crate::Peer::new(peer, false);
                let stream = FirstBytes::new(stream, http.header_read_timeout);
                tokio::spawn(serve_connection(&builder, stream, Arc::clone(&gw), peer, life));
            }
            None => {
                let (builder, gw) = (builder.clone(), Arc::clone(&gw));
                let deadline = http.header_read_timeout;
                let http = http.clone();
                tokio::spawn(async move {
                    let (mut stream, mut life) = (stream, life);
                    let Some(client) =
                        life.unless_stopping(proxied_client(&gw.metrics, &http, &mut stream, peer)).await
                    else {
                        return;
                    };
                    let stream = FirstBytes::new(stream, deadline);
                    serve_connection(&builder, stream, gw, crate::Peer::new(client, false), life).await;
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's task, within the time a client
                // has for its request head (after the PROXY header's, if any).
                let (builder, gw) = (builder.clone(), Arc::clone(&gw));
                let deadline = http.header_read_timeout;
                let http = http.clone();
                tokio::spawn(async move {
                    let (mut stream, mut life, mut peer) = (stream, life, peer);
                    if http.proxy_protocol {
                        let header = proxied_client(&gw.metrics, &http, &mut stream, peer);
                        let Some(client) = life.unless_stopping(header).await else {
                            return;
                        };
                        peer = client;
                    }
                    let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                    let done = tokio::time::timeout(deadline, handshake).await.unwrap_or_else(|_| {
                        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "not done in header_read_timeout_ms"))
                    });
                    let stream = match done {
                        Ok(s) => s,
                        Err(e) => {
                            gw.metrics.tls_handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                    };
                    // The client certificate, if any, was verified against
                    // `edge.tls_client_ca_file` by the handshake.
                    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let peer = crate::Peer::with_client_cert(peer, true, cert.map(|c| crate::auth::fingerprint(c)));
                    let stream = FirstBytes::new(stream, deadline);
                    serve_connection(&builder, stream, gw, peer, life).await;
                });
            }
        }
    }
    drop(listener);
    drop(alive);
    tokio::select! {
        _ = all_closed.recv() => tracing::debug!("worker: all connections closed"),
        () = tokio::time::sleep(grace) => {
            gw.metrics.grace_over.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("shutdown grace over; closing remaining connections (their calls are metered as edge_shutdown)");
        }
    }
}

/// A connection on the traffic port from its accept until its task ends (however it ends):
/// counted in `tollgate_edge_connections_open`, waited for by the worker's drain, and closed
/// gracefully when the worker stops accepting or when no request has started on it for
/// `edge.idle_timeout_ms`.
struct ConnLife {
    metrics: Arc<Metrics>,
    /// Turns true when the worker stops accepting.
    stop: tokio::sync::watch::Receiver<bool>,
    idle_timeout: Duration,
    _alive: tokio::sync::mpsc::Sender<()>,
    /// The connection's slot of `edge.max_connections`.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl ConnLife {
    fn new(
        metrics: &Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
        idle_timeout: Duration,
        alive: tokio::sync::mpsc::Sender<()>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        Self { metrics: Arc::clone(metrics), stop, idle_timeout, _alive: alive, _slot: slot }
    }
}

impl ConnLife {
    /// `step`'s output, or `None` as soon as the worker stops accepting (a connection still
    /// waiting for its PROXY header is not worth a shutdown's wait).
    async fn unless_stopping<T>(&mut self, step: impl Future<Output = Option<T>>) -> Option<T> {
        tokio::select! {
            out = step => out,
            _ = self.stop.wait_for(|s| *s) => None,
        }
    }
}

impl Drop for ConnLife {
    fn drop(&mut self) {
        self.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a connection's error is the edge closing it because a request did not come in
/// time, and which wait it was (`served`: a request head had been read on it before).
pub(crate) fn timed_out(e: &(dyn std::error::Error + 'static), served: bool) -> Option<ConnTimeout> {
    // `FirstBytes`'s error, returned before hyper knew the protocol.
    if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
        return Some(ConnTimeout::FirstBytes);
    }
    // hyper's `header_read_timeout` (HTTP/1).
    if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
        return Some(if served { ConnTimeout::Idle } else { ConnTimeout::RequestHead });
    }
    None
}

/// One client connection (plain or TLS) served by the gateway, HTTP/1.1 or HTTP/2, until the
/// client closes it, a timeout cuts it, or it is closed gracefully (in-flight requests
/// finish): at shutdown, or once idle for `edge.idle_timeout_ms`.
fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    gw: Arc<Gateway>,
    peer: crate::Peer,
    life: ConnLife,
) -> impl Future<Output = ()> + Send + use<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    // Counts the requests started on the connection (`handle`).
    let requests = peer.clone();
    let svc = hyper::service::service_fn(move |req| {
        let fut = crate::handle(Arc::clone(&gw), peer.clone(), req);
        async move { Ok::<_, std::convert::Infallible>(fut.await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned();
    async move {
        let mut life = life;
        let mut conn = std::pin::pin!(conn);
        // Idleness is checked every quarter of the timeout: a connection is closed after
        // between 1 and 1.25 times `idle_timeout` without a new request.
        let step = (life.idle_timeout / 4).max(Duration::from_millis(1));
        let idle_check = tokio::time::sleep(step);
        let mut idle_check = std::pin::pin!(idle_check);
        let (mut seen, mut quiet_since) = (0, tokio::time::Instant::now());
        let mut closing = false;
        let result = loop {
            tokio::select! {
                biased;
                r = conn.as_mut() => break r,
                _ = life.stop.wait_for(|s| *s), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = idle_check.as_mut(), if !closing => {
                    let now = tokio::time::Instant::now();
                    let n = requests.requests();
                    if n != seen {
                        (seen, quiet_since) = (n, now);
                    }
                    if now.duration_since(quiet_since) >= life.idle_timeout {
                        closing = true;
                        life.metrics.connections_timed_out[ConnTimeout::Idle as usize].fetch_add(1, Ordering::Relaxed);
                        conn.as_mut().graceful_shutdown();
                    } else {
                        idle_check.as_mut().reset(now + step);
                    }
                }
            }
        };
        if let Err(e) = result {
            if let Some(reason) = timed_out(&*e, requests.requests() > 0) {
                life.metrics.connections_timed_out[reason as usize].fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(error = %e, peer = %addr, "connection ended with an error");
        }
    }
}

/// Keeps the JWT issuers' key sets fresh: loads each JWKS at start and every `jwks_refresh_s`
/// (sooner after a failed fetch), for whatever config is current.
async fn refresh_jwks(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let runtime = gw.runtime();
        if !runtime.jwt.is_empty() {
            runtime.jwt.refresh_due(&runtime.client).await;
        }
    }
}

/// Reloads routes, plans, consumers and the TLS settings on SIGHUP and when the modification
/// time of the config file, its consumers file or one of its TLS files changes (checked every
/// second). An invalid file is rejected with a log line naming the key; the running config
/// stays. Settings that need a restart (listeners, Kafka, spool, limits of the HTTP parser)
/// are reported and ignored.
async fn reload(gw: Arc<Gateway>, mut current: Config, path: PathBuf, env: BTreeMap<String, String>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGHUP handler; reloading on file change only");
            None
        }
    };
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The modification times of the config file and the files it names that a reload reads
    // again (the consumers file, the TLS files).
    let stamp = |cfg: &Config| -> Vec<Option<SystemTime>> {
        std::iter::once(path.as_path())
            .chain(cfg.consumers_file.as_deref())
            .chain(cfg.tls_files.iter().map(PathBuf::as_path))
            .map(mtime)
            .collect()
    };
    let mut seen = stamp(&current);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let trigger = tokio::select! {
            _ = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                if stamp(&current) == seen { continue; }
                "file change"
            }
        };
        seen = stamp(&current);
        // SIGHUP also reopens the access log (after logrotate moved it), whatever the config.
        if trigger == "SIGHUP" {
            gw.access_log.reopen();
        }
        let loaded = {
            let (path, env) = (path.clone(), env.clone());
            tokio::task::spawn_blocking(move || Config::load(&path, &env)).await
        };
        match loaded {
            Ok(Ok(next)) => {
                let restart_only = [
                    ("edge.listen", next.listen != current.listen),
                    ("edge.admin_listen", next.admin_listen != current.admin_listen),
                    ("edge.http_redirect_listen / edge.https_public_port", next.http_redirect != current.http_redirect),
                    ("kafka", next.kafka != current.kafka),
                    ("spool", next.spool != current.spool),
                    ("telemetry", next.telemetry != current.telemetry),
                    (
                        "edge.tls_cert_file (turning HTTPS on or off; a new certificate is taken)",
                        next.tls_server.is_some() != current.tls_server.is_some(),
                    ),
                    ("edge.worker_threads", next.worker_threads != current.worker_threads),
                    ("edge.max_connections", next.max_connections != current.max_connections),
                    ("edge.shutdown_grace_ms", next.shutdown_grace != current.shutdown_grace),
                    ("edge.instance_id", next.instance_id != current.instance_id),
                ];
                for (key, changed) in restart_only {
                    if changed {
                        tracing::warn!(key, "config change needs a restart; ignored until then");
                    }
                }
                // The CA list or the upstream client certificate changed: new upstream
                // connections use them; pooled https connections are closed.
                if next.tls_ca != current.tls_ca
                    || next.upstream_identity.as_ref().map(|k| &k.cert)
                        != current.upstream_identity.as_ref().map(|k| &k.cert)
                {
                    gw.clients.set_tls(Arc::clone(&next.upstream_tls));
                    tracing::info!("upstream TLS settings changed: https upstream connections are made anew");
                }
                if next.tls_ca != current.tls_ca && current.telemetry.otlp_endpoint.is_some() {
                    tracing::warn!(
                        key = "edge.tls_ca_file",
                        "the OTLP exporter keeps the CA list it started with until a restart"
                    );
                }
                let consumers = next.consumers.len();
                let mut next = next;
                if next.tls_server.is_some() != current.tls_server.is_some() {
                    next.tls_server.clone_from(&current.tls_server);
                }
                gw.swap_runtime(Runtime::new(&mut next, &gw.metrics, Some(&gw.runtime())));
                gw.access_log.set_destination(next.access_log.clone());
                gw.metrics.config_reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(trigger, routes = next.routes.len(), consumers, "config reloaded");
                // Only the restart-only settings are compared next time.
                seen = stamp(&next);
                current = next;
            }
            Ok(Err(e)) => {
                gw.metrics.config_reload_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(trigger, error = %e, "config reload rejected; the running config stays");
            }
            Err(e) => tracing::error!(error = %e, "config reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_timed_out_read_before_the_protocol_is_known_is_first_bytes() {
        let io = |kind| std::io::Error::new(kind, "x");
        assert_eq!(timed_out(&io(std::io::ErrorKind::TimedOut), false), Some(ConnTimeout::FirstBytes));
        assert_eq!(timed_out(&io(std::io::ErrorKind::TimedOut), true), Some(ConnTimeout::FirstBytes));
        assert_eq!(timed_out(&io(std::io::ErrorKind::ConnectionReset), false), None);
        assert_eq!(timed_out(&io(std::io::ErrorKind::UnexpectedEof), true), None);
        // Any other error (hyper's parse errors and the like) is not a timeout.
        let other: Box<dyn std::error::Error + Send + Sync> = "invalid header".into();
        assert_eq!(timed_out(&*other, true), None);
    }
}
