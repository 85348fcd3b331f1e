//! For the `hostile_*` tests: a gateway in front of a recording backend, assertions on
//! one raw exchange (what the client got, whether the connection closed, what the
//! backend received, header for header), a well-behaved client that keeps measuring
//! answer times while an attack runs, and the admin `/metrics` counters.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use campaign_gate::server::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::backend::{RecordedRequest, RecordingBackend};
use super::client::{RawReply, Req, Resp, connect_from, parse_response, raw};
use super::env::{TENANT, TestEnv, TestEnvBuilder, key_id_of};
use super::refusal::{Refusal, assert_refusal};

/// The `Host` every raw request of these tests sends.
pub const HOST: &str = "gw.test";

/// "Another address": the well-behaved client connects from here, the attacker from
/// `127.0.0.1`.
pub const OTHER_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A gateway in front of a recording backend, with user `alice` (granted the APIs the
/// test asked for) and her key.
pub struct Fixture {
    pub backend: RecordingBackend,
    pub env: TestEnv,
    pub gateway: Gateway,
    pub token: String,
}

impl Fixture {
    /// `alice` granted `grants`, default config.
    pub async fn new(grants: &[&str]) -> Fixture {
        Fixture::with(grants, |b| b).await
    }

    pub async fn with(
        grants: &[&str],
        configure: impl FnOnce(TestEnvBuilder) -> TestEnvBuilder,
    ) -> Fixture {
        let backend = RecordingBackend::start().await;
        let env = configure(TestEnv::builder().upstream(&backend.url())).build();
        let token = env.create_api_user("alice", grants);
        let gateway = env.start_gateway().await;
        Fixture {
            backend,
            env,
            gateway,
            token,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.addr
    }

    /// Sends `request` as is on a new connection.
    pub async fn send(&self, request: impl AsRef<[u8]>) -> RawReply {
        raw(self.gateway.addr, request.as_ref()).await
    }

    /// Asserts that `seen` is exactly `method target`, with exactly the headers the
    /// gateway sets for `alice` calling `api` (Host [`HOST`], `X-Forwarded-*` for a
    /// direct client, a request id, the four identity headers) plus `extra`, in any
    /// order and nothing else.
    #[track_caller]
    pub fn assert_forwarded(
        &self,
        seen: &RecordedRequest,
        method: &str,
        target: &str,
        api: &str,
        extra: &[(&str, &str)],
    ) {
        assert_eq!(
            (seen.method.as_str(), seen.target.as_str()),
            (method, target),
            "request line at the backend"
        );
        let request_id = seen.header("x-request-id").unwrap_or_default();
        assert!(
            !request_id.is_empty() && request_id.len() <= 128,
            "x-request-id {request_id:?}"
        );
        let key_id = key_id_of(&self.token);
        let mut expected: Vec<(String, String)> = [
            ("host", HOST),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", HOST),
            ("x-request-id", request_id.as_str()),
            ("x-campaign-user-id", "alice"),
            ("x-campaign-tenant", TENANT),
            ("x-campaign-api", api),
            ("x-campaign-key-id", key_id.as_str()),
        ]
        .iter()
        .chain(extra)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let mut actual: Vec<(String, String)> = seen
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        expected.sort();
        actual.sort();
        assert_eq!(actual, expected, "headers at the backend");
    }
}

/// The reply is exactly one response, the refusal `expected` (JSON body as in the
/// status table), and the gateway closed the connection after it iff `closed`.
#[track_caller]
pub fn assert_refused_reply(reply: &RawReply, expected: Refusal, closed: bool, case: &str) {
    let responses = reply.responses();
    assert_eq!(
        responses.len(),
        1,
        "{case}: expected one response, got {:?}",
        String::from_utf8_lossy(&reply.bytes)
    );
    assert_refusal(&responses[0], expected, case);
    assert_eq!(reply.closed, closed, "{case}: connection closed");
}

/// One successful (200) response and nothing else; whether the connection closed is
/// returned for the caller to assert.
#[track_caller]
pub fn assert_one_ok(reply: &RawReply, case: &str) -> bool {
    let responses = reply.responses();
    assert_eq!(
        responses.len(),
        1,
        "{case}: expected one response, got {:?}",
        String::from_utf8_lossy(&reply.bytes)
    );
    assert_eq!(responses[0].status, 200, "{case}: {}", responses[0].text());
    reply.closed
}

/// Only complete requests (whose body arrived whole) that the backend received.
pub fn complete_requests(backend: &RecordingBackend) -> Vec<RecordedRequest> {
    backend
        .requests()
        .into_iter()
        .filter(|r| r.body.is_ok())
        .collect()
}

/// Sends `requests` pipelined on one connection from `127.0.0.1` (written while the
/// answers are read) and returns every response.
pub async fn pipelined(addr: SocketAddr, requests: Vec<String>) -> Vec<Resp> {
    let n = requests.len();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        for r in requests {
            write.write_all(r.as_bytes()).await.expect("write");
        }
        write
    });
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let read = tokio::time::timeout_at(deadline, read.read(&mut buf))
            .await
            .expect("all responses within 30 s")
            .expect("read");
        assert!(read > 0, "closed after {} of {n} responses", out.len());
        bytes.extend_from_slice(&buf[..read]);
        let mut used = 0;
        while let Some((resp, len)) = parse_response(&bytes[used..], false) {
            out.push(resp);
            used += len;
        }
        bytes.drain(..used);
    }
    drop(writer.await.expect("writer"));
    out
}

