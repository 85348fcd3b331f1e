//! Checks of the test harness itself, against the recording backend alone: what the
//! other tests conclude from it is only as good as what it records.

mod common;

use std::time::{Duration, Instant};

use common::{RecordingBackend, Req, parse_response, payload, raw, sha256_hex, wait_until};

#[tokio::test]
async fn backend_records_target_duplicates_and_bodies_as_sent() {
    let backend = RecordingBackend::start().await;
    let data = payload(300_000, 1);
    let resp = Req::post("/a/%65b?q=%2F&q=2")
        .header("x-dup", "1")
        .header("X-Dup", "2")
        .chunked(&data, 7_000)
        .send(backend.addr)
        .await;
    assert_eq!(
        (resp.status.as_u16(), &resp.body[..]),
        (200, &b"backend ok"[..])
    );

    let seen = backend.single_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/a/%65b?q=%2F&q=2");
    assert_eq!(seen.header_all("x-dup"), ["1", "2"]);
    assert_eq!(seen.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(sha256_hex(seen.body()), sha256_hex(&data));
    assert_eq!((backend.connections(), backend.heads_received()), (1, 1));
}

#[tokio::test]
async fn backend_answers_as_configured() {
    let data = payload(100_000, 2);
    let backend = RecordingBackend::builder()
        .status(201)
        .header("x-reply", "yes")
        .streamed_body(data.clone(), 4096)
        .delay(Duration::from_millis(200))
        .start()
        .await;
    let started = Instant::now();
    let resp = Req::get("/").send(backend.addr).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("x-reply"), Some("yes"));
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.body, data);
}

#[tokio::test]
async fn raw_reads_one_response_and_sees_the_close() {
    let backend = RecordingBackend::start().await;
    let keep = raw(backend.addr, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!keep.closed, "keep-alive connection reported closed");
    assert_eq!(keep.response().body, "backend ok");

    let close = raw(
        backend.addr,
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(close.closed, "Connection: close not seen");
    let targets: Vec<String> = backend.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/k", "/c"]);
    backend
        .wait_for_requests(2, Duration::from_secs(1))
        .await
        .expect("recorded");
}

#[test]
fn parse_response_handles_chunked_and_pipelined_replies() {
    let two = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n\
                HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
    let (first, used) = parse_response(two, false).expect("first");
    assert_eq!(
        (first.status.as_u16(), &first.body[..]),
        (200, &b"abcde"[..])
    );
    let (second, rest) = parse_response(&two[used..], false).expect("second");
    assert_eq!(
        (second.status.as_u16(), &second.body[..]),
        (404, &b"no"[..])
    );
    assert_eq!(used + rest, two.len());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", false).is_none());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nuntil close", false).is_none());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nuntil close", true).is_some());
}

#[tokio::test]
async fn wait_until_reports_success_and_timeout() {
    let start = Instant::now();
    let took = wait_until(Duration::from_secs(2), || async {
        start.elapsed() >= Duration::from_millis(50)
    })
    .await
    .expect("becomes true");
    assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(2));
    let err = wait_until(Duration::from_millis(100), || async { false })
        .await
        .expect_err("never true");
    assert!(err.after >= Duration::from_millis(100));
}
