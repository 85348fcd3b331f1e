//! Issue 2, point 1: a granted key reaches the backend, and what the backend sees is
//! the canonical path, the query as sent, the gateway's identity headers and nothing
//! the client should not control; bodies stream through byte-identical both ways.

mod common;

use std::time::Duration;

use campaign_gate::server::Gateway;
use common::env::TestEnvBuilder;
use common::{EVENTS, RecordingBackend, Req, TENANT, TestEnv, key_id_of, payload, raw, sha256_hex};

/// Headers the backend must never see from a client: hop-by-hop ones (including the
/// one named by `Connection`) and method overrides.
const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "x-drop-me",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "authorization",
];

const IDENTITY_HEADERS: &[&str] = &[
    "x-campaign-user-id",
    "x-campaign-tenant",
    "x-campaign-api",
    "x-campaign-key-id",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_key_reaches_backend_with_canonical_path_and_clean_headers() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    // `%65` is an escaped `e`: the gateway must decode it and forward the decoded path.
    // The query is odd but valid and must arrive exactly as sent, escapes included.
    let query = "?a=%2F&b=1&a=2&empty=&flag&t=%7e";
    let body = r#"{"event":"signup","n":1}"#;
    let resp = Req::post(&format!("/campaignapi/resources/v3/%65vents{query}"))
        .bearer(&token)
        .header("host", "api.example.test")
        .header("content-type", "application/json")
        .header("X-Campaign-User-Id", "evil")
        .header("x-CAMPAIGN-tenant", "evil")
        .header("X-Campaign-Api", "evil")
        .header("X-Campaign-Key-Id", "evil")
        .header("X-Campaign-Role", "admin")
        .header("Connection", "keep-alive, X-Drop-Me")
        .header("X-Drop-Me", "1")
        .header("Keep-Alive", "timeout=5")
        .header("TE", "trailers")
        .header("Trailer", "X-Checksum")
        .header("Proxy-Connection", "keep-alive")
        .header("Proxy-Authorization", "Basic dXNlcjpwYXNz")
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X-HTTP-Method", "DELETE")
        .header("X-Method-Override", "DELETE")
        .header("X-Kept", "one")
        .header("X-Kept", "two")
        .body(body)
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "backend ok");

    let seen = backend.single_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, format!("{EVENTS}{query}"));

    assert_eq!(seen.header("x-campaign-user-id").as_deref(), Some("alice"));
    assert_eq!(seen.header("x-campaign-tenant").as_deref(), Some(TENANT));
    assert_eq!(seen.header("x-campaign-api").as_deref(), Some("events"));
    let key_id = key_id_of(&token);
    assert_eq!(
        seen.header("x-campaign-key-id").as_deref(),
        Some(key_id.as_str())
    );
    let listed = env.cli_json(&["keys", "list", "alice"]);
    assert_eq!(
        listed[0]["key_id"].as_str(),
        Some(key_id.as_str()),
        "{listed}"
    );

    let identity: Vec<&String> = seen
        .headers
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("x-campaign-"))
        .collect();
    assert_eq!(
        identity, IDENTITY_HEADERS,
        "only the gateway's identity headers, once each"
    );
    for name in STRIPPED_REQUEST_HEADERS {
        assert!(
            !seen.has_header(name),
            "backend received {name}: {:?}",
            seen.header_all(name)
        );
    }

    assert_eq!(seen.header_all("x-kept"), ["one", "two"]);
    assert_eq!(seen.header("host").as_deref(), Some("api.example.test"));
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(seen.body(), body.as_bytes());
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_upload_streams_through_byte_identical() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let data = payload(5 * 1024 * 1024, 0x5eed);

    // Chunked, in frames of 64 KiB: the gateway cannot know the length up front.
    let resp = Req::post(EVENTS)
        .bearer(&token)
        .chunked(&data, 64 * 1024)
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    // With a Content-Length as well.
    let resp = Req::post(EVENTS)
        .bearer(&token)
        .body(data.clone())
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    for (seen, how) in requests.iter().zip(["chunked", "content-length"]) {
        let got = seen.body();
        assert_eq!(
            (got.len(), sha256_hex(got)),
            (data.len(), sha256_hex(&data)),
            "{how} upload arrived changed"
        );
        if let Some(length) = seen.header("content-length") {
            assert_eq!(length, data.len().to_string(), "{how}");
        }
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_download_streams_through_byte_identical() {
    let data = payload(5 * 1024 * 1024, 0xd0_4e);
    let backend = RecordingBackend::builder()
        .streamed_body(data.clone(), 64 * 1024)
        .start()
        .await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["campaigns"]);
    let gateway = env.start_gateway().await;

    let resp = Req::get("/campaignapi/resources/v3/campaigncontents/42")
        .bearer(&token)
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        (resp.body.len(), sha256_hex(&resp.body)),
        (data.len(), sha256_hex(&data))
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let backend = RecordingBackend::builder()
        .header("connection", "x-backend-secret")
        .header("x-backend-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authenticate", "Basic realm=\"backend\"")
        .header("x-backend-kept", "yes")
        .start()
        .await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-backend-kept"), Some("yes"));
    for name in ["x-backend-secret", "keep-alive", "proxy-authenticate"] {
        assert!(
            resp.header(name).is_none(),
            "client received {name}: {:?}",
            resp.headers
        );
    }
    if let Some(connection) = resp.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-backend-secret"),
            "backend's Connection header leaked: {connection}"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_when_sane_and_generated_otherwise() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    let resp = Req::post(EVENTS)
        .bearer(&token)
        .header("x-request-id", "test-request-42")
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-request-id"), Some("test-request-42"));

    let resp = Req::post(EVENTS)
        .bearer(&token)
        .header("x-request-id", "x".repeat(129))
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200);
    let generated = resp.header("x-request-id").expect("a generated request id");
    assert!(!generated.is_empty() && generated != "x".repeat(129));

    let requests = backend.requests();
    assert_eq!(
        requests[0].header("x-request-id").as_deref(),
        Some("test-request-42")
    );
    assert_eq!(
        requests[1].header("x-request-id").as_deref(),
        Some(generated)
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_forwarded_headers_are_replaced() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    let resp = Req::post(EVENTS)
        .bearer(&token)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .header("x-forwarded-host", "evil.example")
        .send(gateway.addr)
        .await;
    assert_eq!(resp.status, 200);
    let seen = backend.single_request();
    for (name, forged) in [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-host", "evil.example"),
    ] {
        assert!(
            seen.header_all(name).iter().all(|v| !v.contains(forged)),
            "{name} from an untrusted client reached the backend: {:?}",
            seen.header_all(name)
        );
    }
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_is_forwarded_in_origin_form() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    let request = format!(
        "POST http://api.example.test{EVENTS}?x=1 HTTP/1.1\r\n\
         Host: api.example.test\r\n\
         Authorization: Bearer {token}\r\n\
         Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    let reply = raw(gateway.addr, request.as_bytes()).await;
    let resp = reply.response();
    assert_eq!(resp.status, 200, "{}", resp.text());
    backend
        .wait_for_requests(1, Duration::from_secs(5))
        .await
        .expect("request forwarded");
    assert_eq!(backend.single_request().target, format!("{EVENTS}?x=1"));
    gateway.shutdown().await;
}

/// A gateway with one worker (so every request goes through one upstream pool) in
/// front of `upstream`, with `alice` granted `events`; `configure` adds settings.
/// Returns the environment (keep it alive), the gateway and alice's key.
async fn one_worker_gateway(
    upstream: &str,
    configure: impl FnOnce(TestEnvBuilder) -> TestEnvBuilder,
) -> (TestEnv, Gateway, String) {
    let env = configure(
        TestEnv::builder()
            .upstream(upstream)
            .set("server", "workers", "1"),
    )
    .build();
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    (env, gateway, token)
}

/// Posts to `events` `n` times, one after another, each answered 200.
async fn post_ok(gateway: &Gateway, token: &str, n: usize) {
    for i in 0..n {
        let resp = Req::post(EVENTS).bearer(token).send(gateway.addr).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let backend = RecordingBackend::start().await;
    let (_env, gateway, token) = one_worker_gateway(&backend.url(), |b| b).await;
    post_ok(&gateway, &token, 10).await;
    assert_eq!(
        backend.connections(),
        1,
        "one upstream connection for 10 requests"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_idle_connections_kept_every_request_connects() {
    let backend = RecordingBackend::start().await;
    let (_env, gateway, token) = one_worker_gateway(&backend.url(), |b| {
        b.set("upstream", "pool_max_idle_per_host", "0")
    })
    .await;
    post_ok(&gateway, &token, 3).await;
    assert_eq!(backend.connections(), 3);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_backend_closed_while_idle_is_not_used() {
    let backend = KeepAliveBackend::start(true).await;
    let (_env, gateway, token) = one_worker_gateway(&backend.url(), |b| b).await;
    for i in 0..3 {
        post_ok(&gateway, &token, 1).await;
        // The backend hung up after answering, without saying so; once the gateway has
        // noticed (it closes its end too), the next request must take a new connection.
        let gone = i + 1;
        common::wait_until(Duration::from_secs(5), || async {
            backend.closed_by_gateway() >= gone
        })
        .await
        .expect("the gateway closes the connection the backend closed");
    }
    assert_eq!(backend.connections(), 3);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let backend = KeepAliveBackend::start(false).await;
    let (_env, gateway, token) = one_worker_gateway(&backend.url(), |b| {
        b.set("upstream", "pool_idle_timeout", "\"300ms\"")
    })
    .await;
    post_ok(&gateway, &token, 1).await;
    let after = common::wait_until(Duration::from_secs(5), || async {
        backend.closed_by_gateway() == 1
    })
    .await
    .expect("the idle connection is closed");
    // Never before the timeout (it was put back just before the answer went out).
    assert!(
        after >= Duration::from_millis(290) && after < Duration::from_secs(3),
        "closed after {after:?}; pool_idle_timeout is 300 ms"
    );
    assert_eq!(backend.connections(), 1);
    gateway.shutdown().await;
}

/// A raw HTTP/1.1 backend answering `200 ok` to requests without a body. It counts the
/// connections it accepted and those the gateway closed (EOF read). With
/// `hang_up_after_answer` it half-closes every connection after its first answer,
/// without `Connection: close`, as a backend whose keep-alive timeout ran out would.
struct KeepAliveBackend {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed_by_gateway: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAliveBackend {
    async fn start(hang_up_after_answer: bool) -> KeepAliveBackend {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let closed_by_gateway = Arc::new(AtomicUsize::new(0));
        let (accepted, closed) = (connections.clone(), closed_by_gateway.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        if hang_up_after_answer {
                            let _ = stream.shutdown().await;
                        }
                    }
                });
            }
        });
        KeepAliveBackend {
            addr,
            connections,
            closed_by_gateway,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed_by_gateway(&self) -> usize {
        self.closed_by_gateway
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for KeepAliveBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One keep-alive connection moves from the gateway's own HTTP/1 loop (requests whose
/// body, if any, came whole with the head) to hyper at its first request with a
/// streamed body, and nothing is lost or reframed on the way: each request reaches the
/// backend whole, in order, each answer the client.
/// Once sequentially (the hand-over at a read boundary), once pipelined in one write
/// (the hand-over in the middle of what was read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_is_served_whole_across_the_hand_over_to_hyper() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["campaigns", "events"]);
    let gw = env.start_gateway().await;
    let get = |n: u32| {
        format!(
            "GET {CONTENT}?n={n} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };
    let post = |n: u32| {
        format!(
            "POST {EVENTS}?n={n} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: text/plain\r\nContent-Length: 7\r\n\r\nbody {n:02}"
        )
    };
    const CONTENT: &str = "/campaignapi/resources/v3/campaigncontents/42";
    // `Transfer-Encoding` streams a body: hyper's from there on.
    let chunked = |n: u32| {
        format!(
            "POST {EVENTS}?n={n} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nbod\r\n4\r\ny {n:02}\r\n0\r\n\r\n"
        )
    };
    let requests = [get(1), post(2), get(3), chunked(4), get(5), post(6)];

    let mut stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    for (i, request) in requests.iter().enumerate() {
        let reply = exchange(&mut stream, request).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        assert!(reply.header("date").is_some(), "request {i}: no date");
    }
    drop(stream);
    let pipelined =
        common::hostile::pipelined(gw.addr, requests.iter().map(|r| r.to_string()).collect()).await;
    assert!(
        pipelined.iter().all(|r| r.status == 200),
        "pipelined answers"
    );

    backend
        .wait_for_requests(12, Duration::from_secs(5))
        .await
        .expect("twelve requests at the backend");
    let seen: Vec<(String, String, String)> = backend
        .requests()
        .iter()
        .map(|r| {
            let body = String::from_utf8_lossy(r.body()).into_owned();
            (r.method.to_string(), r.target.clone(), body)
        })
        .collect();
    let want: Vec<(String, String, String)> = [1, 2, 3, 4, 5, 6]
        .iter()
        .map(|&n| {
            if n % 2 == 0 {
                (
                    "POST".to_string(),
                    format!("{EVENTS}?n={n}"),
                    format!("body {n:02}"),
                )
            } else {
                ("GET".to_string(), format!("{CONTENT}?n={n}"), String::new())
            }
        })
        .collect();
    assert_eq!(seen[..6], want[..], "sequential");
    assert_eq!(seen[6..], want[..], "pipelined");
    gw.shutdown().await;
}

/// Writes `request` and reads one whole response from `stream`.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> common::Resp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((resp, used)) = common::parse_response(&bytes, false) {
            assert_eq!(used, bytes.len(), "nothing after the response");
            return resp;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole response");
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// A client that shuts down its sending side right after its request still gets the
/// answer (docs/decisions.md, "Half-closed clients are served"), on the gateway's own
/// HTTP/1 loop (a GET) as on hyper (a chunked POST), and the backend got the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["campaigns", "events"]);
    let gw = env.start_gateway().await;
    let requests = [
        format!(
            "GET /campaignapi/resources/v3/campaigncontents/7 HTTP/1.1\r\nHost: gw.test\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        ),
        format!(
            "POST {EVENTS} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\
             Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        ),
    ];
    for (i, request) in requests.iter().enumerate() {
        let mut stream = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        stream.shutdown().await.expect("half-close");
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
            .await
            .expect("the answer and the close within 10 s")
            .expect("read");
        let (resp, _) = common::parse_response(&bytes, true).expect("a whole response");
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    backend
        .wait_for_requests(2, Duration::from_secs(5))
        .await
        .expect("both requests at the backend");
    gw.shutdown().await;
}
