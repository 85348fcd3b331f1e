//! Issue 4, point 6: key guessing. Failed authentications are counted per client
//! address; past `[auth] failure_limit` within `failure_window` the address gets 429
//! with `Retry-After`, checked before any store lookup, so guessing costs the guesser
//! and not the store. Other addresses are not affected.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::env::TestEnvBuilder;
use common::hostile::{
    Fixture, HOST, OTHER_ADDRESS, Prober, assert_one_ok, assert_refused_reply, metric, pipelined,
    unknown_token,
};
use common::refusal::{INVALID_TOKEN, TOO_MANY_REQUESTS};
use common::{EVENTS, Resp, parse_response, raw, raw_from, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// The tests of this file take turns, so that the 10,000-guess flood does not slow
/// the others' requests or they its well-behaved client.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const LOOKUPS: &str = "campaign_gate_store_lookups_total";
const THROTTLED: &str = "campaign_gate_auth_throttled_total";

/// `alice` (granted `events`) and the throttle configured by `configure`.
async fn fixture(configure: impl FnOnce(TestEnvBuilder) -> TestEnvBuilder) -> Fixture {
    Fixture::with(&["events"], configure).await
}

fn limit(n: u32, window: &str) -> impl FnOnce(TestEnvBuilder) -> TestEnvBuilder {
    move |b: TestEnvBuilder| {
        b.set("auth", "failure_limit", &n.to_string()).set(
            "auth",
            "failure_window",
            &format!("\"{window}\""),
        )
    }
}

fn post(token: &str, extra: &str) -> String {
    format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n{extra}\r\n"
    )
}

