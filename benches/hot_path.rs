//! Micro benches of the per-request decision, one per hot function, plus the whole
//! cache-hit decision (`pipeline::admit`). Keys for the cache benches are drawn from a
//! Zipf distribution over 10,000 keys of a `file:` store in a temp dir, all cached.
//!
//! `cargo bench --bench hot_path` (about a minute). Filter: `cargo bench --bench hot_path -- path/`.

#[path = "fixture/mod.rs"]
mod fixture;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use campaign_gate::auth::bearer::parse_bearer;
use campaign_gate::auth::now_ms;
use campaign_gate::path::canonicalize;
use campaign_gate::pipeline::{self, Policy};
use campaign_gate::routes::RouteMatch;
use campaign_gate::store::TokenHash;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;

/// Keys in the store and the cache.
const KEYS: usize = 10_000;
/// Zipf exponent of key popularity.
const ZIPF_S: f64 = 1.0;
/// Length of the precomputed key sequence the cache benches cycle through.
const SEQUENCE: usize = 1 << 14;

const EVENTS: &str = "/campaignapi/resources/v3/events";
const CONTENT: &str = "/campaignapi/resources/v3/campaigncontents/4711";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn bearer(c: &mut Criterion) {
    let header = format!("Bearer {}", fixture::token(42));
    let mut g = c.benchmark_group("bearer");
    g.bench_function("parse", |b| {
        b.iter(|| parse_bearer(black_box(header.as_bytes())).map(<[u8]>::len))
    });
    g.bench_function("sha256_100B", |b| {
        let token = fixture::token(42);
        b.iter(|| TokenHash::of(black_box(token.as_bytes())))
    });
    g.bench_function("parse+sha256", |b| {
        b.iter(|| parse_bearer(black_box(header.as_bytes())).map(TokenHash::of))
    });
    g.finish();
}

fn path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    g.bench_function("canonicalize_clean", |b| {
        b.iter(|| canonicalize(black_box(CONTENT)).map(|p| p.len()))
    });
    // Two unreserved escapes to decode and one lower-case escape to upper-case: owned.
    let escaped = "/campaignapi/resources/v3/campaigncontents/%7euser%2D1%c3%a9";
    assert!(matches!(
        canonicalize(escaped),
        Ok(std::borrow::Cow::Owned(_))
    ));
    g.bench_function("canonicalize_escaped", |b| {
        b.iter(|| canonicalize(black_box(escaped)).map(|p| p.len()))
    });
    g.finish();
}

fn routes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = Policy::new(fixture::config(&dir.path().join("s.json"), &[])).expect("policy");
    let routes = &policy.routes;
    let cases = [
        (Method::POST, EVENTS),
        (Method::GET, CONTENT),
        (Method::GET, "/campaignapi/metadata/v3/profile/abc"),
        (Method::GET, "/campaignapi/resources/v3/users/"),
    ];
    for (m, p) in &cases {
        assert!(matches!(routes.lookup(m, p), RouteMatch::Api(_)), "{m} {p}");
    }
    let mut g = c.benchmark_group("route");
    g.bench_function("lookup_static", |b| {
        b.iter(|| routes.lookup(black_box(&Method::POST), black_box(EVENTS)))
    });
    g.bench_function("lookup_param", |b| {
        b.iter(|| routes.lookup(black_box(&Method::GET), black_box(CONTENT)))
    });
    g.bench_function("lookup_mix4", |b| {
        b.iter(|| {
            for (m, p) in &cases {
                black_box(routes.lookup(black_box(m), black_box(p)));
            }
        })
    });
    g.bench_function("lookup_miss", |b| {
        b.iter(|| {
            routes.lookup(
                black_box(&Method::GET),
                black_box("/campaignapi/resources/v3/unknown"),
            )
        })
    });
    g.finish();
}

fn grants(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = Policy::new(fixture::config(&dir.path().join("s.json"), &[])).expect("policy");
    let set = policy.routes.compile_grants(&["campaigns", "events"]);
    let events = policy.routes.api_id("events").expect("events api");
    let users = policy.routes.api_id("users").expect("users api");
    let mut g = c.benchmark_group("grant");
    g.bench_function("contains", |b| {
        b.iter(|| {
            (
                set.contains(black_box(events)),
                set.contains(black_box(users)),
            )
        })
    });
    g.finish();
}

