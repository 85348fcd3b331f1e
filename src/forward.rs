//! The forwarder: the pooled upstream client, the request and response bodies that
//! stream through the gateway, and the mapping of backend failures to refusals.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::errors::Refusal;

/// Every response body the gateway sends: its own (refusals, admin) or the backend's,
/// streamed. An enum instead of a boxed body: no allocation per response.
pub enum GateBody {
    Full(Option<Bytes>),
    Upstream(Incoming),
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

/// The pooled client to the one backend this gateway fronts.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, LimitedBody>,
    authority: Authority,
    response_timeout: Duration,
}

impl Forwarder {
    /// `response_timeout` bounds the wait for the backend's response head.
    pub fn new(cfg: &UpstreamConfig, response_timeout: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1:80"));
        Forwarder {
            client,
            authority,
            response_timeout,
        }
    }

    /// The upstream URI for a request: the backend's authority with the canonical path
    /// and the untouched query.
    pub fn upstream_uri(&self, path_and_query: PathAndQuery) -> Result<Uri, Refusal> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| Refusal::Internal)
    }

    /// Sends the request and waits for the response head. The body streams afterwards.
    pub async fn send(&self, mut req: Request<LimitedBody>) -> Result<Response<Incoming>, Refusal> {
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(Refusal::UpstreamTimeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

/// Maps a client error to where the failure came from.
fn classify(e: &hyper_util::client::legacy::Error) -> Refusal {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
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