/// A well-formed token of the generated shape that no store knows.
pub fn unknown_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    ))
}

/// The value of an unlabelled metric on the admin listener.
pub async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let resp = Req::get("/metrics").send(admin).await;
    assert_eq!(resp.status, 200, "GET /metrics");
    let text = resp.text();
    text.lines()
        .find_map(|line| {
            let (n, v) = line.split_once(' ')?;
            (n == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}")) as u64
}

/// A well-behaved client running beside an attack, on its own thread and runtime so
/// that the attack's tasks do not delay it: from `from`, one request on a fresh
/// connection every 20 ms, each timed from connect to the complete response.
///
/// Each gateway request is paired with one to a control server: a trivial HTTP
/// server on its own thread that the attack does not touch, sent at the same moment
/// from the same thread. A stall of the whole machine (another process, the
/// hypervisor, the prober's own thread descheduled) delays both; a stall the
/// gateway causes delays only the gateway's answer. [`Prober::finish`] holds the
/// gateway to [`PROMPT`] beyond what the control took, so a shared CI machine's
/// hiccups are not blamed on the gateway and a starved client still fails.
///
/// The control cannot see one stall: the kernel keeping a *busy* gateway worker (or
/// the recording backend's thread) off the CPU while other processes run, as a
/// mostly idle control thread is scheduled first. So the prober also reads, for every
/// thread of the gateway's workers, of the test's tokio runtime and its own, how long it waited
/// on a run queue during the request (`/proc/PID/task/TID/schedstat`, second field)
/// and excuses the longest such wait. Time the gateway spends serving others while
/// it holds the CPU is not excused: that is what the attacks must not cause.
pub struct Prober {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<Probe>>,
}

/// One tick of the well-behaved client: the gateway's answer time (or why it
/// failed) and the control server's.
#[derive(Debug)]
pub struct Probe {
    pub gateway: Result<Duration, String>,
    pub control: Duration,
    /// The longest time one gateway or backend thread waited for a CPU meanwhile.
    pub descheduled: Duration,
}

/// Threads whose waits for a CPU are not the gateway's doing: its per-core workers
/// (`campaign-gate-worker-N`, cut to 15 bytes by the kernel), the test runtime's
/// workers, where the recording backend runs, and the prober's own thread (once the
/// control's answer is in, a wait of the prober delays only the gateway's answer).
const WATCHED_THREADS: [&str; 3] = ["campaign-gate-w", "tokio-runtime-w", PROBER_THREAD];

/// The name of the well-behaved client's thread.
const PROBER_THREAD: &str = "prober";

/// Run-queue wait so far, in ns, of every watched thread of the processes `pids`.
fn run_delays(pids: &[u32]) -> HashMap<(u32, String), u64> {
    let mut out = HashMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !WATCHED_THREADS.iter().any(|w| comm.trim_end() == *w) {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
            if let Some(delay) = stat.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
                out.insert(
                    (*pid, task.file_name().to_string_lossy().into_owned()),
                    delay,
                );
            }
        }
    }
    out
}

