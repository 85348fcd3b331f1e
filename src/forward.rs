//! The forwarder: each worker's pool of HTTP/1.1 connections to the backend, the
//! HTTP/1.1 client that runs an exchange on one of them inside the request's own task,
//! the request and response bodies that stream through the gateway, and the mapping of
//! backend failures to refusals.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::config::UpstreamConfig;
use crate::errors::Refusal;
use crate::headers;
use crate::timer::KeptTimer;

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
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
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

/// A request's body as the handler gets it: hyper's, or, for a request the gateway's
/// own HTTP/1 loop ([`crate::h1`]) served, the whole body, which had arrived with the
/// head (empty: no body).
pub enum RequestBody {
    Hyper(Incoming),
    Whole(Full<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(inner) => Pin::new(inner).poll_frame(cx),
            RequestBody::Whole(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| match e {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(inner) => inner.is_end_stream(),
            RequestBody::Whole(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(inner) => inner.size_hint(),
            RequestBody::Whole(b) => b.size_hint(),
        }
    }
}

/// The client's request body on its way to the backend, cut off with an error as soon
/// as it exceeds the limit (whether or not a `Content-Length` announced it), or when the
/// client sends nothing for `idle` while the backend waits for more.
pub struct LimitedBody {
    inner: RequestBody,
    remaining: u64,
    idle: Duration,
    /// Start of the current gap: set when the body first has to wait, then moved to
    /// every frame that arrives. `None`: it never had to wait.
    since: Option<tokio::time::Instant>,
    /// Waits for `since + idle` (frames come in order, so that only moves forward).
    timer: KeptTimer,
}

impl LimitedBody {
    pub fn new(inner: RequestBody, limit: u64, idle: Duration) -> LimitedBody {
        LimitedBody {
            inner,
            remaining: limit,
            idle,
            since: None,
            timer: KeptTimer::default(),
        }
    }

    /// The whole body, taken out, when it is all here already (the own HTTP/1 loop's),
    /// not empty, at most `max` bytes and within the limit; else `None`, and the body
    /// is as it was.
    fn take_whole(&mut self, max: usize) -> Option<Bytes> {
        if !matches!(self.inner, RequestBody::Whole(_)) {
            return None;
        }
        let len = self.size_hint().exact()?;
        if len == 0 || len > self.remaining || len > max as u64 {
            return None;
        }
        // A whole body answers at once, without the waker; its frame is counted
        // against the limit as any other.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(self).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => None,
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
                if this.since.is_some() {
                    this.since = Some(tokio::time::Instant::now());
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
                let due = *this.since.get_or_insert_with(tokio::time::Instant::now) + this.idle;
                ready!(this.timer.poll_until(due, cx));
                Poll::Ready(Some(Err(RequestBodyError::Timeout)))
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

/// Most header fields a backend's response head may carry (as hyper's client).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest response head taken from a backend; a larger one is a 502. nginx's default
/// (`proxy_buffer_size`) is 4 or 8 KB.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// What a read from the backend reserves room for at first, and at most.
const READ_RESERVE: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Longest chunk-size line (size and extensions) and most trailer bytes taken from a
/// chunked response.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// One HTTP/1.1 connection to the backend. Its exchanges run in the task of the
/// request they serve: the request head is written, the response head read and its
/// body streamed by whoever polls them, with no connection task between.
struct Conn {
    io: TcpStream,
    /// Bytes read from the backend and not yet handed on.
    buf: BytesMut,
    /// The request head being written; its allocation is kept for the next one.
    out: Vec<u8>,
    /// Where the fields of the response head being read are (kept likewise).
    at: Vec<[usize; 4]>,
    /// How much room a read is given.
    read_size: usize,
    /// The response timeout of the exchanges on this connection ([`within`]), kept
    /// with it so that an exchange does not make, register and drop a timer of its own.
    timer: KeptTimer,
}

impl Conn {
    fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::with_capacity(READ_RESERVE),
            out: Vec::with_capacity(1024),
            at: Vec::with_capacity(16),
            read_size: READ_RESERVE,
            timer: KeptTimer::default(),
        }
    }

    /// Whether an idle connection can take a request: the backend has neither closed
    /// it nor sent anything unasked. Registers `cx` to be woken when that changes.
    /// Costs no system call unless the socket says it is readable.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match self.io.poll_read_ready(cx) {
                Poll::Pending => return true,
                Poll::Ready(Err(_)) => return false,
                Poll::Ready(Ok(())) => {
                    // Readiness can outlive the data (a read that filled its buffer
                    // leaves it set): look, which clears it if nothing is there.
                    let mut probe = [0u8; 1];
                    match self.io.try_read(&mut probe) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // End of stream, a byte nobody asked for, or an error.
                        _ => return false,
                    }
                }
            }
        }
    }

    /// Room for the next read: `read_size` bytes, doubled (up to [`MAX_READ`]) while
    /// reads fill all the room they are given, as a large body's do.
    fn reserve(&mut self) -> usize {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        self.buf.capacity() - self.buf.len()
    }

    /// After a read of `n` bytes into `room`.
    fn adapt(&mut self, n: usize, room: usize) {
        if n >= room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
    }

    /// Before the connection idles: a buffer grown for a large body goes back to the
    /// first size, so that idle connections do not hold up to [`MAX_READ`] each.
    fn shrink(&mut self) {
        if self.read_size > READ_RESERVE {
            self.read_size = READ_RESERVE;
            self.buf = BytesMut::with_capacity(READ_RESERVE);
        }
    }

    /// Writes `data` while watching for an early answer: if the backend starts its
    /// final response while the socket is not writable, stops and returns `false`.
    async fn write_watching(&mut self, mut data: &[u8]) -> Result<bool, Refusal> {
        loop {
            while !data.is_empty() {
                match self.io.try_write(data) {
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(classify(&e)),
                }
            }
            if data.is_empty() {
                return Ok(true);
            }
            let readable = tokio::select! {
                biased;
                r = self.io.readable() => r.map(|()| true),
                r = self.io.writable() => r.map(|()| false),
            }
            .map_err(|e| classify(&e))?;
            if readable && self.answered() {
                return Ok(false);
            }
        }
    }

    /// Reads what the backend sent while the request body is still on its way: `true`
    /// once its final response has begun (or it closed, or the bytes make no sense:
    /// reading the response says which). Informational responses are dropped.
    fn answered(&mut self) -> bool {
        self.reserve();
        match self.io.try_read_buf(&mut self.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Ok(0) | Err(_) => true,
            Ok(_) => final_response_begun(&mut self.buf),
        }
    }
}

