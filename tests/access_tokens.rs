//! The deprecated access-token flow (DESIGN.md section 1): Basic credentials for a
//! short-lived bearer, the rate limit, the deprecation headers, and tokens dying with
//! their parent key, their user, and their own expiry.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::refusal::{INVALID_TOKEN, MISSING_CREDENTIALS};
use common::{EVENTS, RecordingBackend, Req, TestEnv, assert_refusal, wait_until};

const TOKEN_PATH: &str = "/campaignapi/resources/v3/token";

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{secret}")))
}

/// Asks for a token; returns the response.
async fn exchange(gateway: std::net::SocketAddr, user: &str, secret: &str) -> common::Resp {
    Req::post(TOKEN_PATH)
        .header("authorization", basic(user, secret))
        .send(gateway)
        .await
}

fn assert_deprecated(resp: &common::Resp) {
    let deprecation = resp.header("deprecation").expect("Deprecation header");
    assert!(deprecation.starts_with('@'), "{deprecation}");
    assert!(deprecation[1..].parse::<u64>().is_ok(), "{deprecation}");
    let link = resp.header("link").expect("Link header");
    assert!(link.contains("rel=\"deprecation\""), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_issued_for_a_key_and_works_like_one() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;

    let resp = exchange(gateway.addr, "alice", &key).await;
    assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
    assert_deprecated(&resp);
    let body = resp.json().expect("json body");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    assert_ne!(token, key);
    backend.assert_untouched("the token endpoint is answered by the gateway");

    let used = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_eq!(used.status.as_u16(), 200, "{}", used.text());
    let seen = backend.single_request();
    assert_eq!(seen.header("x-campaign-user-id").as_deref(), Some("alice"));
    assert_eq!(
        seen.header("x-campaign-key-id"),
        Some(common::key_id_of(&key)),
        "an access token carries its parent key's id"
    );

    // Not in the store in plaintext.
    let stored = std::fs::read_to_string(env.store_path()).expect("store file");
    assert!(!stored.contains(&token) && !stored.contains(&key));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_deprecation_headers() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key = env.create_api_user("alice", &["events"]);
    env.create_api_user("bob", &["events"]);
    let gateway = env.start_gateway().await;

    let none = Req::post(TOKEN_PATH).send(gateway.addr).await;
    assert_refusal(&none, MISSING_CREDENTIALS, "no credentials");
    assert_deprecated(&none);
    for (user, secret) in [
        ("alice", "not-the-key"),
        ("bob", key.as_str()),
        ("nobody", key.as_str()),
    ] {
        let resp = exchange(gateway.addr, user, secret).await;
        assert_refusal(&resp, INVALID_TOKEN, &format!("{user}:{secret}"));
        assert_deprecated(&resp);
    }
    // An access token cannot mint more access tokens.
    let token = exchange(gateway.addr, "alice", &key)
        .await
        .json()
        .expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_refusal(
        &exchange(gateway.addr, "alice", &token).await,
        INVALID_TOKEN,
        "access token as Basic secret",
    );
    backend.assert_untouched("token endpoint refusals");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_requests_per_user_per_minute_then_429() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let key = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let resp = exchange(gateway.addr, "alice", &key).await;
        assert_eq!(resp.status.as_u16(), 200, "{}", resp.text());
        tokens.push(
            resp.json().expect("json")["access_token"]
                .as_str()
                .expect("t")
                .to_string(),
        );
    }
    let sixth = exchange(gateway.addr, "alice", &key).await;
    assert_eq!(sixth.status.as_u16(), 429, "{}", sixth.text());
    assert_eq!(sixth.json().expect("json")["error"], "too_many_requests");
    let retry: u64 = sixth
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_deprecated(&sixth);
    // Each call issued a new token; the earlier ones stay valid.
    for t in &tokens {
        let r = Req::post(EVENTS).bearer(t).send(gateway.addr).await;
        assert_eq!(r.status.as_u16(), 200);
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_die_with_their_parent_key_their_user_and_their_expiry() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("tokens", "lifetime", "\"2s\"")
        .build();
    let key1 = env.create_api_user("alice", &["events"]);
    let key2 = env.generate_key("alice");
    let gateway = env.start_gateway().await;
    let token = |resp: common::Resp| {
        resp.json().expect("json")["access_token"]
            .as_str()
            .expect("t")
            .to_string()
    };
    let works = |t: String| async move {
        Req::post(EVENTS)
            .bearer(&t)
            .send(gateway.addr)
            .await
            .status
            .as_u16()
            == 200
    };

    // Expiry: a 2 s token works, then is refused.
    let short = token(exchange(gateway.addr, "alice", &key2).await);
    assert!(works(short.clone()).await);
    let expired = wait_until(Duration::from_secs(4), || {
        let t = short.clone();
        async move { !works(t).await }
    })
    .await;
    assert!(expired.is_ok(), "a token past its lifetime must be refused");

    // Parent key revoked now: its tokens die at once.
    let of_key1 = token(exchange(gateway.addr, "alice", &key1).await);
    assert!(works(of_key1.clone()).await);
    env.cli_ok(&["keys", "delete", "alice", "--slot", "1", "--now"]);
    let dead = wait_until(Duration::from_secs(1), || {
        let t = of_key1.clone();
        async move { !works(t).await }
    })
    .await;
    assert!(
        dead.is_ok(),
        "a token of a revoked key must be refused within 1 s"
    );

    // User deleted: the tokens of its remaining key die too.
    let of_key2 = token(exchange(gateway.addr, "alice", &key2).await);
    assert!(works(of_key2.clone()).await);
    env.cli_ok(&["users", "delete", "alice"]);
    let dead = wait_until(Duration::from_secs(1), || {
        let t = of_key2.clone();
        async move { !works(t).await }
    })
    .await;
    assert!(
        dead.is_ok(),
        "a token of a deleted user must be refused within 1 s"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_flow_is_not_answered_by_the_gateway() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("tokens", "enabled", "false")
        .build();
    let key = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let resp = exchange(gateway.addr, "alice", &key).await;
    // Basic credentials are not a bearer: refused like any other request.
    assert_refusal(&resp, INVALID_TOKEN, "flow disabled");
    assert!(resp.header("deprecation").is_none());
    gateway.shutdown().await;
}
