//! Issue 4, point 2: request smuggling and framing. Each case sends raw bytes that a
//! front end and a back end could frame differently; the backend sees exactly the one
//! intended request (re-framed by the gateway) or none, and a request hidden in a body
//! never reaches it as a request.
//!
//! Who refuses what: the gateway's framing guard (`src/framing.rs`, ahead of hyper)
//! refuses every head whose body framing is ambiguous or that hyper would refuse:
//! `Transfer-Encoding` with `Content-Length`, `Transfer-Encoding` other than one
//! `chunked`, TE on HTTP/1.0, differing or non-digit `Content-Length`s; hyper never
//! reads such a head, nothing after it on the connection is read, and the client gets
//! the JSON 400 `bad_request` with the connection closed. Bad chunk framing is found
//! while the body streams: 400 `bad_request`, closed, the request never complete at the
//! backend.

mod common;

use common::EVENTS;
use common::hostile::{Fixture, HOST, assert_one_ok, assert_refused_reply, complete_requests};
use common::refusal::{BAD_REQUEST, METHOD_NOT_ALLOWED, MISSING_CREDENTIALS};

/// `alice` may `POST` events; nothing else.
async fn fixture() -> Fixture {
    Fixture::new(&["events"]).await
}

/// `POST` events with alice's key; `rest` is the remaining header lines, the blank
/// line and the body.
fn post(token: &str, rest: &str) -> String {
    format!("POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n{rest}")
}

