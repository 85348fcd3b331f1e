//! The per-request decision: sanity -> authenticate -> route -> authorize. A function of
//! the request head and the current policy; it never touches the body or the backend.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Version, request};

use crate::auth::bearer::parse_bearer;
use crate::auth::{AuthFailure, Authenticator, Principal, now_ms};
use crate::config::Config;
use crate::errors::Refusal;
use crate::headers::IdentityNames;
use crate::path::canonicalize;
use crate::routes::{ApiId, RouteMatch, RouteTable};
use crate::store::{TokenHash, UserType};

/// Everything a request is judged by that can be reloaded (SIGHUP): built once, shared
/// read-only, swapped whole.
pub struct Policy {
    pub config: Config,
    pub routes: RouteTable,
    pub identity: IdentityNames,
    /// `x-campaign-api` values, indexed by API id.
    api_headers: Vec<HeaderValue>,
}

impl Policy {
    pub fn new(config: Config) -> Result<Policy, String> {
        let routes = config.route_table().map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let identity = IdentityNames::new(&config.upstream.identity_prefix)
            .map_err(|e| format!("upstream.identity_prefix: {e}"))?;
        let api_headers = (0..routes.api_count())
            .map(|i| {
                let id = ApiId(u16::try_from(i).unwrap_or(u16::MAX));
                HeaderValue::from_str(routes.api_name(id)).unwrap_or(HeaderValue::from_static(""))
            })
            .collect();
        Ok(Policy {
            config,
            routes,
            identity,
            api_headers,
        })
    }

    /// The `x-campaign-api` value of an API.
    pub fn api_header(&self, api: ApiId) -> &HeaderValue {
        static NONE: HeaderValue = HeaderValue::from_static("");
        self.api_headers.get(usize::from(api.0)).unwrap_or(&NONE)
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Admission<'a> {
    pub principal: Principal,
    pub api: ApiId,
    /// The canonical path: what was matched, and exactly what is forwarded.
    pub path: Cow<'a, str>,
}

/// How far a refused request got, for metrics and logs.
#[derive(Debug)]
pub struct Rejection {
    pub refusal: Refusal,
    /// The principal, when authentication succeeded before the refusal.
    pub principal: Option<Principal>,
}

impl From<Refusal> for Rejection {
    fn from(refusal: Refusal) -> Self {
        Rejection {
            refusal,
            principal: None,
        }
    }
}

/// Checks that cost nothing and need no credentials: framing, method and path.
pub fn sanity<'a>(head: &'a request::Parts, policy: &Policy) -> Result<Cow<'a, str>, Refusal> {
    framing(head, &policy.config.server)?;
    if !method_is_upper_token(&head.method) {
        return Err(Refusal::BadRequest);
    }
    if !policy.routes.method_allowed(&head.method) {
        return Err(Refusal::MethodNotAllowed);
    }
    canonicalize(head.uri.path()).map_err(|_| Refusal::InvalidPath)
}

/// Request framing and target checks beyond what hyper enforces. hyper already refuses
/// a `Transfer-Encoding` whose last coding is not `chunked`, differing `Content-Length`s
/// and `Transfer-Encoding` on HTTP/1.0; when both `Transfer-Encoding` and
/// `Content-Length` arrive it drops the length, reads the body as chunked and closes the
/// connection after the response. What is left to us:
/// - `Transfer-Encoding` must be exactly one `chunked` (no `chunked, chunked`, no
///   `gzip, chunked`, no second header line);
/// - `Content-Length` must be plain digits without a leading zero, and at most the body
///   limit (413);
/// - exactly one well-formed `Host` on HTTP/1.1 (none needed on HTTP/1.0 and HTTP/2),
///   equal to the authority of an absolute-form target or `:authority`;
/// - the target no longer than `max_uri_bytes` (414).
pub fn framing(head: &request::Parts, limits: &crate::config::ServerConfig) -> Result<(), Refusal> {
    let uri_len = head.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + head.uri.authority().map_or(0, |a| a.as_str().len());
    if uri_len > limits.max_uri_bytes {
        return Err(Refusal::UriTooLong);
    }
    let h = &head.headers;
    let mut te = h.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next()
        && (te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(Refusal::BadRequest);
    }
    if let Some(len) = content_length(h)?
        && len > limits.max_body_bytes
    {
        return Err(Refusal::PayloadTooLarge);
    }
    let mut hosts = h.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest);
    }
    match host {
        None if head.version == Version::HTTP_11 => return Err(Refusal::BadRequest),
        None => {}
        Some(value) => {
            let host = value.as_bytes();
            if !valid_host(host) {
                return Err(Refusal::BadRequest);
            }
            if let Some(target) = head.uri.authority()
                && !target.as_str().as_bytes().eq_ignore_ascii_case(host)
            {
                return Err(Refusal::BadRequest);
            }
        }
    }
    Ok(())
}

