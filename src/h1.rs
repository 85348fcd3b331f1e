//! The gateway's own HTTP/1.1 server loop, for the requests that make up nearly all of
//! an API's traffic: origin-form, HTTP/1.1, no `Expect`, no upgrade, and no body or a
//! body of one plain `Content-Length` that is already here when its head is (a small
//! JSON `POST` is: a client writes it with its head). Each is parsed once into a
//! request, handed to the handler, and its response written with one write. Where only
//! the end of the read buffer cut a body, the rest is read on if it is there already;
//! a read gets at least `MIN_READ` bytes of room. The first request that is anything
//! else (a body still on its way, larger than `MAX_WHOLE` with its head, or chunked,
//! is streamed by hyper; this loop never waits for one, since no body timeout runs
//! here), and a connection that opens with the HTTP/2 preface, is handed over with the
//! bytes read so far to hyper, which serves the rest of the connection as before.
//!
//! Why: 6 % fewer instructions per proxied request natively, about 5 % less CPU per
//! request and a lower p99 under load (BENCHMARKS.md, "The gateway's own HTTP/1
//! loop"): hyper's connection around the handler cost 9.3k instructions, this loop
//! 8.8k, and the rest came from moves of the handler's state that hyper's call pattern
//! made. What hyper does besides for such requests is kept here, byte for byte (a
//! differential test below): `Date`, `Content-Length` or chunked framing of the
//! response, no body for `HEAD`, 204 and 304, `Connection: close` honoured both ways.
//! A connection stays in the loop until it ends or is handed over, never back.
//!
//! It reads through the framing guard ([`crate::connection::GuardedIo`]) like hyper:
//! a head the guard refused arrives as [`crate::framing::STAND_IN`], a plain
//! `GET` with `Connection: close`, and is answered here.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, HeaderName, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::forward::RequestBody;

/// How a connection's stay in the loop ended.
pub enum Ended<IO> {
    /// The connection is done (closed by either side, or asked to close).
    Closed,
    /// Hyper is to serve the rest: the stream, and what was read from it but not
    /// served (starting with the head of the request this loop does not take).
    Handover(IO, Bytes),
}

/// Most fields of a head this loop serves; a head with more (where `[server]
/// max_headers` allows them) goes to hyper.
const MAX_HEADERS: usize = 128;

/// A connection's read and write buffers, at first.
const BUF: usize = 8 * 1024;

/// Least room a read gets: with less left at the end of the read buffer, it is
/// renewed first (the room of heads already served is taken back when nothing holds
/// them), so that a request a client wrote at once is read at once, not cut where the
/// buffer happens to end.
const MIN_READ: usize = 4 * 1024;

/// Largest request (head and body) whose body the loop reads on when only the end of
/// its buffer cut it; larger bodies, or ones not yet sent, go to hyper, which streams
/// them.
const MAX_WHOLE: usize = 64 * 1024;

/// Flushed once this much response is buffered, whatever the body still has ready.
const FLUSH_AT: usize = 64 * 1024;

