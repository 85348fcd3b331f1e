//! Heap allocations per cache-hit decision, counted by dhat's global allocator.
//!
//! `cargo bench --bench allocs`. Warms a cache of 10,000 keys, then runs
//! `pipeline::admit` on prebuilt request heads (Zipf-distributed keys, as in `hot_path`)
//! and prints allocations and bytes per decision, for the whole decision and for its
//! parts, plus the request-id generation the server does beside it; then the whole
//! request: an in-process gateway between a hyper client and a hyper backend, minus the
//! same client talking to the backend directly.

#[path = "fixture/mod.rs"]
mod fixture;

use std::net::{IpAddr, Ipv4Addr};

use campaign_gate::auth::bearer::parse_bearer;
use campaign_gate::headers;
use campaign_gate::path::canonicalize;
use campaign_gate::pipeline::{self, Policy};
use campaign_gate::store::TokenHash;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const KEYS: usize = 10_000;
const DECISIONS: usize = 100_000;

/// Allocations and bytes made by `f`.
fn count<T>(f: impl FnOnce() -> T) -> (u64, u64, T) {
    let before = dhat::HeapStats::get();
    let out = f();
    let after = dhat::HeapStats::get();
    (
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes,
        out,
    )
}

fn report(what: &str, n: usize, (blocks, bytes): (u64, u64)) {
    println!(
        "{what:<44} {:>8.3} allocations/op {:>9.1} bytes/op  ({n} ops)",
        blocks as f64 / n as f64,
        bytes as f64 / n as f64,
    );
}

fn main() {
    // ALLOCS_DHAT_FILE=path: only the whole-request part, with a dhat profile (allocation
    // sites and backtraces) written to `path` for dh_view.html or a script.
    let profile_file = std::env::var_os("ALLOCS_DHAT_FILE");
    let _profiler = match &profile_file {
        Some(path) => dhat::Profiler::builder().file_name(path).build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store.json");
    fixture::write_store(&store, KEYS);
    if profile_file.is_some() {
        whole_request(&rt, &store);
        return;
    }
    let config = fixture::config(&store, &[]);
    let (auth, _) = rt.block_on(fixture::authenticator(&config));
    let policy = Policy::new(config).expect("policy");
    let hashes: Vec<TokenHash> = (0..KEYS)
        .map(|i| TokenHash::of(fixture::token(i).as_bytes()))
        .collect();
    let zipf = fixture::zipf_sequence(KEYS, 1.0, 1 << 14, 7);
    let heads: Vec<http::request::Parts> = zipf
        .iter()
        .enumerate()
        .map(|(n, &k)| {
            let token = fixture::token(k);
            if n % 2 == 0 {
                fixture::request_head("POST", "/campaignapi/resources/v3/events", &token)
            } else {
                fixture::request_head(
                    "GET",
                    "/campaignapi/resources/v3/campaigncontents/4711",
                    &token,
                )
            }
        })
        .collect();
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);

    let (blocks, bytes, ()) = count(|| {
        rt.block_on(async {
            for h in &hashes {
                auth.resolve(h, &policy.routes).await.expect("known key");
            }
        })
    });
    report(
        "warm-up: 10k cache misses (store + insert)",
        KEYS,
        (blocks, bytes),
    );
    // A second pass warms the front maps and the route lookups before counting.
    rt.block_on(async {
        for head in &heads {
            pipeline::admit(head, &policy, &auth, client)
                .await
                .expect("admitted");
        }
    });

    let (blocks, bytes, admitted) = count(|| {
        rt.block_on(async {
            let mut admitted = 0usize;
            for i in 0..DECISIONS {
                let head = &heads[i % heads.len()];
                if pipeline::admit(head, &policy, &auth, client).await.is_ok() {
                    admitted += 1;
                }
            }
            admitted
        })
    });
    assert_eq!(admitted, DECISIONS, "every decision admits");
    report(
        "pipeline::admit (cache hit, whole decision)",
        DECISIONS,
        (blocks, bytes),
    );
    let decision_blocks = blocks;

    let (blocks, bytes, ()) = count(|| {
        rt.block_on(async {
            for i in 0..DECISIONS {
                let h = &hashes[zipf[i % zipf.len()]];
                let _ = auth.resolve(h, &policy.routes).await;
            }
        })
    });
    report(
        "Authenticator::resolve (cache hit)",
        DECISIONS,
        (blocks, bytes),
    );

    let (blocks, bytes, ()) = count(|| {
        for i in 0..DECISIONS {
            let head = &heads[i % heads.len()];
            let _ = pipeline::sanity(head, &policy);
            let _ = pipeline::credential(head).map(TokenHash::of);
        }
    });
    report("sanity + credential + sha256", DECISIONS, (blocks, bytes));

    let (blocks, bytes, ()) = count(|| {
        for _ in 0..DECISIONS {
            let _ = canonicalize("/campaignapi/resources/v3/campaigncontents/%7euser%2D1");
        }
    });
    report(
        "canonicalize (escaped path, owned result)",
        DECISIONS,
        (blocks, bytes),
    );

    let header = format!("Bearer {}", fixture::token(1));
    let (blocks, bytes, ()) = count(|| {
        for _ in 0..DECISIONS {
            let _ = parse_bearer(header.as_bytes()).map(TokenHash::of);
        }
    });
    report("parse_bearer + sha256", DECISIONS, (blocks, bytes));

    let empty = http::HeaderMap::new();
    let (blocks, bytes, ()) = count(|| {
        for _ in 0..DECISIONS {
            let _ = headers::request_id(&empty);
        }
    });
    report(
        "server: new x-request-id (none sent)",
        DECISIONS,
        (blocks, bytes),
    );

    // Header hygiene on a request and a response that both carry `Connection:
    // keep-alive` (nginx sends it on every keep-alive response), net of cloning them.
    let map = |pairs: &[(&str, &str)]| {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    };
    let request = map(&[
        ("host", "api.example.com"),
        ("authorization", &header),
        ("accept", "application/json"),
        ("connection", "keep-alive"),
    ]);
    let response = map(&[
        ("server", "nginx"),
        ("content-type", "text/plain"),
        ("content-length", "2"),
        ("connection", "keep-alive"),
    ]);
    // Counted around the stripping alone, not the cloning.
    let (mut blocks, mut bytes) = (0, 0);
    for _ in 0..DECISIONS {
        let (mut req, mut resp) = (request.clone(), response.clone());
        let (b, n, ()) = count(|| {
            headers::strip_for_upstream(&mut req, "x-campaign-", true, true);
            headers::strip_hop_by_hop(&mut resp);
        });
        (blocks, bytes) = (blocks + b, bytes + n);
        std::hint::black_box((req, resp));
    }
    report(
        "headers: strip request + response (keep-alive)",
        DECISIONS,
        (blocks, bytes),
    );

    println!("whole request through an in-process gateway (1 connection, keep-alive):");
    whole_request(&rt, &store);

    println!(
        "allocations per cache-hit decision: {:.3}",
        decision_blocks as f64 / DECISIONS as f64
    );
}

