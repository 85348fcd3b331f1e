//! Listeners and connections: binding, hyper connection setup (HTTP/1.1 and h2c),
//! connection limits, the per-request handler that joins pipeline and forwarder, and
//! shutdown and reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::{Config, RuntimeLayout};
use crate::connection::{self, GuardedIo, PerAddressLimit};
use crate::errors::Refusal;
use crate::forward::{Forwarder, GateBody, LimitedBody, RequestBody};
use crate::h1;
use crate::headers::{self, X_REQUEST_ID};
use crate::pipeline::{self, Policy};
use crate::store::Store;
use crate::store::file::FileStore;
use crate::telemetry::Metrics;
use crate::tls::Tls;
use crate::tokens;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// State shared by every connection of one gateway process.
pub struct Gate {
    pub policy: ArcSwap<Policy>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    /// TLS termination, when `[server] tls` is set.
    pub tls: Option<Tls>,
    /// Latched true once the store answered and invalidation is live; never unset.
    pub ready: AtomicBool,
}

/// A running gateway: its bound addresses and the handle to stop it.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gate: Arc<Gate>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Opens the store, binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, BoxError> {
        let metrics = Arc::new(Metrics::default());
        let store = Store::from_config(&config.store).await?;
        let auth = Authenticator::new(store.clone(), &config.auth, metrics.clone());
        let workers = match config.server.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let runtime = config.server.runtime;
        let listeners = bind_listeners(
            config.server.listen,
            if runtime == RuntimeLayout::PerCore {
                workers
            } else {
                1
            },
        )
        .map_err(|e| format!("server.listen {}: {e}", config.server.listen))?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|e| format!("admin.listen {}: {e}", config.admin.listen))?;
        let addr = listeners[0].local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let check_interval = config.auth.invalidation_check_interval;
        let tls = match &config.server.tls {
            Some(t) => Some(Tls::load(t)?),
            None => None,
        };
        let policy = Policy::new(config).map_err(|e| format!("invalid config: {e}"))?;
        let gate = Arc::new(Gate {
            policy: ArcSwap::from_pointee(policy),
            auth,
            metrics,
            tls,
            ready: AtomicBool::new(false),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = start_workers(listeners, runtime, &gate, &shutdown_rx)?;
        tasks.extend([
            tokio::spawn(crate::admin::serve(
                admin_listener,
                gate.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(watch_store(
                gate.clone(),
                store,
                check_interval,
                shutdown_rx.clone(),
            )),
            tokio::spawn(housekeeping(gate.clone(), shutdown_rx.clone())),
        ]);
        if let Some(uses) = gate.auth.take_uses() {
            tasks.push(tokio::spawn(record_uses(gate.clone(), uses, shutdown_rx)));
        }
        Ok(Gateway {
            addr,
            admin_addr,
            gate,
            shutdown,
            tasks,
        })
    }

    /// Replaces the policy (routes, grants config) with one built from `config`; the
    /// old one keeps serving when the new one is invalid.
    /// TLS material is re-read from the paths given at start.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let policy = Policy::new(config)?;
        if let Some(tls) = &self.gate.tls {
            tls.reload()?;
        }
        self.gate.policy.store(Arc::new(policy));
        // Cached grants were compiled against the old route table.
        self.gate.auth.flush_all("config reload");
        Ok(())
    }

    /// Stops accepting, drains in-flight requests up to `[server] shutdown_grace`.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Runs the gateway until SIGTERM/SIGINT; SIGHUP re-reads `config_path`.
pub async fn serve(config: Config, config_path: Option<PathBuf>) -> Result<(), BoxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let gateway = Gateway::start(config).await?;
    println!(
        "campaign-gate listening on http://{} (admin http://{})",
        gateway.addr, gateway.admin_addr
    );
    tracing::info!(addr = %gateway.addr, admin = %gateway.admin_addr, "listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match Config::load(config_path.as_deref(), std::env::vars()) {
                    Ok(cfg) => match gateway.reload(cfg) {
                        Ok(()) => tracing::info!("config reloaded"),
                        Err(e) => tracing::error!(error = %e, "reload refused; keeping the old config"),
                    },
                    Err(e) => tracing::error!(error = %e.to_string().replace('\n', "; "), "reload refused; keeping the old config"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let s = &config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // `header_read_timeout` is kept by the framing guard (`connection::GuardedIo`)
        // with one timer per connection: hyper's made and dropped one per request. It
        // was hyper's only use of a timer on HTTP/1, so none is set there.
        .header_read_timeout(None)
        .max_buf_size(s.max_header_bytes.max(8192))
        .max_headers(s.max_headers)
        .half_close(true)
        .keep_alive(true)
        // One buffer per write (head and body copied together) instead of a vectored
        // write of several: less CPU per request in user space and kernel (BENCHMARKS.md,
        // "Flattened writes"); TLS connections included.
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(20)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Binds `n` listeners on one address: with `n > 1` they share the port through
/// `SO_REUSEPORT` and the kernel spreads new connections over them.
fn bind_listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if n > 1 {
            socket.set_reuseport(true)?;
        }
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        // Every further listener takes the port the first one got (`:0` in tests).
        addr = socket.local_addr()?;
        let std_socket = socket_into_std(socket)?;
        std_socket.set_nonblocking(true)?;
        out.push(std_socket);
    }
    Ok(out)
}

/// Turns a bound socket into a listening std listener without registering it with any
/// runtime, so that each worker registers its own.
fn socket_into_std(socket: tokio::net::TcpSocket) -> std::io::Result<std::net::TcpListener> {
    let listener = socket.listen(1024)?;
    listener.into_std()
}

/// Starts accepting: one current-thread runtime per listener on its own thread
/// (per-core), or every listener on the calling multi-thread runtime.
fn start_workers(
    listeners: Vec<std::net::TcpListener>,
    layout: RuntimeLayout,
    gate: &Arc<Gate>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, BoxError> {
    let per_worker = gate.policy.load().config.server.max_connections / listeners.len().max(1);
    let per_address = PerAddressLimit::new(gate.policy.load().config.server.max_connections_per_ip);
    let mut tasks = Vec::new();
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let worker = Worker {
            gate: gate.clone(),
            forwarder: {
                let p = gate.policy.load();
                Forwarder::new(&p.config.upstream, p.config.server.request_timeout)
            },
        };
        let per_address = per_address.clone();
        let shutdown = shutdown.clone();
        match layout {
            RuntimeLayout::MultiThread => {
                let listener = TcpListener::from_std(std_listener)?;
                tasks.push(tokio::spawn(accept_loop(
                    listener,
                    Arc::new(worker),
                    per_worker.max(1),
                    per_address,
                    shutdown,
                )));
            }
            RuntimeLayout::PerCore => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                std::thread::Builder::new()
                    .name(format!("campaign-gate-worker-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            match TcpListener::from_std(std_listener) {
                                Ok(listener) => {
                                    accept_loop(
                                        listener,
                                        Arc::new(worker),
                                        per_worker.max(1),
                                        per_address,
                                        shutdown,
                                    )
                                    .await;
                                }
                                Err(e) => tracing::error!(error = %e, "worker could not listen"),
                            }
                        });
                        let _ = done_tx.send(());
                    })?;
                tasks.push(tokio::spawn(async move {
                    let _ = done_rx.await;
                }));
            }
        }
    }
    Ok(tasks)
}