/// The cache and decision benches: a warm `Authenticator` over 10k keys.
fn cache(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store.json");
    fixture::write_store(&store, KEYS);
    let config = fixture::config(&store, &[]);
    let (auth, _) = rt.block_on(fixture::authenticator(&config));
    let policy = Policy::new(config).expect("policy");
    let hashes: Vec<TokenHash> = (0..KEYS)
        .map(|i| TokenHash::of(fixture::token(i).as_bytes()))
        .collect();
    rt.block_on(async {
        for h in &hashes {
            auth.resolve(h, &policy.routes).await.expect("known key");
        }
    });
    let zipf = fixture::zipf_sequence(KEYS, ZIPF_S, SEQUENCE, 7);
    let zipf_hashes: Vec<TokenHash> = zipf.iter().map(|&k| hashes[k]).collect();
    let heads: Vec<http::request::Parts> = zipf
        .iter()
        .enumerate()
        .map(|(n, &k)| {
            let token = fixture::token(k);
            if n % 2 == 0 {
                fixture::request_head("POST", EVENTS, &token)
            } else {
                fixture::request_head("GET", CONTENT, &token)
            }
        })
        .collect();
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (auth, policy) = (&auth, &policy);

    let mut g = c.benchmark_group("cache_hit");
    g.bench_function("resolve_zipf_10k", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let hashes = &zipf_hashes;
            async move {
                let start = Instant::now();
                for i in 0..iters as usize {
                    let h = &hashes[i % hashes.len()];
                    black_box(auth.resolve(h, &policy.routes).await.is_ok());
                }
                start.elapsed()
            }
        })
    });
    g.bench_function("resolve_one_key", |b| {
        let h = hashes[0];
        b.to_async(&rt)
            .iter(|| async move { auth.resolve(black_box(&h), &policy.routes).await.is_ok() })
    });
    g.finish();

    let mut g = c.benchmark_group("decision");
    g.bench_function("authorize", |b| {
        let head = &heads[0];
        let principal = rt
            .block_on(auth.resolve(&hashes[zipf[0]], &policy.routes))
            .expect("known key");
        b.iter(|| {
            pipeline::authorize(
                head,
                std::borrow::Cow::Borrowed(head.uri.path()),
                principal.clone(),
                &policy.routes,
                now_ms(),
            )
            .is_ok()
        })
    });
    g.bench_function("sanity", |b| {
        let head = &heads[0];
        b.iter(|| pipeline::sanity(black_box(head), policy).is_ok())
    });
    g.bench_function("now_ms", |b| b.iter(now_ms));
    g.bench_function("admit_zipf_10k", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let heads = &heads;
            async move {
                let start = Instant::now();
                for i in 0..iters as usize {
                    let head = &heads[i % heads.len()];
                    let admitted = pipeline::admit(head, policy, auth, client).await;
                    debug_assert!(admitted.is_ok());
                    black_box(admitted.is_ok());
                }
                start.elapsed()
            }
        })
    });
    // Zipf keys with the request head hot in the CPU caches, as a server's is when it
    // has just parsed it; the key's cache entry is wherever its popularity left it, and
    // the token's bytes still come from memory. Two heads (a POST and a GET, alternating
    // as above), each request's `Authorization` value moved in before the decision and
    // out after it: no clone, no allocation. `admit_zipf_10k` above also reads each of
    // its 16k heads (method, target, header map) back from memory.
    g.bench_function("admit_zipf_10k_hot_head", |b| {
        let hot = [heads[0].clone(), heads[1].clone()];
        let values: Vec<http::HeaderValue> = heads
            .iter()
            .map(|h| h.headers[http::header::AUTHORIZATION].clone())
            .collect();
        // The swapped heads are admitted (a bench of refusals would mislead).
        for (n, value) in values.iter().enumerate().take(64) {
            let mut head = hot[n % 2].clone();
            head.headers
                .insert(http::header::AUTHORIZATION, value.clone());
            let admitted = rt.block_on(pipeline::admit(&head, policy, auth, client));
            assert!(admitted.is_ok(), "key {n} not admitted");
        }
        // Taken by each batch and put back after it: one batch runs at a time.
        let state = std::cell::Cell::new(Some((hot, values)));
        b.to_async(&rt).iter_custom(|iters| {
            let state = &state;
            async move {
                let (mut hot, mut values) = state.take().expect("one batch at a time");
                let start = Instant::now();
                for i in 0..iters as usize {
                    let n = i % values.len();
                    let head = &mut hot[n % 2];
                    let slot = head
                        .headers
                        .get_mut(http::header::AUTHORIZATION)
                        .expect("authorization");
                    std::mem::swap(slot, &mut values[n]);
                    let admitted = pipeline::admit(head, policy, auth, client).await;
                    debug_assert!(admitted.is_ok());
                    black_box(admitted.is_ok());
                    if let Some(slot) = head.headers.get_mut(http::header::AUTHORIZATION) {
                        std::mem::swap(slot, &mut values[n]);
                    }
                }
                let elapsed = start.elapsed();
                state.set(Some((hot, values)));
                elapsed
            }
        })
    });
    // One hot request head and key: the best case, all of it in the CPU caches.
    g.bench_function("admit_one_key", |b| {
        let head = &heads[0];
        b.to_async(&rt)
            .iter(|| async move { pipeline::admit(head, policy, auth, client).await.is_ok() })
    });
    g.finish();
}

