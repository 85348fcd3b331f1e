//! Issue 4, point 5: slow and greedy clients. Each attack is cut off by the limit made
//! for it (short limits configured here), while a well-behaved client on another
//! address keeps getting every answer within 100 ms, measured per request.
//!
//! The tests of this file take turns (one lock), so that one attack's load does not
//! count against another test's 100 ms.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use campaign_gate::server::Gateway;
use common::env::TestEnvBuilder;
use common::hostile::{HOST, OTHER_ADDRESS, Prober, assert_refused_reply, metric, pipelined};
use common::refusal::{HEADERS_TOO_LARGE, REQUEST_TIMEOUT, URI_TOO_LONG};
use common::{EVENTS, RecordingBackend, TestEnv, parse_response, raw, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The `campaigns` API, which `mallory` is not granted.
const CAMPAIGNS: &str = "/campaignapi/resources/v3/campaigncontents/4711";

/// A gateway with two users granted `events`: `mallory` attacks from `127.0.0.1`,
/// `alice` is the well-behaved client on [`OTHER_ADDRESS`].
struct Arena {
    backend: RecordingBackend,
    _env: TestEnv,
    gateway: Gateway,
    mallory: String,
    alice: String,
}

impl Arena {
    async fn new(configure: impl FnOnce(TestEnvBuilder) -> TestEnvBuilder) -> Arena {
        let backend = RecordingBackend::start().await;
        let env = configure(TestEnv::builder().upstream(&backend.url())).build();
        let mallory = env.create_api_user("mallory", &["events"]);
        let alice = env.create_api_user("alice", &["events"]);
        let gateway = env.start_gateway().await;
        Arena {
            backend,
            _env: env,
            gateway,
            mallory,
            alice,
        }
    }

    fn prober(&self) -> Prober {
        Prober::start(self.gateway.addr, OTHER_ADDRESS, &self.alice)
    }

    /// The backend's requests that came from the attacker, whole or not.
    fn mallorys_requests(&self) -> Vec<common::RecordedRequest> {
        self.backend
            .requests()
            .into_iter()
            .filter(|r| r.header_all("x-campaign-user-id") == ["mallory"])
            .collect()
    }
}

/// Runs an attack on its own thread and runtime, apart from the recording backend that
/// the well-behaved client's requests go through, and returns its outcome.
async fn on_own_thread<F>(attack: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("attacker runtime")
            .block_on(attack)
    });
    tokio::task::spawn_blocking(move || thread.join().expect("attacker thread"))
        .await
        .expect("join the attacker")
}

