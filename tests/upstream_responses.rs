//! What a backend sends back, and what the client gets for it: response framing from
//! the upstream (lengths, chunks, close-delimited bodies, bodiless statuses), broken
//! or hostile answers, and when an upstream connection may be used again.
//!
//! The backend here is a scripted raw-TCP one ([`ScriptedBackend`]): it answers each
//! request it reads with the next bytes of its script, exactly as written, so a test can
//! send what no well-behaved server library would. It records which connection each
//! request head arrived on, so tests assert on connection reuse.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use campaign_gate::server::Gateway;
use common::refusal::UPSTREAM_UNAVAILABLE;
use common::{EVENTS, Req, Resp, TestEnv, assert_refusal, raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A `GET` route (`campaigns`), for `HEAD` and conditional requests.
const CONTENT: &str = "/campaignapi/resources/v3/campaigncontents/42";

/// The answer to the request after the one under test.
const NEXT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext";

/// Bound on one exchange in these tests: every answer here is immediate, so a client
/// still waiting after this is hung (a framing error the gateway did not notice).
const EXCHANGE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------
// Behaviour tests
// ---------------------------------------------------------------------------------

/// A `Content-Length` body reaches the client exactly, and the connection it came on
/// serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_body_is_exact_and_the_connection_is_reused() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-answer: 1\r\n\r\nhello world"),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "hello world");
    assert_eq!(resp.header("x-answer"), Some("1"));
    if let Some(length) = resp.header("content-length") {
        assert_eq!(length, "11");
    }
    gw.assert_next_ok().await;
    assert_eq!(
        backend.connection_of_each(),
        [0, 0],
        "one connection, two requests"
    );
    gw.shutdown().await;
}

/// A chunked body is decoded whatever its chunk extensions and trailers, and since its
/// end is marked, the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_with_extensions_and_trailers_is_decoded_and_the_connection_is_reused() {
    let backend = ScriptedBackend::start([
        Answer::new(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n\
             5;ext=1\r\nhello\r\n\
             1\r\n \r\n\
             5;a=b;c=\"d e\"\r\nworld\r\n\
             A\r\n, chunked!\r\n\
             0\r\nx-trailer: t\r\n\r\n",
        ),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "hello world, chunked!");
    gw.assert_next_ok().await;
    assert_eq!(
        backend.connection_of_each(),
        [0, 0],
        "one connection, two requests"
    );
    gw.shutdown().await;
}

/// A response with neither `Content-Length` nor `Transfer-Encoding` ends when the
/// backend closes: the client gets all of it, and the next request takes a new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_body_arrives_whole_and_the_next_request_connects_anew() {
    // Larger than one read, so that stopping at the first read would show.
    let data = common::payload(300 * 1024, 0xc105e);
    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n".to_vec();
    answer.extend_from_slice(&data);
    let backend =
        ScriptedBackend::start([Answer::new(answer).then(Then::Close), Answer::new(NEXT)]).await;
    let gw = GatewayUnderTest::start(&backend).await;

    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        (resp.body.len(), common::sha256_hex(&resp.body)),
        (data.len(), common::sha256_hex(&data))
    );
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 1]);
    gw.shutdown().await;
}

/// Interim (1xx) responses before the final one are not the answer: the client gets
/// the final status, headers and body, none of the interim headers, and the
/// connection serves the next request. (Whether the interim responses are passed on
/// is left open: the test client skips them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_skipped_and_the_final_one_is_forwarded() {
    let backend = ScriptedBackend::start([
        Answer::new(
            "HTTP/1.1 100 Continue\r\n\r\n\
             HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 201 Created\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nfinal",
        ),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    let resp = gw.post().await;
    assert_eq!(resp.status, 201, "{:?} {}", resp.headers, resp.text());
    assert_eq!(resp.body, "final");
    assert_eq!(resp.header("x-final"), Some("yes"));
    assert_eq!(
        resp.header("link"),
        None,
        "an interim header leaked into the final response"
    );
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 0]);
    gw.shutdown().await;
}