/// Serves requests on `io` until the connection ends or one is for hyper. `closing`:
/// finish the request in flight, if any, and close (graceful shutdown, idle timeout).
pub async fn serve<IO, S, F, B>(
    mut io: IO,
    closing: Arc<AtomicBool>,
    mut svc: S,
) -> io::Result<Ended<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::with_capacity(BUF);
    let mut at: Vec<[usize; 4]> = Vec::new();
    let mut out = BytesMut::with_capacity(BUF);
    // The last response's field map, emptied: the next request's fields go into it
    // (as hyper does), instead of a new map per request.
    let mut spare = HeaderMap::new();
    loop {
        let mut head = loop {
            if !buf.is_empty() {
                match take_head(&mut buf, &mut at) {
                    Take::Head(h) => break h,
                    Take::Partial => {}
                    Take::Body { whole } if whole <= MAX_WHOLE => {
                        // The head is here and its body only in part: the rest may be
                        // waiting behind the end of the buffer. It is read only if
                        // it is already there, never waited for (no body timeout runs
                        // here).
                        buf.reserve(whole - buf.len());
                        if read_ready(&mut io, &mut buf).await? == 0 {
                            return Ok(Ended::Handover(io, buf.freeze()));
                        }
                        continue;
                    }
                    Take::Body { .. } | Take::Hyper => {
                        return Ok(Ended::Handover(io, buf.freeze()));
                    }
                }
            }
            if buf.capacity() - buf.len() < MIN_READ {
                buf.reserve(BUF);
            }
            let read = poll_fn(|cx| {
                if closing.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(0));
                }
                tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf)
            })
            .await?;
            if read == 0 {
                return Ok(Ended::Closed);
            }
        };
        let Some((req, close_asked)) = head.request(&at, std::mem::take(&mut spare)) else {
            // Bytes the guard let through but `http` does not take: hyper answers them,
            // as it did before this loop.
            return Ok(Ended::Handover(io, head.rejoin(buf)));
        };
        let method_head = req.method() == Method::HEAD;
        // Pinned where it is made: `.await` on the future itself would move it (its
        // size is the handler's, some KB) twice more.
        let Ok(resp) = std::pin::pin!(svc(req)).await;
        let keep_alive = !close_asked && !closing.load(Ordering::Relaxed);
        let keep_alive =
            write_response(&mut io, &mut out, resp, method_head, keep_alive, &mut spare).await?;
        if !keep_alive {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

/// A complete head, split off the read buffer, with its fields located in `at`, and
/// its whole body if it has one.
struct Head {
    bytes: Bytes,
    method: (usize, usize),
    target: (usize, usize),
    body: Option<Bytes>,
}

enum Take {
    Head(Head),
    /// The head is not all here yet.
    Partial,
    /// The head is here and its body not all: `whole` bytes, head and body.
    Body {
        whole: usize,
    },
    Hyper,
}

/// Reads what is there already, without waiting: the number of bytes, 0 when
/// nothing is (or at the end of input).
async fn read_ready<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(
        |cx| match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Pending => Poll::Ready(Ok(0)),
            ready => ready,
        },
    )
    .await
}

/// Parses the head at the front of `buf`: one this loop serves is split off it.
fn take_head(buf: &mut BytesMut, at: &mut Vec<[usize; 4]>) -> Take {
    if buf.starts_with(b"PRI ") || (buf.len() < 4 && b"PRI ".starts_with(buf)) {
        return if buf.len() < 4 {
            Take::Partial
        } else {
            Take::Hyper
        };
    }
    // Uninitialised, as the forwarder's: zeroing them cost more than a short head.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Take::Partial,
        Err(_) => return Take::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Take::Hyper;
    };
    if !target.starts_with('/') || method == "CONNECT" {
        return Take::Hyper;
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    at.clear();
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // One plain length (the guard's reading of it): the body is taken here if
            // it all came with the head.
            let n = crate::framing::digits(h.value).and_then(|n| usize::try_from(n).ok());
            if length.is_some() || n.is_none() {
                return Take::Hyper;
            }
            length = n;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            // A streamed body, an expectation or an upgrade: hyper's to serve.
            return Take::Hyper;
        }
        let (ns, ne) = span(name);
        let (vs, ve) = span(h.value);
        at.push([ns, ne, vs, ve]);
    }
    let body_len = length.unwrap_or(0);
    if buf.len() - len < body_len {
        return Take::Body {
            whole: len.saturating_add(body_len),
        };
    }
    let method = span(method.as_bytes());
    let target = span(target.as_bytes());
    let bytes = buf.split_to(len).freeze();
    let body = (body_len > 0).then(|| buf.split_to(body_len).freeze());
    Take::Head(Head {
        bytes,
        method,
        target,
        body,
    })
}

impl Head {
    /// The request, and whether its `Connection` asks to close after it; `None` for a
    /// head `http` refuses (hyper then answers it).
    fn request(
        &mut self,
        at: &[[usize; 4]],
        mut headers: HeaderMap,
    ) -> Option<(Request<RequestBody>, bool)> {
        let b = &self.bytes;
        let method = Method::from_bytes(&b[self.method.0..self.method.1]).ok()?;
        let pq = PathAndQuery::from_maybe_shared(b.slice(self.target.0..self.target.1)).ok()?;
        headers.reserve(at.len());
        let mut close = false;
        for &[ns, ne, vs, ve] in at {
            let name = HeaderName::from_bytes(&b[ns..ne]).ok()?;
            let value = HeaderValue::from_maybe_shared(b.slice(vs..ve)).ok()?;
            if name == CONNECTION {
                if lists(&value, b"upgrade") {
                    return None;
                }
                close |= lists(&value, b"close");
            }
            headers.append(name, value);
        }
        let body = http_body_util::Full::new(self.body.take().unwrap_or_default());
        let mut req = Request::new(RequestBody::Whole(body));
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from(pq);
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        Some((req, close))
    }