/// Sends at least `at_least` guesses (each a fresh random key) one after another on
/// one keep-alive connection from `127.0.0.1`, each after the previous answer, and
/// goes on until `probes` reaches `overlap`, so that the well-behaved client is
/// measured during the attack however fast the machine is. Returns every response.
async fn keep_guessing(
    addr: SocketAddr,
    at_least: usize,
    probes: Arc<AtomicUsize>,
    overlap: usize,
) -> Vec<Resp> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(at_least);
    while out.len() < at_least || probes.load(Ordering::Relaxed) < overlap {
        stream
            .write_all(post(&unknown_token(), "").as_bytes())
            .await
            .expect("write");
        let resp = loop {
            if let Some((resp, len)) = parse_response(&bytes, false) {
                bytes.drain(..len);
                break resp;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .expect("read");
            assert!(n > 0, "closed after {} responses", out.len());
            bytes.extend_from_slice(&buf[..n]);
        };
        out.push(resp);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_keys_are_throttled_and_store_lookups_bounded() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const LIMIT: usize = 50;
    const CONNECTIONS: usize = 10;
    let fx = fixture(limit(50, "60s")).await;
    let admin = fx.gateway.admin_addr;
    let lookups_before = metric(admin, LOOKUPS).await;
    let throttled_before = metric(admin, THROTTLED).await;
    let prober = Prober::start(fx.addr(), OTHER_ADDRESS, &fx.token);

    // 10 keep-alive connections from 127.0.0.1, 1,000 well-formed random keys each
    // (more while the well-behaved client has made fewer than 20 requests).
    const PROBES: usize = 20;
    let attack: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(keep_guessing(fx.addr(), 1000, prober.counter(), PROBES)))
        .collect();
    let mut responses = Vec::new();
    for a in attack {
        responses.extend(a.await.expect("attack connection"));
    }
    assert!(responses.len() >= 10_000, "{} guesses", responses.len());
    let slowest = prober.finish(PROBES, "key guessing");

    let mut unauthorized = 0;
    let mut throttled = 0;
    for resp in &responses {
        match resp.status.as_u16() {
            401 => {
                common::assert_refusal(resp, INVALID_TOKEN, "guess before the limit");
                unauthorized += 1;
            }
            429 => {
                common::assert_refusal(resp, TOO_MANY_REQUESTS, "guess past the limit");
                let retry: u64 = resp
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {resp:?}"));
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                throttled += 1;
            }
            other => panic!("unexpected {other}: {}", resp.text()),
        }
    }
    let lookups = metric(admin, LOOKUPS).await - lookups_before;
    eprintln!(
        "key guessing: {unauthorized} x 401, {throttled} x 429, {lookups} store lookups; \
         slowest well-behaved answer {slowest:?}"
    );
    // Each connection may have one check in flight when the limit is reached.
    assert!(
        (LIMIT..=LIMIT + CONNECTIONS).contains(&unauthorized),
        "{unauthorized} guesses were looked at"
    );
    // Plus one: the well-behaved client's key, looked up once and cached.
    assert!(
        lookups as usize <= LIMIT + CONNECTIONS + 1,
        "{lookups} store lookups for {} guesses",
        responses.len()
    );
    assert_eq!(
        metric(admin, THROTTLED).await - throttled_before,
        throttled as u64
    );
    // Only the well-behaved client reached the backend.
    assert!(
        fx.backend
            .requests()
            .iter()
            .all(|r| r.header_all("x-forwarded-for") == ["127.0.0.2"]),
        "a guess reached the backend"
    );

    // The guessing address is blocked even with a valid key (checked before the
    // store); another address is not, not even for a wrong key.
    let reply = fx.send(post(&fx.token, "")).await;
    assert_refused_reply(
        &reply,
        TOO_MANY_REQUESTS,
        false,
        "valid key, blocked address",
    );
    let reply = raw_from(
        OTHER_ADDRESS,
        fx.addr(),
        post(&unknown_token(), "").as_bytes(),
    )
    .await;
    assert_refused_reply(&reply, INVALID_TOKEN, false, "wrong key, other address");
    let reply = raw_from(OTHER_ADDRESS, fx.addr(), post(&fx.token, "").as_bytes()).await;
    assert_one_ok(&reply, "valid key, other address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_lifts_when_the_window_ends() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let fx = fixture(limit(3, "2s")).await;
    let responses = pipelined(
        fx.addr(),
        (0..4).map(|_| post(&unknown_token(), "")).collect(),
    )
    .await;
    for (i, resp) in responses[..3].iter().enumerate() {
        common::assert_refusal(resp, INVALID_TOKEN, &format!("guess {i}"));
    }
    common::assert_refusal(&responses[3], TOO_MANY_REQUESTS, "guess 4");
    let retry = responses[3].header("retry-after");
    assert!(matches!(retry, Some("1" | "2")), "Retry-After {retry:?}");
    let addr = fx.addr();
    let waited = wait_until(Duration::from_secs(4), || async {
        raw(addr, post(&fx.token, "").as_bytes())
            .await
            .response()
            .status
            == 200
    })
    .await
    .expect("the window ended");
    assert!(
        waited >= Duration::from_millis(500),
        "unblocked after only {waited:?}"
    );
    assert_eq!(
        fx.backend.requests().len(),
        1,
        "blocked requests were forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_are_throttled_without_any_store_lookup() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let fx = fixture(limit(5, "60s")).await;
    let before = metric(fx.gateway.admin_addr, LOOKUPS).await;
    let responses = pipelined(
        fx.addr(),
        (0..50)
            .map(|i| post(&format!("not!a!token!{i}"), ""))
            .collect(),
    )
    .await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses[..5], [401; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(metric(fx.gateway.admin_addr, LOOKUPS).await, before);
    fx.backend.assert_untouched("malformed tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_does_not_dodge_the_throttle() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The peer is not a trusted proxy: its X-Forwarded-For is ignored for counting.
    let fx = fixture(limit(5, "60s")).await;
    let requests = (0..20)
        .map(|i| {
            post(
                &unknown_token(),
                &format!("X-Forwarded-For: 198.51.100.{i}\r\n"),
            )
        })
        .collect();
    let statuses: Vec<u16> = pipelined(fx.addr(), requests)
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(statuses[..5], [401; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    fx.backend.assert_untouched("rotating X-Forwarded-For");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_is_throttled_per_forwarded_client() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let fx = fixture(|b| limit(5, "60s")(b).set("server", "trusted_proxies", r#"["127.0.0.0/8"]"#))
        .await;
    let from = |ip: Ipv4Addr| format!("X-Forwarded-For: {}\r\n", IpAddr::V4(ip));
    let guesser = Ipv4Addr::new(198, 51, 100, 1);
    let requests = (0..10)
        .map(|_| post(&unknown_token(), &from(guesser)))
        .collect();
    let statuses: Vec<u16> = pipelined(fx.addr(), requests)
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429, 429, 429]);
    // Through the same proxy, another client is not blocked ...
    let other = from(Ipv4Addr::new(198, 51, 100, 2));
    let reply = fx.send(post(&unknown_token(), &other)).await;
    assert_refused_reply(&reply, INVALID_TOKEN, false, "other client, wrong key");
    let reply = fx.send(post(&fx.token, &other)).await;
    assert_one_ok(&reply, "other client, valid key");
    // ... and a client cannot unblock itself by prepending addresses.
    let spoofed = format!("X-Forwarded-For: 203.0.113.9, {guesser}\r\n");
    let reply = fx.send(post(&fx.token, &spoofed)).await;
    assert_refused_reply(&reply, TOO_MANY_REQUESTS, false, "prepended address");
    assert_eq!(fx.backend.requests().len(), 1);
}
