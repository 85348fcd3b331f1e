//! Canonical request paths: the one form of a path that is both matched and forwarded.
//!
//! [`canonicalize`] turns the raw path of a request target into its canonical form, or
//! refuses it. The rules are applied once, left to right, in a single byte scan:
//!
//! - the path starts with `/`;
//! - escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every other
//!   escape is kept with upper-case hex; nothing is decoded twice (`%252e` stays);
//! - refused: escapes of `/`, `\` or a control character; a raw `\` or control character;
//!   a malformed escape; a `.` or `..` segment (after decoding); an empty segment (`//`),
//!   though a single trailing slash and the root `/` are allowed; a `;` anywhere;
//! - refused as well: any raw byte that is not an RFC 3986 `pchar` or `/` (space, `"`,
//!   `{`, `}`, `|`, `^`, `` ` ``, `<`, `>`, `[`, `]`, `#`, `?`, any non-ASCII byte). hyper
//!   accepts several of these, and a backend could parse them differently from us; a path
//!   made only of `pchar`s and `/` has one reading.
//!
//! Because the output is already canonical, canonicalizing it again returns it unchanged
//! (and borrowed).

use std::borrow::Cow;

/// Why a path is not accepted as canonical; each variant names one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is empty, `*`, or otherwise does not start with `/`.
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// `%2F` or `%5C` (any hex case): an escaped path separator.
    #[error("path contains an escaped '/' or '\\'")]
    EncodedSeparator,
    /// An escape of NUL or another control character (`%00`-`%1F`, `%7F`).
    #[error("path contains an escaped control character")]
    EncodedControl,
    /// A raw `\`.
    #[error("path contains a raw '\\'")]
    RawBackslash,
    /// A raw control character (0x00-0x1F, 0x7F).
    #[error("path contains a raw control character")]
    RawControl,
    /// A raw character that is neither an RFC 3986 `pchar` nor `/`.
    #[error("path contains a character that must be percent-encoded")]
    DisallowedChar,
    /// A `%` not followed by two hex digits.
    #[error("path contains a malformed percent-escape")]
    MalformedEscape,
    /// A `.` or `..` segment, after decoding.
    #[error("path contains a '.' or '..' segment")]
    DotSegment,
    /// An empty segment (`//`); a single trailing slash is not one.
    #[error("path contains an empty segment")]
    EmptySegment,
    /// A `;` (matrix parameters are read differently by different servers).
    #[error("path contains ';'")]
    Semicolon,
}

/// Returns the canonical form of `path`, the raw path of a request target (no query).
///
/// The result borrows `path` when it is already canonical, which is the common case and
/// does not allocate; it is owned when an escape was decoded or its hex upper-cased.
pub fn canonicalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Created at the first change; `copied` is how much of `path` it already reflects.
    let mut out: Option<String> = None;
    let mut copied = 0;
    // Raw index where the current segment starts.
    let mut segment = 1;
    let mut i = 1;
    while let Some(&byte) = bytes.get(i) {
        match CLASSES[usize::from(byte)] {
            Class::Plain => {
                // Most bytes are plain: skip the whole run in one tight loop.
                i += bytes[i..]
                    .iter()
                    .position(|&b| !matches!(CLASSES[usize::from(b)], Class::Plain))
                    .unwrap_or(bytes.len() - i);
            }
            Class::Slash => {
                match &bytes[segment..i] {
                    [] => return Err(PathError::EmptySegment),
                    raw if is_dot_segment(raw) => return Err(PathError::DotSegment),
                    _ => {}
                }
                i += 1;
                segment = i;
            }
            Class::Percent => {
                let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathError::MalformedEscape);
                };
                let (Some(hi_value), Some(lo_value)) = (hex_value(hi), hex_value(lo)) else {
                    return Err(PathError::MalformedEscape);
                };
                let decoded = (hi_value << 4) | lo_value;
                if is_unreserved(decoded) {
                    let out = out.get_or_insert_with(|| String::with_capacity(path.len()));
                    out.push_str(&path[copied..i]);
                    out.push(char::from(decoded));
                    copied = i + 3;
                } else if decoded == b'/' || decoded == b'\\' {
                    return Err(PathError::EncodedSeparator);
                } else if decoded < 0x20 || decoded == 0x7f {
                    return Err(PathError::EncodedControl);
                } else if hi.is_ascii_lowercase() || lo.is_ascii_lowercase() {
                    let out = out.get_or_insert_with(|| String::with_capacity(path.len()));
                    out.push_str(&path[copied..i]);
                    out.push('%');
                    out.push(char::from(hi.to_ascii_uppercase()));
                    out.push(char::from(lo.to_ascii_uppercase()));
                    copied = i + 3;
                }
                i += 3;
            }
            Class::Semicolon => return Err(PathError::Semicolon),
            Class::Backslash => return Err(PathError::RawBackslash),
            Class::Control => return Err(PathError::RawControl),
            Class::Disallowed => return Err(PathError::DisallowedChar),
        }
    }
    // The last segment may be empty (root or trailing slash) but not a dot segment.
    if is_dot_segment(&bytes[segment..]) {
        return Err(PathError::DotSegment);
    }
    Ok(match out {
        None => Cow::Borrowed(path),
        Some(mut out) => {
            out.push_str(&path[copied..]);
            Cow::Owned(out)
        }
    })
}

