//! `path::canonicalize` on arbitrary strings: it never panics, and whatever it accepts
//! is canonical (a fixed point), free of every refused form, and means the same as the
//! input (decoding both gives the same bytes).
#![no_main]

use std::borrow::Cow;

use campaign_gate::path::canonicalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(canonical) = canonicalize(path) else {
        return;
    };
    match &canonical {
        Cow::Borrowed(p) => assert_eq!(*p, path, "borrowed output differs from input"),
        Cow::Owned(p) => assert_ne!(p, path, "owned output equals input"),
    }
    assert!(
        matches!(canonicalize(&canonical), Ok(Cow::Borrowed(p)) if p == canonical),
        "not a fixed point: {path:?} -> {canonical:?}"
    );
    let c = canonical.as_bytes();
    assert_eq!(c.first(), Some(&b'/'));
    assert!(!canonical.contains("//"), "{canonical:?}");
    assert!(!canonical.contains(';'), "{canonical:?}");
    assert!(!canonical.contains('\\'), "{canonical:?}");
    assert!(
        canonical.split('/').all(|s| s != "." && s != ".."),
        "dot segment in {canonical:?}"
    );
    let upper = canonical.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C"),
        "{canonical:?}"
    );
    for (i, &b) in c.iter().enumerate() {
        assert!(b.is_ascii_graphic(), "raw byte {b:#x} in {canonical:?}");
        if b == b'%' {
            let hex = &c[i + 1..i + 3];
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "escape not upper-case hex in {canonical:?}"
            );
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            assert!(
                !(v.is_ascii_alphanumeric() || b"-._~".contains(&v)),
                "undecoded unreserved escape in {canonical:?}"
            );
            assert!(v >= 0x20 && v != 0x7f && v != b'/' && v != b'\\');
        }
    }
    assert_eq!(
        percent_decode(path.as_bytes()),
        percent_decode(c),
        "{path:?} and {canonical:?} mean different things"
    );
});

/// One full percent-decoding pass (the input's escapes are known to be well-formed).
fn percent_decode(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    while let Some((&b, rest)) = s.split_first() {
        if b == b'%' {
            let v = u8::from_str_radix(std::str::from_utf8(&rest[..2]).unwrap(), 16).unwrap();
            out.push(v);
            s = &rest[2..];
        } else {
            out.push(b);
            s = rest;
        }
    }
    out
}