/// Drops the complete informational (1xx) heads at the front of `buf`; `true` when a
/// final response's head is there, or bytes no response starts with.
fn final_response_begun(buf: &mut BytesMut) -> bool {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => match resp.code {
                Some(code) if (100..200).contains(&code) && code != 101 => buf.advance(n),
                _ => return true,
            },
            // Too long to be a head: reading the response refuses it.
            Ok(httparse::Status::Partial) => return buf.len() > MAX_RESPONSE_HEAD_BYTES,
            Err(_) => return true,
        }
    }
}

/// How the request body goes to the backend.
#[derive(Clone, Copy, PartialEq, Debug)]
enum RequestFraming {
    /// No body.
    None,
    /// As many bytes as the `Content-Length` the head carries.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Header fields the gateway adds to a request, in groups.
pub type Added<'a> = [&'a [(&'a HeaderName, &'a HeaderValue)]; 2];

/// Writes the request's first write into `out`: request line, every header as the map
/// holds it (names lower-case), the `added` ones, the framing header the body needs when
/// the head has none, and `whole`, the body taken out of `body` when all of it was
/// here. Returns how the rest of the body goes (none after `whole`).
fn encode_request(
    head: &http::request::Parts,
    added: Added<'_>,
    body: &LimitedBody,
    whole: Option<&Bytes>,
    out: &mut Vec<u8>,
) -> RequestFraming {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        head.uri
            .path_and_query()
            .map_or("/", PathAndQuery::as_str)
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in head
        .headers
        .iter()
        .chain(added.into_iter().flatten().copied())
    {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if whole.is_none() && body.is_end_stream() {
        RequestFraming::None
    } else if head.headers.contains_key(CONTENT_LENGTH) {
        // The client's body was read by this length (by hyper or the own loop); it
        // arrives exactly so.
        RequestFraming::Length
    } else if let Some(len) = whole
        .map(|data| data.len() as u64)
        .or(body.size_hint().exact())
    {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        RequestFraming::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        RequestFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    match whole {
        Some(data) => {
            out.extend_from_slice(data);
            RequestFraming::None
        }
        None => framing,
    }
}

/// What became of the request body.
enum Sent {
    /// All of it went.
    All,
    /// The backend answered first; the rest was not sent.
    Answered,
}

/// Streams the request body to the backend, framed as `framing` says, while watching
/// for an early answer.
async fn send_body(
    conn: &mut Conn,
    body: &mut LimitedBody,
    framing: RequestFraming,
) -> Result<Sent, Refusal> {
    let chunked = framing == RequestFraming::Chunked;
    loop {
        let next = tokio::select! {
            biased;
            r = conn.io.readable() => Err(r),
            f = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)) => Ok(f),
        };
        let data = match next {
            Err(Err(_)) => return Ok(Sent::Answered),
            Err(Ok(())) => {
                if conn.answered() {
                    return Ok(Sent::Answered);
                }
                continue;
            }
            Ok(None) => {
                if chunked && !conn.write_watching(b"0\r\n\r\n").await? {
                    return Ok(Sent::Answered);
                }
                return Ok(Sent::All);
            }
            Ok(Some(Err(e))) => return Err(body_refusal(&e)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not forwarded; empty frames carry nothing.
                _ => continue,
            },
        };
        let written = if chunked {
            let size = format!("{:x}\r\n", data.len());
            conn.write_watching(size.as_bytes()).await?
                && conn.write_watching(&data).await?
                && conn.write_watching(b"\r\n").await?
        } else {
            conn.write_watching(&data).await?
        };
        if !written {
            return Ok(Sent::Answered);
        }
    }
}