/// `Host = uri-host [ ":" port ]` (RFC 9110 section 7.2), checked without allocating:
/// a reg-name or IPv4 address (unreserved, sub-delims, `%`-escapes), or an IP literal
/// in brackets, then an optional port of at most 5 digits. No userinfo, no path.
pub fn valid_host(host: &[u8]) -> bool {
    let port = if host.first() == Some(&b'[') {
        let Some(end) = host.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        &host[end + 1..]
    } else {
        let end = host.iter().position(|&b| b == b':').unwrap_or(host.len());
        let name = &host[..end];
        if name.is_empty()
            || !name.iter().all(|&b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b';'
                            | b'='
                    )
            })
        {
            return false;
        }
        &host[end..]
    };
    match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// The declared body length. Several equal values count as one (hyper has already
/// refused differing ones); anything but plain digits is refused, and so is a leading
/// zero: the value is forwarded as sent, and a backend that reads `010` as octal would
/// take 8 bytes of a 10-byte body and parse the rest as its next request.
fn content_length(h: &http::HeaderMap) -> Result<Option<u64>, Refusal> {
    let mut result = None;
    for v in h.get_all(CONTENT_LENGTH) {
        let b = v.as_bytes();
        if b.is_empty()
            || b.len() > 19
            || !b.iter().all(u8::is_ascii_digit)
            || (b.len() > 1 && b[0] == b'0')
        {
            return Err(Refusal::BadRequest);
        }
        let n = b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if result.is_some_and(|r| r != n) {
            return Err(Refusal::BadRequest);
        }
        result = Some(n);
    }
    Ok(result)
}

/// Extension methods must be upper-case tokens; a backend may treat `get` as `GET`.
fn method_is_upper_token(m: &Method) -> bool {
    m.as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

/// The bearer token of the request, or why there is none usable. A token in the query
/// is never used: alone it is no credential (401), beside the header it is ambiguous
/// (400).
pub fn credential(head: &request::Parts) -> Result<&[u8], Refusal> {
    let mut values = head.headers.get_all(AUTHORIZATION).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::InvalidRequest);
    }
    let value = first.ok_or(Refusal::MissingCredentials)?;
    if head.uri.query().is_some_and(query_has_token) {
        return Err(Refusal::InvalidRequest);
    }
    parse_bearer(value.as_bytes()).map_err(|_| Refusal::InvalidToken)
}

fn query_has_token(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        pair.split('=')
            .next()
            .is_some_and(|name| name == "access_token")
    })
}

/// Refuses `client` with 429 while it is over its failed-authentication limit. Runs
/// before any credential is looked at, so guessing costs the guesser, not the store.
pub fn check_throttle(auth: &Authenticator, client: IpAddr, now: u64) -> Result<(), Refusal> {
    match auth.throttle.blocked(client, now) {
        Some(retry_after_s) => Err(Refusal::TooManyRequests { retry_after_s }),
        None => Ok(()),
    }
}

/// Counts a failed authentication of `client` and returns the refusal for it.
pub fn failed_authentication(auth: &Authenticator, client: IpAddr, now: u64) -> Refusal {
    auth.throttle.record_failure(client, now);
    Refusal::InvalidToken
}

/// Resolves a token hash to its principal. An unknown token counts as a failed
/// authentication of `client` (401); a store outage is 503, never counted.
pub async fn resolve_counted(
    auth: &Authenticator,
    hash: &TokenHash,
    routes: &RouteTable,
    client: IpAddr,
    now: u64,
) -> Result<Principal, Refusal> {
    match auth.resolve_at(hash, routes, now).await {
        Ok(p) => Ok(p),
        Err(AuthFailure::Unknown) => Err(failed_authentication(auth, client, now)),
        Err(AuthFailure::Unavailable) => Err(Refusal::AuthUnavailable { retry_after_s: 1 }),
    }
}

