//! The `Authorization: Bearer <token>` credential: syntax only (RFC 6750 section 2.1).

/// Longest token accepted on the wire; longer ones are refused before hashing.
pub const MAX_TOKEN_BYTES: usize = 512;

/// Why an `Authorization` value is not a usable bearer credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// The scheme is not `Bearer` (compared case-insensitively).
    Scheme,
    /// No token after the scheme.
    Empty,
    /// The token is not a b64token.
    Malformed,
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    TooLong,
}

/// Returns the token of a `Bearer` credential, borrowed from `value`.
pub fn parse_bearer(value: &[u8]) -> Result<&[u8], BearerError> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Err(BearerError::Scheme);
    }
    let rest = &value[SCHEME.len()..];
    if rest.is_empty() {
        return Err(BearerError::Empty);
    }
    if rest[0] != b' ' {
        // "Bearerx ..." is another scheme.
        return Err(BearerError::Scheme);
    }
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let token = &rest[start..];
    if token.is_empty() {
        return Err(BearerError::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(BearerError::TooLong);
    }
    if !valid_b64token(token) {
        return Err(BearerError::Malformed);
    }
    Ok(token)
}

/// The characters of a b64token's body, as a lookup table.
const B64TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
pub fn valid_b64token(token: &[u8]) -> bool {
    let body_len = token.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_len > 0
        && token[..body_len]
            .iter()
            .fold(true, |ok, &b| ok & B64TOKEN[usize::from(b)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_scheme_case() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "BeArEr   abc"] {
            assert_eq!(parse_bearer(v.as_bytes()), Ok(&b"abc"[..]), "{v}");
        }
        assert_eq!(parse_bearer(b"Bearer YWJj=="), Ok(&b"YWJj=="[..]));
    }

    #[test]
    fn refuses_bad_credentials() {
        assert_eq!(parse_bearer(b"Basic YWJj"), Err(BearerError::Scheme));
        assert_eq!(parse_bearer(b"Bearerabc"), Err(BearerError::Scheme));
        assert_eq!(parse_bearer(b"Bear"), Err(BearerError::Scheme));
        assert_eq!(parse_bearer(b"Bearer"), Err(BearerError::Empty));
        assert_eq!(parse_bearer(b"Bearer   "), Err(BearerError::Empty));
        assert_eq!(parse_bearer(b"Bearer a b"), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(b"Bearer =abc"), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(b"Bearer ab=c"), Err(BearerError::Malformed));
        assert_eq!(
            parse_bearer("Bearer é".as_bytes()),
            Err(BearerError::Malformed)
        );
        let long = format!("Bearer {}", "a".repeat(513));
        assert_eq!(parse_bearer(long.as_bytes()), Err(BearerError::TooLong));
        let ok = format!("Bearer {}", "a".repeat(512));
        assert!(parse_bearer(ok.as_bytes()).is_ok());
    }
}
