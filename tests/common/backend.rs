//! `RecordingBackend`: a real HTTP/1.1 server on `127.0.0.1:0` standing in for the
//! service behind the gateway. It records every request exactly as it arrived, so tests
//! assert on what the gateway forwarded, and counts accepted TCP connections, so tests
//! can show that a refused request never reached it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::body::ChunkedBody;
use super::wait::{TimedOut, wait_until};

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// The request target as it was on the request line (escapes untouched).
    pub target: String,
    pub version: Version,
    /// Every header line in arrival order of names, duplicates kept, names lower-cased
    /// (hyper does not keep the case).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole body, or why reading it failed (e.g. the gateway aborted the upload).
    pub body: Result<Bytes, String>,
}

impl RecordedRequest {
    /// Every value of header `name` (case-insensitive), as UTF-8 (lossy).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The only value of header `name`; panics when it was sent more than once.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut all = self.header_all(name);
        assert!(
            all.len() <= 1,
            "backend received header {name} {} times: {all:?}",
            all.len()
        );
        all.pop()
    }

    pub fn has_header(&self, name: &str) -> bool {
        !self.header_all(name).is_empty()
    }

    /// The body; panics if the body did not arrive whole.
    pub fn body(&self) -> &Bytes {
        match &self.body {
            Ok(b) => b,
            Err(e) => panic!("backend did not receive a whole body: {e}"),
        }
    }
}

/// What the backend answers to every request.
#[derive(Debug, Clone)]
struct Behaviour {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ResponseBody,
    delay: Duration,
}

#[derive(Debug, Clone)]
enum ResponseBody {
    /// Sent with `Content-Length`.
    Full(Bytes),
    /// Streamed in frames of `chunk` bytes without a length.
    Streamed { data: Bytes, chunk: usize },
}

/// Builder for [`RecordingBackend`]. Defaults: `200`, body `backend ok`, no delay.
#[derive(Debug, Clone)]
pub struct RecordingBackendBuilder {
    behaviour: Behaviour,
}

impl RecordingBackendBuilder {
    pub fn status(mut self, status: u16) -> Self {
        self.behaviour.status = StatusCode::from_u16(status).expect("valid status code");
        self
    }

    /// Adds a response header (repeatable: the same name twice sends two lines).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.behaviour.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(value).expect("valid header value"),
        ));
        self
    }

    /// A fixed body, sent with `Content-Length`.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.behaviour.body = ResponseBody::Full(body.into());
        self
    }

    /// A body streamed in frames of `chunk` bytes with no `Content-Length`.
    pub fn streamed_body(mut self, data: Bytes, chunk: usize) -> Self {
        self.behaviour.body = ResponseBody::Streamed { data, chunk };
        self
    }

    /// Waits this long after reading a request before answering it.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.behaviour.delay = delay;
        self
    }

    /// Binds `127.0.0.1:0` and starts serving on the current runtime.
    pub async fn start(self) -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend listener");
        let addr = listener.local_addr().expect("backend local addr");
        let record = Arc::new(Record::default());
        let behaviour = Arc::new(self.behaviour);
        let accept = tokio::spawn(accept_loop(listener, record.clone(), behaviour));
        RecordingBackend {
            addr,
            record,
            accept,
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    connections: AtomicUsize,
    heads: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
}

impl Record {
    fn requests(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panic while holding the lock can only come from a failing test; the data
        // is still what was recorded.
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running fake backend. Stops accepting when dropped.
#[derive(Debug)]
pub struct RecordingBackend {
    pub addr: SocketAddr,
    record: Arc<Record>,
    accept: JoinHandle<()>,
}

impl RecordingBackend {
    pub fn builder() -> RecordingBackendBuilder {
        RecordingBackendBuilder {
            behaviour: Behaviour {
                status: StatusCode::OK,
                headers: Vec::new(),
                body: ResponseBody::Full(Bytes::from_static(b"backend ok")),
                delay: Duration::ZERO,
            },
        }
    }

    /// A backend with the default behaviour.
    pub async fn start() -> RecordingBackend {
        RecordingBackend::builder().start().await
    }

    /// `http://127.0.0.1:PORT`, for `[upstream] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.record.connections.load(Ordering::SeqCst)
    }

    /// Requests whose head arrived so far, including ones whose body never completed.
    pub fn heads_received(&self) -> usize {
        self.record.heads.load(Ordering::SeqCst)
    }

    /// Requests whose body was read to its end or failed, in completion order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.record.requests().clone()
    }

    /// The only request received; panics if there were none or several.
    pub fn single_request(&self) -> RecordedRequest {
        let requests = self.requests();
        assert_eq!(
            requests.len(),
            1,
            "expected exactly one request at the backend, got {requests:#?}"
        );
        requests.into_iter().next().expect("one request")
    }

    /// Waits until at least `n` requests were recorded (body finished or failed).
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Result<(), TimedOut> {
        wait_until(within, || async { self.record.requests().len() >= n })
            .await
            .map(|_| ())
    }

    /// Panics unless nothing at all reached the backend: no connection, no request.
    #[track_caller]
    pub fn assert_untouched(&self, context: &str) {
        assert_eq!(
            (self.connections(), self.heads_received()),
            (0, 0),
            "{context}: the backend was reached (connections, request heads); requests: {:#?}",
            self.requests()
        );
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, record: Arc<Record>, behaviour: Arc<Behaviour>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            // E.g. EMFILE under a parallel test run: keep serving the next one.
            Err(_) => continue,
        };
        record.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve_connection(stream, record.clone(), behaviour.clone()));
    }
}

async fn serve_connection(stream: TcpStream, record: Arc<Record>, behaviour: Arc<Behaviour>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let record = record.clone();
        let behaviour = behaviour.clone();
        async move { Ok::<_, Infallible>(answer(req, &record, &behaviour).await) }
    });
    // Connection errors (the gateway hanging up, an aborted upload) are part of what
    // some tests provoke; what matters was recorded already.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn answer(
    req: Request<Incoming>,
    record: &Record,
    behaviour: &Behaviour,
) -> Response<BoxBody<Bytes, Infallible>> {
    record.heads.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    record.requests().push(RecordedRequest {
        method: parts.method,
        // Display keeps the form: origin-form stays a path, absolute-form keeps the host.
        target: parts.uri.to_string(),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body,
    });

    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }

    let body = match &behaviour.body {
        ResponseBody::Full(b) => Full::new(b.clone()).boxed(),
        ResponseBody::Streamed { data, chunk } => ChunkedBody::split(data, *chunk).boxed(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = behaviour.status;
    for (name, value) in &behaviour.headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response
}
