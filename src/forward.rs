//! The forwarder: each worker's pool of HTTP/1.1 connections to the backend, the
//! request and response bodies that stream through the gateway, and the mapping of
//! backend failures to refusals.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::errors::Refusal;

/// Every response body the gateway sends: its own (refusals, admin) or the backend's,
/// streamed. An enum instead of a boxed body: no allocation per response.
pub enum GateBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl GateBody {
    pub fn full(bytes: Bytes) -> GateBody {
        GateBody::Full(Some(bytes))
    }

    pub fn empty() -> GateBody {
        GateBody::Full(None)
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            GateBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            GateBody::Upstream(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GateBody::Full(b) => b.is_none(),
            GateBody::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GateBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            GateBody::Upstream(inner) => inner.size_hint(),
        }
    }
}

/// Why the client's request body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the limit")]
    TooLarge,
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
    #[error("the client sent no body data within the body read timeout")]
    Timeout,
}

/// The client's request body on its way to the backend, cut off with an error as soon
/// as it exceeds the limit (whether or not a `Content-Length` announced it), or when the
/// client sends nothing for `idle` while the backend waits for more.
pub struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    idle: Duration,
    /// Armed when the body first has to wait, re-armed on every frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl LimitedBody {
    pub fn new(inner: Incoming, limit: u64, idle: Duration) -> LimitedBody {
        LimitedBody {
            inner,
            remaining: limit,
            idle,
            timer: None,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = this.timer.as_mut() {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    t.as_mut().reset(deadline);
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(RequestBodyError::Timeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The backend's response body on its way to the client. Holds the connection it came
/// on, which goes back to the pool when the body is dropped (finished or abandoned).
pub struct UpstreamBody {
    body: Incoming,
    _conn: Checkin,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

type Sender = SendRequest<LimitedBody>;

/// The upstream client of one worker: HTTP/1.1 connections to the one backend this
/// gateway fronts, kept idle between requests (most recently used first).
///
/// Each worker has its own, so in the per-core layout only the worker's thread touches
/// it; the lock is held for a push or a pop, never across an `.await`.
pub struct Forwarder {
    pool: Arc<Pool>,
    host: HeaderValue,
    response_timeout: Duration,
}

struct Pool {
    /// Host name (brackets of an IPv6 literal removed) and port to connect to.
    host: String,
    port: u16,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    handshake: http1::Builder,
    idle: Mutex<Vec<Idle>>,
    reaper_started: AtomicBool,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Forwarder {
    /// `response_timeout` bounds the wait for the backend's response head, connecting
    /// included.
    pub fn new(cfg: &UpstreamConfig, response_timeout: Duration) -> Forwarder {
        let host = cfg.url.host().unwrap_or("127.0.0.1");
        let port = cfg.url.port_u16().unwrap_or(80);
        // What a client library sends for this URL: the port only when it is not 80.
        let host_header = match cfg.url.port_u16() {
            Some(p) if p != 80 => HeaderValue::from_str(&format!("{host}:{p}")),
            _ => HeaderValue::from_str(host),
        }
        .unwrap_or(HeaderValue::from_static("127.0.0.1"));
        Forwarder {
            pool: Arc::new(Pool {
                host: host.trim_matches(|c| c == '[' || c == ']').to_owned(),
                port,
                connect_timeout: cfg.connect_timeout,
                max_idle: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout,
                handshake: {
                    // Flattened writes, as on the listener side (server::connection_builder).
                    let mut b = http1::Builder::new();
                    b.writev(false);
                    b
                },
                idle: Mutex::new(Vec::new()),
                reaper_started: AtomicBool::new(false),
            }),
            host: host_header,
            response_timeout,
        }
    }

    /// The upstream URI for a request: the canonical path and the untouched query, in
    /// origin form (the connection already names the backend).
    pub fn upstream_uri(&self, path_and_query: PathAndQuery) -> Uri {
        Uri::from(path_and_query)
    }

    /// The `Host` for a request that arrived without one: the backend's authority.
    pub fn default_host(&self) -> HeaderValue {
        self.host.clone()
    }

    /// Sends the request and waits for the response head. The body streams afterwards.
    /// The request must carry a `Host` header.
    pub async fn send(
        &self,
        mut req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, Refusal> {
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.response_timeout, self.pool.send(req)).await {
            Err(_) => Err(Refusal::UpstreamTimeout),
            Ok(r) => r,
        }
    }
}

impl Pool {
    async fn send(
        self: &Arc<Self>,
        mut req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, Refusal> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(s) => (s, true),
                // Boxed: connecting is rare (the pool), and its future would otherwise
                // sit inline in every request's.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let conn = Checkin {
                        sender: Some(sender),
                        pool: self.clone(),
                    };
                    return Ok(Response::from_parts(
                        parts,
                        UpstreamBody { body, _conn: conn },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte of it was written: an idle connection the backend had
                    // just closed. Another connection may take it.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        tracing::debug!(error = %e.error(), "upstream request failed");
                        return Err(classify(e.error()));
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(i) = idle.pop() {
            if i.sender.is_ready() {
                return Some(i.sender);
            }
            // Closed by the backend (or broken) while idle.
        }
        None
    }

    /// Keeps a connection that is ready for its next request, unless the pool is full.
    fn put(self: &Arc<Self>, sender: Sender) {
        if self.max_idle == 0 {
            return;
        }
        let since = Instant::now();
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= self.max_idle {
                return;
            }
            idle.push(Idle { sender, since });
        }
        if !self.reaper_started.load(Ordering::Relaxed)
            && !self.reaper_started.swap(true, Ordering::Relaxed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// Drops the connections idle for `idle_timeout` or more, and those closed.
    fn evict(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|i| now.duration_since(i.since) < self.idle_timeout && !i.sender.is_closed());
    }

    /// A new connection: resolve, connect with `TCP_NODELAY` within the connect timeout
    /// (split evenly over the addresses, tried in order), HTTP/1.1 handshake.
    async fn connect(&self) -> Result<Sender, Refusal> {
        let stream = self.tcp().await.map_err(|e| {
            tracing::debug!(error = %e, host = %self.host, port = self.port, "upstream connect failed");
            classify(&e)
        })?;
        let (sender, conn) = self
            .handshake
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection error");
            }
        });
        Ok(sender)
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        let per_address =
            self.connect_timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no addresses", self.host),
        );
        for addr in addrs {
            match tokio::time::timeout(per_address, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    )
                }
            }
        }
        Err(last)
    }
}

/// Closes idle connections past the idle timeout: checks every eighth of it, so a
/// connection goes after between 1 and 1.125 times the timeout. Ends with the pool.
async fn reap(pool: std::sync::Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 8).max(Duration::from_millis(90));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.evict();
    }
}

/// A connection in use by one exchange. When the response body is done with, the
/// connection goes back to the pool once it is ready for another request: at once in
/// the usual case, else from a task that waits for the rest of the exchange (the
/// request body still streaming, say). One that closes meanwhile is dropped.
struct Checkin {
    sender: Option<Sender>,
    pool: Arc<Pool>,
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_ready() {
            self.pool.put(sender);
        } else if !sender.is_closed()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let pool = self.pool.clone();
            rt.spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender);
                }
            });
        }
    }
}

/// Maps an upstream failure to where it came from: the client's request body, a
/// timeout, or the backend.
fn classify(e: &(dyn StdError + 'static)) -> Refusal {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    let mut timed_out = false;
    while let Some(s) = source {
        match s.downcast_ref::<RequestBodyError>() {
            Some(RequestBodyError::TooLarge) => return Refusal::PayloadTooLarge,
            Some(RequestBodyError::Client(_)) => return Refusal::BadRequest,
            Some(RequestBodyError::Timeout) => return Refusal::RequestTimeout,
            None => {}
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            timed_out = true;
        }
        source = s.source();
    }
    if timed_out {
        Refusal::UpstreamTimeout
    } else {
        Refusal::UpstreamUnavailable
    }
}