/// `204` and `304` have no body, whatever their headers say (a `304` may carry the
/// `Content-Length` of the representation): the client gets none, and the connection
/// serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_and_not_modified_have_no_body_and_keep_the_connection() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 204 No Content\r\nx-n: 204\r\n\r\n"),
        Answer::new(
            "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 10\r\nx-n: 304\r\n\r\n",
        ),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    let resp = gw.post().await;
    assert_eq!(resp.status, 204, "{}", resp.text());
    assert_eq!(resp.header("x-n"), Some("204"));
    assert!(resp.body.is_empty(), "204 with a body: {:?}", resp.body);

    let resp = exchange(
        Req::get(CONTENT)
            .bearer(&gw.token)
            .header("if-none-match", "\"v1\""),
        gw.addr(),
    )
    .await
    .expect("an answer to the conditional GET");
    assert_eq!(resp.status, 304, "{}", resp.text());
    assert_eq!(resp.header("x-n"), Some("304"));
    assert_eq!(resp.header("etag"), Some("\"v1\""));
    assert!(resp.body.is_empty(), "304 with a body: {:?}", resp.body);

    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 0, 0]);
    gw.shutdown().await;
}

/// The answer to `HEAD` has no body although its `Content-Length` says 5: the client
/// gets that `Content-Length` and no body bytes, and the `GET` that follows on the same
/// upstream connection gets its own answer (the gateway did not wait for, nor take,
/// 5 bytes of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_response_has_no_body_and_the_next_response_is_not_desynced() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"),
        Answer::new("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nget reply"),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    // Raw, with `Connection: close`, to see every byte the gateway sends for it.
    let request = format!(
        "HEAD {CONTENT} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {}\r\n\
         Connection: close\r\n\r\n",
        gw.token
    );
    let reply = tokio::time::timeout(EXCHANGE, raw(gw.addr(), request.as_bytes()))
        .await
        .expect("an answer to HEAD");
    assert!(
        reply.closed,
        "the gateway kept the connection after Connection: close"
    );
    let text = String::from_utf8_lossy(&reply.bytes).into_owned();
    let head_end = text.find("\r\n\r\n").map(|i| i + 4);
    assert_eq!(
        head_end,
        Some(text.len()),
        "bytes after the HEAD response's head: {text:?}"
    );
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    let length: Vec<&str> = text
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(length, ["5"], "{text:?}");

    let resp = exchange(Req::get(CONTENT).bearer(&gw.token), gw.addr())
        .await
        .expect("an answer to the GET after HEAD");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "get reply");

    let heads = backend.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].head.starts_with("HEAD "), "{heads:?}");
    assert!(heads[1].head.starts_with("GET "), "{heads:?}");
    assert_eq!(backend.connection_of_each(), [0, 0]);
    gw.shutdown().await;
}

/// A response with both `Transfer-Encoding: chunked` and `Content-Length` (a
/// smuggling shape) is framed upstream by the chunked encoding (RFC 9112 6.3), not by the
/// length: the request after it is answered with its own response, not with what a
/// length-framed read would have left over (`lo\r\n0\r\n\r\n`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_with_content_length_leaves_nothing_over_for_the_next_request() {
    let backend = ScriptedBackend::start([Answer::new(TE_AND_SHORTER_CL), Answer::new(NEXT)]).await;
    let gw = GatewayUnderTest::start(&backend).await;
    // What the client gets for it is the next test's business.
    let _ = try_post(&gw).await;
    gw.assert_next_ok().await;
    assert_eq!(backend.heads().len(), 2);
    gw.shutdown().await;
}

/// The client never gets a body framed by the backend's `Content-Length` when the
/// backend also sent `Transfer-Encoding: chunked`: it gets the decoded body (with a
/// length that matches it, or chunked), or a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_with_content_length_never_reaches_the_client_framed_by_the_length() {
    for answer in [TE_AND_SHORTER_CL, TE_AND_LONGER_CL] {
        let backend = ScriptedBackend::start([Answer::new(answer)]).await;
        let gw = GatewayUnderTest::start(&backend).await;
        match try_post(&gw).await {
            Ok(resp) if resp.status == 200 => {
                assert_eq!(resp.body, "hello", "{answer:?}: {:?}", resp.headers);
                if let Some(length) = resp.header("content-length") {
                    assert_eq!(
                        length, "5",
                        "{answer:?}: the backend's length reached the client"
                    );
                }
            }
            Ok(resp) => assert_refusal(&resp, UPSTREAM_UNAVAILABLE, answer),
            Err(e) => panic!("{answer:?}: the client got no clean answer: {e}"),
        }
        gw.shutdown().await;
    }
}