fn body_refusal(e: &RequestBodyError) -> Refusal {
    match e {
        RequestBodyError::TooLarge => Refusal::PayloadTooLarge,
        RequestBodyError::Client(_) => Refusal::BadRequest,
        RequestBodyError::Timeout => Refusal::RequestTimeout,
    }
}

/// Largest body written in one write with its head, when all of it is here.
const WITH_HEAD_MAX: usize = 16 * 1024;

/// A backend's response head, read.
struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    facts: Facts,
}

/// What the framing of a response depends on, noted as its fields are read (no map
/// lookups afterwards).
#[derive(Default)]
struct Facts {
    /// What every `Content-Length` value (lists included) said, when they agreed.
    length: Option<u64>,
    /// A `Content-Length` value was not plain digits, or disagreed with another.
    bad_length: bool,
    /// Whether the last `Transfer-Encoding` ends in `chunked`; `None` without one.
    chunked: Option<bool>,
    /// `Connection` lists `close`; lists `keep-alive`; lists any other name.
    close: bool,
    keep_alive: bool,
    nominates: bool,
}

impl Facts {
    /// Notes one field, its name as sent (any case).
    fn note(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in value.split(|&b| b == b',') {
                let digits = part.trim_ascii();
                if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit)
                {
                    self.bad_length = true;
                    continue;
                }
                let n = digits
                    .iter()
                    .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if self.length.is_some_and(|l| l != n) {
                    self.bad_length = true;
                }
                self.length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let close = token.eq_ignore_ascii_case(b"close");
                let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                self.nominates |= !(close || keep_alive || token.is_empty());
            }
        }
    }
}

/// Takes a complete final response head off the front of `buf` (informational ones
/// before it are dropped); `None` while it is incomplete. Header values are slices of
/// the bytes read, not copies.
fn take_response_head(
    buf: &mut BytesMut,
    at: &mut Vec<[usize; 4]>,
) -> Result<Option<ResponseHead>, Refusal> {
    loop {
        // Uninitialised: zeroing 100 slots cost more than parsing a short head.
        let mut slots = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD_BYTES => {
                return Ok(None);
            }
            Ok(httparse::Status::Partial) => {
                tracing::debug!("upstream response head too large");
                return Err(Refusal::UpstreamUnavailable);
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream response head unreadable");
                return Err(Refusal::UpstreamUnavailable);
            }
        };
        if len > MAX_RESPONSE_HEAD_BYTES {
            tracing::debug!("upstream response head too large");
            return Err(Refusal::UpstreamUnavailable);
        }
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Refusal::UpstreamUnavailable)?;
        if status.is_informational() {
            if code == 101 {
                // Never asked for: `Upgrade` does not cross the gateway.
                tracing::debug!("upstream switched protocols unasked");
                return Err(Refusal::UpstreamUnavailable);
            }
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each field sits, so that its value can be cut from the frozen head.
        let base = buf.as_ptr() as usize;
        let mut facts = Facts::default();
        at.clear();
        at.extend(resp.headers.iter().map(|h| {
            facts.note(h.name.as_bytes(), h.value);
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            [name, name + h.name.len(), value, value + h.value.len()]
        }));
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(at.len());
        for &[ns, ne, vs, ve] in at.iter() {
            let name = HeaderName::from_bytes(&head[ns..ne]);
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve));
            match (name, value) {
                // Hop-by-hop fields never reach the map, but for a `Connection` that
                // names other fields: the whole strip below needs it.
                (Ok(name), Ok(_))
                    if headers::is_hop_by_hop(&name)
                        && !(facts.nominates && name == CONNECTION) => {}
                (Ok(name), Ok(value)) => {
                    headers.append(name, value);
                }
                _ => {
                    tracing::debug!("upstream response header unreadable");
                    return Err(Refusal::UpstreamUnavailable);
                }
            }
        }
        if facts.nominates {
            headers::strip_hop_by_hop(&mut headers);
        }
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            facts,
        }));
    }
}