/// The longest growth of one thread's run-queue wait between two [`run_delays`].
fn longest_wait(
    before: &HashMap<(u32, String), u64>,
    after: &HashMap<(u32, String), u64>,
) -> Duration {
    let ns = after
        .iter()
        .map(|(k, v)| v.saturating_sub(before.get(k).copied().unwrap_or(*v)))
        .max()
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// How long the well-behaved client may wait for any one answer during an attack.
pub const PROMPT: Duration = Duration::from_millis(100);

impl Prober {
    /// Sends `POST` [`super::EVENTS`] with `token`, which must be granted `events`.
    /// Returns once a first, untimed request got its 200.
    pub fn start(addr: SocketAddr, from: IpAddr, token: &str) -> Prober {
        Prober::start_watching(addr, from, token, None)
    }

    /// [`Prober::start`] for a gateway that runs as the child process `gateway_pid`
    /// (whose workers' waits for a CPU are read too).
    pub fn start_watching(
        addr: SocketAddr,
        from: IpAddr,
        token: &str,
        gateway_pid: Option<u32>,
    ) -> Prober {
        let pids: Vec<u32> = std::iter::once(std::process::id())
            .chain(gateway_pid)
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            super::EVENTS
        );
        let control = control_server();
        let (flag, count) = (stop.clone(), done.clone());
        let (warm, warmed) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(PROBER_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("prober runtime");
                rt.block_on(async move {
                    // Untimed: the first request also fills the gateway's key cache and
                    // upstream pool, which is not what the attack is measured against.
                    let _ = warm.send(probe(addr, from, request.as_bytes()).await);
                    let mut out = Vec::new();
                    while !flag.load(Ordering::Relaxed) {
                        let before = run_delays(&pids);
                        let (gateway, control) = tokio::join!(
                            probe(addr, from, request.as_bytes()),
                            probe(control, from, request.as_bytes())
                        );
                        let descheduled = longest_wait(&before, &run_delays(&pids));
                        let control = control.unwrap_or_else(|e| panic!("control server: {e}"));
                        out.push(Probe {
                            gateway,
                            control,
                            descheduled,
                        });
                        count.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    out
                })
            })
            .expect("prober thread");
        match warmed.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the well-behaved client's first request failed: {e}"),
            Err(e) => panic!("the well-behaved client did not start: {e}"),
        }
        Prober { stop, done, thread }
    }

    /// How many timed requests the client has completed, live: an attack that must
    /// overlap a given number of them runs until this reaches it.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        self.done.clone()
    }

    /// Stops the client and asserts that it sent at least `min` requests and that
    /// every one got 200 within [`PROMPT`] beyond the control server's answer time
    /// at the same tick, or beyond the longest time a gateway or backend thread
    /// waited for a CPU meanwhile. Returns the slowest answer time.
    #[track_caller]
    pub fn finish(self, min: usize, context: &str) -> Duration {
        self.finish_with(min, context, None)
    }

    /// [`Prober::finish`], and the median answer, less the control's at the same tick,
    /// must be within `typical`: for attacks whose harm shows as a steady slowdown
    /// well under [`PROMPT`] rather than as single stalls. (Waits for a CPU are not
    /// subtracted here: a median is not moved by a few stalls, and an unfair worker
    /// makes every thread on the machine wait more.)
    #[track_caller]
    pub fn finish_typical(self, min: usize, context: &str, typical: Duration) -> Duration {
        self.finish_with(min, context, Some(typical))
    }

    #[track_caller]
    fn finish_with(self, min: usize, context: &str, typical: Option<Duration>) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let results = self.thread.join().expect("prober thread");
        assert!(
            results.len() >= min,
            "{context}: the well-behaved client made only {} requests",
            results.len()
        );
        let all = || {
            results
                .iter()
                .map(|p| {
                    let g = p.gateway.as_ref().map(Duration::as_millis);
                    (g, p.control.as_millis(), p.descheduled.as_millis())
                })
                .collect::<Vec<_>>()
        };
        if std::env::var_os("PROBER_DUMP").is_some() {
            eprintln!("{context}: (gateway, control, wait) in ms: {:?}", all());
        }
        let mut slowest = Duration::ZERO;
        for (i, p) in results.iter().enumerate() {
            match &p.gateway {
                Ok(took) => {
                    assert!(
                        *took < PROMPT + p.control.max(p.descheduled),
                        "{context}: well-behaved request {i} of {} took {took:?} (the control \
                         server {:?}, longest wait for a CPU {:?}); all (gateway, control, \
                         wait), in ms: {:?}",
                        results.len(),
                        p.control,
                        p.descheduled,
                        all()
                    );
                    slowest = slowest.max(*took);
                }
                Err(e) => panic!("{context}: well-behaved request {i} failed: {e}"),
            }
        }
        if let Some(typical) = typical {
            let mut own: Vec<Duration> = results
                .iter()
                .filter_map(|p| {
                    let took = p.gateway.as_ref().ok()?;
                    Some(took.saturating_sub(p.control))
                })
                .collect();
            own.sort();
            let median = own[own.len() / 2];
            assert!(
                median <= typical,
                "{context}: the median well-behaved answer took {median:?} beyond the \
                 control's (at most {typical:?}); all (gateway, control, wait), in ms: {:?}",
                all()
            );
        }
        slowest
    }
}

/// A trivial HTTP server on its own thread: reads a request head and answers 200
/// with the two-byte body, then closes. The control beside the gateway in [`Prober`].
fn control_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("control listener");
    let addr = listener.local_addr().expect("control address");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("control runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("control");
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Head and the two-byte body.
                    while !bytes.ends_with(b"{}") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => bytes.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                        )
                        .await;
                });
            }
        });
    });
    addr
}

async fn probe(addr: SocketAddr, from: IpAddr, request: &[u8]) -> Result<Duration, String> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = connect_from(from, addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            bytes.extend_from_slice(&buf[..n]);
            if let Some((resp, _)) = parse_response(&bytes, n == 0) {
                return if resp.status == 200 {
                    Ok(())
                } else {
                    Err(format!("status {}: {}", resp.status, resp.text()))
                };
            }
            if n == 0 {
                return Err(format!(
                    "closed after {:?}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer within 5 s".to_string()),
    }
}