/// Chunked `hello` with a `Content-Length` shorter than the chunked body.
const TE_AND_SHORTER_CL: &str = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\
                                 transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

/// Chunked `hello` with a `Content-Length` longer than the chunked body.
const TE_AND_LONGER_CL: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                                content-length: 30\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

/// A `Content-Length` that is not a number is a broken response: 502, and the
/// connection it came on is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_content_length_is_502() {
    assert_bad_framing_is_502("HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\nhello").await;
}

/// Two different `Content-Length` values leave the body's end unknown: 502, and the
/// connection it came on is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_502() {
    assert_bad_framing_is_502(
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    )
    .await;
}

/// Something that is not an HTTP response at all: 502, and the connection it came on
/// is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_status_line_is_502() {
    assert_bad_framing_is_502("HELLO\r\n\r\n").await;
}

/// A backend that reads the request and closes without a byte of answer: 502 (the
/// request was sent, so it is not sent again), and the next request connects anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_without_an_answer_is_502() {
    let backend =
        ScriptedBackend::start([Answer::new("").then(Then::Close), Answer::new(NEXT)]).await;
    let gw = GatewayUnderTest::start(&backend).await;
    let resp = gw.post().await;
    assert_refusal(&resp, UPSTREAM_UNAVAILABLE, "closed without an answer");
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 1]);
    gw.shutdown().await;
}

/// A response head too large to buffer (one header of 1 MB): 502 rather than an
/// unbounded buffer, and the gateway serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_head_is_502_and_the_gateway_stays_usable() {
    assert_bad_framing_is_502(oversized_head(1024 * 1024)).await;
}

/// A response head over the 64 KiB limit (one header of 120,000 bytes) is refused like
/// any oversized head: 502, and the gateway serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_over_64_kib_is_502() {
    assert_bad_framing_is_502(oversized_head(120_000)).await;
}

/// A backend that closes before the body's `Content-Length` is complete: the client
/// must not get a complete `200` with a body of that length (its read fails or the
/// body is short), and the next request works on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_mid_body_does_not_give_a_complete_response() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd").then(Then::Close),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    match try_post(&gw).await {
        Err(_) => {}
        Ok(resp) => assert!(
            resp.status != 200 || resp.body.len() < 10,
            "a truncated body reached the client as complete: {} {:?} {:?}",
            resp.status,
            resp.headers,
            resp.body
        ),
    }
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 1]);
    gw.shutdown().await;
}

/// `Connection: close` from the backend ends that upstream connection: the client gets
/// the body, the gateway closes the connection (even though this backend would keep
/// it) and the next request connects anew. The client's own connection is not
/// affected: `Connection` is hop-by-hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_backend_is_not_reused() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst"),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;

    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n\r\n",
        gw.token
    );
    let reply = tokio::time::timeout(EXCHANGE, raw(gw.addr(), request.as_bytes()))
        .await
        .expect("an answer");
    let resp = reply.response();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "first");
    let connection = resp.header("connection").unwrap_or_default();
    assert!(
        !connection.eq_ignore_ascii_case("close"),
        "the backend's Connection: close reached the client"
    );
    assert!(
        !reply.closed,
        "the backend's Connection: close closed the client's connection"
    );

    assert_closed_and_not_reused(&gw, &backend).await;
    gw.shutdown().await;
}

/// An `HTTP/1.0` response without `Connection: keep-alive` ends its connection: the
/// client gets the body and the next request connects anew (even though this backend
/// would keep the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_response_without_keep_alive_is_not_reused() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nfirst"),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "first");
    assert_closed_and_not_reused(&gw, &backend).await;
    gw.shutdown().await;
}