/// How a response body is framed (RFC 9112 section 6.3), read from its head.
fn response_framing(
    head: &mut ResponseHead,
    request_was_head: bool,
) -> Result<(Framing, bool), Refusal> {
    let status = head.status.as_u16();
    let facts = &head.facts;
    let mut reusable = if head.version == Version::HTTP_10 {
        facts.keep_alive
    } else {
        !facts.close
    };
    let framing = if request_was_head || status == 204 || status == 304 {
        Framing::Done
    } else if let Some(chunked) = facts.chunked {
        if (facts.length.is_some() || facts.bad_length)
            && head.headers.remove(CONTENT_LENGTH).is_some()
        {
            // Both: the length is ignored (RFC 9112 section 6.3) and the connection
            // not used again.
            reusable = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Eof
        }
    } else if facts.bad_length {
        tracing::debug!("upstream response with an invalid content-length");
        return Err(Refusal::UpstreamUnavailable);
    } else {
        facts.length.map_or(Framing::Eof, Framing::Length)
    };
    if framing == Framing::Eof {
        reusable = false;
    }
    Ok((framing, reusable))
}

/// Where a response body is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    /// This many bytes to go.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Eof,
    /// Complete.
    Done,
}

/// Where a chunked body is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes of it seen.
    Trailers(usize),
}

/// What the bytes read so far give.
enum Step {
    Data(Bytes),
    Done,
    NeedMore,
}

impl Framing {
    /// Takes the next piece of body from `buf`.
    fn take(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        loop {
            match self {
                Framing::Done => return Ok(Step::Done),
                Framing::Length(0) => {
                    *self = Framing::Done;
                    return Ok(Step::Done);
                }
                Framing::Length(remaining) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = buf
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        *self = Framing::Done;
                    }
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::Eof => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(chunk) => match *chunk {
                    Chunk::Size => {
                        let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                            return Ok(Step::NeedMore);
                        };
                        let size = chunk_size(&buf[..end])?;
                        buf.advance(end + 2);
                        *chunk = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(remaining) => {
                        if buf.is_empty() {
                            return Ok(Step::NeedMore);
                        }
                        let n = buf
                            .len()
                            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                        let left = remaining - n as u64;
                        *chunk = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(invalid("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(end) = line_end(buf, MAX_TRAILER_BYTES - seen)? else {
                            return Ok(Step::NeedMore);
                        };
                        buf.advance(end + 2);
                        if end == 0 {
                            *self = Framing::Done;
                        } else {
                            // Trailer fields are not forwarded.
                            *chunk = Chunk::Trailers(seen + end + 2);
                        }
                    }
                },
            }
        }
    }
}

/// Where the CRLF ending the line at the front of `buf` is; `None` while it has not
/// come. A bare CR or LF, or a line longer than `max`, is an error.
fn line_end(buf: &[u8], max: usize) -> io::Result<Option<usize>> {
    match buf
        .iter()
        .take(max + 2)
        .position(|&b| b == b'\n' || b == b'\r')
    {
        Some(i) if buf.get(i) == Some(&b'\r') => match buf.get(i + 1) {
            Some(b'\n') => Ok(Some(i)),
            Some(_) => Err(invalid("bare CR in a chunked body")),
            None => Ok(None),
        },
        Some(_) => Err(invalid("bare LF in a chunked body")),
        None if buf.len() > max => Err(invalid("chunk line or trailers too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then optional blanks and extensions.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(invalid("chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid("chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from(crate::path::hex_value(d).unwrap_or(0))
    }))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The backend's response body on its way to the client, read from the connection by
/// the task that sends it on. The connection goes back to the pool as soon as the body
/// is complete; one dropped before that is closed.
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    pool: Arc<Pool>,
}

impl UpstreamBody {
    /// The body is complete: the connection goes back when it can take another request.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.take(&mut conn.buf) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Data(data)) => {
                    if this.framing == Framing::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::NeedMore) => {}
            }
            let room = conn.reserve();
            let read = ready!(poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf));
            if let Ok(n) = read {
                conn.adapt(n, room);
            }
            match read {
                Ok(0) if this.framing == Framing::Eof => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection before the body was complete",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

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
    idle: Mutex<IdleSet>,
}

