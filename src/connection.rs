//! One downstream connection's lifetime: the per-address connection limit, the idle
//! timeout, and the graceful close on shutdown. HTTP itself is hyper's.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

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

/// What a connection's stream counts: every read and write (so an idle connection can
/// be told from a busy one without a clock read per I/O), and reads alone (so a
/// request that arrived without a read of its own, one already buffered behind the
/// previous one, can be told from the others).
#[derive(Debug, Default)]
pub struct IoCounts {
    activity: AtomicU64,
    reads: AtomicU64,
    /// `reads` when the last request started, plus one (0: no request yet).
    seen: AtomicU64,
}

impl IoCounts {
    /// Called as a request starts: true when no read happened since the previous
    /// request on this connection started, i.e. this one was already buffered
    /// (HTTP/1 pipelining, or several HTTP/2 streams in one read).
    pub fn buffered_request(&self) -> bool {
        let now = self.reads.load(Ordering::Relaxed) + 1;
        self.seen.swap(now, Ordering::Relaxed) == now
    }
}

/// A stream that keeps [`IoCounts`].
pub struct ActivityIo<T> {
    inner: T,
    counts: Arc<IoCounts>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T) -> (ActivityIo<T>, Arc<IoCounts>) {
        let counts = Arc::new(IoCounts::default());
        (
            ActivityIo {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.counts.activity.fetch_add(1, Ordering::Relaxed);
            this.counts.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
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
pub async fn drive<C, E>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    counts: Arc<IoCounts>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let tick = (idle / 4).max(Duration::from_millis(10));
    let mut last = counts.activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    let mut closing = *shutdown.borrow();
    if closing {
        graceful(conn.as_mut());
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = tokio::time::sleep(tick), if !closing => {
                let now = counts.activity.load(Ordering::Relaxed);
                if now == last {
                    quiet += tick;
                    if quiet >= idle {
                        closing = true;
                        graceful(conn.as_mut());
                    }
                } else {
                    last = now;
                    quiet = Duration::ZERO;
                }
            }
        }
    }
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

    #[test]
    fn a_request_with_no_read_since_the_previous_one_was_buffered() {
        let counts = IoCounts::default();
        counts.reads.fetch_add(1, Ordering::Relaxed);
        assert!(!counts.buffered_request(), "the first request");
        assert!(counts.buffered_request(), "no read since: pipelined");
        assert!(counts.buffered_request(), "still none");
        counts.reads.fetch_add(1, Ordering::Relaxed);
        assert!(!counts.buffered_request(), "it needed a read of its own");
    }
}