/// Reads until the peer closes the connection (EOF or reset) or `within` passes.
/// Returns what arrived and when the connection closed, if it did.
async fn read_until_closed(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    within: Duration,
) -> (Vec<u8>, Option<Instant>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (bytes, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (bytes, Some(Instant::now())),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_drip_is_cut_by_header_read_timeout() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "header_read_timeout", "\"3s\"")).await;
    let prober = arena.prober();
    let request = format!(
        "GET {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\r\n",
        arena.mallory
    );
    let stream = TcpStream::connect(arena.gateway.addr)
        .await
        .expect("connect");
    let (mut read, write) = stream.into_split();
    let started = Instant::now();
    // One byte every 2 s: each gap is short of any idle timeout, the whole head never is.
    let closed_after =
        drip_until_cut(&mut read, write, request, Duration::from_secs(2), 15).await - started;
    assert!(
        closed_after >= Duration::from_millis(2900) && closed_after < Duration::from_millis(4500),
        "closed after {closed_after:?}; header_read_timeout is 3 s"
    );
    assert!(
        arena.mallorys_requests().is_empty(),
        "the dripped head reached the backend"
    );
    let slowest = prober.finish(20, "header drip");
    eprintln!("header drip: cut after {closed_after:?}; slowest well-behaved answer {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_drip_is_cut_by_body_read_timeout() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "body_read_timeout", "\"500ms\"")).await;
    let prober = arena.prober();
    let head = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 10\r\n\r\n",
        arena.mallory
    );
    let stream = TcpStream::connect(arena.gateway.addr)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.expect("write head");
    let started = Instant::now();
    // One body byte per second.
    let drip = tokio::spawn(async move {
        for _ in 0..10 {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let (bytes, closed_at) = read_until_closed(&mut read, Duration::from_secs(15)).await;
    drip.abort();
    let closed_after =
        closed_at.expect("the gateway never closed the dripping connection") - started;
    let reply = common::RawReply {
        bytes,
        closed: true,
    };
    assert_refused_reply(&reply, REQUEST_TIMEOUT, true, "body at 1 byte/s");
    assert!(
        closed_after >= Duration::from_millis(450) && closed_after < Duration::from_millis(2500),
        "closed after {closed_after:?}; body_read_timeout is 500 ms"
    );
    for r in arena.mallorys_requests() {
        assert!(
            r.body.is_err(),
            "the dripped body reached the backend whole: {r:?}"
        );
    }
    // 10 answers per second of attack (the attack lasts about body_read_timeout).
    let min = usize::try_from(closed_after.as_millis() / 100).unwrap_or(usize::MAX);
    prober.finish(min.min(10), "body drip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_drip_faster_than_body_read_timeout_is_bounded_by_request_timeout() {
    // `body_read_timeout` limits each gap, not the whole body: a byte every 300 ms
    // never trips 1 s. What bounds it is `request_timeout` (no response head from the
    // backend, which waits for the body), answered 504 `upstream_timeout`: the attack
    // is cut, but blamed on the backend (see docs/security.md).
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| {
        b.set("server", "body_read_timeout", "\"1s\"")
            .set("server", "request_timeout", "\"2s\"")
    })
    .await;
    let prober = arena.prober();
    let head = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 100\r\n\r\n",
        arena.mallory
    );
    let stream = TcpStream::connect(arena.gateway.addr)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.expect("write head");
    let started = Instant::now();
    let drip = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let (bytes, _) = read_until_closed(&mut read, Duration::from_secs(10)).await;
    let answered_after = started.elapsed();
    drip.abort();
    let (resp, _) = parse_response(&bytes, true).expect("a response");
    // Normally 504 at `request_timeout`. On a loaded machine one of the 300 ms gaps can
    // stretch past 1 s, and then the gap timer answers 408 first: either way the drip is
    // cut, by one of its two bounds, and never reaches the backend whole.
    match resp.status.as_u16() {
        504 => assert!(
            answered_after >= Duration::from_millis(1900),
            "504 after {answered_after:?}, before request_timeout (2 s)"
        ),
        408 => assert!(
            answered_after >= Duration::from_millis(900),
            "408 after {answered_after:?}, before body_read_timeout (1 s)"
        ),
        other => panic!("{other}: {}", resp.text()),
    }
    assert!(
        answered_after < Duration::from_secs(4),
        "answered after {answered_after:?}; request_timeout is 2 s"
    );
    for r in arena.mallorys_requests() {
        assert!(
            r.body.is_err(),
            "the dripped body reached the backend whole: {r:?}"
        );
    }
    // 20 answers over the 2 s to a 504, i.e. 10 per second of attack, whichever bound
    // cut it.
    let min = usize::try_from(answered_after.as_millis() / 100).unwrap_or(usize::MAX);
    prober.finish(min.min(20), "fast body drip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_header_block_gets_431() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b).await;
    let prober = arena.prober();
    let mut request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n",
        arena.mallory
    );
    let filler = "a".repeat(16 * 1024 - 16);
    for i in 0..64 {
        request.push_str(&format!("X-Fill-{i:02}: {filler}\r\n"));
    }
    request.push_str("\r\n");
    assert!(request.len() >= 1024 * 1024, "{} bytes", request.len());
    // One after another, for a second and until the well-behaved client made 10
    // requests.
    let addr = arena.gateway.addr;
    let probes = prober.counter();
    let replies = on_own_thread(async move {
        let started = Instant::now();
        let mut replies = Vec::new();
        while started.elapsed() < Duration::from_secs(1) || probes.load(Ordering::Relaxed) < 10 {
            replies.push(raw(addr, request.as_bytes()).await);
        }
        replies
    })
    .await;
    for reply in &replies {
        assert_refused_reply(reply, HEADERS_TOO_LARGE, true, "1 MB of headers");
    }
    let sent = replies.len();
    assert!(
        arena.mallorys_requests().is_empty(),
        "1 MB of headers reached the backend"
    );
    let slowest = prober.finish(10, "1 MB of headers");
    eprintln!("1 MB of headers: {sent} refused; slowest well-behaved answer {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_get_431() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "max_headers", "20")).await;
    let mut request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n",
        arena.mallory
    );
    for i in 0..18 {
        request.push_str(&format!("X-N-{i}: 1\r\n"));
    }
    let reply = raw(arena.gateway.addr, format!("{request}\r\n").as_bytes()).await;
    assert_refused_reply(&reply, HEADERS_TOO_LARGE, true, "21 headers, max 20");
    arena.backend.assert_untouched("too many headers");
    // 20 is fine.
    let lines: String = request
        .lines()
        .take(20)
        .map(|l| format!("{l}\r\n"))
        .collect();
    let reply = raw(arena.gateway.addr, format!("{lines}\r\n").as_bytes()).await;
    assert_eq!(reply.response().status, 200, "20 headers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_over_max_uri_bytes_gets_414() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "max_uri_bytes", "1024")).await;
    let send = |target: String| {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\n\r\n",
            arena.mallory
        );
        async move { raw(arena.gateway.addr, request.as_bytes()).await }
    };
    let pad = |total: usize| {
        let q = format!("{EVENTS}?q=");
        format!("{q}{}", "a".repeat(total - q.len()))
    };
    let reply = send(pad(1025)).await;
    assert_refused_reply(&reply, URI_TOO_LONG, true, "1025-byte target");
    arena.backend.assert_untouched("long target");
    let reply = send(pad(1024)).await;
    assert_eq!(reply.response().status, 200, "1024-byte target");
}

/// Writes `request` and reads its whole response head (a response without a body, or
/// whose body came in the same reads); returns its status.
async fn exchange(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    request: &str,
) -> u16 {
    write.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some((resp, _)) = parse_response(&bytes, false) {
            return resp.status.as_u16();
        }
        let n = read.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the response");
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// Sends one request on a new connection, reads its response, then keeps the
/// connection idle; returns how long after the response the gateway closed it.
async fn idle_after_response(addr: SocketAddr, token: &str) -> Duration {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    exchange(&mut read, &mut write, &request).await;
    let answered = Instant::now();
    let (rest, closed) = read_until_closed(&mut read, Duration::from_secs(10)).await;
    assert!(
        rest.is_empty(),
        "more bytes: {:?}",
        String::from_utf8_lossy(&rest)
    );
    closed.expect("the idle connection was never closed") - answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_is_cut_by_the_shorter_of_header_read_and_idle_timeout() {
    // The guard arms `header_read_timeout` as soon as it waits for the next request head,
    // so on HTTP/1 an idle keep-alive connection also ends when that runs out.
    let _turn = ONE_AT_A_TIME.lock().await;
    for (header_read, idle) in [("1s", "5s"), ("5s", "1s")] {
        let arena = Arena::new(|b| {
            b.set(
                "server",
                "header_read_timeout",
                &format!("\"{header_read}\""),
            )
            .set("server", "idle_timeout", &format!("\"{idle}\""))
        })
        .await;
        let after = idle_after_response(arena.gateway.addr, &arena.mallory).await;
        assert!(
            after >= Duration::from_millis(950) && after < Duration::from_millis(1600),
            "header_read_timeout {header_read}, idle_timeout {idle}: closed after {after:?}"
        );
    }
}

/// Sends `head` on `write` one byte every `gap`, until the connection fails.
async fn drip(mut write: tokio::net::tcp::OwnedWriteHalf, head: String, gap: Duration) {
    for byte in head.as_bytes() {
        if write.write_all(&[*byte]).await.is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
}

/// Drips `head` (see [`drip`]) until the gateway closes the connection, which it must
/// do within `within_s` seconds and without answering (a timed-out head gets none);
/// returns when it closed.
async fn drip_until_cut(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    write: tokio::net::tcp::OwnedWriteHalf,
    head: String,
    gap: Duration,
    within_s: u64,
) -> Instant {
    let dripping = tokio::spawn(drip(write, head, gap));
    let (bytes, closed_at) = read_until_closed(read, Duration::from_secs(within_s)).await;
    dripping.abort();
    assert!(
        bytes.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    closed_at.expect("the gateway never closed the dripping connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_head_dripped_is_cut_by_header_read_timeout() {
    // The timeout holds for every head of a keep-alive connection, not only its first:
    // counted from when the gateway waits for the head, after the previous response.
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "header_read_timeout", "\"1s\"")).await;
    let stream = TcpStream::connect(arena.gateway.addr)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n\r\n",
        arena.mallory
    );
    for _ in 0..2 {
        assert_eq!(exchange(&mut read, &mut write, &request).await, 200);
        // Within the timeout between requests: the connection stays open.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let answered = Instant::now() - Duration::from_millis(500);
    // The third head, one byte every 300 ms: each gap is short, the head never completes.
    let after =
        drip_until_cut(&mut read, write, request, Duration::from_millis(300), 10).await - answered;
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_millis(1600),
        "closed {after:?} after the second response; header_read_timeout is 1 s"
    );
    assert_eq!(
        arena.mallorys_requests().len(),
        2,
        "only the two whole requests reach the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_header_read_timeout_still_answers_on_keep_alive() {
    // The header timer runs only while a head is awaited: a request the backend takes
    // longer than `header_read_timeout` to answer is not cut, nor is the next one on
    // the same connection.
    let _turn = ONE_AT_A_TIME.lock().await;
    let backend = RecordingBackend::builder()
        .delay(Duration::from_millis(1500))
        .start()
        .await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("server", "header_read_timeout", "\"1s\"")
        .build();
    let token = env.create_api_user("slowpoke", &["events"]);
    let gateway = env.start_gateway().await;
    let stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    for (i, body) in ["", "hello"].into_iter().enumerate() {
        let request = format!(
            "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            exchange(&mut read, &mut write, &request).await,
            200,
            "request {i}"
        );
    }
    assert_eq!(backend.requests().len(), 2);
}

/// Opens `n` connections from `127.0.0.1` that never send a byte, 50 every 20 ms
/// (2,500 a second, in small bursts under the listen backlog), and watches each until
/// the gateway closes it.
/// Returns, per connection, how long after its connect it was closed (`None`: still
/// open after `within`).
async fn idle_flood(addr: SocketAddr, n: usize, within: Duration) -> Vec<Option<Duration>> {
    let mut watchers = Vec::with_capacity(n);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for batch in 0..n.div_ceil(50) {
        pace.tick().await;
        let mut connects = Vec::new();
        for _ in (batch * 50)..((batch + 1) * 50).min(n) {
            connects.push(tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let opened = Instant::now();
                (stream, opened)
            }));
        }
        for c in connects {
            let (stream, opened) = c.await.expect("connect task");
            watchers.push(tokio::spawn(async move {
                let (mut read, _write) = stream.into_split();
                let (_, closed) = read_until_closed(&mut read, within).await;
                closed.map(|t| t - opened)
            }));
        }
    }
    let mut out = Vec::with_capacity(n);
    for w in watchers {
        out.push(w.await.expect("watcher"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_are_cut_by_address_limit_and_idle_timeout() {
    // 10,000 client sockets here and as many accepted ones would pass the fd limit of
    // one process (20,000), so the gateway runs as its own process.
    let _turn = ONE_AT_A_TIME.lock().await;
    let backend = RecordingBackend::start().await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("server", "max_connections_per_ip", "2000")
        .set("server", "idle_timeout", "\"5s\"")
        .set("server", "header_read_timeout", "\"30s\"")
        .build();
    let alice = env.create_api_user("alice", &["events"]);
    let server = env.spawn_serve();
    let prober =
        Prober::start_watching(server.addr, OTHER_ADDRESS, &alice, Some(server.child.id()));
    let started = Instant::now();
    let flood = tokio::spawn(on_own_thread(idle_flood(
        server.addr,
        10_000,
        Duration::from_secs(20),
    )));
    // While the flood is held: at most the per-address limit is open (plus the
    // prober's one).
    let mut peak_open = 0;
    while !flood.is_finished() && started.elapsed() < Duration::from_secs(5) {
        peak_open =
            peak_open.max(metric(server.admin_addr, "campaign_gate_open_connections").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = flood.await.expect("flood");
    let slowest = prober.finish(50, "10,000 idle connections");
    let refused_at_once = closed
        .iter()
        .filter(|c| c.is_some_and(|d| d < Duration::from_millis(500)))
        .count();
    let held: Vec<Duration> = closed
        .iter()
        .filter_map(|c| *c)
        .filter(|d| *d >= Duration::from_millis(500))
        .collect();
    let never = closed.iter().filter(|c| c.is_none()).count();
    eprintln!(
        "idle flood: {refused_at_once} refused at once, {} held then cut, {never} never closed, \
         peak open {peak_open}, slowest well-behaved answer {slowest:?}",
        held.len()
    );
    assert_eq!(never, 0, "connections the gateway never closed");
    assert!(peak_open <= 2001, "{peak_open} connections open at once");
    assert!(
        refused_at_once >= 7_000,
        "only {refused_at_once} of 10,000 refused by the per-address limit"
    );
    // Cut by idle_timeout (5 s), not by header_read_timeout (30 s). The gateway closes
    // between 1x and 1.25x idle_timeout (timer-exact in connection::tests); seen from
    // this end, 10,000 sockets watched by one thread, the close can be noticed a
    // couple of seconds late on a loaded machine (7.7 s was seen at load average 9).
    for d in &held {
        assert!(
            *d >= Duration::from_millis(4900) && *d < Duration::from_secs(10),
            "an idle connection was cut after {d:?}; idle_timeout is 5 s"
        );
    }
    let refused = metric(server.admin_addr, "campaign_gate_connections_refused_total").await;
    assert!(
        refused as usize >= refused_at_once,
        "metric says {refused} refused"
    );
    wait_until(Duration::from_secs(5), || async {
        metric(server.admin_addr, "campaign_gate_open_connections").await <= 1
    })
    .await
    .expect("every idle connection released its slot");
    let users: Vec<Vec<String>> = backend
        .requests()
        .iter()
        .map(|r| r.header_all("x-campaign-user-id"))
        .collect();
    assert!(
        users.iter().all(|u| u == &["alice"]),
        "only the well-behaved client's requests reach the backend: {users:?}"
    );
}

/// Raw HTTP/2 frames: enough to open, reset and watch streams without a client
/// library's flow control or concurrency limits getting in the way.
mod frames {
    use bytes::{BufMut, Bytes, BytesMut};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const END_HEADERS: u8 = 0x4;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("frame fits");
        out.put_slice(&len.to_be_bytes()[1..]);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.put_slice(payload);
    }

    /// HPACK integer with an `n`-bit prefix whose high bits are `first`.
    fn integer(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | u8::try_from(value).expect("small"));
            return;
        }
        out.push(first | u8::try_from(max).expect("small"));
        let mut rest = value - max;
        while rest >= 128 {
            out.push(u8::try_from(rest % 128).expect("7 bits") | 0x80);
            rest /= 128;
        }
        out.push(u8::try_from(rest).expect("7 bits"));
    }

    /// A literal header field without indexing whose name is static-table entry `name`.
    fn literal(out: &mut Vec<u8>, name: usize, value: &str) {
        integer(out, 0x00, 4, name);
        integer(out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }

    /// A header block for `method` (2 = GET, 3 = POST, static indexes) on `path`.
    pub fn request_block(post: bool, path: &str, token: Option<&str>) -> Vec<u8> {
        let mut block = vec![if post { 0x83 } else { 0x82 }, 0x86];
        literal(&mut block, 4, path);
        literal(&mut block, 1, super::HOST);
        if let Some(token) = token {
            literal(&mut block, 23, &format!("Bearer {token}"));
        }
        block
    }

    /// What the server sent: RST_STREAM codes, the GOAWAY code, HEADERS count.
    #[derive(Debug, Default)]
    pub struct Seen {
        pub resets: Vec<(u32, u32)>,
        pub goaway: Option<u32>,
        pub headers: usize,
    }

    pub fn parse(mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while data.len() >= 9 {
            let len = usize::from(data[0]) << 16 | usize::from(data[1]) << 8 | usize::from(data[2]);
            if data.len() < 9 + len {
                break;
            }
            let kind = data[3];
            let stream = u32::from_be_bytes([data[5], data[6], data[7], data[8]]) & 0x7fff_ffff;
            let payload = &data[9..9 + len];
            match kind {
                HEADERS => seen.headers += 1,
                RST_STREAM if len == 4 => seen.resets.push((
                    stream,
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                )),
                GOAWAY if len >= 8 => {
                    seen.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                _ => {}
            }
            data = &data[9 + len..];
        }
        seen
    }

    pub fn start() -> BytesMut {
        let mut out = BytesMut::new();
        out.put_slice(PREFACE);
        frame(&mut out, SETTINGS, 0, 0, &[]);
        out
    }

    pub fn freeze(out: BytesMut) -> Bytes {
        out.freeze()
    }
}

/// Writes `bytes` on a new connection (without waiting for the gateway to read them
/// all) and reads until the gateway closes it or `within` passes.
async fn h2_exchange(addr: SocketAddr, bytes: Bytes, within: Duration) -> (Vec<u8>, bool) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&bytes).await;
        write
    });
    let (got, closed) = read_until_closed(&mut read, within).await;
    writer.abort();
    (got, closed.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_of_1000_streams_is_cut_off() {
    // 1,000 streams opened and reset at once on one connection, written in one go;
    // repeated on new connections for a second (and until the prober made 20 requests), so the well-behaved client's requests
    // overlap the floods.
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b).await;
    let prober = arena.prober();
    let mut out = frames::start();
    let block = frames::request_block(true, EVENTS, Some(&arena.mallory));
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        frames::frame(&mut out, frames::HEADERS, frames::END_HEADERS, id, &block);
        frames::frame(
            &mut out,
            frames::RST_STREAM,
            0,
            id,
            &frames::CANCEL.to_be_bytes(),
        );
    }
    let flood = frames::freeze(out);
    let addr = arena.gateway.addr;
    let probes = prober.counter();
    let outcomes = on_own_thread(async move {
        let started = Instant::now();
        let mut outcomes = Vec::new();
        // For a second and until the well-behaved client made 20 requests.
        // (30 s is a backstop: the prober's count then fails the test.)
        while (started.elapsed() < Duration::from_secs(1) || probes.load(Ordering::Relaxed) < 20)
            && started.elapsed() < Duration::from_secs(30)
        {
            let sent = Instant::now();
            let (got, closed) = h2_exchange(addr, flood.clone(), Duration::from_secs(5)).await;
            outcomes.push((frames::parse(&got), closed, sent.elapsed()));
        }
        outcomes
    })
    .await;
    for (i, (seen, closed, took)) in outcomes.iter().enumerate() {
        assert_eq!(
            seen.goaway,
            Some(frames::ENHANCE_YOUR_CALM),
            "flood {i}: no GOAWAY(ENHANCE_YOUR_CALM): {seen:?}"
        );
        assert!(closed, "flood {i}: the connection was left open");
        assert!(
            *took < Duration::from_secs(2),
            "flood {i}: cut off only after {took:?}"
        );
    }
    let floods = outcomes.len();
    // Streams reset before they were served never complete at the backend.
    for r in arena.mallorys_requests() {
        assert!(
            r.body.is_err(),
            "a reset stream reached the backend whole: {r:?}"
        );
    }
    let slowest = prober.finish(20, "h2 rapid reset");
    eprintln!(
        "rapid reset: {floods} floods of 1,000 streams; slowest well-behaved answer {slowest:?}"
    );
    // h2 itself still works for a well-behaved h2 client on another address once the
    // floods are over. (The 100 ms bound *during* the attack is the prober's, above;
    // this new connection may wait behind the close of the last flood connections.)
    h2_request_ok(arena.gateway.addr, &arena.alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_beyond_max_concurrent_streams_are_refused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b.set("server", "h2_max_concurrent_streams", "5")).await;
    let prober = arena.prober();
    // 20 POSTs whose bodies never come: every stream stays open.
    let mut out = frames::start();
    let block = frames::request_block(true, EVENTS, Some(&arena.mallory));
    for i in 0..20u32 {
        frames::frame(
            &mut out,
            frames::HEADERS,
            frames::END_HEADERS,
            2 * i + 1,
            &block,
        );
    }
    let (got, _) = h2_exchange(
        arena.gateway.addr,
        frames::freeze(out),
        Duration::from_secs(2),
    )
    .await;
    let seen = frames::parse(&got);
    let refused: Vec<u32> = seen
        .resets
        .iter()
        .filter(|(_, code)| *code == frames::REFUSED_STREAM)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(refused.len(), 15, "streams refused: {seen:?}");
    assert!(
        refused.iter().all(|id| *id > 9),
        "one of the first five was refused: {refused:?}"
    );
    let forwarded = arena.mallorys_requests();
    assert!(
        forwarded.len() <= 5,
        "{} streams forwarded",
        forwarded.len()
    );
    assert!(
        forwarded.iter().all(|r| r.body.is_err()),
        "a stream without a body completed at the backend"
    );
    prober.finish(10, "h2 concurrency");
}

/// One request over h2c with prior knowledge from [`OTHER_ADDRESS`], with the `h2`
/// crate, on a new connection: 200 within [`AFTER_ATTACK`].
/// How soon a new connection must be served once an attack has ended.
const AFTER_ATTACK: Duration = Duration::from_secs(1);

async fn h2_request_ok(addr: SocketAddr, token: &str) {
    let started = Instant::now();
    let tcp = common::connect_from(OTHER_ADDRESS, addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::post(format!("http://{HOST}{EVENTS}"))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .expect("request");
    let (response, mut body) = client.send_request(request, false).expect("send");
    body.send_data(Bytes::from_static(b"{}"), true)
        .expect("body");
    let response = response.await.expect("h2 response");
    assert_eq!(response.status(), 200);
    let took = started.elapsed();
    assert!(took < AFTER_ATTACK, "h2 request took {took:?}");
    drop(client);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipelining_does_not_starve_other_clients() {
    // 10 connections each write 1,000 requests at once (refused 403 by the gateway,
    // so every one is answered from the buffer without waiting on anything): a
    // connection with requests already buffered must not keep its worker from the
    // other connections' I/O.
    let _turn = ONE_AT_A_TIME.lock().await;
    let arena = Arena::new(|b| b).await;
    let prober = arena.prober();
    let request = format!(
        "GET {CAMPAIGNS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\r\n",
        arena.mallory
    );
    let addr = arena.gateway.addr;
    let probes = prober.counter();
    let statuses = on_own_thread(async move {
        let mut statuses = Vec::new();
        // Rounds of 10 x 1,000, until the well-behaved client made 20 requests.
        while statuses.is_empty() || probes.load(Ordering::Relaxed) < 20 {
            let round: Vec<_> = (0..10)
                .map(|_| tokio::spawn(pipelined(addr, vec![request.clone(); 1000])))
                .collect();
            for r in round {
                let responses = r.await.expect("flood connection");
                statuses.extend(responses.iter().map(|r| r.status.as_u16()));
            }
        }
        statuses
    })
    .await;
    assert!(
        statuses.iter().all(|s| *s == 403),
        "not all refused 403: {:?}",
        statuses.iter().find(|s| **s != 403)
    );
    assert!(
        arena.mallorys_requests().is_empty(),
        "a pipelined request reached the backend"
    );
    // Besides the 100 ms bound: with the worker's turns unfair, the typical answer
    // waits behind a round of pipelined requests (median 40-45 ms on a quiet machine
    // in a debug build, against 1 ms with fair turns).
    let slowest = prober.finish_typical(20, "deep pipelining", Duration::from_millis(15));
    eprintln!(
        "deep pipelining: {} requests refused; slowest well-behaved answer {slowest:?}",
        statuses.len()
    );
}