/// The idle connections, and the task that watches them.
#[derive(Default)]
struct IdleSet {
    conns: Vec<Idle>,
    /// Wakes the watcher: registered on every idle connection, so that one the backend
    /// closes is closed here too, without a task per connection.
    watcher: Option<Waker>,
    watching: bool,
    /// The watcher's ticks so far: the clock idle connections are aged by, so that
    /// putting one back reads no clock.
    ticks: u64,
}

struct Idle {
    conn: Conn,
    /// [`IdleSet::ticks`] when it was put back.
    since: u64,
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
                idle: Mutex::new(IdleSet::default()),
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

    /// Sends the request and waits for the response head, which comes without its
    /// hop-by-hop fields ([`headers::strip_hop_by_hop`]). The body streams afterwards.
    /// `head` must carry a `Host` header and a target in origin form; `added` are the
    /// gateway's own headers, written after the head's (which must hold none of their
    /// names).
    pub async fn send(
        &self,
        head: &http::request::Parts,
        body: LimitedBody,
        added: Added<'_>,
        sent: Instant,
    ) -> Result<Response<UpstreamBody>, Refusal> {
        let due = tokio::time::Instant::from_std(sent) + self.response_timeout;
        self.pool.send(head, body, added, due).await
    }
}

/// `fut`, or [`Refusal::UpstreamTimeout`] once `due` has passed, waited for on
/// `timer`, the connection's own ([`Conn`]; exchanges come in order, so their `due`s
/// only move forward).
async fn within<F: Future>(
    due: tokio::time::Instant,
    timer: &mut KeptTimer,
    fut: F,
) -> Result<F::Output, Refusal> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        ready!(timer.poll_until(due, cx));
        Poll::Ready(Err(Refusal::UpstreamTimeout))
    })
    .await
}

impl Pool {
    async fn send(
        self: &Arc<Self>,
        head: &http::request::Parts,
        mut body: LimitedBody,
        added: Added<'_>,
        due: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, Refusal> {
        // A small body that is all here already goes in the head's write: one write
        // and one segment instead of two.
        let whole = body.take_whole(WITH_HEAD_MAX);
        let (mut conn, framing) = loop {
            let (mut conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                // Boxed: connecting is rare (the pool), and its future would otherwise
                // sit inline in every request's.
                None => match tokio::time::timeout_at(due, Box::pin(self.connect())).await {
                    Ok(c) => (c?, false),
                    Err(_) => return Err(Refusal::UpstreamTimeout),
                },
            };
            let framing = encode_request(head, added, &body, whole.as_ref(), &mut conn.out);
            match within(due, &mut conn.timer, conn.io.write_all(&conn.out)).await? {
                Ok(()) => break (conn, framing),
                // The backend had closed an idle connection: no request reached it
                // (at most part of a head), so another connection may take this one.
                Err(e) if reused => {
                    tracing::debug!(error = %e, "idle upstream connection broken; retrying");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upstream request failed");
                    return Err(classify(&e));
                }
            }
        };
        let mut complete = true;
        if framing != RequestFraming::None {
            // Boxed: most requests have no body, and this future would otherwise sit
            // inline in every request's.
            let mut timer = std::mem::take(&mut conn.timer);
            let sent = within(
                due,
                &mut timer,
                Box::pin(send_body(&mut conn, &mut body, framing)),
            )
            .await;
            conn.timer = timer;
            match sent?? {
                Sent::All => {}
                // The connection is not used again: the backend may still read the
                // rest of a body that will not come.
                Sent::Answered => complete = false,
            }
        }
        drop(body);
        let mut response = loop {
            if let Some(response) = take_response_head(&mut conn.buf, &mut conn.at)? {
                break response;
            }
            conn.reserve();
            match within(due, &mut conn.timer, conn.io.read_buf(&mut conn.buf)).await? {
                Ok(0) => {
                    tracing::debug!("upstream closed the connection before answering");
                    return Err(Refusal::UpstreamUnavailable);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "upstream read failed");
                    return Err(classify(&e));
                }
            }
        };
        let (framing, reusable) = response_framing(&mut response, head.method == Method::HEAD)?;
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            reusable: reusable && complete,
            pool: self.clone(),
        };
        if framing == Framing::Done {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = response.status;
        *resp.version_mut() = response.version;
        *resp.headers_mut() = response.headers;
        Ok(resp)
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let mut set = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cx = Context::from_waker(Waker::noop());
        while let Some(mut idle) = set.conns.pop() {
            if idle.conn.poll_idle(&mut cx) {
                return Some(idle.conn);
            }
            // Closed by the backend (or broken) while idle.
        }
        None
    }