/// Whether a raw segment, whose escapes are known to be well-formed, decodes to `.` or
/// `..`. Such a segment is at most 6 bytes (`%2E%2E`), so longer ones are not looked at.
fn is_dot_segment(mut raw: &[u8]) -> bool {
    if raw.is_empty() || raw.len() > 6 {
        return false;
    }
    let mut dots = 0;
    while !raw.is_empty() {
        raw = match raw {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', b'e' | b'E', rest @ ..] => rest,
            _ => return false,
        };
        dots += 1;
    }
    dots <= 2
}

/// How a raw byte of a path is treated.
#[derive(Clone, Copy)]
enum Class {
    /// An unreserved character, a sub-delim other than `;`, `:` or `@`.
    Plain,
    Slash,
    Percent,
    Semicolon,
    Backslash,
    Control,
    Disallowed,
}

const CLASSES: [Class; 256] = {
    let mut classes = [Class::Disallowed; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        classes[byte] = match b {
            b'/' => Class::Slash,
            b'%' => Class::Percent,
            b';' => Class::Semicolon,
            b'\\' => Class::Backslash,
            0x00..=0x1f | 0x7f => Class::Control,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {
                Class::Plain
            }
            _ if is_unreserved(b) => Class::Plain,
            _ => Class::Disallowed,
        };
        byte += 1;
    }
    classes
};

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The value of one hex digit, either case.
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[track_caller]
    fn borrowed(path: &str) {
        match canonicalize(path) {
            Ok(Cow::Borrowed(out)) => assert_eq!(out, path),
            other => panic!("{path:?}: expected unchanged and borrowed, got {other:?}"),
        }
    }

    #[track_caller]
    fn owned(path: &str, expected: &str) {
        match canonicalize(path) {
            Ok(Cow::Owned(out)) => assert_eq!(out, expected, "{path:?}"),
            other => panic!("{path:?}: expected owned {expected:?}, got {other:?}"),
        }
    }

    #[track_caller]
    fn refused(path: &str, expected: PathError) {
        assert_eq!(canonicalize(path), Err(expected), "{path:?}");
    }

    #[test]
    fn canonical_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/users/",
            "/campaignapi/resources/v3/events",
            "/campaignapi/resources/v3/users/",
            "/a/b/c",
            "/a/.../b",
            "/a/.b",
            "/a/b.",
            "/a/..b",
            "/a/b..",
            "/a/...",
            "/.well-known/x",
            "/A-Z_a.z~0",
            "/!$&'()*+,=:@",
            "/a:b@c/d=e",
            "/%C3%A9t%C3%A9",
            "/%252e",
            "/%25",
            "/a%20b",
            "/%2B",
            "/%80%FF",
        ] {
            borrowed(path);
        }
    }

    #[test]
    fn must_start_with_slash() {
        for path in ["", "*", "a/b", "http://host/a", " /a", "%2Fa"] {
            refused(path, PathError::NotAbsolute);
        }
        borrowed("/");
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        owned(
            "/campaignapi/resources/v3/%65vents",
            "/campaignapi/resources/v3/events",
        );
        owned("/%7e", "/~");
        owned("/%7E", "/~");
        owned("/%41", "/A");
        owned("/%61%62%63", "/abc");
        owned("/%30%39", "/09");
        owned("/a%2Db%5Fc%2e", "/a-b_c.");
        owned("/x/%2e%2e%2e/y", "/x/.../y");
        owned("/x/%2eb", "/x/.b");
        owned("/a%41b/c", "/aAb/c");
    }

    #[test]
    fn other_escapes_are_kept_with_upper_case_hex() {
        owned("/%c3%a9", "/%C3%A9");
        owned("/%c3", "/%C3");
        owned("/%C3%a9", "/%C3%A9");
        owned("/%3f", "/%3F");
        owned("/a%3bb", "/a%3Bb");
        owned("/%2b/%41", "/%2B/A");
        borrowed("/%3B");
        borrowed("/%20");
        borrowed("/%3F%23");
    }

    #[test]
    fn nothing_is_decoded_twice() {
        // `%25` decodes to `%`, which is reserved: the escape is kept and what follows
        // it is plain text, never read as a second escape.
        borrowed("/%252e");
        borrowed("/a/%252e%252e/b");
        borrowed("/%252F");
        borrowed("/%252f");
        borrowed("/%2541");
        owned("/%2e%252e", "/.%252e");
    }

    #[test]
    fn encoded_separators_are_refused() {
        for path in ["/a%2Fb", "/a%2fb", "/%2F", "/a%5Cb", "/a%5cb", "/a/%2F/b"] {
            refused(path, PathError::EncodedSeparator);
        }
    }

    #[test]
    fn encoded_controls_are_refused() {
        for path in [
            "/%00", "/a%0a", "/a%0A", "/%0D%0A", "/%1f", "/%1F", "/%7F", "/%7f",
        ] {
            refused(path, PathError::EncodedControl);
        }
        owned("/%7e", "/~");
        borrowed("/%20");
        borrowed("/%80");
    }

    #[test]
    fn raw_backslash_and_controls_are_refused() {
        refused("/a\\b", PathError::RawBackslash);
        refused("/\\", PathError::RawBackslash);
        for path in ["/a\0b", "/a\nb", "/a\rb", "/a\tb", "/\x1f", "/\x7f"] {
            refused(path, PathError::RawControl);
        }
    }

    #[test]
    fn characters_outside_pchar_are_refused() {
        for c in [
            ' ', '"', '{', '}', '|', '^', '`', '<', '>', '[', ']', '#', '?', 'é', '\u{80}',
        ] {
            refused(&format!("/a{c}b"), PathError::DisallowedChar);
        }
        for c in "!$&'()*+,=:@-._~".chars() {
            borrowed(&format!("/a{c}b"));
        }
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for path in [
            "/%zz", "/%z1", "/%1z", "/a%2", "/a%", "/%", "/%%", "/%%41", "/%-1", "/%g0",
        ] {
            refused(path, PathError::MalformedEscape);
        }
    }

    #[test]
    fn dot_segments_are_refused_after_decoding() {
        for path in [
            "/.",
            "/..",
            "/./",
            "/../",
            "/a/./b",
            "/a/../b",
            "/a/.",
            "/a/..",
            "/a/%2e",
            "/a/%2E",
            "/a/%2e%2e/b",
            "/a/.%2E/b",
            "/a/%2e./b",
            "/a/../",
        ] {
            refused(path, PathError::DotSegment);
        }
        borrowed("/a/.../b");
        borrowed("/a/.b");
        borrowed("/a/b./c");
        owned("/a/%2e%2e%2e/b", "/a/.../b");
        // `%252e` is not a dot after one decoding.
        borrowed("/a/%252e/b");
    }

    #[test]
    fn empty_segments_are_refused_but_trailing_slash_is_allowed() {
        for path in ["//", "//a", "/a//b", "/a/b//", "/a//"] {
            refused(path, PathError::EmptySegment);
        }
        borrowed("/");
        borrowed("/users/");
        borrowed("/a/b/");
    }

    #[test]
    fn semicolons_are_refused() {
        for path in ["/a;b", "/;", "/a/b;jsessionid=1", "/a;/b", "/%41;"] {
            refused(path, PathError::Semicolon);
        }
        owned("/a%3bb", "/a%3Bb");
    }

    #[test]
    fn first_offence_from_the_left_decides() {
        refused("/a;b/%zz", PathError::Semicolon);
        refused("/%zz/a;b", PathError::MalformedEscape);
        refused("/a//b;", PathError::EmptySegment);
        refused("/./a//", PathError::DotSegment);
        refused("/a%2F\\", PathError::EncodedSeparator);
    }

    #[test]
    fn errors_say_why() {
        assert_eq!(
            PathError::EncodedSeparator.to_string(),
            "path contains an escaped '/' or '\\'"
        );
        assert_eq!(PathError::Semicolon.to_string(), "path contains ';'");
    }

    /// Bytes that exercise every rule: plain, separators, escapes and their pieces.
    fn path_strategy() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "a", "Z", "0", "-", ".", "_", "~", "!", "=", ":", "@", "/", "%", "2", "e", "E", "f",
            "F", "c", "%2e", "%2E", "%41", "%7e", "%2f", "%5C", "%00", "%c3", "%25", ";", "\\",
            " ", "?", "é", "\n",
        ]);
        prop::collection::vec(atoms, 0..24).prop_map(|atoms| format!("/{}", atoms.concat()))
    }

    proptest! {
        #[test]
        fn output_is_a_fixed_point(path in path_strategy()) {
            if let Ok(canonical) = canonicalize(&path) {
                let again = canonicalize(&canonical);
                prop_assert!(matches!(again, Ok(Cow::Borrowed(p)) if p == canonical));
            }
        }

        #[test]
        fn borrowed_means_unchanged_and_owned_means_changed(path in path_strategy()) {
            match canonicalize(&path) {
                Ok(Cow::Borrowed(out)) => prop_assert_eq!(out, path.as_str()),
                Ok(Cow::Owned(out)) => prop_assert_ne!(out, path),
                Err(_) => {}
            }
        }

        #[test]
        fn output_has_only_canonical_escapes(path in path_strategy()) {
            if let Ok(canonical) = canonicalize(&path) {
                let bytes = canonical.as_bytes();
                for (i, &b) in bytes.iter().enumerate() {
                    if b == b'%' {
                        let hex = &bytes[i + 1..i + 3];
                        prop_assert!(hex.iter().all(|h| h.is_ascii_digit() || h.is_ascii_uppercase()));
                        let decoded = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                        prop_assert!(!is_unreserved(decoded));
                    }
                }
                prop_assert!(!canonical.contains("//"));
                prop_assert!(canonical.split('/').all(|s| s != "." && s != ".."));
            }
        }
    }
}