/// Header hygiene on the way to the backend and back: a request as wrk sends it, one as
/// a browser-like client sends it (with `Connection: keep-alive`), and a response as
/// nginx sends it.
fn headers(c: &mut Criterion) {
    use criterion::BatchSize;
    use http::{HeaderMap, HeaderName, HeaderValue};
    let map = |pairs: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    };
    let bearer = format!("Bearer {}", fixture::token(1));
    let wrk = map(&[("host", "bench"), ("authorization", &bearer)]);
    let browser = map(&[
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json"),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("authorization", &bearer),
        ("connection", "keep-alive"),
        ("cookie", "session=abc"),
        ("x-request-id", "b0c5e1d2-7f3a-4e8b-9c6d-1a2b3c4d5e6f"),
    ]);
    let response = map(&[
        ("server", "nginx"),
        ("date", "Tue, 24 Nov 2026 15:00:00 GMT"),
        ("content-type", "text/plain"),
        ("content-length", "2"),
        ("connection", "keep-alive"),
    ]);
    let mut g = c.benchmark_group("headers");
    for (name, head) in [("request_wrk", &wrk), ("request_browser", &browser)] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || head.clone(),
                |h| campaign_gate::headers::strip_for_upstream(h, "x-campaign-", true, true),
                BatchSize::SmallInput,
            )
        });
    }
    g.bench_function("response_nginx", |b| {
        b.iter_batched_ref(
            || response.clone(),
            campaign_gate::headers::strip_hop_by_hop,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The framing guard's look at each HTTP/1 head before hyper parses it
/// (`framing::Framer::scan`): the two requests of `headers` as raw bytes, and a
/// 10-request pipeline of the wrk one.
fn framing(c: &mut Criterion) {
    use campaign_gate::framing::{Framer, Limits, Scan};
    let limits = Limits {
        max_header_bytes: 65536,
        max_headers: 100,
        max_uri_bytes: 8192,
    };
    let bearer = format!("Bearer {}", fixture::token(1));
    let wrk = format!(
        "GET /campaignapi/resources/v3/events HTTP/1.1\r\nHost: bench\r\nAuthorization: {bearer}\r\n\r\n"
    );
    let browser = format!(
        "GET /campaignapi/resources/v3/events?limit=10 HTTP/1.1\r\nHost: api.example.com\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
         Accept: application/json\r\nAccept-Language: en-US,en;q=0.5\r\n\
         Accept-Encoding: gzip, deflate, br\r\nAuthorization: {bearer}\r\n\
         Connection: keep-alive\r\nCookie: session=abc\r\n\
         X-Request-Id: b0c5e1d2-7f3a-4e8b-9c6d-1a2b3c4d5e6f\r\n\r\n"
    );
    let pipeline = wrk.repeat(10);
    let mut g = c.benchmark_group("framing");
    for (name, bytes) in [
        ("head_wrk", &wrk),
        ("head_browser", &browser),
        ("pipeline_10_wrk", &pipeline),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut f = Framer::new(limits);
                let scan = f.scan(std::hint::black_box(bytes.as_bytes()));
                assert_eq!(scan, Scan::Clear(bytes.len()));
            })
        });
    }
    g.finish();
}

fn settings() -> Criterion {
    Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = settings();
    targets = bearer, path, routes, grants, cache, headers, framing
}
criterion_main!(benches);
