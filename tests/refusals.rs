//! Issue 2, point 2: every row of DESIGN.md's status table except 429, 503 and the
//! token flow, with its exact status, `error`, `code`, `WWW-Authenticate` and JSON
//! content type; and the backend receives nothing on any refusal.
//!
//! Each test ends with a control request that must reach the backend, so "the backend
//! received nothing" cannot pass merely because forwarding is broken.

mod common;

use std::time::{Duration, Instant};

use campaign_gate::server::Gateway;
use common::env::TestEnvBuilder;
use common::refusal::{
    API_ACCESS_DENIED, API_NOT_GRANTED, INVALID_PATH, INVALID_REQUEST, INVALID_TOKEN,
    METHOD_NOT_ALLOWED, MISSING_CREDENTIALS, PAYLOAD_TOO_LARGE, UNKNOWN_API, UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
};
use common::{EVENTS, RecordingBackend, Req, TestEnv, assert_refusal, payload, raw, wait_until};

const CAMPAIGN_CONTENT: &str = "/campaignapi/resources/v3/campaigncontents/7";

/// A gateway in front of a recording backend, with `alice` granted `events` only.
struct Fixture {
    backend: RecordingBackend,
    env: TestEnv,
    gateway: Gateway,
    token: String,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with(|b| b).await
    }

    async fn with(configure: impl FnOnce(TestEnvBuilder) -> TestEnvBuilder) -> Fixture {
        let backend = RecordingBackend::start().await;
        let env = configure(TestEnv::builder().upstream(&backend.url())).build();
        let token = env.create_api_user("alice", &["events"]);
        let gateway = env.start_gateway().await;
        Fixture {
            backend,
            env,
            gateway,
            token,
        }
    }

    /// Asserts that no refusal so far reached the backend, then that a valid request
    /// does, and stops the gateway.
    async fn finish(self, context: &str) {
        self.backend.assert_untouched(context);
        let resp = Req::post(EVENTS)
            .bearer(&self.token)
            .send(self.gateway.addr)
            .await;
        assert_eq!(resp.status, 200, "control request: {}", resp.text());
        assert_eq!(
            self.backend.heads_received(),
            1,
            "control request forwarded"
        );
        self.gateway.shutdown().await;
    }
}

