//! `pipeline::credential` on arbitrary request targets and `Authorization` lines: it
//! never panics, and it yields a token only for exactly one `Authorization` header, no
//! `access_token` in the query, and a value `parse_bearer` accepts.
#![no_main]

use campaign_gate::auth::bearer::parse_bearer;
use campaign_gate::pipeline::credential;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Pieces separated by 0xFF (never valid in a target or a header value): the target,
    // then one `Authorization` value per piece.
    let mut pieces = data.split(|&b| b == 0xff);
    let Some(target) = pieces.next() else { return };
    let mut builder = http::Request::builder().uri(target);
    let mut values = Vec::new();
    for value in pieces.take(4) {
        let Ok(v) = http::HeaderValue::from_bytes(value) else {
            return;
        };
        builder = builder.header(http::header::AUTHORIZATION, v);
        values.push(value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (head, ()) = request.into_parts();
    let Ok(token) = credential(&head) else { return };
    assert_eq!(
        values.len(),
        1,
        "a token from {} Authorization values",
        values.len()
    );
    assert_eq!(parse_bearer(values[0]), Ok(token));
    if let Some(q) = head.uri.query() {
        assert!(
            !q.split(['&', ';'])
                .any(|p| p.split('=').next() == Some("access_token")),
            "token accepted with access_token in the query {q:?}"
        );
    }
});