/// The whole decision for one request head.
/// `client` is the address failed authentications are counted against.
pub async fn admit<'a>(
    head: &'a request::Parts,
    policy: &Policy,
    auth: &Authenticator,
    client: IpAddr,
) -> Result<Admission<'a>, Rejection> {
    let path = sanity(head, policy)?;
    let now = now_ms();
    check_throttle(auth, client, now)?;
    let token = match credential(head) {
        Ok(t) => t,
        Err(Refusal::InvalidToken) => return Err(failed_authentication(auth, client, now).into()),
        Err(r) => return Err(r.into()),
    };
    let hash = TokenHash::of(token);
    let principal = resolve_counted(auth, &hash, &policy.routes, client, now).await?;
    // A use is a request the key authenticated, whatever its route and grants: a store
    // lookup records it so (`Store::lookup_for_use`), and so does this.
    if principal.valid_at(now) {
        auth.note_use(&principal, &hash, now);
    }
    authorize(head, path, principal, &policy.routes, now)
}

/// Route and grant checks for an authenticated principal, as of `now` (ms since the
/// epoch: the request's one reading of the wall clock, taken before its lookup).
pub fn authorize<'a>(
    head: &request::Parts,
    path: Cow<'a, str>,
    principal: Principal,
    routes: &RouteTable,
    now: u64,
) -> Result<Admission<'a>, Rejection> {
    let refuse = |refusal, principal| {
        Err(Rejection {
            refusal,
            principal: Some(principal),
        })
    };
    if !principal.valid_at(now) {
        return refuse(Refusal::InvalidToken, principal);
    }
    if principal.user.kind == UserType::Ui {
        return refuse(Refusal::ApiAccessDenied, principal);
    }
    let api = match routes.lookup(&head.method, &path) {
        RouteMatch::Api(api) => api,
        RouteMatch::NoApi => return refuse(Refusal::UnknownApi, principal),
    };
    if !principal.user.grants.contains(api) {
        return refuse(Refusal::ApiNotGranted, principal);
    }
    Ok(Admission {
        principal,
        api,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, auth: &[&str]) -> request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for a in auth {
            b = b.header(AUTHORIZATION, *a);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn credential_rows() {
        assert_eq!(
            credential(&head("GET", "/x", &[])),
            Err(Refusal::MissingCredentials)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Basic a"])),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Bearer "])),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            credential(&head("GET", "/x", &["Bearer a", "Bearer b"])),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            credential(&head("GET", "/x?a=1&access_token=t", &["Bearer a"])),
            Err(Refusal::InvalidRequest)
        );
        assert_eq!(
            credential(&head("GET", "/x?access_token=t", &[])),
            Err(Refusal::MissingCredentials)
        );
        assert_eq!(
            credential(&head("GET", "/x?my_access_token=1", &["Bearer a"])),
            Ok(&b"a"[..])
        );
    }

    #[test]
    fn content_length_must_be_canonical_digits() {
        let with_length = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(CONTENT_LENGTH, HeaderValue::from_str(v).expect("value"));
            content_length(&h)
        };
        assert_eq!(with_length("0"), Ok(Some(0)));
        assert_eq!(with_length("10"), Ok(Some(10)));
        for bad in ["010", "00", "+5", "0x5", "-1", "5 ", ""] {
            assert_eq!(with_length(bad), Err(Refusal::BadRequest), "{bad:?}");
        }
    }

    #[test]
    fn lower_case_methods_are_bad_requests() {
        assert!(method_is_upper_token(&Method::GET));
        assert!(!method_is_upper_token(
            &Method::from_bytes(b"get").expect("method")
        ));
    }
}

#[cfg(test)]
mod host_tests {
    use super::valid_host;

    #[test]
    fn hosts() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "a-b_c.d~e",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "user@host",
            "host/path",
            "host:80:81",
            "host:123456",
            "host:8a",
            "[::1",
            "[]",
            "[::1]x",
            "ho st",
            "host?",
            "host#",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