/// A backend may answer before it has read the request body, and stop reading (here
/// `413` with `Connection: close`, then its sending side closed): the client gets that
/// answer within seconds, not after a timeout, while its upload is unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_reaches_the_client_while_its_upload_is_unfinished() {
    let backend = ScriptedBackend::start([Answer::new(
        "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .without_reading_the_body()
    .then(Then::Hold {
        shutdown_write: true,
    })])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let (resp, took) = unfinished_upload(&gw).await;
    assert_eq!(resp.status, 413, "{:?} {}", resp.headers, resp.text());
    assert!(
        resp.body.is_empty(),
        "not the backend's (empty) 413: {}",
        resp.text()
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    gw.shutdown().await;
}

/// A backend that answers `200` before reading the body and keeps the connection open
/// without reading: the client still gets that answer in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_200_from_a_backend_that_stops_reading_reaches_the_client() {
    let backend =
        ScriptedBackend::start([
            Answer::new("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                .without_reading_the_body()
                .then(Then::Hold {
                    shutdown_write: false,
                }),
        ])
        .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let (resp, took) = unfinished_upload(&gw).await;
    assert_eq!(resp.status, 200, "{:?} {}", resp.headers, resp.text());
    assert_eq!(resp.body, "early");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    gw.shutdown().await;
}

/// Starts a 4 MB upload (`Content-Length`), sends its first 64 KB and waits for the
/// answer without sending more: the answer can only come from a backend that answered
/// early. (A client that kept writing could lose the answer to the reset of a gateway
/// that closes the connection without reading the rest of the body.) Returns the answer
/// and how long it took.
async fn unfinished_upload(gw: &GatewayUnderTest) -> (Resp, Duration) {
    let mut request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        gw.token,
        4 * 1024 * 1024
    )
    .into_bytes();
    request.extend_from_slice(&common::payload(64 * 1024, 0xea71));
    let started = Instant::now();
    let reply = tokio::time::timeout(EXCHANGE, raw(gw.addr(), &request))
        .await
        .expect("an answer before the upload is finished");
    (reply.response(), started.elapsed())
}

/// `101 Switching Protocols` when the gateway asked for no upgrade: what the backend
/// sends after it (another protocol) never reaches the client, the connection is not
/// used again, and the next request works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_switching_protocols_tunnels_nothing_and_is_not_reused() {
    let backend = ScriptedBackend::start([Answer::new(UNREQUESTED_101), Answer::new(NEXT)]).await;
    let gw = GatewayUnderTest::start(&backend).await;
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        gw.token
    );
    let reply = tokio::time::timeout(EXCHANGE, raw(gw.addr(), request.as_bytes()))
        .await
        .expect("an answer");
    let text = String::from_utf8_lossy(&reply.bytes).into_owned();
    assert!(reply.closed, "{text:?}");
    assert!(text.starts_with("HTTP/1.1 "), "{text:?}");
    assert!(
        !text.contains("other protocol"),
        "bytes after the 101 were passed on: {text:?}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("websocket"),
        "the backend's Upgrade reached the client: {text:?}"
    );
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 1]);
    gw.shutdown().await;
}

/// `101 Switching Protocols` when the gateway asked for no upgrade is not an answer the
/// client can use: 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_switching_protocols_is_502() {
    assert_bad_framing_is_502(UNREQUESTED_101).await;
}

/// A `101` to a request that asked for no upgrade, followed by another protocol's bytes.
const UNREQUESTED_101: &str = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                               upgrade: websocket\r\n\r\nother protocol";

/// A response that arrives one byte per write is put together as a whole: status,
/// headers and body, and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_written_one_byte_at_a_time_arrives_whole() {
    let backend = ScriptedBackend::start([
        Answer::new("HTTP/1.1 200 OK\r\nx-slow: 1\r\ncontent-length: 12\r\n\r\nbyte by byte")
            .one_byte_per_write(),
        Answer::new(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
        )
        .one_byte_per_write(),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-slow"), Some("1"));
    assert_eq!(resp.body, "byte by byte");
    let resp = gw.post().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "abc");
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 0, 0]);
    gw.shutdown().await;
}

