//! `auth::bearer::parse_bearer` on arbitrary bytes: it never panics, and a token it
//! returns is a non-empty b64token of at most 512 bytes, the tail of the input after a
//! `Bearer` scheme (any case) and spaces.
#![no_main]

use campaign_gate::auth::bearer::{MAX_TOKEN_BYTES, parse_bearer, valid_b64token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = parse_bearer(data) else {
        return;
    };
    assert!(!token.is_empty() && token.len() <= MAX_TOKEN_BYTES);
    assert!(valid_b64token(token));
    assert!(data.ends_with(token), "token is not the tail of the value");
    let head = &data[..data.len() - token.len()];
    assert!(head.len() >= 7 && head[..6].eq_ignore_ascii_case(b"bearer"));
    assert!(head[6..].iter().all(|&b| b == b' '), "{head:?}");
    assert!(token.iter().all(|b| b.is_ascii_graphic()));
});