/// A well-formed token of the generated shape that no store knows.
fn unknown_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_authorization_header_is_missing_credentials() {
    let fx = Fixture::new().await;
    let resp = Req::post(EVENTS).send(fx.gateway.addr).await;
    assert_refusal(&resp, MISSING_CREDENTIALS, "POST events, no Authorization");
    // Authentication runs before routing: an unknown API says nothing more.
    let resp = Req::get("/campaignapi/resources/v3/nothing-here")
        .send(fx.gateway.addr)
        .await;
    assert_refusal(
        &resp,
        MISSING_CREDENTIALS,
        "GET unknown path, no Authorization",
    );
    fx.finish("missing credentials").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_credentials_are_invalid_token() {
    let fx = Fixture::new().await;
    let too_long = "a".repeat(513);
    let cases: Vec<(&str, String)> = vec![
        ("Basic scheme", "Basic YWxpY2U6c2VjcmV0".to_string()),
        (
            "Basic scheme carrying the key",
            format!("Basic {}", fx.token),
        ),
        ("Bearer without token", "Bearer".to_string()),
        ("Bearer and blanks", "Bearer    ".to_string()),
        ("token with a space", "Bearer abc def".to_string()),
        ("padding inside the token", "Bearer ab=cd".to_string()),
        ("token with a comma", "Bearer ab,cd".to_string()),
        ("513-byte token", format!("Bearer {too_long}")),
        ("scheme glued to token", format!("Bearer{}", fx.token)),
    ];
    for (case, value) in &cases {
        let resp = Req::post(EVENTS)
            .header("authorization", value)
            .send(fx.gateway.addr)
            .await;
        assert_refusal(&resp, INVALID_TOKEN, case);
        assert!(
            !resp.text().contains(&fx.token) && !resp.text().contains(&too_long),
            "{case}: the refusal echoes the credential: {}",
            resp.text()
        );
    }
    fx.finish("invalid credentials").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_credentials_are_invalid_request() {
    let fx = Fixture::new().await;
    let two_headers = Req::post(EVENTS)
        .bearer(&fx.token)
        .bearer(&fx.token)
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&two_headers, INVALID_REQUEST, "the same bearer twice");
    let two_different = Req::post(EVENTS)
        .bearer(&fx.token)
        .header("authorization", "Basic YWxpY2U6c2VjcmV0")
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&two_different, INVALID_REQUEST, "bearer and basic");
    for query in [
        format!("?access_token={}", fx.token),
        "?x=1&access_token=abc".to_string(),
    ] {
        let resp = Req::post(&format!("{EVENTS}{query}"))
            .bearer(&fx.token)
            .send(fx.gateway.addr)
            .await;
        assert_refusal(&resp, INVALID_REQUEST, &format!("header and {query}"));
    }
    fx.finish("ambiguous credentials").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_expired_and_orphaned_keys_are_invalid_token() {
    let fx = Fixture::new().await;
    let unknown = Req::post(EVENTS)
        .bearer(&unknown_token())
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&unknown, INVALID_TOKEN, "unknown key");
    let almost = Req::post(EVENTS)
        .bearer(&format!("A{}", fx.token))
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&almost, INVALID_TOKEN, "a known key with one more byte");

    // Three users whose key works, then stops working for three reasons.
    let graced = fx.env.create_api_user("graced", &["events"]);
    let disabled = fx.env.create_api_user("disabled", &["events"]);
    let deleted = fx.env.create_api_user("deleted", &["events"]);
    let gateway = fx.gateway.addr;
    for token in [&graced, &disabled, &deleted] {
        // The running gateway picks up users created after it started.
        wait_until(Duration::from_secs(2), || async {
            Req::post(EVENTS).bearer(token).send(gateway).await.status == 200
        })
        .await
        .expect("a fresh key works");
    }
    fx.env.cli_ok(&[
        "keys", "delete", "graced", "--slot", "1", "--grace", "300ms",
    ]);
    fx.env.cli_ok(&["users", "disable", "disabled"]);
    fx.env.cli_ok(&["users", "delete", "deleted"]);
    let cases = [
        ("key past its grace deadline", &graced),
        ("disabled user", &disabled),
        ("deleted user", &deleted),
    ];
    for (case, token) in cases {
        wait_until(Duration::from_secs(3), || async {
            Req::post(EVENTS).bearer(token).send(gateway).await.status != 200
        })
        .await
        .unwrap_or_else(|e| panic!("{case}: still accepted: {e}"));
    }
    // Now that every change has applied: each refusal is exact and forwards nothing.
    let before = fx.backend.heads_received();
    for (case, token) in cases {
        let resp = Req::post(EVENTS).bearer(token).send(gateway).await;
        assert_refusal(&resp, INVALID_TOKEN, case);
    }
    assert_eq!(
        fx.backend.heads_received(),
        before,
        "a refusal was forwarded"
    );
    fx.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_of_a_ui_user_is_api_access_denied() {
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    // The CLI never gives a ui user a key, so make a key that resolves to one by
    // turning an API user into a ui user in the store file.
    let token = env.create_api_user("uma", &["events"]);
    make_ui_user(&env, "uma");
    let users = env.cli_json(&["users", "show", "uma"]);
    assert_eq!(users["type"], "ui", "store edit took effect: {users}");
    let gateway = env.start_gateway().await;

    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_refusal(&resp, API_ACCESS_DENIED, "key of a ui user");
    backend.assert_untouched("ui user");
    gateway.shutdown().await;
}