    /// The head and its body put back in front of what follows them.
    fn rejoin(self, rest: BytesMut) -> Bytes {
        let body = self.body.unwrap_or_default();
        let mut all = BytesMut::with_capacity(self.bytes.len() + body.len() + rest.len());
        all.extend_from_slice(&self.bytes);
        all.extend_from_slice(&body);
        all.extend_from_slice(&rest);
        all.freeze()
    }
}

/// How a response's body is framed on the wire (as hyper frames it).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    /// No body is sent (`HEAD`, 204, 304, or an empty body).
    None,
    /// As many bytes as its `Content-Length` says.
    Length,
    Chunked,
    /// Until the connection closes: a body of unknown length in an HTTP/1.0 response.
    Close,
}

/// Writes a response head into `out` the way hyper's HTTP/1 server does for such a
/// request (its `Server::encode`): the status line of the response's version, the
/// fields as they are (lower case), `Content-Length` kept or computed, chunked when
/// the length is unknown, `Date` when the handler set none, `Connection: close` when
/// the connection is closing. Returns how the body goes and whether the connection
/// stays open.
fn encode_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    body: (bool, Option<u64>),
    request_was_head: bool,
    mut keep_alive: bool,
) -> (Framing, bool) {
    let (empty, exact) = body;
    let status = parts.status;
    let code = status.as_u16();
    let http_10 = parts.version == Version::HTTP_10;
    let no_length = code == 204 || code == 304;
    let bodyless = request_was_head || no_length;
    if !http_10 && code == 200 {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if http_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        // A reason must be written: many parsers expect one (hyper writes the same).
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let (mut wrote_length, mut has_date, mut says_close) = (false, false, false);
    for (name, value) in &parts.headers {
        if *name == CONTENT_LENGTH {
            // The first value frames the body; an empty body's length is dropped but
            // for `HEAD` (where it tells the length of the body not sent).
            if wrote_length || (empty && !request_was_head) {
                continue;
            }
            wrote_length = true;
        } else if *name == TRANSFER_ENCODING {
            // Not produced by the handler (the forwarder drops it as hop-by-hop): the
            // framing below is this loop's own.
            continue;
        } else if *name == DATE {
            has_date = true;
        } else if *name == CONNECTION && lists(value, b"close") {
            says_close = true;
            keep_alive = false;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Where hyper puts it: added to the fields before they are written, so after them.
    if !keep_alive && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let mut framing = if wrote_length {
        Framing::Length
    } else if empty || exact == Some(0) {
        if !bodyless {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::None
    } else if let Some(n) = exact {
        if !no_length {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length
    } else if bodyless {
        Framing::None
    } else if http_10 {
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if bodyless {
        // A length was written (it tells a `HEAD` what a `GET` would get); no body.
        framing = Framing::None;
    }
    if framing == Framing::Close {
        keep_alive = false;
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::with(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// Writes `resp`, its head and as much of its body as is ready in one write, then the
/// rest as it comes; returns whether the connection stays open. The response's field
/// map, emptied, is left in `spare` for the next request.
async fn write_response<IO, B>(
    io: &mut IO,
    out: &mut BytesMut,
    resp: Response<B>,
    request_was_head: bool,
    keep_alive: bool,
    spare: &mut HeaderMap,
) -> io::Result<bool>
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (mut parts, mut body) = resp.into_parts();
    let hint = (body.is_end_stream(), body.size_hint().exact());
    out.clear();
    let (framing, keep_alive) = encode_head(out, &parts, hint, request_was_head, keep_alive);
    parts.headers.clear();
    *spare = parts.headers;

    enum Next<T> {
        Flush,
        Frame(T),
    }
    if framing != Framing::None {
        loop {
            let next = poll_fn(
                |cx: &mut Context<'_>| match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Pending if !out.is_empty() => Poll::Ready(Next::Flush),
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(f) => Poll::Ready(Next::Frame(f)),
                },
            )
            .await;
            match next {
                Next::Flush => {
                    io.write_all(out).await?;
                    out.clear();
                }
                Next::Frame(Some(Ok(frame))) => {
                    // Trailers are not sent on HTTP/1 (the backend's are not kept).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if framing == Framing::Chunked {
                        chunk_size_line(out, data.len());
                    }
                    if data.len() >= FLUSH_AT {
                        // Large: written from where it is, not copied.
                        io.write_all(out).await?;
                        out.clear();
                        io.write_all(&data).await?;
                    } else {
                        out.extend_from_slice(&data);
                    }
                    if framing == Framing::Chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    if out.len() >= FLUSH_AT {
                        io.write_all(out).await?;
                        out.clear();
                    }
                }
                Next::Frame(Some(Err(e))) => {
                    // The body broke off: the response cannot be completed, and the
                    // connection ends without its end (hyper the same).
                    tracing::debug!(error = %e, "response body ended early");
                    return Ok(false);
                }
                Next::Frame(None) => {
                    if framing == Framing::Chunked {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    break;
                }
            }
        }
    }
    io.write_all(out).await?;
    out.clear();
    if out.capacity() > 2 * FLUSH_AT {
        // Not kept for the connection's life after one large answer.
        *out = BytesMut::with_capacity(BUF);
    }
    io.flush().await?;
    Ok(keep_alive)
}

/// Whether a `Connection` value lists `token` (any case, blanks around it).
fn lists(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// `{size:X}\r\n`, a chunk's size line (upper case, as hyper writes it).
fn chunk_size_line(out: &mut BytesMut, size: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` field's value, made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    struct Cached {
        second: u64,
        text: [u8; 29],
    }

    thread_local! {
        static DATE: RefCell<Cached> = const { RefCell::new(Cached { second: u64::MAX, text: [0; 29] }) };
    }

    pub fn with(f: impl FnOnce(&[u8])) {
        DATE.with(|d| {
            let mut d = d.borrow_mut();
            let now = SystemTime::now();
            let second = now
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            if second != d.second {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    d.text.copy_from_slice(text.as_bytes());
                    d.second = second;
                }
            }
            f(&d.text);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use http::StatusCode;
    use http_body::{Frame, SizeHint};
    use tokio::io::AsyncReadExt;

    /// A response body: whole (`Some`, or `None` for none at all), or chunks of a
    /// length not known beforehand.
    #[derive(Clone)]
    enum TestBody {
        Whole(Option<Bytes>),
        Chunks(VecDeque<Bytes>),
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            let next = match self.get_mut() {
                TestBody::Whole(b) => b.take(),
                TestBody::Chunks(c) => c.pop_front(),
            };
            Poll::Ready(next.map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            match self {
                TestBody::Whole(b) => b.is_none(),
                TestBody::Chunks(c) => c.is_empty(),
            }
        }

        fn size_hint(&self) -> SizeHint {
            match self {
                TestBody::Whole(b) => {
                    SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
                }
                TestBody::Chunks(_) => SizeHint::default(),
            }
        }
    }

    /// A response: status, version, fields, body.
    #[derive(Clone)]
    struct Answer(
        u16,
        Version,
        &'static [(&'static str, &'static str)],
        TestBody,
    );

    impl Answer {
        fn response(&self) -> Response<TestBody> {
            let mut resp = Response::new(self.3.clone());
            *resp.status_mut() = StatusCode::from_u16(self.0).expect("status");
            *resp.version_mut() = self.1;
            for (n, v) in self.2 {
                resp.headers_mut().append(*n, HeaderValue::from_static(v));
            }
            resp
        }
    }

    fn whole(b: &'static str) -> TestBody {
        TestBody::Whole(Some(Bytes::from_static(b.as_bytes())))
    }

    fn chunks(cs: &[&'static str]) -> TestBody {
        TestBody::Chunks(
            cs.iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
        )
    }

    /// What one run of the loop did.
    struct Run {
        /// What the client got.
        out: String,
        /// `METHOD target` of each request the handler got.
        seen: Vec<String>,
        /// `None`: closed; `Some`: handed over with these bytes.
        handover: Option<Bytes>,
    }

    /// Runs the loop on `input` (then the client's end of input), answering the
    /// requests with `answers` in turn; `close_in_handler`: the connection is asked to
    /// close while the first request is handled.
    async fn run(input: &[u8], answers: &[Answer], close_in_handler: bool) -> Run {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let closing = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = answers.to_vec();
        let (flag, log) = (closing.clone(), seen.clone());
        let svc = move |req: Request<RequestBody>| {
            let mut log = log.lock().expect("log");
            log.push(format!("{} {}", req.method(), req.uri()));
            if close_in_handler {
                flag.store(true, Ordering::Relaxed);
            }
            let answer = answers[(log.len() - 1) % answers.len()].response();
            async move { Ok::<_, Infallible>(answer) }
        };
        let ended = serve(server, closing, svc).await.expect("served");
        let handover = match ended {
            Ended::Closed => None,
            Ended::Handover(io, read) => {
                drop(io);
                Some(read)
            }
        };
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        let seen = seen.lock().expect("log").clone();
        Run {
            out: String::from_utf8(out).expect("text"),
            seen,
            handover,
        }
    }

    /// The `date` field's value replaced, so that two answers compare.
    fn undated(text: &str) -> String {
        text.split("\r\n")
            .map(|l| {
                if l.starts_with("date: ") {
                    "date: -"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    const OK: &[(&str, &str)] = &[("content-type", "text/plain")];

    #[tokio::test]
    async fn requests_are_served_here_until_one_with_a_streamed_body_goes_to_hyper() {
        let post = "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
        let input = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n{post}"
        );
        let r = run(
            input.as_bytes(),
            &[Answer(200, Version::HTTP_11, OK, whole("hi"))],
            false,
        )
        .await;
        assert_eq!(r.seen, ["GET /a", "GET /b?q=1"]);
        assert_eq!(
            r.handover.as_deref(),
            Some(post.as_bytes()),
            "hyper gets the rest, whole"
        );
        let one =
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\ndate: -\r\n\r\nhi";
        assert_eq!(undated(&r.out), format!("{one}{one}"));
    }

    #[tokio::test]
    async fn heads_this_loop_does_not_serve_go_to_hyper_unread() {
        for head in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /a HTTP/1.0\r\n\r\n",
            "GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            "GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc",
            "POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            "POST /a HTTP/1.1\r\nContent-Length: 9999999999\r\n\r\nabc",
            "GET /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /a HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /a HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
        ] {
            let r = run(
                head.as_bytes(),
                &[Answer(200, Version::HTTP_11, OK, whole("hi"))],
                false,
            )
            .await;
            assert!(r.seen.is_empty(), "{head:?}: {:?}", r.seen);
            assert_eq!(r.handover.as_deref(), Some(head.as_bytes()), "{head:?}");
            assert_eq!(r.out, "", "{head:?}");
        }
    }

    /// A body that came whole with its head is served here, as the handler's request
    /// body, and the next head is found right after it.
    #[tokio::test]
    async fn a_body_that_came_with_its_head_is_served_here() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let input = "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        client.write_all(input.as_bytes()).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = move |req: Request<RequestBody>| {
            let log = log.clone();
            async move {
                let (head, body) = req.into_parts();
                let body = http_body_util::BodyExt::collect(body)
                    .await
                    .expect("body")
                    .to_bytes();
                let length = head
                    .headers
                    .get(CONTENT_LENGTH)
                    .map(|v| v.to_str().unwrap_or("?").to_string());
                log.lock()
                    .expect("log")
                    .push((head.uri.to_string(), length, body));
                Ok::<_, Infallible>(Answer(200, Version::HTTP_11, OK, whole("hi")).response())
            }
        };
        let ended = serve(server, Arc::new(AtomicBool::new(false)), svc)
            .await
            .expect("served");
        assert!(matches!(ended, Ended::Closed));
        let seen = seen.lock().expect("log").clone();
        assert_eq!(
            seen,
            [
                (
                    "/a".to_string(),
                    Some("5".to_string()),
                    Bytes::from_static(b"hello")
                ),
                ("/b".to_string(), Some("0".to_string()), Bytes::new()),
                ("/c".to_string(), None, Bytes::new()),
            ]
        );
    }

    /// Requests a client wrote at once are served here even where the end of the read
    /// buffer cuts one inside its body: the rest of it is read on, since it is there.
    /// (Before, such a connection went to hyper at the first cut.)
    #[tokio::test]
    async fn a_body_the_end_of_the_buffer_cut_is_read_on() {
        // Bodies of 50 to 249 bytes, so that the buffer's ends fall in bodies too.
        let input: String = (0..600)
            .map(|i| {
                let n = 50 + i * 37 % 200;
                format!(
                    "POST /e HTTP/1.1\r\nContent-Length: {n}\r\n\r\n{}",
                    "b".repeat(n)
                )
            })
            .collect();
        let r = run(
            input.as_bytes(),
            &[Answer(200, Version::HTTP_11, OK, whole("hi"))],
            false,
        )
        .await;
        assert_eq!(r.seen.len(), 600);
        assert!(r.seen.iter().all(|s| s == "POST /e"));
        assert_eq!(r.handover, None);
    }

    /// A body not yet sent is never waited for: the connection goes to hyper at once,
    /// with what came of it, while the client still holds the connection open.
    #[tokio::test]
    async fn a_body_not_yet_sent_goes_to_hyper_without_waiting() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let sent = "GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
        client.write_all(sent.as_bytes()).await.expect("write");
        let svc = |_req: Request<RequestBody>| async {
            Ok::<_, Infallible>(Answer(200, Version::HTTP_11, OK, whole("hi")).response())
        };
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            serve(server, Arc::new(AtomicBool::new(false)), svc),
        )
        .await
        .expect("handed over without waiting for the body")
        .expect("served");
        match ended {
            Ended::Handover(_, read) => assert_eq!(
                read,
                Bytes::from_static(b"POST /b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            ),
            Ended::Closed => panic!("closed instead of handed over"),
        }
        drop(client);
    }

    #[tokio::test]
    async fn connection_close_is_answered_with_close_and_nothing_after_it_is_served() {
        let input = "GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let r = run(
            input.as_bytes(),
            &[Answer(200, Version::HTTP_11, OK, whole("hi"))],
            false,
        )
        .await;
        assert_eq!(r.seen, ["GET /a"]);
        assert!(r.handover.is_none());
        assert_eq!(
            undated(&r.out),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 2\r\ndate: -\r\n\r\nhi"
        );
    }

    #[tokio::test]
    async fn asked_to_close_while_a_request_is_in_flight_it_answers_then_closes() {
        let input = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let r = run(
            input.as_bytes(),
            &[Answer(200, Version::HTTP_11, OK, whole("hi"))],
            true,
        )
        .await;
        assert_eq!(r.seen, ["GET /a"]);
        assert!(r.handover.is_none());
        assert!(r.out.contains("\r\nconnection: close\r\n"), "{}", r.out);
        assert!(r.out.ends_with("\r\n\r\nhi"), "{}", r.out);
    }

    #[tokio::test]
    async fn pipelined_heads_split_anywhere_are_answered_in_order() {
        let input = "GET /1 HTTP/1.1\r\nHost: x\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\nDELETE /3 HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(7);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = move |req: Request<RequestBody>| {
            log.lock().expect("log").push(req.uri().to_string());
            async { Ok::<_, Infallible>(Answer(200, Version::HTTP_11, OK, whole("hi")).response()) }
        };
        let server = tokio::spawn(serve(server, Arc::new(AtomicBool::new(false)), svc));
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let (_, out) = tokio::join!(
            async {
                for b in input.as_bytes().chunks(3) {
                    wr.write_all(b).await.expect("write");
                }
                wr.shutdown().await.expect("shutdown");
            },
            async {
                let mut out = Vec::new();
                rd.read_to_end(&mut out).await.expect("read");
                out
            }
        );
        assert!(matches!(server.await.expect("joined"), Ok(Ended::Closed)));
        assert_eq!(*seen.lock().expect("log"), ["/1", "/2", "/3"]);
        let out = String::from_utf8(out).expect("text");
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
        assert_eq!(
            out.matches("\r\n\r\nhi").count(),
            2,
            "no body for HEAD: {out}"
        );
    }

    #[test]
    fn chunk_size_lines_are_upper_case_hex() {
        for n in [0, 1, 9, 10, 15, 16, 255, 4096, 65_535, 1 << 20, usize::MAX] {
            let mut out = BytesMut::new();
            chunk_size_line(&mut out, n);
            assert_eq!(out, format!("{n:X}\r\n").as_bytes());
        }
    }

    /// hyper's HTTP/1 server, configured as the gateway's, answering `request` with
    /// `answer`: what its client got.
    async fn hyper_answers(request: &str, answer: &Answer) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(request.as_bytes()).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let answer = answer.clone();
        let svc = hyper::service::service_fn(move |_req| {
            let resp = answer.response();
            async move { Ok::<_, Infallible>(resp) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .keep_alive(true)
            .writev(false)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .await;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        String::from_utf8(out).expect("text")
    }

    /// Every kind of response this loop writes, against what hyper writes for the same
    /// request and response: the same bytes (but for the date's value).
    #[tokio::test]
    async fn responses_are_written_as_hyper_writes_them() {
        const LEN: &[(&str, &str)] = &[("content-length", "5"), ("x-a", "1")];
        const LEN0: &[(&str, &str)] = &[("content-length", "0")];
        const DATED: &[(&str, &str)] = &[("date", "Tue, 01 Jan 2030 00:00:00 GMT")];
        const CLOSE: &[(&str, &str)] = &[("connection", "close"), ("x-a", "1")];
        const MULTI: &[(&str, &str)] =
            &[("set-cookie", "a=1"), ("x-b", "2"), ("set-cookie", "b=2")];
        let big = Bytes::from(
            (0..100_000)
                .map(|i| b'a' + (i % 26) as u8)
                .collect::<Vec<u8>>(),
        );
        let answers = [
            Answer(200, Version::HTTP_11, OK, whole("hello")),
            Answer(200, Version::HTTP_11, LEN, whole("hello")),
            Answer(200, Version::HTTP_11, LEN, chunks(&["he", "llo"])),
            Answer(200, Version::HTTP_11, OK, chunks(&["hello", "", " world"])),
            Answer(200, Version::HTTP_11, OK, chunks(&[])),
            Answer(200, Version::HTTP_11, OK, TestBody::Whole(None)),
            Answer(200, Version::HTTP_11, OK, whole("")),
            Answer(200, Version::HTTP_11, LEN0, TestBody::Whole(None)),
            Answer(200, Version::HTTP_11, LEN, TestBody::Whole(None)),
            Answer(200, Version::HTTP_11, DATED, whole("x")),
            Answer(200, Version::HTTP_11, CLOSE, whole("x")),
            Answer(200, Version::HTTP_11, MULTI, whole("x")),
            Answer(201, Version::HTTP_11, OK, whole("made")),
            Answer(204, Version::HTTP_11, OK, TestBody::Whole(None)),
            Answer(204, Version::HTTP_11, LEN0, TestBody::Whole(None)),
            Answer(304, Version::HTTP_11, LEN, TestBody::Whole(None)),
            Answer(304, Version::HTTP_11, OK, whole("x")),
            Answer(401, Version::HTTP_11, OK, whole("{}")),
            Answer(599, Version::HTTP_11, OK, whole("odd")),
            Answer(200, Version::HTTP_10, OK, whole("old")),
            Answer(200, Version::HTTP_10, OK, chunks(&["old", "er"])),
            Answer(404, Version::HTTP_10, OK, chunks(&["gone"])),
            // Frames larger than what is buffered before a write.
            Answer(
                200,
                Version::HTTP_11,
                OK,
                TestBody::Whole(Some(big.clone())),
            ),
            Answer(
                200,
                Version::HTTP_11,
                OK,
                TestBody::Chunks([big.clone(), Bytes::from_static(b"-"), big.clone()].into()),
            ),
        ];
        for request in [
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            "HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n",
            "DELETE /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ] {
            for answer in &answers {
                let ours = undated(
                    &run(request.as_bytes(), std::slice::from_ref(answer), false)
                        .await
                        .out,
                );
                let theirs = undated(&hyper_answers(request, answer).await);
                if ours != theirs {
                    // Where they part, not the whole of two 200 KB answers.
                    let at = ours
                        .bytes()
                        .zip(theirs.bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    let near = |s: &str| {
                        s.get(at.saturating_sub(60)..(at + 60).min(s.len()))
                            .unwrap_or("")
                            .to_string()
                    };
                    panic!(
                        "{request:?} answered {} {:?} {:?}: differs at byte {at} of {} / {}:\nours   {:?}\nhyper  {:?}",
                        answer.0,
                        answer.1,
                        answer.2,
                        ours.len(),
                        theirs.len(),
                        near(&ours),
                        near(&theirs)
                    );
                }
            }
        }
    }
}
