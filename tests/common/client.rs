//! Clients for talking to the gateway: [`Req`], a well-formed HTTP/1.1 request over its
//! own connection (hyper's client connection, so the target, header order and duplicates
//! are exactly what the test wrote), and [`raw`], bytes over a bare `TcpStream` for what
//! a well-behaved client would never send.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use super::body::ChunkedBody;

/// Bound on any single exchange, so that a hung gateway fails the test instead of
/// hanging the suite.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);

/// One request to send on a fresh connection.
#[derive(Debug)]
pub struct Req {
    method: Method,
    target: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ReqBody,
}

#[derive(Debug)]
enum ReqBody {
    Empty,
    /// Sent with `Content-Length`.
    Full(Bytes),
    /// Sent chunked, frame by frame.
    Chunked(ChunkedBody),
}

impl Req {
    /// `target` is sent as written: escapes, odd queries and all.
    pub fn new(method: &str, target: &str) -> Req {
        Req {
            method: Method::from_bytes(method.as_bytes()).expect("valid method token"),
            target: target.to_string(),
            headers: Vec::new(),
            body: ReqBody::Empty,
        }
    }

    pub fn get(target: &str) -> Req {
        Req::new("GET", target)
    }

    pub fn post(target: &str) -> Req {
        Req::new("POST", target)
    }

    /// Appends a header line; the same name twice sends two lines.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_bytes(value.as_ref()).expect("valid header value"),
        ));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Req {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// A body sent with `Content-Length`.
    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = ReqBody::Full(body.into());
        self
    }

    /// A body streamed with chunked encoding in frames of `chunk` bytes, no length.
    pub fn chunked(mut self, data: &Bytes, chunk: usize) -> Req {
        self.body = ReqBody::Chunked(ChunkedBody::split(data, chunk));
        self
    }

    /// Sends the request and reads the whole response; panics on a transport error.
    pub async fn send(self, addr: SocketAddr) -> Resp {
        let what = format!("{} {}", self.method, self.target);
        match self.try_send(addr).await {
            Ok(r) => r,
            Err(e) => panic!("{what} to {addr}: {e}"),
        }
    }

    /// Sends the request and reads the whole response.
    pub async fn try_send(self, addr: SocketAddr) -> Result<Resp, String> {
        timeout(EXCHANGE_TIMEOUT, self.exchange(addr))
            .await
            .map_err(|_| format!("no complete response within {EXCHANGE_TIMEOUT:?}"))?
    }

    async fn exchange(self, addr: SocketAddr) -> Result<Resp, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);

        let body: BoxBody<Bytes, std::convert::Infallible> = match self.body {
            ReqBody::Empty => Empty::new().boxed(),
            ReqBody::Full(b) => Full::new(b).boxed(),
            ReqBody::Chunked(c) => c.boxed(),
        };
        let mut request = Request::builder()
            .method(self.method)
            .uri(self.target.as_str())
            .body(body)
            .map_err(|e| format!("building request for {:?}: {e}", self.target))?;
        let has_host = self.headers.iter().any(|(n, _)| n == http::header::HOST);
        let headers = request.headers_mut();
        if !has_host {
            headers.insert(
                http::header::HOST,
                HeaderValue::from_str(&addr.to_string()).expect("address is a valid host"),
            );
        }
        for (name, value) in self.headers {
            headers.append(name, value);
        }

        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The only value of `name` as a string; panics if sent twice or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        assert!(
            values.next().is_none(),
            "response header {name} appears more than once: {:?}",
            self.headers
        );
        Some(first.to_str().expect("header value is visible ASCII"))
    }

    /// The body parsed as JSON, or `None` when it is not JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body as text (lossy), for assertion messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What came back on a raw connection.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Every byte received, possibly several responses or none.
    pub bytes: Vec<u8>,
    /// Whether the gateway closed the connection (EOF or reset) before we stopped.
    pub closed: bool,
}

impl RawReply {
    /// The first response in the bytes; panics if there is no complete one.
    pub fn response(&self) -> Resp {
        match parse_response(&self.bytes, self.closed) {
            Some((resp, _)) => resp,
            None => panic!(
                "no complete HTTP response in {:?} (closed: {})",
                String::from_utf8_lossy(&self.bytes),
                self.closed
            ),
        }
    }
}

/// How long [`raw`] keeps reading after a complete response, to see whether the
/// gateway closes the connection. Only affects `closed`, never the response.
const CLOSE_LINGER: Duration = Duration::from_millis(300);

/// Writes `request` as is and reads until the gateway closes the connection, or until
/// a complete response has arrived and the connection then stayed quiet for a moment,
/// or until [`EXCHANGE_TIMEOUT`] has passed.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect to gateway");
    let _ = stream.set_nodelay(true);
    let mut bytes = Vec::new();
    if let Err(e) = stream.write_all(request).await {
        // The gateway may answer and close before it read everything; what it sent
        // is still worth reading.
        eprintln!("raw: write interrupted: {e}");
    }
    let hard_deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut deadline = hard_deadline;
    let mut buf = vec![0u8; 64 * 1024];
    let closed = loop {
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => {
                bytes.extend_from_slice(&buf[..n]);
                if parse_response(&bytes, false).is_some() {
                    deadline = (Instant::now() + CLOSE_LINGER).min(hard_deadline);
                }
            }
            Ok(Err(_reset)) => break true,
        }
    };
    RawReply { bytes, closed }
}

/// Parses one HTTP/1.x response from the start of `bytes`: returns it and the number of
/// bytes it used, or `None` while incomplete. A body delimited by the end of the
/// connection is complete only when `closed`. Not for responses to `HEAD`.
pub fn parse_response(bytes: &[u8], closed: bool) -> Option<(Resp, usize)> {
    let head_end = find(bytes, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..head_end - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut words = status_line.splitn(3, ' ');
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = StatusCode::from_bytes(words.next()?.as_bytes()).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    let rest = &bytes[head_end..];
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (body, used) = if no_body {
        (Vec::new(), 0)
    } else if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = length {
        (rest.get(..n)?.to_vec(), n)
    } else if closed {
        (rest.to_vec(), rest.len())
    } else {
        return None;
    };
    Some((
        Resp {
            status,
            headers,
            body: Bytes::from(body),
        },
        head_end + used,
    ))
}

fn decode_chunked(mut data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = data.len();
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            let end = if data.starts_with(b"\r\n") {
                2
            } else {
                find(data, b"\r\n\r\n")? + 4
            };
            data = &data[end..];
            return Some((body, total - data.len()));
        }
        body.extend_from_slice(data.get(..size)?);
        if data.get(size..size + 2)? != b"\r\n" {
            return None;
        }
        data = &data[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