/// What one accept loop owns: the shared gate and its own upstream connection pool
/// (a pool per runtime keeps each backend connection on the thread that uses it).
struct Worker {
    gate: Arc<Gate>,
    forwarder: Forwarder,
}

async fn accept_loop(
    listener: TcpListener,
    worker: Arc<Worker>,
    max: usize,
    per_address: Arc<PerAddressLimit>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = &worker.gate;
    let (builder, idle, grace, handshake_timeout, store_timeout) = {
        let policy = gate.policy.load();
        let s = &policy.config.server;
        (
            Arc::new(connection_builder(&policy.config)),
            s.idle_timeout,
            s.shutdown_grace,
            s.header_read_timeout,
            policy.config.store.timeout,
        )
    };
    let _heartbeat = Heartbeat::start(store_timeout);
    let limit = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(slot) = per_address.acquire(peer.ip()) else {
            gate.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            worker: worker.clone(),
            builder: builder.clone(),
            peer,
            idle,
            shutdown: shutdown.clone(),
        };
        let tls = gate.tls.as_ref().map(|t| (t.acceptor(), handshake_timeout));
        tokio::spawn(async move {
            let metrics = conn.worker.gate.metrics.clone();
            metrics.open_connections.add(1);
            match tls {
                None => conn.serve(stream, "http").await,
                Some((acceptor, timeout)) => {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => conn.serve(tls_stream, "https").await,
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            metrics.open_connections.sub(1);
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    // Every open connection holds a permit: all of them back means all drained.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with connections still open");
    }
}

/// A timer that fires every half `[store] timeout` on the worker's runtime, for as
/// long as its accept loop runs, and does nothing else. Arming a timer earlier than every
/// other one of the runtime wakes its driver through an `eventfd` write, even from the
/// driver's own thread: tokio cannot tell that the thread is busy, not parked. Under a
/// miss load each lookup arms its store timeout (`now + timeout`); whenever the worker
/// had parked with no lookup in flight, that timer was the earliest, about once every
/// four misses. With this one always due within half the store timeout, a store timer
/// never is. BENCHMARKS.md, "Store timers without wake-ups".
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(store_timeout: Duration) -> Heartbeat {
        let period = (store_timeout / 2).max(Duration::from_millis(1));
        Heartbeat(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One accepted connection, before its protocol (plain or TLS) is known.
struct Conn {
    worker: Arc<Worker>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
    idle: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Conn {
    /// Serves HTTP on `io` until the connection ends. `proto` is what
    /// `X-Forwarded-Proto` says.
    async fn serve<IO>(self, io: IO, proto: &'static str)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (limits, header_read_timeout) = {
            let s = &self.worker.gate.policy.load().config.server;
            let limits = crate::framing::Limits {
                max_header_bytes: s.max_header_bytes,
                max_headers: s.max_headers,
                max_uri_bytes: s.max_uri_bytes,
            };
            (limits, s.header_read_timeout)
        };
        let (io, counts) = GuardedIo::new(io, Some(limits), header_read_timeout);
        let worker = self.worker;
        let peer = self.peer;
        let peer_header = headers::ip_header_value(peer.ip());
        let io_counts = counts.clone();
        let one = move |req: Request<RequestBody>| {
            serve_one(&worker, peer, &peer_header, proto, &io_counts, req)
        };
        // The gateway's own HTTP/1 loop first (`h1`); hyper takes over for the rest of
        // the connection at the first request the loop does not serve.
        let closing = Arc::new(AtomicBool::new(false));
        let own = OwnLoop {
            fut: Box::pin(h1::serve(io, closing.clone(), one.clone())),
            closing,
        };
        let ended = connection::drive(
            own,
            OwnLoop::close,
            counts.clone(),
            self.idle,
            self.shutdown.clone(),
        )
        .await;
        let io = match ended {
            Ok(h1::Ended::Handover(mut io, read)) => {
                io.unread(&read);
                io
            }
            Ok(h1::Ended::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
                return;
            }
        };
        let svc = service_fn(move |req: Request<Incoming>| one(req.map(RequestBody::Hyper)));
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), svc)
            .into_owned();
        if let Err(e) = connection::drive(
            conn,
            |c| c.graceful_shutdown(),
            counts,
            self.idle,
            self.shutdown,
        )
        .await
        {
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
    }
}

/// One request of a connection, by whichever HTTP/1 loop or HTTP/2 stream it came.
/// `handle` is called inside, its future pinned where it is made: the handler's state
/// is some KB, and each move of it was a `memcpy` (three per request in all).
fn serve_one(
    worker: &Arc<Worker>,
    peer: SocketAddr,
    peer_header: &HeaderValue,
    proto: &'static str,
    counts: &connection::IoCounts,
    req: Request<RequestBody>,
) -> impl std::future::Future<Output = Result<Response<GateBody>, Infallible>> + Send + use<> {
    let start = counts.start_request();
    let (worker, peer_header) = (worker.clone(), peer_header.clone());
    async move {
        // A request that was already buffered behind the previous one (deep HTTP/1
        // pipelining) gives the worker's other connections a turn first: otherwise
        // such a connection is answered from its buffer 16 requests per poll, keeps
        // the run queue full, and a current-thread worker then polls its I/O driver
        // (other clients' reads, accepts, upstream answers) only every 61 task polls.
        // A request that needed a read of its own never yields.
        if start.buffered {
            tokio::task::yield_now().await;
        }
        std::pin::pin!(handle(worker, peer, peer_header, proto, req, start.refused)).await
    }
}

/// The gateway's own HTTP/1 loop as [`connection::drive`] runs it: closing sets a flag
/// the loop reads between requests and while it waits for one.
struct OwnLoop<F> {
    fut: std::pin::Pin<Box<F>>,
    closing: Arc<AtomicBool>,
}

impl<F: std::future::Future> std::future::Future for OwnLoop<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.get_mut().fut.as_mut().poll(cx)
    }
}

impl<F> OwnLoop<F> {
    fn close(c: std::pin::Pin<&mut Self>) {
        c.closing.store(true, Ordering::Relaxed);
    }
}

/// Applies store changes to the cache: for the `file:` store, polls the file; for Redis,
/// follows the invalidation channel ([`crate::auth::invalidation`]). Latches `ready`.
async fn watch_store(
    gate: Arc<Gate>,
    store: Store,
    check_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    match store {
        Store::File(file) => watch_file(&gate, &file, check_interval, &mut shutdown).await,
        Store::Redis(redis) => {
            crate::auth::invalidation::follow(
                &redis,
                &gate.auth,
                &gate.metrics,
                &gate.ready,
                check_interval,
                &mut shutdown,
            )
            .await;
        }
    }
}

/// Re-reads the store file when it changes (every 200 ms, or the check interval if
/// shorter) and flushes the cache then.
async fn watch_file(
    gate: &Gate,
    file: &Arc<FileStore>,
    check_interval: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    gate.ready.store(true, Ordering::Release);
    let mut tick = tokio::time::interval(check_interval.min(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A reload waits for a write in progress (the key-use writer's): off the runtime.
        let file = file.clone();
        match crate::store::off_runtime(move || file.reload_if_changed()).await {
            Ok(true) => gate.auth.flush_all("store file changed"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "store file reload failed; keeping the last good copy")
            }
        }
    }
}

/// Writes key uses to the store in batches (at most one write a second), so that
/// `keys list` can show when each key was last used.
///
/// Between batches nobody waits on the queue: a worker's `try_send` then wakes no one.
/// (Waiting on it while gathering a batch cost a cross-thread wake-up per use, about one
/// per request when many keys are new, as after a restart.) Whatever the queue holds
/// after the pause is taken at once.
async fn record_uses(
    gate: Arc<Gate>,
    mut uses: tokio::sync::mpsc::Receiver<crate::store::KeyUse>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = uses.recv_many(&mut batch, 1024) => if n == 0 { return },
            _ = shutdown.changed() => return,
        }
        // On shutdown, what was gathered is still written.
        let last = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = shutdown.changed() => true,
        };
        while let Ok(u) = uses.try_recv() {
            batch.push(u);
        }
        match gate.auth.store().record_uses(&batch).await {
            Ok(users) => gate.metrics.key_use_writes.add(users as u64),
            Err(e) => tracing::warn!(error = %e, uses = batch.len(), "could not record key uses"),
        }
        batch.clear();
        if last {
            return;
        }
    }
}