    /// Keeps a connection that is ready for its next request, unless the pool is full.
    fn put(self: &Arc<Self>, mut conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        conn.shrink();
        let mut set = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if set.conns.len() >= self.max_idle {
            return;
        }
        let alive = match &set.watcher {
            Some(w) => conn.poll_idle(&mut Context::from_waker(w)),
            // The watcher registers itself on its first run.
            None => conn.poll_idle(&mut Context::from_waker(Waker::noop())),
        };
        if !alive {
            return;
        }
        let since = set.ticks;
        set.conns.push(Idle { conn, since });
        if !set.watching
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            set.watching = true;
            rt.spawn(watch_idle(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// A new connection: resolve, connect with `TCP_NODELAY` within the connect timeout
    /// (split evenly over the addresses, tried in order).
    async fn connect(&self) -> Result<Conn, Refusal> {
        let stream = self.tcp().await.map_err(|e| {
            tracing::debug!(error = %e, host = %self.host, port = self.port, "upstream connect failed");
            classify(&e)
        })?;
        Ok(Conn::new(stream))
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

/// Watches the idle connections of a pool: closes one the backend closed (or sent
/// something on) as soon as its socket says so, and those idle for `idle_timeout`,
/// counted in ticks of an eighth of it (so a connection goes after between 1 and 1.125
/// times the timeout; ticks are never early, only late on a busy worker). Its waker is
/// registered on every idle connection, so it runs only when one of them changes or the
/// period ends. Ends with the pool.
async fn watch_idle(pool: std::sync::Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 8).max(Duration::from_millis(90));
    // A connection put back after tick `k` has been idle for `periods` whole periods at
    // tick `k + periods + 1`, at the earliest.
    let periods =
        u64::try_from(idle_timeout.as_nanos().div_ceil(period.as_nanos())).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    std::future::poll_fn(|cx| {
        let Some(pool) = pool.upgrade() else {
            return Poll::Ready(());
        };
        let mut ticked = 0;
        while tick.poll_tick(cx).is_ready() {
            ticked += 1;
        }
        let mut set = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        set.ticks += ticked;
        let now = set.ticks;
        if !set
            .watcher
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            set.watcher = Some(cx.waker().clone());
        }
        set.conns
            .retain_mut(|i| !(ticked > 0 && now - i.since > periods) && i.conn.poll_idle(cx));
        Poll::Pending
    })
    .await
}

/// Maps a failure of the connection to the backend to its refusal: a timeout (of the
/// connect, say) or the backend being unavailable. Failures of the client's request
/// body are mapped where they happen ([`body_refusal`]).
fn classify(e: &io::Error) -> Refusal {
    if e.kind() == io::ErrorKind::TimedOut {
        Refusal::UpstreamTimeout
    } else {
        Refusal::UpstreamUnavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `stream` to a body of `framing` `step` bytes at a time, as reads would
    /// deliver it: the body's bytes, and what is left after it (the next response).
    fn decode(mut framing: Framing, stream: &[u8], step: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match framing.take(&mut buf)? {
                Step::Data(data) => body.extend_from_slice(&data),
                Step::Done => return Ok((body, [&buf[..], &stream[fed..]].concat())),
                Step::NeedMore if fed < stream.len() => {
                    let end = (fed + step).min(stream.len());
                    buf.extend_from_slice(&stream[fed..end]);
                    fed = end;
                }
                Step::NeedMore => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended"));
                }
            }
        }
    }

    fn chunked(chunks: &[Vec<u8>], extensions: bool, trailers: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:X}", c.len()).as_bytes());
            if extensions {
                out.extend_from_slice(b" ;name=\"v;1\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        if trailers {
            out.extend_from_slice(b"x-trailer: 1\r\nx-other: 2\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    const NEXT: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the chunks (their data may hold CRLFs and chunk-like lines) and
        /// however the reads cut them, the body is exactly their data, and the bytes
        /// after the last chunk are left for the next response.
        #[test]
        fn chunked_bodies_decode_whatever_the_reads(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'0'), any::<u8>()], 0..300),
                0..6),
            extensions in any::<bool>(),
            trailers in any::<bool>(),
            step in 1usize..400,
        ) {
            let mut stream = chunked(&chunks, extensions, trailers);
            stream.extend_from_slice(NEXT);
            let (body, rest) = decode(Framing::Chunked(Chunk::Size), &stream, step)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(body, chunks.concat());
            prop_assert_eq!(rest, NEXT.to_vec());
        }

        /// A length body is exactly that many bytes, the rest left over.
        #[test]
        fn length_bodies_take_exactly_their_length(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            step in 1usize..400,
        ) {
            let mut stream = data.clone();
            stream.extend_from_slice(NEXT);
            let (body, rest) = decode(Framing::Length(data.len() as u64), &stream, step)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(body, data);
            prop_assert_eq!(rest, NEXT.to_vec());
        }

        /// Any bytes as a chunked body: an error or a body, never a panic.
        #[test]
        fn any_bytes_as_a_chunked_body_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1000),
            step in 1usize..100,
        ) {
            let _ = decode(Framing::Chunked(Chunk::Size), &bytes, step);
        }

        /// Any bytes as a response head: a head, a wait for more, or a refusal.
        #[test]
        fn any_bytes_as_a_response_head_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1000),
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = take_response_head(&mut buf, &mut Vec::new());
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"3\rabc\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"3 x\r\nabc\r\n0\r\n\r\n",
            b"-3\r\nabc\r\n0\r\n\r\n",
        ] {
            assert!(
                decode(Framing::Chunked(Chunk::Size), bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = [
            b"1;".as_slice(),
            &[b'a'; MAX_CHUNK_LINE],
            b"\r\nx\r\n0\r\n\r\n",
        ]
        .concat();
        assert!(decode(Framing::Chunked(Chunk::Size), &long_line, 64).is_err());
        let long_trailers = [
            b"0\r\n".as_slice(),
            &b"x-t: 1\r\n".repeat(MAX_TRAILER_BYTES / 8 + 1),
            b"\r\n",
        ]
        .concat();
        assert!(decode(Framing::Chunked(Chunk::Size), &long_trailers, 64).is_err());
    }

    fn head(text: &str, request_was_head: bool) -> Result<(Framing, bool, HeaderMap), Refusal> {
        let mut buf = BytesMut::from(text.as_bytes());
        let mut head = take_response_head(&mut buf, &mut Vec::new())?.ok_or(Refusal::Internal)?;
        let (framing, reusable) = response_framing(&mut head, request_was_head)?;
        Ok((framing, reusable, head.headers))
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let ok = |t: &str| head(t, false).map(|(f, r, _)| (f, r));
        let chunked = Framing::Chunked(Chunk::Size);
        for (text, framing, reusable) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Framing::Eof,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::Eof, false),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Framing::Done,
                true,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Framing::Done, true),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n",
                Framing::Length(1),
                true,
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                Framing::Length(2),
                true,
            ),
        ] {
            assert_eq!(ok(text), Ok((framing, reusable)), "{text:?}");
        }
        // The answer to a HEAD request has no body, whatever its length says.
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).map(|(f, r, _)| (f, r)),
            Ok((Framing::Done, true))
        );
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HELLO\r\n\r\n",
        ] {
            assert_eq!(ok(bad), Err(Refusal::UpstreamUnavailable), "{bad:?}");
        }
        // Both framings: chunked wins, the length goes, the connection is not reused.
        let (framing, reusable, headers) = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .expect("head");
        assert_eq!((framing, reusable), (Framing::Chunked(Chunk::Size), false));
        assert!(!headers.contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn hop_by_hop_response_fields_never_reach_the_map() {
        let (_, _, h) = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nProxy-Authenticate: x\r\nx-kept: 1\r\n\r\n",
            false,
        )
        .expect("head");
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-kept"]
        );
        let (_, reusable, h) = head(
            "HTTP/1.1 200 OK\r\nx-secret: 1\r\nConnection: close, X-Secret\r\n\
             content-length: 0\r\nx-kept: 1\r\n\r\n",
            false,
        )
        .expect("head");
        assert!(!reusable);
        let mut names = h.keys().map(HeaderName::as_str).collect::<Vec<_>>();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    /// A small body that is all here goes in the head's write; one over the size for
    /// that, or over the body limit, or a head without a body, leaves the write the
    /// head alone and the body as it was (the limit's error still comes from it).
    #[test]
    fn a_whole_small_body_goes_in_the_heads_write() {
        let parts = |len: usize| {
            http::Request::post("/e")
                .header(CONTENT_LENGTH, len)
                .body(())
                .expect("request")
                .into_parts()
                .0
        };
        let whole = |data: Vec<u8>, limit: u64| {
            LimitedBody::new(
                RequestBody::Whole(Full::new(Bytes::from(data))),
                limit,
                Duration::from_secs(1),
            )
        };
        let first = |len: usize, limit: u64| {
            let head = parts(len);
            let mut body = whole(vec![b'x'; len], limit);
            let taken = body.take_whole(WITH_HEAD_MAX);
            let mut out = Vec::new();
            let framing = encode_request(&head, [&[], &[]], &body, taken.as_ref(), &mut out);
            (String::from_utf8(out).expect("text"), framing, body)
        };

        let (out, framing, body) = first(5, 100);
        assert_eq!(out, "POST /e HTTP/1.1\r\ncontent-length: 5\r\n\r\nxxxxx");
        assert_eq!(framing, RequestFraming::None);
        assert!(body.is_end_stream());

        let (out, framing, _) = first(WITH_HEAD_MAX, WITH_HEAD_MAX as u64);
        assert!(out.ends_with(&format!("\r\n\r\n{}", "x".repeat(WITH_HEAD_MAX))));
        assert_eq!(framing, RequestFraming::None);

        for (len, limit) in [(WITH_HEAD_MAX + 1, u64::MAX), (5, 4)] {
            let (out, framing, mut body) = first(len, limit);
            assert_eq!(
                out,
                format!("POST /e HTTP/1.1\r\ncontent-length: {len}\r\n\r\n")
            );
            assert_eq!(framing, RequestFraming::Length);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let next = Pin::new(&mut body).poll_frame(&mut cx);
            if limit < len as u64 {
                assert!(matches!(
                    next,
                    Poll::Ready(Some(Err(RequestBodyError::TooLarge)))
                ));
            } else {
                assert!(
                    matches!(next, Poll::Ready(Some(Ok(f))) if f.data_ref().map(Bytes::len) == Some(len))
                );
            }
        }

        // A whole body under a head without a length gets one.
        let head = http::Request::post("/e")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let mut body = whole(b"abc".to_vec(), 100);
        let taken = body.take_whole(WITH_HEAD_MAX);
        let mut out = Vec::new();
        let framing = encode_request(&head, [&[], &[]], &body, taken.as_ref(), &mut out);
        assert_eq!(out, b"POST /e HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert_eq!(framing, RequestFraming::None);

        let head = http::Request::get("/g")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let mut body = whole(Vec::new(), 100);
        assert!(body.take_whole(WITH_HEAD_MAX).is_none());
        let mut out = Vec::new();
        let framing = encode_request(&head, [&[], &[]], &body, None, &mut out);
        assert_eq!(out, b"GET /g HTTP/1.1\r\n\r\n");
        assert_eq!(framing, RequestFraming::None);
    }

    #[test]
    fn an_early_answer_is_told_from_interim_ones() {
        let begun = |bytes: &[u8]| final_response_begun(&mut BytesMut::from(bytes));
        assert!(!begun(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!begun(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too"));
        assert!(begun(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too Large\r\n\r\n"
        ));
        assert!(begun(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"));
        assert!(begun(b"HELLO\r\n\r\n"));
        // A head that never ends stops the upload rather than growing the buffer.
        let endless = format!(
            "HTTP/1.1 200 OK\r\nx: {}",
            "a".repeat(MAX_RESPONSE_HEAD_BYTES)
        );
        assert!(begun(endless.as_bytes()));
    }

    #[test]
    fn response_heads_over_the_limit_are_refused() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_RESPONSE_HEAD_BYTES)
        );
        assert_eq!(
            head(&big, false).map(|_| ()),
            Err(Refusal::UpstreamUnavailable)
        );
        let mut partial = BytesMut::from(&big.as_bytes()[..MAX_RESPONSE_HEAD_BYTES + 1]);
        assert!(take_response_head(&mut partial, &mut Vec::new()).is_err());
        let mut fields = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_RESPONSE_HEADERS {
            fields.push_str(&format!("x-{i}: 1\r\n"));
        }
        fields.push_str("\r\n");
        assert_eq!(
            head(&fields, false).map(|_| ()),
            Err(Refusal::UpstreamUnavailable)
        );
    }
}
