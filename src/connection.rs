//! One downstream connection's lifetime: the per-address connection limit, the HTTP/1
//! framing guard in front of hyper ([`GuardedIo`], rules in [`crate::framing`]) with
//! the HTTP/1 header timeout, the idle timeout, and the graceful close on shutdown.
//! HTTP itself is hyper's.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::task::ready;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::errors::Refusal;
use crate::framing::{self, Framer, Scan};
use crate::timer::KeptTimer;

/// Counts open connections per client address and refuses past the limit, so that one
/// address cannot take every connection slot. Touched once per connection, never per
/// request.
#[derive(Debug)]
pub struct PerAddressLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot of an address; released on drop.
pub struct AddressSlot {
    limit: Arc<PerAddressLimit>,
    ip: IpAddr,
}

impl PerAddressLimit {
    pub fn new(max: usize) -> Arc<PerAddressLimit> {
        Arc::new(PerAddressLimit {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` when the address already holds `max` connections.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            limit: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a connection's stream counts, and what its HTTP/1 framing guard tells the
/// handler: every read and write (so an idle connection can be told from a busy one
/// without a clock read per I/O), reads alone (so a request that arrived without a read
/// of its own, one already buffered behind the previous one, can be told from the
/// others), the requests started, and which of them stands in for a refused head.
#[derive(Debug, Default)]
pub struct IoCounts {
    activity: AtomicU64,
    reads: AtomicU64,
    /// `reads` when the last request started, plus one (0: no request yet).
    seen: AtomicU64,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// `index << 2 | refusal code` of the stand-in request ([`framing::STAND_IN`]);
    /// 0: none. Only the connection's own task touches these, so the loads and stores
    /// are plain (no read-modify-write).
    refused: AtomicU64,
}

/// What the handler learns as a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestStart {
    /// No read happened since the previous request started: this one was already
    /// buffered (HTTP/1 pipelining, or several HTTP/2 streams in one read).
    pub buffered: bool,
    /// The request is the stand-in for a head the framing guard refused: answer this.
    pub refused: Option<Refusal>,
}

/// The refusals a head can get, by code - 1.
const REFUSALS: [Refusal; 3] = [
    Refusal::BadRequest,
    Refusal::UriTooLong,
    Refusal::HeadersTooLarge,
];

impl IoCounts {
    /// Called as hyper hands the handler a request (in order, on HTTP/1).
    pub fn start_request(&self) -> RequestStart {
        let now = self.reads.load(Ordering::Relaxed) + 1;
        let buffered = self.seen.swap(now, Ordering::Relaxed) == now;
        let index = self.requests.load(Ordering::Relaxed);
        self.requests.store(index + 1, Ordering::Relaxed);
        let refused = self.refused.load(Ordering::Relaxed);
        let refused = if refused != 0 && refused >> 2 == index {
            usize::try_from(refused & 3)
                .ok()
                .and_then(|code| REFUSALS.get(code.wrapping_sub(1)))
                .copied()
        } else {
            None
        };
        RequestStart { buffered, refused }
    }

    /// Marks request `index` as the stand-in for a head refused with `refusal`.
    fn refuse(&self, index: u64, refusal: Refusal) {
        let code = REFUSALS.iter().position(|&r| r == refusal).unwrap_or(0) as u64 + 1;
        self.refused.store(index << 2 | code, Ordering::Relaxed);
    }
}

/// A connection's stream: keeps [`IoCounts`], and on HTTP/1 lets hyper see only heads
/// that [`framing::Framer`] cleared. A refused head never reaches hyper: in its place
/// hyper reads [`framing::STAND_IN`], whose request the handler answers with the
/// refusal (the JSON of DESIGN.md, where hyper's own refusals have an empty body), and
/// after which hyper closes; nothing after the refused head is read.
///
/// Bytes go straight into hyper's buffer; only a head split over reads is held back
/// (copied) until it is complete. It also keeps `header_read_timeout` for every HTTP/1
/// head (a read error ends the connection without an answer, as hyper's timer did).
pub struct GuardedIo<T> {
    inner: T,
    counts: Arc<IoCounts>,
    /// `None`: not following the stream (HTTP/2, or past what the framer can follow).
    framer: Option<Framer>,
    /// Bytes read but not given to hyper: `held[given..clear]` may go, `held[clear..]`
    /// is the start of an incomplete head.
    held: Vec<u8>,
    given: usize,
    clear: usize,
    /// A head was refused: nothing more is read.
    cut: bool,
    /// `header_read_timeout`: how long a head may take, counted from when the guard
    /// first found no bytes of it to read (for the first head: from the accept).
    /// hyper's own header timer is off (`server::connection_builder`): it set and
    /// dropped a timer for every request, and this one is set once per connection.
    header_timeout: Duration,
    /// When the wait for the head now due began; `None`: not waiting yet.
    waiting_since: Option<tokio::time::Instant>,
    /// The head (by index) that `waiting_since` is for.
    waiting_for: u64,
    /// The connection's one header timer ([`KeptTimer`]): heads come in order, so
    /// their deadlines only move forward.
    timer: KeptTimer,
}

impl<T> GuardedIo<T> {
    /// `limits`: guard HTTP/1 heads with these; `None`: count only.
    pub fn new(
        inner: T,
        limits: Option<framing::Limits>,
        header_read_timeout: Duration,
    ) -> (GuardedIo<T>, Arc<IoCounts>) {
        let counts = Arc::new(IoCounts::default());
        (
            GuardedIo {
                inner,
                counts: counts.clone(),
                framer: limits.map(Framer::new),
                held: Vec::new(),
                given: 0,
                clear: 0,
                cut: false,
                header_timeout: header_read_timeout,
                waiting_since: Some(tokio::time::Instant::now()),
                waiting_for: 0,
                timer: KeptTimer::default(),
            },
            counts,
        )
    }

    /// Puts `bytes`, given out before, back in front of what was not given out yet: the
    /// next reads return them first. For the gateway's own HTTP/1 loop ([`crate::h1`]),
    /// which hands hyper the bytes it read and did not serve; the guard scanned them
    /// already, so they are not scanned again.
    pub fn unread(&mut self, bytes: &[u8]) {
        let rest = self.held.split_off(self.given);
        let cleared = self.clear - self.given;
        self.held.clear();
        self.held.extend_from_slice(bytes);
        self.held.extend_from_slice(&rest);
        self.given = 0;
        self.clear = bytes.len() + cleared;
    }

    /// Puts the stand-in request after what hyper may still read, and stops reading.
    fn refuse(&mut self, refusal: Refusal) {
        let index = self.framer.as_ref().map_or(0, Framer::heads);
        self.counts.refuse(index, refusal);
        self.held.extend_from_slice(framing::STAND_IN);
        self.clear = self.held.len();
        self.cut = true;
        self.framer = None;
    }
}

impl<T: AsyncRead + Unpin> GuardedIo<T> {
    /// Called when a read found nothing: while a head is due, `Pending` (the timer
    /// armed), or the timeout error once `header_read_timeout` passed since the wait for
    /// it began (hyper's timer closed without answering, and so does this). Inside a
    /// body, or not following the stream (HTTP/2): `Pending`.
    fn poll_head_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(framer) = &self.framer else {
            return Poll::Pending;
        };
        if !framer.in_head() {
            return Poll::Pending;
        }
        let head = framer.heads();
        if head != self.waiting_for {
            self.waiting_for = head;
            self.waiting_since = None;
        }
        let due = *self
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now)
            + self.header_timeout;
        ready!(self.timer.poll_until(due, cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "header read timeout",
        )))
    }

    fn read_inner(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.counts.activity.fetch_add(1, Ordering::Relaxed);
            self.counts.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.given < this.clear {
                let n = (this.clear - this.given).min(buf.remaining());
                buf.put_slice(&this.held[this.given..this.given + n]);
                this.given += n;
                if this.given == this.held.len() {
                    this.held.clear();
                    this.given = 0;
                    this.clear = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.cut {
                // hyper closes after answering the stand-in; until then it may look
                // for an end of input, which must not come (it would abort the answer).
                return Poll::Pending;
            }
            if this.framer.is_none() {
                return this.read_inner(cx, buf);
            }
            if this.held.is_empty() {
                // Straight into hyper's buffer: a head usually arrives whole.
                let before = buf.filled().len();
                if this.read_inner(cx, buf)?.is_pending() {
                    return this.poll_head_timer(cx);
                }
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let Some(framer) = this.framer.as_mut() else {
                    return Poll::Ready(Ok(()));
                };
                let passed = match framer.scan(new) {
                    Scan::Clear(n) => {
                        if framer.passthrough() {
                            this.framer = None;
                        }
                        this.held.extend_from_slice(&new[n..]);
                        n
                    }
                    Scan::Refuse { at, refusal } => {
                        this.refuse(refusal);
                        at
                    }
                };
                buf.set_filled(before + passed);
                if passed > 0 {
                    return Poll::Ready(Ok(()));
                }
            } else {
                // An incomplete head is held: read more behind it.
                if this.clear > 0 {
                    this.held.drain(..this.clear);
                    this.given = 0;
                    this.clear = 0;
                }
                let mut chunk = [0u8; 4096];
                let mut more = ReadBuf::new(&mut chunk);
                if this.read_inner(cx, &mut more)?.is_pending() {
                    return this.poll_head_timer(cx);
                }
                if more.filled().is_empty() {
                    // The client closed inside a head: hyper sees a clean end.
                    this.held.clear();
                    return Poll::Ready(Ok(()));
                }
                this.held.extend_from_slice(more.filled());
                let Some(framer) = this.framer.as_mut() else {
                    this.clear = this.held.len();
                    continue;
                };
                match framer.scan(&this.held) {
                    Scan::Clear(n) => {
                        if framer.passthrough() {
                            this.framer = None;
                        }
                        this.clear = n;
                    }
                    Scan::Refuse { at, refusal } => {
                        this.held.truncate(at);
                        this.refuse(refusal);
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.counts.activity.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.counts.activity.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Drives a connection to its end. It is closed gracefully (in-flight requests finish,
/// then the connection closes) when the process shuts down, or when no byte moved in
/// either direction for `idle` (checked every quarter of it, so an idle connection
/// closes after between 1x and 1.25x `idle`).
/// `graceful` asks the connection to finish its in-flight requests and close.
///
/// The idle tick and the shutdown signal keep the task's waker once polled, so on the
/// wake-ups a busy connection gets (several per request) only the connection is polled;
/// the other two are polled again when one of them has fired, or the waker changed.
pub async fn drive<C>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    counts: Arc<IoCounts>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> C::Output
where
    C: Future,
{
    let mut conn = std::pin::pin!(conn);
    let tick = (idle / 4).max(Duration::from_millis(10));
    let mut last = counts.activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    let mut closing = *shutdown.borrow_and_update();
    if closing {
        graceful(conn.as_mut());
    }
    // Seen by `stop` only; `probe` tells whether it may be ready without polling it.
    let probe = shutdown.clone();
    let mut stop = std::pin::pin!(async move {
        let _ = shutdown.changed().await;
    });
    let mut ticker = std::pin::pin!(tokio::time::sleep(tick));
    let mut polled_with: Option<Waker> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if closing {
                return Poll::Pending;
            }
            let registered = polled_with
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
            if registered && !ticker.is_elapsed() && !probe.has_changed().unwrap_or(true) {
                return Poll::Pending;
            }
            if !registered {
                polled_with = Some(cx.waker().clone());
            }
            if stop.as_mut().poll(cx).is_ready() {
                closing = true;
                graceful(conn.as_mut());
                continue;
            }
            if ticker.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = counts.activity.load(Ordering::Relaxed);
            if now == last {
                quiet += tick;
                if quiet >= idle {
                    closing = true;
                    graceful(conn.as_mut());
                    continue;
                }
            } else {
                last = now;
                quiet = Duration::ZERO;
            }
            ticker.as_mut().reset(tokio::time::Instant::now() + tick);
            // Polled at the top of the next round, which registers it.
            polled_with = None;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A connection that ends as soon as it is asked to close gracefully.
    struct Conn {
        closing: bool,
    }

    impl Future for Conn {
        type Output = Result<(), ()>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            if self.closing {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    fn close(c: Pin<&mut Conn>) {
        c.get_mut().closing = true;
    }

    async fn closed_after(counts: Arc<IoCounts>, idle: Duration) -> Duration {
        let (_tx, rx) = watch::channel(false);
        let started = Instant::now();
        drive(Conn { closing: false }, close, counts, idle, rx)
            .await
            .expect("ends");
        started.elapsed()
    }

    /// Bytes put back are read again before anything else, and what the guard held
    /// back (an incomplete head) still comes after them once it is complete.
    #[tokio::test]
    async fn unread_bytes_come_back_first_and_a_held_head_after_them() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let limits = framing::Limits {
            max_header_bytes: 8192,
            max_headers: 100,
            max_uri_bytes: 4096,
        };
        let (mut io, _) = GuardedIo::new(server, Some(limits), Duration::from_secs(30));
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(first).await.expect("write");
        client
            .write_all(b"GET /b HTTP/1.1\r\n")
            .await
            .expect("write");
        let mut got = vec![0u8; 256];
        let n = io.read(&mut got).await.expect("read");
        assert_eq!(
            &got[..n],
            first,
            "the complete head; the incomplete one is held"
        );
        io.unread(&got[4..n]);
        client.write_all(b"Host: y\r\n\r\n").await.expect("write");
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        let want = [&first[4..], b"GET /b HTTP/1.1\r\nHost: y\r\n\r\n"].concat();
        assert_eq!(all, want);
    }

    // Timer-exact (paused clock): the black-box test over sockets can only bound this
    // loosely on a loaded machine.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_between_one_and_one_and_a_quarter_idle() {
        let idle = Duration::from_secs(4);
        let took = closed_after(Arc::new(IoCounts::default()), idle).await;
        assert!(took >= idle && took <= idle + idle / 4, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_the_close() {
        let idle = Duration::from_secs(4);
        let counts = Arc::new(IoCounts::default());
        let busy = counts.clone();
        // I/O every second for 10 s, then silence.
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                busy.activity.fetch_add(1, Ordering::Relaxed);
            }
        });
        let took = closed_after(counts, idle).await;
        let last_io = Duration::from_secs(10);
        assert!(
            took >= last_io + idle && took <= last_io + idle + idle / 4,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_at_once_while_the_idle_tick_keeps_running() {
        let idle = Duration::from_secs(4);
        let (tx, rx) = watch::channel(false);
        let counts = Arc::new(IoCounts::default());
        let busy = counts.clone();
        // Busy (so not closed as idle) until the shutdown at 7 s, past a tick or more.
        tokio::spawn(async move {
            for _ in 0..7 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                busy.activity.fetch_add(1, Ordering::Relaxed);
            }
            let _ = tx.send(true);
            // Kept open: the close is the signal's doing, not the sender's drop.
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let started = Instant::now();
        drive(Conn { closing: false }, close, counts, idle, rx)
            .await
            .expect("ends");
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_shutdown_sender_closes_too() {
        let (tx, rx) = watch::channel(false);
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(tx);
        });
        let idle = Duration::from_secs(60);
        drive(
            Conn { closing: false },
            close,
            Arc::new(IoCounts::default()),
            idle,
            rx,
        )
        .await
        .expect("ends");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn a_request_with_no_read_since_the_previous_one_was_buffered() {
        let counts = IoCounts::default();
        counts.reads.fetch_add(1, Ordering::Relaxed);
        let buffered = || counts.start_request().buffered;
        assert!(!buffered(), "the first request");
        assert!(buffered(), "no read since: pipelined");
        assert!(buffered(), "still none");
        counts.reads.fetch_add(1, Ordering::Relaxed);
        assert!(!buffered(), "it needed a read of its own");
    }

    /// hyper behind the guard sees exactly what hyper alone sees, for any pipeline of
    /// well-framed requests (no body, `Content-Length`, chunked with extensions and
    /// trailers), whatever size the reads come in: the guard only ever holds bytes back,
    /// it never changes them.
    mod same_as_hyper {
        use super::*;
        use crate::framing::tests::test_requests::request;
        use http_body_util::BodyExt;
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;
        use proptest::prelude::*;
        use tokio::io::AsyncWriteExt;

        type Seen = Vec<(String, String, Vec<u8>)>;

        /// Serves `bytes` with hyper over a duplex pipe whose reads are at most `read`
        /// bytes, and returns the method, target and body of every request hyper parsed.
        fn serve(bytes: &[u8], read: usize, guarded: bool) -> Seen {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (client, server) = tokio::io::duplex(read);
                let seen = Arc::new(Mutex::new(Vec::new()));
                let record = seen.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let method = req.method().to_string();
                        let target = req.uri().to_string();
                        let body = req.into_body().collect().await?.to_bytes().to_vec();
                        record
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((method, target, body));
                        Ok::<_, hyper::Error>(http::Response::new(String::new()))
                    }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.half_close(true);
                let limits = framing::Limits {
                    max_header_bytes: 65536,
                    max_headers: 100,
                    max_uri_bytes: 8192,
                };
                let conn = async move {
                    if guarded {
                        let (io, _) = GuardedIo::new(server, Some(limits), Duration::from_secs(10));
                        let _ = builder.serve_connection(TokioIo::new(io), svc).await;
                    } else {
                        let _ = builder.serve_connection(TokioIo::new(server), svc).await;
                    }
                };
                let bytes = bytes.to_vec();
                let (mut answers, mut requests) = tokio::io::split(client);
                let write = async move {
                    let _ = requests.write_all(&bytes).await;
                    let _ = requests.shutdown().await;
                };
                // Drained meanwhile, so that hyper never waits on a full pipe.
                let drain = async move {
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut answers, &mut sink).await;
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    tokio::join!(conn, write, drain)
                })
                .await;
                seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn hyper_behind_the_guard_sees_what_hyper_alone_sees(
                reqs in proptest::collection::vec(request(), 1..6),
                read in 1usize..300,
            ) {
                let bytes: Vec<u8> = reqs.concat();
                let alone = serve(&bytes, read, false);
                prop_assert_eq!(alone.len(), reqs.len(), "hyper alone parsed them all");
                prop_assert_eq!(serve(&bytes, read, true), alone);
            }

            /// A CL+TE request in the pipeline: behind the guard, hyper sees the requests
            /// before it as hyper alone does, then the stand-in, and nothing after.
            #[test]
            fn behind_the_guard_a_cl_te_request_is_the_last_hyper_sees(
                before in proptest::collection::vec(request(), 0..4),
                after in proptest::collection::vec(request(), 0..3),
                read in 1usize..300,
            ) {
                let clte = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
                let bytes = [before.concat(), clte.to_vec(), after.concat()].concat();
                let guarded = serve(&bytes, read, true);
                let expected = serve(&before.concat(), read, false);
                prop_assert_eq!(guarded.len(), before.len() + 1);
                prop_assert_eq!(&guarded[..before.len()], &expected[..]);
                prop_assert_eq!(
                    &guarded[before.len()],
                    &("GET".to_string(), "/".to_string(), Vec::new())
                );
            }
        }
    }
}