/// Once a second: re-reads the TLS files if they changed, sweeps one shard of the auth
/// cache, and samples the cache size.
async fn housekeeping(gate: Arc<Gate>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Some(tls) = &gate.tls {
            match tls.reload_if_changed() {
                Ok(true) => {
                    gate.metrics.tls_reloads.inc();
                    tracing::info!("TLS certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    gate.metrics.tls_reload_errors.inc();
                    tracing::error!(error = %e, "TLS reload refused; keeping the old certificate");
                }
            }
        }
        gate.auth.sweep();
        gate.metrics.cache_entries.set(gate.auth.entry_count());
    }
}

/// `X-Forwarded-Proto` values.
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// One request, start to finish: decide, then forward or refuse.
async fn handle(
    worker: Arc<Worker>,
    peer: SocketAddr,
    peer_header: HeaderValue,
    proto: &'static str,
    req: Request<RequestBody>,
    refused: Option<Refusal>,
) -> Result<Response<GateBody>, Infallible> {
    let started = Instant::now();
    let gate = &worker.gate;
    let policy = gate.policy.load();
    let (head, body) = req.into_parts();
    let request_id = headers::request_id(&head.headers);
    if let Some(refusal) = refused {
        // The stand-in for a head the framing guard refused (connection::GuardedIo):
        // its own method and path mean nothing.
        let resp = refusal.response(&request_id, policy.config.compat.campaign_statuses);
        finish(
            gate,
            "-",
            &request_id,
            None,
            None,
            outcome_of(refusal),
            resp.status().as_u16(),
            started.elapsed(),
        );
        return Ok(resp);
    }
    let max_body = policy.config.server.max_body_bytes;

    let trusted_proxies = &policy.config.server.trusted_proxies;
    let peer_trusted = trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
    let client = if peer_trusted {
        headers::client_ip(&head.headers, peer.ip(), trusted_proxies)
    } else {
        peer.ip()
    };
    if policy.config.tokens.enabled
        && head.method == http::Method::POST
        && crate::path::canonicalize(head.uri.path())
            .is_ok_and(|p| tokens::is_token_request(&head, &p, &policy))
    {
        // Boxed: the deprecated flow writes to the store, and its future (~4.7 KB)
        // would otherwise sit inline in every request's.
        return Ok(Box::pin(token_exchange(
            gate,
            &policy,
            &head,
            client,
            &request_id,
            started,
        ))
        .await);
    }
    let admission = match pipeline::admit(&head, &policy, &gate.auth, client).await {
        Ok(a) => a,
        Err(rejection) => {
            let refusal = rejection.refusal;
            if let Refusal::TooManyRequests { .. } = refusal {
                gate.metrics.auth_throttled.inc();
            }
            let resp = refusal.response(&request_id, policy.config.compat.campaign_statuses);
            finish(
                gate,
                head.method.as_str(),
                &request_id,
                None,
                rejection.principal.as_ref(),
                outcome_of(refusal),
                resp.status().as_u16(),
                started.elapsed(),
            );
            return Ok(resp);
        }
    };
    let api = admission.api;
    let principal = admission.principal;
    let path_and_query = match admission.path {
        std::borrow::Cow::Borrowed(_) => head.uri.path_and_query().cloned(),
        std::borrow::Cow::Owned(p) => {
            let pq = match head.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            PathAndQuery::try_from(pq).ok()
        }
    };
    let api_name = policy.routes.api_name(api);
    let method = head.method.clone();

    // The response head's time ends the request's latency too: one clock read for both.
    let (result, ended) = match path_and_query.map(|pq| worker.forwarder.upstream_uri(pq)) {
        Some(uri) => {
            let mut head = head;
            let client_authority = head.uri.authority().cloned();
            let h = &mut head.headers;
            headers::strip_for_upstream(
                h,
                &policy.identity.prefix,
                !policy.config.upstream.forward_authorization,
                !peer_trusted,
            );
            if let Some(host) = &policy.config.upstream.host {
                if let Ok(v) = HeaderValue::from_str(host) {
                    h.insert(HOST, v);
                }
            } else if !h.contains_key(HOST) {
                let host = client_authority
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    .unwrap_or_else(|| worker.forwarder.default_host());
                h.insert(HOST, host);
            }
            // The gateway's own headers are not inserted into the map (each insert
            // hashes, and the map would grow twice) but written after it by the
            // forwarder; what the client sent under their names went above. For a
            // trusted proxy, `X-Forwarded-*` are appended to in the map.
            if peer_trusted {
                headers::append_forwarded(h, &peer_header, proto);
            }
            head.uri = uri;
            let head = head;
            // Borrowed from the head that is sent, not cloned.
            let host = head.headers.get(HOST).filter(|_| !peer_trusted);
            let proto = if proto == "https" { &HTTPS } else { &HTTP };
            let key_id = principal.key_id_header();
            let identity = &policy.identity;
            let own = [
                (&X_REQUEST_ID, &request_id),
                (&identity.user_id, &principal.user.user_id_header),
                (&identity.tenant, &principal.user.tenant_header),
                (&identity.api, policy.api_header(api)),
                (&identity.key_id, &key_id),
            ];
            let forwarded = [
                (&headers::X_FORWARDED_FOR, &peer_header),
                (&headers::X_FORWARDED_PROTO, proto),
                // Left out below when there is no host (never: it was set above).
                (&headers::X_FORWARDED_HOST, host.unwrap_or(proto)),
            ];
            let forwarded = match (peer_trusted, host) {
                (true, _) => &forwarded[..0],
                (false, Some(_)) => &forwarded[..],
                (false, None) => &forwarded[..2],
            };
            let body = LimitedBody::new(body, max_body, policy.config.server.body_read_timeout);
            let sent = Instant::now();
            let r = worker
                .forwarder
                .send(&head, body, [&own, forwarded], sent)
                .await;
            let answered = Instant::now();
            gate.metrics.upstream_seconds.observe(answered - sent);
            (r, answered)
        }
        None => (Err(Refusal::Internal), Instant::now()),
    };

    let (resp, outcome) = match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            // Hop-by-hop fields are gone already (`Forwarder::send`).
            parts.headers.insert(X_REQUEST_ID, request_id.clone());
            (Response::from_parts(parts, GateBody::Upstream(body)), 0)
        }
        Err(refusal) => (
            refusal.response(&request_id, policy.config.compat.campaign_statuses),
            outcome_of(refusal),
        ),
    };
    finish(
        gate,
        method.as_str(),
        &request_id,
        Some(api_name),
        Some(&principal),
        outcome,
        resp.status().as_u16(),
        ended - started,
    );
    Ok(resp)
}