/// A complete request for an API alice was not granted, to hide in a body.
fn hidden_request(token: &str) -> String {
    format!(
        "GET /campaignapi/resources/v3/users/1 HTTP/1.1\r\nHost: {HOST}\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

/// Every request is refused by the gateway's own framing check (400 `bad_request`,
/// connection closed) and the backend is never contacted.
async fn assert_bad_framing(cases: &[(&str, String)]) {
    let fx = fixture().await;
    for (case, rest) in cases {
        let reply = fx.send(post(&fx.token, rest)).await;
        assert_refused_reply(&reply, BAD_REQUEST, true, case);
    }
    fx.backend.assert_untouched("bad framing");
}

/// The request's body is cut off with 400 `bad_request` and the connection closed; the
/// backend never gets a complete request (at most a head whose body then failed).
async fn assert_body_aborted(cases: &[(&str, String)]) {
    let fx = fixture().await;
    for (case, rest) in cases {
        let reply = fx.send(post(&fx.token, rest)).await;
        assert_refused_reply(&reply, BAD_REQUEST, true, case);
    }
    assert_eq!(
        complete_requests(&fx.backend).len(),
        0,
        "a request with a broken body reached the backend whole: {:#?}",
        fx.backend.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_te_is_refused_before_any_byte_is_forwarded() {
    // A CL-reading front end would take 6 bytes as the body; a TE-reading back end
    // would see the chunked end and then the hidden request. Neither reading happens:
    // the head is refused, and nothing after it is parsed.
    let fx = fixture().await;
    let hidden = hidden_request(&fx.token);
    let reply = fx
        .send(post(
            &fx.token,
            &format!("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"),
        ))
        .await;
    assert_refused_reply(&reply, BAD_REQUEST, true, "CL.TE");
    fx.backend.assert_untouched("CL.TE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_cl_is_refused_and_the_hidden_request_never_parsed() {
    // A CL-reading back end would take `5c\r\n` as the body and the hidden request as
    // its next request. The pair is refused, in either order and whatever the CL says.
    let fx = fixture().await;
    let hidden = hidden_request(&fx.token);
    for (case, cl) in [("TE.CL", "4"), ("TE.CL, CL not a number", "x")] {
        let reply = fx
            .send(post(
                &fx.token,
                &format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {cl}\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
                    hidden.len()
                ),
            ))
            .await;
        assert_refused_reply(&reply, BAD_REQUEST, true, case);
    }
    fx.backend.assert_untouched("TE.CL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_a_refused_head_are_answered_first() {
    // Pipelined: a good request, then a CL.TE head. The good one is forwarded and
    // answered, then the refusal follows in order, and the connection closes; the
    // hidden request after it is never parsed.
    let fx = fixture().await;
    let hidden = hidden_request(&fx.token);
    let good = post(&fx.token, "Content-Length: 2\r\n\r\nok");
    let bad = post(
        &fx.token,
        &format!("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"),
    );
    let reply = fx.send(format!("{good}{bad}")).await;
    let responses = reply.responses();
    assert_eq!(
        responses.len(),
        2,
        "{:?}",
        String::from_utf8_lossy(&reply.bytes)
    );
    assert_eq!(responses[0].status.as_u16(), 200, "{:?}", responses[0]);
    common::refusal::assert_refusal(&responses[1], BAD_REQUEST, "CL.TE after a good request");
    assert!(reply.closed, "connection left open");
    let seen = fx.backend.single_request();
    fx.assert_forwarded(&seen, "POST", EVENTS, "events", &[("content-length", "2")]);
    assert_eq!(seen.body(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_chunked_chunked_is_bad_request() {
    assert_bad_framing(&[
        (
            "chunked, chunked",
            "Transfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "chunked,chunked",
            "Transfer-Encoding: chunked,chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_gzip_chunked_is_bad_request() {
    assert_bad_framing(&[
        (
            "gzip, chunked",
            "Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "identity, chunked",
            "Transfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_te_lines_are_bad_request() {
    assert_bad_framing(&[
        (
            "chunked twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .into(),
        ),
        (
            "gzip then chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_whose_last_coding_is_not_chunked_is_bad_request() {
    assert_bad_framing(&[
        (
            "chunked then identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .into(),
        ),
        (
            "identity with a length",
            "Transfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc".into(),
        ),
        (
            "chunked, gzip",
            "Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "xchunked",
            "Transfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_with_tabs_and_spaces_is_plain_chunked() {
    // Leading and trailing blanks are optional whitespace around the value: still one
    // `chunked`, read and re-framed once, connection kept.
    let fx = fixture().await;
    for te in [
        "\tchunked",
        "chunked\t",
        "   chunked  ",
        "\t chunked \t",
        "CHUNKED",
    ] {
        let reply = fx
            .send(post(
                &fx.token,
                &format!("Transfer-Encoding:{te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            ))
            .await;
        assert!(!assert_one_ok(&reply, te), "{te:?}: connection closed");
    }
    let seen = fx.backend.requests();
    assert_eq!(seen.len(), 5);
    for r in &seen {
        fx.assert_forwarded(
            r,
            "POST",
            EVENTS,
            "events",
            &[("transfer-encoding", "chunked")],
        );
        assert_eq!(r.body(), "abc");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_with_obs_fold_or_blank_before_colon_is_bad_request() {
    assert_bad_framing(&[
        (
            "space before the colon",
            "Transfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "tab before the colon",
            "Transfer-Encoding\t: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "obs-fold",
            "Transfer-Encoding: gzip\r\n chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "vertical tab",
            "Transfer-Encoding:\x0bchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_on_http_1_0_is_bad_request() {
    let fx = fixture().await;
    let request = format!(
        "POST {EVENTS} HTTP/1.0\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        fx.token
    );
    let reply = fx.send(request).await;
    assert_refused_reply(&reply, BAD_REQUEST, true, "TE on HTTP/1.0");
    fx.backend.assert_untouched("TE on HTTP/1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_bad_request() {
    assert_bad_framing(&[
        (
            "two lines",
            "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x".into(),
        ),
        ("a list", "Content-Length: 2, 3\r\n\r\n{}x".into()),
        ("an equal list", "Content-Length: 2, 2\r\n\r\n{}".into()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_content_length_is_bad_request() {
    assert_bad_framing(&[
        ("+2", "Content-Length: +2\r\n\r\n{}".into()),
        ("-2", "Content-Length: -2\r\n\r\n{}".into()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hex_and_other_non_digit_content_length_is_bad_request() {
    assert_bad_framing(&[
        ("0x2", "Content-Length: 0x2\r\n\r\n{}".into()),
        ("2e0", "Content-Length: 2e0\r\n\r\n{}".into()),
        ("2 bytes", "Content-Length: 2 2\r\n\r\n{}".into()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_a_leading_zero_is_bad_request() {
    // The gateway forwards Content-Length as sent; a backend that reads `010` as octal
    // would take 8 of these 10 bytes and parse the rest as its next request.
    assert_bad_framing(&[
        ("010", "Content-Length: 010\r\n\r\n0123456789".into()),
        ("00", "Content-Length: 00\r\n\r\n".into()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_equal_content_length_is_forwarded_once() {
    let fx = fixture().await;
    let reply = fx
        .send(post(
            &fx.token,
            "Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        ))
        .await;
    assert!(!assert_one_ok(&reply, "CL twice"), "connection closed");
    let seen = fx.backend.single_request();
    fx.assert_forwarded(&seen, "POST", EVENTS, "events", &[("content-length", "2")]);
    assert_eq!(seen.body(), "{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_hex_chunk_size_aborts_the_request() {
    assert_body_aborted(&[
        (
            "zz",
            "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into(),
        ),
        (
            "0x3",
            "Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n".into(),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_chunk_size_aborts_the_request() {
    assert_body_aborted(&[(
        "19 hex digits",
        "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n".into(),
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_chunk_size_aborts_the_request() {
    assert_body_aborted(&[(
        "-3",
        "Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n".into(),
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_longer_than_its_size_aborts_the_request() {
    // `3` then six bytes: the three extra would be a request for a parser that skips to
    // the next line.
    assert_body_aborted(&[(
        "3 then abcdef",
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n".into(),
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_hidden_in_a_content_length_body_stays_body() {
    let fx = fixture().await;
    let hidden = hidden_request(&fx.token);
    let reply = fx
        .send(post(
            &fx.token,
            &format!("Content-Length: {}\r\n\r\n{hidden}", hidden.len()),
        ))
        .await;
    assert!(
        !assert_one_ok(&reply, "hidden in CL body"),
        "connection closed"
    );
    let seen = fx.backend.single_request();
    let length = hidden.len().to_string();
    fx.assert_forwarded(
        &seen,
        "POST",
        EVENTS,
        "events",
        &[("content-length", &length)],
    );
    assert_eq!(seen.body(), hidden.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_after_the_body_is_judged_on_its_own() {
    // The bytes after a complete body are the client's next request on this
    // connection: it goes through the whole pipeline, here without credentials.
    let fx = fixture().await;
    let next = format!("GET /campaignapi/resources/v3/users/1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let reply = fx
        .send(post(
            &fx.token,
            &format!("Content-Length: 2\r\n\r\n{{}}{next}"),
        ))
        .await;
    let responses = reply.responses();
    assert_eq!(
        responses.len(),
        2,
        "{:?}",
        String::from_utf8_lossy(&reply.bytes)
    );
    assert_eq!(responses[0].status, 200);
    common::assert_refusal(&responses[1], MISSING_CREDENTIALS, "pipelined GET users");
    assert!(!reply.closed, "connection closed");
    let seen = fx.backend.single_request();
    fx.assert_forwarded(&seen, "POST", EVENTS, "events", &[("content-length", "2")]);
    assert_eq!(seen.body(), "{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_host_is_bad_request() {
    assert_bad_framing(&[
        (
            "other host",
            "Host: evil.test\r\nContent-Length: 0\r\n\r\n".into(),
        ),
        (
            "same host",
            format!("Host: {HOST}\r\nContent-Length: 0\r\n\r\n"),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_host_is_bad_request() {
    let fx = fixture().await;
    let token = &fx.token;
    let cases = [
        (
            "no Host on HTTP/1.1",
            format!(
                "POST {EVENTS} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        ),
        (
            "empty Host",
            format!(
                "POST {EVENTS} HTTP/1.1\r\nHost: \r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        ),
        (
            "Host with a blank",
            format!(
                "POST {EVENTS} HTTP/1.1\r\nHost: gw test\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        ),
        (
            "Host with userinfo",
            format!(
                "POST {EVENTS} HTTP/1.1\r\nHost: alice@{HOST}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        ),
        (
            "Host with a path",
            format!(
                "POST {EVENTS} HTTP/1.1\r\nHost: {HOST}/x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
            ),
        ),
    ];
    for (case, request) in &cases {
        let reply = fx.send(request).await;
        assert_refused_reply(&reply, BAD_REQUEST, true, case);
    }
    fx.backend.assert_untouched("bad Host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_method_is_bad_request() {
    let fx = fixture().await;
    for method in ["post", "Post", "pOST"] {
        let request = format!(
            "{method} {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\n\r\n",
            fx.token
        );
        let reply = fx.send(request).await;
        assert_refused_reply(&reply, BAD_REQUEST, true, method);
    }
    fx.backend.assert_untouched("lower-case methods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_are_method_not_allowed() {
    let fx = fixture().await;
    let cases = [
        format!(
            "TRACE {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\r\n",
            fx.token
        ),
        format!(
            "CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\nAuthorization: Bearer {}\r\n\r\n",
            fx.token
        ),
    ];
    for request in &cases {
        let reply = fx.send(request).await;
        let method = request.split(' ').next().unwrap_or_default();
        assert_refused_reply(&reply, METHOD_NOT_ALLOWED, false, method);
    }
    fx.backend.assert_untouched("CONNECT and TRACE");
}
