//! Issue 4, point 4: tokens. How the `Authorization` header may and may not carry a
//! key, sent as raw bytes; and, against the real binary with every log level on, that
//! no key ever appears in a log line.

mod common;

use std::time::Duration;

use common::hostile::{Fixture, HOST, assert_one_ok, assert_refused_reply, unknown_token};
use common::refusal::{INVALID_REQUEST, INVALID_TOKEN, MISSING_CREDENTIALS};
use common::{EVENTS, RecordingBackend, TestEnv, raw, wait_until};

async fn fixture() -> Fixture {
    Fixture::new(&["events"]).await
}

/// `POST` events; `auth` is the complete header lines about credentials.
fn post(target: &str, auth: &[u8]) -> Vec<u8> {
    [
        format!("POST {target} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n").as_bytes(),
        auth,
        b"\r\n",
    ]
    .concat()
}

fn bearer_line(scheme: &str, token: &str) -> Vec<u8> {
    format!("Authorization: {scheme} {token}\r\n").into_bytes()
}

/// The request is refused as `expected`, the connection stays open, the backend is not
/// contacted, and the response does not echo the token.
async fn assert_token_refused(
    fx: &Fixture,
    target: &str,
    auth: &[u8],
    expected: common::Refusal,
    case: &str,
) {
    let reply = fx.send(post(target, auth)).await;
    assert_refused_reply(&reply, expected, false, case);
    assert!(
        !String::from_utf8_lossy(&reply.bytes).contains(&fx.token),
        "{case}: the response echoes the key"
    );
    fx.backend.assert_untouched(case);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_bearer_scheme_is_accepted() {
    let fx = fixture().await;
    let reply = fx
        .send(post(EVENTS, &bearer_line("bearer", &fx.token)))
        .await;
    assert!(!assert_one_ok(&reply, "bearer"), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "POST",
        EVENTS,
        "events",
        &[("content-length", "0")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upper_case_bearer_scheme_is_accepted() {
    let fx = fixture().await;
    let reply = fx
        .send(post(EVENTS, &bearer_line("BEARER", &fx.token)))
        .await;
    assert!(!assert_one_ok(&reply, "BEARER"), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "POST",
        EVENTS,
        "events",
        &[("content-length", "0")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_invalid_request() {
    let fx = fixture().await;
    let line = bearer_line("Bearer", &fx.token);
    let auth = [line.as_slice(), line.as_slice()].concat();
    assert_token_refused(&fx, EVENTS, &auth, INVALID_REQUEST, "the key twice").await;
    let auth = [line.as_slice(), b"authorization: Basic YTpi\r\n"].concat();
    assert_token_refused(&fx, EVENTS, &auth, INVALID_REQUEST, "bearer and basic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_query_and_header_is_invalid_request() {
    let fx = fixture().await;
    let line = bearer_line("Bearer", &fx.token);
    for query in [
        format!("?access_token={}", fx.token),
        format!("?a=1&access_token={}&b=2", fx.token),
        "?access_token=".to_string(),
    ] {
        let target = format!("{EVENTS}{query}");
        assert_token_refused(&fx, &target, &line, INVALID_REQUEST, &query).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_only_in_query_is_missing_credentials() {
    let fx = fixture().await;
    let target = format!("{EVENTS}?access_token={}", fx.token);
    assert_token_refused(&fx, &target, b"", MISSING_CREDENTIALS, "query only").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_of_600_bytes_is_invalid_token() {
    let fx = fixture().await;
    // A valid key padded to 600 bytes with b64token characters.
    let long = format!("{}{}", fx.token, "A".repeat(600 - fx.token.len()));
    assert_eq!(long.len(), 600);
    let auth = bearer_line("Bearer", &long);
    assert_token_refused(&fx, EVENTS, &auth, INVALID_TOKEN, "600-byte token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_token_is_invalid_token() {
    let fx = fixture().await;
    for (case, token) in [
        ("UTF-8", "t\u{e9}st".as_bytes().to_vec()),
        (
            "key with a UTF-8 suffix",
            [fx.token.as_bytes(), "\u{e9}".as_bytes()].concat(),
        ),
        ("bytes >= 0x80", b"\x80\xff\xfe".to_vec()),
    ] {
        let auth = [b"Authorization: Bearer ".as_slice(), &token, b"\r\n"].concat();
        assert_token_refused(&fx, EVENTS, &auth, INVALID_TOKEN, case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme_not_followed_by_a_space_is_invalid_token() {
    let fx = fixture().await;
    for (case, line) in [
        ("tab", format!("Authorization: Bearer\t{}\r\n", fx.token)),
        ("glued", format!("Authorization: Bearer{}\r\n", fx.token)),
        ("comma", format!("Authorization: Bearer,{}\r\n", fx.token)),
    ] {
        assert_token_refused(&fx, EVENTS, line.as_bytes(), INVALID_TOKEN, case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_any_log_line() {
    // The real binary, every module at `trace`, its stderr captured to a file.
    let backend = RecordingBackend::start().await;
    let env = TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let server = env.spawn_serve_with_env(&[("CAMPAIGN_GATE_LOG", "trace")]);
    let long = format!("{token}{}", "A".repeat(600 - token.len()));
    let unknown = unknown_token();
    let malformed = format!("{token}!");
    let line = bearer_line("Bearer", &token);
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("valid", EVENTS.into(), line.clone(), 200),
        ("bearer", EVENTS.into(), bearer_line("bearer", &token), 200),
        (
            "twice",
            EVENTS.into(),
            [line.clone(), line.clone()].concat(),
            400,
        ),
        (
            "query and header",
            format!("{EVENTS}?access_token={token}"),
            line.clone(),
            400,
        ),
        (
            "query only",
            format!("{EVENTS}?access_token={token}"),
            Vec::new(),
            401,
        ),
        (
            "600 bytes",
            EVENTS.into(),
            bearer_line("Bearer", &long),
            401,
        ),
        (
            "unknown",
            EVENTS.into(),
            bearer_line("Bearer", &unknown),
            401,
        ),
        (
            "malformed",
            EVENTS.into(),
            bearer_line("Bearer", &malformed),
            401,
        ),
        ("basic", EVENTS.into(), bearer_line("Basic", &token), 401),
        (
            "proxy",
            EVENTS.into(),
            format!("Proxy-Authorization: Bearer {token}\r\n").into(),
            401,
        ),
        (
            "unknown api",
            "/campaignapi/resources/v3/nothing".into(),
            line.clone(),
            404,
        ),
    ];
    // Each request is tagged with a request id, so that its log line can be waited for.
    let tag = |i: usize| format!("log-check-{i}-end");
    for (i, (case, target, auth, status)) in cases.iter().enumerate() {
        let auth = [
            auth.as_slice(),
            format!("X-Request-Id: {}\r\n", tag(i)).as_bytes(),
        ]
        .concat();
        let reply = raw(server.addr, &post(target, &auth)).await;
        assert_eq!(reply.response().status, *status, "{case}");
    }
    let log_path = env.serve_log_path();
    wait_until(Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        (0..cases.len()).all(|i| log.contains(&tag(i)))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "not every request was logged: {e}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    drop(server);
    let log = std::fs::read(&log_path).expect("read the server log");
    let secret = {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&token)
            .expect("the key is base64");
        String::from_utf8(decoded)
            .expect("UTF-8")
            .split_once(':')
            .expect("key id and secret")
            .1
            .to_string()
    };
    let lines = log.split(|&b| b == b'\n').count();
    assert!(lines > cases.len(), "the log has only {lines} lines");
    for (what, needle) in [
        ("key", token.as_str()),
        ("key's secret", secret.as_str()),
        ("600-byte token", long.as_str()),
        ("unknown key", unknown.as_str()),
        ("malformed token", malformed.as_str()),
    ] {
        assert!(
            !log.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the {what} appears in the log:\n{}",
            String::from_utf8_lossy(&log)
        );
    }
}