/// The deprecated token flow, with its own response headers and counter.
async fn token_exchange(
    gate: &Gate,
    policy: &Policy,
    head: &http::request::Parts,
    client: std::net::IpAddr,
    request_id: &HeaderValue,
    started: Instant,
) -> Response<GateBody> {
    gate.metrics.token_exchanges.inc();
    let outcome = match pipeline::framing(head, &policy.config.server) {
        Err(r) => Err(r),
        Ok(()) => tokens::exchange(head, policy, &gate.auth, client, request_id).await,
    };
    let (mut resp, outcome_index) = match outcome {
        Ok(resp) => (resp, 0),
        Err(refusal) => (
            refusal.response(request_id, policy.config.compat.campaign_statuses),
            outcome_of(refusal),
        ),
    };
    tokens::mark_deprecated(&mut resp, policy);
    let status = resp.status().as_u16();
    finish(
        gate,
        head.method.as_str(),
        request_id,
        Some("(token)"),
        None,
        outcome_index,
        status,
        started.elapsed(),
    );
    resp
}

/// Ends every request the same way: one log line (never a token), the outcome counter
/// and the latency histogram.
#[allow(clippy::too_many_arguments)]
fn finish(
    gate: &Gate,
    method: &str,
    request_id: &HeaderValue,
    api: Option<&str>,
    principal: Option<&crate::auth::Principal>,
    outcome: usize,
    status: u16,
    elapsed: Duration,
) {
    if tracing::enabled!(tracing::Level::INFO) {
        tracing::info!(
            request_id = request_id.to_str().unwrap_or(""),
            method,
            api = api.unwrap_or("-"),
            user = principal.map_or("-", |p| p.user_id()),
            key_id = principal.map_or("-", |p| p.key_id()),
            status,
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    }
    gate.metrics.request(outcome, status);
    gate.metrics.request_seconds.observe(elapsed);
}

/// Index into [`crate::telemetry::OUTCOMES`].
fn outcome_of(r: Refusal) -> usize {
    match r {
        Refusal::MissingCredentials
        | Refusal::InvalidToken
        | Refusal::ApiAccessDenied
        | Refusal::ApiNotGranted
        | Refusal::TooManyRequests { .. } => 2,
        Refusal::AuthUnavailable { .. } => 3,
        Refusal::UpstreamUnavailable | Refusal::UpstreamTimeout => 4,
        Refusal::Internal => 5,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_ret<R>(_: &impl FnOnce() -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A request's future is moved into place by hyper on every request, so its size is
    /// a per-request cost: the rare, large sub-futures (the store lookup of a miss, a new
    /// upstream connection, the access-token exchange) are boxed to keep it small. With
    /// them inline the handler's future was 5.6 KB and cost ~11,000 instructions of
    /// copying per request (callgrind, BENCHMARKS.md).
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn the_request_future_stays_small() {
        let handle = || handle(todo!(), todo!(), todo!(), "", todo!(), None);
        let admit = || pipeline::admit(todo!(), todo!(), todo!(), todo!());
        let (handle, admit) = (size_of_ret(&handle), size_of_ret(&admit));
        assert!(handle <= 3 * 1024, "handle's future: {handle} bytes");
        assert!(admit <= 1024, "admit's future: {admit} bytes");
    }
}