/// A backend that answers `200 ok` to everything, on `127.0.0.1:0`.
async fn backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends `n` keep-alive GETs on one connection to `addr`; counts the 200s.
async fn drive(addr: std::net::SocketAddr, token: &str, n: usize) -> usize {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let authorization = format!("Bearer {token}");
    let mut ok = 0;
    for _ in 0..n {
        let req = http::Request::get("/campaignapi/resources/v3/campaigncontents/4711")
            .header(http::header::HOST, "gateway.example")
            .header(http::header::AUTHORIZATION, authorization.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        if resp.status() == http::StatusCode::OK {
            ok += 1;
        }
        let _ = resp.into_body().collect().await;
    }
    ok
}

/// Allocations per request proxied by an in-process gateway: client -> gateway ->
/// backend minus client -> backend, all on this thread.
fn whole_request(rt: &tokio::runtime::Runtime, store: &std::path::Path) {
    const REQUESTS: usize = 4_000;
    const ROUNDS: usize = 7;
    rt.block_on(async {
        let backend = backend().await;
        let upstream = format!("http://{backend}");
        let config = fixture::config(
            store,
            &[
                ("CAMPAIGN_GATE_SERVER_LISTEN", "127.0.0.1:0"),
                ("CAMPAIGN_GATE_ADMIN_LISTEN", "127.0.0.1:0"),
                ("CAMPAIGN_GATE_UPSTREAM_URL", &upstream),
            ],
        );
        let gateway = campaign_gate::server::Gateway::start(config)
            .await
            .expect("gateway");
        let token = fixture::token(0);
        // Warm: the key cached, the upstream pool filled, buffers grown.
        assert_eq!(drive(gateway.addr, &token, 1000).await, 1000);
        // The first use of the key is recorded in the store about a second later: a
        // rewrite of the whole 10k-key file, which the file watcher then reloads (and
        // flushes the cache). Wait it out, so that neither measured phase pays for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while gateway.gate.metrics.key_use_writes.get() == 0 && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            gateway.gate.metrics.key_use_writes.get() > 0,
            "the key use was recorded"
        );
        // The watcher polls every 200 ms.
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(drive(gateway.addr, &token, 1000).await, 1000);
        assert_eq!(drive(backend, &token, 1000).await, 1000);
        // Background work lands in whichever phase runs at the time (the key-use write
        // and the store reload it causes, about a second after a key is first used, and
        // again after the cache is flushed): alternate short rounds and keep each
        // phase's quietest round.
        let (mut direct, mut proxied) = ((u64::MAX, 0), (u64::MAX, 0));
        for _ in 0..ROUNDS {
            let (blocks, bytes, ok) = count_async(drive(backend, &token, REQUESTS)).await;
            assert_eq!(ok, REQUESTS);
            direct = direct.min((blocks, bytes));
            let (blocks, bytes, ok) = count_async(drive(gateway.addr, &token, REQUESTS)).await;
            assert_eq!(ok, REQUESTS, "every proxied request answered 200");
            proxied = proxied.min((blocks, bytes));
        }
        report("client -> backend (baseline)", REQUESTS, direct);
        report("client -> gateway -> backend", REQUESTS, proxied);
        println!(
            "{:<44} {:>8.3} allocations/op {:>9.1} bytes/op  ({REQUESTS} ops, quietest of {ROUNDS} rounds)",
            "gateway's share (difference)",
            (proxied.0 as f64 - direct.0 as f64) / REQUESTS as f64,
            (proxied.1 as f64 - direct.1 as f64) / REQUESTS as f64,
        );
        gateway.shutdown().await;
    });
}

async fn count_async<T>(f: impl std::future::Future<Output = T>) -> (u64, u64, T) {
    let before = dhat::HeapStats::get();
    let out = f.await;
    let after = dhat::HeapStats::get();
    (
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes,
        out,
    )
}