/// Writes split at awkward places (inside the head's final CRLF CRLF, inside a chunk
/// size line and its CRLF, between a chunk and its CRLF) change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_split_across_head_body_and_chunk_boundaries_arrives_whole() {
    let backend = ScriptedBackend::start([
        Answer::pieces(["HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r", "\nhel", "lo"]),
        Answer::pieces([
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "5",
            "\r",
            "\nworld",
            "\r\n1",
            "1\r\n, split in pieces\r\n0",
            "\r\n",
            "\r\n",
        ]),
        Answer::new(NEXT),
    ])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let resp = gw.post().await;
    assert_eq!(
        (resp.status.as_u16(), resp.text()),
        (200, "hello".to_string())
    );
    let resp = gw.post().await;
    assert_eq!(
        (resp.status.as_u16(), resp.text()),
        (200, "world, split in pieces".to_string())
    );
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 0, 0]);
    gw.shutdown().await;
}

/// The backend's hop-by-hop headers stay on the upstream hop when its body is chunked
/// too: its `Transfer-Encoding`, `Connection` and what that names, `Keep-Alive`,
/// `Proxy-Authenticate`, `Trailer` do not reach the client; the client's framing is the
/// gateway's own, and end-to-end headers pass. (The backend spells its coding `Chunked`,
/// so that its header, passed on, would show next to the gateway's `chunked`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_of_a_chunked_response_are_removed() {
    let backend = ScriptedBackend::start([Answer::new(
        "HTTP/1.1 200 OK\r\n\
         Transfer-Encoding: Chunked\r\n\
         Connection: x-secret, keep-alive\r\n\
         Keep-Alive: timeout=5, max=100\r\n\
         x-secret: 1\r\n\
         Proxy-Authenticate: Basic realm=\"backend\"\r\n\
         Trailer: x-sum\r\n\
         x-kept: yes\r\n\r\n\
         7\r\nchunked\r\n0\r\nx-sum: 1\r\n\r\n",
    )])
    .await;
    let gw = GatewayUnderTest::start(&backend).await;
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        gw.token
    );
    let reply = tokio::time::timeout(EXCHANGE, raw(gw.addr(), request.as_bytes()))
        .await
        .expect("an answer");
    let resp = reply.response();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, "chunked");
    assert_eq!(resp.header("x-kept"), Some("yes"));
    for name in [
        "x-secret",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "x-sum",
    ] {
        assert!(
            !resp.headers.contains_key(name),
            "{name} reached the client: {:?}",
            resp.headers
        );
    }
    let connection = resp
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        !connection.contains("x-secret") && !connection.contains("keep-alive"),
        "the backend's Connection reached the client: {connection}"
    );
    // At most one framing header, the gateway's: one `chunked`, or a length.
    let te: Vec<_> = resp.headers.get_all("transfer-encoding").iter().collect();
    assert!(
        te.is_empty() || te == ["chunked"],
        "transfer-encoding at the client: {te:?}"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------
// Shared assertions
// ---------------------------------------------------------------------------------

/// `answer` to the first request is unusable: the client gets 502
/// `upstream_unavailable`, and the next request is answered properly on a new
/// connection (the backend would keep the first one open and answer on it).
async fn assert_bad_framing_is_502(answer: impl AsRef<[u8]>) {
    let answer = answer.as_ref();
    let shown = String::from_utf8_lossy(&answer[..answer.len().min(120)]).into_owned();
    let backend = ScriptedBackend::start([Answer::new(answer), Answer::new(NEXT)]).await;
    let gw = GatewayUnderTest::start(&backend).await;
    let resp = try_post(&gw)
        .await
        .unwrap_or_else(|e| panic!("no answer for backend response {shown:?}: {e}"));
    assert_refusal(&resp, UPSTREAM_UNAVAILABLE, &shown);
    gw.assert_next_ok().await;
    assert_eq!(
        backend.connection_of_each(),
        [0, 1],
        "the connection of {shown:?} was used again"
    );
    gw.shutdown().await;
}

/// A `200` whose head carries one header of `size` bytes.
fn oversized_head(size: usize) -> Vec<u8> {
    let mut answer = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    answer.resize(answer.len() + size, b'a');
    answer.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
    answer
}

// ---------------------------------------------------------------------------------
// Gateway and client
// ---------------------------------------------------------------------------------

/// A one-worker gateway (so every request goes through one upstream pool) in front of
/// a scripted backend, with `alice` granted `events` and `campaigns`.
struct GatewayUnderTest {
    _env: TestEnv,
    gateway: Gateway,
    token: String,
}

impl GatewayUnderTest {
    async fn start(backend: &ScriptedBackend) -> GatewayUnderTest {
        let env = TestEnv::builder()
            .upstream(&backend.url())
            .set("server", "workers", "1")
            // A connection a test leaves stuck must not hold the shutdown for long.
            .set("server", "shutdown_grace", "\"1s\"")
            .build();
        let token = env.create_api_user("alice", &["events", "campaigns"]);
        let gateway = env.start_gateway().await;
        GatewayUnderTest {
            _env: env,
            gateway,
            token,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.addr
    }

    /// `POST events` with an empty body; panics without an answer.
    async fn post(&self) -> Resp {
        try_post(self)
            .await
            .unwrap_or_else(|e| panic!("POST {EVENTS}: {e}"))
    }

    /// The next request is answered with [`NEXT`]'s `next`.
    async fn assert_next_ok(&self) {
        let resp = self.post().await;
        assert_eq!(
            (resp.status.as_u16(), resp.text()),
            (200, "next".to_string()),
            "the request after the one under test"
        );
    }

    async fn shutdown(self) {
        self.gateway.shutdown().await;
    }
}

/// The gateway closes the upstream connection of the first answer, although the
/// backend would keep it, and the next request goes on a new one.
async fn assert_closed_and_not_reused(gw: &GatewayUnderTest, backend: &ScriptedBackend) {
    common::wait_until(EXCHANGE, || async { backend.closed_by_gateway() >= 1 })
        .await
        .expect("the gateway closes the upstream connection");
    gw.assert_next_ok().await;
    assert_eq!(backend.connection_of_each(), [0, 1]);
}

async fn try_post(gw: &GatewayUnderTest) -> Result<Resp, String> {
    exchange(Req::post(EVENTS).bearer(&gw.token), gw.addr()).await
}

/// Sends `req` on a new connection and reads the whole response within [`EXCHANGE`].
async fn exchange(req: Req, addr: SocketAddr) -> Result<Resp, String> {
    match tokio::time::timeout(EXCHANGE, req.try_send(addr)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete response within {EXCHANGE:?}")),
    }
}

// ---------------------------------------------------------------------------------
// The scripted backend
// ---------------------------------------------------------------------------------

/// What the scripted backend does after writing an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Reads the next request on the same connection.
    KeepOpen,
    /// Closes the connection (FIN, then the socket is dropped).
    Close,
    /// Reads nothing more and keeps the socket open until the backend is dropped;
    /// with `shutdown_write`, its sending side is closed first.
    Hold { shutdown_write: bool },
}

/// The scripted answer to one request.
#[derive(Debug, Clone)]
struct Answer {
    /// Written one after another, each with its own write and flush.
    pieces: Vec<Vec<u8>>,
    /// Pause between two pieces, so that they arrive as separate reads.
    gap: Duration,
    /// Read the request body (by its `Content-Length` or chunked framing) first.
    read_body: bool,
    then: Then,
}

impl Answer {
    /// `bytes` in one write, after the whole request; the connection stays open.
    fn new(bytes: impl AsRef<[u8]>) -> Answer {
        Answer::pieces([bytes])
    }

    /// The concatenation of `pieces`, written one at a time.
    fn pieces<B: AsRef<[u8]>>(pieces: impl IntoIterator<Item = B>) -> Answer {
        Answer {
            pieces: pieces.into_iter().map(|p| p.as_ref().to_vec()).collect(),
            gap: Duration::from_millis(2),
            read_body: true,
            then: Then::KeepOpen,
        }
    }

    /// The same bytes, one byte per write.
    fn one_byte_per_write(mut self) -> Answer {
        self.pieces = self.pieces.concat().into_iter().map(|b| vec![b]).collect();
        self.gap = Duration::from_millis(1);
        self
    }

    /// Answers as soon as the request head has arrived.
    fn without_reading_the_body(mut self) -> Answer {
        self.read_body = false;
        self
    }

    fn then(mut self, then: Then) -> Answer {
        self.then = then;
        self
    }
}

/// One request head as the backend read it, and which accepted connection (0 for the
/// first) it came on.
#[derive(Debug, Clone)]
struct SeenHead {
    connection: usize,
    head: String,
}

#[derive(Debug, Default)]
struct Script {
    connections: AtomicUsize,
    closed_by_gateway: AtomicUsize,
    answers: Mutex<VecDeque<Answer>>,
    heads: Mutex<Vec<SeenHead>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A raw HTTP/1 backend on `127.0.0.1:0` that answers each request it reads (in any
/// connection) with the next [`Answer`] of its script, and closes a connection whose
/// request finds the script used up.
struct ScriptedBackend {
    addr: SocketAddr,
    script: Arc<Script>,
    accept: JoinHandle<()>,
}

impl ScriptedBackend {
    async fn start(answers: impl IntoIterator<Item = Answer>) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let script = Arc::new(Script {
            answers: Mutex::new(answers.into_iter().collect()),
            ..Script::default()
        });
        let accept = tokio::spawn({
            let script = script.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let index = script.connections.fetch_add(1, Ordering::SeqCst);
                    let task = tokio::spawn(serve(stream, index, script.clone()));
                    lock(&script.tasks).push(task);
                }
            }
        });
        ScriptedBackend {
            addr,
            script,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request head read so far, in arrival order.
    fn heads(&self) -> Vec<SeenHead> {
        lock(&self.script.heads).clone()
    }

    /// For each request head read so far, the connection it came on.
    fn connection_of_each(&self) -> Vec<usize> {
        self.heads().iter().map(|h| h.connection).collect()
    }

    /// Connections on which the backend read the end of input.
    fn closed_by_gateway(&self) -> usize {
        self.script.closed_by_gateway.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.accept.abort();
        for task in lock(&self.script.tasks).drain(..) {
            task.abort();
        }
    }
}

/// Serves one connection: request head, maybe its body, the next answer, and so on.
async fn serve(mut stream: TcpStream, index: usize, script: Arc<Script>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut stream, &mut buf).await {
                script.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let answer = lock(&script.answers).pop_front();
        lock(&script.heads).push(SeenHead {
            connection: index,
            head: head.clone(),
        });
        let Some(answer) = answer else { return };
        if answer.read_body && !skip_body(&mut stream, &mut buf, &head).await {
            return;
        }
        for (i, piece) in answer.pieces.iter().enumerate() {
            if i > 0 && !answer.gap.is_zero() {
                tokio::time::sleep(answer.gap).await;
            }
            if stream.write_all(piece).await.is_err() || stream.flush().await.is_err() {
                return;
            }
        }
        match answer.then {
            Then::KeepOpen => {}
            Then::Close => {
                let _ = stream.shutdown().await;
                return;
            }
            Then::Hold { shutdown_write } => {
                if shutdown_write {
                    let _ = stream.shutdown().await;
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Appends what the next read brings; false at the end of input or on an error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Reads until `buf` holds at least `n` bytes; false if the input ends first.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        if !read_more(stream, buf).await {
            return false;
        }
    }
    true
}

/// Reads and discards the body of the request whose head is `head`, by its
/// `Content-Length` or chunked framing; false if the input ends first.
async fn skip_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> bool {
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !read_more(stream, buf).await {
                    return false;
                }
            };
            let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let Ok(size) = usize::from_str_radix(size_text, 16) else {
                return false;
            };
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer lines up to an empty one.
                loop {
                    let end = loop {
                        if let Some(i) = find(buf, b"\r\n") {
                            break i;
                        }
                        if !read_more(stream, buf).await {
                            return false;
                        }
                    };
                    buf.drain(..end + 2);
                    if end == 0 {
                        return true;
                    }
                }
            }
            if !fill(stream, buf, size + 2).await {
                return false;
            }
            buf.drain(..size + 2);
        }
    }
    let length = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if !fill(stream, buf, length).await {
        return false;
    }
    buf.drain(..length);
    true
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
