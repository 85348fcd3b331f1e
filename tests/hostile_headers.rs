//! Issue 4, point 3: headers a client sends to change what the backend trusts. Each
//! case sends raw bytes and asserts the backend's whole header list: only the
//! gateway's identity headers (for `alice`, granted `events`: `POST` only), the
//! gateway's `X-Forwarded-*`, and what the client may legitimately send.

mod common;

use common::EVENTS;
use common::hostile::{Fixture, HOST, assert_one_ok, assert_refused_reply};
use common::refusal::UNKNOWN_API;

async fn fixture() -> Fixture {
    Fixture::new(&["events"]).await
}

/// `POST` events with alice's key, an empty body and the extra header lines `lines`
/// (each ending in CRLF).
fn post_with(token: &str, lines: &str) -> String {
    format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\n{lines}\r\n"
    )
}

/// Sends `lines` on a granted request and asserts the backend got exactly the
/// gateway's headers (plus `Content-Length: 0`) and nothing of `lines`.
async fn assert_all_replaced_or_removed(lines: &str) {
    let fx = fixture().await;
    let reply = fx.send(post_with(&fx.token, lines)).await;
    assert!(!assert_one_ok(&reply, lines), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "POST",
        EVENTS,
        "events",
        &[("content-length", "0")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_in_any_case_are_replaced() {
    assert_all_replaced_or_removed(
        "X-Campaign-User-Id: admin\r\nX-CAMPAIGN-TENANT: other\r\nx-campaign-api: users\r\n\
         x-Campaign-Key-ID: k1\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_identity_headers_are_replaced_by_one() {
    assert_all_replaced_or_removed(
        "X-Campaign-User-Id: admin\r\nx-campaign-user-id: root\r\n\
         X-CAMPAIGN-USER-ID: alice, admin\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_header_with_the_identity_prefix_is_removed() {
    assert_all_replaced_or_removed(
        "X-Campaign-Role: admin\r\nx-campaign-grants: users,profiles\r\nX-Campaign-: x\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_controlled_headers_are_removed() {
    // CGI, WSGI, Rack and PHP map `-` and `_` alike to `_`: these would reach such a
    // backend as the identity, method-override and forwarded headers.
    assert_all_replaced_or_removed(
        "X_Campaign_User_Id: admin\r\nx-campaign_tenant: other\r\n\
         X_HTTP_Method_Override: DELETE\r\nx_forwarded_for: 10.0.0.1\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_nominate_the_gateways_headers_away() {
    // `Connection` is applied to the client's headers before the gateway adds its own,
    // so nominating them removes only the client's copies.
    assert_all_replaced_or_removed(
        "Connection: x-campaign-user-id, X-Campaign-Tenant, x-forwarded-for, x-request-id\r\n\
         Connection: x-campaign-api, x-campaign-key-id, x-forwarded-proto, x-forwarded-host\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_nominate_host_or_content_length_away() {
    let fx = fixture().await;
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Connection: host, content-length\r\nContent-Length: 5\r\n\r\nhello",
        fx.token
    );
    let reply = fx.send(request).await;
    assert!(
        !assert_one_ok(&reply, "Connection: host"),
        "connection closed"
    );
    let seen = fx.backend.single_request();
    fx.assert_forwarded(&seen, "POST", EVENTS, "events", &[("content-length", "5")]);
    assert_eq!(seen.body(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_nominated_and_hop_by_hop_headers_are_removed() {
    assert_all_replaced_or_removed(
        "Connection: keep-alive, X-Internal-Debug\r\nX-Internal-Debug: 1\r\nKeep-Alive: 5\r\n\
         TE: trailers\r\nTrailer: X-Sum\r\nProxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic YTpi\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_headers_on_a_post_only_grant_are_removed() {
    assert_all_replaced_or_removed(
        "X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: PUT\r\nx-method-override: GET\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_does_not_change_the_method_that_is_matched() {
    // `GET events` matches no API; asking to be treated as `POST` changes nothing.
    let fx = fixture().await;
    let request = format!(
        "GET {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         X-HTTP-Method-Override: POST\r\nX-Method-Override: POST\r\n\r\n",
        fx.token
    );
    let reply = fx.send(request).await;
    assert_refused_reply(&reply, UNKNOWN_API, false, "GET with override to POST");
    fx.backend.assert_untouched("method override");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    assert_all_replaced_or_removed(
        "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 192.0.2.7, 10.0.0.2\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: admin.internal\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_a_trusted_proxy_are_appended_to() {
    let fx = Fixture::with(&["events"], |b| {
        b.set("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
    })
    .await;
    let reply = fx
        .send(post_with(
            &fx.token,
            "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: api.example\r\nX-Campaign-User-Id: admin\r\n",
        ))
        .await;
    assert_one_ok(&reply, "via a trusted proxy");
    let seen = fx.backend.single_request();
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("192.0.2.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("api.example")
    );
    // A trusted proxy is trusted for addresses, not for identities.
    assert_eq!(seen.header("x-campaign-user-id").as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_h2c_are_never_forwarded() {
    // The gateway speaks h2c only with prior knowledge; an upgrade request is served
    // as plain HTTP/1.1 and none of its headers reach the backend.
    assert_all_replaced_or_removed(
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    .await;
    assert_all_replaced_or_removed(
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Connection: Sec-WebSocket-Version\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let backend = common::RecordingBackend::builder()
        .header("connection", "x-backend-internal")
        .header("x-backend-internal", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authenticate", "Basic")
        .header("trailer", "x-sum")
        .header("x-kept", "1")
        .start()
        .await;
    let env = common::TestEnv::with_upstream(&backend.url());
    let token = env.create_api_user("alice", &["events"]);
    let gateway = env.start_gateway().await;
    let reply = common::raw(gateway.addr, post_with(&token, "").as_bytes()).await;
    let resp = reply.response();
    assert_eq!(resp.status, 200);
    for name in [
        "x-backend-internal",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
    ] {
        assert!(
            !resp.headers.contains_key(name),
            "{name} reached the client: {resp:?}"
        );
    }
    assert_eq!(resp.header("x-kept"), Some("1"));
    assert!(!reply.closed, "connection closed");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_sane_request_id_is_kept() {
    let fx = fixture().await;
    let sane = "req-42.A_b:c";
    let reply = fx
        .send(post_with(&fx.token, &format!("X-Request-Id: {sane}\r\n")))
        .await;
    assert_eq!(reply.response().header("x-request-id"), Some(sane));
    let long = "x".repeat(129);
    for lines in [
        format!("X-Request-Id: {long}\r\n"),
        "X-Request-Id: has space\r\n".to_string(),
        "X-Request-Id: a\r\nX-Request-Id: b\r\n".to_string(),
    ] {
        let reply = fx.send(post_with(&fx.token, &lines)).await;
        let id = reply
            .response()
            .header("x-request-id")
            .unwrap_or_default()
            .to_string();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{lines:?}: {id:?}"
        );
    }
    let head = post_with(&fx.token, "");
    let bytes = [
        &head.as_bytes()[..head.len() - 2],
        b"X-Request-Id: caf\xc3\xa9\r\n\r\n",
    ]
    .concat();
    let reply = fx.send(bytes).await;
    assert_eq!(
        reply.response().header("x-request-id").map(str::len),
        Some(32)
    );
    // What the backend got is what the client got back.
    let seen = fx.backend.requests();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].header("x-request-id").as_deref(), Some(sane));
    for r in &seen[1..] {
        assert_eq!(r.header("x-request-id").map(|v| v.len()), Some(32));
    }
}
