//! Issue 4, point 1: path confusion. Every target below is sent as raw bytes; each is
//! either refused with 400 before anything reaches the backend, or matched and
//! forwarded byte-identical to the path that was matched. None reaches an API that
//! `alice` (granted `campaigns` only) was not granted.
//!
//! The property test at the end checks the same for random paths at unit level: the
//! API matched for the canonical path is the API the forwarded path matches, also as a
//! normalising backend would read it.

mod common;

use common::hostile::{Fixture, HOST, assert_one_ok, assert_refused_reply};
use common::refusal::{API_NOT_GRANTED, BAD_REQUEST, INVALID_PATH};

const V3: &str = "/campaignapi/resources/v3";

/// `alice` granted `campaigns`: `GET {V3}/campaigncontents/{id}` is hers, `GET
/// {V3}/users/{id}` is not.
async fn fixture() -> Fixture {
    Fixture::new(&["campaigns"]).await
}

fn get(target: &str, token: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n\r\n")
}

/// Each target is refused with 400 `invalid_path`; the connection stays usable (the
/// framing was fine) and the backend is never contacted.
async fn assert_invalid_paths(targets: &[&str]) {
    let fx = fixture().await;
    for target in targets {
        let reply = fx.send(get(target, &fx.token)).await;
        assert_refused_reply(&reply, INVALID_PATH, false, target);
    }
    fx.backend.assert_untouched("invalid paths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_dot_segments_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/../users/1"),
        &format!("{V3}/campaigncontents/1/../../users/1"),
        &format!("{V3}/users/1/.."),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/./users/1"),
        &format!("{V3}/campaigncontents/./1"),
        &format!("{V3}/campaigncontents/1/."),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_dot_segments_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/%2e%2e/users/1"),
        &format!("{V3}/campaigncontents/%2E%2E/users/1"),
        &format!("{V3}/campaigncontents/.%2e/users/1"),
        &format!("{V3}/campaigncontents/%2e./users/1"),
        &format!("{V3}/%2e/users/1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slash_is_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/1%2f..%2f..%2fusers%2f1"),
        &format!("{V3}/campaigncontents/..%2Fusers%2F1"),
        &format!("{V3}%2fusers/1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_backslash_is_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/..%5cusers%5c1"),
        &format!("{V3}/campaigncontents/1%5C..%5C..%5Cusers"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_backslash_is_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/1\\..\\..\\users\\1"),
        &format!("{V3}/campaigncontents\\1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_segments_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}//users/1"),
        &format!("/{V3}/campaigncontents/1"),
        &format!("{V3}/campaigncontents//1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semicolons_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/1;/../../users/1"),
        &format!("{V3}/campaigncontents/..;/users/1"),
        &format!("{V3}/users;x=1/1"),
        &format!("{V3}/campaigncontents/1;jsessionid=x"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_nul_and_controls_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/1%00.json"),
        &format!("{V3}/campaigncontents/1%0d%0aX-Injected:%201"),
        &format!("{V3}/campaigncontents/1%7f"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_escapes_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/%zz"),
        &format!("{V3}/campaigncontents/%g0"),
        &format!("{V3}/campaigncontents/%%32%65"),
        &format!("{V3}/campaigncontents/1%-1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_escape_at_the_end_is_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/1%2"),
        &format!("{V3}/campaigncontents/1%"),
        &format!("{V3}/campaigncontents/1%2?x=1"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn characters_outside_pchar_are_invalid_path() {
    assert_invalid_paths(&[
        &format!("{V3}/campaigncontents/{{1}}"),
        &format!("{V3}/campaigncontents/\"1\""),
        &format!("{V3}/campaigncontents/a|b"),
        &format!("{V3}/campaigncontents/a^b"),
        "*",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_non_ascii_is_refused() {
    let fx = fixture().await;
    let request = |raw: &[u8]| {
        [
            format!("GET {V3}/campaigncontents/").as_bytes(),
            raw,
            format!(
                " HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\n\r\n",
                fx.token
            )
            .as_bytes(),
        ]
        .concat()
    };
    // UTF-8 passes hyper and is refused by the canonicalizer ...
    let reply = fx.send(request("é".as_bytes())).await;
    assert_refused_reply(&reply, INVALID_PATH, false, "raw UTF-8");
    // ... bytes that are not UTF-8 are refused ahead of hyper (which would refuse them
    // too, with an empty body).
    let reply = fx.send(request(b"\xff\xfe")).await;
    assert_refused_reply(&reply, BAD_REQUEST, true, "raw 0xff");
    fx.backend.assert_untouched("raw non-ASCII");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn characters_http_rejects_never_reach_the_gateway() {
    // `<` `>` are not URI characters for hyper at all: refused ahead of it with the
    // JSON 400, connection closed.
    let fx = fixture().await;
    for target in [format!("{V3}/campaigncontents/<1>"), format!("{V3}/a>b")] {
        let reply = fx.send(get(&target, &fx.token)).await;
        assert_refused_reply(&reply, BAD_REQUEST, true, &target);
    }
    fx.backend.assert_untouched("hyper-refused targets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_escaped_dots_are_forwarded_byte_identical() {
    // `%252e` is `%2e` after one decoding: a segment of text, not a dot. It matches
    // `campaigncontents/{id}` and the backend gets exactly the bytes that were matched;
    // a backend that decoded twice would be at fault, and still inside `campaigns`.
    let fx = fixture().await;
    let target = format!("{V3}/campaigncontents/%252e%252e%252fusers%252f1");
    let reply = fx.send(get(&target, &fx.token)).await;
    assert!(!assert_one_ok(&reply, &target), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "GET",
        &target,
        "campaigns",
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreserved_escapes_are_decoded_before_matching_and_forwarding() {
    let fx = fixture().await;
    // `%63` is `c`: decoded once, matched and forwarded decoded.
    let reply = fx
        .send(get(&format!("{V3}/campaign%63ontents/%31"), &fx.token))
        .await;
    assert!(!assert_one_ok(&reply, "escaped c"), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "GET",
        &format!("{V3}/campaigncontents/1"),
        "campaigns",
        &[],
    );
    // `%75` is `u`: the decoded path is `users`, which alice was not granted.
    let reply = fx.send(get(&format!("{V3}/%75sers/1"), &fx.token)).await;
    assert_refused_reply(&reply, API_NOT_GRANTED, false, "escaped u");
    assert_eq!(fx.backend.requests().len(), 1, "users reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_is_dropped_before_matching_and_forwarding() {
    // A request target has no fragment (RFC 9112); `http::Uri` drops everything from a
    // raw `#` on, before the gateway sees the path. What is matched is what is
    // forwarded, and the `../users` after the `#` never reaches the backend.
    let fx = fixture().await;
    let target = format!("{V3}/campaigncontents/1#/../../users/1");
    let reply = fx.send(get(&target, &fx.token)).await;
    assert!(!assert_one_ok(&reply, &target), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "GET",
        &format!("{V3}/campaigncontents/1"),
        "campaigns",
        &[],
    );
    // An escaped `#` is text in the segment, forwarded as sent.
    let target = format!("{V3}/campaigncontents/1%23frag");
    let reply = fx.send(get(&target, &fx.token)).await;
    assert_one_ok(&reply, &target);
    let seen = fx.backend.requests();
    assert_eq!(seen.len(), 2);
    fx.assert_forwarded(&seen[1], "GET", &target, "campaigns", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_is_never_matched() {
    // The path is `users/1` whatever the query says.
    let fx = fixture().await;
    let reply = fx
        .send(get(
            &format!("{V3}/users/1?/../campaigncontents/1"),
            &fx.token,
        ))
        .await;
    assert_refused_reply(&reply, API_NOT_GRANTED, false, "users with a query");
    fx.backend.assert_untouched("query");
    // And the query of a granted path is forwarded untouched, escapes and dots included.
    let target = format!("{V3}/campaigncontents/1?p=../users/1&q=%2F%2e;x");
    let reply = fx.send(get(&target, &fx.token)).await;
    assert_one_ok(&reply, "granted path with an odd query");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "GET",
        &target,
        "campaigns",
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_with_the_host_is_forwarded_as_origin_form() {
    let fx = fixture().await;
    let reply = fx
        .send(get(
            &format!("http://{HOST}{V3}/campaigncontents/1?a=1"),
            &fx.token,
        ))
        .await;
    assert!(!assert_one_ok(&reply, "absolute form"), "connection closed");
    fx.assert_forwarded(
        &fx.backend.single_request(),
        "GET",
        &format!("{V3}/campaigncontents/1?a=1"),
        "campaigns",
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_other_than_host_is_bad_request() {
    let fx = fixture().await;
    for authority in [
        "evil.test",
        "gw.test:80",
        "user@gw.test",
        "gw.test.evil.test",
    ] {
        let reply = fx
            .send(get(
                &format!("http://{authority}{V3}/campaigncontents/1"),
                &fx.token,
            ))
            .await;
        assert_refused_reply(&reply, BAD_REQUEST, true, authority);
    }
    fx.backend
        .assert_untouched("absolute form, other authority");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_paths_are_canonicalized_too() {
    let fx = fixture().await;
    for path in [
        "/campaigncontents/../users/1",
        "/campaigncontents/1%2f..%2fx",
    ] {
        let reply = fx
            .send(get(&format!("http://{HOST}{V3}{path}"), &fx.token))
            .await;
        assert_refused_reply(&reply, INVALID_PATH, false, path);
    }
    fx.backend.assert_untouched("absolute form, bad paths");
}

/// Unit level: for random paths, what the gateway matches is what the backend gets.
mod property {
    use std::borrow::Cow;

    use campaign_gate::config::Config;
    use campaign_gate::path::canonicalize;
    use campaign_gate::routes::RouteTable;
    use http::Method;
    use proptest::prelude::*;

    fn route_table() -> RouteTable {
        let config = Config::parse(super::common::env::CAMPAIGN_APIS, Vec::new())
            .expect("the test catalogue is a valid config");
        config.route_table().expect("route table")
    }

    /// Segments built to hit every rule: route literals (some escaped), ids, dots and
    /// their escapes, escaped separators and controls, double escapes, malformed
    /// escapes, reserved characters and the empty segment.
    fn segment() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "campaignapi",
            "resources",
            "v3",
            "events",
            "users",
            "campaigncontents",
            "metadata",
            "profile",
            "%75sers",
            "%65vents",
            "u%73ers",
            "1",
            "42",
            "x",
            ".",
            "..",
            "%2e",
            "%2E%2e",
            ".%2e",
            "...",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "%00",
            "%0a",
            "%252e",
            "%25",
            "%zz",
            "%2",
            "%",
            ";",
            ";x=1",
            "%3b",
            ":",
            "@",
            "!",
            "~",
            "-",
            "_",
            "%7E",
            "%41",
            "%c3%a9",
            "é",
            "#",
            "?",
            " ",
            "{",
            "",
        ]);
        prop::collection::vec(atoms, 1..3).prop_map(|a| a.concat())
    }

    fn path() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(segment(), 0..7),
            prop::bool::ANY,
            prop::sample::select(vec!["/", "//", ""]),
        )
            .prop_map(|(segments, trailing, lead)| {
                let mut p = format!("{lead}{}", segments.join("/"));
                if trailing {
                    p.push('/');
                }
                p
            })
    }

    /// How a normalising backend reads a path: unreserved escapes decoded, hex
    /// upper-cased, dot segments removed (RFC 3986 6.2.2 and 5.2.4), runs of `/`
    /// merged (nginx `merge_slashes`). Escaped separators and other escapes stay.
    fn backend_view(path: &str) -> String {
        let b = path.as_bytes();
        let mut decoded = String::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = path
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => {
                        decoded.push(char::from(v));
                    }
                    Some(v) => decoded.push_str(&format!("%{v:02X}")),
                    None => decoded.push('%'),
                }
                i += if hex.is_some() { 3 } else { 1 };
            } else {
                let c = path[i..].chars().next().expect("char boundary");
                decoded.push(c);
                i += c.len_utf8();
            }
        }
        let mut out: Vec<&str> = Vec::new();
        let segments: Vec<&str> = decoded.split('/').skip(1).collect();
        let last = segments.len().saturating_sub(1);
        for (n, s) in segments.iter().enumerate() {
            match *s {
                "." => {}
                ".." => {
                    out.pop();
                }
                "" if n != last => {}
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn matched_api_is_the_api_of_the_forwarded_path(path in path()) {
            let routes = route_table();
            let Ok(canonical) = canonicalize(&path) else { return Ok(()) };
            // The gateway forwards `canonical` as is; canonicalising what it forwards
            // changes nothing (so the backend, or a second gateway, sees the same path).
            let again = canonicalize(&canonical);
            prop_assert!(
                matches!(&again, Ok(Cow::Borrowed(p)) if *p == canonical),
                "{path:?} -> {canonical:?} -> {again:?}"
            );
            // No accepted path carries a form a backend may read differently.
            prop_assert!(!canonical.contains("//"), "{canonical:?}");
            prop_assert!(!canonical.contains(';'), "{canonical:?}");
            prop_assert!(!canonical.contains('\\'), "{canonical:?}");
            let upper = canonical.to_ascii_uppercase();
            prop_assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{canonical:?}");
            prop_assert!(
                canonical.split('/').all(|s| s != "." && s != ".."),
                "{canonical:?}"
            );
            for method in [Method::GET, Method::POST, Method::PATCH] {
                let matched = routes.lookup(&method, &canonical);
                // The forwarded path matches the same API ...
                let forwarded = routes.lookup(&method, &again.clone().unwrap_or_default());
                prop_assert_eq!(matched, forwarded, "{} {:?}", method, canonical);
                // ... and so does the path as a normalising backend reads it, both
                // the forwarded one and the one the client sent.
                let view = backend_view(&canonical);
                prop_assert_eq!(&view, &*canonical, "backend reads {:?} differently", canonical);
                let client_view = backend_view(&path);
                let by_backend = routes.lookup(&method, &client_view);
                prop_assert_eq!(
                    matched, by_backend,
                    "{} {:?}: gateway {:?}, backend {:?}", method, path, canonical, client_view
                );
            }
        }
    }
}