/// Sets `"type": "ui"` on the stored record of user `id`, wherever the store file
/// keeps it.
fn make_ui_user(env: &TestEnv, id: &str) {
    fn visit(value: &mut serde_json::Value, id: &str) -> usize {
        let mut changed = 0;
        match value {
            serde_json::Value::Object(map) => {
                if map.get("id").and_then(|v| v.as_str()) == Some(id)
                    && map.get("type").and_then(|v| v.as_str()) == Some("api")
                {
                    map.insert("type".into(), "ui".into());
                    changed += 1;
                }
                for v in map.values_mut() {
                    changed += visit(v, id);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    changed += visit(v, id);
                }
            }
            _ => {}
        }
        changed
    }
    env.edit_store(|json| {
        assert_eq!(visit(json, id), 1, "one user record {id} in {json:#}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_users_get_no_keys() {
    let env = TestEnv::builder().build();
    env.cli_ok(&["users", "create", "ursula", "--type", "ui"]);
    env.cli_refused(&["keys", "generate", "ursula"]);
    assert_eq!(
        env.cli_json(&["keys", "list", "ursula"]),
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_request_matching_no_api_is_unknown_api() {
    let fx = Fixture::new().await;
    let cases = [
        ("GET", "/campaignapi/resources/v3/nothing-here"),
        ("POST", "/campaignapi/resources/v3/events/extra"),
        // Matching is case-sensitive by default.
        ("POST", "/campaignapi/resources/v3/EVENTS"),
        // A route's method but another route's path.
        ("GET", EVENTS),
        ("GET", "/"),
    ];
    for (method, path) in cases {
        let resp = Req::new(method, path)
            .bearer(&fx.token)
            .send(fx.gateway.addr)
            .await;
        assert_refusal(&resp, UNKNOWN_API, &format!("{method} {path}"));
    }
    fx.finish("unknown api").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_not_granted_is_refused() {
    let fx = Fixture::new().await;
    let resp = Req::get(CAMPAIGN_CONTENT)
        .bearer(&fx.token)
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&resp, API_NOT_GRANTED, "campaigns, granted only events");
    let resp = Req::new(
        "PATCH",
        "/campaignapi/resources/v3/voicecampaigntransactions",
    )
    .bearer(&fx.token)
    .body("{}")
    .send(fx.gateway.addr)
    .await;
    assert_refusal(&resp, API_NOT_GRANTED, "PATCH of campaigns");
    fx.finish("not granted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_paths_are_invalid_path() {
    let fx = Fixture::new().await;
    let targets = [
        "/campaignapi/resources/v3/../v3/events",
        "/campaignapi/resources/./v3/events",
        "/campaignapi/resources/v3/events/..",
        "/campaignapi//resources/v3/events",
        "//campaignapi/resources/v3/events",
        "/campaignapi/resources/v3/events;jsessionid=1",
        "/campaignapi/resources/v3;x/events",
        "/campaignapi/resources/v3%2Fevents",
        "/campaignapi/resources/v3%2fevents",
        "/campaignapi/resources/v3/%2e%2e/v3/events",
        "/campaignapi/resources/v3/%2E/events",
        "/campaignapi/resources/v3/ev%5Cents",
        "/campaignapi/resources/v3/ev\\ents",
        "/campaignapi/resources/v3/ev%00ents",
        "/campaignapi/resources/v3/ev%1Fents",
        "/campaignapi/resources/v3/ev%7Fents",
        "/campaignapi/resources/v3/ev%zzents",
        "/campaignapi/resources/v3/events%2",
        "/campaignapi/resources/v3/events%",
    ];
    for target in targets {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            fx.token
        );
        let reply = raw(fx.gateway.addr, request.as_bytes()).await;
        assert_refusal(&reply.response(), INVALID_PATH, target);
    }
    fx.finish("invalid paths").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_no_route_names_are_method_not_allowed() {
    let fx = Fixture::new().await;
    for method in ["TRACE", "PUT", "DELETE", "OPTIONS", "FROB"] {
        let resp = Req::new(method, EVENTS)
            .bearer(&fx.token)
            .send(fx.gateway.addr)
            .await;
        assert_refusal(&resp, METHOD_NOT_ALLOWED, method);
    }
    // CONNECT takes an authority-form target, which only a raw client sends.
    let connect = format!(
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\
         Authorization: Bearer {}\r\n\r\n",
        fx.token
    );
    let reply = raw(fx.gateway.addr, connect.as_bytes()).await;
    assert_refusal(&reply.response(), METHOD_NOT_ALLOWED, "CONNECT");
    fx.finish("methods").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_payload_too_large() {
    let fx = Fixture::with(|b| b.set("server", "max_body_bytes", "1024")).await;
    let over = payload(2048, 7);

    let resp = Req::post(EVENTS)
        .bearer(&fx.token)
        .body(over.clone())
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&resp, PAYLOAD_TOO_LARGE, "Content-Length 2048 > 1024");
    // With a Content-Length the gateway knows before forwarding anything.
    fx.backend.assert_untouched("Content-Length over the limit");

    // Chunked: the length shows only while streaming. The backend may see the start
    // of the request, but never a complete one.
    let resp = Req::post(EVENTS)
        .bearer(&fx.token)
        .chunked(&over, 256)
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&resp, PAYLOAD_TOO_LARGE, "chunked 2048 > 1024");
    let complete = fx
        .backend
        .requests()
        .into_iter()
        .filter(|r| r.body.is_ok())
        .count();
    assert_eq!(
        complete, 0,
        "an over-limit chunked body reached the backend whole"
    );

    // Exactly at the limit is allowed, both ways.
    let at_limit = payload(1024, 8);
    let resp = Req::post(EVENTS)
        .bearer(&fx.token)
        .body(at_limit.clone())
        .send(fx.gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "1024 bytes with Content-Length");
    let resp = Req::post(EVENTS)
        .bearer(&fx.token)
        .chunked(&at_limit, 100)
        .send(fx.gateway.addr)
        .await;
    assert_eq!(resp.status, 200, "1024 bytes chunked");
    let whole: Vec<_> = fx
        .backend
        .requests()
        .into_iter()
        .filter_map(|r| r.body.ok())
        .collect();
    assert_eq!(whole, [at_limit.clone(), at_limit]);
    fx.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_connections_is_upstream_unavailable() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let env = TestEnv::with_upstream(&format!("http://{closed}"));
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_refusal(&resp, UPSTREAM_UNAVAILABLE, "connection refused");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_resetting_connections_is_upstream_unavailable() {
    // A backend that accepts and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hangups = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            drop(stream);
        }
    });
    let env = TestEnv::with_upstream(&format!("http://{addr}"));
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    assert_refusal(&resp, UPSTREAM_UNAVAILABLE, "connection closed by backend");
    hangups.abort();
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_slower_than_request_timeout_is_upstream_timeout() {
    let backend = RecordingBackend::builder()
        .delay(Duration::from_secs(30))
        .start()
        .await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("server", "request_timeout", "\"500ms\"")
        .build();
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let started = Instant::now();
    let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
    let took = started.elapsed();
    assert_refusal(&resp, UPSTREAM_TIMEOUT, "backend answers after 30 s");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "answered after {took:?}, the timeout is 500ms"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exchange_on_a_reused_backend_connection_gets_the_whole_request_timeout() {
    // The backend connection keeps one timer for its exchanges: set for the exchange
    // before, it fires during the next one, or has fired while the connection was idle.
    // Either way the next exchange still gets its whole `request_timeout` (500 ms) from
    // its own start, and the backend's 300 ms are within it.
    let backend = RecordingBackend::builder()
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let env = TestEnv::builder()
        .upstream(&backend.url())
        .set("server", "request_timeout", "\"500ms\"")
        // One worker, so one pool of backend connections.
        .set("server", "workers", "1")
        .build();
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    for (i, pause) in [0, 0, 400, 0].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let resp = Req::post(EVENTS).bearer(&token).send(gateway.addr).await;
        assert_eq!(resp.status, 200, "request {i}: {:?}", resp.body);
    }
    assert_eq!(backend.requests().len(), 4);
    assert_eq!(
        backend.connections(),
        1,
        "the exchanges shared one backend connection"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_statuses_switch_scope_refusals_to_401() {
    let fx = Fixture::with(|b| b.set("compat", "campaign_statuses", "true")).await;
    let resp = Req::get(CAMPAIGN_CONTENT)
        .bearer(&fx.token)
        .send(fx.gateway.addr)
        .await;
    assert_refusal(
        &resp,
        API_NOT_GRANTED.with_status(401),
        "not granted, compat",
    );

    let ui_token = fx.env.create_api_user("uma", &["events"]);
    make_ui_user(&fx.env, "uma");
    let gateway = fx.gateway.addr;
    wait_until(Duration::from_secs(3), || async {
        let resp = Req::post(EVENTS).bearer(&ui_token).send(gateway).await;
        resp.json()
            .is_some_and(|j| j["error"] == "api_access_denied")
    })
    .await
    .expect("the ui user's record is picked up");
    let resp = Req::post(EVENTS).bearer(&ui_token).send(gateway).await;
    assert_refusal(&resp, API_ACCESS_DENIED.with_status(401), "ui user, compat");

    // The other rows keep their statuses.
    let resp = Req::get("/campaignapi/resources/v3/nothing-here")
        .bearer(&fx.token)
        .send(fx.gateway.addr)
        .await;
    assert_refusal(&resp, UNKNOWN_API, "unknown api, compat");

    // Requests of uma before the edit applied may have been forwarded; alice's
    // refused ones must not have been.
    let alice_forwarded = fx
        .backend
        .requests()
        .iter()
        .filter(|r| r.header("x-campaign-user-id").as_deref() == Some("alice"))
        .count();
    assert_eq!(alice_forwarded, 0, "a refusal reached the backend");
    fx.gateway.shutdown().await;
}
